"""One run that checks and benchmarks every kernel on a GPU (docs/shapes.md §1 and §2 shapes).

    python benchmarks/gpu_check.py [--out results.json]          # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --tiny      # CPU smoke run (CI)

1. correctness: every backend that runs on the device against the float64
   reference, forward and backward, at all SD 1.5 attention shapes in fp32,
   fp16 and bf16 (fp16/bf16 must stay within twice the error of the PyTorch
   path at the same dtype; fp32 within 1e-4); Otsu masks bit for bit.
2. a CUDA graph capture and replay of ``cross_attention_with_mask``.
3. timings: fused vs the ``paper`` baseline (materialise, softmax, index,
   head mean) vs ``F.scaled_dot_product_attention`` without maps (speed of
   light), with achieved GB/s next to the device's measured copy bandwidth;
   Otsu vs batched torch and a per-sample Python loop; masked attention vs SDPA
   with and without the same mask as ``attn_mask``.
Prints markdown tables for benchmarks/RESULTS.md; ``--out`` also writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fused  # noqa: E402
from fused import reference  # noqa: E402
from fused.benchmark import DTYPES, SD15_ATTN2, SD15_IMAGE, median, time_ms  # noqa: E402

SD15_ATTN2_ND = [(N, D) for _, _, N, _, D in SD15_ATTN2]  # (N, D) of the text cross-attention layers
SD15_IMAGE_ND = [(N, D) for _, _, N, _, D in SD15_IMAGE]  # ViCo image cross-attention, N = L
TINY_ATTN2 = [(64, 40), (32, 64)]
TINY_IMAGE_ATTN = [(48, 40)]


def timer(device: torch.device):
    def measure(fn, repeat: int = 20, warmup: int = 3) -> float:
        """Median milliseconds of fn()."""
        return median(time_ms(fn, device, repeat, warmup))
    return measure


def copy_bandwidth(device: torch.device, measure) -> float:
    """Device copy bandwidth in GB/s (read + write) measured on a large buffer."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # past the caches
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), repeat=10)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def max_err(got, want):
    return max(float((a.detach().double() - b.detach().double()).abs().max()) for a, b in zip(got, want))


def run_with_grads(fn, q, k, v, extra):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    outs = fn(q, k, v, extra)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    g = torch.Generator(device="cpu").manual_seed(1)
    cots = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, (q, k, v), cots)
    return outs + list(grads)


def check_correctness(device, backends, attn2, image_attn, dtypes, rows):
    ok_all = True
    B, H = 2, 8
    g = torch.Generator(device="cpu").manual_seed(0)
    cases = [("cross_attention_with_maps", N, 77, D) for N, D in attn2] + \
            [("masked_attention", N, N, D) for N, D in image_attn]
    for op, N, L, D in cases:
        q64, k64, v64 = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64).to(device) for n in (N, L, L))
        if op == "cross_attention_with_maps":
            extra = torch.tensor([[5, 9], [-1, -1]], device=device)  # noisy half asks no maps
            def ref_fn(q, k, v, e): return reference.attention_with_maps(q, k, v, e, q.shape[-1] ** -0.5, "mean")
            def fused_fn(be): return lambda q, k, v, e: fused.cross_attention_with_maps(q, k, v, e, backend=be)
        else:
            extra = torch.rand(B, L, generator=g).to(device) > 0.5
            def ref_fn(q, k, v, e): return reference.masked_attention(q, k, v, e, q.shape[-1] ** -0.5)
            def fused_fn(be): return lambda q, k, v, e: fused.masked_attention(q, k, v, e, backend=be)
        want = run_with_grads(ref_fn, q64, k64, v64, extra)
        for dtype in dtypes:
            q, k, v = (t.to(dtype) for t in (q64, k64, v64))
            torch_err = max_err(run_with_grads(ref_fn, q, k, v, extra), want)
            for be in backends:
                if be == "torch":
                    continue
                try:
                    err = max_err(run_with_grads(fused_fn(be), q, k, v, extra), want)
                except (TypeError, ValueError):
                    continue
                limit = 1e-4 if dtype == torch.float32 else 2 * torch_err + 1e-6
                ok = err <= limit
                ok_all &= ok
                rows.append(dict(check=op, shape=f"{B}x{H}x{N}x{L}x{D}", dtype=str(dtype)[6:], backend=be,
                                 max_err=err, torch_err=torch_err, limit=limit, ok=ok))
    maps = torch.rand(64, attn2[0][0], generator=g).pow(4).to(device)
    for mode in ("vico", "skimage"):
        want = reference.otsu_mask(maps.double(), 10 if mode == "vico" else 256, mode)
        for dtype in dtypes:
            m = maps.to(dtype)
            want = reference.otsu_mask(m, 10 if mode == "vico" else 256, mode)
            for be in backends:
                if be == "torch" or "otsu_mask" not in fused._dispatch.REGISTRY[be].dtypes:
                    continue
                got = fused.otsu_mask(m, mode=mode, backend=be)
                bad = int((got[1] != want[1]).sum()) + int((got[0] != want[0]).sum())
                ok_all &= bad == 0
                rows.append(dict(check=f"otsu_mask/{mode}", shape=f"64x{m.shape[-1]}", dtype=str(dtype)[6:], backend=be,
                                 max_err=bad, torch_err=0, limit=0, ok=bad == 0))
    return ok_all


