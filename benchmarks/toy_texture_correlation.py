"""How much of a texture a method's toy samples carry, below the checker's yes/no.

    python benchmarks/toy_texture_correlation.py PROBE_OUT/samples-000800.png diagonal

Reads a grid written by ``toy_stage_probe.py`` (32x32 tiles shown x4) and prints, over its samples, how many
the checker reads as the texture and, for that world texture, the best correlation of the object's brightness
with its pattern over the phases and the contrast at that phase: the checker's own computation
(``checker.read_texture``) without its two thresholds (r >= 0.5, contrast >= 60).
"""

from __future__ import annotations

import sys

import numpy as np

from vico.toyworld import checker, world

TILE, SHOWN = 32, 4  # the probe's grids show each 32x32 sample enlarged 4x (nearest neighbour)


def texture_match(image: np.ndarray, name: str) -> tuple[float, float]:
    """(best correlation over phases, contrast at that phase) of ``image``'s object (uint8 [32, 32, 3]) with
    the world texture ``name``; (-1, 0) when the object is flat."""
    inner = checker._interior(checker.object_mask(image), depth=1)
    brightness = image.astype(np.float32).sum(-1)[inner]
    yy, xx = np.mgrid[:TILE + checker.MAX_PERIOD, :TILE + checker.MAX_PERIOD]
    full = world.ALL_TEXTURES[name](yy, xx)
    best = (-1.0, 0.0)
    if brightness.size < 2 or brightness.std() < 1e-6:
        return best
    for dy in range(checker.MAX_PERIOD):
        for dx in range(checker.MAX_PERIOD):
            dark = full[dy:dy + TILE, dx:dx + TILE][inner]
            if dark.all() or not dark.any():
                continue
            r = float(np.corrcoef(brightness, ~dark)[0, 1])
            if r > best[0]:
                best = (r, float(brightness[~dark].mean() - brightness[dark].mean()))
    return best


def grid_tiles(grid: np.ndarray) -> list[np.ndarray]:
    """The 32x32 samples of a probe grid."""
    size = TILE * SHOWN
    return [np.ascontiguousarray(grid[r * size:(r + 1) * size:SHOWN, c * size:(c + 1) * size:SHOWN])
            for r in range(grid.shape[0] // size) for c in range(grid.shape[1] // size)]


def summary(tiles: list[np.ndarray], name: str) -> str:
    read = sum(checker.read(t)["texture"] == name for t in tiles)
    scores = np.array([texture_match(t, name) for t in tiles])
    r, contrast = scores[:, 0], scores[:, 1]
    return (f"read as {name} {read}/{len(tiles)}; best r with {name}: median {np.median(r):.2f} "
            f"[q1 {np.quantile(r, .25):.2f}, q3 {np.quantile(r, .75):.2f}], r >= 0.3: {(r >= 0.3).sum()}/{len(r)}; "
            f"contrast at that phase median {np.median(contrast):.0f} (the checker needs r >= 0.5, contrast >= 60)")


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    path, name = (sys.argv[1:] if argv is None else argv)[:2]
    print(f"{path}: {summary(grid_tiles(np.asarray(Image.open(path).convert('RGB'))), name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
