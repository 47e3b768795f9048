import csv
import types

import numpy as np
import pytest
import torch

from tests.toyworld.heldout_renders import FINE_PATTERNS, heldout_set, object_mae


def test_heldout_renders_are_seeded_and_two_toned():
    for name in FINE_PATTERNS:
        a, ma = heldout_set(name, 6, seed=3)
        b, mb = heldout_set(name, 6, seed=3)
        assert np.array_equal(a, b) and np.array_equal(ma, mb) and a.shape == (6, 32, 32, 3) and a.dtype == np.uint8
        assert all(m.sum() >= 40 for m in ma)
        tones = [len(np.unique(img[m], axis=0)) for img, m in zip(a, ma)]
        assert all(t == 1 for t in tones) if name == "solid" else all(t == 2 for t in tones), (name, tones)
    assert not np.array_equal(heldout_set("checker 2px", 6, seed=3)[0], heldout_set("checker 2px", 6, seed=4)[0])


class _GrayAutoencoder(torch.nn.Module):
    """Encodes to the image itself; decodes to it (``identity``) or to mid-gray."""

    def __init__(self, identity: bool):
        super().__init__()
        self.identity = identity

    def encode(self, x):
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=x))

    def decode(self, z):
        return types.SimpleNamespace(sample=z if self.identity else torch.full_like(z, 0.5 / 127.5))


@pytest.mark.parametrize("pattern", ["solid", "diagonal stripes 2px"])
def test_object_mae_counts_only_object_pixels_in_0_255_units(pattern):
    assert object_mae(_GrayAutoencoder(True), pattern, 4) == 0.0
    images, masks = heldout_set(pattern, 4)
    gray = 128.0  # (0.5 / 127.5 + 1) * 127.5, rounded
    want = np.mean([np.abs(img.astype(np.float64) - gray).mean(-1)[m].mean() for img, m in zip(images, masks)])
    assert object_mae(_GrayAutoencoder(False), pattern, 4) == pytest.approx(want, abs=1e-3)


def test_benchmark_writes_one_row_per_pattern(tmp_path, capsys):
    from benchmarks import toy_autoencoder
    from vico.toyworld import demo

    assert toy_autoencoder.main(["--model", str(demo.shipped_model()), "--n", "2", "--csv", str(tmp_path / "t.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert [r["pattern"] for r in rows] == list(FINE_PATTERNS)
    assert all(0 <= float(r["object_mae"]) < 255 for r in rows)
    assert "| checker 2px |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [(["--model", "no-such-folder"], "--model no-such-folder: no vae/config.json"),
                                           (["--n", "0"], "--n must be at least 1")])
def test_benchmark_refuses_bad_arguments_in_one_line(argv, message, capsys):
    from benchmarks import toy_autoencoder
    from vico.toyworld import demo

    if "--model" not in argv:
        argv = ["--model", str(demo.shipped_model())] + argv
    with pytest.raises(SystemExit):
        toy_autoencoder.main(argv)
    assert message in capsys.readouterr().err
