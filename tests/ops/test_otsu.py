"""Otsu thresholding: every CPU backend against a direct transcription of
docs/ops.md §3.2 (mode "vico") and against scikit-image (mode "skimage")."""

import math

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

import fused


def transcribed_vico(m: torch.Tensor, bins: int):
    """docs/ops.md §3.2 mode "vico" for one map, written as plainly as possible."""
    dtype = torch.float32 if m.dtype in (torch.float16, torch.bfloat16) else m.dtype
    x = m.to(dtype)
    lo, hi = x.min(), x.max()
    if hi == lo:
        return torch.tensor(0, dtype=dtype), torch.ones_like(x, dtype=torch.bool)
    xn = (x - lo) / (hi - lo)
    n = x.numel()
    best_g, best_tau = 0.0, torch.tensor(0, dtype=dtype)
    for t in range(1, bins):
        tau = torch.tensor(t, dtype=dtype) / torch.tensor(bins, dtype=dtype)
        low = [float(e) for e in xn if e < tau]
        high = [float(e) for e in xn if e >= tau]
        if not low or not high:
            continue
        mu_low, mu_high = math.fsum(low) / len(low), math.fsum(high) / len(high)
        g = (len(low) / n) * (len(high) / n) * (mu_low - mu_high) ** 2
        if g > best_g:
            best_g, best_tau = g, tau
    mask = xn >= best_tau if best_tau > 0 else xn > 0
    return best_tau, mask


def check_vico(maps, bins, backend):
    thr, mask = fused.otsu_mask(maps, bins=bins, mode="vico", backend=backend)
    flat, thr_flat, mask_flat = maps.reshape(-1, maps.shape[-1]), thr.reshape(-1), mask.reshape(-1, maps.shape[-1])
    for i in range(flat.shape[0]):
        want_thr, want_mask = transcribed_vico(flat[i], bins)
        assert thr_flat[i].item() == want_thr.item(), (i, thr_flat[i], want_thr)
        assert torch.equal(mask_flat[i], want_mask), i
    return thr, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bins", [10, 4])