def check_cuda_graph(device, rows):
    if device.type != "cuda":
        return True
    B, H, N, L, D = 2, 8, 4096, 77, 40
    q, k, v = (torch.randn(B, H, n, D, device=device, dtype=torch.float16) for n in (N, L, L))
    idx = torch.tensor([[5, 9], [-1, -1]], device=device)
    eager = fused.cross_attention_with_mask(q, k, v, idx)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fused.cross_attention_with_mask(q, k, v, idx)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fused.cross_attention_with_mask(q, k, v, idx)
    graph.replay()
    torch.cuda.synchronize()
    ok = all(torch.equal(a, b) for a, b in zip(static, eager))
    rows.append(dict(check="cuda_graph(cross_attention_with_mask)", shape=f"{B}x{H}x{N}x{L}x{D}", dtype="float16",
                     backend="auto", max_err=0 if ok else 1, torch_err=0, limit=0, ok=ok))
    return ok


def benchmark(device, size, dtype, bandwidth, rows):
    """fused.benchmark rows plus the device's copy bandwidth and the cost of maps over SDPA."""
    from fused.benchmark import run

    for row in run(size, device, dtype, repeat=20, progress=False):
        row["copy_gbps"] = bandwidth
        if "sdpa_ms" in row and row["op"] == "cross_attention_with_maps":
            row["map_overhead_pct"] = 100 * (row["fused_ms"] - row["sdpa_ms"]) / row["sdpa_ms"]
        row["shape"] = "x".join(map(str, row["shape"]))
        rows.append(row)


def markdown(rows, keys):
    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    def fmt(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)
    return head + "".join("| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |\n" for r in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU/interpreter smoke run)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--dtypes", nargs="+", choices=["fp16", "bf16", "fp32"], default=["fp16", "bf16", "fp32"],
                        help="dtypes to check on CUDA, in this order (CPU checks fp32 only); "
                             "benchmarks/gpu_session.sh splits them over two shorter runs")
    opts = parser.parse_args(argv)
    device = torch.device(fused.default_device())
    attn2, image_attn = (TINY_ATTN2, TINY_IMAGE_ATTN) if opts.tiny else (SD15_ATTN2_ND, SD15_IMAGE_ND)
    dtypes = [DTYPES[d] for d in opts.dtypes] if device.type == "cuda" else [torch.float32]
    backends = fused.available_backends(device)
    measure = timer(device)
    info = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, cuda=torch.version.cuda, triton=_triton_version(),
                date=time.strftime("%Y-%m-%d"), backends=backends, command=" ".join(sys.argv))
    print(f"# gpu_check: {json.dumps(info)}")
    checks = []
    ok = check_correctness(device, backends, attn2, image_attn, dtypes, checks)
    ok &= check_cuda_graph(device, checks)
    print(markdown(checks, ["check", "shape", "dtype", "backend", "max_err", "torch_err", "limit", "ok"]))
    bench = []
    if not opts.skip_bench:
        bandwidth = copy_bandwidth(device, measure)
        bench_dtype = torch.float16 if device.type == "cuda" else torch.float32
        size = "tiny" if opts.tiny else ("gpu" if device.type == "cuda" else "cpu")
        benchmark(device, size, bench_dtype, bandwidth, bench)
        print(markdown(bench, ["op", "shape", "dtype", "fused_ms", "paper_ms", "sdpa_ms", "torch_ms", "speedup_vs_paper",
                               "speedup_vs_torch", "ratio_to_sdpa", "gbps", "copy_gbps", "peak_mb",
                               "map_overhead_pct"]))
        print("paper_ms: materialise+index+mean (attention), SDPA with the mask as attn_mask (masked), "
              "per-sample Python loop (Otsu); torch_ms: batched torch Otsu; ratio_to_sdpa = fused_ms / sdpa_ms")
    if opts.out:
        opts.out.write_text(json.dumps(dict(info=info, checks=checks, bench=bench), indent=1, default=str))
    print("gpu_check: " + ("all checks passed" if ok else "SOME CHECKS FAILED"), file=sys.stderr)
    return 0 if ok else 1


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
