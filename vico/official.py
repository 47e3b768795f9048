"""Concepts trained with the official code of ViCo, CatVersion and AttnDreamBooth, imported as this
project's concept folders (CatVersion and AttnDreamBooth: see their sections below).

The official trainer (an LDM/Lightning fork, ``ldm/models/diffusion/ddpm.py``
``on_save_checkpoint``) writes two files per checkpoint:

- ``embeddings.pt`` / ``embeddings_gs-<step>.pt``: the embedding manager's
  ``{"string_to_token": {token: id}, "string_to_param": ParameterDict{token: [1, dim]}}``;
- ``cross_attention.pt`` / ``cross_attention-<step>.pt``: every UNet tensor whose
  name contains ``image_cross_attention``, with LDM names such as
  ``diffusion_model.output_blocks.4.1.image_cross_attention.attn1.to_q.weight``.

Each LDM image block is a ``BasicTransformerBlock`` with the same sub-module
names as diffusers' (``attn1``/``attn2`` ``to_q``/``to_k``/``to_v``/``to_out.0``,
``ff.net.0.proj`` (GEGLU), ``ff.net.2``, ``norm1..3``), so a block maps by its
place alone: LDM's ``output_blocks[i]`` is diffusers' ``up_blocks[i // (r + 1)]``
with ``attentions[i % (r + 1)]``, r = ``layers_per_block``. Both files are read
with ``torch.load(weights_only=True)`` (the ``ParameterDict`` allowed by name):
nothing in them can run code.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .files import load_tensors_only
from .model import UnreadableFile, UserError

LDM_BLOCK = re.compile(r"(?:^|\.)output_blocks\.(\d+)\.1\.image_cross_attention\.(.+)$")


def ldm_output_block(layer: str, layers_per_block: int) -> int:
    """LDM ``output_blocks`` index of a diffusers decoder transformer ("up_blocks.2.attentions.0" -> 6 on SD 1.5)."""
    match = re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)", layer)
    if not match:
        raise ValueError(f"{layer!r} is not a decoder transformer name (up_blocks.U.attentions.A)")
    return int(match.group(1)) * (layers_per_block + 1) + int(match.group(2))


def check_sd_model(model: str | Path) -> None:
    """The official codes train on SD 1.x/2.x: an SDXL ``--model`` is one line (its second text encoder would
    keep the class word's row, not the concept's)."""
    from .model import model_family

    if Path(model).is_dir() and model_family(model) == "sdxl":
        raise UserError(f"--model {model} is an SDXL pipeline; the official codes train on SD 1.x/2.x, so `vico "
                        "import` reads their concepts onto SD 1.x/2.x models only")


def load_official_file(path: str | Path, what: str) -> dict:
    """A ``.pt`` file of the official code, loaded without running code; one line when it is not one."""
    data = load_tensors_only(path, what, allowed=(torch.nn.ParameterDict,))
    if not isinstance(data, dict):
        raise UnreadableFile(f"{what} file {path} holds a {type(data).__name__}, not a dict")
    return data


def pick_token(tokens, path: Path, token: str | None) -> str:
    """``token`` if the file has it; None: the file's only token; else a one-line error listing them."""
    if token is None:
        if len(tokens) != 1:
            raise UserError(f"{path} holds several tokens ({', '.join(tokens)}); name one with --official-token")
        return next(iter(tokens))
    if token not in tokens:
        raise UserError(f"{path} has no token {token!r} (it has {', '.join(tokens)})")
    return token


def official_embedding(data: dict, path: Path, token: str | None = None) -> torch.Tensor:
    """The learned vector [1, dim] of ``token`` (the only one when None) from an embedding manager's file."""
    params = data.get("string_to_param")
    if params is None or not len(params):
        raise UnreadableFile(f"{path} has no string_to_param: not an official ViCo embeddings file")
    token = pick_token(params, path, token)
    vec = torch.as_tensor(params[token]).detach().float()
    if vec.dim() != 2 or vec.shape[0] != 1:
        raise UserError(f"{path}: token {token!r} has {tuple(vec.shape)} vectors; only one vector per token "
                        "(num_vectors_per_token 1, the official default) imports")
    return vec


def official_blocks(data: dict, path: Path, layers_per_block: int, decoder: list[str]) -> dict[str, dict]:
    """LDM image-block tensors grouped by the diffusers decoder transformer they belong to."""
    by_index = {ldm_output_block(name, layers_per_block): name for name in decoder}
    blocks: dict[str, dict] = {}
    for key, value in data.items():
        match = LDM_BLOCK.search(key)
        if match is None:
            continue
        index = int(match.group(1))
        if index not in by_index:
            raise UserError(f"{path}: {key} sits in output_blocks[{index}], which has no spatial transformer in "
                            "this model (a different base model?)")
        blocks.setdefault(by_index[index], {})[match.group(2)] = torch.as_tensor(value).detach().float()
    if not blocks:
        raise UnreadableFile(f"{path} has no image_cross_attention tensors: not an official ViCo cross_attention file")
    return dict(sorted(blocks.items(), key=lambda kv: decoder.index(kv[0])))


