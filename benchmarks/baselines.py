"""Moved to ``fused.benchmark.baselines`` (this path stays for one release)."""
from fused._moved import alias

alias(__name__, "fused.benchmark.baselines")
