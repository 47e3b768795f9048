"""`vico import`: concepts saved by the official ViCo code, in exactly its file layouts, become concept
folders whose image blocks compute the official LDM block's function."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vico import cli
from vico.image_attention import _decoder_transformers, default_image_attention_layers
from vico.methods import load_method
from vico.methods.base import read_concept_meta
from vico.model import load_components
from vico.official import ldm_output_block


def ldm_block_state(dim: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors under the official BasicTransformerBlock's names (ldm/modules/attention.py)."""
    inner, ff = dim, 4 * dim
    shapes = {"attn1.to_q.weight": (inner, dim), "attn1.to_k.weight": (inner, dim), "attn1.to_v.weight": (inner, dim),
              "attn1.to_out.0.weight": (dim, inner), "attn1.to_out.0.bias": (dim,),
              "attn2.to_q.weight": (inner, dim), "attn2.to_k.weight": (inner, dim), "attn2.to_v.weight": (inner, dim),
              "attn2.to_out.0.weight": (dim, inner), "attn2.to_out.0.bias": (dim,),
              "ff.net.0.proj.weight": (2 * ff, dim), "ff.net.0.proj.bias": (2 * ff,),
              "ff.net.2.weight": (dim, ff), "ff.net.2.bias": (dim,)}
    state = {k: torch.randn(s, generator=generator, dtype=torch.float64) * 0.2 for k, s in shapes.items()}
    for i in (1, 2, 3):
        state[f"norm{i}.weight"] = 1 + 0.1 * torch.randn(dim, generator=generator, dtype=torch.float64)
        state[f"norm{i}.bias"] = 0.1 * torch.randn(dim, generator=generator, dtype=torch.float64)
    return state


