"""The one place that picks a backend (docs/dispatch.md §2).

``backend=None`` picks, for CUDA tensors, "triton", then "cuda" (Otsu only),
then "torch"; for CPU tensors "cpp" then "torch". Falling back to the PyTorch
reference always warns (once per reason), never silently. Naming a backend
that cannot run the call raises an error that says why.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference

BACKENDS = ("torch", "cpp", "cuda", "triton")
OPS = ("attention_with_maps", "masked_attention", "otsu_mask")

_ALL_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class BackendInfo:
    ops: frozenset[str]
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    note: str = ""


_INFO = {
    "torch": BackendInfo(frozenset(OPS), frozenset({"*"}), _ALL_FLOATS),
    "cpp": BackendInfo(frozenset(OPS), frozenset({"cpu"}), frozenset({torch.float32, torch.float64}),
                       "C++/OpenMP kernels from csrc/ (fp32/fp64; Otsu also takes fp16/bf16 maps)"),
    "cuda": BackendInfo(frozenset({"otsu_mask"}), frozenset({"cuda"}), _ALL_FLOATS,
                        "CUDA kernel from csrc/ (Otsu only)"),
    "triton": BackendInfo(frozenset(OPS), frozenset({"cuda"}), _ALL_FLOATS),
}

_PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def backend_status(name: str) -> tuple[bool, str]:
    """(usable, reason-if-not) for a backend on this machine; builds C++ on first call."""
    if name == "torch":
        return True, ""
    if name == "cpp":
        from . import _cpp

        return _cpp.cpu_available()
    if name == "cuda":
        if not torch.cuda.is_available():
            return False, "torch has no CUDA device here"
        from . import _cpp

        return _cpp.cuda_available()
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        if not (torch.cuda.is_available() or _triton_interpreted()):
            return False, "Triton needs a CUDA device or TRITON_INTERPRET=1"
        return True, ""
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def _runs_on(name: str, device_type: str) -> bool:
    devices = _INFO[name].devices
    if "*" in devices or device_type in devices:
        return True
    # Under TRITON_INTERPRET=1 the Triton kernels run on CPU tensors.
    return name == "triton" and device_type == "cpu" and _triton_interpreted()


INTERPRETER_BF16 = "the Triton interpreter (TRITON_INTERPRET=1) computes bfloat16 attention wrongly"


def _dtype_refusal(name: str, op: str, dtype: torch.dtype, device_type: str) -> str | None:
    """None when ``name`` has a ``dtype`` kernel for ``op`` here; else why not ("" = no such kernel)."""
    if name == "triton" and device_type == "cuda" and dtype == torch.float64 and op != "otsu_mask":
        # Triton 3.6 cannot compile the float64 attention kernels for a GPU: fp64 tl.dot
        # with a head dim of 160 trips "fp64 don't support largeK MMA", and the tiles
        # need up to 650 KB of shared memory (tools/triton_compile_check.py
        # --dtype fp64). float64 attention stays a CPU (gradcheck) dtype for Triton.
        return ""
    if name == "triton" and dtype == torch.bfloat16 and op != "otsu_mask" and _triton_interpreted():
        # The interpreter runs the kernels in numpy, which has no bfloat16: the attention
        # kernels' output was off by ~8e8 and their maps by ~0.5, without a word (issue 16).
        # Otsu loads bf16 maps as fp32 and stays exact. Any device: the interpreter also
        # runs CUDA tensors' kernels on the host.
        return INTERPRETER_BF16
    # The C++ Otsu kernel upcasts fp16/bf16 maps to fp32 (the compute dtype).
    if dtype in _INFO[name].dtypes or (name == "cpp" and op == "otsu_mask" and dtype in _ALL_FLOATS):
        return None
    return ""


def _supports_dtype(name: str, op: str, dtype: torch.dtype, device_type: str) -> bool:
    return _dtype_refusal(name, op, dtype, device_type) is None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable for tensors on ``device`` (default: CPU, plus CUDA when present).

    A subset of ``["torch", "cpp", "cuda", "triton"]``, in that order. The first
    call builds the C++ kernels if they are not cached yet.
    """
    if device is None:
        types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        types = [torch.device(device).type]
    return [
        name
        for name in BACKENDS
        if any(_runs_on(name, t) for t in types) and backend_status(name)[0]
    ]


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve(op: str, device_type: str, dtype: torch.dtype, backend: str | None) -> str:
    """Name of the backend that runs ``op`` on tensors of this device type and dtype.

    Under ``torch.compile`` this runs once at trace time and its answer is a
    constant of the graph, so dispatch costs nothing and breaks nothing.
    """
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        info = _INFO[backend]
        if op not in info.ops:
            raise ValueError(f"backend {backend!r} does not implement {op} ({info.note})")
        if not _runs_on(backend, device_type):
            hint = " (set TRITON_INTERPRET=1 to run Triton on CPU)" if backend == "triton" else ""
            raise ValueError(f"backend {backend!r} does not run on {device_type} tensors{hint}")
        refusal = _dtype_refusal(backend, op, dtype, device_type)
        if refusal is not None:
            why = f": {refusal}" if refusal else ""
            raise TypeError(f"backend {backend!r} does not support {dtype} for {op} on {device_type} tensors{why}")
        ok, why = backend_status(backend)
        if not ok:
            raise RuntimeError(f"backend {backend!r} is not available: {why}")
        return backend

    skipped = []
    for name in _PREFERENCE.get(device_type, ("torch",)):
        info = _INFO[name]
        if op not in info.ops:
            continue
        refusal = _dtype_refusal(name, op, dtype, device_type)
        if refusal is not None:
            skipped.append(f"{name} has no {dtype} kernel" + (f": {refusal}" if refusal else ""))
            continue
        ok, why = backend_status(name)
        if not ok:
            skipped.append(f"{name}: {why}")
            continue
        if name == "torch" and (skipped or device_type not in _PREFERENCE):
            reason = "; ".join(skipped) or f"no fused kernel for {device_type} tensors"
            _warn_once(f"fused.{op} on {device_type} {dtype} falls back to the PyTorch reference ({reason})")
        return name
    raise AssertionError("unreachable: the torch backend is always available")


# What torch.compiler.assume_constant_result(resolve) does, without importing
# torch._dynamo (and with it triton) at `import fused`; tests/test_compile.py
# fails if a torch release stops honouring it (the graph would break).
resolve._dynamo_marked_constant = True  # type: ignore[attr-defined]


def implementation(op: str, backend: str) -> Callable:
    """The backend's function for ``op`` (signatures of ``fused.reference``)."""
    if backend == "torch":
        return getattr(reference, op)
    if backend in ("cpp", "cuda"):
        from . import _cpp

        return getattr(_cpp.cpu_backend if backend == "cpp" else _cpp.cuda_backend, op)
    from . import triton as triton_backend  # type: ignore[attr-defined]

    return getattr(triton_backend.backend, op)
