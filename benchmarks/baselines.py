"""The two baselines of docs/shapes.md §4, as processors that plug into the same map
requests as ``fused.FusedAttnProcessor`` (so ViCo runs unchanged on them):

- ``PaperAttnProcessor`` — what ViCo's public code does: materialise the
  attention probabilities in every text cross-attention layer, index the
  maps, threshold them with Otsu in a Python loop per sample, and run the
  masked image attention by filling hidden keys with a large negative.
- ``DiffusersMapsAttnProcessor`` — a careful diffusers user: SDPA wherever no
  map is needed, materialised probabilities only in the layers that record
  maps, batched torch Otsu, SDPA with a boolean mask for the image attention.

Install with ``fused.attach(unet, PaperAttnProcessor)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fused import FusedAttnProcessor, reference
from fused.benchmark import paper_otsu_loop


def _materialised_maps(attn, query, key, value, request):
    # The PyTorch reference materialises softmax(QKᵀ) and indexes it: exactly the baselines' way.
    index = request.token_index.to(query.device)
    return reference.attention_with_maps(query, key, value, index, attn.scale, request.head_reduce)


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
                map_request.maps[self.name] = maps
                if map_request.otsu:
                    map_request.masks[self.name] = paper_otsu_loop(maps.detach())  # per sample, per candidate
            return out
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)


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


BASELINES = {"fused": FusedAttnProcessor, "paper": PaperAttnProcessor, "diffusers+maps": DiffusersMapsAttnProcessor}