def import_vico(model: str | Path, embeddings: str | Path, cross_attention: str | Path, out: str | Path,
                placeholder: str = "S*", init_word: str = "object", official_token: str | None = None) -> Path:
    """Write a ViCo concept folder in ``out`` from the official code's two files, on base model ``model``."""
    from .image_attention import decoder_transformers
    from .methods.base import MethodConfig
    from .methods.vico import ViCo, ViCoOptions
    from .model import check_output_folder, load_components

    check_output_folder(out)
    check_sd_model(model)
    emb_data = load_official_file(embeddings, "embeddings")
    ca_data = load_official_file(cross_attention, "cross_attention")
    vec = official_embedding(emb_data, Path(embeddings), official_token)
    comps = load_components(model)
    blocks = official_blocks(ca_data, Path(cross_attention), int(comps.unet.config.layers_per_block),
                             decoder_transformers(comps.unet))
    dim = comps.text_encoder.get_input_embeddings().weight.shape[1]
    if vec.shape[1] != dim:
        raise UserError(f"{embeddings}: the learned vector has {vec.shape[1]} dims, this text encoder {dim} "
                        "(a different base model?)")
    method = ViCo(comps, MethodConfig(placeholder=placeholder, init_word=init_word, resolution=comps.native_resolution,
                                      options=ViCoOptions(layers=list(blocks))))
    with torch.no_grad():
        method.embedding.learned.copy_(vec.to(method.embedding.learned))
    for layer, tensors in blocks.items():
        block = method.blocks[layer.replace(".", "-")].block
        try:
            block.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise UserError(f"{cross_attention}: the image block of {layer} does not fit this model: "
                            f"{' '.join(first[1:2] or first)[:300]}") from None
    return method.save(out)


# --- CatVersion (RoyZhao926/CatVersion) --------------------------------------------------------------------------
#
# Its trainer (`ldm/modules/encoders/modules.py` adapter_save -> adapter-transformers `save_adapter`) writes
# `adapter_gs-<step>/` with `adapter_config.json` (prefix_tuning, flat, prefix_length 1) and `pytorch_adapter.bin`:
# one flat `control_trans` vector of prefix_length x n_layers x 2 x hidden, stored once per layer that has a
# prefix shim (`text_model.encoder.layers.<i>.self_attn.prefix_tuning.pool.prefix_tunings.<name>.<location>.
# control_trans`, the official run: layers 9-11) and once for the pool. `FlatPrefixTuning.forward` views it as
# [prefix_length, 2 n_layers, heads, head_dim] and hands layer slot 2i (key) and 2i+1 (value) to the i-th
# shimmed layer, in layer order; both are in the projected key/value space, as this project's prefix.

CATVERSION_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.prefix_tuning\.pool\.prefix_tunings\.[^.]+\.[^.]+"
                              r"\.control_trans$")
CLIP_SELF_ATTENTION = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn$")


