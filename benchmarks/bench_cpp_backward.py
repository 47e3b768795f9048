"""C++ attention backward against its forward when few (batch row, head) pairs exist.

    python benchmarks/bench_cpp_backward.py [threads]     # default 2

Prints, per shape, the forward time and the backward time (forward + backward
minus forward), best of 3, fp32. With B·H below the thread count the backward
splits each head's query blocks into shares (csrc/attention_cpu.cpp).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fused  # noqa: E402

SHAPES = [(1, 1, 8192, 4096, 64, False), (1, 1, 8192, 77, 64, True), (2, 8, 1024, 77, 80, True),
          (1, 2, 4096, 4096, 64, False)]  # B, H, N, L, D, maps (else masked)


def main(threads: int = 2) -> None:
    torch.set_num_threads(threads)
    print(f"C++ attention, fp32, {threads} threads, torch {torch.__version__}, best of 3")
    print("| B, H, N, L, D | op | forward ms | backward ms |\n|---|---|---|---|")
    for B, H, N, L, D, maps in SHAPES:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, generator=g).requires_grad_() for n in (N, L, L))
        if maps:
            index = torch.tensor([[3, 7]] * B)

            def op():
                return fused.cross_attention_with_maps(q, k, v, index, backend="cpp")
        else:
            mask = torch.rand(B, L, generator=g) > 0.1  # 90% visible: all keys (no compaction)

            def op():
                return (fused.masked_attention(q, k, v, mask, backend="cpp"),)
        cotangents = [torch.randn_like(o) for o in op()]
        forward, backward = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            outs = op()
            t1 = time.perf_counter()
            torch.autograd.grad(outs, (q, k, v), cotangents)
            forward.append(t1 - t0)
            backward.append(time.perf_counter() - t1)
        print(f"| {B}, {H}, {N}, {L}, {D} | {'maps' if maps else 'masked'} | {min(forward) * 1e3:.1f} | "
              f"{min(backward) * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
