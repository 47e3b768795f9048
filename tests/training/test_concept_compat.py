"""Concepts, models and resumed runs are checked against each other before anything heavy loads: one line
naming the file or option, never a torch traceback or a silent default."""

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file, save_file  # noqa: E402

from tests.builders import error_line, signal_handlers_kept, vico as run, vico_train as train  # noqa: E402


@pytest.fixture(scope="module")
def concept(model_dir, images_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compat") / "c"
    with signal_handlers_kept():
        assert train(model_dir, images_dir, out, "--method", "textual-inversion", "--steps", 1) == 0
    return out


def edited(concept, tmp_path, config=None, tensors=None):
    """A copy of ``concept`` with concept.json's config edited (None deletes a key) or its tensors replaced."""
    copy = tmp_path / "edited"
    shutil.copytree(concept, copy)
    meta = json.loads((copy / "concept.json").read_text())
    for key, value in (config or {}).items():
        meta["config"].pop(key) if value is None else meta["config"].__setitem__(key, value)
    (copy / "concept.json").write_text(json.dumps(meta))
    if tensors is not None:
        save_file(tensors, copy / "concept.safetensors")
    return copy


def sample(concept, out, *extra, prompt="a photo of S*"):
    return run("sample", "--concept", concept, "--prompt", prompt, "--out", out, "--num-images", 1, "--steps", 1,
               "--quiet", *extra)


@pytest.mark.parametrize("config, message", [
    ({"resolution": None}, "config.resolution is missing"),
    ({"resolution": 10**9}, "config.resolution must be a whole number of pixels in 8..8192, got 1000000000"),
    ({"resolution": "32"}, "config.resolution must be a whole number of pixels"),
    ({"placeholder": ""}, "config.placeholder must be a non-empty token"),
    ({"seed": -1}, "config.seed must be a whole number in 0..2**32-1"),
    ({"learning_rates": {"embedding": "fast"}}, "config.learning_rates must map group names to positive finite"),
    ({"options": {"fast": True}}, "config.options.fast is not an option of textual-inversion (it has none)"),
    ({"options": []}, "config.options must be an object, got []"),
])
def test_every_concept_json_field_is_checked_naming_the_file(concept, tmp_path, capsys, config, message):
    bad = edited(concept, tmp_path, config=config)
    assert sample(bad, tmp_path / "o") == 2
    line = error_line(capsys)
    assert line.startswith(f"vico: error: {bad / 'concept.json'}: ") and message in line
    assert not (tmp_path / "o").exists()


def test_a_resolution_the_model_cannot_generate_is_refused(concept, tmp_path, capsys):
    bad = edited(concept, tmp_path, config={"resolution": 33})  # the tiny VAE halves: odd sizes are resized
    assert sample(bad, tmp_path / "o") == 2
    assert f"{bad / 'concept.json'}: config.resolution 33: " in error_line(capsys)


@pytest.mark.parametrize("shape", [(1, 16), (1, 1), (2, 32)])
def test_a_tensor_of_another_shape_names_the_file(concept, tmp_path, capsys, shape):
    assert tuple(load_file(concept / "concept.safetensors")["embedding"].shape) == (1, 32)
    bad = edited(concept, tmp_path, tensors={"embedding": torch.zeros(shape)})
    assert sample(bad, tmp_path / "o") == 2
    assert error_line(capsys) == (f"vico: error: {bad / 'concept.safetensors'}: tensor 'embedding' is torch.float32 "
                                  f"{list(shape)}, the model needs torch.float32 [1, 32]: it was trained on another "
                                  "model or with other --layers")


def test_a_missing_or_extra_tensor_names_the_file(concept, tmp_path, capsys):
    bad = edited(concept, tmp_path, tensors={"embeddings": torch.zeros(1, 32)})
    assert sample(bad, tmp_path / "o") == 2
    line = error_line(capsys)
    assert f"{bad / 'concept.safetensors'}: tensor 'embedding' is missing (1 missing, 1 unexpected)" in line


@pytest.fixture(scope="module")
def run_dir(model_dir, images_dir, tmp_path_factory):
    """A ViCo run of 1 step with its checkpoint (what a refused resume must leave as it is)."""
    out = tmp_path_factory.mktemp("resume") / "run"
    with signal_handlers_kept():
        assert train(model_dir, images_dir, out, "--steps", 1, "--checkpoint-every", 1) == 0
    return out


@pytest.mark.parametrize("change, option", [
    (("--resolution", 16), "--resolution"),
    (("--token", "T*"), "--token"),
    (("--method", "textual-inversion"), "--method"),
    (("--layers", "up_blocks.1.attentions.0"), "--layers"),
    (("--reg-weight", 0), "--reg-weight"),
    (("--gradient-accumulation-steps", 2), "--gradient-accumulation-steps"),
    (("--lr-scheduler", "cosine"), "--lr-scheduler"),
    (("--images", None), "--images"),
])
def test_resume_refuses_arguments_that_change_what_is_trained(model_dir, images_dir, run_dir, tmp_path, capsys,
                                                              change, option):
    from tests import builders as tiny

    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    value = change[1] if change[1] is not None else tiny.write_toy_images(tmp_path / "other", n=2)[0].parent
    args = [a for a in ("--images", images_dir) if change[0] != "--images"]
    argv = ["train", "--model", model_dir, *args, "--out", run_dir, "--init-word", "cat", "--quiet", "--steps", 2,
            "--resume", change[0], value]
    capsys.readouterr()
    assert run(*argv) == 2
    line = error_line(capsys)
    assert f"vico: error: --resume: {option} is " in line and "--resume-with-changes" in line
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_resume_with_changes_says_what_changed_and_trains_on(model_dir, images_dir, run_dir, tmp_path, capsys):
    out = shutil.copytree(run_dir, tmp_path / "run")
    assert train(model_dir, images_dir, out, "--steps", 2, "--resume", "--resume-with-changes",
                 "--resolution", 16) == 0
    assert "--resume-with-changes: --resolution changes from 32 to 16" in capsys.readouterr().err
    assert json.loads((out / "train_config.json").read_text())["resolution"] == 16
    assert json.loads((out / "concept.json").read_text())["config"]["resolution"] == 16


def test_resume_restating_the_default_resolution_or_option_is_no_change(model_dir, images_dir, run_dir, tmp_path):
    out = shutil.copytree(run_dir, tmp_path / "run")
    assert train(model_dir, images_dir, out, "--steps", 2, "--resume", "--resolution", 32, "--reg-weight", 5e-4) == 0


def test_resume_with_an_unreadable_train_config_is_one_line(model_dir, images_dir, run_dir, tmp_path, capsys):
    out = shutil.copytree(run_dir, tmp_path / "run")
    (out / "train_config.json").write_text("{truncated")
    assert train(model_dir, images_dir, out, "--steps", 2, "--resume") == 2
    assert f"--resume: cannot compare with the run's {out / 'train_config.json'}" in error_line(capsys)
