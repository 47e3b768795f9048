"""Op benchmarks shared by ``vico bench``, ``benchmarks/gpu_check.py`` and the
pytest-benchmark suites: the fused ops against the op-level baselines of
docs/shapes.md §4 (``baselines.paper_maps``, ``baselines.paper_otsu_loop``).

- ``paper``: materialise the probabilities, index the chosen columns, average
  the heads (attention); Otsu as a Python loop over the maps; for masked
  attention, SDPA given the same mask as a boolean ``attn_mask``.
- ``sdpa``: ``F.scaled_dot_product_attention`` without maps — the speed of
  light for this work.
- ``torch``: the batched PyTorch reference (Otsu).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import reference
from ..ops import cross_attention_with_maps, masked_attention, otsu_mask
from .baselines import paper_maps, paper_otsu_loop
from .shapes import SIZES
from .timing import PeakMemory, time_ms


@dataclass
class Case:
    op: str
    shape: tuple
    bytes_moved: int  # minimal HBM/DRAM traffic of the fused op (inputs + outputs)
    variants: dict[str, Callable[[], object]]  # "fused" first


def cases(size: str, device: torch.device, dtype: torch.dtype, backend: str | None = None) -> list[Case]:
    spec = SIZES[size]
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    out = []
    for B, H, N, L, D in spec["attn2"]:
        q, k, v = randn(B, H, N, D), randn(B, H, L, D), randn(B, H, L, D)
        idx = torch.tensor([[5, 9]] * B, device=device)
        moved = (2 * q.numel() + k.numel() + v.numel() + B * 2 * N) * q.element_size()
        out.append(Case("cross_attention_with_maps", (B, H, N, L, D), moved, {
            "fused": lambda q=q, k=k, v=v, idx=idx: cross_attention_with_maps(q, k, v, idx, backend=backend),
            "paper": lambda q=q, k=k, v=v, idx=idx: paper_maps(q, k, v, idx),
            "sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
        }))
    for B, H, N, L, D in spec["image"]:
        q, k, v = randn(B, H, N, D), randn(B, H, L, D), randn(B, H, L, D)
        mask = (torch.rand(B, L, generator=g) > 0.5).to(device)
        moved = (2 * q.numel() + k.numel() + v.numel()) * q.element_size() + mask.numel()
        out.append(Case("masked_attention", (B, H, N, L, D), moved, {
            "fused": lambda q=q, k=k, v=v, m=mask: masked_attention(q, k, v, m, backend=backend),
            "paper": lambda q=q, k=k, v=v, m=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None, None]),
            "sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
        }))
    n_maps, n = spec["otsu"]
    maps = (torch.rand(n_maps, n, generator=g) ** 4).to(device, torch.float32)
    out.append(Case("otsu_mask", (n_maps, n), maps.numel() * 5, {
        "fused": lambda m=maps: otsu_mask(m, backend=None if backend == "sdpa" else backend),  # sdpa: no Otsu
        "paper": lambda m=maps: paper_otsu_loop(m),
        "torch": lambda m=maps: reference.otsu_vico(m, 10),
    }))
    return out


def measure(fn: Callable[[], object], device: torch.device, repeat: int = 5) -> tuple[float, float | None]:
    """(best milliseconds of ``repeat`` runs after one warm-up, peak MB above the start on CUDA else None)."""
    fn()  # warm-up (kernels built, allocator primed) before the peak is reset
    memory = PeakMemory(device).start() if device.type == "cuda" else None
    best = min(time_ms(fn, device, repeat, warmup=0))
    return best, (memory.stop()[1] if memory else None)


def run(size: str, device: torch.device, dtype: torch.dtype, repeat: int = 5, progress: bool = True,
        backend: str | None = None) -> list[dict]:
    """One row per case: fused ms, GB/s, peak MB, speed-up vs each baseline, ratio to SDPA."""
    from tqdm.auto import tqdm

    rows = []
    all_cases = cases(size, device, dtype, backend)
    for case in tqdm(all_cases, desc="bench", disable=not progress):
        times = {}
        peaks = {}
        for name, fn in case.variants.items():
            times[name], peaks[name] = measure(fn, device, repeat)
        row = dict(op=case.op, shape=list(case.shape), device=str(device), dtype=str(dtype).replace("torch.", ""),
                   fused_ms=times["fused"], gbps=case.bytes_moved / (times["fused"] * 1e-3) / 1e9,
                   peak_mb=peaks["fused"])
        for name in case.variants:
            if name != "fused":
                row[f"{name}_ms"] = times[name]
                row[f"speedup_vs_{name}"] = times[name] / times["fused"]
        if "sdpa" in times:
            row["ratio_to_sdpa"] = times["fused"] / times["sdpa"]
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'op':26} {'shape':24} {'fused ms':>9} {'GB/s':>7} {'peak MB':>8} {'vs paper':>9} {'vs torch':>9} {'/ sdpa':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"
        lines.append(f"{r['op']:26} {str(tuple(r['shape'])):24} {r['fused_ms']:9.3f} {r['gbps']:7.2f} "
                     f"{f('peak_mb', '8.1f'):>8} {f('speedup_vs_paper', '8.2f') + 'x':>9} "
                     f"{f('speedup_vs_torch', '8.2f') + 'x' if r.get('speedup_vs_torch') else '-':>9} "
                     f"{f('ratio_to_sdpa', '7.2f'):>7}")
    return "\n".join(lines)
