"""Peak memory and time of extracting 4 words' maps from one SD3-sized joint
attention layer: the fused op vs materialising softmax(QKᵀ) as today's tools do.

    python benchmarks/bench_joint_maps.py                 # N = 4096 image + 333 text tokens, 24 heads, D 64
    python benchmarks/bench_joint_maps.py --image-tokens 1024

Each variant runs in its own subprocess; peak memory is ru_maxrss above the
inputs on CPU and max_memory_allocated above the inputs on CUDA.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_one(variant: str, n_image: int, n_text: int, heads: int, dim: int, device: str, repeat: int) -> dict:
    import fused

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
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return dict(variant=variant, image_tokens=n_image, text_tokens=n_text, heads=heads, head_dim=dim,
                device=device, dtype=str(dtype)[6:], best_ms=min(times) * 1e3, peak_mb_above_inputs=peak)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-tokens", type=int, default=4096)
    p.add_argument("--text-tokens", type=int, default=333)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--one", help=argparse.SUPPRESS)
    o = p.parse_args(argv)
    args = (o.image_tokens, o.text_tokens, o.heads, o.head_dim, o.device, o.repeat)
    if o.one:
        print(json.dumps(run_one(o.one, *args)))
        return 0
    rows = []
    for variant in ("fused", "materialised"):
        cmd = [sys.executable, __file__, "--one", variant, "--image-tokens", str(o.image_tokens), "--text-tokens",
               str(o.text_tokens), "--heads", str(o.heads), "--head-dim", str(o.head_dim), "--repeat", str(o.repeat),
               "--device", o.device]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"4 words' maps from one joint attention layer: {o.image_tokens}+{o.text_tokens} tokens, {o.heads} heads, "
          f"head dim {o.head_dim}, {o.device} {rows[0]['dtype']}, torch {torch.__version__}, best of {o.repeat}")
    print("| variant | ms | peak MB above inputs |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['best_ms']:.1f} | {r['peak_mb_above_inputs']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
