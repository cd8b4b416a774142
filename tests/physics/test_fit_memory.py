"""The library fit holds what its budget allows, whatever the library's size; pass A's bounded
histograms find the same medians as whole ones."""

import tracemalloc

import h5py
import numpy as np
import pytest

from deepdark import physics as P
from deepdark.physics import fit as F
from deepdark.physics import transfer as T
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


def test_a_budget_too_small_for_the_library_is_said(library, tmp_path, caplog):
    """What the fit holds of every frame grows with the library: a budget below the least it can
    plan is a warning naming the channel and what it needs; a budget that fits, none."""
    with caplog.at_level("WARNING", logger="deepdark.physics.fit"):
        P.fit_physics(library, tmp_path / "fits.h5", memory_mb=64, progress=False)
        assert "need about" not in caplog.text
        P.fit_physics(library, tmp_path / "short.h5", memory_mb=0.1, progress=False)
    assert "camera GS1 channel 1: 76 library frames need about" in caplog.text and "--memory-mb" in caplog.text


def _datasets_and_attrs(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.update({name: obj[()]}) if isinstance(obj, h5py.Dataset) else None)
        f.visititems(lambda name, obj: out.update({f"{name}@{k}": v for k, v in obj.attrs.items()}))
        out.update({f"@{k}": v for k, v in f.attrs.items() if k != "created"})
    return out


def test_a_library_read_as_needed_is_fitted_as_one_held(library, tmp_path, monkeypatch):
    """The law's block means and the transfer's row offsets held (a small library) or read from
    the frame store in every pass (LIBRARY_SHARE 0: thousands of darks at the default budget):
    the same physics file to the bit. Read in small parts (3 frames of the law's block means, or
    10 blocks of every frame; 3 frames of row offsets), so that both are read in many."""
    monkeypatch.setattr(F, "LAW_VALUES", 3 * 256)
    monkeypatch.setattr(T, "TRANSFER_VALUES", 3 * 68)
    P.fit_physics(library, tmp_path / "held.h5", progress=False)
    monkeypatch.setattr(F, "LIBRARY_SHARE", 0.0)
    P.fit_physics(library, tmp_path / "read.h5", progress=False)
    held, read = _datasets_and_attrs(tmp_path / "held.h5"), _datasets_and_attrs(tmp_path / "read.h5")
    assert held.keys() == read.keys() and any("transfer" in k for k in held)
    for name, value in held.items():
        np.testing.assert_array_equal(read[name], value, err_msg=name)


def _store(tmp_path, name: str, values: np.ndarray) -> F._FrameStore:
    """A frame store of one field, ``values`` (one record per frame)."""
    store = F._FrameStore(len(values), {name: (values.shape[1:], np.float64)}, tmp_path)
    for first in range(0, len(values), 500):
        store.write(name, np.arange(first, min(len(values), first + 500)), values[first : first + 500])
    return store


def _peak(call) -> tuple[object, float]:
    """What ``call()`` returns, and its peak of numpy's memory (bytes)."""
    tracemalloc.start()
    try:
        return call(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_law_and_the_transfer_read_a_large_library_a_part_at_a_time(tmp_path, monkeypatch):
    """A library whose block means and row offsets are not held: its law and transfer take a
    small part of what holding them would (3,000 frames: 24 MB of block means, 53 MB of
    residual row offsets; parts of 256 KB), and find what they find held."""
    monkeypatch.setattr(T, "TRANSFER_VALUES", 2**15)
    rng = np.random.default_rng(3)
    n, setpoints = 3000, np.repeat([-5.0, -15.0, -25.0], 1000)
    T_true, t = setpoints + rng.uniform(-1, 1, n), np.tile([10.0, 30.0], n // 2)
    header = np.round(T_true + rng.normal(0, 0.5, n), 1)
    X = P.Law(-15.0, 8.0, 3.6).design(T_true, t)
    maps = np.stack([rng.uniform(3, 6, 1024), rng.uniform(0.5, 2, 1024), rng.uniform(0, 50, 1024)])
    Y = X @ maps + rng.normal(0, 0.05, (n, 1024))
    stored = F._BlockMeans(_store(tmp_path, "blocks", Y.reshape(n, 32, 32)), [np.arange(n)], hold_bytes=0)
    law, peak = _peak(lambda: P.fit_law(stored, t, header, setpoints, part_values=2**15))
    expected = P.fit_law(Y, t, header, setpoints)
    assert law[0] == expected[0]
    np.testing.assert_array_equal(law[1], expected[1])
    np.testing.assert_array_equal(law[2], expected[2])
    assert peak < Y.nbytes / 6, peak / 2**20

    R = 1042
    active, overscan = rng.normal(0, 2, (n, R)), rng.normal(0, 2, (n, R))
    readers = [F._Records(_store(tmp_path, "rows", a), "rows", np.arange(n)) for a in (active, overscan)]
    transfer, peak = _peak(lambda: P.measure_transfer(*readers, X, read_var=4.0, hold_bytes=0))
    assert transfer == P.measure_transfer(active, overscan, X, read_var=4.0)  # held, in the same parts
    assert peak < 17 * n * R / 6, peak / 2**20
