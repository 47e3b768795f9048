"""pytest-benchmark suites. Plain `pytest` (CI) runs each benchmark once at a tiny
shape as a smoke test; `pytest benchmarks/ --benchmark-only` measures at SD 1.5
shapes (a reduced set on CPU, all of docs/shapes.md §1 and §2 on a GPU)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    if not config.getoption("benchmark_only", default=False):
        config.option.benchmark_disable = True  # smoke: run every benchmark body once


def bench_size(config) -> str:
    if not config.getoption("benchmark_only", default=False):
        return "tiny"
    return os.environ.get("FUSED_BENCH_SIZE", "gpu" if torch.cuda.is_available() else "cpu")
