"""Moved modules stay importable for one release, as the very module they moved to."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

MOVED = [("fused.processor", "fused.processors.unet"), ("fused.joint_processor", "fused.processors.joint"),
         ("benchmarks.baselines", "fused.benchmark.baselines")]


@pytest.mark.parametrize("old,new", MOVED)
def test_old_path_is_the_new_module_and_warns(old, new):
    # A fresh interpreter: the warning fires on first import only.
    code = (f"import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            f"try:\n    import {old}\nexcept DeprecationWarning as w:\n    print('warned:', w)\n"
            f"warnings.simplefilter('ignore'); import {old} as a, {new} as b; print('same:', a is b)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"warned: {old} moved to {new}" in res.stdout and "same: True" in res.stdout


def test_public_names_stay_where_users_import_them():
    import fused
    import fused.maps

    assert fused.maps is importlib.import_module("fused.processors.trace")
    assert fused.FusedAttnProcessor is importlib.import_module("fused.processors.unet").FusedAttnProcessor
    from vico.methods import get_method
    from vico.methods.registry import METHODS

    assert get_method("vico") is METHODS["vico"]
    with pytest.warns(DeprecationWarning, match="vico.methods.base.get_method moved to vico.methods.get_method"):
        from vico.methods.base import get_method as old_get_method
    assert old_get_method is get_method
