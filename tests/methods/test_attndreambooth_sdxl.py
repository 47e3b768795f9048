"""AttnDreamBooth on SDXL: [V] learned in both text encoders, what each stage trains on SDXL's UNet, the
regulariser's maps from every attn2 (the depth-2 transformer's blocks included), the added conditions in the
augmented training path, the three stages and sampling through the CLI, export, the LoRA variant loaded by
plain diffusers, and exact resume. All on the session's tiny SDXL pipeline."""

import pytest
import torch

pytest.importorskip("diffusers")

from safetensors.torch import load_file  # noqa: E402

from tests import builders as tiny  # noqa: E402
from tests.builders import train_interrupted_then_resumed, vico as run, vico_train  # noqa: E402
from tests.methods.test_method_interface import changed, run_steps  # noqa: E402
from tests.methods.test_sdxl import diffusers_pipe, record_unet_calls  # noqa: E402
from vico.methods.attndreambooth import LORA_FILE, AttnDreamBooth, AttnDreamBoothOptions  # noqa: E402
from vico.methods.base import WEIGHTS_FILE, MethodConfig  # noqa: E402
from vico.model import UserError, load_components  # noqa: E402
from vico.pipeline import ViCoPipeline  # noqa: E402
from vico.training import TrainConfig, train  # noqa: E402

SIZE = tiny.IMAGE_SIZE
PROMPT = "a photo of a S* cat"


def adb(path, **options) -> AttnDreamBooth:
    return AttnDreamBooth(load_components(path), MethodConfig(init_word="cat", resolution=SIZE,
                                                              options=AttnDreamBoothOptions(**options)))


def snapshot(method) -> dict[str, torch.Tensor]:
    """The UNet's and both text encoders' tensors (the learned rows included), cloned."""
    c = method.components
    parts = {"unet": c.unet, "text": c.text_encoder, "text_2": c.text_encoder_2}
    return {f"{p}.{k}": v.clone() for p, m in parts.items() for k, v in m.state_dict().items()}


def test_each_stage_trains_its_part_of_the_sdxl_unet_and_both_embeddings(sdxl_model_dir):
    method = adb(sdxl_model_dir)
    unet = method.components.unet
    attn2 = [n for n, m in unet.named_modules() if n.endswith(".attn2")]
    assert method.layers == attn2 and any(".transformer_blocks.1.attn2" in n for n in attn2)  # depth 2
    attn2_params = {f"unet.{n}" for n, _ in unet.named_parameters() if n.startswith(tuple(f"{a}." for a in attn2))}
    rows = {"text.embeddings.token_embedding.learned", "text_2.text_model.embeddings.token_embedding.learned"}
    before = snapshot(method)
    run_steps(method, steps=1, stage=0)
    assert changed(before, snapshot(method)) == rows  # [V] in both encoders, nothing else
    before = snapshot(method)
    run_steps(method, steps=1, stage=1)
    assert changed(before, snapshot(method)) == attn2_params  # every other UNet tensor bit for bit
    before = snapshot(method)
    run_steps(method, steps=1, stage=2)
    moved = changed(before, snapshot(method))
    assert moved <= {k for k in before if k.startswith("unet.")} and moved - attn2_params
    assert {"unet.conv_in.weight", "unet.add_embedding.linear_1.weight"} <= moved  # the added conditions' MLP too


def test_the_regulariser_reads_every_attn2_and_the_unet_gets_the_added_conditions(sdxl_model_dir):
    method = adb(sdxl_model_dir)
    c = method.components
    requests = []
    real_request = method.map_request
    method.map_request = lambda ids: requests.append(real_request(ids)) or requests[-1]
    calls = record_unet_calls(c.unet)
    encodes = []
    c.vae.encoder.register_forward_hook(lambda m, args, out: encodes.append(args[0].shape))
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, SIZE // 2, SIZE // 2, generator=g)
    for _ in range(2):
        batch = method.make_batch(mean, torch.zeros_like(mean), g, batch_size=2)
        loss, logs = method.training_loss(batch)
    assert encodes == [(2, 3, SIZE, SIZE)] * 2  # each step's augmented pixels through the VAE
    cond = method.encode(batch.prompts)
    for key, want in (("text", cond.text), ("pooled", cond.pooled), ("time_ids", cond.time_ids)):
        assert torch.equal(calls[-1][key], want), key
    assert cond.time_ids[0].tolist() == [SIZE, SIZE, 0, 0, SIZE, SIZE]
    maps = requests[-1].maps
    n_attn2 = sum(1 for n, _ in c.unet.named_modules() if n.endswith(".attn2"))
    assert set(maps) == set(method.layers) and len(maps) == n_attn2 == 8  # maps in call order
    for name, m in maps.items():
        heads = c.unet.get_submodule(name).heads
        assert m.shape[:3] == (2, heads, 2) and m.shape[3] in (8 * 8, 4 * 4), name  # [B, H, ([V], cat), N]
    # [V] and "cat" sit at positions 5 and 6 of "<bos> a photo of a S* cat" in both tokenizers' ids
    for tok in (c.tokenizer, c.tokenizer_2):
        ids = tok(PROMPT).input_ids
        assert ids.index(tok.convert_tokens_to_ids("S*")) == 5 and ids.index(tok.convert_tokens_to_ids("cat")) == 6
    assert logs["reg"] > 0 and torch.isfinite(loss)


def test_tokenizers_that_place_the_concept_differently_are_one_line(sdxl_model_dir):
    c = load_components(sdxl_model_dir)
    c.tokenizer_2 = tiny.t5_like_tokenizer()  # no BOS: every word one position earlier
    c.text_encoder_2.resize_token_embeddings(len(c.tokenizer_2))
    with pytest.raises(UserError, match=r"--init-word cat: the tokenizers put \('S\*', 'cat'\) at different"):
        AttnDreamBooth(c, MethodConfig(init_word="cat", resolution=SIZE))


