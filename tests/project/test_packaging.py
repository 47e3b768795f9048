"""The wheel carries csrc/ as package data, so an installed copy can JIT-build."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
    for module in ("fused/__init__.py", "fused/triton/otsu.py", "fused/maps.py", "fused/sdpa.py", "vico/__init__.py",
                   "vico/word_tokenizer.py", "vico/toyworld/model/model_index.json"):
        assert module in names, module
    # every module of both packages (a non-editable install once lacked vico.methods and vico.toyworld)
    for pkg in ("fused", "vico"):
        for path in (ROOT / pkg).rglob("*.py"):
            assert path.relative_to(ROOT).as_posix() in names, path
    # test-only builders and configs stay in the checkout
    assert not any(n.startswith("tests/") or n.endswith("sd15_unet.json") for n in names)
