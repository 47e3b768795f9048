"""SD3 and FLUX joint attention: same outputs as diffusers' processors, and
image->text maps equal the block of the materialised probabilities."""

import pytest
import torch

pytest.importorskip("diffusers")

import fused  # noqa: E402


def materialised_joint_maps(q, k, cols, rows, scale):
    """mean over heads of softmax(q kᵀ) at [rows, cols] -> [B, T, len(rows)]."""
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # [B, H, S, S]
    return p[:, :, rows][..., cols].mean(1).transpose(1, 2)


def tiny_sd3(seed=0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4).double().eval()


def test_sd3_equivalence_maps_and_gradients(cpu_backend):
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    model = tiny_sd3()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    text = torch.randn(2, 6, 16, generator=g, dtype=torch.float64, requires_grad=True)
    pooled = torch.randn(2, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([10.0, 500.0])
    model.set_attn_processor(JointAttnProcessor2_0())
    with torch.no_grad():
        want = model(x, text, pooled, t).sample

    # the materialised probabilities of the first block, captured from its inputs
    captured = {}
    block = model.transformer_blocks[0].attn

    def grab(module, args, kwargs):
        captured["hidden"], captured["text"] = args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"]
    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    fused.attach(model, fused.FusedJointAttnProcessor)
    index = torch.tensor([[0, 5], [-1, 2]])
    request = fused.MapRequest(index, backend=cpu_backend)
    got = model(x, text, pooled, t, joint_attention_kwargs={"map_request": request}).sample
    handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    name = "transformer_blocks.0.attn"
    assert set(request.maps) == {"transformer_blocks.0.attn", "transformer_blocks.1.attn"}
    h, c = captured["hidden"], captured["text"]
    split = lambda y: y.view(2, -1, 2, 8).transpose(1, 2)  # noqa: E731
    q = torch.cat([split(block.to_q(h)), split(block.add_q_proj(c))], 2)
    k = torch.cat([split(block.to_k(h)), split(block.add_k_proj(c))], 2)
    n = h.shape[1]
    want_maps = materialised_joint_maps(q, k, [n + 0, n + 5], list(range(n)), 8 ** -0.5)
    torch.testing.assert_close(request.maps[name][0], want_maps[0], rtol=1e-10, atol=1e-12)
    want_row1 = materialised_joint_maps(q, k, [n + 2], list(range(n)), 8 ** -0.5)
    torch.testing.assert_close(request.maps[name][1, 1], want_row1[1, 0], rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(request.maps[name][1, 0]) == 0 and request.maps[name].shape == (2, 2, n)
    (grad,) = torch.autograd.grad(request.maps[name].sum(), text)
    assert grad.abs().sum() > 0


def tiny_flux(seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                  axes_dims_rope=(2, 2, 4)).double().eval()


def _flux_inputs():
    g = torch.Generator().manual_seed(2)
    n_img, n_txt = 16, 5
    img_ids = torch.zeros(n_img, 3)
    img_ids[:, 1] = torch.arange(n_img) // 4
    img_ids[:, 2] = torch.arange(n_img) % 4
    return dict(hidden_states=torch.randn(2, n_img, 4, generator=g, dtype=torch.float64),
                encoder_hidden_states=torch.randn(2, n_txt, 16, generator=g, dtype=torch.float64),
                pooled_projections=torch.randn(2, 8, generator=g, dtype=torch.float64),
                timestep=torch.tensor([0.3, 0.8], dtype=torch.float64), img_ids=img_ids.double(),
                txt_ids=torch.zeros(n_txt, 3, dtype=torch.float64))


def test_flux_equivalence_and_maps_in_double_and_single_blocks(cpu_backend):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model = tiny_flux()
    inputs = _flux_inputs()
    model.set_attn_processor(FluxAttnProcessor())
    with torch.no_grad():
        want = model(**inputs).sample
    fused.attach(model, fused.FusedFluxAttnProcessor)
    request = fused.MapRequest(torch.tensor([[1, 4], [0, -1]]), backend=cpu_backend, text_len=5)
    with torch.no_grad():
        got = model(**inputs, joint_attention_kwargs={"map_request": request}).sample
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert set(request.maps) == {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}
    for maps in request.maps.values():
        assert maps.shape == (2, 2, 16)
        assert torch.all(maps >= 0) and torch.all(maps <= 1) and torch.count_nonzero(maps[1, 1]) == 0

    # the double-stream block's maps against materialised probabilities (with rotary embeddings)
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    captured = {}
    attn = model.transformer_blocks[0].attn
    handle = attn.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(**inputs, joint_attention_kwargs={"map_request": request})
    handle.remove()
    q, k, _, eq, ek, _ = _get_qkv_projections(attn, captured["hidden_states"], captured["encoder_hidden_states"])
    q = torch.cat([attn.norm_added_q(eq.unflatten(-1, (-1, 8))), attn.norm_q(q.unflatten(-1, (-1, 8)))], 1)
    k = torch.cat([attn.norm_added_k(ek.unflatten(-1, (-1, 8))), attn.norm_k(k.unflatten(-1, (-1, 8)))], 1)
    rot = captured["image_rotary_emb"]
    q, k = apply_rotary_emb(q, rot, sequence_dim=1).transpose(1, 2), apply_rotary_emb(k, rot, sequence_dim=1).transpose(1, 2)
    want_maps = materialised_joint_maps(q, k, [1, 4], list(range(5, 21)), 8 ** -0.5)
    torch.testing.assert_close(request.maps["transformer_blocks.0.attn"][0], want_maps[0], rtol=1e-10, atol=1e-12)


def test_joint_maps_reject_positions_past_the_text():
    model = tiny_sd3()
    g = torch.Generator().manual_seed(1)
    request = fused.MapRequest(torch.tensor([[6], [0]]))  # only 6 text tokens: 0..5
    fused.attach(model, fused.FusedJointAttnProcessor)
    with pytest.raises(ValueError, match="positions >= the 6 text tokens"):
        model(torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64),
              torch.randn(2, 6, 16, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64),
              torch.tensor([1.0, 2.0]), joint_attention_kwargs={"map_request": request})
