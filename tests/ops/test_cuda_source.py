"""Compile-only check of the CUDA Otsu kernel (csrc/otsu_cuda.cu) with nvcc.

Needs only nvcc, not a GPU or a CUDA build of torch: the source is compiled to
an object file with the flags ``fused._cpp.load_cuda`` builds it with (plus
the defines ``torch.utils.cpp_extension`` adds for extensions), for sm_90.
Whether the kernel gives the right answers is checked on a GPU by the backend
tests; this catches syntax, template and header errors on every machine with
nvcc. The compile takes about a minute, so it runs once per session.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from fused._cpp import CUDA_CFLAGS

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH (CUDA toolkit not installed)")

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCE = CSRC / "otsu_cuda.cu"
COMPILE_TIMEOUT_S = 600


def nvcc_command(output: Path) -> list[str]:
    """The nvcc compile-only command line for csrc/otsu_cuda.cu."""
    # CPU torch has no CUDA_HOME, so include_paths("cuda") is not usable; the
    # plain torch include dirs hold the ATen/cuda and c10/cuda headers, and
    # nvcc finds the CUDA toolkit headers itself.
    includes = list(cpp_extension.include_paths())
    python_include = sysconfig.get_path("include", scheme="posix_prefix")
    if python_include:
        includes.append(python_include)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    common_nvcc = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    cmd = [NVCC, "-c", str(SOURCE), "-o", str(output)]
    cmd += ["-DTORCH_EXTENSION_NAME=fused_cuda_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    # CPU wheels of torch ship the c10/cuda headers but not the CMake-generated
    # c10/cuda/impl/cuda_cmake_macros.h, whose only content is
    # C10_CUDA_BUILD_SHARED_LIBS (used on Windows only); c10 provides this
    # define to skip it (meant for HIP builds).
    if not any((Path(inc) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for inc in includes):
        cmd += ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    cmd += [f"-I{CSRC}"]
    for inc in includes:
        cmd += ["-isystem", inc]
    cmd += common_nvcc
    cmd += ["--compiler-options", "-fPIC"]
    cmd += ["-gencode", "arch=compute_90,code=sm_90"]
    # The flags fused._cpp.load_cuda passes as extra_cuda_cflags (they define the bin limits).
    cmd += list(CUDA_CFLAGS)
    return cmd


@pytest.fixture(scope="module")
def cuda_object(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nvcc") / "otsu_cuda.o"
    cmd = nvcc_command(out)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"nvcc did not finish within {COMPILE_TIMEOUT_S} s: {' '.join(cmd)}")
    elapsed = time.perf_counter() - start
    print(f"nvcc compile of {SOURCE.name}: {elapsed:.1f} s", file=sys.stderr)
    assert proc.returncode == 0, (
        f"nvcc failed (exit {proc.returncode}) after {elapsed:.1f} s\n"
        f"command: {' '.join(cmd)}\n--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout}"
    )
    assert out.is_file(), f"nvcc reported success but wrote no {out}"
    return out


def test_otsu_cuda_compiles(cuda_object: Path) -> None:
    assert cuda_object.stat().st_size > 0


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) not found on PATH")
def test_otsu_cuda_registers_op(cuda_object: Path) -> None:
    proc = subprocess.run(["nm", "-C", str(cuda_object)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    symbols = proc.stdout
    # TORCH_LIBRARY_IMPL(fused_cuda, CUDA, m) leaves a static registrar TORCH_LIBRARY_IMPL_static_init_fused_cuda_CUDA_<n>
    # (its init function may be inlined); the schema is declared in Python (fused/_library.py), so the object
    # defines no TORCH_LIBRARY of its own.
    assert "TORCH_LIBRARY_init_fused_cuda" not in symbols, "the schema must be declared once, in fused/_library.py"
    assert "TORCH_LIBRARY_IMPL_static_init_fused_cuda_CUDA" in symbols, (
        "TORCH_LIBRARY_IMPL(fused_cuda, CUDA, ...) not found in the object"
    )
    # Both kernels are instantiated for every dispatched dtype.
    assert "otsu_vico_kernel" in symbols and "otsu_skimage_kernel" in symbols
