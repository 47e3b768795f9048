import atexit
import importlib.util
import os
import shutil
import tempfile

import torch

# The Triton kernels run on CPU tensors in CI through the interpreter; it must
# be switched on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# First-use verdicts of this run stay in this run: a test that breaks a kernel on purpose must never
# leave a verdict in the user's cache (nor read one from it).
os.environ["FUSED_SELFCHECK_DIR"] = tempfile.mkdtemp(prefix="fused-selfcheck-")
atexit.register(shutil.rmtree, os.environ["FUSED_SELFCHECK_DIR"], ignore_errors=True)  # no folder left per run

import pytest  # noqa: E402

from fused import _dispatch  # noqa: E402


@pytest.fixture(scope="session")
def cpp_backend():
    """The C++ backend, built once per session. Its absence is a failure, not a skip:
    CI machines have a compiler, and a silent skip would hide a broken build."""
    ok, why = _dispatch.backend_status("cpp")
    assert ok, why
    return "cpp"


@pytest.fixture(scope="session")
def triton_backend():
    """The Triton backend (interpreted on CPU). Skipped only where no triton wheel
    exists for the platform; an installed but broken triton fails."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (no wheel for this platform)")
    ok, why = _dispatch.backend_status("triton")
    assert ok, why
    return "triton"


@pytest.fixture(scope="session")
def sdpa_backend():
    """The composed backend on torch's own fused attention: it needs nothing but torch."""
    ok, why = _dispatch.backend_status("sdpa")
    assert ok, why
    return "sdpa"


@pytest.fixture(params=["torch", "cpp", "triton", "sdpa"])
def cpu_backend(request):
    """Every backend that runs on CPU tensors here."""
    if request.param != "torch":
        request.getfixturevalue(f"{request.param}_backend")
    return request.param


@pytest.fixture(params=["torch", "cpp", "triton"])
def otsu_backend(request):
    """Every backend with an Otsu op that runs on CPU tensors here."""
    if request.param != "torch":
        request.getfixturevalue(f"{request.param}_backend")
    return request.param


@pytest.fixture(params=["cpp", "triton"])
def otsu_kernel_backend(request):
    """The compiled Otsu kernels."""
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.fixture(params=["cpp", "triton", "sdpa"])
def kernel_backend(request):
    """Every backend but the reference (their gradients come from a backward op)."""
    return request.getfixturevalue(f"{request.param}_backend")


def rand(*shape, dtype=torch.float64, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype, **kw)


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Stable-Diffusion-shaped pipeline saved with ``save_pretrained`` (random weights)."""
    from tests import builders as tiny

    return tiny.save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def sdxl_model_dir(tmp_path_factory):
    """A tiny SDXL-shaped pipeline saved with ``StableDiffusionXLPipeline.save_pretrained`` (random weights;
    force_zeros_for_empty_prompt on, the pipeline's default). Tests must not modify it."""
    from tests import builders as tiny

    return tiny.save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    """Three toy training images (the tests' "concept")."""
    from tests import builders as tiny

    folder = tmp_path_factory.mktemp("images")
    tiny.write_toy_images(folder, n=3)
    return folder


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """`vico train` installs SIGINT/SIGTERM handlers in the process that runs it; put pytest's back."""
    from tests.builders import signal_handlers_kept

    with signal_handlers_kept():
        yield
