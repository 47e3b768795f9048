"""DAAM-style token heat maps of a generation, without materialising attention.

    with fused.maps.trace(pipe, prompt, ["cat", "hat"]) as tr:
        image = pipe(prompt).images[0]
    heat = tr.heatmaps()            # {"cat": [h, w], "hat": [h, w]}, first image, normalised to [0, 1]

``trace`` installs the fused processors on the pipeline's denoiser (a UNet:
``FusedAttnProcessor``; an SD3 or FLUX transformer: the joint-attention
processors, image->text block only) and a forward pre-hook (removed on exit)
that passes a ``MapRequest`` into every call. Each call's per-layer maps of
the prompt's tokens (all sub-tokens of each word, every occurrence unless
``occurrence`` picks one) are reshaped to the layer's own ``h x w`` grid (the
generation's latent aspect ratio: non-square images work), upsampled
(bilinear) to the largest layer's grid and summed over layers and timesteps.

Which rows of the denoiser's batch are traced (the rule, per call):

- ``guided=None`` (default): classifier-free guidance is read from the
  pipeline, ``pipe.do_classifier_free_guidance`` (SD 1.x/2.x, SDXL, SD3 set it
  during a call); when it is true the batch is ``[uncond; cond]`` and only the
  second half is traced, otherwise (``guidance_scale <= 1``, FLUX, a pipeline
  without the property, a denoiser called outside a pipeline) every row is.
  ``guided=True``/``False`` overrides the detection.
- A pipeline that runs its unconditional branch as a separate denoiser call
  in the same step (FLUX with ``true_cfg_scale > 1`` and a negative prompt)
  marks the step with ``pipe._current_timestep``; only the first call of each
  step (the conditional one) is traced. SD3's skip-layer guidance calls
  (``skip_layers=...``, a perturbed branch) are not traced either.

Rows are the pipeline's images in order (``num_images_per_prompt=k``: images
0..k-1); ``heatmaps(index=i)`` returns image ``i``'s maps (default 0).

Text positions: SD/SDXL map the CLIP tokens (segment ``"clip"``); SD3's joint
text is the CLIP sequence (``pipe.tokenizer_max_length`` tokens) followed by
the T5 sequence, and a word is mapped in each segment it occurs in (``"clip"``,
``"t5"`` when the pipeline has a T5 encoder) — ``heatmaps()`` is their sum,
``heatmaps(segment="t5")`` one segment; FLUX's transformer attends to T5 tokens
only (CLIP gives just the pooled vector), so its positions come from
``tokenizer_2`` (segment ``"t5"``). Positions past the text the denoiser gets
(``max_sequence_length``) are dropped.

Video pipelines (WanPipeline, CogVideoXPipeline, HunyuanVideoPipeline and
their image-to-video variants but HunyuanVideo's LLaVA one): the
transformer gets the ``fused.processors.video`` processors and the maps are
``[F, h, w]`` in latent patches (frames // patch_t, height // patch_h,
width // patch_w), normalised over the whole clip. Wan maps the T5 tokens of
the cleaned prompt (``prompt_clean``, as the pipeline; segment ``"t5"``) in
every ``attn2``, CogVideoX the T5 tokens in every joint block, HunyuanVideo
the LLaMA tokens (segment ``"llama"``) of its prompt template: a word's
position is its token's index in ``template.format(prompt)`` minus the
template's ``crop_start`` (the system prompt the pipeline crops), found by
the tokenizer's character offsets. Wan and HunyuanVideo run guidance as a
separate call (not traced); CogVideoX batches ``[uncond; cond]`` when
``pipe.guidance_scale > 1``. Wan 2.2's ``transformer_2`` is traced too.

``records=True`` also keeps every layer's map per timestep at its own
resolution; ``MapTrace.save_records(path)`` writes them as safetensors
(``load_records`` reads them back).
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import json
import math
import re
import string
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .processors.joint import FusedFluxAttnProcessor, FusedJointAttnProcessor
from .processors.unet import FusedAttnProcessor, MapRequest, attach, cross_attention_layers
from .processors.video import attach_video, video_family, video_grid

__all__ = ["MapTrace", "trace", "word_token_positions", "select_layers", "load_records", "hunyuan_crop_start",
           "template_token_positions"]


def _tokenise(tokenizer, prompt: str, word: str, max_length: int | None = None) -> tuple[list[list[int]], int]:
    """Every occurrence of ``word``'s sub-token sequence in the tokenised prompt (with specials), and its length."""
    max_length = max_length or tokenizer.model_max_length
    kw = dict(truncation=True, max_length=max_length) if max_length and max_length < 1_000_000 else {}
    ids = tokenizer(prompt, **kw).input_ids
    sub = tokenizer(word, add_special_tokens=False).input_ids
    if not sub:
        return [], len(ids)
    found = [list(range(i, i + len(sub))) for i in range(len(ids) - len(sub) + 1) if ids[i:i + len(sub)] == sub]
    return found, len(ids)


