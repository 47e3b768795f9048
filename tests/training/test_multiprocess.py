"""Training on several processes: two CPU processes over gloo (torchrun + accelerate's MULTI_CPU).

The trainer draws the global batch from one stream on every process and each
process trains on its rows (docs/methods.md §7), so two processes x batch 1
must train exactly what one process x batch 2 trains.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from vico import cli  # noqa: E402
from vico.methods.attndreambooth import AttnDreamBooth  # noqa: E402
from vico.methods.base import MethodConfig  # noqa: E402
from vico.methods.vico import ViCo  # noqa: E402
from vico.model import load_components  # noqa: E402
from vico.training import load_trainer_state  # noqa: E402


def train_args(model_dir, images_dir, out, *extra):
    return [str(a) for a in ["train", "--model", model_dir, "--images", images_dir, "--out", out,
                             "--init-word", "cat", "--quiet", *extra]]


def launch_two(args, tmp_path):
    """``torchrun --nproc_per_node 2 -m vico.cli ARGS`` on CPU; returns the completed process."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vico.cli", *args]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def concept(folder):
    return load_file(folder / "concept.safetensors")


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# --- the shards of one global draw ---------------------------------------------------------------

@pytest.mark.parametrize("method_cls", [ViCo, AttnDreamBooth])
def test_the_shards_of_a_global_batch_are_its_rows(model_dir, method_cls):
    method = method_cls(load_components(model_dir), MethodConfig(init_word="cat", resolution=32))
    mean = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    std = torch.full_like(mean, 0.1)

    def draw(rows=None):
        return method.make_batch(mean, std, torch.Generator().manual_seed(7), 4, rows=rows)

    whole, shards = draw(), [draw(slice(0, 2)), draw(slice(2, 4))]
    assert [len(s.prompts) for s in shards] == [2, 2]
    assert sum((s.prompts for s in shards), []) == whole.prompts
    for field in ("latents", "noise", "timesteps", "reference"):
        parts = [getattr(s, field) for s in shards]
        if getattr(whole, field) is None:
            assert all(p is None for p in parts)
            continue
        torch.testing.assert_close(torch.cat(parts), getattr(whole, field), rtol=1e-5, atol=1e-5)
    assert not torch.equal(shards[0].noise, shards[1].noise)  # the processes see different samples


# --- two processes ---------------------------------------------------------------------------------

def test_two_processes_train_what_one_process_trains_on_the_global_batch(model_dir, images_dir, tmp_path):
    """2 processes x batch 1 x 2 accumulated batches == 1 process x batch 4 (lr scaled by the same global
    batch); != 1 process x batch 1, so the other samples counted."""
    two, one, single = tmp_path / "two", tmp_path / "one", tmp_path / "single"
    launch_two(train_args(model_dir, images_dir, two, "--steps", 3, "--batch-size", 1,
                          "--gradient-accumulation-steps", 2), tmp_path)
    assert cli.main(train_args(model_dir, images_dir, one, "--steps", 3, "--batch-size", 4)) == 0
    assert cli.main(train_args(model_dir, images_dir, single, "--steps", 3, "--batch-size", 1)) == 0
    a, b, c = concept(two), concept(one), concept(single)
    assert max_diff(a, b) < 1e-6
    assert max_diff(a, c) > 1e-4
    state = load_trainer_state(two / "checkpoints" / "step-000003" / "trainer.pt")
    assert state["world_size"] == 2 and state["step"] == 3


def test_two_process_resume_equals_an_uninterrupted_two_process_run(model_dir, images_dir, tmp_path, capsys):
    full, split = tmp_path / "full", tmp_path / "split"
    launch_two(train_args(model_dir, images_dir, full, "--steps", 4, "--checkpoint-every", 2), tmp_path)
    # the state a run killed after its step-2 checkpoint leaves: that checkpoint only
    shutil.copytree(full / "checkpoints" / "step-000002", split / "checkpoints" / "step-000002")
    done = launch_two(train_args(model_dir, images_dir, split, "--steps", 4, "--checkpoint-every", 2, "--resume"),
                      tmp_path)
    assert "resuming from" in done.stdout + done.stderr
    assert max_diff(concept(full), concept(split)) == 0.0
    # on one process the global batch halves: said in one line, and the run still finishes
    other = tmp_path / "other"
    shutil.copytree(full / "checkpoints" / "step-000002", other / "checkpoints" / "step-000002")
    assert cli.main(train_args(model_dir, images_dir, other, "--steps", 4, "--resume")) == 0
    assert "was written by a run on 2 process(es), this one has 1" in capsys.readouterr().err
    assert max_diff(concept(full), concept(other)) > 0


def test_attndreambooth_runs_its_three_stages_on_two_processes(model_dir, images_dir, tmp_path):
    out, single = tmp_path / "two", tmp_path / "single"
    args = ("--method", "attndreambooth", "--steps", 1, "--batch-size", 1)
    launch_two(train_args(model_dir, images_dir, out, *args), tmp_path)
    assert cli.main(train_args(model_dir, images_dir, single, *args)) == 0
    state = load_trainer_state(out / "checkpoints" / "step-000003" / "trainer.pt")
    assert state["world_size"] == 2 and state["stage"] == 2
    base = load_components(model_dir).unet.state_dict()
    two = concept(out)
    moved = [k for k in base if not torch.equal(two[f"unet.{k}"], base[k])]
    # stage 2 trained the attn2 layers, stage 3 everything: weights outside attn2 moved too
    assert any(".attn2." in k for k in moved) and any(".attn2." not in k for k in moved)
    assert max_diff(two, concept(single)) > 0  # the second process's samples took part
