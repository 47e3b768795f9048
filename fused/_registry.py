"""The backend registry: what each backend runs, as data (docs/dispatch.md §2).

A backend module declares itself with ``@register_backend(...)`` on the function
that loads it (builds its kernels, imports triton, ...) and returns its op
functions — an object with ``attention(q, k, v, token_index, key_mask, scale,
head_reduce)`` and/or ``otsu_mask(maps, bins, mode)``, the signatures of
``fused.reference``. Declaring costs nothing: nothing is built or imported until
``fused._dispatch`` first needs the backend.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


class BackendUnavailable(RuntimeError):
    """A backend cannot run on this machine (no compiler, no GPU, no triton, ...)."""


@dataclass(frozen=True)
class Refusal:
    """``op`` has no kernel for ``dtype`` on ``device_type`` ("*" = any) while ``applies()`` holds."""

    op: str
    dtype: torch.dtype
    device_type: str
    why: str
    applies: Callable[[], bool] = lambda: True


@dataclass(frozen=True)
class Backend:
    name: str
    devices: frozenset[str]                     # device types of the tensors it takes ("*" = any)
    dtypes: Mapping[str, frozenset[torch.dtype]]  # op -> the dtypes it has a kernel for
    load: Callable[[], Any]                     # cached; raises BackendUnavailable
    refusals: tuple[Refusal, ...] = ()
    max_bins: Mapping[str, int] = field(default_factory=dict)  # Otsu mode -> the kernel's largest bins
    self_checked: bool = False                  # compiled kernels: checked against the reference at first use
    also_runs_on: Callable[[str], bool] = lambda device_type: False  # e.g. Triton's interpreter on CPU
    note: str = ""

    def runs_on(self, device_type: str) -> bool:
        return "*" in self.devices or device_type in self.devices or self.also_runs_on(device_type)

    def refusal(self, op: str, dtype: torch.dtype, device_type: str) -> str | None:
        """None when there is a ``dtype`` kernel for ``op`` on ``device_type``; else why not ("" = none exists)."""
        for r in self.refusals:
            if r.op == op and r.dtype == dtype and r.device_type in ("*", device_type) and r.applies():
                return r.why
        return None if dtype in self.dtypes.get(op, ()) else ""


REGISTRY: dict[str, Backend] = {}


def register_backend(name: str, *, devices: set[str], dtypes: Mapping[str, frozenset[torch.dtype]],
                     **constraints: Any) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Declare backend ``name`` with its constraints; decorates its (lazy) loader. ``dtypes`` is keyed
    by the public-level ops of ``fused._library.OPS``."""
    def decorate(load: Callable[[], Any]) -> Callable[[], Any]:
        cached = functools.cache(load)
        REGISTRY[name] = Backend(name, frozenset(devices), dict(dtypes), cached, **constraints)
        return cached

    return decorate
