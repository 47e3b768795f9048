"""Moved to ``fused.benchmark.baselines`` (this path stays for one release)."""
import sys
import warnings

from fused.benchmark import baselines

warnings.warn("benchmarks.baselines moved to fused.benchmark.baselines; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = baselines
