"""FusedAttnProcessor on a tiny SD-style UNet built from a config."""

import pytest
import torch

import fused
from tests.builders import tiny_unet

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # noqa: E402


class MaterialisingRecorder(AttnProcessor):
    """diffusers' classic processor, which materialises the probabilities; records
    the head-averaged probabilities of the chosen columns (the paper's way)."""

    def __init__(self, name, store, index):
        self.name, self.store, self.index = name, store, index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        if encoder_hidden_states is not None:
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probs = attn.get_attention_scores(q, key, None)  # [B*H, N, L]
            B = hidden_states.shape[0]
            probs = probs.view(B, attn.heads, *probs.shape[1:]).mean(1)  # [B, N, L]
            cols = self.index.clamp(min=0)
            picked = probs.gather(-1, cols[:, None, :].expand(-1, probs.shape[1], -1)).transpose(1, 2)
            self.store[self.name] = picked * (self.index >= 0)[:, :, None]
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _inputs(B=2, L=7, cross_dim=32, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, 4, 8, 8, generator=g, dtype=dtype), torch.tensor([10, 500]),
            torch.randn(B, L, cross_dim, generator=g, dtype=dtype))


def test_same_output_as_attn_processor_2_0(cpu_backend):
    unet = tiny_unet().double()
    x, t, ctx = _inputs()
    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        want = unet(x, t, ctx).sample
        fused.attach(unet)
        got = unet(x, t, ctx).sample
        request = fused.MapRequest(torch.tensor([[1, 3], [-1, 6]]), backend=cpu_backend)
        got_maps = unet(x, t, ctx, cross_attention_kwargs={"map_request": request}).sample
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_maps, want, rtol=1e-10, atol=1e-10)
    assert set(request.maps) == set(fused.cross_attention_layers(unet)) and len(request.maps) == 4


def test_maps_equal_materialised_attention(cpu_backend):
    unet = tiny_unet().double()
    x, t, ctx = _inputs()
    index = torch.tensor([[1, 3], [-1, 6]])
    layers = fused.cross_attention_layers(unet)
    want = {}
    unet.set_attn_processor({
        name: MaterialisingRecorder(name.removesuffix(".processor"), want, index) for name in unet.attn_processors
    })
    with torch.no_grad():
        unet(x, t, ctx)
    fused.attach(unet)
    request = fused.MapRequest(index, layers=layers[:2], backend=cpu_backend)
    with torch.no_grad():
        unet(x, t, ctx, cross_attention_kwargs={"map_request": request})
    assert set(request.maps) == set(layers[:2])  # only the requested layers
    for name in layers[:2]:
        assert request.maps[name].shape == (2, 2, want[name].shape[-1])
        torch.testing.assert_close(request.maps[name], want[name], rtol=1e-10, atol=1e-12)


def test_maps_have_gradients_and_masks(cpp_backend):
    unet = tiny_unet().double()
    fused.attach(unet)
    x, t, ctx = _inputs()
    ctx.requires_grad_()
    request = fused.MapRequest(torch.tensor([[1, 3], [2, 6]]), otsu=True)
    unet(x, t, ctx, cross_attention_kwargs={"map_request": request})
    loss = sum(m.square().sum() for m in request.maps.values())
    (grad,) = torch.autograd.grad(loss, ctx)
    assert grad.abs().sum() > 0
    for name, maps in request.maps.items():
        assert torch.equal(request.masks[name], fused.otsu_mask(maps.detach())[1])


def test_per_head_maps():
    unet = tiny_unet().double()
    fused.attach(unet)
    x, t, ctx = _inputs()
    request = fused.MapRequest(torch.tensor([[1], [2]]), head_reduce="none")
    with torch.no_grad():
        unet(x, t, ctx, cross_attention_kwargs={"map_request": request})
    maps = next(iter(request.maps.values()))
    assert maps.dim() == 4 and maps.shape[:3] == (2, 8, 1)  # attention_head_dim=8 means 8 heads in diffusers
    with pytest.raises(ValueError, match="otsu=True needs head_reduce='mean'"):
        fused.MapRequest(torch.tensor([[1]]), head_reduce="none", otsu=True)


