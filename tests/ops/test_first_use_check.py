"""The first-use check of compiled kernels against the float64 reference (fused.selfcheck)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fused
from fused import _dispatch, reference, selfcheck

from ..conftest import rand

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_verdicts(tmp_path, monkeypatch):
    """An empty verdict folder and no verdicts remembered in this process."""
    monkeypatch.setenv("FUSED_SELFCHECK_DIR", str(tmp_path))
    monkeypatch.setenv("FUSED_SELFCHECK", "1")
    monkeypatch.setattr(selfcheck, "_VERDICTS", {})
    _dispatch._warn_once.cache_clear()
    return tmp_path


def _inputs():
    q, k, v = rand(2, 2, 9, 24, dtype=torch.float32), rand(2, 2, 5, 24, dtype=torch.float32, seed=1), \
        rand(2, 2, 5, 24, dtype=torch.float32, seed=2)
    return q, k, v, torch.tensor([[0, 4], [-1, 2]])


def test_a_broken_kernel_is_caught_and_the_call_falls_back_with_right_numbers(fresh_verdicts, monkeypatch,
                                                                              cpp_backend):
    cpp = _dispatch.implementation("cpp")
    real = cpp.attention

    def off_by_one_percent(*args):
        out, maps = real(*args)
        return out * 1.01, maps

    monkeypatch.setattr(cpp, "attention", off_by_one_percent)
    q, k, v, idx = _inputs()
    with pytest.warns(RuntimeWarning) as record:
        out, maps = fused.cross_attention_with_maps(q, k, v, idx)
    text = " ".join(str(w.message) for w in record)
    assert "the cpp kernel for attention (float32, head dim class 32, cpu) failed its first-use check" in text
    assert "out differs by" in text and "falls back to the sdpa backend" in text
    want_out, want_maps = reference.attention_with_maps(q.double(), k.double(), v.double(), idx, 24 ** -0.5, "mean")
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(maps.double(), want_maps, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="backend 'cpp' failed its self-check for attention"):
        fused.cross_attention_with_maps(q, k, v, idx, backend="cpp")
    saved = {r["key"]["backend"]: r["error"] for r in map(json.loads, (p.read_text() for p in fresh_verdicts.glob("*")))}
    assert "out differs by" in saved["cpp"] and saved["sdpa"] == ""  # sdpa, the next backend, was checked too


def test_a_kernel_that_raises_at_launch_is_a_failed_verdict(fresh_verdicts, monkeypatch, cpp_backend):
    def launch_failure(*args):
        raise RuntimeError("out of resource: shared memory\nsecond line")

    monkeypatch.setattr(_dispatch.implementation("cpp"), "otsu_mask", launch_failure)
    with pytest.warns(RuntimeWarning, match="RuntimeError: out of resource: shared memory"):
        assert _dispatch.resolve("otsu_mask", "cpu", torch.float32, None) == "torch"


_SECOND_PROCESS = """
import sys, torch, fused
from fused import selfcheck
def refuse(*args):
    raise AssertionError("the check ran again")
selfcheck.run_case = refuse
q = torch.randn(1, 2, 9, 24); k = torch.randn(1, 2, 5, 24)
fused.cross_attention_with_maps(q, k, k, torch.tensor([[1]]), backend="cpp")
print("reused")
"""


def test_a_verdict_is_reused_from_disk_in_a_new_process(fresh_verdicts, cpp_backend):
    env = dict(os.environ, FUSED_SELFCHECK_DIR=str(fresh_verdicts))
    first = subprocess.run([sys.executable, "-c", "import torch, fused; q = torch.randn(1, 2, 9, 24);"
                            "fused.cross_attention_with_maps(q, q[:, :, :5], q[:, :, :5], torch.tensor([[1]]),"
                            " backend='cpp')"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    assert [json.loads(p.read_text())["error"] for p in fresh_verdicts.glob("*.json")] == [""]
    second = subprocess.run([sys.executable, "-c", _SECOND_PROCESS], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "reused"


def test_a_verdict_for_other_sources_is_ignored(fresh_verdicts, monkeypatch, cpp_backend):
    key = selfcheck._key("cpp", "attention", "cpu", torch.float32, 24)
    stale = dict(key, source="0123456789abcdef")
    # A failing verdict stored where this key's verdict goes, but recorded for other kernel sources.
    selfcheck._path(key).write_text(json.dumps({"key": stale, "error": "out differs by 1"}))
    ran = []
    real = selfcheck.run_case
    monkeypatch.setattr(selfcheck, "run_case", lambda *a: ran.append(a) or real(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert selfcheck.verdict("cpp", "attention", "cpu", torch.float32, 24) == ""
    assert len(ran) == 1
    assert json.loads(selfcheck._path(key).read_text())["key"] == key


def test_the_check_can_be_switched_off_and_forced(fresh_verdicts, monkeypatch, cpp_backend):
    monkeypatch.setattr(selfcheck, "run_case", lambda *a: "forced failure")
    monkeypatch.setenv("FUSED_SELFCHECK", "0")
    assert selfcheck.verdict("cpp", "otsu_mask", "cpu", torch.float32, None) == ""
    assert not list(fresh_verdicts.glob("*.json"))
    monkeypatch.setenv("FUSED_SELFCHECK", "force")
    with pytest.warns(RuntimeWarning, match="forced failure"):
        assert selfcheck.verdict("cpp", "otsu_mask", "cpu", torch.float32, None) == "forced failure"


def test_every_backend_here_passes_its_first_use_case(cpu_backend):
    if cpu_backend == "torch":
        pytest.skip("the reference is the oracle")
    assert selfcheck.run_case(cpu_backend, "attention", "cpu", torch.float64, 40) == ""
    if cpu_backend != "sdpa":
        assert selfcheck.run_case(cpu_backend, "otsu_mask", "cpu", torch.float32, None) == ""


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "autocast"])
def test_a_first_use_inside_no_grad_inference_or_autocast_checks_the_kernel_as_outside(fresh_verdicts, mode,
                                                                                        cpp_backend):
    # sampling calls the op first inside no_grad / inference_mode; the case needs gradients and float32
    context = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode(),
               "autocast": torch.autocast("cpu", dtype=torch.bfloat16)}[mode]
    q, k, v, idx = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with context:
            assert selfcheck.verdict("cpp", "attention", "cpu", torch.float32, 24) == ""
            out, maps = fused.cross_attention_with_maps(q, k, v, idx)
    want_out, want_maps = reference.attention_with_maps(q.double(), k.double(), v.double(), idx, 24 ** -0.5, "mean")
    if mode != "autocast":
        torch.testing.assert_close(out.double(), want_out, rtol=0, atol=1e-5)
    assert [json.loads(p.read_text())["error"] for p in fresh_verdicts.glob("*.json")] == [""]
