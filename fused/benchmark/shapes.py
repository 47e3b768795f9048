"""The shapes every benchmark, compile check and GPU check measures (docs/shapes.md §1).

One table: (B, H, N, L, D) of SD 1.5 at 512 px (latents 64×64), batch 2 (a CFG
pair, or ViCo's noisy + reference halves), 8 heads.
"""

from __future__ import annotations

import torch

# Command-line dtype names, shared by `vico bench` and the scripts in benchmarks/ and tools/.
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}

# Text cross-attention (attn2) at the four latent resolutions: N = 64², 32², 16², 8² queries, 77 CLIP keys.
SD15_ATTN2 = [(2, 8, 4096, 77, 40), (2, 8, 1024, 77, 80), (2, 8, 256, 77, 160), (2, 8, 64, 77, 160)]
# ViCo's image cross-attention: noisy queries against as many reference keys (N = L), at its block resolutions.
SD15_IMAGE = [(2, 8, 256, 256, 160), (2, 8, 1024, 1024, 80), (2, 8, 4096, 4096, 40)]

# Benchmark sizes: "gpu" is the whole table; "cpu" the part a CPU times in seconds; "tiny" a smoke run.
SIZES = {
    "tiny": dict(attn2=[(2, 2, 64, 77, 40)], image=[(2, 2, 64, 64, 40)], otsu=(4, 256)),
    "cpu": dict(attn2=SD15_ATTN2[:2], image=SD15_IMAGE[1:2], otsu=(16, 4096)),
    "gpu": dict(attn2=SD15_ATTN2, image=SD15_IMAGE, otsu=(64, 4096)),
}
