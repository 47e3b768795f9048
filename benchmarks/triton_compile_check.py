"""Moved to tools/triton_compile_check.py (compile-only Triton tools are not benchmarks); this shim runs it for one release."""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    print("note: benchmarks/triton_compile_check.py moved to tools/triton_compile_check.py", file=sys.stderr)
    sys.argv[0] = str(Path(__file__).resolve().parent.parent / "tools" / "triton_compile_check.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
