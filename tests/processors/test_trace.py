"""fused.maps.trace and `vico maps` on the tiny SD pipeline."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from diffusers import StableDiffusionPipeline  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402

import fused  # noqa: E402
from fused import maps as fused_maps  # noqa: E402
from vico import cli  # noqa: E402



class Recorder(AttnProcessor):
    """Materialises probabilities and keeps the conditional half's columns per call."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        if encoder_hidden_states is not None:
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probs = attn.get_attention_scores(q, key, None)
            B = hidden_states.shape[0]
            probs = probs.view(B, attn.heads, *probs.shape[1:]).mean(1)  # [B, N, L]
            self.calls.setdefault(self.name, []).append(probs[B // 2:].transpose(1, 2))  # cond half [b, L, N]
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_trace_equals_materialised_aggregate(model_dir):  # noqa: F811
    pipe = StableDiffusionPipeline.from_pretrained(model_dir).to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a photo of a red cat on the beach"
    positions = fused_maps.word_token_positions(pipe.tokenizer, prompt, ["cat", "beach"])
    with fused_maps.trace(pipe, prompt, ["cat", "beach"]) as tr:
        pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert tr.calls == 3 and len(tr.layers) == 4
    got = tr.heatmaps()

    calls = {}
    pipe.unet.set_attn_processor({n: Recorder(n.removesuffix(".processor"), calls) for n in pipe.unet.attn_processors})
    pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    side = 16  # the largest map: 16x16 latent
    for word, pos in positions.items():
        total = torch.zeros(side, side, dtype=torch.float64)
        for layer, per_call in calls.items():
            for probs in per_call:
                m = probs[0, pos].sum(0)
                s = int(m.numel() ** 0.5)
                total += F.interpolate(m.reshape(1, 1, s, s).float(), size=(side, side), mode="bilinear",
                                       align_corners=False)[0, 0].double()
        want = (total - total.min()) / (total.max() - total.min())
        torch.testing.assert_close(got[word].double(), want, rtol=1e-4, atol=1e-5)


def test_trace_gradients_flow_through_maps(model_dir):  # noqa: F811
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    fused.attach(pipe.unet)
    ids = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ctx = pipe.text_encoder(ids)[0].detach().requires_grad_()
    req = fused.MapRequest(torch.tensor([[5]]))
    pipe.unet(torch.randn(1, 4, 16, 16), torch.tensor([500]), ctx, cross_attention_kwargs={"map_request": req})
    (grad,) = torch.autograd.grad(sum(m.sum() for m in req.maps.values()), ctx)
    assert grad.abs().sum() > 0


def test_vico_maps_writes_one_overlay_per_word(model_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "maps"
    assert cli.main(["maps", "--model", str(model_dir), "--prompt", "a photo of a red cat on the beach",
                     "--words", "cat", "beach", "--out", str(out), "--steps", "2"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"image.png", "grid.png", "map_cat.png", "map_beach.png", "mask_cat.png", "mask_beach.png"} <= names
    assert cli.main(["maps", "--model", str(model_dir), "--prompt", "a photo of a cat", "--words", "dog",
                     "--out", str(out), "--steps", "2"]) == 2
    assert "word 'dog' does not occur in the prompt" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from tests import builders as tiny

    return tiny.save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from tests import builders as tiny

    return tiny.save_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux"))


def test_trace_sd3_equals_materialised_joint_attention(sd3_dir):
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from vico.model import load_pipeline

    pipe = load_pipeline(sd3_dir)
    prompt = "a photo of a red cat"
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="np", max_sequence_length=8,
              generator=torch.Generator().manual_seed(0))
    positions = fused_maps.word_token_positions(pipe.tokenizer, prompt, ["cat"])
    with fused_maps.trace(pipe, prompt, ["cat"]) as tr:
        pipe(prompt, **kw)
    got = tr.heatmaps()["cat"]

    total = {}

    class Recorder(JointAttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *a, **k):
            B, n = hidden_states.shape[:2]
            split = lambda y: y.view(B, -1, attn.heads, y.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
            q = torch.cat([split(attn.to_q(hidden_states)), split(attn.add_q_proj(encoder_hidden_states))], 2)
            key = torch.cat([split(attn.to_k(hidden_states)), split(attn.add_k_proj(encoder_hidden_states))], 2)
            p = torch.softmax(q @ key.transpose(-1, -2) * attn.scale, -1).mean(1)  # [B, S, S]
            m = p[B // 2:, :n][..., [n + i for i in positions["cat"]]].sum(-1)[0]  # cond half, image rows
            total["sum"] = total.get("sum", 0) + m
            return super().__call__(attn, hidden_states, encoder_hidden_states, *a, **k)

    pipe.transformer.set_attn_processor(Recorder())
    kw["generator"] = torch.Generator().manual_seed(0)
    pipe(prompt, **kw)
    s = total["sum"].reshape(8, 8)
    torch.testing.assert_close(got, (s - s.min()) / (s.max() - s.min()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_vico_maps_on_joint_attention_pipelines(which, sd3_dir, flux_dir, tmp_path):
    model = sd3_dir if which == "sd3" else flux_dir
    out = tmp_path / which
    assert cli.main(["maps", "--model", str(model), "--prompt", "a photo of a red cat", "--words", "cat", "red",
                     "--out", str(out), "--steps", "2"]) == 0
    assert {"map_cat.png", "map_red.png", "mask_cat.png", "grid.png"} <= {p.name for p in out.iterdir()}
