"""Peak memory and time of extracting 4 words' maps from one SD3-sized joint
attention layer: the fused op vs materialising softmax(QKᵀ) as today's tools do.

    python benchmarks/bench_joint_maps.py                 # N = 4096 image + 333 text tokens, 24 heads, D 64
    python benchmarks/bench_joint_maps.py --image-tokens 1024
    python benchmarks/bench_joint_maps.py --flux-sweep --out flux-scaling   # FLUX: 1024² -> 2048² images

``--flux-sweep`` takes a FLUX-sized joint layer (24 heads, head dim 128, 512
text tokens; image tokens = (pixels / 16)²) through ``--sizes`` (default 1024,
1536, 2048 px: N = 4096, 9216, 16384) and writes flux_scaling.json, .md and
(with matplotlib) .png: per size the fused op's time and memory, and the
materialised path's, or, where its probability tensor alone would not fit in
this machine's memory, the bytes it would need (projected, not run).

Each variant runs in its own subprocess; peak memory is the rise above the
inputs (``fused.benchmark.PeakMemory``: peak resident set on CPU, max_memory_allocated on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_one(variant: str, n_image: int, n_text: int, heads: int, dim: int, device: str, repeat: int) -> dict:
    import fused
    from fused.benchmark import PeakMemory, time_ms

    torch.manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    S = n_image + n_text
    q, k, v = (torch.randn(1, heads, S, dim, device=device, dtype=dtype) for _ in range(3))
    words = torch.tensor([[n_image + p % n_text for p in (3, 7, 8, 20)]], device=device)  # joint positions of 4 words

    def fused_maps():
        out, maps = fused.cross_attention_with_maps(q, k, v, words)
        return maps[..., :n_image]

    def materialised():
        p = torch.softmax(q @ k.transpose(-1, -2) * dim ** -0.5, dim=-1)
        out = p @ v
        return p[:, :, :n_image][..., words[0]].mean(1).transpose(1, 2), out

    fn = {"fused": fused_maps, "materialised": materialised}[variant]
    memory = PeakMemory(device).start()
    times = time_ms(fn, device, repeat, warmup=0)  # no warm-up: the materialised path's first call is its cost
    peak, rise = memory.stop()
    return dict(variant=variant, image_tokens=n_image, text_tokens=n_text, heads=heads, head_dim=dim,
                device=device, dtype=str(dtype)[6:], best_ms=min(times),
                peak_mb_above_inputs=peak if rise is None else rise)  # no /proc: the lifetime peak


def materialised_bytes(n_image: int, n_text: int, heads: int, dtype_bytes: int) -> int:
    """The [1, heads, S, S] probability tensor plus the score tensor softmax reads: 2·H·S² elements."""
    S = n_image + n_text
    return 2 * heads * S * S * dtype_bytes


def memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run_subprocess(variant: str, n_image: int, n_text: int, heads: int, dim: int, device: str, repeat: int) -> dict:
    cmd = [sys.executable, __file__, "--one", variant, "--image-tokens", str(n_image), "--text-tokens", str(n_text),
           "--heads", str(heads), "--head-dim", str(dim), "--repeat", str(repeat), "--device", device]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{variant} at {n_image} image tokens failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def flux_sweep(sizes: list[int], device: str, repeat: int, out: Path) -> int:
    heads, dim, n_text = 24, 128, 512
    dtype_bytes = 2 if device == "cuda" else 4
    budget = 0.6 * memory_bytes(device)
    rows = []
    for px in sizes:
        n_image = (px // 16) ** 2
        fused_row = run_subprocess("fused", n_image, n_text, heads, dim, device, repeat)
        need = materialised_bytes(n_image, n_text, heads, dtype_bytes)
        if need <= budget:
            mat = run_subprocess("materialised", n_image, n_text, heads, dim, device, repeat)
            mat_ms, mat_mb, ran = mat["best_ms"], mat["peak_mb_above_inputs"], True
        else:
            mat_ms, mat_mb, ran = None, need / 2**20, False
        rows.append(dict(pixels=px, image_tokens=n_image, text_tokens=n_text, heads=heads, head_dim=dim,
                         device=device, dtype=fused_row["dtype"], fused_ms=fused_row["best_ms"],
                         fused_mb=fused_row["peak_mb_above_inputs"], materialised_ms=mat_ms,
                         materialised_mb=mat_mb, materialised_ran=ran, projected_materialised_mb=need / 2**20))
        print(json.dumps(rows[-1]), file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flux_scaling.json").write_text(json.dumps(rows, indent=1))
    lines = [f"FLUX-sized joint attention (24 heads, head dim 128, 512 text tokens, batch 1, 4 words' maps), "
             f"{device} {rows[0]['dtype']}, torch {torch.__version__}, best of {repeat}",
             "", "| image | tokens N+L | fused ms | fused MB | materialised ms | materialised MB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mat_ms = f"{r['materialised_ms']:.0f}" if r["materialised_ran"] else "does not fit"
        mat_mb = f"{r['materialised_mb']:.0f}" if r["materialised_ran"] else f"{r['materialised_mb']:.0f} (projected)"
        lines.append(f"| {r['pixels']}² | {r['image_tokens']}+{r['text_tokens']} | {r['fused_ms']:.0f} | "
                     f"{r['fused_mb']:.0f} | {mat_ms} | {mat_mb} |")
    (out / "flux_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["image_tokens"] + r["text_tokens"] for r in rows]
    ax.plot(x, [r["fused_mb"] for r in rows], "o-", label="fused: measured")
    ax.plot(x, [r["projected_materialised_mb"] for r in rows], "s--", label="materialised: probabilities (projected)")
    ran = [r for r in rows if r["materialised_ran"]]
    if ran:
        ax.plot([r["image_tokens"] + r["text_tokens"] for r in ran], [r["materialised_mb"] for r in ran], "s-",
                label="materialised: measured")
    ax.axhline(memory_bytes(device) / 2**20, color="gray", lw=0.8, label="this machine's memory")
    ax.set_xlabel("joint sequence length N + L")
    ax.set_ylabel("MB above the inputs")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("maps from one FLUX-sized joint attention layer")
    fig.tight_layout()
    fig.savefig(out / "flux_scaling.png", dpi=120)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-tokens", type=int, default=4096)
    p.add_argument("--text-tokens", type=int, default=333)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--flux-sweep", action="store_true", help="FLUX-sized layer over --sizes (see above)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 1536, 2048], help="image sizes in px (sweep)")
    p.add_argument("--out", type=Path, default=Path("flux-scaling"), help="folder for the sweep's files")
    p.add_argument("--one", help=argparse.SUPPRESS)
    o = p.parse_args(argv)
    if o.flux_sweep:
        return flux_sweep(o.sizes, o.device, o.repeat, o.out)
    args = (o.image_tokens, o.text_tokens, o.heads, o.head_dim, o.device, o.repeat)
    if o.one:
        print(json.dumps(run_one(o.one, *args)))
        return 0
    try:
        rows = [run_subprocess(variant, *args[:4], o.device, o.repeat) for variant in ("fused", "materialised")]
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"4 words' maps from one joint attention layer: {o.image_tokens}+{o.text_tokens} tokens, {o.heads} heads, "
          f"head dim {o.head_dim}, {o.device} {rows[0]['dtype']}, torch {torch.__version__}, best of {o.repeat}")
    print("| variant | ms | peak MB above inputs |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['best_ms']:.1f} | {r['peak_mb_above_inputs']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
