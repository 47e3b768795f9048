"""The benchmark baselines compute the same ViCo loss and gradients as the fused path,
so the speed comparison is between equal computations."""

import pytest
import torch

pytest.importorskip("diffusers")

import fused  # noqa: E402
from fused.benchmark import baselines  # noqa: E402
from fused.benchmark.baselines import BASELINES  # noqa: E402
from fused import reference  # noqa: E402
from tests import builders as tiny  # noqa: E402
from vico.methods.base import MethodConfig  # noqa: E402
from vico.methods.vico import ViCo  # noqa: E402
from vico.model import Components  # noqa: E402


def _vico_method():
    comps = Components(path="<tiny>", **tiny.make_tiny_components())
    for m in (comps.unet, comps.text_encoder):
        m.requires_grad_(False).double()
    return comps, ViCo(comps, MethodConfig(init_word="cat", resolution=32))


def test_baselines_match_fused_vico_step(cpp_backend):
    comps, method = _vico_method()
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 16, 16, generator=g, dtype=torch.float64)
    results = {}
    for name, cls in BASELINES.items():
        fused.attach(comps.unet, cls)
        gen = torch.Generator().manual_seed(1)
        batch = method.make_batch(mean, torch.zeros_like(mean), gen, batch_size=2)
        loss, logs = method.training_loss(batch)
        grads = torch.autograd.grad(loss, [method.embedding.learned] + list(method.blocks.parameters()))
        results[name] = (loss.detach(), grads)
    want_loss, want_grads = results["fused"]
    assert set(results) == {"fused", "paper", "diffusers+maps", "official"}
    for name in ("paper", "diffusers+maps", "official"):
        loss, grads = results[name]
        torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=1e-12, msg=name)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12, msg=name)


def test_official_materialises_every_attention_layer(monkeypatch):
    """Self-attention, text cross-attention and the image cross-attention (masked)
    all go through the official einsum softmax; its maps and masks are recorded."""
    comps, method = _vico_method()
    fused.attach(comps.unet, baselines.OfficialAttnProcessor)
    calls = []
    real = baselines.official_attention

    def spy(query, key, value, scale, key_mask=None, attention_mask=None):
        calls.append((query.shape[2], key.shape[2], key_mask is not None))
        return real(query, key, value, scale, key_mask, attention_mask)

    monkeypatch.setattr(baselines, "official_attention", spy)
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    batch = method.make_batch(mean, torch.zeros_like(mean), g, batch_size=1)
    method.training_loss(batch)
    n_layers = len(comps.unet.attn_processors)
    assert len(calls) == n_layers  # one call per attention layer: no layer runs SDPA
    assert sum(masked for *_, masked in calls) == len(method.layers)  # the image cross-attention
    assert any(n == l for n, l, _ in calls) and any(l == 77 for _, l, _ in calls)  # self and text


def test_official_attention_is_ldm_crossattention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    key_mask = torch.tensor([[True, False, True, False, True], [False] * 5])  # row 1: nothing visible
    out, probs = baselines.official_attention(q, k, v, 0.5, key_mask)
    torch.testing.assert_close(out, reference.masked_attention(q, k, v, key_mask, 0.5), rtol=1e-12, atol=1e-12)
    assert probs.shape == (2, 3, 5, 5) and torch.equal(probs[0, ..., 1], torch.zeros(3, 5))
    # fp16 projections: scores, softmax and output in fp32, as SD's CrossAttention under _ATTN_PRECISION="fp32"
    out16, probs16 = baselines.official_attention(q.half(), k.half(), v.half(), 0.5, key_mask)
    assert out16.dtype == probs16.dtype == torch.float32
    # maps indexed from the head-averaged probabilities; -1 slots are zeros
    index = torch.tensor([[2, -1], [0, 4]])
    out_plain, probs_plain = baselines.official_attention(q, k, v, 0.5)
    want_out, want = reference.attention_with_maps(q, k, v, index, 0.5, "mean")
    torch.testing.assert_close(out_plain, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(baselines.official_maps(probs_plain, index), want, rtol=1e-12, atol=1e-12)
    maps = baselines.official_maps(probs, index)
    torch.testing.assert_close(maps[0, 0], probs[0, :, :, 2].mean(0), rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(maps[0, 1]) == 0
    per_head = baselines.official_maps(probs, index, "none")
    torch.testing.assert_close(per_head.mean(1), maps, rtol=1e-12, atol=1e-12)
