"""NaN and inf are stopped where numbers enter or leave: CLI floats, the training loss and weights at every
checkpoint, concept tensors on load, sampled latents before decoding."""


import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file, save_file  # noqa: E402

from tests.builders import signal_handlers_kept, vico as run, vico_train  # noqa: E402
from vico.model import UserError  # noqa: E402


def train(model_dir, images_dir, out, *extra):
    return vico_train(model_dir, images_dir, out, "--method", "textual-inversion", *extra)


@pytest.fixture(scope="module")
def concept(model_dir, images_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finite") / "c"
    with signal_handlers_kept():
        assert train(model_dir, images_dir, out, "--steps", 1) == 0
    return out


@pytest.mark.parametrize("argv", [
    ("sample", "--concept", "c", "--prompt", "S*", "--out", "o", "--guidance", "nan"),
    ("sample", "--concept", "c", "--prompt", "S*", "--out", "o", "--guidance", "inf"),
    ("maps", "--model", "m", "--prompt", "a cat", "--words", "cat", "--out", "o", "--guidance=-inf"),
    ("maps", "--model", "m", "--prompt", "a cat", "--words", "cat", "--out", "o", "--fps", "nan"),
    ("train", "--model", "m", "--images", "i", "--out", "o", "--lr", "embedding=nan"),
])
def test_non_finite_cli_floats_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        run(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "expected a finite number" in err and err.startswith("vico ")


def test_a_diverging_run_stops_and_keeps_the_last_finite_checkpoint(model_dir, images_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(model_dir, images_dir, out, "--steps", 4, "--checkpoint-every", 1, "--lr", "embedding=1e30") == 2
    err = capsys.readouterr().err
    assert "vico: error: training diverged: the loss was NaN or inf at step 2; the last finite checkpoint, " \
           "step-000001, is kept" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    assert not (out / "concept.safetensors").exists()  # no NaN concept
    weights = load_file(out / "checkpoints" / "step-000001" / "concept.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_a_concept_with_nan_is_refused_on_load(concept, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(concept, bad)
    weights = load_file(bad / "concept.safetensors")
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, bad / "concept.safetensors")
    code = run("sample", "--concept", bad, "--prompt", "a photo of S*", "--out", tmp_path / "o", "--steps", 1,
               "--num-images", 1, "--quiet")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"vico: error: {bad / 'concept.safetensors'}: tensor {name!r} holds NaN or inf values "
                       "(training diverged); retrain with a lower learning rate")
    assert not (tmp_path / "o").exists()


def test_non_finite_latents_are_not_decoded(model_dir, concept, monkeypatch):
    from vico.pipeline import ViCoPipeline

    pipe = ViCoPipeline.from_pretrained(model_dir, concept)
    decoded = []
    monkeypatch.setattr(pipe.method, "predict_noise", lambda latents, *a, **k: torch.full_like(latents, float("inf")))
    monkeypatch.setattr(pipe.components.vae, "decode", lambda *a, **k: decoded.append(1))
    with pytest.raises(UserError, match="sampling produced NaN or inf latents"):
        pipe("a photo of S*", num_images=1, num_inference_steps=2, progress=False)
    assert not decoded
