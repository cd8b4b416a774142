"""The library fit holds what its budget allows, whatever the library's size; pass A's bounded
histograms find the same medians as whole ones."""

import tracemalloc

import numpy as np
import pytest

from deepdark import physics as P
from deepdark.physics import fit as F
from tests.physics.simulated import mini_library


def _blocks(rng, N, widths):
    """Blocks of residuals (N, width) whose frames' scales span 0.01 to 300 ADU, with NaNs and
    invalid pixels: some frames' medians lie far beyond a bounded histogram's fine bins, the last
    frame's in the last coarse bin before the overflow bin (|residual| 498.8 to 499.9 ADU)."""
    scale = np.geomspace(0.01, 300, N)[:, None]
    out = []
    for width in widths:
        res = (rng.normal(size=(N, width)) * scale).astype(np.float32)
        res[-1] = rng.uniform(498.8, 499.9, width) * rng.choice([-1, 1], width)
        res[0, 0] = np.nan
        out.append((res, rng.random((N, width)) > 0.1))
    return out


@pytest.mark.parametrize("count_bytes", [F.COUNT_BYTES, 3000])
@pytest.mark.parametrize("max_bytes", [1e3, 2e5, 4e5])
def test_bounded_histograms_find_the_medians_of_whole_ones(max_bytes, count_bytes, monkeypatch):
    """Also with a few frames counted (and their medians searched) a call."""
    monkeypatch.setattr(F, "COUNT_BYTES", count_bytes)
    rng = np.random.default_rng(7)
    N = 12
    blocks = _blocks(rng, N, (7, 300, 151, 900, 64))
    whole = F._ResidualHistograms(N, F.HIST_MAX)
    bounded = F._ResidualHistograms(N, F.HIST_MAX, max_bytes)
    assert bounded.bounded and bounded.hist.shape[1] < whole.hist.shape[1]
    for res, valid in blocks:
        whole.add(res.copy(), valid)
        bounded.add(res.copy(), valid)
    expected, none, no_window = whole.median_bins()
    assert no_window is None and not none.size
    counts = whole.counts()  # the bin where the cumulative count first reaches half
    cum = np.cumsum(counts, axis=1)
    np.testing.assert_array_equal(expected, [np.searchsorted(c, c[-1] / 2.0) for c in cum])
    got, beyond, window = bounded.median_bins()
    assert beyond.size and window is not None  # the widest frames need the second pass
    for res, valid in blocks:
        window.add(res.copy(), valid)
    got[beyond] = window.median_bins()
    np.testing.assert_array_equal(got, expected)
    assert F._ResidualHistograms.bytes(N, F.HIST_MAX, max_bytes) <= max(max_bytes, N * 4000)


def test_bounded_histograms_stay_within_their_bytes():
    for N in (10, 1000, 20000):
        assert F._ResidualHistograms.bytes(N, F.HIST_MAX, 64 * 2**20) <= 64 * 2**20
    assert F._ResidualHistograms.bytes(20, F.HIST_MAX, 64 * 2**20) == 20 * F._ResidualHistograms.bins(F.HIST_MAX) * 6


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Two nights of 36 mini darks (and 2 biases) each."""
    return mini_library(
        tmp_path_factory.mktemp("memory"),
        seed=5,
        temperatures=(-5, -15, -25),
        darks_per_temp=6,
        dark_exptimes=(10.0, 30.0),
        bias_per_night=2,
        nights=2,
    )


def _peak_mb(shards, out, memory_mb):
    tracemalloc.start()  # numpy reports its arrays to tracemalloc
    try:
        P.fit_physics(shards, out, memory_mb=memory_mb, progress=False)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_fit_memory_does_not_grow_with_the_library(library, tmp_path):
    """Per frame-channel, stage 1's measurements go to a scratch file and pass A's histograms
    stay within their share: twice the library, about the same peak, within the budget plus a
    fixed overhead (whole histograms alone take 6 MB at 38 frames, 11 MB at 76)."""
    budget = 2.0
    small = _peak_mb(library[:1], tmp_path / "small.h5", budget)
    large = _peak_mb(library, tmp_path / "large.h5", budget)
    assert large < budget + 2.0, (small, large)
    assert large - small < 2.0, (small, large)
