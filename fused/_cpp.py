"""JIT build and loading of the compiled kernels in ``csrc/``.

The C++ (CPU) kernels are built on first use with
``torch.utils.cpp_extension.load`` and ninja into a cache directory keyed by
the torch version, the CUDA version and a hash of the sources and of the
compile and link flags the build passes (the CUDA build's flags define the
Otsu bin limits), so a changed source, flag or torch never loads a stale
binary (docs/dispatch.md §7.1). ``csrc/`` ships inside the
wheel as package data (``fused/csrc``); in a checkout it sits beside ``fused/``.

The libraries implement ops declared in ``fused._library`` (``torch.ops.fused_cpp.*``
and, for the CUDA Otsu kernel, ``torch.ops.fused_cuda.*``) with ``TORCH_LIBRARY_IMPL``;
the two backends are registered at the end of this module.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import stat
import sys
from pathlib import Path

import torch

from . import _library
from ._locks import exclusive_lock
from ._registry import FLOATS, BackendUnavailable, register_backend

# Each .cpp file implements its ops with its own TORCH_LIBRARY_IMPL block: a new kernel file is built as it is.
CPU_SOURCES = ("attention_cpu.cpp", "otsu_cpu.cpp")
CPU_HEADERS = ("otsu_rule.h",)
CUDA_SOURCES = ("otsu_cuda.cu",)


class BuildError(BackendUnavailable):
    """The compiled kernels could not be built or loaded."""


def source_dir() -> Path:
    """Directory holding the C++/CUDA sources (installed copy first, then checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / CPU_SOURCES[0]).is_file():
            return candidate
    raise BuildError(f"fused: C++ sources not found next to {here} (looked in fused/csrc and ../csrc)")


def cache_key(files: tuple[str, ...], flags: tuple[str, ...] = ()) -> str:
    """torch version + CUDA version + hash of the sources ``files`` and of the build's ``flags``."""
    src = source_dir()
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode())
        digest.update((src / name).read_bytes())
    digest.update("\0".join(flags).encode())
    cuda = torch.version.cuda or "cpu"
    torch_v = torch.__version__.replace("+", "_")
    return f"torch{torch_v}-cuda{cuda}-{digest.hexdigest()[:16]}"


