"""Checkpoint housekeeping: `--checkpoints-total-limit` and `--resume latest | <checkpoint>`."""

import pytest
import torch

pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from vico import cli  # noqa: E402


def train(model_dir, images_dir, out, *extra):
    return cli.main([str(a) for a in ["train", "--model", model_dir, "--images", images_dir, "--out", out,
                                      "--init-word", "cat", "--quiet", "--method", "textual-inversion", *extra]])


def names(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))


def test_only_the_newest_checkpoints_are_kept(model_dir, images_dir, tmp_path):
    assert train(model_dir, images_dir, tmp_path / "default", "--steps", 4, "--checkpoint-every", 1) == 0
    assert names(tmp_path / "default") == ["step-000003", "step-000004"]  # default: the newest 2
    assert train(model_dir, images_dir, tmp_path / "one", "--steps", 3, "--checkpoint-every", 1,
                 "--checkpoints-total-limit", 1) == 0
    assert names(tmp_path / "one") == ["step-000003"]
    assert train(model_dir, images_dir, tmp_path / "all", "--steps", 3, "--checkpoint-every", 1,
                 "--checkpoints-total-limit", 0) == 0
    assert names(tmp_path / "all") == ["step-000001", "step-000002", "step-000003"]


def test_resume_from_a_named_checkpoint_continues_from_it(model_dir, images_dir, tmp_path, capsys):
    full, redo = tmp_path / "full", tmp_path / "redo"
    keep_all = ("--checkpoint-every", 1, "--checkpoints-total-limit", 0)
    assert train(model_dir, images_dir, full, "--steps", 4, *keep_all) == 0
    assert train(model_dir, images_dir, redo, "--steps", 4, *keep_all) == 0
    first = load_file(redo / "concept.safetensors")["embedding"].clone()
    # roll back to step 2: the newer checkpoints move aside (nothing deleted) and the run redoes steps 3-4
    assert train(model_dir, images_dir, redo, "--steps", 4, *keep_all, "--resume", "step-000002") == 0
    err = capsys.readouterr().err
    assert "moved step-000003" in err and "moved step-000004" in err
    assert sorted(p.name for p in (redo / "checkpoints" / "superseded").iterdir()) == ["step-000003", "step-000004"]
    assert names(redo) == ["step-000001", "step-000002", "step-000003", "step-000004"]
    again = load_file(redo / "concept.safetensors")["embedding"]
    assert torch.equal(again, first) and torch.equal(again, load_file(full / "concept.safetensors")["embedding"])
    # `--resume latest` is `--resume`; a path to a checkpoint works like its name
    assert train(model_dir, images_dir, redo, "--steps", 5, *keep_all, "--resume", "latest") == 0
    assert names(redo)[-1] == "step-000005"
    assert train(model_dir, images_dir, redo, "--steps", 5, *keep_all,
                 "--resume", redo / "checkpoints" / "step-000005") == 0


@pytest.mark.parametrize("args, message", [
    (("--resume", "step-000009"), "--resume step-000009: not a checkpoint of"),
    (("--checkpoints-total-limit", -1), "--checkpoints-total-limit must be 0"),
])
def test_bad_housekeeping_arguments_are_one_line_errors(model_dir, images_dir, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert train(model_dir, images_dir, out, "--steps", 1, *args) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (out / "concept.safetensors").exists()