def test_vico_random_maps(otsu_backend, dtype, bins):
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(3, 2, 200, generator=g, dtype=dtype) ** 3  # skewed, like attention
    thr, mask = check_vico(maps, bins, otsu_backend)
    assert thr.shape == (3, 2) and mask.shape == (3, 2, 200) and mask.dtype == torch.bool
    assert thr.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vico_values_exactly_on_candidates(otsu_backend, dtype):
    """Values k/10 (with 0 and 1 present, so normalisation is the identity) sit
    exactly on candidate thresholds and must go to the high class."""
    g = torch.Generator().manual_seed(5)
    k = torch.randint(0, 11, (4, 60), generator=g)
    k[:, 0], k[:, 1] = 0, 10
    maps = k.to(dtype) / 10
    thr, mask = check_vico(maps, 10, otsu_backend)
    for i in range(4):
        assert torch.equal(mask[i], maps[i] >= thr[i])  # on-threshold values are high


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bins", [10, 256, 1000])
def test_vico_bucket_of_values_on_and_beside_every_candidate(otsu_backend, dtype, bins):
    """One probe value v per map, between a cluster at 0 and a cluster at 1: v joins
    the 0s, so the threshold is the first candidate above v, i.e. tau_{b+1} with
    b = #{t : tau_t <= v}. A bucket off by one in either direction (the C++ kernel
    guesses floor(v * bins) and corrects) moves the threshold. Probes sit exactly on
    candidates of the lower half (about 100 of them) and one ulp either side."""
    t = torch.arange(1, bins, dtype=torch.int64)
    taus = t.to(dtype) / torch.tensor(bins, dtype=dtype)  # tau_t rounded once, as docs/ops.md §3.2 says
    taus = taus[taus < 0.45]  # above ~0.5 v joins the 1s and the first candidate wins regardless
    taus = taus[::max(1, len(taus) // 100)]  # keeps the interpreted Triton run short
    probes = torch.cat([taus, torch.nextafter(taus, torch.zeros_like(taus)),
                        torch.nextafter(taus, torch.ones_like(taus))])
    maps = torch.cat([torch.zeros(len(probes), 8, dtype=dtype), probes[:, None],
                      torch.ones(len(probes), 8, dtype=dtype)], dim=1)
    thr, mask = fused.otsu_mask(maps, bins=bins, mode="vico", backend=otsu_backend)
    all_taus = t.to(dtype) / torch.tensor(bins, dtype=dtype)
    bucket = (all_taus[None, :] <= probes[:, None]).sum(dim=1)
    assert torch.equal(thr, all_taus[bucket])  # tau_{b+1} is all_taus[b]
    assert not mask[:, 8].any() and mask[:, 9:].all() and not mask[:, :8].any()
    want_thr, want_mask = fused.reference.otsu_vico(maps, bins)
    assert torch.equal(thr, want_thr) and torch.equal(mask, want_mask)


def test_vico_constant_and_two_valued_maps(otsu_backend):
    maps = torch.tensor(
        [[0.3] * 8, [0.0] * 8, [0.2, 0.2, 0.2, 0.9, 0.9, 0.2, 0.9, 0.2], [1.0] + [0.0] * 7],
        dtype=torch.float64,
    )
    thr, mask = check_vico(maps, 10, otsu_backend)
    assert thr[0] == 0 and mask[0].all() and mask[1].all()  # constant: tau 0, all True
    # two values: normalised to {0, 1}; every candidate ties, the first (0.1) wins
    assert thr[2].item() == pytest.approx(0.1) and torch.equal(mask[2], maps[2] > 0.5)
    assert torch.equal(mask[3], maps[3] > 0.5)


def test_vico_half_maps_compute_in_float32(otsu_backend):
    g = torch.Generator().manual_seed(9)
    maps = torch.rand(5, 64, generator=g).half()
    thr, _ = check_vico(maps, 10, otsu_backend)
    assert thr.dtype == torch.float32


def test_vico_batched_equals_one_by_one(otsu_backend):
    g = torch.Generator().manual_seed(11)
    maps = torch.rand(2, 3, 4, 50, generator=g, dtype=torch.float64)
    thr, mask = fused.otsu_mask(maps, backend=otsu_backend)
    for idx in np.ndindex(2, 3, 4):
        t1, m1 = fused.otsu_mask(maps[idx], backend=otsu_backend)
        assert t1 == thr[idx] and torch.equal(m1, mask[idx])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bins", [256, 64, 7])
def test_skimage_mode_matches_threshold_otsu(otsu_backend, dtype, bins):
    g = torch.Generator().manual_seed(bins)
    maps = torch.randn(6, 300, generator=g, dtype=dtype).exp()  # log-normal, like attention maps
    maps[0] = torch.rand(300, generator=g, dtype=dtype)
    thr, mask = fused.otsu_mask(maps, bins=bins, mode="skimage", backend=otsu_backend)
    assert thr.dtype == dtype
    for i in range(maps.shape[0]):
        want = threshold_otsu(maps[i].numpy(), nbins=bins)
        assert thr[i].item() == pytest.approx(float(want), rel=1e-6 if dtype == torch.float32 else 1e-12)
        assert torch.equal(mask[i], maps[i] > thr[i])


def test_skimage_mode_constant_map(otsu_backend):
    maps = torch.full((2, 16), 0.25, dtype=torch.float64)
    thr, mask = fused.otsu_mask(maps, mode="skimage", backend=otsu_backend)
    assert torch.all(thr == 0.25) and not mask.any()
    assert float(threshold_otsu(maps[0].numpy())) == 0.25


def test_default_bins_depend_on_mode(otsu_backend):
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(3, 500, generator=g, dtype=torch.float64) ** 2
    t_default, _ = fused.otsu_mask(maps, mode="skimage", backend=otsu_backend)
    t_256, _ = fused.otsu_mask(maps, bins=256, mode="skimage", backend=otsu_backend)
    assert torch.equal(t_default, t_256)
    v_default, _ = fused.otsu_mask(maps, backend=otsu_backend)
    v_10, _ = fused.otsu_mask(maps, bins=10, backend=otsu_backend)
    assert torch.equal(v_default, v_10)


def test_paper_loop_baseline_agrees_with_the_rule():
    """The benchmark's transcription of the paper's per-sample loop gives the
    same masks as the batched rule on non-constant maps (so speed-ups compare
    equal work)."""
    from fused.benchmark import paper_otsu_loop

    g = torch.Generator().manual_seed(21)
    maps = torch.rand(6, 300, generator=g) ** 3
    maps[0] = (torch.randint(0, 11, (300,), generator=g).float() / 10)  # values on candidates
    maps[0, :2] = torch.tensor([0.0, 1.0])
    assert torch.equal(paper_otsu_loop(maps), fused.otsu_mask(maps, backend="torch")[1])
