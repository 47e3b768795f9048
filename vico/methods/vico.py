"""ViCo (arXiv 2306.00971): a learned token, image cross-attention blocks fed
by a reference image through the frozen UNet, an Otsu object mask from the
token's attention map, and an attention regulariser (docs/methods.md §2).

One UNet call serves both branches: the batch is [noisy; reference] (same
timestep, same text). The frozen ``attn2`` of each flagged layer records, in
one fused pass, the reference half's S* and EOT maps and the Otsu mask of the
S* map (``fused.MapRequest(..., otsu=True)``); the image block right after it
reads the mask. No attention matrix is materialised and no Python loop runs
over samples. After the last flagged layer the reference half is dropped
(``ReferenceEarlyStop``): the rest of the decoder and ``conv_out`` run on the
noisy half only, and the UNet returns the noisy half.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import fused

from ..data import VICO_TEMPLATES
from ..image_attention import MASK_SLOT, ReferenceEarlyStop, image_block_sources, inject_image_attention, \
    spatial_transformers
from ..model import Components, Conditioning, UserError, check_layers, token_positions
from .base import Batch, MethodConfig, MethodOptions, guide, noise_and_target
from .textual_inversion import TextualInversion

EOT_SLOT = 1  # slot of the MapRequest that holds the end-of-text token's map
REG_WEIGHT = 5e-4  # the official weight of the attention regulariser


@dataclass(frozen=True)
class ViCoOptions(MethodOptions):
    layers: list[str] | None = field(default=None, metadata={
        "help": "spatial transformers that get image attention, e.g. up_blocks.3.attentions.0 (default: every "
                "second decoder transformer, as the official code places them)", "metavar": "MODULE"})
    reg_weight: float = field(default=REG_WEIGHT, metadata={
        "help": "weight of the attention regulariser (0 turns it off)"})

    def check(self) -> None:
        super().check()
        if self.layers is not None and not self.layers:
            raise UserError("--layers: name at least one spatial transformer")
        if self.reg_weight < 0:
            raise UserError(f"--reg-weight {self.reg_weight}: a weight must be 0 or more")


class ViCo(TextualInversion):
    name = "vico"
    default_steps = 400
    image_lr = 1e-5  # fixed: the official ddpm.py does not scale it (only the embedding's lr is)
    templates = VICO_TEMPLATES  # the official ldm/data/personalized.py list of 81
    needs_reference = True
    image_layers = True
    Options = ViCoOptions

    def __init__(self, components: Components, config: MethodConfig):
        super().__init__(components, config)
        self.blocks = inject_image_attention(components.unet, self.options.layers)
        fused.attach(components.unet)  # names the new blocks' processors too
        self.layers = [key.replace("-", ".") for key in self.blocks.keys()]
        # The S* map each block's regulariser and sampled maps use (the last frozen block's attn2, as the
        # official loop keeps its last loss_reg), and every attn2 whose Otsu mask some application reads.
        self.source_layers = [block.source_layer for block in self.blocks.values()]
        self.mask_layers = image_block_sources(components.unet, self.layers)
        # Training and sampling forwards return only the noisy half (nothing reads the reference's output);
        # ``reference_stop.enabled = False`` runs both halves to the end, as the official code does.
        self.reference_stop = ReferenceEarlyStop(components.unet, self.layers)

    @classmethod
    def check_options_for_model(cls, options: ViCoOptions, model: Path) -> None:
        if options.layers:
            check_layers(options.layers, model)

    @classmethod
    def learning_rate_names(cls) -> dict[str, float]:
        return {**super().learning_rate_names(), "image": cls.image_lr}

    def param_groups(self, lr_scale: float = 1.0, stage: int = 0) -> list[dict]:
        image = {"name": "image", "params": list(self.blocks.parameters()), "lr": self.base_lr("image")}  # never scaled
        return super().param_groups(lr_scale) + [image]

    def references(self, latent_mean, latent_std, idx, generator):
        """Another training image than the target when there are several; its latent is a
        posterior sample, as the official ``get_first_stage_encoding`` draws one (no added noise)."""
        n = latent_mean.shape[0]
        if n > 1:
            idx = (idx + torch.randint(1, n, idx.shape, generator=generator)) % n
        eps = torch.randn((idx.shape[0], *latent_mean.shape[1:]), generator=generator).to(latent_mean)
        return latent_mean[idx] + latent_std[idx] * eps

    def map_request(self, prompt_ids: torch.Tensor, copies: int, generated: bool = False) -> fused.MapRequest:
        """Maps of S* (or EOT when absent) and EOT for the reference half.

        prompt_ids: [B, 77] of the conditional prompts; the reference half of the
        UNet batch holds ``copies`` groups of B rows that all use these positions
        (under CFG the unconditional branch reuses the conditional positions).
        ``generated``: also the same maps (and Otsu masks) of the last group of the
        noisy half (the conditional branch under CFG): the generated images' own
        maps, which nothing in the forward reads (the image block masks its keys
        with the reference half's). Otherwise the noisy half records nothing.
        """
        s_pos, eot = token_positions(prompt_ids, self.token_id, self.components.tokenizer.eos_token_id)
        slots = torch.stack([torch.where(s_pos >= 0, s_pos, eot), eot], dim=1)  # [B, 2]
        assert MASK_SLOT == 0 and EOT_SLOT == 1
        reference = slots.repeat(copies, 1)
        noisy = torch.full_like(reference, -1)  # no maps, no work
        if generated:
            noisy[-slots.shape[0]:] = slots
        return fused.MapRequest(torch.cat([noisy, reference]), layers=self.mask_layers, otsu=True)

    def regulariser(self, request: fused.MapRequest, rows: slice) -> torch.Tensor:
        """Sum over flagged layers of MSE(a_S / max a_S, sg(a_EOT) / max a_EOT) on reference rows."""
        total = 0.0
        for layer in self.source_layers:
            maps = request.maps[layer][rows]  # [B, 2, N]
            a_s = maps[:, MASK_SLOT]
            a_e = maps[:, EOT_SLOT].detach()
            total = total + F.mse_loss(a_s / a_s.amax(-1, keepdim=True), a_e / a_e.amax(-1, keepdim=True))
        return total

    def training_loss(self, batch: Batch):
        c = self.components
        cond = self.encode(batch.prompts)
        noisy, t, target = noise_and_target(c.scheduler, batch.latents, batch.noise, batch.timesteps)
        B = noisy.shape[0]
        request = self.map_request(cond.ids, copies=1)
        # the reference half gets the noisy half's text and (SDXL) added conditions, row for row
        both = Conditioning.cat([cond, cond])
        out = c.unet(torch.cat([noisy, batch.reference.to(noisy)]), torch.cat([t, t]), **both.unet_kwargs(),
                     cross_attention_kwargs={"map_request": request}).sample
        mse = F.mse_loss(out[:B].float(), target.float())  # out: the noisy half (all rows without the stop)
        reg = self.regulariser(request, slice(B, 2 * B))
        loss = mse + self.options.reg_weight * reg
        return loss, {"loss": loss.item(), "mse": mse.item(), "reg": float(reg.detach())}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        state.update({f"image_attention.{k}": v for k, v in self.blocks.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        prefix = "image_attention."
        self.blocks.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def sampling_context(self, reference_latents: torch.Tensor | None, batch: int) -> dict:
        if reference_latents is None:
            raise ValueError("ViCo sampling needs a reference image")
        ref = reference_latents[:1].expand(batch, -1, -1, -1) if reference_latents.shape[0] == 1 else reference_latents
        return {"reference": ref}

    def predict_noise(self, latents, t, cond, uncond, guidance_scale, context):
        """Two UNet passes per guidance branch in one call: [noisy_u, noisy_c, ref_u, ref_c], each reference
        row with the conditioning (SDXL: added conditions too) of its noisy row.

        On the last step (``context["last_step"]``, set by the pipeline; True when absent)
        the conditional noisy rows record their own S* maps too (``sampled_maps``)."""
        ref = context["reference"].to(latents)
        request = self.map_request(cond.ids, copies=2, generated=context.get("last_step", True))
        x = torch.cat([latents, latents, ref, ref])
        rows = Conditioning.cat([uncond, cond, uncond, cond])
        out = self.components.unet(x, t, **rows.unet_kwargs(), cross_attention_kwargs={"map_request": request}).sample
        context["last_request"] = request
        eps_u, eps_c = out[: 2 * latents.shape[0]].chunk(2)  # the noisy rows (all of out under the early stop)
        return guide(eps_u, eps_c, guidance_scale)

    # What ``sampled_maps`` returns, for reports (``vico eval`` names the masks it used).
    SAMPLED_MAPS = ("the S* cross-attention map (EOT when the prompt has no S*) of each generated image "
                    "(conditional branch, last sampling step) and its Otsu mask")

    def _last_step_maps(self, context: dict, group: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        request = context["last_request"]
        out = {}
        for layer, source in zip(self.layers, self.source_layers):
            maps = request.maps[source]
            n = maps.shape[0] // 4  # rows: [noisy_uncond, noisy_cond, ref_uncond, ref_cond]
            side = int(round(maps.shape[-1] ** 0.5))
            rows = slice(group * n, (group + 1) * n)
            out[layer] = (maps[rows, MASK_SLOT].reshape(n, side, side),
                          request.masks[source][rows, MASK_SLOT].reshape(n, side, side))
        return out

    def sampled_maps(self, context: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per flagged layer (the spatial transformer's name), the S* map and its Otsu mask
        [n, side, side] of each *generated* image: the conditional noisy rows of the last
        sampling step (``SAMPLED_MAPS``). What ``vico sample --save-maps`` writes."""
        return self._last_step_maps(context, group=1)

    def reference_maps(self, context: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The same for the conditional reference rows: the reference image's S* map and the
        Otsu mask that gated the image attention at the last step (the same for every image)."""
        return self._last_step_maps(context, group=3)

    @torch.no_grad()
    def object_masks(self, latents: torch.Tensor, timestep: int = 500) -> torch.Tensor:
        """Otsu object masks [B, h, w] of real images from the reference branch: the S*
        map of ``sharpest_nearest_output``'s layer, as in training (the image is both halves)."""
        c = self.components
        B = latents.shape[0]
        cond = self.encode([f"a photo of {self.config.placeholder}"] * B)
        request = self.map_request(cond.ids, copies=1)
        t = torch.full((2 * B,), timestep, device=latents.device)
        c.unet(torch.cat([latents, latents]), t, **Conditioning.cat([cond, cond]).unet_kwargs(),
               cross_attention_kwargs={"map_request": request})
        masks = {layer: request.masks[layer][B:, MASK_SLOT] for layer in self.source_layers}
        layer = self.sharpest_nearest_output({k: m.shape[-1] for k, m in masks.items()})
        side = int(round(masks[layer].shape[-1] ** 0.5))
        return masks[layer].reshape(B, side, side)

    def sharpest_nearest_output(self, positions: dict[str, int]) -> str:
        """Of flagged layers (spatial transformers or modules inside one) -> their map's positions, the one
        with the most positions, on a tie the latest in the UNet's forward order: the map a report shows.
        With image blocks in the encoder too, the encoder's 16x16 mask is looser than the decoder's."""
        order = spatial_transformers(self.components.unet)

        def forward_index(name: str) -> int:
            return next(i for i, t in enumerate(order) if name == t or name.startswith(t + "."))

        return max(positions, key=lambda k: (positions[k], forward_index(k)))
