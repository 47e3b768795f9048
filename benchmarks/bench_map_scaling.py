"""What getting image->text (video->text) maps costs, as the image or the clip grows:
the fused op against attention without maps (SDPA) and against the materialised path.

    python benchmarks/bench_map_scaling.py --quick --out /tmp/map-scaling     # smallest size of each family
    python benchmarks/bench_map_scaling.py --out map-scaling                  # the whole figure (see below)

Layers (batch 1, 4 words' maps, mean over heads):

- ``flux``: a FLUX-sized joint attention layer, 24 heads, head dim 128, 512 T5
  text tokens then ``(side / 16)²`` image tokens for ``--sides`` (default 512,
  1024, 1536, 2048 px); every one of the ``S = 512 + N`` rows attends to all
  ``S`` keys, as ``fused/processors/joint.py`` runs it
  (``fused.cross_attention_with_maps`` on the joint sequence).
- ``wan``: Wan 2.1 14B's video->text cross-attention (``attn2``): 40 heads,
  head dim 128, 512 T5 keys; the queries are the video's latent patches at
  480x832 (latents 60x104, patch 2: 30x52 = 1560 per latent frame) for
  ``--frames`` (default 17, 33, 49, 81 video frames = 5, 9, 13, 21 latent
  frames: 7800 to 32760 queries).

Paths: ``sdpa`` (``F.scaled_dot_product_attention``: no maps, the floor),
``fused`` (``fused.cross_attention_with_maps``: out, the maps and a log-sum-exp
per row, nothing of size rows x keys) and ``materialised`` (softmax(QKᵀ) kept
and the maps read from it, as today's peer tools do:
``fused.benchmark.paper_maps``).

What is measured, what is computed. Each (layer, path) runs in its own
subprocess on a *slice* of the layer: ``--slice-heads`` heads and
``--slice-rows`` query rows against all of the layer's keys (default on CPU:
1 head x 4096 rows; on CUDA: the whole layer). Rows and heads are independent
in attention, so the whole layer's time is computed as slice time x (heads /
slice heads) x (rows / slice rows); where the slice is the whole layer it is
measured. Memory: the peak above the inputs is measured on the slice
(``fused.benchmark.PeakMemory``: peak resident set on CPU,
max_memory_allocated on CUDA) and set beside the formula of each path at the
slice's shape; the whole layer's memory is the formula (the 2048² FLUX layer's
materialised probabilities alone are 2·24·16896²·4 B = 27 GB in fp32):

- sdpa: the output, ``h·r·D``;
- fused: output + log-sum-exp ``h·r`` + maps ``T·r``;
- materialised: output + scores and probabilities ``2·h·r·K`` (both alive
  while softmax runs) + the gathered columns ``2·h·r·T`` + maps ``T·r``

(elements; ``h`` heads, ``r`` query rows, ``K`` keys, ``T`` = 4 maps). A slice
whose formula exceeds the memory guard (``--mem-limit-gb`` on CPU, 80% of the
GPU's memory on CUDA) is not run (its row says so); each CPU child's address
space is capped at that guard (as bench_vico_step.py does).

Time overhead, paired: the best-of times above come from separate processes,
and on a busy machine they differ by more than a few percent for reasons of
their own. So each layer also runs ``--pairs`` rounds of SDPA then fused, back
to back in one process on the same slice; the table gives the median of
fused / SDPA - 1 over the rounds and its quartiles (the number to compare
with a 10% budget).

Writes map_scaling.json, map_scaling.md and, with matplotlib, map_scaling.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.bench_joint_maps import memory_bytes  # noqa: E402
from benchmarks.bench_vico_step import default_mem_limit_gb, limit_memory, run_child  # noqa: E402
import fused  # noqa: E402
from fused.benchmark import DTYPES, PeakMemory, paper_maps, time_ms  # noqa: E402

PATHS = ("sdpa", "fused", "materialised")
WORDS = (3, 7, 8, 20)  # text positions of the 4 mapped words
FLUX_SIDES = (512, 1024, 1536, 2048)
WAN_FRAMES = (17, 33, 49, 81)
WAN_PATCHES_PER_FRAME = 30 * 52  # 480x832 px -> latents 60x104 -> patches 30x52


@dataclass(frozen=True)
class Layer:
    """One attention layer: ``joint`` = keys are [text | image] and every row is a query (FLUX);
    else the image/video rows attend to the text only (Wan's cross-attention)."""

    family: str
    label: str
    size: int  # side in px (flux) or video frames (wan): the x of the figure
    heads: int
    dim: int
    n_text: int
    n_image: int
    joint: bool

    @property
    def rows(self) -> int:
        return self.n_text + self.n_image if self.joint else self.n_image

    @property
    def keys(self) -> int:
        return self.n_text + self.n_image if self.joint else self.n_text


def flux_layer(side: int) -> Layer:
    return Layer("flux", f"FLUX {side}²", side, 24, 128, 512, (side // 16) ** 2, True)


def wan_layer(frames: int) -> Layer:
    latent_frames = (frames - 1) // 4 + 1
    return Layer("wan", f"Wan 480p {frames} fr", frames, 40, 128, 512, latent_frames * WAN_PATCHES_PER_FRAME, False)


def formula_bytes(path: str, heads: int, rows: int, keys: int, dim: int, element: int, maps: int = len(WORDS)) -> int:
    """Peak bytes above the inputs of one path on ``heads`` x ``rows`` queries against ``keys`` keys (docstring)."""
    out = heads * rows * dim
    extra = {"sdpa": 0, "fused": heads * rows + maps * rows,
             "materialised": 2 * heads * rows * keys + 2 * heads * rows * maps + maps * rows}[path]
    return (out + extra) * element


def slice_of(layer: Layer, heads: int | None, rows: int | None) -> tuple[int, int]:
    """(heads, rows) of the measured slice: None or 0 = all of the layer's."""
    return min(heads or layer.heads, layer.heads), min(rows or layer.rows, layer.rows)


def inputs(layer: Layer, heads: int, rows: int, device: str, dtype: torch.dtype):
    """q [1, heads, rows, D] (the first image rows), k, v [1, heads, keys, D], the maps' key columns [1, 4]."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, rows, layer.dim, generator=g).to(device, dtype)
    k, v = (torch.randn(1, heads, layer.keys, layer.dim, generator=g).to(device, dtype) for _ in range(2))
    index = torch.tensor([list(WORDS)], device=device)  # text comes first in both families' keys
    return q, k, v, index


def variants(q, k, v, index) -> dict:
    import torch.nn.functional as F

    import fused

    return {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
            "fused": lambda: fused.cross_attention_with_maps(q, k, v, index),
            "materialised": lambda: paper_maps(q, k, v, index)}


def run_one(layer: Layer, path: str, heads: int, rows: int, device: str, dtype: torch.dtype, repeat: int) -> dict:
    """Time (best of ``repeat`` after a warm-up) and peak MB above the inputs of one path on one slice, here."""
    q, k, v, index = inputs(layer, heads, rows, device, dtype)
    fn = variants(q, k, v, index)[path]
    fn()  # warm-up: kernels built, allocator primed
    memory = PeakMemory(device).start()
    times = time_ms(fn, device, repeat, warmup=0)
    peak, rise = memory.stop()
    return dict(best_ms=min(times), peak_mb=peak if rise is None else rise, rise_known=rise is not None,
                threads=torch.get_num_threads())


def run_paired(layer: Layer, heads: int, rows: int, device: str, dtype: torch.dtype, rounds: int) -> dict:
    """The fused op's extra time over SDPA from ``rounds`` back-to-back pairs (SDPA then fused, same inputs, one
    process): per round fused / sdpa - 1, then the median and quartiles. Best-of times of two separate processes
    differ by more than a small overhead when anything else runs on the machine; a pair shares its noise."""
    q, k, v, index = inputs(layer, heads, rows, device, dtype)
    fns = variants(q, k, v, index)
    sdpa, fused_fn = fns["sdpa"], fns["fused"]
    sdpa(), fused_fn()  # warm-up
    ratios = []
    for _ in range(rounds):
        a = time_ms(sdpa, device, 1, warmup=0)[0]
        b = time_ms(fused_fn, device, 1, warmup=0)[0]
        ratios.append(b / a - 1)
    ratios.sort()
    n = len(ratios)
    return dict(paired_extra=ratios[n // 2], paired_q1=ratios[n // 4], paired_q3=ratios[(3 * n) // 4], rounds=n)


def child(opts, layer: Layer, path: str, heads: int, rows: int) -> dict:
    """One measurement in its own process; {"error": ...} when it fails or runs out of memory."""
    cmd = [sys.executable, __file__, "--one", json.dumps(asdict(layer)), "--path", path, "--slice-heads", str(heads),
           "--slice-rows", str(rows), "--device", opts.device, "--dtype", opts.dtype, "--repeat", str(opts.repeat),
           "--pairs", str(opts.pairs)]
    return run_child(cmd, opts)


def measure_layer(opts, layer: Layer) -> list[dict]:
    """Per path: the slice's measurement and formula, and the whole layer's time and memory (computed or measured)."""
    element = DTYPES[opts.dtype].itemsize
    heads, rows = slice_of(layer, opts.slice_heads, opts.slice_rows)
    whole = heads == layer.heads and rows == layer.rows
    if opts.device == "cuda":  # the GPU's memory, not the host's
        budget = 0.8 * memory_bytes("cuda")
    else:
        budget = (opts.mem_limit_gb or float("inf")) * 2**30
    out = []
    for path in PATHS:
        row = dict(layer=layer.label, family=layer.family, size=layer.size, heads=layer.heads, dim=layer.dim,
                   n_text=layer.n_text, n_image=layer.n_image, rows=layer.rows, keys=layer.keys, path=path,
                   slice_heads=heads, slice_rows=rows, whole_layer=whole, device=opts.device, dtype=opts.dtype,
                   slice_formula_mb=formula_bytes(path, heads, rows, layer.keys, layer.dim, element) / 2**20,
                   layer_formula_mb=formula_bytes(path, layer.heads, layer.rows, layer.keys, layer.dim, element) / 2**20)
        if row["slice_formula_mb"] * 2**20 > budget:
            row["error"] = f"not run: needs {row['slice_formula_mb'] / 1024:.1f} GB > guard {budget / 2**30:.1f} GB"
        else:
            row.update(child(opts, layer, path, heads, rows))
        if "error" not in row:
            factor = (layer.heads / heads) * (layer.rows / rows)
            row["layer_ms"] = row["best_ms"] * factor
            row["layer_mb"] = row["peak_mb"] if whole else row["layer_formula_mb"]
        out.append(row)
        print(f"  {layer.label} {path}: " + (row["error"] if "error" in row else
                                              f"{row['best_ms']:.1f} ms, {row['peak_mb']:.1f} MB on the slice"),
              file=sys.stderr, flush=True)
    base, fused_row = out[0], out[1]
    if opts.pairs and "error" not in base and "error" not in fused_row:
        paired = child(opts, layer, "paired", heads, rows)
        if "error" in paired:  # the fused row itself ran: keep it, say why the pairs did not
            fused_row["paired_error"] = paired["error"]
        else:
            fused_row.update(paired)
    for row in out[1:]:
        if "error" not in row and "error" not in base:
            row["extra_layer_ms"] = row["layer_ms"] - base["layer_ms"]
            row["extra_layer_mb"] = row["layer_mb"] - base["layer_mb"]
            row["extra_slice_mb"] = row["peak_mb"] - base["peak_mb"]
    return out


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _paired(row: dict) -> str:
    if "paired_extra" not in row:
        return row.get("paired_error", "-")
    return (f"{100 * row['paired_extra']:+.1f}% [{100 * row['paired_q1']:+.1f}%, {100 * row['paired_q3']:+.1f}%] "
            f"of {row['rounds']}")


def format_tables(rows: list[dict], opts) -> str:
    ok = [r for r in rows if "error" not in r]
    threads = ok[0]["threads"] if ok else "?"
    how = "measured" if ok and all(r["whole_layer"] for r in ok) else "computed from the slice"
    lines = [f"Maps of 4 words from one attention layer, batch 1, {opts.device} {opts.dtype}, torch "
             f"{torch.__version__}, {threads} threads, best of {opts.repeat} after a warm-up", "",
             "**Measured, one slice** (slice = heads x query rows, against all of the layer's keys; MB = peak above "
             "the inputs, and the path's formula at the slice's shape)", "",
             "| layer | queries x keys | slice | path | ms | MB measured | MB formula |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['rows']} x {r['keys']}"
        cut = f"{r['slice_heads']} x {r['slice_rows']}"
        if "error" in r:
            lines.append(f"| {r['layer']} | {shape} | {cut} | {r['path']} | {r['error']} | | "
                         f"{r['slice_formula_mb']:.1f} |")
            continue
        lines.append(f"| {r['layer']} | {shape} | {cut} | {r['path']} | {r['best_ms']:.1f} | {r['peak_mb']:.1f} | "
                     f"{r['slice_formula_mb']:.1f} |")
    lines += ["", f"**The whole layer**: time {how} (slice ms x heads / slice heads x rows / slice rows); memory "
              "the formula (measured where the slice is the whole layer); extra = over SDPA", "",
              "| layer | heads | queries x keys | SDPA ms | fused ms | fused extra ms | materialised ms | "
              "materialised extra ms | fused extra MB | materialised extra MB | materialised / fused extra MB | "
              "fused extra time, paired rounds: median [quartiles] |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_layer: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], {})[r["path"]] = r
    for label, paths in by_layer.items():
        s, f, m = (paths.get(p, {}) for p in PATHS)
        mem = "" if f.get("whole_layer") else " (formula)"
        ratio = (m.get("extra_layer_mb") or 0) / f["extra_layer_mb"] if f.get("extra_layer_mb") else None
        lines.append(f"| {label} | {s['heads']} | {s['rows']} x {s['keys']} | {_f(s.get('layer_ms'), '.0f')} | "
                     f"{_f(f.get('layer_ms'), '.0f')} | {_f(f.get('extra_layer_ms'), '+.0f')} | "
                     f"{_f(m.get('layer_ms'), '.0f')} | {_f(m.get('extra_layer_ms'), '+.0f')} | "
                     f"{_f(f.get('extra_layer_mb'), '.1f')}{mem} | {_f(m.get('extra_layer_mb'), '.0f')}{mem} | "
                     f"{_f(ratio, '.0f')}x | {_paired(f)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    """Extra ms and extra MB over SDPA of the whole layer, per family; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    families = list(dict.fromkeys(r["family"] for r in rows))
    fig, axes = plt.subplots(len(families), 2, figsize=(10, 3.6 * len(families)), squeeze=False)
    xlabel = {"flux": "image side (px), FLUX joint layer", "wan": "video frames (480x832), Wan attn2"}
    for family, (ax_t, ax_m) in zip(families, axes):
        for name, style in (("fused", "o-"), ("materialised", "s--")):
            sel = [r for r in rows if r["family"] == family and r["path"] == name and "extra_layer_ms" in r]
            xs = [r["size"] for r in sel]
            ax_t.plot(xs, [r["extra_layer_ms"] for r in sel], style, label=name)
            ax_m.plot(xs, [max(r["extra_layer_mb"], 1e-3) for r in sel], style, label=name)
        ax_t.set_ylabel("extra ms over SDPA (layer)")
        ax_m.set_ylabel("extra MB over SDPA (layer)")
        ax_m.set_yscale("log")
        for ax in (ax_t, ax_m):
            ax.set_xlabel(xlabel.get(family, family))
            ax.legend(fontsize=8)
    whole = all(r["whole_layer"] for r in rows if "error" not in r)
    fig.suptitle("cost of 4 words' maps, one layer: " + ("measured" if whole else
                 "time computed from measured slices, memory from the formulas"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def layers_of(opts) -> list[Layer]:
    sides, frames = (FLUX_SIDES[:1], WAN_FRAMES[:1]) if opts.quick else (opts.sides, opts.frames)
    return ([flux_layer(s) for s in sides] if "flux" in opts.families else []) + \
           ([wan_layer(f) for f in frames] if "wan" in opts.families else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", choices=["flux", "wan"], default=["flux", "wan"])
    p.add_argument("--sides", type=int, nargs="+", default=list(FLUX_SIDES), help="FLUX image sides in px")
    p.add_argument("--frames", type=int, nargs="+", default=list(WAN_FRAMES), help="Wan video frames (4k + 1)")
    p.add_argument("--quick", action="store_true", help="the smallest size of each family, 256-row slices, 1 repeat")
    p.add_argument("--slice-heads", type=int, help="heads per measured slice (default: 1 on CPU, all on CUDA; 0 = all)")
    p.add_argument("--slice-rows", type=int,
                   help="query rows per measured slice (default: 4096 on CPU, all on CUDA; 0 = all)")
    p.add_argument("--repeat", type=int, default=3, help="timed calls after a warm-up (best of N)")
    p.add_argument("--pairs", type=int, default=21,
                   help="rounds of back-to-back SDPA/fused calls in one process for the fused extra time "
                        "(median and quartiles of fused/SDPA - 1; 0: skip)")
    p.add_argument("--device", default=fused.default_device())
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in each child (default: torch's)")
    p.add_argument("--mem-limit-gb", type=float, default=default_mem_limit_gb(),
                   help="memory guard: a slice whose formula needs more is not run, and each CPU child's address "
                        "space may grow by this much (default: 80%% of MemAvailable; 0: no limit)")
    p.add_argument("--out", type=Path, default=Path("map-scaling"), help="folder for map_scaling.json/.md/.png")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--path", choices=PATHS + ("paired",), help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    cpu = opts.device != "cuda"
    opts.dtype = opts.dtype or ("fp32" if cpu else "bf16")
    if cpu and opts.dtype != "fp32":
        p.error("the fused op's CPU kernels take fp32 (or fp64): use --dtype fp32 on CPU")
    if opts.slice_heads is None:
        opts.slice_heads = 1 if cpu else 0
    if opts.slice_rows is None:
        opts.slice_rows = (256 if opts.quick else 4096) if cpu else 0
    if opts.quick:
        opts.repeat, opts.pairs = 1, min(opts.pairs, 3)
    if opts.mem_limit_gb == 0:
        opts.mem_limit_gb = None
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.one:
        if cpu:
            limit_memory(opts.mem_limit_gb)
        layer = Layer(**json.loads(opts.one))
        if opts.path == "paired":
            print(json.dumps(run_paired(layer, opts.slice_heads, opts.slice_rows, opts.device, DTYPES[opts.dtype],
                                        opts.pairs)))
            return 0
        print(json.dumps(run_one(layer, opts.path, opts.slice_heads, opts.slice_rows, opts.device,
                                 DTYPES[opts.dtype], opts.repeat)))
        return 0
    rows = [r for layer in layers_of(opts) for r in measure_layer(opts, layer)]
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "map_scaling.json").write_text(json.dumps(dict(torch=torch.__version__, argv=sys.argv[1:], rows=rows),
                                                          indent=1))
    table = format_tables(rows, opts)
    (opts.out / "map_scaling.md").write_text(table + "\n")
    print(table)
    if not plot(rows, opts.out / "map_scaling.png"):
        print("bench_map_scaling: matplotlib is not installed; wrote the tables only (no map_scaling.png)",
              file=sys.stderr)
    failed = [r for r in rows if "error" in r and not r["error"].startswith(("out of memory", "not run"))]
    for r in failed:
        print(f"{r['layer']} {r['path']} failed:\n{r.get('stderr_tail', '')}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
