"""ViCo's image cross-attention blocks inside a diffusers UNet."""

import json
from pathlib import Path

import pytest
import torch

import fused
import vico

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402

from .test_processor import tiny_unet  # noqa: E402


def sd15_config():
    return json.loads((Path(__file__).resolve().parent / "configs" / "sd15_unet.json").read_text())


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
