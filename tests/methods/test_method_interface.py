"""AttnDreamBooth, CatVersion (and TI/ViCo) on the method interface: what trains,
loss terms against independent computations, save -> load -> sample."""

import pytest
import torch

pytest.importorskip("diffusers")

import fused  # noqa: E402
from tests import builders as tiny  # noqa: E402
from vico.methods.attndreambooth import AttnDreamBooth, AttnDreamBoothOptions, mean_variance_regulariser  # noqa: E402
from vico.methods import get_method  # noqa: E402
from vico.methods.base import MethodConfig  # noqa: E402
from vico.methods.catversion import PrefixKVAttention, install_prefix_kv, remove_prefix_kv  # noqa: E402
from vico.model import Components  # noqa: E402
from vico.pipeline import ViCoPipeline  # noqa: E402
from vico.training import TrainConfig, train  # noqa: E402


def components(seed=0):
    c = Components(path="<tiny>", **tiny.make_tiny_components(seed))
    for m in (c.unet, c.text_encoder, c.vae):
        m.requires_grad_(False).eval()
    return c


def snapshot(c):
    return {f"unet.{k}": v.clone() for k, v in c.unet.state_dict().items()} | {
        f"text.{k}": v.clone() for k, v in c.text_encoder.state_dict().items()}


def changed(before, after):
    return {k for k in before if k in after and not torch.equal(before[k], after[k])}


def run_steps(method, steps=2, stage=0):
    method.begin_stage(stage)
    opt = torch.optim.AdamW(method.param_groups(stage=stage))
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3 * (2 if method.hflip_prob else 1), 4, 16, 16, generator=g)
    for _ in range(steps):
        batch = method.make_batch(mean, torch.zeros_like(mean), g, batch_size=2)
        loss, _ = method.training_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("name", ["textual-inversion", "vico", "catversion"])
def test_only_the_intended_parameters_change(name):
    c = components()
    method = get_method(name)(c, MethodConfig(init_word="cat", resolution=32))
    before = snapshot(c) | {k: v.clone() for k, v in method.state_dict().items()}
    run_steps(method)
    after = snapshot(c) | {k: v.detach() for k, v in method.state_dict().items()}
    diff = changed(before, after)
    learned = set(method.state_dict())
    # the same tensors seen from the models: image blocks in the UNet, learned rows/vectors in the encoder
    mirrors = {k for k in before if k.startswith(("unet.", "text.")) and
               (".transformer_blocks.1." in k or k.endswith(("prefix_key", "prefix_value", "token_embedding.learned")))}
    assert learned <= diff, sorted(learned - diff)[:5]  # everything trained moved
    assert diff <= learned | mirrors, sorted(diff - learned - mirrors)[:5]  # and nothing else did


def test_attndreambooth_stages_train_what_they_should():
    c = components()
    method = AttnDreamBooth(c, MethodConfig(init_word="cat", resolution=32))
    assert [(s.name, s.steps, s.batch_size) for s in method.stages()] == [
        ("embedding", 60, 8), ("cross-attention", 100, 8), ("unet", 500, 8)]  # train_attndreambooth.sh
    fast = AttnDreamBooth(components(), MethodConfig(placeholder="V*", init_word="cat",
                                                     options=AttnDreamBoothOptions(fast=True)))
    assert fast.stages()[2].steps == 200 and fast.param_groups(stage=2)[0]["lr"] == 1e-5
    assert [s.batch_size for s in fast.stages()] == [4, 4, 4]
    attn2 = {id(p) for n in method.layers for p in c.unet.get_submodule(n).parameters()}
    assert {id(p) for p in method.param_groups(stage=1)[0]["params"]} == attn2
    assert [g["lr"] for s in range(3) for g in method.param_groups(stage=s)] == [1e-3, 2e-5, 2e-6]

    before = snapshot(c) | {"embedding": method.embedding.learned.detach().clone()}
    run_steps(method, steps=1, stage=0)
    diff = changed(before, snapshot(c) | {"embedding": method.embedding.learned.detach()})
    assert {k for k in diff if not k.endswith("token_embedding.learned")} == {"embedding"}
    before = snapshot(c)
    run_steps(method, steps=1, stage=1)
    diff = changed(before, snapshot(c))
    assert diff and all(".attn2." in k for k in diff)
    assert not any(k.startswith("text.") for k in diff)


def test_attndreambooth_regulariser_equals_materialised_attention():
    from fused.benchmark.baselines import DiffusersMapsAttnProcessor

    c = components()
    for m in (c.unet, c.text_encoder):
        m.double()
    method = AttnDreamBooth(c, MethodConfig(init_word="cat", resolution=32))
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    prompts = [method.prompt(g)] * 2
    from vico.model import encode_prompts

    cond = encode_prompts(c, prompts)
    ids, text = cond.ids, cond.text
    t = torch.tensor([100, 700])
    request = method.map_request(ids)
    c.unet(latents, t, text, cross_attention_kwargs={"map_request": request})
    got = mean_variance_regulariser(request.maps, 2.0, 5.0)

    fused.attach(c.unet, DiffusersMapsAttnProcessor)  # materialises softmax(QK^T) in the map layers
    ref = method.map_request(ids)
    c.unet(latents, t, text, cross_attention_kwargs={"map_request": ref})
    terms = []
    for layer, maps in ref.maps.items():  # [B, H, 2, N]
        total = 0.0
        for b in range(maps.shape[0]):
            v, cat = maps[b, :, 0].reshape(-1), maps[b, :, 1].reshape(-1)
            n = v.numel()
            mu_v, mu_c = v.sum() / n, cat.sum() / n
            var_v = ((v - mu_v) ** 2).sum() / (n - 1)
            var_c = ((cat - mu_c) ** 2).sum() / (n - 1)
            total = total + 2.0 * (mu_v - mu_c) ** 2 + 5.0 * (var_v - var_c) ** 2
        terms.append(total)
    assert len(terms) == len(method.layers) == 4
    torch.testing.assert_close(got, torch.stack(terms).mean(), rtol=1e-10, atol=1e-14)
    assert got > 0