def ldm_block(x, xr, w, heads, mask):
    """The official block's formula: self-attention, masked cross-attention to the reference, GEGLU."""
    def attention(h, ctx, prefix, key_mask=None):
        q, k, v = (t @ w[f"{prefix}.to_{n}.weight"].T for t, n in ((h, "q"), (ctx, "k"), (ctx, "v")))
        b, n, c = q.shape
        q, k, v = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
        sim = q @ k.transpose(-1, -2) * (c // heads) ** -0.5
        if key_mask is not None:
            sim = sim.masked_fill(~key_mask[:, None, None, :], -torch.finfo(sim.dtype).max)
        out = (sim.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return out @ w[f"{prefix}.to_out.0.weight"].T + w[f"{prefix}.to_out.0.bias"]

    def norm(h, i):
        return F.layer_norm(h, h.shape[-1:], w[f"norm{i}.weight"], w[f"norm{i}.bias"], 1e-5)

    x = attention(norm(x, 1), norm(x, 1), "attn1") + x
    x = attention(norm(x, 2), xr, "attn2", mask) + x
    a, gate = (norm(x, 3) @ w["ff.net.0.proj.weight"].T + w["ff.net.0.proj.bias"]).chunk(2, dim=-1)
    return (a * F.gelu(gate)) @ w["ff.net.2.weight"].T + w["ff.net.2.bias"] + x


def official_files(tmp_path, unet, dim_text, layers, seed=0):
    """embeddings.pt and cross_attention-399.pt as the official on_save_checkpoint writes them."""
    g = torch.Generator().manual_seed(seed)
    params = nn.ParameterDict({"*": nn.Parameter(torch.randn(1, dim_text, generator=g))})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, tmp_path / "embeddings.pt")
    r = unet.config.layers_per_block
    states, ca = {}, {}
    for layer in layers:
        dim = unet.get_submodule(layer).transformer_blocks[0].norm1.normalized_shape[0]
        states[layer] = ldm_block_state(dim, g)
        prefix = f"diffusion_model.output_blocks.{ldm_output_block(layer, r)}.1.image_cross_attention."
        ca.update({prefix + k: v.float() for k, v in states[layer].items()})
    torch.save(ca, tmp_path / "cross_attention-399.pt")
    return params["*"].detach(), states


def run(*argv):
    return cli.main([str(a) for a in argv])


def test_ldm_output_block_index_of_sd15_decoder_transformers():
    # SD 1.5 (layers_per_block 2): ViCo's four blocks sit in LDM output_blocks 4, 6, 8, 10
    assert [ldm_output_block(n, 2) for n in ("up_blocks.1.attentions.1", "up_blocks.2.attentions.0",
                                             "up_blocks.2.attentions.2", "up_blocks.3.attentions.1")] == [4, 6, 8, 10]
    with pytest.raises(ValueError, match="not a decoder transformer"):
        ldm_output_block("down_blocks.0.attentions.0", 2)


def test_imported_concept_computes_the_official_block(model_dir, tmp_path):
    comps = load_components(model_dir)
    layers = default_image_attention_layers(comps.unet)
    dim_text = comps.text_encoder.get_input_embeddings().weight.shape[1]
    vec, states = official_files(tmp_path, comps.unet, dim_text, layers)
    out = tmp_path / "concept"
    assert run("import", "--model", model_dir, "--embeddings", tmp_path / "embeddings.pt", "--cross-attention",
               tmp_path / "cross_attention-399.pt", "--out", out, "--init-word", "cat") == 0
    assert read_concept_meta(out)["method"] == "vico"
    method = load_method(load_components(model_dir), out)  # what `vico sample` loads
    torch.testing.assert_close(method.embedding.learned.detach(), vec, rtol=0, atol=0)
    assert method.layers == layers
    g = torch.Generator().manual_seed(1)
    for layer in layers:
        block = method.blocks[layer.replace(".", "-")].block.double()
        dim, heads = states[layer]["norm1.weight"].shape[0], block.attn1.heads
        x, xr = (torch.randn(2, 16, dim, generator=g, dtype=torch.float64) for _ in range(2))
        mask = torch.rand(2, 16, generator=g) > 0.4
        mask[:, 0] = True
        ours = block(x, encoder_hidden_states=xr, cross_attention_kwargs={"key_mask": mask})
        official = ldm_block(x, xr, {k: v.float().double() for k, v in states[layer].items()}, heads, mask)
        torch.testing.assert_close(ours, official, rtol=1e-6, atol=1e-6)


def test_import_refuses_code_and_foreign_files_in_one_line(model_dir, tmp_path, capsys):
    comps = load_components(model_dir)
    layers = default_image_attention_layers(comps.unet)
    dim_text = comps.text_encoder.get_input_embeddings().weight.shape[1]
    official_files(tmp_path, comps.unet, dim_text, layers)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"string_to_param": Exploit()}, f, protocol=2)
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    torch.save({"unrelated": torch.zeros(2)}, tmp_path / "foreign.pt")
    ca = torch.load(tmp_path / "cross_attention-399.pt")
    torch.save({k.replace(".output_blocks.", ".output_blocks.9"): v for k, v in ca.items()}, tmp_path / "moved.pt")
    emb, cross = tmp_path / "embeddings.pt", tmp_path / "cross_attention-399.pt"
    cases = [
        ((tmp_path / "evil.pt", cross), "refusing to load embeddings file"),
        ((tmp_path / "garbage.pt", cross), "is unreadable"),
        ((tmp_path / "missing.pt", cross), "does not exist"),
        ((tmp_path / "foreign.pt", cross), "not an official ViCo embeddings file"),
        ((emb, tmp_path / "foreign.pt"), "not an official ViCo cross_attention file"),
        ((emb, tmp_path / "moved.pt"), "has no spatial transformer in this model"),
    ]
    for (e, c), message in cases:
        code = run("import", "--model", model_dir, "--embeddings", e, "--cross-attention", c, "--out", tmp_path / "o")
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (message, err)
    assert not marker.exists() and not (tmp_path / "o" / "concept.json").exists()
    assert _decoder_transformers(comps.unet)  # the tiny UNet has decoder transformers to map onto
