"""The maps op on every backend against attention without maps, paired rounds in one process.

    python benchmarks/bench_maps_backends.py --out /tmp/maps-backends              # CPU, one thread
    python benchmarks/bench_maps_backends.py --device cuda --dtype fp16 --out DIR  # GPU: adds triton

Shapes: SD 1.5's three attn2 layers at 512 px, batch 2 with classifier-free
guidance ([2, 8, N, 77, D]), SDXL's two ([2, 10, 4096, 77, 64], [2, 20, 1024, 77,
64]) and a FLUX-sized joint layer ([1, 24, 4096, 4608, 128]; on CPU one head of
it, ``--flux-heads``). Paths: ``SDPA`` (``F.scaled_dot_product_attention``, no
maps: the floor), ``fused.cross_attention_with_maps`` with ``backend=`` each of
cpp / triton / sdpa that runs here, and the materialising reference
(``backend="torch"``; skipped where its probabilities would pass
``--mem-limit-gb``).

Time: ``--rounds`` rounds; in each round every path runs once, back to back on
the same inputs, and each path's time is divided by SDPA's of that round; the
table gives the median of those ratios and its quartiles (a pair shares the
machine's noise, where best-of times of separate runs do not).

Memory (``--memory``): the peak above the inputs of one call of each path at
[1, 1, N, N, 64] for N = ``--memory-n`` (default 8192), each path in its own
subprocess (``fused.benchmark.PeakMemory``).

Writes maps_backends.md, maps_backends.json and maps_backends.csv (one row per
shape and path: the columns of benchmarks/data/*.csv).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import fused
from fused.benchmark import DTYPES, PeakMemory, time_ms

SHAPES = {
    "SD1.5 attn2 64x64": (2, 8, 4096, 77, 40),
    "SD1.5 attn2 32x32": (2, 8, 1024, 77, 80),
    "SD1.5 attn2 16x16": (2, 8, 256, 77, 160),
    "SDXL attn2 64x64": (2, 10, 4096, 77, 64),
    "SDXL attn2 32x32": (2, 20, 1024, 77, 64),
    "FLUX joint 1024px": (1, 24, 4096, 4608, 128),
}
INDEX = [5, 6, 7, 8]  # four words' maps


def inputs(shape, device: str, dtype: torch.dtype):
    B, H, N, L, D = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, N, D, generator=g).to(device, dtype)
    k, v = (torch.randn(B, H, L, D, generator=g).to(device, dtype) for _ in range(2))
    return q, k, v, torch.tensor([INDEX] * B, device=device)


def paths(device: str, dtype: torch.dtype, shape, mem_limit_gb: float) -> list[str]:
    B, H, N, L, _ = shape
    names = [b for b in ("cpp", "triton", "sdpa") if b in fused.available_backends(device)
             and fused._dispatch.REGISTRY[b].refusal("attention", dtype, torch.device(device).type) is None]
    if 2 * B * H * N * L * torch.finfo(dtype).bits / 8 <= mem_limit_gb * 2**30:
        names.append("torch")
    return names


def paired(shape, device: str, dtype: torch.dtype, rounds: int, mem_limit_gb: float) -> dict[str, dict]:
    q, k, v, index = inputs(shape, device, dtype)
    fns = {"SDPA": lambda: F.scaled_dot_product_attention(q, k, v)}
    for name in paths(device, dtype, shape, mem_limit_gb):
        fns[name] = lambda name=name: fused.cross_attention_with_maps(q, k, v, index, backend=name)
    for fn in fns.values():
        fn()  # warm-up: kernels built and self-checked, allocator primed
    ratios: dict[str, list[float]] = {name: [] for name in fns if name != "SDPA"}
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        times = {name: time_ms(fn, device, 1, warmup=0)[0] for name, fn in fns.items()}
        for name, t in times.items():
            best[name] = min(best[name], t)
        for name in ratios:
            ratios[name].append(times[name] / times["SDPA"])
    out = {"SDPA": dict(best_ms=best["SDPA"])}
    for name, r in ratios.items():
        r.sort()
        n = len(r)
        out[name] = dict(best_ms=best[name], ratio=r[n // 2], q1=r[n // 4], q3=r[(3 * n) // 4], rounds=n)
    return out


def memory_child(path: str, n: int, device: str, dtype: torch.dtype) -> dict:
    q, k, v, index = inputs((1, 1, n, n, 64), device, dtype)
    if path == "SDPA":
        def fn():
            return F.scaled_dot_product_attention(q, k, v)
    else:
        def fn():
            return fused.cross_attention_with_maps(q, k, v, index, backend=path)
    sq, sk, sv, sindex = inputs((1, 1, 64, 64, 64), device, dtype)
    F.scaled_dot_product_attention(sq, sk, sv)  # load libraries, register ops, run first-use checks: not measured
    if path != "SDPA":
        fused.cross_attention_with_maps(sq, sk, sv, sindex, backend=path)
    probe = PeakMemory(device).start()
    fn()
    peak, rise = probe.stop()
    return dict(peak_mb=peak if rise is None else rise)


def memory_table(opts) -> dict[str, float]:
    dtype = DTYPES[opts.dtype]
    result = {}
    for path in ["SDPA"] + paths(opts.device, dtype, (1, 1, opts.memory_n, opts.memory_n, 64), opts.mem_limit_gb):
        cmd = [sys.executable, __file__, "--memory-child", path, "--memory-n", str(opts.memory_n), "--device",
               opts.device, "--dtype", opts.dtype, "--threads", str(opts.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        result[path] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"] if proc.returncode == 0 else None
    return result


def markdown(rows: dict, memory: dict | None, opts, header: str) -> str:
    order = ["cpp", "triton", "sdpa", "torch"]
    backends = [b for b in order if any(b in r for r in rows.values())]
    lines = [header, "", "Time of the maps op (out + 4 maps) / SDPA without maps, per round; median [quartiles] "
             f"of {opts.rounds} paired rounds; torch = the materialising reference.", "",
             "| layer [B, H, N, L, D] | SDPA ms | " + " | ".join(backends) + " |",
             "|---|---:|" + "---:|" * len(backends)]
    for name, r in rows.items():
        cells = [f"{r[b]['ratio']:.2f}x [{r[b]['q1']:.2f}, {r[b]['q3']:.2f}]" if b in r else "-" for b in backends]
        lines.append(f"| {name} {list(r['shape'])} | {r['SDPA']['best_ms']:.1f} | " + " | ".join(cells) + " |")
    if memory:
        lines += ["", f"Peak memory above the inputs, one call at [1, 1, {opts.memory_n}, {opts.memory_n}, 64] "
                  f"({opts.dtype}), MB:", "", "| path | MB |", "|---|---:|"]
        lines += [f"| {p} | {'-' if mb is None else f'{mb:.0f}'} |" for p, mb in memory.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default fp32 on CPU, fp16 on CUDA")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--flux-heads", type=int, default=None, help="heads of the FLUX layer (default: 1 on CPU, all)")
    p.add_argument("--mem-limit-gb", type=float, default=4.0, help="skip the reference above this much probability")
    p.add_argument("--memory", action="store_true", help="also the peak-memory table")
    p.add_argument("--memory-n", type=int, default=8192)
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path("maps-backends"))
    opts = p.parse_args(argv)
    opts.dtype = opts.dtype or ("fp16" if opts.device == "cuda" else "fp32")
    torch.set_num_threads(opts.threads)
    if opts.memory_child:
        print(json.dumps(memory_child(opts.memory_child, opts.memory_n, opts.device, DTYPES[opts.dtype])))
        return 0
    dtype = DTYPES[opts.dtype]
    rows = {}
    for name in opts.shapes:
        shape = SHAPES[name]
        if name.startswith("FLUX"):
            heads = opts.flux_heads or (1 if opts.device == "cpu" else shape[1])
            shape = (shape[0], heads) + shape[2:]
        print(f"{name} {list(shape)} ...", file=sys.stderr)
        rows[name] = dict(paired(shape, opts.device, dtype, opts.rounds, opts.mem_limit_gb), shape=shape)
    memory = memory_table(opts) if opts.memory else None
    device = torch.cuda.get_device_name() if opts.device == "cuda" else f"CPU, {opts.threads} thread(s)"
    date = datetime.date.today().isoformat()
    command = "python benchmarks/bench_maps_backends.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = f"**{device}**, torch {torch.__version__}, {opts.dtype}, {date}: `{command}`"
    opts.out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, memory, opts, header)
    (opts.out / "maps_backends.md").write_text(text)
    (opts.out / "maps_backends.json").write_text(json.dumps(dict(rows=rows, memory=memory, device=device, date=date,
                                                                  command=command, dtype=opts.dtype), indent=1))
    with open(opts.out / "maps_backends.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["op", "shape", "backend", "dtype", "metric", "value", "unit", "device", "date", "command"])
        for name, r in rows.items():
            for path, m in r.items():
                if path == "shape":
                    continue
                shape = "x".join(map(str, r["shape"]))
                w.writerow(["cross_attention_with_maps", shape, path, opts.dtype, "best", f"{m['best_ms']:.3f}", "ms",
                            device, date, command])
                if "ratio" in m:
                    w.writerow(["cross_attention_with_maps", shape, path, opts.dtype, "paired_ratio_vs_sdpa",
                                f"{m['ratio']:.4f}", "x", device, date, command])
        for path, mb in (memory or {}).items():
            w.writerow(["cross_attention_with_maps", f"1x1x{opts.memory_n}x{opts.memory_n}x64", path, opts.dtype,
                        "peak_above_inputs", "" if mb is None else f"{mb:.1f}", "MB", device, date, command])
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
