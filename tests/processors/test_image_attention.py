"""ViCo's image cross-attention blocks inside a diffusers UNet."""

import json
from pathlib import Path

import pytest
import torch

import fused
import vico

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402

from tests.builders import tiny_unet  # noqa: E402


def sd15_config():
    return json.loads((Path(__file__).resolve().parents[1] / "configs" / "sd15_unet.json").read_text())


def test_sd15_injection_has_the_papers_parameter_count():
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sd15_config())
    blocks = vico.inject_image_attention(unet)
    assert list(blocks.keys()) == [
        "up_blocks-1-attentions-1", "up_blocks-2-attentions-0", "up_blocks-2-attentions-2", "up_blocks-3-attentions-1"]
    assert sum(p.numel() for p in blocks.parameters()) == 51_248_960
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".transformer_blocks.1." in n for n in trainable)
    assert sum(p.numel() for n, p in unet.named_parameters() if p.requires_grad) == 51_248_960
    with pytest.raises(ValueError, match="already has an image attention block"):
        vico.inject_image_attention(unet, ["up_blocks.1.attentions.1"])
    with pytest.raises(ValueError, match="no module"):
        vico.inject_image_attention(unet, ["up_blocks.9.attentions.1"])
    with pytest.raises(ValueError, match="not a spatial transformer"):
        vico.inject_image_attention(unet, ["up_blocks.1.resnets.0"])


def _vico_forward(unet, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(B, 4, 8, 8, generator=g, dtype=torch.float64)
    ref = torch.randn(B, 4, 8, 8, generator=g, dtype=torch.float64)
    ctx = torch.randn(B, 7, 32, generator=g, dtype=torch.float64).repeat(2, 1, 1)
    t = torch.tensor([300] * (2 * B))
    index = torch.tensor([[-1, -1]] * B + [[2, 5]] * B)  # maps only for the reference half: S*, EOT
    request = fused.MapRequest(index, otsu=True)
    out = unet(torch.cat([noisy, ref]), t, ctx, cross_attention_kwargs={"map_request": request}).sample
    return out, request


def test_image_block_uses_otsu_mask_of_reference_s_star_map(monkeypatch):
    unet = tiny_unet().double()
    fused.attach(unet)
    blocks = vico.inject_image_attention(unet)
    (name,) = [k.replace("-", ".") for k in blocks.keys()]
    assert name == "up_blocks.1.attentions.1"
    seen = []
    real = fused.processors.unet.masked_attention

    def spy(q, k, v, key_mask, **kw):
        seen.append(key_mask)
        return real(q, k, v, key_mask, **kw)

    monkeypatch.setattr(fused.processors.unet, "masked_attention", spy)
    out, request = _vico_forward(unet)
    source = f"{name}.transformer_blocks.0.attn2"
    (key_mask,) = seen
    want = fused.otsu_mask(request.maps[source][2:, 0].detach())[1]
    assert torch.equal(key_mask, want) and key_mask.any() and not key_mask.all()
    # the noisy half asked for no maps: zeros
    assert torch.count_nonzero(request.maps[source][:2]) == 0


def test_only_image_blocks_get_gradients():
    unet = tiny_unet().double()
    fused.attach(unet)
    blocks = vico.inject_image_attention(unet)
    out, request = _vico_forward(unet)
    out[:2].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks.parameters() if p.dim() > 1)
    frozen = [p for n, p in unet.named_parameters() if ".transformer_blocks.1." not in n]
    assert frozen and all(p.grad is None for p in frozen)