def _pick(found: list[list[int]], occurrence: int | None, word: str, prompt: str) -> list[int]:
    if occurrence is None:  # all occurrences (DAAM's rule)
        return sorted({p for occ in found for p in occ})
    if not -len(found) <= occurrence < len(found):
        raise ValueError(f"word {word!r} occurs {len(found)} time(s) in the prompt {prompt!r}; "
                         f"occurrence={occurrence} is out of range")
    return found[occurrence]


def word_token_positions(tokenizer, prompt: str, words: list[str], occurrence: int | None = None,
                         max_length: int | None = None) -> dict[str, list[int]]:
    """Positions of every sub-token of each word in the tokenised prompt (with specials).

    ``occurrence=None`` (default): every occurrence of a repeated word ("a red
    circle, a blue circle" -> both circles); an int picks one (0 = first,
    -1 = last). Raises ``ValueError`` when a word does not occur.
    """
    positions = {}
    for word in words:
        found, _ = _tokenise(tokenizer, prompt, word, max_length)
        if not found:
            raise ValueError(f"word {word!r} does not occur in the prompt {prompt!r}")
        positions[word] = _pick(found, occurrence, word, prompt)
    return positions


def select_layers(names: list[str], selectors: list[str] | None) -> list[str]:
    """The layers of ``names`` that ``selectors`` choose, in model order.

    A selector chooses a layer when it is the layer's exact name, a module
    prefix of it at a ``.`` boundary (``"up_blocks"``, ``"transformer_blocks.0"``
    -> ``transformer_blocks.0.attn``, never ``single_transformer_blocks.0.attn``)
    or, when it holds ``*``, ``?`` or ``[``, an ``fnmatch`` pattern of the whole
    name (``"transformer_blocks.*"``, ``"up_blocks.*attn2"``). A selector that
    chooses nothing is an error (``ValueError`` naming it and the layers).
    """
    if not selectors:
        return list(names)
    chosen, unmatched = set(), []
    for sel in selectors:
        pattern = any(c in sel for c in "*?[")
        hit = {n for n in names if n == sel or n.startswith(sel + ".") or (pattern and fnmatch.fnmatchcase(n, sel))}
        if not hit:
            unmatched.append(sel)
        chosen |= hit
    if unmatched:
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        raise ValueError(f"no attention layer matches {unmatched} (exact names, module prefixes or fnmatch "
                         f"patterns); the layers are: {shown}")
    return [n for n in names if n in chosen]


