"""What ``vico maps`` writes for a video pipeline (Wan, CogVideoX, HunyuanVideo).

``fused.maps.trace`` gives each word a ``[F, h, w]`` map in latent patches,
normalised to [0, 1] over the whole clip (docs/ops.md §7.2). Per word:

- ``map_<word>.png``: the F map frames side by side (a strip ``F x W`` pixels
  wide), each upsampled bilinearly to the generation's frame size
  (``h x`` the pipeline's spatial VAE factor ``x`` the patch size) without
  renormalising a frame on its own, so frames compare: over the decoded frame
  in the middle of the stretch of the clip the map frame covers, or, when the
  pipeline has no VAE (latent output), alone on black (red = 255 x the map);
- ``map_<word>.gif``: the same frames as an animation, each shown as long as
  the video frames it covers;
- ``mask_<word>.png``: the Otsu mask of the whole clip's map, as a strip.

With decoded frames also ``frames.png`` (the frames under the overlays, as a
strip) and ``video.gif`` (every frame); ``grid.png`` stacks the strips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def patch_factors(pipe) -> tuple[int, int]:
    """(pixels, video frames) one map cell spans: the VAE's spatial and temporal factors times the patch size."""
    config = pipe.transformer.config
    patch = config.patch_size
    if isinstance(patch, (tuple, list)):  # Wan: (t, h, w)
        p_t, p_s = int(patch[0]), int(patch[1])
    else:
        p_t, p_s = int(getattr(config, "patch_size_t", None) or 1), int(patch)
    return (int(getattr(pipe, "vae_scale_factor_spatial", 8)) * p_s,
            int(getattr(pipe, "vae_scale_factor_temporal", 4)) * p_t)


def matching_frames(video: np.ndarray, n_maps: int) -> np.ndarray:
    """The frame of ``video`` [n, H, W, 3] in the middle of each of ``n_maps`` equal stretches: [n_maps, H, W, 3]."""
    n = len(video)
    return video[[min(n - 1, int((i + 0.5) * n / n_maps)) for i in range(n_maps)]]


def colour_frames(heat: torch.Tensor, size: tuple[int, int], under: np.ndarray | None = None) -> np.ndarray:
    """[F, h, w] map in [0, 1] -> [F, H, W, 3] uint8: over ``under`` [F, H, W, 3] (alpha 0.5), else on black."""
    from .pipeline import heatmap_overlay

    H, W = size
    heat = heat.detach().float().cpu().numpy()
    if under is None:
        black = np.zeros((H, W, 3), dtype=np.float32)
        return np.stack([heatmap_overlay(black, m, alpha=1.0, normalise=False) for m in heat])
    return np.stack([heatmap_overlay(frame, m, normalise=False) for frame, m in zip(under, heat)])


def mask_frames(heat: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """The Otsu mask of the whole clip's map, nearest-upsampled per frame: [F, H, W, 3] uint8 (0 or 255)."""
    from PIL import Image

    import fused

    _, mask = fused.otsu_mask(heat.flatten()[None].double())
    mask = mask.reshape(heat.shape).cpu().numpy().astype(np.uint8) * 255
    H, W = size
    return np.stack([np.repeat(np.asarray(Image.fromarray(m).resize((W, H), Image.Resampling.NEAREST))[..., None], 3, -1)
                     for m in mask])


def strip(frames: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] -> [H, F * W, 3], frames side by side."""
    return np.concatenate(list(frames), axis=1)


def save_gif(frames: np.ndarray, path: Path, duration_ms: float) -> None:
    """An animated GIF, looping, each frame shown ``duration_ms`` (GIF counts in 10 ms)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(20, int(round(duration_ms))), loop=0)


def write_video_maps(out: Path, heatmaps: dict[str, torch.Tensor], pipe, video: np.ndarray | None,
                     fps: float) -> list[str]:
    """Write every word's strip, GIF and mask strip (and, given decoded ``video`` [n, H, W, 3] uint8, frames.png,
    video.gif) and grid.png into ``out``; returns the file names written."""
    from PIL import Image

    if not heatmaps:  # no call was traced (--timesteps outside the schedule): the video alone
        if video is None:
            return []
        save_gif(video, out / "video.gif", 1000 / fps)
        return ["video.gif"]
    spatial, temporal = patch_factors(pipe)
    shape = next(iter(heatmaps.values())).shape  # (F, h, w)
    n_maps = shape[0]
    if video is not None:
        size = video.shape[1:3]
        under = matching_frames(video, n_maps)
        per_map_ms = 1000 / fps * len(video) / n_maps
    else:
        size = (shape[1] * spatial, shape[2] * spatial)
        under = None
        per_map_ms = 1000 / fps * temporal
    written, rows = [], []
    if under is not None:
        rows.append(strip(under))
        Image.fromarray(rows[-1]).save(out / "frames.png")
        save_gif(video, out / "video.gif", 1000 / fps)
        written += ["frames.png", "video.gif"]
    for word, heat in heatmaps.items():
        safe = "".join(ch if ch.isalnum() else "_" for ch in word)
        coloured = colour_frames(heat, size, under)
        masks = mask_frames(heat, size)
        Image.fromarray(strip(coloured)).save(out / f"map_{safe}.png")
        save_gif(coloured, out / f"map_{safe}.gif", per_map_ms)
        Image.fromarray(strip(masks)).save(out / f"mask_{safe}.png")
        written += [f"map_{safe}.png", f"map_{safe}.gif", f"mask_{safe}.png"]
        rows += [strip(coloured), strip(masks)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(out / "grid.png")
    return written + ["grid.png"]
