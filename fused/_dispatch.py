"""The one place that picks a backend (docs/dispatch.md §2).

Backends declare what they run in ``fused._registry`` (each in its own module);
this module orders them. ``backend=None`` picks, for CUDA tensors, "triton",
then "sdpa" (attention) or "cuda" (Otsu), then "torch"; for CPU tensors "cpp",
then "sdpa", then "torch". A compiled kernel is checked against the reference
at first use (``fused.selfcheck``); one that fails is skipped. Falling back
warns (once per reason), never silently; naming a backend that cannot run the
call raises an error that says why.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Iterable

import torch

from . import _cpp, reference, sdpa, triton  # noqa: F401  (each declares its backends)
from ._library import OPS
from ._registry import REGISTRY, Backend, BackendUnavailable

BACKENDS = ("torch", "cpp", "cuda", "triton", "sdpa")
PREFERENCE = {"cuda": ("triton", "sdpa", "cuda", "torch"), "cpu": ("cpp", "sdpa", "torch")}


@functools.cache
def backend_status(name: str) -> tuple[bool, str]:
    """(usable, reason-if-not) for a backend on this machine; builds C++ on first call."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    try:
        _LOADED[name] = REGISTRY[name].load()
    except BackendUnavailable as exc:
        return False, str(exc)
    return True, ""


# Backends loaded by backend_status: a plain dict that torch.compile reads without tracing a loader.
_LOADED: dict[str, Any] = {}


def default_device() -> str:
    """"cuda" when torch sees a GPU, else "cpu": where commands and benchmarks run unless told."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable for tensors on ``device`` (default: CPU, plus CUDA when present).

    A subset of ``["torch", "cpp", "cuda", "triton", "sdpa"]``, in that order. The
    first call builds the C++ kernels if they are not cached yet.
    """
    if device is None:
        types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        types = [torch.device(device).type]
    return [name for name in BACKENDS
            if any(REGISTRY[name].runs_on(t) for t in types) and backend_status(name)[0]]


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _check_named(info: Backend, op: str, device_type: str, dtype: torch.dtype) -> None:
    """Raise, saying why, when the named backend cannot run this call."""
    if op not in info.dtypes:
        raise ValueError(f"backend {info.name!r} does not implement {op} ({info.note})")
    if not info.runs_on(device_type):
        hint = " (set TRITON_INTERPRET=1 to run Triton on CPU)" if info.name == "triton" else ""
        raise ValueError(f"backend {info.name!r} does not run on {device_type} tensors{hint}")
    refusal = info.refusal(op, dtype, device_type)
    if refusal is not None:
        why = f": {refusal}" if refusal else ""
        raise TypeError(f"backend {info.name!r} does not support {dtype} for {op} on {device_type} tensors{why}")
    ok, why = backend_status(info.name)
    if not ok:
        raise RuntimeError(f"backend {info.name!r} is not available: {why}")


def _why_not(info: Backend, op: str, device_type: str, dtype: torch.dtype, head_dim: int | None) -> str | None:
    """None when ``info`` can run the call in automatic dispatch; else why not."""
    refusal = info.refusal(op, dtype, device_type)
    if refusal is not None:
        return f"{info.name} has no {dtype} kernel" + (f": {refusal}" if refusal else "")
    ok, why = backend_status(info.name)
    if not ok:
        return f"{info.name}: {why}"
    if info.self_checked:
        from . import selfcheck as _selfcheck

        failure = _selfcheck.verdict(info.name, op, device_type, dtype, head_dim)
        if failure:
            return f"{info.name} failed its self-check: {failure}"
    return None


def resolve(op: str, device_type: str, dtype: torch.dtype, backend: str | None, *,
            head_dim: int | None = None, exclude: Iterable[str] = ()) -> str:
    """Name of the backend that runs ``op`` on tensors of this device type and dtype.

    ``head_dim`` (attention) picks the self-check case of a compiled kernel.
    Under ``torch.compile`` this runs once at trace time and its answer is a
    constant of the graph, so dispatch costs nothing and breaks nothing.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        info = REGISTRY[backend]
        _check_named(info, op, device_type, dtype)
        if info.self_checked:
            from . import selfcheck as _selfcheck

            failure = _selfcheck.verdict(backend, op, device_type, dtype, head_dim)
            if failure:
                raise RuntimeError(f"backend {backend!r} failed its self-check for {op} ({dtype}): {failure}")
        return backend

    skipped = []
    for name in PREFERENCE.get(device_type, ("torch",)):
        info = REGISTRY[name]
        if op not in info.dtypes or name in exclude:
            continue
        why = _why_not(info, op, device_type, dtype, head_dim)
        if why is not None:
            skipped.append(why)
            continue
        if skipped or (name == "torch" and device_type not in PREFERENCE):
            reason = "; ".join(skipped) or f"no fused kernel for {device_type} tensors"
            target = "the PyTorch reference" if name == "torch" else f"the {name} backend"
            _warn_once(f"fused.{op} on {device_type} {dtype} falls back to {target} ({reason})")
        return name
    raise AssertionError("unreachable: the torch backend is always available")


# What torch.compiler.assume_constant_result(resolve) does, without importing
# torch._dynamo (and with it triton) at `import fused`; tests/ops/test_compile.py
# fails if a torch release stops honouring it (the graph would break).
resolve._dynamo_marked_constant = True  # type: ignore[attr-defined]


def implementation(backend: str) -> Any:
    """The backend's op functions (signatures of ``fused.reference``); raises when it cannot load."""
    if backend not in _LOADED:
        ok, why = backend_status(backend)
        if not ok:
            raise RuntimeError(f"backend {backend!r} is not available: {why}")
    return _LOADED[backend]


def max_bins(backend: str, mode: str) -> int | None:
    """The largest ``bins`` backend ``backend``'s Otsu kernel accepts in ``mode`` (None: no limit)."""
    return REGISTRY[backend].max_bins.get(mode)


def check_bins_for_backend(bins: int, mode: str, backend: str) -> None:
    """Refuse, before any launch, more bins than the chosen backend's kernel holds."""
    limit = max_bins(backend, mode)
    if limit is not None and bins > limit:
        raise ValueError(
            f"bins={bins} exceeds the {backend} Otsu kernel's limit of {limit} bins for mode {mode!r}; "
            f"use fewer bins or backend='torch'"
        )

