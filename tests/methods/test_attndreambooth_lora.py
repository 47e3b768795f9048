"""AttnDreamBooth with --unet-lora-rank: what each stage trains, what the concept holds, that plain diffusers
samples it as this project does, and exact resume."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests import builders as tiny
from tests.builders import train_interrupted_then_resumed
from tests.methods.test_method_interface import changed, components, run_steps, snapshot
from vico.methods.attndreambooth import LORA_FILE, AttnDreamBooth, AttnDreamBoothOptions
from vico.methods.base import WEIGHTS_FILE, MethodConfig
from vico.model import encode_prompts
from vico.pipeline import ViCoPipeline
from vico.training import TrainConfig, train

RANK = 2
PROMPT = "a photo of a S* cat"


def lora_config(model_dir, images_dir, out, resume=False) -> TrainConfig:
    # high UNet rates: two steps must move the adapter well past the comparisons' tolerances
    return TrainConfig(model=str(model_dir), images=str(images_dir), out=str(out), method="attndreambooth",
                       init_word="cat", steps=2, batch_size=1, progress=False, checkpoint_every=100, resume=resume,
                       options={"unet_lora_rank": RANK}, learning_rates={"cross-attention": 1e-2, "unet": 1e-2})


@pytest.fixture(scope="module")
def concept(model_dir, images_dir, tmp_path_factory):
    """A LoRA concept trained 2 steps a stage (the uninterrupted run of the resume test)."""
    out = tmp_path_factory.mktemp("adb-lora") / "concept"
    train(lora_config(model_dir, images_dir, out))
    return out


def test_stage_2_trains_the_attn2_adapter_and_stage_3_every_adapter():
    c = components()
    method = AttnDreamBooth(c, MethodConfig(init_word="cat", resolution=32,
                                            options=AttnDreamBoothOptions(unet_lora_rank=RANK)))
    unet_names = {f"unet.{n}" for n, _ in c.unet.named_parameters()}
    attn1_lora = {n for n in unet_names if ".attn1." in n and ".lora_" in n}
    attn2_lora = {n for n in unet_names if ".attn2." in n and ".lora_" in n}
    assert attn1_lora and attn2_lora
    assert {n.rsplit(".", 4)[-4] for n in attn1_lora | attn2_lora} == {"to_q", "to_k", "to_v", "0"}

    before = snapshot(c)
    run_steps(method, steps=2, stage=1)
    assert changed(before, snapshot(c)) == attn2_lora  # base weights bit for bit, attn1's adapter, the encoder
    before = snapshot(c)
    run_steps(method, steps=2, stage=2)
    assert changed(before, snapshot(c)) == attn1_lora | attn2_lora
    assert [g["lr"] for s in range(3) for g in method.param_groups(stage=s)] == [1e-3, 2e-5, 2e-6]


def test_the_concept_holds_the_embedding_and_the_adapter_only(concept):
    with safe_open(str(concept / WEIGHTS_FILE), "pt") as handle:
        names = set(handle.keys())
    unet = components().unet
    base = sum(p.numel() * p.element_size() for p in unet.parameters())
    assert "embedding" in names and all(".lora_" in n for n in names - {"embedding"})
    assert len(names) == 1 + 2 * 4 * 2 * sum(1 for n, _ in unet.named_modules() if n.endswith(".attn2"))
    assert (concept / WEIGHTS_FILE).stat().st_size < base / 10  # the full variant holds all of `base`
    assert set(load_file(concept / LORA_FILE)) == {  # diffusers' names, one down/up pair per projection
        n.replace(".lora_A.default.", ".lora.down.").replace(".lora_B.default.", ".lora.up.")
        for n in names - {"embedding"}}


def test_plain_diffusers_loads_the_concept_and_predicts_as_this_project(concept, model_dir):
    from diffusers import StableDiffusionPipeline

    ours = ViCoPipeline.from_pretrained(model_dir, concept)
    plain = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    untouched = plain.unet
    g = torch.Generator().manual_seed(5)
    latents, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([50, 800])
    c = ours.method.components
    text = encode_prompts(c, [PROMPT] * 2).text
    with torch.no_grad():
        before = untouched(latents, t, text).sample
        plain.load_lora_weights(str(concept))
        plain.load_textual_inversion(str(concept / "learned_embeds.safetensors"))
        plain_text = plain.encode_prompt(PROMPT, "cpu", 2, do_classifier_free_guidance=False)[0]
        want = c.unet(latents, t, text).sample
        got = plain.unet(latents, t, plain_text).sample
    torch.testing.assert_close(plain_text, text, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got - before).abs().max() > 1e-3  # the adapter was loaded, and it matters


def test_sampling_rebuilds_the_adapter_from_the_concept(concept, model_dir):
    first, _ = ViCoPipeline.from_pretrained(model_dir, concept)(PROMPT, num_inference_steps=3, seed=7, progress=False)
    pipe = ViCoPipeline.from_pretrained(model_dir, concept)
    again, _ = pipe(PROMPT, num_inference_steps=3, seed=7, progress=False)
    assert (first == again).all()
    zeroed = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in pipe.method.state_dict().items()}
    pipe.method.load_state_dict(zeroed)  # the adapter off: the base UNet
    other, _ = pipe(PROMPT, num_inference_steps=3, seed=7, progress=False)
    assert not (other == first).all()


def test_an_interrupted_lora_run_resumes_to_the_same_result(concept, model_dir, images_dir, tmp_path, monkeypatch):
    def config(out, resume=False):
        return lora_config(model_dir, images_dir, out, resume)

    # Ctrl-C inside the second step of stage 3 (the whole UNet's adapter)
    assert train_interrupted_then_resumed(monkeypatch, AttnDreamBooth, config, tmp_path / "split", 6) == [
        "step-000005"]
    for name in (WEIGHTS_FILE, LORA_FILE):
        a, b = load_file(concept / name), load_file(tmp_path / "split" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_negative_rank_is_one_line_before_the_model_loads(tmp_path, images_dir, capsys):
    assert tiny.vico_train(tmp_path / "no-model", images_dir, tmp_path / "out", "--method", "attndreambooth",
                           "--unet-lora-rank", "-1") != 0
    err = capsys.readouterr().err.strip()
    assert err.endswith("--unet-lora-rank -1: a rank must be 0 (full fine-tuning) or more") and "\n" not in err
