"""Moved to tools/triton_config_sweep.py (compile-only Triton tools are not benchmarks); this shim runs it for one release."""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    print("note: benchmarks/triton_config_sweep.py moved to tools/triton_config_sweep.py", file=sys.stderr)
    sys.argv[0] = str(Path(__file__).resolve().parent.parent / "tools" / "triton_config_sweep.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
