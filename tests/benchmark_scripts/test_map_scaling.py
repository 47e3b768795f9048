"""benchmarks/bench_map_scaling.py at tiny shapes, in this process: the three paths it times compute the same
attention and the fused maps equal the materialised ones; its memory formula agrees with bench_joint_maps'
projection; tables (and, with a stand-in matplotlib, the plot) come out of a tiny sweep."""

import argparse
import sys
from unittest import mock

import pytest
import torch

from benchmarks import bench_joint_maps
from benchmarks import bench_map_scaling as bench

TINY = [bench.Layer("flux", "tiny joint", 64, heads=2, dim=16, n_text=24, n_image=40, joint=True),
        bench.Layer("wan", "tiny cross", 5, heads=3, dim=16, n_text=24, n_image=48, joint=False)]


@pytest.mark.parametrize("layer", TINY, ids=lambda layer: layer.label)
def test_the_paths_agree_on_a_slice(layer):
    heads, rows = bench.slice_of(layer, 0, 16)
    assert (heads, rows) == (layer.heads, 16)
    q, k, v, index = bench.inputs(layer, heads, rows, "cpu", torch.float64)
    assert k.shape[2] == (64 if layer.joint else 24)
    run = {name: fn() for name, fn in bench.variants(q, k, v, index).items()}
    (fused_out, fused_maps), (mat_out, mat_maps) = run["fused"], run["materialised"]
    torch.testing.assert_close(fused_maps, mat_maps, rtol=1e-10, atol=1e-12)
    assert fused_maps.shape == (1, 4, rows) and fused_maps.abs().sum() > 0
    torch.testing.assert_close(fused_out, run["sdpa"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mat_out, run["sdpa"], rtol=1e-10, atol=1e-12)


def test_formula_matches_the_flux_projection():
    layer = bench.flux_layer(2048)
    assert (layer.rows, layer.keys) == (16896, 16896)
    mat = bench.formula_bytes("materialised", layer.heads, layer.rows, layer.keys, layer.dim, 4)
    small = (layer.heads * layer.rows * layer.dim + 2 * layer.heads * layer.rows * 4 + 4 * layer.rows) * 4
    assert mat - small == bench_joint_maps.materialised_bytes(16384, 512, 24, 4) > 27e9
    fused = bench.formula_bytes("fused", layer.heads, layer.rows, layer.keys, layer.dim, 4)
    assert fused - bench.formula_bytes("sdpa", layer.heads, layer.rows, layer.keys, layer.dim, 4) < 2e6
    assert bench.wan_layer(81).rows == 21 * 30 * 52


def test_a_tiny_sweep_writes_tables_and_plots(monkeypatch, tmp_path):
    opts = argparse.Namespace(slice_heads=1, slice_rows=16, mem_limit_gb=None, device="cpu", dtype="fp32", repeat=1,
                              pairs=3)

    def here(opts, layer, path, heads, rows):
        if path == "paired":
            return bench.run_paired(layer, heads, rows, "cpu", torch.float32, opts.pairs)
        return bench.run_one(layer, path, heads, rows, "cpu", torch.float32, 1)

    monkeypatch.setattr(bench, "child", here)
    rows = [r for layer in TINY for r in bench.measure_layer(opts, layer)]
    assert [r["path"] for r in rows] == list(bench.PATHS) * 2 and not any("error" in r for r in rows)
    fused_row = rows[1]  # the paired rounds land on the fused row only
    assert fused_row["rounds"] == 3 and fused_row["paired_q1"] <= fused_row["paired_extra"] <= fused_row["paired_q3"]
    assert fused_row["paired_extra"] > -1 and "paired_extra" not in rows[0] and "paired_extra" not in rows[2]
    joint = rows[0]
    assert joint["layer_ms"] == pytest.approx(joint["best_ms"] * 2 * 64 / 16)  # heads x rows of the whole layer
    assert rows[2]["extra_layer_mb"] > rows[1]["extra_layer_mb"]
    table = bench.format_tables(rows, opts)
    assert "| tiny joint | 64 x 64 | 1 x 16 | materialised |" in table and "computed from the slice" in table
    assert " of 3 |" in table
    monkeypatch.setattr(bench, "child", lambda o, layer, path, heads, rows: {"error": "boom"} if path == "paired"
                        else here(o, layer, path, heads, rows))
    kept = bench.measure_layer(opts, TINY[1])
    assert kept[1]["paired_error"] == "boom" and "error" not in kept[1] and "| boom |" in bench.format_tables(kept, opts)
    opts.mem_limit_gb = 1e-9  # the guard: nothing is run
    assert all(r["error"].startswith("not run") for r in bench.measure_layer(opts, TINY[0]))
    fake = mock.MagicMock()
    fake.pyplot.subplots.return_value = (mock.MagicMock(), [[mock.MagicMock(), mock.MagicMock()]] * 2)
    with mock.patch.dict(sys.modules, {"matplotlib": fake, "matplotlib.pyplot": fake.pyplot}):
        assert bench.plot(rows, tmp_path / "p.png")
    fake.pyplot.subplots.return_value[0].savefig.assert_called_once()
