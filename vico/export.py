"""``vico export``: a concept's learned token embedding in the files other tools load.

Only the embedding leaves: what a method learns besides it (ViCo's image attention blocks,
AttnDreamBooth's fine-tuned UNet) needs this project's sampler, and CatVersion learns no
embedding at all. The layouts, as the tools' loaders read them (docs/methods.md §9):

- ``a1111`` and ``comfyui``: a safetensors file holding one tensor ``emb_params`` [n_vectors, dim].
  AUTOMATIC1111's ``EmbeddingDatabase.load_from_file`` takes a one-tensor dict as a "diffuser
  concept" and ComfyUI's ``sd1_clip.load_embed`` takes its only value; the prompt names it by the
  file's name. The two formats are one file; the option picks how the tool is told to use it.
- ``diffusers``: ``{placeholder: [n_vectors, dim]}``, what diffusers' own Textual Inversion script
  saves: ``load_textual_inversion`` takes the key of a one-tensor dict as the token.

An SDXL concept (two text encoders) gives one tensor per encoder: ``clip_l`` [n, 768] and ``clip_g``
[n, 1280] in one A1111/ComfyUI file (A1111 tests for both keys, ComfyUI reads its encoder's key).
``--format diffusers`` refuses it: ``load_textual_inversion`` loads one text encoder per call, and that
file loads into diffusers as it is (``SDXL_DIFFUSERS`` says how).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .files import atomic_write
from .model import UserError

FORMATS = ("a1111", "comfyui", "diffusers")
SDXL_KEYS = ("clip_l", "clip_g")  # the tools' names of SDXL's text_encoder and text_encoder_2
EXPORT_TAG = "vico_export"  # safetensors metadata key: the file is vico's own, `vico export` may replace it

# method -> what does not transfer (None: everything it learns is the embedding)
EXPORTABLE = {
    "textual-inversion": None,
    "vico": "ViCo's image attention blocks (attention to a reference image)",
    "attndreambooth": "AttnDreamBooth's fine-tuned UNet (the embedding was learned with it; a --unet-lora-rank "
                      "concept has it for diffusers in its pytorch_lora_weights.safetensors)",
}
NOT_EXPORTABLE = {"catversion": "CatVersion learns key/value prefixes of text-encoder layers, no token embedding"}


def tool_tensors(fmt: str, token: str, vectors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of an exported file: ``vectors`` holds one [n_vectors, dim] tensor per text encoder,
    in the pipeline's order (SD 1.x/2.x: one); dtypes are kept."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if len(vectors) == 1:
        return {token: vectors[0]} if fmt == "diffusers" else {"emb_params": vectors[0]}
    if fmt == "diffusers" or len(vectors) != len(SDXL_KEYS):
        raise ValueError(f"{len(vectors)} text encoders: diffusers loads one per file, A1111/ComfyUI read SDXL's two")
    return dict(zip(SDXL_KEYS, vectors))


SDXL_DIFFUSERS = ("state = safetensors.torch.load_file(FILE); pipe.load_textual_inversion(state['clip_l'], token=T, "
                  "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer); the same with state['clip_g'], "
                  "pipe.text_encoder_2 and pipe.tokenizer_2")


def check_out(out: Path, fmt: str) -> None:
    """``--out`` must be a .safetensors file in an existing folder, either new or an earlier ``vico export``
    (a file vico did not write is never replaced); one line naming it otherwise."""
    from safetensors import safe_open

    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: name it NAME.safetensors (A1111 and ComfyUI pick the reader by the extension)")
    if fmt == "comfyui" and any(ch.isspace() for ch in out.stem):
        raise UserError(f"--out {out}: ComfyUI reads `embedding:NAME` up to the first space; choose a name without spaces")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist (export writes into an existing folder, "
                        "e.g. the tool's embeddings folder)")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the file to write, NAME.safetensors")
    if out.exists() or out.is_symlink():
        try:
            with safe_open(str(out), "pt") as handle:
                ours = EXPORT_TAG in (handle.metadata() or {}) and not out.is_symlink()
        except Exception:  # not a safetensors file at all
            ours = False
        if not ours:
            raise UserError(f"--out {out} exists and was not written by vico export; refusing to replace it "
                            "(move it away or choose another --out)")


def export_concept(concept: str | Path, fmt: str, out: str | Path) -> tuple[dict, str | None]:
    """Write ``concept``'s embedding to ``out`` in format ``fmt``; returns concept.json and what did not
    transfer (None when nothing was left behind)."""
    from safetensors.torch import save_file

    from .methods.base import check_concept

    out = Path(out)
    meta = check_concept(concept)
    method = meta["method"]
    if method in NOT_EXPORTABLE:
        raise UserError(f"--concept {concept}: {NOT_EXPORTABLE[method]}; nothing to export (`vico sample` "
                        "samples it)")
    vectors = concept_embeddings(concept)  # [n_vectors, dim] per text encoder
    if len(vectors) > 1 and fmt == "diffusers":
        raise UserError(f"--format diffusers: {concept} was trained on SDXL, whose two text encoders diffusers loads "
                        "one per call; export --format a1111 (clip_l and clip_g in one file) and load it with "
                        f"{SDXL_DIFFUSERS}")
    check_out(out, fmt)
    config = meta["config"]
    data = tool_tensors(fmt, config["placeholder"], vectors)
    info = {EXPORT_TAG: fmt, "method": method, "placeholder": config["placeholder"],
            "init_word": config["init_word"], "base_model": str(meta.get("base_model"))}
    atomic_write(out, lambda p: save_file(data, str(p), metadata=info))
    return meta, EXPORTABLE[method]


def concept_embeddings(concept: str | Path) -> list[torch.Tensor]:
    """The concept's learned rows, one [n_vectors, dim] tensor per text encoder (SDXL: two), contiguous."""
    from safetensors import safe_open

    from .methods.base import WEIGHTS_FILE, read_concept
    from .methods.textual_inversion import EMBEDDING_KEYS

    with safe_open(str(Path(concept) / WEIGHTS_FILE), "pt") as handle:  # read by check_concept already
        present = set(handle.keys())
    names = EMBEDDING_KEYS[:1] + tuple(key for key in EMBEDDING_KEYS[1:] if key in present)
    _, tensors = read_concept(concept, names=names)
    return [tensors[name].contiguous() for name in names]


def usage(fmt: str, out: Path, meta: dict) -> str:
    """How the exported file is used in the tool of ``fmt``, the concept named as its method's prompts do."""
    from .methods import get_method

    phrase = get_method(meta["method"]).concept_phrase
    word = meta["config"]["init_word"]
    if fmt == "a1111":
        return f"copy it into stable-diffusion-webui/embeddings/ and write {phrase(out.stem, word)!r} in prompts"
    if fmt == "comfyui":
        return f"copy it into ComfyUI/models/embeddings/ and write {phrase('embedding:' + out.stem, word)!r} in prompts"
    token = meta["config"]["placeholder"]
    return f"pipe.load_textual_inversion({str(out)!r}) and write {phrase(token, word)!r} in prompts"
