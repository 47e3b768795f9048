"""The toy world generator and its checker."""

import numpy as np

from vico.toyworld import checker, world


def test_generator_is_deterministic_and_holds_out_pairs():
    a, sa = world.dataset(50, seed=3)
    b, sb = world.dataset(50, seed=3)
    assert np.array_equal(a, b) and sa == sb and a.shape == (50, 32, 32, 3) and a.dtype == np.uint8
    _, scenes = world.dataset(500, seed=4)
    assert not any((s.shape, s.colour) in world.HELD_OUT for s in scenes)
    assert not any(s.texture in world.NOVEL_TEXTURES for s in scenes)
    _, held = world.dataset(20, seed=5, held_out=True)
    assert all((s.shape, s.colour) in world.HELD_OUT for s in held)
    assert scenes[0].caption().startswith(f"a {scenes[0].size} {scenes[0].colour} ")
    assert set(scenes[0].caption().split()) <= set(world.vocabulary())


def test_checker_reads_generator_images_exactly():
    imgs, scenes = world.dataset(200, seed=0)
    acc = checker.accuracy(imgs, scenes)
    assert acc == {"background": 1.0, "colour": 1.0, "shape": 1.0, "texture": 1.0, "size": 1.0}
    held, hs = world.dataset(60, seed=2, held_out=True)
    assert min(checker.accuracy(held, hs).values()) == 1.0


def test_checker_is_robust_to_sample_noise():
    imgs, scenes = world.dataset(200, seed=1)
    noisy = np.clip(imgs.astype(float) + np.random.default_rng(0).normal(0, 15, imgs.shape), 0, 255).astype(np.uint8)
    acc = checker.accuracy(noisy, scenes)
    assert acc["background"] == 1.0 and acc["colour"] >= 0.98 and acc["shape"] >= 0.9 and acc["size"] >= 0.95


def test_checker_on_an_empty_image():
    blank = np.full((32, 32, 3), 128, np.uint8)
    got = checker.read(blank)
    assert got["background"] == "gray" and got["shape"] is None
