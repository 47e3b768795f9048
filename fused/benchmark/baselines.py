"""The baselines of docs/shapes.md §4.

Op level (``vico bench``, ``benchmarks/gpu_check.py``): ``paper_maps`` and
``paper_otsu_loop``, the ViCo code's maps and Otsu.

Model level, as processors that plug into the same map requests as
``fused.FusedAttnProcessor`` (so ViCo runs unchanged on them;
``benchmarks/bench_vico_step.py``):

- ``OfficialAttnProcessor`` — what the official ViCo code (``ldm/modules/attention.py``
  ``CrossAttention``) runs in **every** attention layer: self-attention, text
  cross-attention and the image cross-attention alike. An einsum ``q·kᵀ·scale``
  in fp32 (fp64 stays fp64), hidden keys filled in place with
  ``-torch.finfo(dtype).max``, softmax, an einsum with ``v``. Maps are indexed
  from the materialised, head-averaged probabilities (``return_attn``), and
  Otsu runs per sample in a Python loop.
- ``PaperAttnProcessor`` — half of that: the probabilities are materialised in
  every text cross-attention layer (maps indexed, Otsu per sample in a Python
  loop) and in the masked image attention (large-negative fill); self-attention
  runs through SDPA.
- ``DiffusersMapsAttnProcessor`` — a careful diffusers user: SDPA wherever no
  map is needed, materialised probabilities only in the layers that record
  maps, batched torch Otsu, SDPA with a boolean mask for the image attention.

Install with ``fused.attach(unet, OfficialAttnProcessor)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from ..processors.unet import FusedAttnProcessor


def paper_maps(q, k, v, token_index):
    """The ViCo code's way: materialise softmax(QKᵀ), index, average heads (the reference does exactly that)."""
    return reference.attention_with_maps(q, k, v, token_index, q.shape[-1] ** -0.5, "mean")


