"""Concepts trained with the official ViCo code, imported as this project's concept folders.

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


def load_official_file(path: str | Path, what: str) -> dict:
    """A ``.pt`` file of the official code, loaded without running code; one line when it is not one."""
    data = load_tensors_only(path, what, allowed=(torch.nn.ParameterDict,))
    if not isinstance(data, dict):
        raise UnreadableFile(f"{what} file {path} holds a {type(data).__name__}, not a dict")
    return data


def official_embedding(data: dict, path: Path, token: str | None = None) -> torch.Tensor:
    """The learned vector [1, dim] of ``token`` (the only one when None) from an embedding manager's file."""
    params = data.get("string_to_param")
    if params is None or not len(params):
        raise UnreadableFile(f"{path} has no string_to_param: not an official ViCo embeddings file")
    if token is None:
        if len(params) != 1:
            raise UserError(f"{path} holds several tokens ({', '.join(params)}); name one with --official-token")
        token = next(iter(params))
    if token not in params:
        raise UserError(f"{path} has no token {token!r} (it has {', '.join(params)})")
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
    from .image_attention import _decoder_transformers
    from .methods.base import MethodConfig
    from .methods.vico import ViCo
    from .model import check_output_folder, load_components

    check_output_folder(out)
    emb_data = load_official_file(embeddings, "embeddings")
    ca_data = load_official_file(cross_attention, "cross_attention")
    vec = official_embedding(emb_data, Path(embeddings), official_token)
    comps = load_components(model)
    blocks = official_blocks(ca_data, Path(cross_attention), int(comps.unet.config.layers_per_block),
                             _decoder_transformers(comps.unet))
    dim = comps.text_encoder.get_input_embeddings().weight.shape[1]
    if vec.shape[1] != dim:
        raise UserError(f"{embeddings}: the learned vector has {vec.shape[1]} dims, this text encoder {dim} "
                        "(a different base model?)")
    size = comps.unet.config.sample_size * 2 ** (len(comps.vae.config.block_out_channels) - 1)
    method = ViCo(comps, MethodConfig(placeholder=placeholder, init_word=init_word, resolution=size,
                                      extra={"layers": list(blocks)}))
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