def cache_root() -> Path:
    env = os.environ.get("FUSED_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fused-attn-maps"


def _cflags() -> list[str]:
    # -ffp-contract=off: no fused multiply-add, so the Otsu normalisation and
    # the linspace bin edges round exactly as the PyTorch reference does.
    return ["-O3", "-fopenmp", "-ffp-contract=off", "-std=c++17"]


MANIFEST = "manifest.json"  # sha256 of the library this process built, checked before every later load
STALE_LOCKS = ("lock", ".ninja_lock")  # left behind by a build that was killed


def _check_owned(path: Path) -> None:
    """Refuse a cache folder or library that another user owns or that others can write to.

    A library in the cache is loaded into the process (its constructors run), so
    anybody who can put a file there can run code as the user.
    """
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise BuildError(f"fused: refusing the kernel cache {path}: it belongs to uid {st.st_uid}, not to you "
                         f"(uid {os.getuid()}); set FUSED_CACHE_DIR to a folder of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise BuildError(f"fused: refusing the kernel cache {path}: others can write to it (mode "
                         f"{stat.S_IMODE(st.st_mode):o}); run `chmod go-w {path}` or set FUSED_CACHE_DIR")


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_owned(path)
    return path


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """An exclusive lock on the build folder (``fused._locks``): the kernel releases it when its holder
    dies, so a killed build never blocks later processes (torch's own ``lock`` file would, forever)."""
    def say(pid: int | None) -> None:
        print(f"fused: waiting for another process (pid {pid}) building the kernels in {build_dir}", file=sys.stderr)

    with exclusive_lock(build_dir / "build.lock", wait=True, on_wait=say):
        yield


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified_library(build_dir: Path, library: Path) -> bool:
    """True when ``library`` is the one a build of this user recorded; anything else is removed."""
    if not library.exists():
        return False
    _check_owned(library)
    try:
        recorded = json.loads((build_dir / MANIFEST).read_text())[library.name]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded is not None and recorded == _sha256(library):
        return True
    why = "no record of building it" if recorded is None else \
        "it differs from the library that was built here (truncated or replaced)"
    print(f"fused: rebuilding {library}: {why}", file=sys.stderr)
    library.unlink()
    return False


def _build(name: str, sources: tuple[str, ...], headers: tuple[str, ...], **kwargs) -> None:
    from torch.utils import cpp_extension

    src = source_dir()
    # Every flag list handed to the compiler or linker (the CUDA one defines the Otsu bin limits).
    flags = tuple(f"{option}={' '.join(values)}" for option, values in sorted(kwargs.items()))
    key = cache_key(sources + headers, flags)
    build_dir = _private_dir(cache_root()) / key
    _private_dir(build_dir)
    ext_name = f"{name}_{key.rsplit('-', 1)[-1]}"
    library = build_dir / f"{ext_name}.so"
    with _build_lock(build_dir):
        for stale in STALE_LOCKS:  # we hold the lock: whoever left these is gone
            (build_dir / stale).unlink(missing_ok=True)
        built_before = _verified_library(build_dir, library)
        if not built_before:
            print(f"fused: building {name} kernels on first use (15-60 s) in {build_dir}", file=sys.stderr)
        try:
            cpp_extension.load(
                name=ext_name,
                sources=[str(src / s) for s in sources],
                extra_include_paths=[str(src)],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
                **kwargs,
            )
        except (RuntimeError, OSError, ImportError, SystemExit) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise BuildError(
                f"fused: could not build the {name} kernels ({type(exc).__name__}: {first[:300]}). "
                "A C++17 compiler (g++) and ninja are needed; the PyTorch backend still works."
            ) from exc
        # ninja may have relinked even a verified library (sources with newer mtimes, e.g. another checkout of
        # the same code): record what our own build step left, under our lock, every time.
        if library.exists():
            (build_dir / MANIFEST).write_text(json.dumps({library.name: _sha256(library)}))


@functools.cache
def load_cpu() -> None:
    """Build (first time) and load the CPU kernels; raises ``BuildError``."""
    _library.define_schemas("fused_cpp", ("attention", "attention_backward", "otsu_mask"))
    _build("fused_cpp", CPU_SOURCES, CPU_HEADERS, extra_cflags=_cflags(), extra_ldflags=["-fopenmp"])


# The CUDA Otsu kernel's bin limits (per-thread partials for "vico", a shared-memory
# histogram for "skimage"): compiled into csrc/otsu_cuda.cu through CUDA_CFLAGS and
# read by fused._dispatch.max_bins (the registry), so the kernel and the Python check cannot differ.
CUDA_MAX_BINS = {"vico": 64, "skimage": 1024}
CUDA_CFLAGS = ["-O3", "-std=c++17", "-fmad=false", f"-DFUSED_MAX_VICO_BINS={CUDA_MAX_BINS['vico']}",
               f"-DFUSED_MAX_SKIMAGE_BINS={CUDA_MAX_BINS['skimage']}"]


@functools.cache
def load_cuda() -> None:
    """Build (first time) and load the CUDA Otsu kernel; raises ``BuildError``."""
    if not torch.cuda.is_available():
        raise BuildError("fused: the CUDA backend needs a CUDA build of torch and a GPU")
    _library.define_schemas("fused_cuda", ("otsu_mask",))
    _build(
        "fused_cuda",
        CUDA_SOURCES,
        ("otsu_rule.h",),
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=CUDA_CFLAGS,
    )


@register_backend("cpp", devices={"cpu"},
                  dtypes={"attention": frozenset({torch.float32, torch.float64}), "otsu_mask": FLOATS},
                  self_checked=True, note="C++/OpenMP kernels from csrc/ (fp32/fp64; Otsu also takes fp16/bf16 maps)")
def cpu_backend() -> _library.OpsBackend:
    load_cpu()
    return _library.OpsBackend("fused_cpp", upcast_half_maps=True)


@register_backend("cuda", devices={"cuda"}, dtypes={"otsu_mask": FLOATS}, max_bins=CUDA_MAX_BINS,
                  self_checked=True, note="CUDA kernel from csrc/ (Otsu only)")
def cuda_backend() -> _library.OpsBackend:
    load_cuda()
    return _library.OpsBackend("fused_cuda")
