"""Gradient accumulation, learning-rate schedules, validation images and experiment trackers of ``vico train``."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.builders import train_interrupted_then_resumed, vico_train
from vico.methods import get_method
from vico.training import load_trainer_state

pytest.importorskip("tensorboard")

STEPS, EVERY, WARMUP, BATCH, ACCUMULATE = 4, 2, 1, 1, 2


def concept(out) -> dict[str, torch.Tensor]:
    return load_file(out / "concept.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def schedule_args(*extra):
    return ("--steps", STEPS, "--checkpoint-every", EVERY, "--batch-size", BATCH, "--gradient-accumulation-steps",
            ACCUMULATE, "--lr-scheduler", "linear", "--lr-warmup-steps", WARMUP, *extra)


@pytest.fixture(scope="module")
def tracked_run(model_dir, images_dir, tmp_path_factory):
    """A ViCo run with accumulation, a linear schedule with warm-up, validation images and tensorboard."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    assert vico_train(model_dir, images_dir, out, *schedule_args(
        "--validation-prompt", "a photo of S*", "--validation-prompt", "S* on a beach", "--validation-steps", EVERY,
        "--num-validation-images", 2, "--validation-sample-steps", 2, "--report-to", "tensorboard")) == 0
    return out


def test_validation_and_tracking_leave_the_trained_concept_bit_identical_and_resume_is_exact(
        tracked_run, model_dir, images_dir, tmp_path):
    # a run killed after its step-2 checkpoint, resumed without validation or trackers
    split = tmp_path / "split"
    shutil.copytree(tracked_run / "checkpoints" / f"step-{EVERY:06d}", split / "checkpoints" / f"step-{EVERY:06d}")
    shutil.copy(tracked_run / "train_config.json", split / "train_config.json")
    assert vico_train(model_dir, images_dir, split, *schedule_args("--resume")) == 0
    assert max_diff(concept(tracked_run), concept(split)) == 0.0
    state = load_trainer_state(split / "checkpoints" / f"step-{STEPS:06d}" / "trainer.pt")
    assert state["scheduler"]["last_epoch"] == STEPS


def linear_lambda(step: int) -> float:
    """diffusers' linear schedule with warm-up, at ``step`` optimizer steps."""
    if step < WARMUP:
        return step / WARMUP
    return max(0.0, (STEPS - step) / (STEPS - WARMUP))


