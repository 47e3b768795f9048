"""``python -m fused.selfcheck``: every available backend against the reference.

Runs each op on a few shapes (including SD's head dims and 77 text tokens),
compares forward and backward with the float64 PyTorch reference, and prints
one table: backend, op, shape, dtype, max error, time and speed vs the
reference at the same dtype. Exits non-zero when any error exceeds its
tolerance, so it doubles as an installation check.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from . import reference
from ._dispatch import available_backends
from .benchmark.timing import time_ms
from .ops import cross_attention_with_maps, masked_attention, otsu_mask

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _cases(device: str, quick: bool):
    shapes = [(2, 8, 256, 77, 40), (1, 4, 130, 600, 24)] if quick else [
        (2, 8, 1024, 77, 40), (2, 8, 256, 77, 80), (2, 8, 64, 77, 160), (1, 4, 512, 1024, 64)]
    g = torch.Generator().manual_seed(0)
    for B, H, N, L, D in shapes:
        q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (N, L, L))
        idx = torch.tensor([[1, 5, -1]] * B)
        key_mask = torch.rand(B, L, generator=g) > 0.5
        yield "cross_attention_with_maps", (B, H, N, L, D), (q, k, v, idx)
        yield "masked_attention", (B, H, N, L, D), (q, k, v, key_mask)
    yield "otsu_mask", (16, 4096), (torch.rand(16, 4096, generator=g, dtype=torch.float64) ** 4,)


def _run(op: str, args, backend: str):
    """Forward outputs and input gradients (for the attention ops) as one flat list."""
    if op == "otsu_mask":
        return list(otsu_mask(*args, backend=backend))
    q, k, v, extra = args
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    fn = cross_attention_with_maps if op == "cross_attention_with_maps" else masked_attention
    outs = fn(q, k, v, extra, backend=backend)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    grads = torch.autograd.grad(sum(o.sum() for o in outs), (q, k, v))
    return outs + list(grads)


def _reference(op: str, args):
    if op == "otsu_mask":
        return list(reference.otsu_mask(args[0], 10, "vico"))
    q, k, v, extra = (t.detach().requires_grad_() if t.is_floating_point() else t for t in args)
    scale = q.shape[-1] ** -0.5
    if op == "cross_attention_with_maps":
        outs = list(reference.attention_with_maps(q, k, v, extra, scale, "mean"))
    else:
        outs = [reference.masked_attention(q, k, v, extra, scale)]
    return outs + list(torch.autograd.grad(sum(o.sum() for o in outs), (q, k, v)))


def _max_error(got, want) -> float:
    err = 0.0
    for a, b in zip(got, want):
        if a.dtype == torch.bool:
            err = max(err, float((a != b.to(a.device)).sum()))  # mismatching mask elements
        else:
            err = max(err, float((a.detach().double().cpu() - b.detach().double()).abs().max()))
    return err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused.selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="larger shapes (slower)")
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats (best of)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON only")
    opts = parser.parse_args(argv)

    backends = available_backends(opts.device)
    dtypes = [torch.float64, torch.float32] + ([torch.float16, torch.bfloat16] if opts.device == "cuda" else [])
    rows, failed = [], False
    for op, shape, args64 in _cases(opts.device, quick=not opts.full):
        want = _reference(op, args64)
        for dtype in dtypes:
            args = [a.to(opts.device, dtype) if a.is_floating_point() else a.to(opts.device) for a in args64]
            ref_time = min(time_ms(lambda: _run(op, args, "torch"), opts.device, opts.repeat))
            for backend in backends:
                try:
                    got = _run(op, args, backend)
                except (TypeError, ValueError):
                    continue  # this backend has no kernel for this op/dtype
                err = _max_error(got, want)
                ok = err == 0 if op == "otsu_mask" and dtype == torch.float64 else err <= TOLERANCE[dtype]
                failed |= not ok
                t = min(time_ms(lambda: _run(op, args, backend), opts.device, opts.repeat))
                rows.append(dict(backend=backend, op=op, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                                 max_error=err, ms=t, vs_reference=ref_time / t, ok=ok))
    if opts.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"fused selfcheck on {opts.device} (torch {torch.__version__}); backends: {', '.join(backends)}")
        print("errors: max |backend - float64 reference| over outputs and input gradients "
              "(Otsu: mismatching mask elements); time: forward+backward, best of "
              f"{opts.repeat}; speed-up vs the torch reference at the same dtype")
        header = f"{'backend':8} {'op':26} {'shape':22} {'dtype':9} {'max error':>10} {'ms':>9} {'vs ref':>7}  ok"
        print(header)
        print("-" * len(header))
        for r in rows:
            print(f"{r['backend']:8} {r['op']:26} {str(tuple(r['shape'])):22} {r['dtype']:9} "
                  f"{r['max_error']:10.2e} {r['ms']:9.2f} {r['vs_reference']:6.2f}x  {'yes' if r['ok'] else 'NO'}")
    print("selfcheck: " + ("FAILED" if failed else "all backends agree with the reference"), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
