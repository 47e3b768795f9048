"""The benchmark baselines compute the same ViCo loss and gradients as the fused path,
so the speed comparison is between equal computations."""

import pytest
import torch

pytest.importorskip("diffusers")

import fused  # noqa: E402
from benchmarks.baselines import BASELINES  # noqa: E402
from vico import tiny  # noqa: E402
from vico.methods.base import MethodConfig  # noqa: E402
from vico.methods.vico import ViCo  # noqa: E402
from vico.model import Components  # noqa: E402


def test_baselines_match_fused_vico_step(cpp_backend):
    comps = Components(path="<tiny>", **tiny.make_tiny_components())
    for m in (comps.unet, comps.text_encoder):
        m.requires_grad_(False).double()
    method = ViCo(comps, MethodConfig(init_word="cat", resolution=32))
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 16, 16, generator=g, dtype=torch.float64)
    results = {}
    for name, cls in BASELINES.items():
        fused.attach(comps.unet, cls)
        gen = torch.Generator().manual_seed(1)
        batch = method.make_batch(mean, torch.zeros_like(mean), gen, batch_size=2)
        loss, logs = method.training_loss(batch, gen)
        grads = torch.autograd.grad(loss, [method.embedding.learned] + list(method.blocks.parameters()))
        results[name] = (loss.detach(), grads)
    want_loss, want_grads = results["fused"]
    for name in ("paper", "diffusers+maps"):
        loss, grads = results[name]
        torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=1e-12)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
