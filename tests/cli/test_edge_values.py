"""Edge values of the CLI's options give one-line errors before any model loads (or a correct result), never a
traceback, a silently changed size or a run that writes nothing."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from PIL import Image  # noqa: E402

from tests.builders import error_line, signal_handlers_kept, vico as run, vico_train  # noqa: E402
from vico.model import UserError  # noqa: E402


def train(model_dir, images_dir, out, *extra):
    return vico_train(model_dir, images_dir, out, "--steps", 1, *extra)


@pytest.fixture(scope="module")
def concept(model_dir, images_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("edges") / "c"
    with signal_handlers_kept():
        assert train(model_dir, images_dir, out, "--method", "textual-inversion") == 0
    return out


@pytest.mark.parametrize("extra, message", [
    (("--seed", -1), "--seed -1: a seed must be a whole number in 0..4294967295"),
    (("--seed", 2**32), f"--seed {2**32}: a seed must be a whole number in 0..4294967295"),
    (("--token", ""), "--token '': a placeholder token must be a non-empty string without spaces"),
    (("--token", "my thing"), "--token 'my thing': a placeholder token must be a non-empty string without spaces"),
    (("--resolution", 2), "--resolution 2: "),  # below the tiny UNet's minimum (4)
    (("--resolution", 33), "--resolution 33: "),  # not a multiple of the tiny VAE's factor 2
    (("--layers", "up_blocks.9.attentions.0"), "--layers up_blocks.9.attentions.0: no spatial transformer of that "
                                              "name"),
    (("--layers", "up_blocks.1.attentions.0", "--method", "textual-inversion"),
     "--layers is not an option of --method textual-inversion (its options: none)"),
    (("--fast",), "--fast is not an option of --method vico (its options: --layers, --reg-weight)"),
    (("--reg-weight", -1), "--reg-weight -1.0: a weight must be 0 or more"),
    (("--method", "attndreambooth", "--rotate-p", 2), "--rotate-p 2.0: a probability must be in [0, 1]"),
    (("--gradient-accumulation-steps", 0), "--gradient-accumulation-steps must be 1 or more, got 0"),
    (("--lr-warmup-steps", 2), "--lr-warmup-steps 2: the constant schedule has no warm-up"),
    (("--lr-scheduler", "linear", "--lr-warmup-steps", -1), "--lr-warmup-steps must be 0 or more, got -1"),
    (("--validation-prompt", " "), "--validation-prompt: a prompt must not be empty"),
    (("--validation-steps", 0), "--validation-steps must be 1 or more, got 0"),
    (("--validation-prompt", "a S*", "--num-validation-images", 0), "--num-validation-images must be 1 or more"),
    (("--method", "catversion", "--prefix-layers", "text_model.encoder.layers.99.self_attn"),
     "--prefix-layers text_model.encoder.layers.99.self_attn: no attention module of that name in the text encoder"),
])
def test_train_edges_are_one_line_before_loading(model_dir, images_dir, tmp_path, capsys, monkeypatch, extra,
                                                 message):
    import vico.training

    monkeypatch.setattr(vico.training, "load_components", lambda *a, **k: pytest.fail("the model loaded"))
    assert train(model_dir, images_dir, tmp_path / "o", *extra) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_image_size_rule_reads_the_configs(model_dir):
    from vico.model import check_image_size, image_size_rule

    assert image_size_rule(model_dir) == (2, 4)
    check_image_size(32, model_dir, "--resolution")
    with pytest.raises(UserError, match=r"--height 31: .* needs a multiple of 2 pixels, at least 4 \(e.g. 32\)"):
        check_image_size(31, model_dir, "--height")


@pytest.mark.parametrize("extra, message", [
    (("--seed", 2**32), "a seed must be a whole number"),
    (("--steps", 5000), "--steps 5000: "),  # beyond the scheduler's 1000 timesteps
])
def test_sample_edges_are_one_line(concept, tmp_path, capsys, extra, message):
    assert run("sample", "--concept", concept, "--prompt", "a photo of S*", "--out", tmp_path / "o", "--quiet",
               "--num-images", 1, *extra) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(concept, tmp_path, capsys):
    assert run("sample", "--concept", concept, "--prompt", "a photo of S*", "--out", tmp_path / "o",
               "--device", "cuda") == 2
    assert "--device cuda: this torch sees no CUDA device" in error_line(capsys)
    assert run("sample", "--concept", concept, "--prompt", "a photo of S*", "--out", tmp_path / "o",
               "--device", "gpu0") == 2
    assert "--device 'gpu0' is not a device" in error_line(capsys)


def test_a_placeholder_past_the_token_limit_is_an_error(concept, tmp_path, capsys):
    prompt = "a photo of the cat " * 20 + "S*"  # 100 words: S* falls after the 77-token limit
    assert run("sample", "--concept", concept, "--prompt", prompt, "--out", tmp_path / "o", "--quiet",
               "--num-images", 1, "--steps", 1, "--save-maps") == 2
    assert "--prompt: 'S*' comes after the text encoder's 77-token limit" in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_maps_timesteps_outside_the_schedule_are_refused(model_dir, tmp_path, capsys):
    base = ("maps", "--model", model_dir, "--prompt", "a photo of a cat", "--words", "cat", "--steps", 2)
    assert run(*base, "--out", tmp_path / "a", "--timesteps", 2000, 3000) == 2
    assert "--timesteps 2000 3000: give LOW <= HIGH overlapping the schedule's 0..1000" in error_line(capsys)
    assert run(*base, "--out", tmp_path / "b", "--timesteps", 10, 20) == 2  # between the 2 steps' timesteps
    assert "--timesteps 10 20: none of the 2 sampling timesteps" in error_line(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert run(*base, "--out", tmp_path / "c", "--height", 24) == 2  # diffusers would ignore it: 32 x 32
    assert "--height and --width go together" in error_line(capsys)
    assert run(*base, "--out", tmp_path / "c", "--height", 31, "--width", 32) == 2
    assert "--height 31: " in error_line(capsys)
    assert run(*base, "--out", tmp_path / "c", "--height", 24, "--width", 32) == 0
    assert Image.open(tmp_path / "c" / "image.png").size == (32, 24)


def test_fewer_real_masks_than_images_is_one_line(images_dir, tmp_path):
    from vico.evaluation import real_masks

    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(2):  # three images
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / f"{i}.png")
    with pytest.raises(UserError, match=rf"--real-masks {masks} has 2 PNG masks for 3 real images"):
        real_masks(str(masks), {}, None, str(images_dir), "cpu")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / "2.png")
    found, _ = real_masks(str(masks), {}, None, str(images_dir), "cpu")
    assert len(found) == 3
