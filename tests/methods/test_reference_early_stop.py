"""ViCo's reference half stops after the last flagged layer (``ReferenceEarlyStop``):
the noisy half's noise prediction, the loss and the gradients are today's, and the
modules after the stop run on the noisy rows only."""

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402

import fused  # noqa: E402
from tests import builders as tiny  # noqa: E402
from vico.image_attention import ReferenceEarlyStop, inject_image_attention  # noqa: E402
from vico.methods.base import MethodConfig  # noqa: E402
from vico.methods.vico import ViCo, ViCoOptions  # noqa: E402
from vico.model import Components, Conditioning  # noqa: E402

from tests.builders import tiny_unet  # noqa: E402


def deep_unet():
    """Two cross-attention up blocks of three resnets each: a stop can fall inside a block,
    before its upsampler and before a whole later up block."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8,
    )


# (UNet, flagged layers, what runs after the stop)
PLACEMENTS = {
    "tiny-default": ("tiny", None),  # up_blocks.1.attentions.1, the last transformer: only conv_out is cut
    "deep-end": ("deep", ["up_blocks.0.attentions.1", "up_blocks.1.attentions.0"]),  # 2 resnets + 2 transformers
    "deep-middle": ("deep", ["up_blocks.0.attentions.1"]),  # rest of block 0, its upsampler, all of block 1
}


def make_method(placement, dtype=torch.float64):
    kind, layers = PLACEMENTS[placement]
    comps = tiny.make_tiny_components()
    if kind == "deep":
        comps["unet"] = deep_unet()
    c = Components(path="<tiny>", **comps)
    for m in (c.unet, c.text_encoder):
        m.requires_grad_(False).to(dtype)
    method = ViCo(c, MethodConfig(init_word="cat", resolution=32, options=ViCoOptions(layers=layers)))
    return c, method


class Rows:
    """Batch rows the UNet returns, and that the modules after the stop (and conv_out) see, per forward."""

    def __init__(self, unet, stop):
        self.out, self.seen = [], {}
        unet.register_forward_hook(lambda m, a, o: self.out.append(o.sample))
        i, j = (int(x) for x in stop.last_layer.split(".")[1::2])
        late = {"conv_out"} | {f"up_blocks.{k}" for k in range(i + 1, len(unet.up_blocks))}
        late |= {f"up_blocks.{i}.{part}.{k}" for part in ("resnets", "attentions") for k in range(j + 1, 9)}
        self.temb = set()  # rows the later resnets' time-embedding projections see
        for name, mod in unet.named_modules():
            if name in late:
                mod.register_forward_hook(lambda m, a, o, n=name: self.seen.setdefault(n, set()).add(
                    (o[0] if isinstance(o, tuple) else getattr(o, "sample", o)).shape[0]))
            if name.startswith(tuple(late)) and name.endswith("time_emb_proj"):
                mod.register_forward_hook(lambda m, a, o: self.temb.add(a[0].shape[0]))


def train_step(comps, method, dtype=torch.float64, batch_size=2):
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 16, 16, generator=g, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    batch = method.make_batch(mean, torch.zeros_like(mean), gen, batch_size=batch_size)
    loss, _ = method.training_loss(batch)
    grads = torch.autograd.grad(loss, [method.embedding.learned] + list(method.blocks.parameters()))
    return loss.detach(), grads


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_train_step_equals_the_full_forward(placement):
    comps, method = make_method(placement)
    stop = method.reference_stop
    assert stop.installed
    rows = Rows(comps.unet, stop)
    method.reference_stop.enabled = False
    want_loss, want_grads = train_step(comps, method)
    want_out = rows.out.pop()
    assert want_out.shape[0] == 4 and all(s == {4} for s in rows.seen.values())
    rows.seen.clear()
    method.reference_stop.enabled = True
    loss, grads = train_step(comps, method)
    out = rows.out.pop()
    assert out.shape[0] == 2  # the noisy half only
    assert rows.seen["conv_out"] == {2} and all(s == {2} for s in rows.seen.values()), rows.seen
    assert len(rows.seen) > 1 or placement == "tiny-default"
    # every row's time embedding is projected (a 2-row product rounds unlike a 1-row one), then cut
    assert rows.temb == ({4} if placement != "tiny-default" else set())
    torch.testing.assert_close(out, want_out[:2], rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-12)
    for a, b in zip(grads, want_grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_batch_of_one_and_gradient_checkpointing():
    """B = 1 (where a 2-row temb would broadcast silently if it were not cut) and a
    checkpointed UNet, whose recomputation passes through the same hooks."""
    comps, method = make_method("deep-middle")
    method.reference_stop.enabled = False
    want_loss, want_grads = train_step(comps, method, batch_size=1)
    comps.unet.enable_gradient_checkpointing()
    method.reference_stop.enabled = True
    loss, grads = train_step(comps, method, batch_size=1)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-12)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_float32_within_1e6():
    comps, method = make_method("deep-end", torch.float32)
    method.reference_stop.enabled = False
    want_loss, want_grads = train_step(comps, method, torch.float32)
    method.reference_stop.enabled = True
    loss, grads = train_step(comps, method, torch.float32)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_sampling_step_and_its_maps_are_unchanged():
    comps, method = make_method("deep-middle")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    ref = torch.randn(1, 4, 16, 16, generator=g, dtype=torch.float64)
    ids = comps.tokenizer(["a photo of S*"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    cond, uncond = (Conditioning(ids, torch.randn(2, 77, 32, generator=g, dtype=torch.float64)) for _ in range(2))
    results = []
    for enabled in (False, True):
        method.reference_stop.enabled = enabled
        ctx = method.sampling_context(ref, 2)
        eps = method.predict_noise(latents, torch.tensor(500), cond, uncond, 7.5, ctx)
        results.append((eps, method.sampled_maps(ctx), method.reference_maps(ctx)))
    (want, *want_maps), (got, *got_maps) = results
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for a, b in zip(got_maps, want_maps):
        for layer in a:
            torch.testing.assert_close(a[layer][0], b[layer][0], rtol=0, atol=1e-12)
            assert torch.equal(a[layer][1], b[layer][1])


@torch.no_grad()
def test_other_forwards_keep_both_halves():
    """A plain call, and a request that also wants maps after the stop, are untouched."""
    unet = deep_unet().double()
    x, t = torch.randn(4, 4, 8, 8, dtype=torch.float64), torch.tensor([1, 2, 1, 2])
    ctx = torch.randn(4, 7, 32, dtype=torch.float64)
    index = torch.tensor([[-1, -1]] * 2 + [[2, 5]] * 2)
    inject_image_attention(unet, ["up_blocks.0.attentions.1"])
    fused.attach(unet)
    want_plain = unet(x, t, ctx).sample
    request = fused.MapRequest(index, otsu=True)  # every layer: nothing is cut
    want = unet(x, t, ctx, cross_attention_kwargs={"map_request": request}).sample
    stop = ReferenceEarlyStop(unet, ["up_blocks.0.attentions.1"])
    torch.testing.assert_close(unet(x, t, ctx).sample, want_plain, rtol=0, atol=0)
    request = fused.MapRequest(index, otsu=True)
    got = unet(x, t, ctx, cross_attention_kwargs={"map_request": request}).sample
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    source = "up_blocks.0.attentions.1.transformer_blocks.0.attn2"
    request = fused.MapRequest(index, layers=[source], otsu=True)
    assert unet(x, t, ctx, cross_attention_kwargs={"map_request": request}).sample.shape[0] == 2
    stop.remove()
    request = fused.MapRequest(index, layers=[source], otsu=True)
    assert unet(x, t, ctx, cross_attention_kwargs={"map_request": request}).sample.shape[0] == 4


def test_no_stop_without_a_decoder_placement():
    unet = tiny_unet().double()
    inject_image_attention(unet, ["down_blocks.0.attentions.0"])
    assert not ReferenceEarlyStop(unet, ["down_blocks.0.attentions.0"]).installed
