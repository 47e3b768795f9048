"""`vico import`: concepts saved by the official ViCo code, in exactly its file layouts, become concept
folders whose image blocks compute the official LDM block's function."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vico import cli
from vico.image_attention import decoder_transformers, default_image_attention_layers
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
    assert decoder_transformers(comps.unet)  # the tiny UNet has decoder transformers to map onto


# --- CatVersion and AttnDreamBooth -------------------------------------------------------------------------------


def catversion_adapter(folder, text_encoder, layers, seed=0):
    """adapter_gs-999/ as the official adapter-transformers save_adapter writes it: one flat control_trans
    vector (1 x n_layers x 2 x hidden), stored under every shimmed layer's pool path and the pool's."""
    hidden = text_encoder.config.hidden_size
    flat = torch.randn(len(layers) * 2 * hidden, generator=torch.Generator().manual_seed(seed))
    path = "prefix_tunings.prefix_tuning1.clip_text_model_self_prefix.control_trans"
    state = {f"text_model.encoder.layers.{i}.self_attn.prefix_tuning.pool.{path}": flat for i in layers}
    state[f"prefix_tuning.{path}"] = flat
    folder.mkdir()
    torch.save(state, folder / "pytorch_adapter.bin")
    (folder / "adapter_config.json").write_text('{"config": {"architecture": "prefix_tuning", "flat": true, '
                                                '"prefix_length": 1}, "name": "prefix_tuning1"}')
    return flat


def test_imported_catversion_adapter_gives_each_layer_the_official_prefix(model_dir, tmp_path):
    comps = load_components(model_dir)
    te = comps.text_encoder
    n_layers = te.config.num_hidden_layers
    layers = list(range(max(0, n_layers - 3), n_layers))  # the official run: the last three (9-11 of CLIP-L)
    flat = catversion_adapter(tmp_path / "adapter_gs-999", te, layers)
    out = tmp_path / "concept"
    assert run("import", "--from", "catversion", "--model", model_dir, "--adapter", tmp_path / "adapter_gs-999",
               "--out", out, "--init-word", "cat") == 0
    meta = read_concept_meta(out)
    assert meta["method"] == "catversion" and meta["config"]["init_word"] == "cat"
    method = load_method(load_components(model_dir), out)
    # The official FlatPrefixTuning.forward, step by step: view, permute, split; layer i gets chunk i.
    heads, hidden = te.config.num_attention_heads, te.config.hidden_size
    chunks = flat.unsqueeze(0).view(1, 1, 2 * len(layers), heads, hidden // heads).permute(2, 0, 3, 1, 4).split(2)
    # each chunk: [2 (key, value), batch, heads, prefix_length, head_dim]
    assert len(method.prefix) == len(layers)
    for (name, module), (keys, values) in zip(method.prefix.items(), chunks):
        assert name.endswith(f"layers.{layers[list(method.prefix).index(name)]}.self_attn")
        # this project splits its prefix vector into heads exactly as the projected keys: view(heads, head_dim)
        torch.testing.assert_close(module.prefix_key.detach().view(heads, -1), keys[0, :, 0], rtol=0, atol=0)
        torch.testing.assert_close(module.prefix_value.detach().view(heads, -1), values[0, :, 0], rtol=0, atol=0)


def attndreambooth_outputs(tmp_path, comps, seed=0):
    """learned_embeds_steps_10.bin ({token: [dim]}) and full_model_step_10/unet as the official script saves."""
    g = torch.Generator().manual_seed(seed)
    dim = comps.text_encoder.get_input_embeddings().weight.shape[1]
    vec = torch.randn(dim, generator=g)
    torch.save({"<new1>": vec}, tmp_path / "learned_embeds_steps_10.bin")
    unet = comps.unet
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    unet.save_pretrained(tmp_path / "full_model_step_10" / "unet")
    return vec, {k: v.clone() for k, v in unet.state_dict().items()}


def test_imported_attndreambooth_concept_has_the_official_embedding_and_unet(model_dir, tmp_path, capsys):
    vec, weights = attndreambooth_outputs(tmp_path, load_components(model_dir))
    out = tmp_path / "concept"
    assert run("import", "--from", "attndreambooth", "--model", model_dir, "--embeddings",
               tmp_path / "learned_embeds_steps_10.bin", "--unet", tmp_path / "full_model_step_10", "--out", out,
               "--init-word", "cat") == 0
    assert read_concept_meta(out)["method"] == "attndreambooth"
    method = load_method(load_components(model_dir), out)
    torch.testing.assert_close(method.embedding.learned.detach().reshape(-1), vec, rtol=0, atol=0)
    got = method.components.unet.state_dict()
    assert all(torch.equal(got[k], v) for k, v in weights.items())
    assert method.concept_phrase("S*", "cat") == "S* cat"  # the official "[V] category" prompts
    # Missing pieces and foreign files: one line each, before the model loads.
    cases = [
        (["--embeddings", tmp_path / "learned_embeds_steps_10.bin"], "--from attndreambooth needs --unet"),
        (["--embeddings", tmp_path / "learned_embeds_steps_10.bin", "--unet", tmp_path], "is not a diffusers UNet"),
        (["--embeddings", tmp_path / "full_model_step_10" / "unet" / "config.json", "--unet",
          tmp_path / "full_model_step_10"], "embeddings file"),
    ]
    for extra, message in cases:
        code = run("import", "--from", "attndreambooth", "--model", model_dir, *extra, "--out", tmp_path / "o")
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (message, err)


def test_catversion_import_refuses_foreign_adapters_in_one_line(model_dir, tmp_path, capsys):
    te = load_components(model_dir).text_encoder
    n = te.config.num_hidden_layers
    catversion_adapter(tmp_path / "good", te, [n - 1])
    torch.save({"prefix_tuning.prefix_tunings.p.self_prefix.control_trans.0.weight": torch.zeros(4, 4)},
               tmp_path / "mlp.bin")
    torch.save({"unrelated": torch.zeros(3)}, tmp_path / "foreign.bin")
    long = torch.load(tmp_path / "good" / "pytorch_adapter.bin")
    torch.save({k: torch.cat([v, v]) for k, v in long.items()}, tmp_path / "long.bin")  # prefix_length 2
    wrong = {k.replace(f"layers.{n - 1}.", "layers.99."): v for k, v in long.items()}
    torch.save(wrong, tmp_path / "wrong.bin")
    cases = [(tmp_path / "mlp.bin", "unflattened prefix MLP"), (tmp_path / "foreign.bin", "not an official CatVersion"),
             (tmp_path / "long.bin", "prefix_length 2"), (tmp_path / "wrong.bin", "CLIP layers [99]"),
             (tmp_path / "missing", "does not exist")]
    for adapter, message in cases:
        code = run("import", "--from", "catversion", "--model", model_dir, "--adapter", adapter, "--out",
                   tmp_path / "o")
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (message, err)