def test_tensorboard_has_the_loss_parts_each_group_s_scheduled_rate_and_the_grids(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = [p.parent for p in (tracked_run / "logs").rglob("events.out.tfevents.*")]
    events = EventAccumulator(str(logs[0]), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/mse", "train/reg", "lr/embedding", "lr/image", "step_seconds"} <= set(tags["scalars"])
    # the embedding's base rate is scaled by the global batch (batch x processes x accumulation), the image
    # blocks' is not; each step logs the rate the next step uses
    names = get_method("vico").learning_rate_names()
    for group, base in (("embedding", names["embedding"] * BATCH * ACCUMULATE), ("image", names["image"])):
        got = [(e.step, e.value) for e in events.Scalars(f"lr/{group}")]
        want = [(k, base * linear_lambda(k)) for k in range(1, STEPS + 1)]
        assert [s for s, _ in got] == [s for s, _ in want]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6, atol=1e-12)
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert [e.step for e in events.Images("validation")] == [EVERY, STEPS]


def test_validation_grid_has_a_labelled_row_per_prompt_with_each_image_s_map_and_mask(tracked_run):
    from PIL import Image

    from vico.validation import LABEL_HEIGHT

    for step in (EVERY, STEPS):
        folder = tracked_run / "validation" / f"step-{step:06d}"
        assert (folder / "prompts.txt").read_text().splitlines() == ["a photo of S*", "S* on a beach"]
        grid = np.asarray(Image.open(folder / "grid.png"))
        side = 32  # the tiny model's images
        assert grid.shape == (2 * (side + LABEL_HEIGHT), 2 * 3 * side, 3)  # 2 prompts; 2 images x (image, map, mask)
        assert (grid[:LABEL_HEIGHT] < 128).any() and (grid[:LABEL_HEIGHT] == 255).mean() > 0.5  # a caption strip
        mask = grid[LABEL_HEIGHT:LABEL_HEIGHT + side, 2 * side:3 * side]
        assert set(np.unique(mask)) <= {0, 255}  # the Otsu mask, binary


def test_accumulated_batches_train_what_one_batch_of_all_their_rows_trains(model_dir, images_dir, tmp_path):
    accumulated, whole, half = tmp_path / "acc", tmp_path / "whole", tmp_path / "half"
    assert vico_train(model_dir, images_dir, accumulated, "--steps", 2, "--batch-size", 2,
                      "--gradient-accumulation-steps", 2) == 0
    assert vico_train(model_dir, images_dir, whole, "--steps", 2, "--batch-size", 4) == 0
    assert vico_train(model_dir, images_dir, half, "--steps", 2, "--batch-size", 2) == 0
    assert max_diff(concept(accumulated), concept(whole)) < 1e-6
    assert max_diff(concept(accumulated), concept(half)) > 1e-4  # the second batch took part


def test_a_missing_tracker_package_is_one_line_before_training(model_dir, images_dir, tmp_path, capsys, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    assert vico_train(model_dir, images_dir, tmp_path / "o", "--steps", 1, "--report-to", "wandb") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vico: error: --report-to wandb: wandb is not installed (pip install wandb)"]
    assert not (tmp_path / "o").exists()


def test_a_run_interrupted_between_accumulated_batches_resumes_to_the_uninterrupted_result(
        model_dir, images_dir, tmp_path, monkeypatch):
    from vico.methods.vico import ViCo
    from vico.training import TrainConfig, train

    def cfg(out, resume=False):
        return TrainConfig(model=str(model_dir), images=str(images_dir), out=str(out), init_word="cat", steps=3,
                           batch_size=1, gradient_accumulation_steps=2, lr_scheduler="cosine", lr_warmup_steps=1,
                           progress=False, checkpoint_every=100, resume=resume)

    train(cfg(tmp_path / "full"))
    # Ctrl-C in the second accumulated batch of step 2
    assert train_interrupted_then_resumed(monkeypatch, ViCo, cfg, tmp_path / "split", 4) == ["step-000001"]
    assert max_diff(concept(tmp_path / "full"), concept(tmp_path / "split")) == 0.0


def test_a_resumed_run_reads_its_cached_latents_and_encodes_edited_images_again(model_dir, images_dir, tmp_path,
                                                                                 monkeypatch, capsys):
    import vico.training
    from vico.training import LATENTS_FILE

    images = shutil.copytree(images_dir, tmp_path / "images")
    out = tmp_path / "run"
    assert vico_train(model_dir, images, out, "--steps", 1, "--checkpoint-every", 1) == 0
    cached = load_file(out / LATENTS_FILE)
    encode = vico.training._encoded_latents
    monkeypatch.setattr(vico.training, "_encoded_latents", lambda *a: pytest.fail("encoded again"))
    assert vico_train(model_dir, images, out, "--steps", 2, "--checkpoint-every", 1, "--resume") == 0
    monkeypatch.setattr(vico.training, "_encoded_latents", encode)
    first = sorted(images.iterdir())[0]
    first.write_bytes(sorted(images.iterdir())[1].read_bytes())  # the user replaced a photo
    capsys.readouterr()
    assert vico_train(model_dir, images, out, "--steps", 3, "--checkpoint-every", 1, "--resume") == 0
    assert "was encoded from other images, size or VAE than this run's" in capsys.readouterr().err
    again = load_file(out / LATENTS_FILE)
    assert not torch.equal(again["mean"], cached["mean"]) and torch.equal(again["mean"][1], cached["mean"][1])


def test_validation_sample_steps_and_the_logging_folder_are_used(model_dir, images_dir, tmp_path, monkeypatch):
    from vico.pipeline import ViCoPipeline

    calls, real = [], ViCoPipeline.__call__

    def recording(self, prompt, **kwargs):
        calls.append((prompt, kwargs["num_images"], kwargs["num_inference_steps"]))
        return real(self, prompt, **kwargs)

    monkeypatch.setattr(ViCoPipeline, "__call__", recording)
    out, logs = tmp_path / "run", tmp_path / "tb"
    assert vico_train(model_dir, images_dir, out, "--steps", 1, "--validation-prompt", "S* in the snow",
                      "--validation-sample-steps", 3, "--num-validation-images", 1, "--report-to", "tensorboard",
                      "--logging-dir", logs) == 0
    assert calls == [("S* in the snow", 1, 3)]  # at the end of the run: no --validation-steps given
    assert list(logs.rglob("events.out.tfevents.*")) and not (out / "logs").exists()


@pytest.mark.parametrize("method, phrase", [("vico", "S*"), ("attndreambooth", "S* cat"), ("catversion", "cat")])
def test_default_validation_prompts_are_the_first_evaluation_prompts_naming_the_concept(method, phrase):
    from tests import builders as tiny
    from vico.methods.base import MethodConfig
    from vico.metrics import load_eval_prompts
    from vico.model import Components
    from vico.validation import default_prompts

    comps = Components(path="<tiny>", **tiny.make_tiny_components(0))
    made = get_method(method)(comps, MethodConfig(init_word="cat", resolution=32))
    assert default_prompts(made) == [t.format(phrase) for t in load_eval_prompts()[:3]]
