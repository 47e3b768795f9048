"""benchmarks/gpu_check.py stays runnable: a tiny CPU pass through every check
and benchmark (the Triton kernels interpreted), which must report success."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_gpu_check_tiny_run(tmp_path, cpp_backend, triton_backend):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "r.json"
    assert gpu_check.main(["--tiny", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    checked = {(r["check"], r["backend"]) for r in report["checks"]}
    for op in ("cross_attention_with_maps", "masked_attention", "otsu_mask/vico", "otsu_mask/skimage"):
        assert (op, "cpp") in checked and (op, "triton") in checked
    assert all(r["ok"] for r in report["checks"])
    assert {r["op"] for r in report["bench"]} == {"cross_attention_with_maps", "masked_attention", "otsu_mask"}
    assert all(r["fused_ms"] > 0 for r in report["bench"])


def test_scaling_script_small_run(tmp_path, cpp_backend):
    spec = importlib.util.spec_from_file_location("scaling", SCRIPT.parent / "scaling.py")
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    assert scaling.main(["--latents", "4", "8", "--repeat", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "scaling.json").read_text())
    fused_maps = [r["maps_mb_analytic"] for r in report["rows"] if r["path"] == "fused" and r["maps_mb_analytic"] is not None]
    paper_maps = [r["maps_mb_analytic"] for r in report["rows"] if r["path"] == "paper" and r["maps_mb_analytic"] is not None]
    assert fused_maps[1] == 4 * fused_maps[0] and paper_maps[1] == 4 * paper_maps[0]  # O(N) both, paper x H*L/T
    assert paper_maps[0] / fused_maps[0] == pytest.approx(8 * 77 / 2)
    assert (tmp_path / "scaling.md").is_file()


def test_joint_maps_benchmark_small_run(capsys):
    spec = importlib.util.spec_from_file_location("bench_joint_maps", SCRIPT.parent / "bench_joint_maps.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    row = mod.run_one("fused", 16, 5, 2, 8, "cpu", 1)
    assert row["best_ms"] > 0 and row["variant"] == "fused"
    assert mod.run_one("materialised", 16, 5, 2, 8, "cpu", 1)["best_ms"] > 0


def test_flux_sweep_measures_both_paths_or_projects_the_materialised_one(tmp_path, monkeypatch, cpp_backend):
    spec = importlib.util.spec_from_file_location("bench_joint_maps", SCRIPT.parent / "bench_joint_maps.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.flux_sweep([64], "cpu", 1, tmp_path / "fits") == 0  # 16 image + 512 text tokens: both run
    (row,) = json.loads((tmp_path / "fits" / "flux_scaling.json").read_text())
    assert row["image_tokens"] == 16 and row["heads"] == 24 and row["head_dim"] == 128 and row["materialised_ran"]
    assert row["fused_ms"] > 0 and row["materialised_ms"] > 0
    assert row["projected_materialised_mb"] == pytest.approx(2 * 24 * 528 ** 2 * 4 / 2**20)
    monkeypatch.setattr(mod, "memory_bytes", lambda device: 2**20)  # a machine with 1 MB: nothing materialises
    assert mod.flux_sweep([64], "cpu", 1, tmp_path / "small") == 0
    (row,) = json.loads((tmp_path / "small" / "flux_scaling.json").read_text())
    assert not row["materialised_ran"] and row["materialised_ms"] is None
    assert "(projected)" in (tmp_path / "small" / "flux_scaling.md").read_text()


def test_vico_step_benchmark_runs_each_processor_once():
    import torch

    spec = importlib.util.spec_from_file_location("bench_vico_step", SCRIPT.parent / "bench_vico_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for processor in ("fused", "paper", "diffusers+maps"):
        row = mod.run_one(processor, "tiny", 16, 1, "cpu", torch.float32)
        assert row["train_ms"] > 0 and row["sample_ms"] > 0 and row["processor"] == processor
