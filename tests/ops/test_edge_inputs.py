"""Edge inputs on which the torch reference and the C++ kernels used to disagree with docs/ops.md or each other:
a -1 slot in a NaN row, a map over one key, and the reference's memory at a huge Otsu ``bins``."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused


@pytest.mark.filterwarnings("ignore:fused. scores up to nan:RuntimeWarning")  # sdpa hands NaN rows to cpp
def test_a_minus_one_slot_is_zero_even_in_a_nan_row(cpu_backend):
    """docs/ops.md §2.2: a -1 slot's map is all zeros (the reference gave NaN where q is NaN)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    q[0, :, 1] = float("nan")  # one query row of NaN
    index = torch.tensor([[-1, 2]])
    _, maps = fused.cross_attention_with_maps(q, k[:, :, :3], v[:, :, :3], index, backend=cpu_backend)
    assert torch.equal(maps[0, 0], torch.zeros(3, dtype=torch.float64))  # the -1 slot: zeros, NaN row included
    assert torch.isnan(maps[0, 1, 1]) and torch.isfinite(maps[0, 1, [0, 2]]).all()


def test_a_map_over_one_key_is_exactly_one_and_its_mask_matches(cpu_backend):
    """L = 1: every query gives its one key probability 1; the head mean of H = 3 float32 terms 1/3 rounded to
    1.0000001 in C++, and its Otsu mask then differed from the reference's."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 8, 4, generator=g)
    k, v = torch.randn(2, 3, 1, 4, generator=g), torch.randn(2, 3, 1, 4, generator=g)
    index = torch.zeros(2, 1, dtype=torch.long)
    _, maps = fused.cross_attention_with_maps(q, k, v, index, backend=cpu_backend)
    assert torch.equal(maps, torch.ones(2, 1, 8))
    _, ref_maps = fused.cross_attention_with_maps(q, k, v, index, backend="torch")
    for mode in ("vico", "skimage"):
        ref = fused.otsu_mask(ref_maps, mode=mode, backend="torch")
        got = fused.otsu_mask(maps, mode=mode, backend="torch")
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_the_reference_otsu_at_huge_bins_fits_in_bounded_memory(cpp_backend):
    """bins = 32768 over a 1024-long map: the reference built [bins, N] float64 products (2 x 268 MB here, 10 GB
    at the red team's size); in chunks it stays within 256 MB of address space and agrees with the C++ kernel."""
    script = textwrap.dedent("""
        import resource, sys, torch
        import fused
        g = torch.Generator().manual_seed(2)
        maps = torch.rand(1, 1024, generator=g, dtype=torch.float64)
        expected = fused.otsu_mask(maps, bins=32768, backend="cpp")
        size = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize"))) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + 256 * 2**20, resource.RLIM_INFINITY))
        got = fused.otsu_mask(maps, bins=32768, backend="torch")
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), (got, expected)
        print("ok", float(got[0]))
    """)
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]