def test_catversion_parameter_count_on_clip_l():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77)
    with torch.device("meta"):
        enc = CLIPTextModel(cfg)
    installed = install_prefix_kv(enc)
    assert len(installed) == 3 and all(n.endswith(("9.self_attn", "10.self_attn", "11.self_attn")) for n in installed)
    assert sum(p.numel() for m in installed.values() for p in (m.prefix_key, m.prefix_value)) == 4608


def test_catversion_prefix_attention_and_removal():
    c = components()
    enc, tok = c.text_encoder.double(), c.tokenizer
    ids = tok(["a photo of a cat", "a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        untouched = enc(ids)[0]
        installed = install_prefix_kv(enc, generator=torch.Generator().manual_seed(1))
        with_prefix = enc(ids)[0]
    assert not torch.allclose(with_prefix, untouched)
    # one layer against an explicit computation: softmax over [prefix; causal tokens]
    layer = next(iter(installed.values()))
    h = torch.randn(2, 77, 32, dtype=torch.float64)
    a = layer.inner
    q = a.q_proj(h).view(2, 77, a.num_heads, a.head_dim).transpose(1, 2)
    k = torch.cat([layer.prefix_key.expand(2, 1, 32), a.k_proj(h)], 1).view(2, 78, a.num_heads, a.head_dim).transpose(1, 2)
    v = torch.cat([layer.prefix_value.expand(2, 1, 32), a.v_proj(h)], 1).view(2, 78, a.num_heads, a.head_dim).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) * a.scale
    allowed = torch.ones(77, 78, dtype=torch.bool)
    allowed[:, 1:] = torch.ones(77, 77, dtype=torch.bool).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    scores[..., 0] += 1.0  # the official additive mask: torch.ones in the prefix column
    want = a.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 77, 32))
    torch.testing.assert_close(layer(h)[0], want, rtol=1e-10, atol=1e-12)
    remove_prefix_kv(enc)
    assert not any(isinstance(m, PrefixKVAttention) for m in enc.modules())
    with torch.no_grad():
        torch.testing.assert_close(enc(ids)[0], untouched, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["textual-inversion", "vico", "attndreambooth", "catversion"])
def test_save_load_sample_reproduces_images(name, model_dir, images_dir, tmp_path):  # noqa: F811
    out = tmp_path / name
    train(TrainConfig(model=str(model_dir), images=str(images_dir), out=str(out), method=name, init_word="cat",
                      steps=1, batch_size=1, progress=False))
    pipe = ViCoPipeline.from_pretrained(model_dir, out)
    ref = pipe.default_reference(images_dir) if name == "vico" else None
    first, _ = pipe("a photo of a S* cat", reference=ref, num_inference_steps=3, seed=7, progress=False)
    again, _ = ViCoPipeline.from_pretrained(model_dir, out)("a photo of a S* cat", reference=ref,
                                                            num_inference_steps=3, seed=7, progress=False)
    assert first.shape == (1, 32, 32, 3) and (first == again).all()
    untrained = ViCoPipeline.from_pretrained(model_dir, out)
    untrained.method.load_state_dict({k: torch.zeros_like(v) for k, v in untrained.method.state_dict().items()})
    other, _ = untrained("a photo of a S* cat", reference=ref, num_inference_steps=3, seed=7, progress=False)
    assert not (other == first).all()  # the learned weights do matter
    if name == "attndreambooth":
        assert pipe.method.sampler == "dpm-solver"


def test_cli_fast_preset_reaches_the_method(model_dir, images_dir, tmp_path):  # noqa: F811
    import json

    from vico import cli

    out = tmp_path / "adb"
    assert cli.main(["train", "--model", str(model_dir), "--images", str(images_dir), "--out", str(out),
                     "--method", "attndreambooth", "--init-word", "cat", "--steps", "1", "--fast", "--quiet"]) == 0
    meta = json.loads((out / "concept.json").read_text())
    assert meta["method"] == "attndreambooth" and meta["config"]["options"]["fast"] is True
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003"]  # 3 stages x 1 step


def test_interrupted_multistage_run_resumes_to_the_same_result(model_dir, images_dir, tmp_path, monkeypatch):  # noqa: F811
    from safetensors.torch import load_file

    def cfg(out, resume=False):
        return TrainConfig(model=str(model_dir), images=str(images_dir), out=str(out), method="attndreambooth",
                           init_word="cat", steps=2, batch_size=1, progress=False, checkpoint_every=100,
                           resume=resume)

    from tests.builders import train_interrupted_then_resumed

    train(cfg(tmp_path / "full"))
    # Ctrl-C inside the second step of stage 2 (cross-attention)
    assert train_interrupted_then_resumed(monkeypatch, AttnDreamBooth, cfg, tmp_path / "split", 4) == ["step-000003"]
    a, b = load_file(tmp_path / "full" / "concept.safetensors"), load_file(tmp_path / "split" / "concept.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