def test_three_stages_train_sample_and_export_through_the_cli(sdxl_model_dir, images_dir, tmp_path, monkeypatch):
    concept = tmp_path / "adb"
    assert vico_train(sdxl_model_dir, images_dir, concept, "--method", "attndreambooth", "--steps", 1,
                      "--batch-size", 1) == 0
    assert [p.name for p in (concept / "checkpoints").iterdir()] == ["step-000003"]  # 3 stages x 1 step
    weights = load_file(concept / WEIGHTS_FILE)
    d1, d2 = tiny.SDXL_TEXT_DIMS
    assert weights["embedding"].shape == (1, d1) and weights["embedding_2"].shape == (1, d2)
    unet = load_components(sdxl_model_dir).unet.state_dict()
    assert {k for k in weights if k.startswith("unet.")} == {f"unet.{k}" for k in unet}
    assert not torch.equal(weights["unet.conv_in.weight"], unet["conv_in.weight"])  # stage 3 ran
    from diffusers import DPMSolverMultistepScheduler

    steps, real_step = [], DPMSolverMultistepScheduler.step
    monkeypatch.setattr(DPMSolverMultistepScheduler, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    out = tmp_path / "samples"
    assert run("sample", "--concept", concept, "--prompt", f"{PROMPT} on the beach", "--out", out,
               "--num-images", 1, "--steps", 2, "--quiet") == 0
    assert (out / "000.png").is_file() and len(steps) == 2  # sampled with DPM-Solver
    assert run("export", "--concept", concept, "--format", "a1111", "--out", tmp_path / "v.safetensors") == 0
    data = load_file(tmp_path / "v.safetensors")
    assert torch.equal(data["clip_l"], weights["embedding"]) and torch.equal(data["clip_g"], weights["embedding_2"])


# --- the LoRA variant (--unet-lora-rank) ----------------------------------------------------------------------------

def lora_config(model_dir, images_dir, out, resume=False) -> TrainConfig:
    # high UNet rates: two steps must move the adapter well past the comparison's tolerance
    return TrainConfig(model=str(model_dir), images=str(images_dir), out=str(out), method="attndreambooth",
                       init_word="cat", steps=2, batch_size=1, progress=False, checkpoint_every=100, resume=resume,
                       options={"unet_lora_rank": 2}, learning_rates={"cross-attention": 1e-2, "unet": 1e-2})


@pytest.fixture(scope="module")
def lora_concept(sdxl_model_dir, images_dir, tmp_path_factory):
    """A rank-2 LoRA concept trained 2 steps a stage (the uninterrupted run of the resume test)."""
    out = tmp_path_factory.mktemp("adb-sdxl-lora") / "concept"
    train(lora_config(sdxl_model_dir, images_dir, out))
    return out


def test_plain_diffusers_sdxl_loads_the_lora_concept_and_predicts_as_this_project(lora_concept, sdxl_model_dir):
    ours = ViCoPipeline.from_pretrained(sdxl_model_dir, lora_concept)
    plain = diffusers_pipe(sdxl_model_dir)
    g = torch.Generator().manual_seed(5)
    latents, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([50, 800])
    cond = ours.method.encode([PROMPT]).repeat(2)  # encoded once, as diffusers does
    state = load_file(lora_concept / "learned_embeds.safetensors")
    weights = load_file(lora_concept / WEIGHTS_FILE)
    assert torch.equal(state["clip_l"], weights["embedding"]) and torch.equal(state["clip_g"], weights["embedding_2"])
    with torch.no_grad():
        before = plain.unet(latents, t, **cond.unet_kwargs()).sample
        plain.load_lora_weights(str(lora_concept))
        plain.load_textual_inversion(state["clip_l"], token="S*", text_encoder=plain.text_encoder,
                                     tokenizer=plain.tokenizer)
        plain.load_textual_inversion(state["clip_g"], token="S*", text_encoder=plain.text_encoder_2,
                                     tokenizer=plain.tokenizer_2)
        text, _, pooled, _ = plain.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=2,
                                                 do_classifier_free_guidance=False)
        added = {"text_embeds": pooled, "time_ids": cond.time_ids}
        want = ours.method.components.unet(latents, t, **cond.unet_kwargs()).sample
        got = plain.unet(latents, t, text, added_cond_kwargs=added).sample
    assert torch.equal(text, cond.text) and torch.equal(pooled, cond.pooled)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got - before).abs().max() > 1e-3  # the adapter was loaded, and it matters
    assert set(load_file(lora_concept / LORA_FILE)) == {  # diffusers' names, one down/up pair per projection
        n.replace(".lora_A.default.", ".lora.down.").replace(".lora_B.default.", ".lora.up.")
        for n in weights if ".lora_" in n}


def test_an_interrupted_sdxl_run_resumes_bit_identically(lora_concept, sdxl_model_dir, images_dir, tmp_path,
                                                         monkeypatch):
    def config(out, resume=False):
        return lora_config(sdxl_model_dir, images_dir, out, resume)

    # Ctrl-C inside the second step of stage 3 (the whole UNet's adapter)
    assert train_interrupted_then_resumed(monkeypatch, AttnDreamBooth, config, tmp_path / "split", 6) == [
        "step-000005"]
    for name in (WEIGHTS_FILE, LORA_FILE, "learned_embeds.safetensors"):
        a, b = load_file(lora_concept / name), load_file(tmp_path / "split" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert {"embedding", "embedding_2"} <= set(load_file(lora_concept / WEIGHTS_FILE))