def test_without_request_the_blocks_are_identity():
    unet = tiny_unet().double()
    x, t, ctx = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([1, 2]), torch.randn(2, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        want = unet(x, t, ctx).sample
        vico.inject_image_attention(unet)
        fused.attach(unet)
        got = unet(x, t, ctx).sample
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert "up_blocks.1.attentions.1.transformer_blocks.1.block.attn2" not in fused.cross_attention_layers(unet)


def _deep_unet():
    """A tiny UNet whose spatial transformers stack two frozen blocks (as SDXL's do)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, transformer_layers_per_block=2,
    ).eval()


def test_deep_spatial_transformer_runs_its_image_block_after_every_frozen_block():
    """The official SpatialTransformer loop runs its one image block after each frozen block, masked by that
    block's S* map: here [frozen 0, repeat, frozen 1, block], one set of weights; the output equals a twin
    ImageCrossAttention with the same weights in the repeat's place and frozen block 0 as its mask source."""
    import copy

    from vico.image_attention import ImageBlockRepeat, ImageCrossAttention, image_block_sources

    unet = _deep_unet()
    layer = "up_blocks.1.attentions.1"
    blocks = vico.inject_image_attention(unet, [layer])
    fused.attach(unet)
    transformer = unet.get_submodule(layer)
    assert [type(b).__name__ for b in transformer.transformer_blocks] == [
        "BasicTransformerBlock", "ImageBlockRepeat", "BasicTransformerBlock", "ImageCrossAttention"]
    block = blocks[layer.replace(".", "-")]
    assert transformer.transformer_blocks[1].image_block is block
    names = [n for n, _ in unet.named_parameters() if n.startswith(f"{layer}.transformer_blocks.")]
    assert not any(".transformer_blocks.1." in n for n in names)  # the repeat holds no weights of its own
    sources = image_block_sources(unet, [layer])
    assert sources == [f"{layer}.transformer_blocks.0.attn2", f"{layer}.transformer_blocks.2.attn2"]
    assert block.source_layer == sources[1]

    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 6, 32, generator=g)
    index = torch.tensor([[-1, -1], [-1, -1], [2, 5], [2, 5]])  # maps of the reference half only
    with torch.no_grad():
        for p in block.parameters():  # out of the zero-ish init, so every application shows
            p.add_(0.1 * torch.randn(p.shape, generator=g))

    def run():
        request = fused.MapRequest(index, layers=sources, otsu=True)
        with torch.no_grad():
            return unet(x, 10, text, cross_attention_kwargs={"map_request": request}).sample

    got = run()
    repeat = transformer.transformer_blocks[1]
    twin = copy.deepcopy(block)
    twin.source_layer = sources[0]
    transformer.transformer_blocks[1] = twin
    torch.testing.assert_close(got, run(), rtol=1e-6, atol=1e-6)
    transformer.transformer_blocks[1] = ImageCrossAttention(32, 8, 4, source_layer="nowhere")  # identity
    assert not torch.allclose(got, run(), atol=1e-4)  # the repeat changes the output
    transformer.transformer_blocks[1] = repeat
    assert isinstance(repeat, ImageBlockRepeat)


def test_vico_trains_on_deep_spatial_transformers():
    """ViCo on a UNet with two frozen blocks per transformer: the masks of both frozen attn2 are requested,
    the regulariser uses the last one's map (the official loop keeps its last loss_reg), and the image
    blocks get gradients from both applications."""
    from tests import builders as tiny
    from vico.methods.base import MethodConfig
    from vico.methods.vico import ViCo
    from vico.model import Components

    parts = tiny.make_tiny_components()
    parts["unet"] = _deep_unet()
    method = ViCo(Components(path="<deep>", **parts), MethodConfig(init_word="cat", resolution=32))
    assert method.mask_layers == [f"{name}.transformer_blocks.{i}.attn2" for name in method.layers for i in (0, 2)]
    assert method.source_layers == [f"{name}.transformer_blocks.2.attn2" for name in method.layers]
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 16, 16, generator=g)
    loss, logs = method.training_loss(method.make_batch(mean, torch.zeros_like(mean), g, batch_size=2))
    loss.backward()
    assert torch.isfinite(loss) and logs["reg"] > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.blocks.parameters()
               if p.requires_grad and p.dim() > 1)
