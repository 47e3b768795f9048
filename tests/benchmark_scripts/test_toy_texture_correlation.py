"""benchmarks/toy_texture_correlation.py: the checker's texture correlation without its thresholds."""

import numpy as np

from benchmarks import toy_texture_correlation as tc
from vico.toyworld import demo, world


def test_a_render_of_the_texture_correlates_fully_and_a_solid_object_does_not():
    concept = demo.CONCEPTS[2]  # the blue diagonal triangle
    striped = world.render(demo.concept_scenes(concept)[0])
    r, contrast = tc.texture_match(striped, concept.texture)
    assert r > 0.95 and contrast >= 60
    solid = world.render(demo.concept_scenes(demo.Concept(concept.shape, concept.colour, "solid"))[0])
    assert tc.texture_match(solid, concept.texture) == (-1.0, 0.0)  # a flat object: nothing to correlate


def test_a_probe_grid_is_cut_into_its_samples():
    tiles = [np.full((32, 32, 3), i, np.uint8) for i in range(6)]
    grid = np.concatenate([np.concatenate([t.repeat(4, 0).repeat(4, 1) for t in tiles[r * 3:(r + 1) * 3]], 1)
                           for r in range(2)])
    assert [int(t[0, 0, 0]) for t in tc.grid_tiles(grid)] == list(range(6))
