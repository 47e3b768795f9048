"""Masked attention on CPU: the C++ op against SDPA given the same boolean mask,
at ViCo's image-attention shapes, for several shares of visible keys.

    python benchmarks/bench_masked_attention.py [repeat]     # default 5 (forward); backward: half, at least 2

Time: best of the repeats (``fused.benchmark.time_ms``), fp32, 2 threads. The C++
op runs on the visible keys only when no row sees more than 3/4 of them
(docs/ops.md §4.5), so its time falls with the share; SDPA's does not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fused  # noqa: E402
from fused.benchmark import SD15_IMAGE, time_ms  # noqa: E402

SHAPES = [SD15_IMAGE[1], SD15_IMAGE[2]]  # (2, 8, 1024, 1024, 80) and (2, 8, 4096, 4096, 40)


def fused_op(mask):
    return lambda q, k, v: fused.masked_attention(q, k, v, mask, backend="cpp")


def sdpa_op(mask):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None])


def forward_backward(op, q, k, v, cotangent):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))

    def run():
        torch.autograd.grad(op(q, k, v), (q, k, v), cotangent)
    return run


def main(repeat: int = 5) -> None:
    torch.set_num_threads(2)
    print(f"masked attention, fp32, 2 threads, torch {torch.__version__}, best of {repeat} (fwd) / "
          f"{max(2, repeat // 2)} (fwd+bwd)")
    print("| shape | visible | fused fwd ms | SDPA+mask fwd ms | fused/SDPA+mask | fused fwd+bwd ms | "
          "SDPA+mask fwd+bwd ms | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for B, H, N, L, D in SHAPES:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (N, L, L))
        cotangent = torch.randn(B, H, N, D, generator=g)
        for share in (0.3, 0.5, 0.9):
            mask = torch.rand(B, L, generator=g) < share
            ours, theirs = fused_op(mask), sdpa_op(mask)
            t_fused = min(time_ms(lambda: ours(q, k, v), "cpu", repeat))
            t_sdpa = min(time_ms(lambda: theirs(q, k, v), "cpu", repeat))
            back = max(2, repeat // 2)
            tb_fused = min(time_ms(forward_backward(ours, q, k, v, cotangent), "cpu", back))
            tb_sdpa = min(time_ms(forward_backward(theirs, q, k, v, cotangent), "cpu", back))
            print(f"| {B}x{H}x{N}x{L}x{D} | {share:.1f} | {t_fused:.1f} | {t_sdpa:.1f} | {t_fused / t_sdpa:.2f} | "
                  f"{tb_fused:.1f} | {tb_sdpa:.1f} | {tb_fused / tb_sdpa:.2f} |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
