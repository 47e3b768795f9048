"""Per-op benchmarks: fused (every backend that runs here) vs the `paper` baseline
vs SDPA without maps, grouped by op and shape so the comparison reads side by side
(`pytest benchmarks/ --benchmark-only --benchmark-group-by=group`)."""

import pytest
import torch

import fused
from fused.benchmark import cases

from .conftest import bench_size


def _params(config):
    device = torch.device(fused.default_device())
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size = bench_size(config)
    backends = [b for b in fused.available_backends(device) if b != "cuda"]
    if size != "tiny" and device.type == "cpu":
        backends = [b for b in backends if b != "triton"]  # the interpreter is not a benchmark
    params = []
    for backend in backends:
        for case in cases(size, device, dtype, backend):
            for variant, fn in case.variants.items():
                if variant != "fused" and backend != backends[0]:
                    continue  # baselines once per case
                name = f"fused[{backend}]" if variant == "fused" else variant
                group = f"{case.op} {'x'.join(map(str, case.shape))}"
                params.append(pytest.param(fn, group, id=f"{group.replace(' ', '-')}-{name}"))
    return params


def pytest_generate_tests(metafunc):
    if "op_fn" in metafunc.fixturenames:
        metafunc.parametrize("op_fn, group", _params(metafunc.config))


def test_op(benchmark, op_fn, group):
    benchmark.group = group
    if torch.cuda.is_available():
        result = benchmark(lambda: (op_fn(), torch.cuda.synchronize()))
    else:
        result = benchmark(op_fn)
    assert result is not None
