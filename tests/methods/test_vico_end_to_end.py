"""ViCo end to end on the tiny pipeline: train, resume, sample, bad input."""

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from vico import cli  # noqa: E402
from vico.methods.base import MethodConfig  # noqa: E402
from vico.methods.vico import ViCo  # noqa: E402
from vico.model import load_components, token_positions  # noqa: E402


def run(*argv):
    return cli.main([str(a) for a in argv])


def train_args(model_dir, images_dir, out, *extra):
    return ["train", "--model", model_dir, "--images", images_dir, "--out", out, "--init-word", "cat", "--quiet", *extra]


def test_train_then_sample(model_dir, images_dir, tmp_path):
    out = tmp_path / "concept"
    assert run(*train_args(model_dir, images_dir, out, "--steps", 3, "--checkpoint-every", 2)) == 0
    weights = load_file(out / "concept.safetensors")
    assert weights["embedding"].shape == (1, 32)
    assert any(k.startswith("image_attention.") for k in weights)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert set(load_file(out / "learned_embeds.safetensors")) == {"S*"}  # diffusers' textual inversion format
    samples = tmp_path / "samples"
    assert run("sample", "--concept", out, "--prompt", "a photo of S* on the beach", "--out", samples,
               "--num-images", 2, "--steps", 3, "--save-maps", "--quiet") == 0
    names = {p.name for p in samples.iterdir()}
    assert {"000.png", "001.png", "grid.png"} <= names
    assert any("_map_" in n for n in names) and any("_mask_" in n for n in names)