def paper_otsu_loop(maps: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Otsu masks the way ViCo's public code computes them: a Python loop over
    the maps and over the candidates, boolean indexing for each class and a
    Python comparison of the scores (a host sync per candidate on a GPU).
    An empty class gives a NaN score, which never wins. Returns bool [..., N]."""
    flat = maps.reshape(-1, maps.shape[-1])
    lo, hi = flat.min(-1, keepdim=True)[0], flat.max(-1, keepdim=True)[0]
    norm = (flat - lo) / (hi - lo)
    n = flat.shape[-1]
    masks = []
    for i in range(flat.shape[0]):
        m = norm[i]
        best_g, best_t = 0.0, 0.0
        for t in range(bins):
            low, high = m[m < t / bins], m[m >= t / bins]
            g = (low.shape[0] / n) * (high.shape[0] / n) * (low.mean() - high.mean()) ** 2
            if g > best_g:
                best_g, best_t = g, t / bins
        masks.append(m >= best_t if best_t > 0 else m > 0)
    return torch.stack(masks).reshape(maps.shape)


def _materialised_maps(attn, query, key, value, request):
    # The PyTorch reference materialises softmax(QKᵀ) and indexes it: exactly the baselines' way.
    index = request.token_index.to(query.device)
    return reference.attention_with_maps(query, key, value, index, attn.scale, request.head_reduce)


def _record_with_otsu_loop(processor, request, maps):
    """Record ``maps`` for ``processor``'s layer and, if asked, their Otsu masks by
    the per-sample Python loop of the official code (``paper`` and ``official``)."""
    request.maps[processor.name] = maps
    if request.otsu:
        request.masks[processor.name] = paper_otsu_loop(maps.detach())  # per sample, per candidate


class PaperAttnProcessor(FusedAttnProcessor):
    def attention(self, attn, query, key, value, attention_mask, is_cross, map_request, key_mask):
        if key_mask is not None and is_cross:
            scores = query @ key.transpose(-1, -2) * attn.scale
            scores = scores.masked_fill(~key_mask[:, None, None, :], -torch.finfo(scores.dtype).max)
            return torch.softmax(scores, dim=-1) @ value
        if is_cross and self.records_maps:  # every text cross-attention layer materialises
            out, maps = _materialised_maps(attn, query, key, value, map_request) if map_request is not None \
                else (torch.softmax(query @ key.transpose(-1, -2) * attn.scale, -1) @ value, None)
            if self.wants_maps(is_cross, map_request):
                _record_with_otsu_loop(self, map_request, maps)
            return out
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)


def official_attention(query, key, value, scale, key_mask=None, attention_mask=None):
    """``CrossAttention.forward`` of the official LDM/ViCo code on [B, H, N, D] projections.

    Scores are an einsum in fp32 at least (SD's ``_ATTN_PRECISION = "fp32"``;
    float64 stays float64); ``key_mask`` (bool [B, L], False = hidden) fills
    hidden keys in place with ``-torch.finfo(dtype).max``, so a row with no
    visible key attends uniformly to every key; ``attention_mask`` is diffusers'
    additive mask (none in the UNets benchmarked). Returns (out in the scores'
    dtype [B, H, N, D], probabilities [B, H, N, L]); both are materialised.
    """
    dtype = torch.promote_types(query.dtype, torch.float32)
    sim = torch.einsum("bhid,bhjd->bhij", query.to(dtype), key.to(dtype)) * scale
    if attention_mask is not None:
        sim = sim + attention_mask.to(dtype)
    if key_mask is not None:
        sim.masked_fill_(~key_mask[:, None, None, :], -torch.finfo(dtype).max)
    probs = sim.softmax(dim=-1)
    return torch.einsum("bhij,bhjd->bhid", probs, value.to(dtype)), probs


def official_maps(probs, token_index, head_reduce="mean"):
    """Maps [B, T, N] ("mean") or [B, H, T, N] indexed from materialised probabilities
    [B, H, N, L]; "mean" averages the heads first, as ``return_attn`` does. −1 slots: zeros."""
    B, H, N, _ = probs.shape
    valid = token_index >= 0
    cols = token_index.clamp(min=0)
    T = cols.shape[1]
    if head_reduce == "mean":
        mean = probs.mean(dim=1)  # [B, N, L]: the official code's head-averaged attention
        picked = mean.gather(-1, cols[:, None, :].expand(B, N, T)) * valid[:, None, :].to(mean.dtype)
        return picked.transpose(1, 2)
    picked = probs.gather(-1, cols[:, None, None, :].expand(B, H, N, T)) * valid[:, None, None, :].to(probs.dtype)
    return picked.transpose(-1, -2)


class OfficialAttnProcessor(FusedAttnProcessor):
    def attention(self, attn, query, key, value, attention_mask, is_cross, map_request, key_mask):
        out, probs = official_attention(query, key, value, attn.scale, key_mask if is_cross else None,
                                        attention_mask)
        if self.wants_maps(is_cross, map_request):
            maps = official_maps(probs, map_request.token_index.to(query.device), map_request.head_reduce)
            _record_with_otsu_loop(self, map_request, maps.to(query.dtype))
        return out.to(query.dtype)


class DiffusersMapsAttnProcessor(FusedAttnProcessor):
    def attention(self, attn, query, key, value, attention_mask, is_cross, map_request, key_mask):
        if self.wants_maps(is_cross, map_request):
            out, maps = _materialised_maps(attn, query, key, value, map_request)
            map_request.maps[self.name] = maps
            if map_request.otsu:
                map_request.masks[self.name] = reference.otsu_vico(maps.detach(), 10)[1]  # batched
            return out
        if key_mask is not None and is_cross:
            visible = key_mask | ~key_mask.any(dim=-1, keepdim=True)  # all-hidden rows attend uniformly
            scores_equal = ~key_mask.any(dim=-1)[:, None, None, None]
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=visible[:, None, None, :], scale=attn.scale)
            return torch.where(scores_equal, value.mean(dim=2, keepdim=True).expand_as(out), out)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)


BASELINES = {"fused": FusedAttnProcessor, "diffusers+maps": DiffusersMapsAttnProcessor,
             "paper": PaperAttnProcessor, "official": OfficialAttnProcessor}
