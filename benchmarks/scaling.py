"""Memory and time of extracting maps as the image grows (docs/shapes.md §5).

    python benchmarks/scaling.py --out scaling            # GPU: latents 32, 64, 96, 128 (256-1024 px)
    python benchmarks/scaling.py --latents 8 16 --out s   # CPU smoke run

For SD 1.5's first text cross-attention level (N = latent², H = 8, L = 77,
D = 40, B = 2, T = 2 tokens) and ViCo's image attention at the same level
(N = L = latent², masked), it measures the fused op, the materialising
`paper` way and SDPA without maps: time and, on CUDA, peak memory above the
inputs. Maps memory grows as O(B·T·N) for the fused op and the materialised
probabilities as O(B·H·N·L). Writes scaling.json, scaling.md and, when
matplotlib is installed, scaling.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fused  # noqa: E402
from fused.benchmark import measure, paper_maps  # noqa: E402


def rows_for(latent: int, device: torch.device, dtype: torch.dtype, repeat: int) -> list[dict]:
    B, H, L, D, T = 2, 8, 77, 40, 2
    N = latent * latent
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, N, D, generator=g).to(device, dtype)
    k, v = (torch.randn(B, H, L, D, generator=g).to(device, dtype) for _ in range(2))
    idx = torch.tensor([[5, 9]] * B, device=device)
    rows = []
    for name, fn in {
        "fused": lambda: fused.cross_attention_with_maps(q, k, v, idx),
        "paper": lambda: paper_maps(q, k, v, idx),
        "sdpa (no maps)": lambda: F.scaled_dot_product_attention(q, k, v),
    }.items():
        ms, peak = measure(fn, device, repeat)
        rows.append(dict(op="text cross-attention", latent=latent, N=N, path=name, ms=ms, peak_mb=peak,
                         maps_mb_analytic=(B * T * N if name == "fused" else B * H * N * L if name == "paper" else 0)
                         * q.element_size() / 2**20))
    qi, ki, vi = (torch.randn(B, H, N, D, generator=g).to(device, dtype) for _ in range(3))
    mask = (torch.rand(B, N, generator=g) > 0.5).to(device)
    for name, fn in {
        "fused": lambda: fused.masked_attention(qi, ki, vi, mask),
        "paper": lambda: F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask[:, None, None]),
        "sdpa (no maps)": lambda: F.scaled_dot_product_attention(qi, ki, vi),
    }.items():
        ms, peak = measure(fn, device, repeat)
        rows.append(dict(op="image attention (masked)", latent=latent, N=N, path=name, ms=ms, peak_mb=peak,
                         maps_mb_analytic=None))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latents", type=int, nargs="+", default=[32, 64, 96, 128])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("scaling"))
    opts = p.parse_args(argv)
    device = torch.device(fused.default_device())
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = [r for lat in opts.latents for r in rows_for(lat, device, dtype, opts.repeat)]
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "scaling.json").write_text(json.dumps(dict(device=str(device), dtype=str(dtype), torch=torch.__version__,
                                                           rows=rows), indent=1))
    lines = ["| op | latent | N | path | ms | peak MB (measured, CUDA) | maps MB (analytic) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        maps = "-" if r["maps_mb_analytic"] is None else f"{r['maps_mb_analytic']:.2f}"
        lines.append(f"| {r['op']} | {r['latent']} | {r['N']} | {r['path']} | {r['ms']:.3f} | {peak} | {maps} |")
    (opts.out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("scaling: matplotlib not installed; no PNG", file=sys.stderr)
        return 0
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for op, ax in zip(("text cross-attention", "image attention (masked)"), axes):
        for path in ("fused", "paper", "sdpa (no maps)"):
            sel = [r for r in rows if r["op"] == op and r["path"] == path]
            key = "peak_mb" if device.type == "cuda" else "ms"
            ax.plot([r["N"] for r in sel], [r[key] for r in sel], marker="o", label=path)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("image tokens N")
        ax.set_ylabel("peak MB" if device.type == "cuda" else "ms")
        ax.set_title(op)
        ax.legend()
    fig.tight_layout()
    fig.savefig(opts.out / "scaling.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
