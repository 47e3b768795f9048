"""Registers, spills and shared memory of candidate launch configurations of the
forward and backward attention Triton kernels, compiled for a GPU without one (see
triton_compile_check.py). Used to choose the autotune lists in
fused/triton/attention_fwd.py and attention_bwd.py; rerun it after changing a kernel.

    python tools/triton_config_sweep.py [--arch 90] [--dtype fp16] [--grid heads|loop]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_compile_check as tcc  # noqa: E402  (sets up compile-only Triton first)

import torch  # noqa: E402

BACKWARD = [(64, 64, 4), (32, 64, 4), (64, 32, 4), (32, 32, 4), (64, 64, 8), (32, 64, 8), (128, 64, 8),
            (32, 32, 8), (16, 32, 4), (32, 16, 4), (16, 64, 4), (64, 16, 4)]
FORWARD = [(32, 64, 4, 2), (32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2),
           (64, 128, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (32, 128, 4, 3), (128, 128, 8, 2),
           (32, 32, 8, 2), (16, 64, 4, 2), (16, 32, 4, 2), (64, 32, 8, 2)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", choices=sorted(tcc.DTYPES), default="fp16")
    parser.add_argument("--grid", choices=("heads", "loop"), default="heads",
                        help="forward kernel: per-head grid or head loop (fused/triton/attention_fwd.py)")
    parser.add_argument("--forward-only", action="store_true", help="skip the backward kernels")
    args = parser.parse_args(argv)
    dtype = tcc.DTYPES[args.dtype]

    from fused.triton import attention_bwd, attention_fwd

    tcc.triton_driver.set_active(tcc.TargetOnlyDriver(args.arch))
    print(f"| forward ({args.grid}) | D | BLOCK_N | BLOCK_L | warps | stages | regs | stack B | shared KB |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    os.environ[attention_fwd.GRID_ENV] = args.grid
    # one config at a time
    attention_fwd._forward_kernel = lambda block_d, dtype: attention_fwd._attention_fwd_kernel
    attention_fwd._forward_heads_kernel = lambda block_d, dtype: attention_fwd._attention_fwd_heads_kernel
    for D in (40, 80, 160):
        q = torch.zeros(2, 8, 1024, D, dtype=dtype)
        k = v = torch.zeros(2, 8, 77, D, dtype=dtype)
        for bn, bl, warps, stages in FORWARD:
            attention_fwd._FWD_META = dict(BLOCK_N=bn, BLOCK_L=bl, num_warps=warps, num_stages=stages)
            with tcc.CompileRecorder() as rec:
                rec.arch = args.arch
                attention_fwd.attention_forward(q, k, v, token_index=torch.tensor([[1, 2]] * 2), scale=0.1)
                attention_fwd.attention_forward(q, k, v, key_mask=torch.ones(2, 77, dtype=torch.bool), scale=0.1)
            rows = [r for r in tcc.summarise(rec) if r["kernel"] != "_head_mean_kernel"]
            for r, what in zip(rows, ("maps", "masked")):
                print(f"| {what} | {D} | {bn} | {bl} | {warps} | {stages} | {r['registers']} | {r['stack_bytes']} | "
                      f"{r['shared_bytes'] / 1024:.1f}{'' if r['fits_shared'] else ' (too much)'} |")
    if args.forward_only:
        return 0
    print("\n| backward kernel | D | BLOCK_N | BLOCK_L | warps | regs | stack B | shared KB |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for D in (40, 80, 160):
        q = torch.zeros(2, 8, 1024, D, dtype=dtype)
        k = v = torch.zeros(2, 8, 77, D, dtype=dtype)
        lse = torch.zeros(2, 8, 1024)
        for bn, bl, warps in BACKWARD:
            attention_bwd._dkdv_kernel = lambda block_d, dtype: attention_bwd._attention_bwd_dkdv_kernel
            attention_bwd._dq_kernel = lambda block_d, dtype: attention_bwd._attention_bwd_dq_kernel
            attention_bwd._TILE_META = dict(BLOCK_N=bn, BLOCK_L=bl, num_warps=warps, num_stages=2)
            with tcc.CompileRecorder() as rec:
                rec.arch = args.arch
                attention_bwd.attention_backward(q, k, v, q, lse, q, 0.1, token_index=torch.tensor([[1, 2]] * 2),
                                                 grad_maps=torch.zeros(2, 2, 1024, dtype=dtype))
            for r in tcc.summarise(rec):
                if "rowterm" in r["kernel"]:
                    continue
                print(f"| {r['kernel']} | {D} | {bn} | {bl} | {warps} | {r['registers']} | {r['stack_bytes']} | "
                      f"{r['shared_bytes'] / 1024:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