def _layer_grid(n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) with h * w == n of a layer whose generation has the token grid ``grid`` (H, W)."""
    if grid is None:
        s = math.isqrt(n)
        if s * s != n:
            raise ValueError(f"cannot tell the height and width of a map of {n} tokens")
        return s, s
    H, W = grid
    f = 1
    while f <= max(H, W):  # the UNet's downsamplings (ceil for odd sizes) or a patch size
        for h, w in ((-(-H // f), -(-W // f)), (H // f, W // f)):
            if h * w == n:
                return h, w
        f *= 2
    for f in range(3, max(H, W) + 1):  # other integer patch sizes
        if H % f == 0 and W % f == 0 and (H // f) * (W // f) == n:
            return H // f, W // f
    raise ValueError(f"a map of {n} tokens fits no downsampling of the {H}x{W} latent")


def _timestep_key(t: float) -> str:
    return f"{t:.10g}"


@dataclass
class MapTrace:
    """What ``trace`` records.

    Attributes:
        positions: word -> segment ("clip", "t5") -> positions in the denoiser's text sequence.
        layers: the traced layer names.
        timesteps: (low, high) filter of the scheduler's timesteps, or None.
        guided: the ``guided`` override of ``trace`` (None: detected per call).
        records: keep per-layer, per-timestep maps (``save_records``).
        sums: word -> segment -> summed maps [images, h, w] (unnormalised).
        calls: denoiser calls traced.
        shape: (h, w) of the aggregate (the largest layer's grid); video: (F, h, w).
        steps: per traced call, (timestep, {layer: {word or "word/segment": [images, h_l, w_l]}}) when ``records``.
        segment_info: segment -> (offset in the text sequence, length of the tokenised prompt there).
        no_end_token: segments whose truncated prompt does not end with an end token (HunyuanVideo's
            template: the pipeline's truncation cuts the prompt and the template's ``<|eot_id|>`` off).
    """

    positions: dict[str, dict[str, list[int]]]
    layers: list[str]
    timesteps: tuple[float, float] | None = None
    guided: bool | None = None
    records: bool = False
    sums: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    calls: int = 0
    shape: tuple[int, ...] | None = None
    steps: list[tuple[float, dict[str, dict[str, torch.Tensor]]]] = field(default_factory=list)
    segment_info: dict[str, tuple[int, int]] = field(default_factory=dict)
    no_end_token: frozenset[str] = frozenset()

    @property
    def segments(self) -> list[str]:
        """The text segments any word is mapped in, in sequence order."""
        return list(dict.fromkeys(s for segs in self.positions.values() for s in segs))

    def heatmaps(self, index: int | None = 0, segment: str | None = None) -> dict[str, torch.Tensor]:
        """Per word, the summed map normalised to [0, 1].

        ``index``: which image (the pipeline's images in order; with
        ``num_images_per_prompt=k`` images 0..k-1, the conditional rows under
        guidance) — default 0, the first image, giving ``[h, w]``; None gives
        every image ``[images, h, w]``, each normalised on its own. Video
        pipelines give ``[F, h, w]`` (``[images, F, h, w]``), normalised over
        the whole clip.
        ``segment``: None (default) sums the word's maps over the text segments
        it occurs in (SD3: CLIP + T5); ``"clip"`` or ``"t5"`` gives one segment
        (a word absent from it is left out).
        """
        dims = len(self.shape) if self.shape else 2
        out = {}
        for word, per_segment in self.sums.items():
            if segment is None:
                total = sum(per_segment.values())
            elif segment in per_segment:
                total = per_segment[segment]
            else:
                continue
            m = total if index is None else total[index]
            flat = m.reshape(-1, math.prod(m.shape[-dims:])) if index is None else m.reshape(1, -1)
            lo, hi = flat.min(-1).values, flat.max(-1).values
            norm = (flat - lo[:, None]) / (hi - lo).clamp(min=1e-12)[:, None]
            out[word] = norm.reshape(m.shape)
        return out

    def _slots(self) -> list[tuple[str, str, int]]:
        return [(word, seg, p) for word, segs in self.positions.items() for seg, pos in segs.items() for p in pos]

    def _valid(self, segment: str, p: int, text_len: int | None) -> bool:
        """Whether joint position ``p`` holds its token in a text sequence of ``text_len`` tokens."""
        if text_len is None:
            return True
        offset, n_ids = self.segment_info.get(segment, (0, 0))
        ends = sorted(o for o, _ in self.segment_info.values() if o > offset)
        seg_len = min((ends[0] if ends else text_len), text_len) - offset
        if n_ids > seg_len and segment not in self.no_end_token:  # truncated: the last slot is the end token
            seg_len -= 1
        return p - offset < seg_len

    def request(self, batch: int, cond_rows: slice, text_len: int | None = None) -> MapRequest:
        """The ``MapRequest`` of one call: slots of positions past ``text_len`` (truncated) are -1."""
        slots = torch.tensor([p if self._valid(seg, p, text_len) else -1 for _, seg, p in self._slots()],
                             dtype=torch.long)
        index = torch.full((batch, len(slots)), -1, dtype=torch.long)
        index[cond_rows] = slots
        return MapRequest(index, layers=self.layers, text_len=text_len)

    def add(self, request: MapRequest, cond_rows: slice, grid: tuple[int, ...] | None = None,
            timestep: float | None = None) -> None:
        """Aggregate one call's maps; ``grid``: the generation's (H, W) token grid (latent or patches),
        or a video transformer's (F, h, w) patch grid (every layer has all of its tokens)."""
        per_layer = {}
        for name, maps in request.maps.items():
            m = maps[cond_rows].detach().float()  # [b, T, N]
            if grid is not None and len(grid) == 3:
                if m.shape[-1] != math.prod(grid):
                    raise ValueError(f"{name}: a map of {m.shape[-1]} tokens is not the {grid} video patch grid")
                per_layer[name] = m.reshape(*m.shape[:2], *grid)
                continue
            h, w = _layer_grid(m.shape[-1], grid)
            per_layer[name] = m.reshape(m.shape[0], m.shape[1], h, w)
        if not per_layer:
            return
        if grid is not None and len(grid) == 3:
            self.shape = tuple(int(g) for g in grid)
            total = sum(per_layer.values())
        else:
            big = max(per_layer.values(), key=lambda m: m.shape[-2] * m.shape[-1]).shape[-2:]
            self.shape = (int(big[0]), int(big[1]))
            total = sum(F.interpolate(m, size=self.shape, mode="bilinear", align_corners=False)
                        for m in per_layer.values())
        spans, start = {}, 0
        for word, segs in self.positions.items():
            for seg, pos in segs.items():
                spans[(word, seg)] = slice(start, start + len(pos))
                start += len(pos)
        for (word, seg), span in spans.items():
            word_map = total[:, span].sum(1)  # all sub-tokens (and occurrences)
            per_word = self.sums.setdefault(word, {})
            per_word[seg] = per_word.get(seg, 0) + word_map.cpu()
        if self.records:
            several = len(self.segments) > 1
            step = {}
            for name, m in per_layer.items():
                entry = {}
                for word, segs in self.positions.items():
                    parts = {seg: m[:, spans[(word, seg)]].sum(1).cpu() for seg in segs}
                    entry[word] = sum(parts.values())
                    if several:
                        entry.update({f"{word}/{seg}": v for seg, v in parts.items()})
                step[name] = entry
            self.steps.append((float("nan") if timestep is None else float(timestep), step))
        self.calls += 1

    def save_records(self, path) -> None:
        """Write the per-layer, per-timestep maps (``trace(..., records=True)``) as safetensors.

        Keys ``"<layer>/<timestep>/<word>"`` (and ``".../<word>/<segment>"`` when
        the words are mapped in more than one text segment, SD3), each float32
        ``[images, h, w]`` (video: ``[images, F, h, w]``) at the layer's own resolution, summed over the word's
        sub-tokens, not normalised. ``<timestep>`` is the scheduler's timestep
        (``"%.10g"``; a repeated timestep gets ``"#1"``, ``"#2"``... in call order).
        The file's metadata ``"fused.maps"`` is JSON: ``layers`` (model order),
        ``timesteps`` (floats, call order), ``timestep_keys``, ``words``,
        ``segments``, ``images``, ``shape`` (the aggregate's h, w; video: F, h, w) and
        ``positions``.
        """
        from safetensors.torch import save_file

        if not self.records:
            raise ValueError("save_records needs trace(..., records=True)")
        tensors, keys, seen, layers = {}, [], {}, set()
        for t, step in self.steps:
            key = _timestep_key(t)
            n = seen.get(key, 0)
            seen[key] = n + 1
            key = key if n == 0 else f"{key}#{n}"
            keys.append(key)
            for layer, entry in step.items():
                layers.add(layer)
                for word, m in entry.items():
                    tensors[f"{layer}/{key}/{word}"] = m.contiguous()
        images = next(iter(tensors.values())).shape[0] if tensors else 0
        meta = {"layers": [n for n in self.layers if n in layers], "timesteps": [t for t, _ in self.steps],
                "timestep_keys": keys, "words": list(self.positions), "segments": self.segments, "images": images,
                "shape": list(self.shape) if self.shape else None, "positions": self.positions}
        save_file(tensors, str(path), metadata={"fused.maps": json.dumps(meta)})


def load_records(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a ``MapTrace.save_records`` file: (maps by key, metadata dict)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["fused.maps"])
    return load_file(str(path)), meta


def _kind(pipe) -> str:
    """"unet", "sd3", "flux" or a video family's name ("wan", "cogvideox", "hunyuan_video")."""
    if getattr(pipe, "unet", None) is not None:
        return "unet"
    model = getattr(pipe, "transformer", None)
    if model is None:
        raise ValueError(f"{type(pipe).__name__}: no UNet or transformer to trace")
    family = video_family(model)
    if family is not None:
        return family.name
    if type(model).__name__.endswith("3DModel"):  # another video transformer (LTX, Mochi, Wan VACE, FramePack...)
        raise ValueError(f"{type(model).__name__}: trace supports the video transformers of Wan, CogVideoX and "
                         "HunyuanVideo only")
    return "flux" if "Flux" in type(model).__name__ else "sd3"


def _text_segments(pipe, kind: str) -> list[tuple]:
    """(tokenizer, segment name, offset in the denoiser's text sequence) per text segment, in sequence order."""
    if kind == "unet":
        return [(pipe.tokenizer, "clip", 0)]
    if kind == "flux":  # the transformer's text tokens are T5's; CLIP only gives the pooled vector
        return [(pipe.tokenizer_2, "t5", 0)]
    if kind in ("wan", "cogvideox"):  # the transformer attends to T5 tokens only
        return [(pipe.tokenizer, "t5", 0)]
    segments = [(pipe.tokenizer, "clip", 0)]  # SD3: [CLIP (77) | T5 (max_sequence_length)]
    if getattr(pipe, "tokenizer_3", None) is not None and getattr(pipe, "text_encoder_3", None) is not None:
        clip_len = getattr(pipe, "tokenizer_max_length", None) or pipe.tokenizer.model_max_length
        segments.append((pipe.tokenizer_3, "t5", clip_len))
    return segments


def _hunyuan_template(pipe, prompt_template: dict | None) -> dict:
    module = importlib.import_module(type(pipe).__module__)
    if "image_emb_len" in (prompt_template or getattr(module, "DEFAULT_PROMPT_TEMPLATE", {})):
        raise NotImplementedError(f"{type(pipe).__name__}: a prompt template with image tokens (LLaVA) is not "
                                  "supported by trace")
    template = prompt_template or getattr(module, "DEFAULT_PROMPT_TEMPLATE", None)
    if template is None:
        raise ValueError(f"{type(pipe).__name__}: pass trace(..., prompt_template=) as given to the pipeline")
    return template


def hunyuan_crop_start(tokenizer, template: dict) -> int:
    """The number of template tokens HunyuanVideo's pipeline crops: ``crop_start``, or, when it is None,
    the pipeline's own rule (the tokenised template less its last two tokens, ``{}`` and ``<|eot_id|>``)."""
    crop_start = template.get("crop_start")
    if crop_start is None:
        ids = tokenizer(template["template"], padding="max_length", return_tensors="pt", return_length=False,
                        return_overflowing_tokens=False, return_attention_mask=False)["input_ids"]
        crop_start = ids.shape[-1] - 2
    return int(crop_start)


def template_token_positions(tokenizer, template: dict, prompt: str, word: str) -> tuple[list[list[int]], int]:
    """Occurrences of ``word`` in HunyuanVideo's text: positions in the cropped sequence, and its length.

    The pipeline tokenises ``template.format(prompt)`` and drops the first
    ``crop_start`` tokens (``hunyuan_crop_start``), so a token at index ``i`` of
    the formatted prompt is text token ``i - crop_start`` of the transformer.
    A word is every whole-word, case-sensitive occurrence in ``prompt``; its
    tokens are those whose character offsets overlap it (byte-level BPE merges
    the leading space into the token, so sub-token matching would miss it).
    """
    text = template["template"]
    prefix = 0  # characters of the formatted template before the prompt
    for literal, field_name, _, _ in string.Formatter().parse(text):
        prefix += len(literal)
        if field_name is not None:
            break
    try:
        enc = tokenizer(text.format(prompt), return_offsets_mapping=True)
    except NotImplementedError as e:  # a slow tokenizer has no offsets
        raise ValueError(f"trace needs a fast tokenizer for HunyuanVideo's text positions ({e})") from None
    crop = hunyuan_crop_start(tokenizer, template)
    found = []
    for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", prompt):
        lo, hi = prefix + m.start(), prefix + m.end()
        tokens = [i - crop for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < hi and b > lo]
        if tokens and tokens[0] >= 0:
            found.append(tokens)
    return found, len(enc["input_ids"]) - crop


def _positions(pipe, prompt: str, words: list[str], occurrence: int | None, kind: str,
               prompt_template: dict | None = None) -> tuple[dict, dict]:
    """word -> segment -> joint positions, and segment -> (offset, tokenised prompt length)."""
    positions, info = {}, {}
    if kind == "hunyuan_video":  # LLaMA tokens of the prompt template, after the pipeline's crop
        template = _hunyuan_template(pipe, prompt_template)
        for word in words:
            found, n_ids = template_token_positions(pipe.tokenizer, template, prompt, word)
            info["llama"] = (0, n_ids)
            if found:
                positions.setdefault(word, {})["llama"] = _pick(found, occurrence, word, prompt)
        segments = []
    else:
        segments = _text_segments(pipe, kind)
    if kind == "wan":  # the pipeline tokenises the cleaned prompt (ftfy, HTML entities, whitespace)
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tokenised = prompt_clean(prompt)
    else:
        tokenised = prompt
    for tokenizer, name, offset in segments:
        for word in words:
            found, n_ids = _tokenise(tokenizer, tokenised, word)
            info[name] = (offset, n_ids)
            if found:
                positions.setdefault(word, {})[name] = [offset + p for p in _pick(found, occurrence, word, prompt)]
    for word in words:
        if word not in positions:
            raise ValueError(f"word {word!r} does not occur in the prompt {prompt!r}")
    return {w: positions[w] for w in words}, info


def _is_guided(pipe, guided: bool | None, kind: str = "unet") -> bool:
    if guided is not None:
        return guided
    if kind in ("wan", "hunyuan_video"):  # guidance is a separate (unconditional) call, never batched
        return False
    if kind == "cogvideox":  # [uncond; cond] when guidance_scale > 1 (no do_classifier_free_guidance)
        try:
            return bool(pipe.guidance_scale > 1)
        except (AttributeError, TypeError):
            return False
    try:
        return bool(pipe.do_classifier_free_guidance)
    except (AttributeError, TypeError):  # no such property, or read outside a pipeline call
        return False


def _token_grid(sample: torch.Tensor, kwargs: dict) -> tuple[int, int] | None:
    if sample.ndim == 4:  # UNet latents or SD3's unpatched latents [B, C, H, W]
        return int(sample.shape[-2]), int(sample.shape[-1])
    ids = kwargs.get("img_ids")  # FLUX: packed tokens [B, N, C] with (0, row, col) ids
    if ids is not None:
        ids = ids.reshape(-1, ids.shape[-1])[-sample.shape[1]:]
        return (int(ids[:, 1].max() - ids[:, 1].min()) + 1, int(ids[:, 2].max() - ids[:, 2].min()) + 1)
    return None


@contextmanager
def trace(pipe, prompt: str, words: list[str], layers: list[str] | None = None,
          timesteps: tuple[float, float] | None = None, guided: bool | None = None,
          occurrence: int | None = None, records: bool = False, prompt_template: dict | None = None):
    """Record aggregated maps of ``words`` while ``pipe`` generates ``prompt``.

    Pipelines: SD 1.x/2.x, SDXL, SD3, FLUX, Wan, CogVideoX, HunyuanVideo.
    ``layers``: which attention layers (default all), by exact name, module
    prefix or ``fnmatch`` pattern (``select_layers``) — never by substring;
    ``timesteps``: (low, high) range of the scheduler's timesteps to aggregate
    (``pipe._current_timestep`` where the pipeline sets it, else the
    denoiser's timestep argument);
    ``guided``: None (default) detects classifier-free guidance from
    ``pipe.do_classifier_free_guidance`` at every call (video pipelines: their
    own rule; see the module docstring); True/False forces [uncond; cond]
    halves or all rows;
    ``occurrence``: None (default) maps every occurrence of a repeated word,
    an int only that one (0 = first, -1 = last);
    ``records``: also keep per-layer, per-timestep maps (``tr.save_records(path)``);
    ``prompt_template``: HunyuanVideo only, the ``prompt_template`` given to the
    pipeline (default: the pipeline's ``DEFAULT_PROMPT_TEMPLATE``).
    """
    kind = _kind(pipe)
    models = [pipe.unet if kind == "unet" else pipe.transformer]
    if kind == "unet":
        processor, kwarg = FusedAttnProcessor, "cross_attention_kwargs"
        names = cross_attention_layers(models[0])
    elif kind in ("sd3", "flux"):
        processor = FusedFluxAttnProcessor if kind == "flux" else FusedJointAttnProcessor
        kwarg = "joint_attention_kwargs"
        names = [n.removesuffix(".processor") for n in models[0].attn_processors]
    else:  # a video transformer; Wan 2.2 also has a low-noise transformer_2
        processor, kwarg, family = None, "attention_kwargs", video_family(models[0])
        if getattr(pipe, "transformer_2", None) is not None:
            models.append(pipe.transformer_2)
        names = [n for n in (k.removesuffix(".processor") for k in models[0].attn_processors)
                 if family.installs(n) and family.maps(n)]
    names = select_layers(names, layers)
    positions, segment_info = _positions(pipe, prompt, words, occurrence, kind, prompt_template)
    tr = MapTrace(positions, names, timesteps, guided, records, segment_info=segment_info,
                  no_end_token=frozenset({"llama"}) if kind == "hunyuan_video" else frozenset())
    previous = [model.attn_processors for model in models]
    for model in models:
        if processor is None:
            attach_video(model)
        else:
            attach(model, processor)

    pending: list = []
    last_step: list = [None]

    def pre_hook(module, args, kwargs):
        marker = getattr(pipe, "_current_timestep", None)
        if marker is not None and marker is last_step[0]:
            return None  # a second call in the same step: the unconditional / perturbed branch
        last_step[0] = marker
        if kwargs.get("skip_layers") is not None:
            return None  # SD3's skip-layer guidance: a perturbed conditional branch
        try:  # the call's arguments by name, however they were passed
            inputs = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        except (TypeError, ValueError):
            inputs = dict(kwargs)
        sample = inputs.get("sample", inputs.get("hidden_states"))
        t = marker if marker is not None else inputs["timestep"]
        t_value = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        if tr.timesteps and not (tr.timesteps[0] <= t_value <= tr.timesteps[1]):
            return None
        batch = sample.shape[0]
        if _is_guided(pipe, tr.guided, kind):
            if batch % 2:
                raise ValueError(f"classifier-free guidance, but the denoiser's batch of {batch} rows has no "
                                 "[uncond; cond] halves; pass guided=False")
            cond = slice(batch // 2, batch)
        else:
            cond = slice(0, batch)
        text = inputs.get("encoder_hidden_states")
        request = tr.request(batch, cond, text_len=None if text is None else text.shape[1])
        kwargs[kwarg] = dict(kwargs.get(kwarg) or {}, map_request=request)
        grid = _token_grid(sample, inputs) if processor is not None else video_grid(module, sample)
        pending.append((request, cond, grid, t_value))
        return args, kwargs

    def post_hook(module, args, kwargs, output):
        while pending:
            tr.add(*pending.pop())

    # prepend: the request must be in attention_kwargs before attach_video's hook hands it to the layers
    handles = [h for model in models for h in (model.register_forward_pre_hook(pre_hook, with_kwargs=True,
                                                                                 prepend=True),
                                               model.register_forward_hook(post_hook, with_kwargs=True))]
    try:
        yield tr
    finally:
        for h in handles:
            h.remove()
        for model, procs in zip(models, previous):
            model.set_attn_processor(procs)
