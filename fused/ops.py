"""The public ops (docs/ops.md §1): validate, pick a backend, run it.

Every op accepts tensors in the layout of ``scaled_dot_product_attention``
and a ``backend`` (None = automatic, see ``fused._dispatch``). The backends
are differentiable: "torch" through autograd, the others through the backward
of the one attention op they implement (``fused._library``); see docs/ops.md
§2.5 and §4.4.
"""

from __future__ import annotations

import torch

from . import _validate
from ._dispatch import BACKENDS, check_bins_for_backend, implementation, resolve


def cross_attention_with_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_index: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    head_reduce: str = "mean",
    backend: str | None = None,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and the attention maps of chosen key columns, in one pass.

    Args:
        q: [B, H, N, D] queries (image tokens); k, v: [B, H, L, D]. One floating dtype.
        token_index: int64 [B, T]; column of k whose probabilities form map t of
            batch row b. -1 = no map (zeros, no work, no gradient); repeats allowed.
        key_mask: optional bool [B, L]; hidden keys as in ``masked_attention`` (a map
            of a hidden column is zero).
        scale: softmax scale, default D ** -0.5.
        head_reduce: "mean" -> maps [B, T, N] averaged over heads; "none" -> [B, H, T, N].
        backend: None (automatic), "torch", "cpp", "triton" or "sdpa".
        validate: check index values on CUDA tensors too (syncs the host).

    Returns:
        out [B, H, N, D] (what SDPA returns) and maps, both in q's dtype.
    """
    _validate.check_qkv(q, k, v)
    token_index = _validate.check_token_index(token_index, q, k, validate)
    if key_mask is not None:
        _validate.check_key_mask(key_mask, q, k)
    head_reduce = _validate.check_head_reduce(head_reduce)
    scale = _validate.check_scale(scale, q.shape[-1])
    name = resolve("attention", q.device.type, q.dtype, backend, head_dim=q.shape[-1])
    return implementation(name).attention(q, k, v, token_index, key_mask, scale, head_reduce)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """Attention where only keys with ``key_mask[b, j]`` True are attended.

    Hidden keys (docs/ops.md §4.2), the same rule in every backend: in a row with
    at least one visible key, a hidden key contributes nothing. Its score is
    replaced by -inf, never added to, and its key and value are never multiplied
    in (0 · NaN is NaN), so a NaN or Inf stored in a hidden key or value reaches
    neither ``out`` nor the gradients of the other positions; the gradients at
    hidden positions are zero. NaN/Inf in ``q`` or in visible keys and values
    propagate as in any attention (not checked).

    Args:
        q: [B, H, N, D]; k, v: [B, H, L, D]; key_mask: bool [B, L].
        A batch row whose mask is all False attends uniformly to all keys (it
        uses every value and no key, so NaN in its keys does not matter either).
        validate: accepted for symmetry with the other ops (the mask has no
            values that can be out of range).

    Returns:
        out [B, H, N, D] in q's dtype.
    """
    del validate  # a bool mask cannot hold invalid values
    _validate.check_qkv(q, k, v)
    _validate.check_key_mask(key_mask, q, k)
    scale = _validate.check_scale(scale, q.shape[-1])
    name = resolve("attention", q.device.type, q.dtype, backend, head_dim=q.shape[-1])
    return implementation(name).attention(q, k, v, None, key_mask, scale, "mean")[0]


def otsu_mask(
    maps: torch.Tensor,
    *,
    bins: int | None = None,
    mode: str = "vico",
    backend: str | None = None,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Otsu threshold and binary mask of every map, over the last dim.

    Args:
        maps: floating [..., N]; batched over all leading dims.
        bins: candidate count; None = 10 for "vico", 256 for "skimage".
        mode: "vico" (the paper's rule on min-max normalised maps; threshold in
            normalised units) or "skimage" (``threshold_otsu`` semantics; threshold
            in map units). See docs/ops.md §3.2 and §3.3 for the exact tie rules.

    Returns:
        threshold [...] (float32 for fp16/bf16 maps, else the maps' dtype) and
        mask bool [..., N].
    """
    bins = _validate.check_otsu_args(maps, bins, mode, validate)
    if backend in BACKENDS:  # a named kernel's limit is known before anything is resolved or checked
        check_bins_for_backend(bins, mode, backend)
    name = resolve("otsu_mask", maps.device.type, maps.dtype, backend)
    check_bins_for_backend(bins, mode, name)
    return implementation(name).otsu_mask(maps, bins, mode)


def cross_attention_with_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_index: torch.Tensor,
    *,
    scale: float | None = None,
    bins: int | None = None,
    mode: str = "vico",
    backend: str | None = None,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cross_attention_with_maps`` (head mean) then ``otsu_mask`` of the maps.

    What the ViCo processor calls. Inputs are validated once, then the two
    kernels run back to back on the same device with no host round trip and
    no checks in between (the maps come from our own kernel).

    Returns out [B, H, N, D], maps [B, T, N] and the Otsu mask bool [B, T, N]
    (computed on detached maps; slots with index -1 have constant zero maps,
    whose "vico" mask is all True).
    """
    _validate.check_qkv(q, k, v)
    token_index = _validate.check_token_index(token_index, q, k, validate)
    scale = _validate.check_scale(scale, q.shape[-1])
    bins = _validate.check_bins(bins, _validate.check_mode(mode))
    otsu_backend = None if backend == "sdpa" else backend  # sdpa has no Otsu kernel
    if otsu_backend in BACKENDS:
        check_bins_for_backend(bins, mode, otsu_backend)
    attn = resolve("attention", q.device.type, q.dtype, backend, head_dim=q.shape[-1])
    otsu = resolve("otsu_mask", q.device.type, q.dtype, otsu_backend)
    check_bins_for_backend(bins, mode, otsu)
    out, maps = implementation(attn).attention(q, k, v, token_index, None, scale, "mean")
    _, mask = implementation(otsu).otsu_mask(maps.detach(), bins, mode)
    return out, maps, mask