def official_catversion_prefix(data: dict, path: Path, hidden: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{CLIP layer index: (key [hidden], value [hidden])} from an official ``pytorch_adapter.bin``."""
    flat = {int(m.group(1)): torch.as_tensor(v).detach().float()
            for k, v in data.items() if (m := CATVERSION_LAYER.search(k)) is not None}
    if not flat:
        mlp = [k for k in data if ".control_trans." in k or k.endswith(".wte.weight")]
        if mlp:
            raise UserError(f"{path} holds the unflattened prefix MLP ({mlp[0]}); only the flat form the official "
                            "CatVersion config saves (\"flat\": true) imports")
        raise UnreadableFile(f"{path} has no prefix_tuning control_trans tensors: not an official CatVersion "
                             "pytorch_adapter.bin")
    layers = sorted(flat)
    vector = flat[layers[0]]
    if any(not torch.equal(flat[i], vector) for i in layers[1:]):
        raise UnreadableFile(f"{path}: the layers hold different prefix vectors (one shared pool is expected)")
    per_prefix = len(layers) * 2 * hidden
    if vector.dim() != 1 or vector.numel() % per_prefix:
        raise UserError(f"{path}: a prefix of {vector.numel()} values does not split into {len(layers)} layers x "
                        f"(key, value) x {hidden} (a different base model?)")
    if vector.numel() != per_prefix:
        raise UserError(f"{path}: prefix_length {vector.numel() // per_prefix}; this project's CatVersion learns "
                        "one key and value per layer (the official prefix_length 1)")
    slots = vector.view(1, 2 * len(layers), hidden)[0]  # [2 n_layers, hidden]: heads x head_dim, contiguous
    return {layer: (slots[2 * i], slots[2 * i + 1]) for i, layer in enumerate(layers)}


def import_catversion(model: str | Path, adapter: str | Path, out: str | Path, init_word: str = "object") -> Path:
    """Write a CatVersion concept folder in ``out`` from the official ``adapter_gs-<step>`` folder (or its
    ``pytorch_adapter.bin``), on base model ``model``; ``init_word`` is the class word prompts use."""
    from .methods.base import MethodConfig
    from .methods.catversion import CatVersion, CatVersionOptions, _clip_attention_layers
    from .model import check_output_folder, load_components

    check_output_folder(out)
    check_sd_model(model)
    adapter = Path(adapter)
    weights = adapter / "pytorch_adapter.bin" if adapter.is_dir() else adapter
    data = load_official_file(weights, "adapter")
    comps = load_components(model)
    prefix = official_catversion_prefix(data, weights, int(comps.text_encoder.config.hidden_size))
    names = {int(m.group(1)): n for n, _ in _clip_attention_layers(comps.text_encoder)
             if (m := CLIP_SELF_ATTENTION.search(n)) is not None}
    missing = sorted(set(prefix) - set(names))
    if missing:
        raise UserError(f"{weights}: prefixes for CLIP layers {missing}, which this text encoder "
                        f"({len(names)} layers) does not have (a different base model?)")
    indices = sorted(prefix)
    layers = [names[i] for i in indices]
    method = CatVersion(comps, MethodConfig(init_word=init_word, resolution=comps.native_resolution,
                                            options=CatVersionOptions(prefix_layers=layers)))
    state = {}
    for i, name in zip(indices, layers):
        state[f"{name}.prefix_key"], state[f"{name}.prefix_value"] = prefix[i]
    method.load_state_dict(state)
    return method.save(out)


# --- AttnDreamBooth (lyuPang/AttnDreamBooth) ---------------------------------------------------------------------
#
# `train_attndreambooth.py` writes `learned_embeds_steps_<step>.bin` (torch.save of {token: embedding [dim]},
# `save_learned_embedding`) and `full_model_step_<step>/`, a diffusers pipeline folder whose `unet/` holds the
# fine-tuned UNet (`save_full_model`); its `inference.py` loads exactly those two.


def official_token_embedding(data: dict, path: Path, token: str | None = None) -> torch.Tensor:
    """The learned embedding [dim] of ``token`` (the only one when None) from a {token: tensor} file."""
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise UnreadableFile(f"{path} holds no {{token: embedding}} tensors: not an official learned_embeds file")
    token = pick_token(tensors, path, token)
    vec = tensors[token].detach().float()
    if vec.dim() == 2 and vec.shape[0] == 1:
        vec = vec[0]
    if vec.dim() != 1:
        raise UserError(f"{path}: token {token!r} has shape {tuple(vec.shape)}; one vector [dim] is expected")
    return vec


def import_attndreambooth(model: str | Path, embeddings: str | Path, unet: str | Path, out: str | Path,
                          placeholder: str = "S*", init_word: str = "object",
                          official_token: str | None = None) -> Path:
    """Write an AttnDreamBooth concept folder in ``out`` from the official ``learned_embeds_steps_<step>.bin``
    and ``full_model_step_<step>`` folder (or its ``unet/``), on base model ``model``; ``init_word`` is the
    category word the official prompts write after the token ("[V] category")."""
    from diffusers import UNet2DConditionModel

    from .methods.attndreambooth import AttnDreamBooth
    from .methods.base import MethodConfig
    from .model import check_output_folder, load_components

    check_output_folder(out)
    check_sd_model(model)
    vec = official_token_embedding(load_official_file(embeddings, "embeddings"), Path(embeddings), official_token)
    unet_dir = Path(unet)
    if (unet_dir / "unet").is_dir():
        unet_dir = unet_dir / "unet"
    if not (unet_dir / "config.json").is_file():
        raise UserError(f"{unet} is not a diffusers UNet folder (no config.json; pass full_model_step_<step> or "
                        "its unet/)")
    try:
        trained = UNet2DConditionModel.from_pretrained(unet_dir)
    except Exception as exc:  # a truncated or foreign weights file: one line
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UnreadableFile(f"cannot load the UNet in {unet_dir}: {first}") from None
    comps = load_components(model)
    dim = comps.text_encoder.get_input_embeddings().weight.shape[1]
    if vec.shape[0] != dim:
        raise UserError(f"{embeddings}: the learned vector has {vec.shape[0]} dims, this text encoder {dim} "
                        "(a different base model?)")
    method = AttnDreamBooth(comps, MethodConfig(placeholder=placeholder, init_word=init_word, resolution=comps.native_resolution))
    try:
        comps.unet.load_state_dict(trained.state_dict(), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UserError(f"{unet_dir}: the UNet does not fit this base model: {' '.join(first[1:2] or first)[:300]}") \
            from None
    with torch.no_grad():
        method.embedding.learned.copy_(vec.reshape(method.embedding.learned.shape).to(method.embedding.learned))
    return method.save(out)
