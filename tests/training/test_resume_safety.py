"""Resume never runs code from a run folder, and a finished or empty run resumes cleanly."""

import os
import pickle

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from vico import cli  # noqa: E402
from vico.model import UserError  # noqa: E402
from vico.training import load_trainer_state  # noqa: E402


class _Exploit:
    """A pickle that runs a command when unpickled (what a crafted trainer.pt carries)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def train(model_dir, images_dir, out, *extra):
    return cli.main([str(a) for a in ["train", "--model", model_dir, "--images", images_dir, "--out", out,
                                      "--init-word", "cat", "--quiet", *extra]])


def test_crafted_trainer_state_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "trainer.pt"
    with open(path, "wb") as f:
        pickle.dump({"optimizer": _Exploit(marker), "generator": torch.zeros(1), "step": 1}, f, protocol=2)
    with pytest.raises(UserError, match="refusing to load checkpoint file .*trainer.pt"):
        load_trainer_state(path)
    assert not marker.exists()


def test_resume_with_crafted_checkpoint_exits_with_one_line(model_dir, images_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(model_dir, images_dir, out, "--steps", 2, "--checkpoint-every", 1) == 0
    marker = tmp_path / "pwned"
    newest = sorted((out / "checkpoints").iterdir())[-1]
    with open(newest / "trainer.pt", "wb") as f:
        pickle.dump({"optimizer": _Exploit(marker), "generator": torch.zeros(1), "step": 2}, f, protocol=2)
    assert train(model_dir, images_dir, out, "--steps", 4, "--resume") == 2
    assert not marker.exists()
    assert "refusing to load checkpoint file" in capsys.readouterr().err


def test_resume_of_finished_run_says_so_and_exits_0(model_dir, images_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(model_dir, images_dir, out, "--steps", 2, "--checkpoint-every", 1) == 0
    before = (out / "concept.safetensors").read_bytes()
    capsys.readouterr()
    assert train(model_dir, images_dir, out, "--steps", 2, "--resume") == 0
    captured = capsys.readouterr()
    assert "already finished" in captured.out + captured.err
    assert (out / "concept.safetensors").read_bytes() == before
    # killed after the last checkpoint, before the final save: resume writes the concept
    (out / "concept.safetensors").unlink()
    assert train(model_dir, images_dir, out, "--steps", 2, "--resume") == 0
    assert (out / "concept.safetensors").read_bytes() == before


def test_resume_with_nothing_to_resume_starts_fresh(model_dir, images_dir, tmp_path, capsys):
    out = tmp_path / "new"
    assert train(model_dir, images_dir, out, "--steps", 1, "--resume") == 0
    captured = capsys.readouterr()
    assert "nothing to resume" in captured.out + captured.err
    assert (out / "concept.safetensors").is_file()