def test_compiled_unet_with_processor_has_no_graph_break(cpp_backend):
    unet = tiny_unet()
    fused.attach(unet)
    x, t, ctx = _inputs(dtype=torch.float32)
    request = fused.MapRequest(torch.tensor([[1, 3], [-1, 6]]))
    with torch.no_grad():
        want = unet(x, t, ctx, cross_attention_kwargs={"map_request": request}).sample
        torch._dynamo.reset()
        compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
        request2 = fused.MapRequest(torch.tensor([[1, 3], [-1, 6]]))
        got = compiled(x, t, ctx, cross_attention_kwargs={"map_request": request2}).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert set(request2.maps) == set(request.maps)


def tiny_sdxl_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=48, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 48,
    ).eval()


def test_sdxl_style_unet_processor_and_maps(cpu_backend):
    """SDXL-like UNet (text_time added embeddings, wider context, 2 transformer layers per block)."""
    unet = tiny_sdxl_unet().double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 9, 48, generator=g, dtype=torch.float64)
    added = {"text_embeds": torch.randn(2, 48, generator=g, dtype=torch.float64),
             "time_ids": torch.randn(2, 6, generator=g, dtype=torch.float64)}
    t = torch.tensor([10, 900])
    index = torch.tensor([[1, 8], [-1, 3]])
    want = {}
    unet.set_attn_processor({n: MaterialisingRecorder(n.removesuffix(".processor"), want, index)
                             for n in unet.attn_processors})
    with torch.no_grad():
        ref = unet(x, t, ctx, added_cond_kwargs=added).sample
    fused.attach(unet)
    request = fused.MapRequest(index, backend=cpu_backend)
    with torch.no_grad():
        got = unet(x, t, ctx, added_cond_kwargs=added, cross_attention_kwargs={"map_request": request}).sample
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    layers = fused.cross_attention_layers(unet)
    assert len(layers) == 2 + 2 * 2 + 2  # down (2 layers), up (2 attentions x 2 layers), mid (2 layers)
    assert set(request.maps) == set(layers)
    for name in layers:
        torch.testing.assert_close(request.maps[name], want[name], rtol=1e-10, atol=1e-12)


def test_layers_without_maps_use_the_attention_backend_chosen_in_diffusers(monkeypatch, cpp_backend):
    """set_attention_backend before or after attach: every layer that takes no map calls that backend."""
    from diffusers.models import attention_dispatch as dispatch

    name = dispatch.AttentionBackendName._NATIVE_MATH
    real = dispatch._AttentionBackendRegistry._backends[name]
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setitem(dispatch._AttentionBackendRegistry._backends, name, spy)
    monkeypatch.setattr(dispatch._AttentionBackendRegistry, "_active_backend",
                        dispatch._AttentionBackendRegistry._active_backend)  # restored after the test
    unet = tiny_unet().double()
    x, t, ctx = _inputs()
    with torch.no_grad():
        want = unet(x, t, ctx).sample
    unet.set_attention_backend("_native_math")
    fused.attach(unet)
    n_layers = len(unet.attn_processors)
    with torch.no_grad():
        got = unet(x, t, ctx).sample
        assert len(calls) == n_layers
        request = fused.MapRequest(torch.tensor([[1, 3], [-1, 6]]))
        unet(x, t, ctx, cross_attention_kwargs={"map_request": request})
    assert len(calls) == 2 * n_layers - len(request.maps) and len(request.maps) == 4
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    unet.set_attention_backend("native")  # after attach, diffusers sets it on the fused processors themselves
    assert {p._attention_backend for p in unet.attn_processors.values()} == {dispatch.AttentionBackendName.NATIVE}
    with torch.no_grad():
        unet(x, t, ctx)
    assert len(calls) == 2 * n_layers - len(request.maps)  # the spied backend is no longer chosen
