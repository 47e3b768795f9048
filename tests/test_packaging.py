"""The wheel carries csrc/ as package data, so an installed copy can JIT-build."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (ROOT / "setup.py").is_file(), reason="needs the source checkout")
def test_wheel_ships_csrc_sources(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("fused_attn_maps-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    from fused import _cpp

    for src in _cpp.CPU_SOURCES + _cpp.CPU_HEADERS + _cpp.CUDA_SOURCES:
        assert f"fused/csrc/{src}" in names, src
    for module in ("fused/__init__.py", "fused/triton/otsu.py", "fused/processor.py", "vico/__init__.py",
                   "vico/configs/sd15_unet.json"):
        assert module in names, module