def test_resume_equals_uninterrupted(model_dir, images_dir, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert run(*train_args(model_dir, images_dir, full, "--steps", 10, "--checkpoint-every", 5)) == 0
    assert run(*train_args(model_dir, images_dir, split, "--steps", 5, "--checkpoint-every", 5)) == 0
    assert run(*train_args(model_dir, images_dir, split, "--steps", 5)) == 2  # refuses to overwrite
    assert run(*train_args(model_dir, images_dir, split, "--steps", 10, "--checkpoint-every", 5, "--resume")) == 0
    a, b = load_file(full / "concept.safetensors"), load_file(split / "concept.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    five = load_file(split / "checkpoints" / "step-000005" / "concept.safetensors")
    assert not torch.equal(five["embedding"], a["embedding"])  # training did move the weights


def test_textual_inversion_method(model_dir, images_dir, tmp_path):
    out = tmp_path / "ti"
    assert run(*train_args(model_dir, images_dir, out, "--method", "textual-inversion", "--steps", 2)) == 0
    assert set(load_file(out / "concept.safetensors")) == {"embedding"}
    assert json.loads((out / "concept.json").read_text())["method"] == "textual-inversion"
    assert run("sample", "--concept", out, "--prompt", "a photo of S*", "--out", tmp_path / "s", "--num-images", 1,
               "--steps", 2, "--quiet") == 0


def test_vico_loss_regulariser_and_gradients(model_dir):
    comps = load_components(model_dir)
    comps.unet.double(), comps.text_encoder.double()
    method = ViCo(comps, MethodConfig(init_word="cat", resolution=32))
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 16, 16, generator=g, dtype=torch.float64)
    batch = method.make_batch(mean, torch.zeros_like(mean), g, batch_size=2)
    assert batch.reference.shape == batch.latents.shape
    for i in range(2):  # the reference is another image than the target
        assert not torch.equal(batch.reference[i], batch.latents[i])
    loss, logs = method.training_loss(batch)
    assert logs["reg"] > 0 and logs["loss"] == pytest.approx(logs["mse"] + 5e-4 * logs["reg"])
    loss.backward()
    assert method.embedding.learned.grad.abs().sum() > 0
    assert all(p.grad is not None for p in method.blocks.parameters() if p.dim() > 1)
    assert all(p.grad is None for p in comps.unet.parameters() if not p.requires_grad)


def test_eot_is_first_eos_and_request_layout(model_dir):
    comps = load_components(model_dir)
    method = ViCo(comps, MethodConfig(init_word="cat", resolution=32))
    ids = comps.tokenizer(["a photo of S*", "a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    s_pos, eot = token_positions(ids, method.token_id, comps.tokenizer.eos_token_id)
    assert s_pos.tolist() == [4, -1] and eot.tolist() == [5, 3]
    assert method.token_id > comps.tokenizer.eos_token_id  # why "largest id" would be wrong
    req = method.map_request(ids, copies=2)
    # noisy half: no maps; reference halves: (S* or EOT, EOT), the same for both CFG branches
    assert req.token_index.tolist() == [[-1, -1]] * 4 + [[4, 5], [3, 3]] * 2
    assert req.otsu and set(req.layers) == {"up_blocks.1.attentions.1.transformer_blocks.0.attn2"}


@pytest.mark.parametrize("case", ["empty", "unreadable", "token", "no_unet"])
def test_bad_input_exits_with_one_line(case, model_dir, images_dir, tmp_path, capsys):
    images, model, extra = images_dir, model_dir, []
    if case == "empty":
        images = tmp_path / "empty"
        images.mkdir()
    elif case == "unreadable":
        images = tmp_path / "bad"
        images.mkdir()
        (images / "x.png").write_bytes(b"not a png")
    elif case == "token":
        extra = ["--token", "cat"]
    else:
        model = tmp_path / "nomodel"
        model.mkdir()
    assert run(*train_args(model, images, tmp_path / "out", "--steps", 1, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vico: error: ")
    assert {"empty": "has no images", "unreadable": "cannot read image", "token": "already in the vocabulary",
            "no_unet": "no unet/ folder"}[case] in err[0]


def test_sample_rejects_a_folder_that_is_not_a_concept(tmp_path, capsys):
    assert run("sample", "--concept", tmp_path, "--prompt", "x", "--out", tmp_path / "o") == 2
    assert "is not a trained concept" in capsys.readouterr().err


def test_demo_on_a_given_model_runs_end_to_end(model_dir, images_dir, tmp_path, capsys):
    assert run("demo", "--out", tmp_path / "demo", "--model", model_dir, "--images", images_dir, "--steps", 2,
               "--sample-steps", 2, "--num-images", 1, "--quiet") == 0
    out = capsys.readouterr().out
    assert "training steps in" in out
    assert (tmp_path / "demo" / "concept" / "concept.safetensors").is_file()
    assert (tmp_path / "demo" / "samples" / "grid.png").is_file()


def test_default_demo_uses_the_shipped_toy_model(tmp_path, capsys):
    from vico.toyworld import demo

    assert demo.shipped_model() is not None, "the trained toy model ships with the package"
    assert run("demo", "--out", tmp_path / "demo", "--steps", 3, "--sample-steps", 2, "--quiet") == 0
    printed = capsys.readouterr().out
    assert "red checkered square" in printed and "textual-inversion" in printed and "S* mask IoU" in printed
    assert (tmp_path / "demo" / "grid.png").is_file() and (tmp_path / "demo" / "metrics.json").is_file()


def test_cli_help_explains_each_command(capsys):
    for cmd in ("train", "sample", "demo", "export"):
        with pytest.raises(SystemExit) as exc:
            run(cmd, "--help")
        assert exc.value.code == 0
        assert "--out" in capsys.readouterr().out


def test_v_prediction_target(model_dir):
    from diffusers import DDIMScheduler

    from vico.methods.base import draw_noise, noise_and_target

    sched = DDIMScheduler(prediction_type="v_prediction")
    latents = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    noise, t = draw_noise(sched, latents.shape, g1)
    noise2 = torch.randn(latents.shape, generator=g2, dtype=torch.float32)
    t2 = torch.randint(0, 1000, (2,), generator=g2)
    assert torch.equal(t, t2) and torch.equal(noise, noise2) and noise.dtype == torch.float32
    noisy, t_out, target = noise_and_target(sched, latents, noise, t)
    assert target.dtype == torch.float64 and torch.equal(t_out, t)
    torch.testing.assert_close(target, sched.get_velocity(latents, noise.double(), t))
    torch.testing.assert_close(noisy, sched.add_noise(latents, noise.double(), t))
    with pytest.raises(ValueError, match="unsupported prediction_type"):
        noise_and_target(DDIMScheduler(prediction_type="sample"), latents, noise, t)


def test_gradient_checkpointing_gives_the_same_step(model_dir, images_dir, tmp_path):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    assert run(*train_args(model_dir, images_dir, plain, "--steps", 2)) == 0
    assert run(*train_args(model_dir, images_dir, ckpt, "--steps", 2, "--gradient-checkpointing")) == 0
    a, b = load_file(plain / "concept.safetensors"), load_file(ckpt / "concept.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_bench_prints_json_rows(capsys):
    assert run("bench", "--size", "tiny", "--repeat", "1", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["op"] for r in rows] == ["cross_attention_with_maps", "masked_attention", "otsu_mask"]
    for r in rows:
        assert r["fused_ms"] > 0 and r["speedup_vs_paper"] > 0 and r["gbps"] > 0
    assert "ratio_to_sdpa" in rows[0] and "speedup_vs_torch" in rows[2]
