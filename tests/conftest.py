import pytest
import torch

import fused
from fused import _dispatch


@pytest.fixture(scope="session")
def cpp_backend():
    """The C++ backend, built once per session. Its absence is a failure, not a skip:
    CI machines have a compiler, and a silent skip would hide a broken build."""
    ok, why = _dispatch.backend_status("cpp")
    assert ok, why
    return "cpp"


@pytest.fixture(params=["torch", "cpp"])
def cpu_backend(request):
    if request.param == "cpp":
        request.getfixturevalue("cpp_backend")
    return request.param


def rand(*shape, dtype=torch.float64, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype, **kw)


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(1234)
    yield
