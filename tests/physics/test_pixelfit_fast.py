"""The per-pixel fit's fast parts against the plain numpy they stand for: sort-based medians,
closed-form solves, masked sums, box sums, residual histograms, the robust fit that refits only
the pixels whose kept frames changed; and a fit that does not depend on its memory budget."""

import importlib
import warnings

import h5py
import numpy as np
import pytest

from deepdark import physics as P
from deepdark.io.geometry import load_geometry
from deepdark.physics import fit as F
from deepdark.physics import pixelfit as PF
from deepdark.physics.frame_state import MAD_SIGMA, masked_sum, median_last, streamed_median
from tests.physics.simulated import mini_library

MINI = load_geometry("mini")


def _numpy_masked_median(values, valid):
    """What the sort-based median stands for: np.median of full columns, np.nanmedian of the rest."""
    out = np.median(values, axis=0)
    partial = ~valid.all(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out[partial] = np.nanmedian(np.where(valid[:, partial], values[:, partial], np.nan), axis=0)
    return out


# 17, 65, 130: a part band; from 512 the lanes are partitioned, not sorted
@pytest.mark.parametrize("n_frames", [1, 2, 3, 4, 5, 16, 17, 64, 65, 130, 512, 513, 1030])
def test_masked_median_equals_numpy_to_the_bit(n_frames):
    rng = np.random.default_rng(n_frames)
    values = np.abs(rng.normal(size=(n_frames, 2000))).astype(np.float32)
    values[:, :7] = 1.5  # ties
    values[rng.random(values.shape) < 0.01] = np.nan  # NaN values: NaN medians of full columns
    valid = rng.random(values.shape) > 0.1
    valid[:, 10:20] = False  # columns without a valid value
    valid[:, 20:1500] = True
    expected = _numpy_masked_median(values, valid)
    before = values.copy()
    for nonnegative in (False, True):
        got = PF._masked_median(values, valid, nonnegative=nonnegative)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(values, before)  # the input is left as it was
    # negative values and a single column (whose transpose is contiguous: sorted in a copy too)
    signed = rng.normal(size=(n_frames, 1)).astype(np.float32)
    kept = signed.copy()
    np.testing.assert_array_equal(PF._masked_median(signed, np.ones_like(signed, bool)), np.median(kept, axis=0))
    np.testing.assert_array_equal(signed, kept)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 7, 8, 1024, 1025, 1042])  # from 512 values partitioned, not sorted
def test_median_last_equals_numpy_to_the_bit(dtype, n):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(3, 5, n)).astype(dtype)
    a[0, 1, n // 2] = np.nan
    for keepdims in (False, True):
        got, expected = median_last(a, keepdims=keepdims), np.median(a, axis=-1, keepdims=keepdims)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
        # values without a sign bit, ordered as their bit patterns
        got = median_last(np.abs(a), keepdims=keepdims, nonnegative=True)
        np.testing.assert_array_equal(got, np.median(np.abs(a), axis=-1, keepdims=keepdims))
    flat = a[1:].ravel()
    np.testing.assert_array_equal(median_last(flat), np.median(flat))
    np.testing.assert_array_equal(median_last(a[..., ::2]), np.median(a[..., ::2], axis=-1))  # a strided view
    swapped = np.abs(a).astype(np.dtype(dtype).newbyteorder(">"))  # bit patterns of another byte order
    np.testing.assert_array_equal(median_last(swapped, nonnegative=True), np.median(np.abs(a), axis=-1))


def _streamed(values: np.ndarray, parts: int) -> float:
    chunks = np.array_split(values, parts)
    return streamed_median(lambda: iter(chunks))


@pytest.mark.parametrize("gather_max", [2**20, 3, 0])
@pytest.mark.parametrize("n", [1, 2, 3, 1001, 20000])
def test_streamed_median_equals_numpy_to_the_bit(n, gather_max, monkeypatch):
    """Values of every scale, a few distinct values (bins that never shrink), the two middle
    values in different bins, zeros (and -0.0), inf, NaN, middle values whose mean overflows; in
    one part or several; bins gathered at once, after a few refinements, or never (found bit by
    bit). A negative value is an error."""
    fs = importlib.import_module("deepdark.physics.frame_state")  # the module, not its function frame_state
    monkeypatch.setattr(fs, "GATHER_MAX", gather_max)
    rng = np.random.default_rng(n)
    cases = [
        rng.chisquare(1, n) * 10.0 ** rng.uniform(-300, 300, n),
        rng.integers(0, 3, n).astype(float),
        np.repeat([0.0, 1.0], n)[:n],
        np.where(rng.random(n) < 0.5, -0.0, 2.0),
        np.append(rng.chisquare(1, n - 1), np.inf),
    ]
    for values in cases:
        for parts in {1, min(n, 3), min(n, 7)}:
            assert _streamed(values, parts) == np.median(values), (values[:5], parts)
    values = rng.chisquare(1, n)
    values[n // 2] = np.nan
    assert np.isnan(_streamed(values, min(n, 3))) and np.isnan(np.median(values))
    with np.errstate(over="ignore"):  # two equal middle values whose mean overflows: inf, as numpy's
        assert _streamed(np.full(n, 1e308), 1) == np.median(np.full(n, 1e308))
    with pytest.raises(ValueError, match="negative"):
        _streamed(np.append(values, -1.0), 1)


def test_masked_sum_equals_where_sum():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(4, 300)).astype(np.float32)
    keep = rng.random(values.shape) > 0.3
    for dtype in (None, np.float64):
        np.testing.assert_array_equal(
            masked_sum(values, keep, dtype=dtype), np.where(keep, values, 0).sum(-1, dtype=dtype)
        )
    values[0, 0], values[1, 1] = np.inf, np.nan  # not finite: np.where's result itself
    keep[0, 0] = keep[1, 1] = False
    np.testing.assert_array_equal(masked_sum(values, keep), np.where(keep, values, 0).sum(-1))


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_normal_equations_are_the_weighted_products(K):
    """The compiled sums equal numpy's float64 products (to their rounding), for float32 and
    bool weights, whole blocks and strided parts of them, and no pixels."""
    rng = np.random.default_rng(K)
    N, P = 37, 1001
    X = rng.uniform(0.5, 300, (N, K))
    Y = (rng.normal(size=(N, P)) * 50 + 1000).astype(np.float32)
    weights = {"float32": rng.random((N, P)).astype(np.float32), "bool": rng.random((N, P)) > 0.1}
    for name, W in weights.items():
        for y, w in ((Y, W), (Y[:, ::3], W[:, ::3]), (Y[:, :0], W[:, :0])):
            A, b = PF._normal_equations(y, w, X)
            w64 = w.astype(np.float64)
            expected_A = np.stack([(X[:, k] * X[:, m]) @ w64 for k, m in PF._pairs(K)])
            expected_b = X.T @ (w64 * y)
            assert A.shape == (K * (K + 1) // 2, y.shape[1]) and b.shape == (K, y.shape[1])
            np.testing.assert_allclose(A, expected_A, rtol=1e-13, err_msg=name)
            np.testing.assert_allclose(b, expected_b, rtol=1e-13, err_msg=name)


def _random_system(rng, K, P=3000, N=40):
    X = np.stack([rng.uniform(1, 300, N), rng.uniform(1, 100, N), rng.uniform(0.5, 2, N), np.ones(N)], 1)[:, -K:]
    W = rng.random((N, P)).astype(np.float32)
    W[:, :10] = 0  # pixels without data
    W[:4, 10:20] = 0
    Y = rng.normal(size=(N, P)).astype(np.float32) * 50
    return PF._normal_equations(Y, W, X)


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_closed_form_solve_matches_lapack(K):
    A, b = _random_system(np.random.default_rng(K), K)
    at = {km: i for i, km in enumerate(PF._pairs(K))}
    diag = np.stack([A[at[k, k]] for k in range(K)])
    empty = ~(diag > 0).all(axis=0)
    lapack = PF._solve_lapack(A, b, K, diag, empty)
    got = PF._solve(A, b, K)
    assert empty[:10].all() and (got[:, :10] == 0).all()
    np.testing.assert_allclose(got, lapack, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(got.astype(np.float32), lapack.astype(np.float32))


def _plain_robust_fit(Y, valid, X, var, clip, rounds=2):
    """The robust fit as first written: every pixel fitted again in every round."""
    K, X32 = X.shape[1], X.astype(np.float32)
    inv_sd = None if var is None else (1.0 / np.sqrt(var)).astype(np.float32)
    A, b = PF._normal_equations(Y, PF._weights(valid, inv_sd), X)
    beta, keep = PF._solve(A, b, K), valid
    for _ in range(rounds):
        z = PF._scaled_residuals(Y, X32, beta, inv_sd)
        scale = _numpy_masked_median(z, valid) * MAD_SIGMA
        scale = np.where(np.isfinite(scale), np.maximum(scale, 1.0 if inv_sd is not None else 1e-3), np.inf)
        keep = valid & ((clip * scale).astype(np.float32)[None, :] >= z)
        A, b = PF._normal_equations(Y, PF._weights(keep, inv_sd), X)
        beta = PF._solve(A, b, K)
    z = PF._scaled_residuals(Y, X32, beta, inv_sd)
    n = keep.sum(axis=0)
    chi2 = (np.where(keep, z * z, 0).sum(axis=0) / np.maximum(n - K, 1)).astype(np.float32)
    return beta, keep, n, chi2


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_robust_fit_refitting_changed_pixels_only_equals_refitting_all(weighted, rounds):
    rng = np.random.default_rng(rounds)
    N, P = 24, 3000
    X = np.stack([rng.uniform(1, 300, N), rng.uniform(1, 100, N), np.ones(N)], 1)
    truth = rng.normal(size=(3, P)) * [[1], [1], [100]]
    Y = (X @ truth + rng.normal(size=(N, P)) * 5).astype(np.float32)
    Y[rng.random((N, P)) < 0.01] += 500  # outliers: pixels whose kept frames change
    Y[:6, :40] += 30  # pixels that change again in later rounds
    valid = rng.random((N, P)) > 0.02
    var = (rng.random((N, P)) * 20 + 15).astype(np.float32) if weighted else None
    beta, keep, n, chi2 = _plain_robust_fit(Y, valid, X, var, 5.0, rounds)
    fit = PF._robust_fit(Y, valid, X, var, 5.0, rounds=rounds)
    assert (keep != valid).any()
    np.testing.assert_array_equal(fit.keep, keep)
    np.testing.assert_array_equal(fit.n, n)
    # BLAS may round the sums of a few pixels in their last bit unlike those of a whole block
    np.testing.assert_allclose(fit.beta, beta, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fit.chi2, chi2, rtol=1e-6)


@pytest.mark.parametrize("n_frames", [9, 40])
def test_weighted_clip_counts_what_it_need_not_take_a_median_of(n_frames):
    """The weighted clip knows by a count the pixels whose scale is 1 (median |z| at most
    UNIT_MAD): it keeps the same frames as with every looked-at pixel's median, at the boundary
    (odd and even counts, middles either side of UNIT_MAD) and with NaN residuals."""
    rng = np.random.default_rng(n_frames)
    N, P = n_frames, 3000
    z = (np.abs(rng.normal(size=(N, P))) * rng.uniform(0.3, 2.5, P)).astype(np.float32)
    z[rng.random((N, P)) < 0.05] = 50  # beyond the clip: the pixels looked at
    above = np.nextafter(PF.UNIT_MAD, np.float32(1))
    for c, low in enumerate(range(N // 2 - 1, N // 2 + 3)):  # as many values at UNIT_MAD, the rest above
        z[:, c * 10 : c * 10 + 10] = above
        z[:low, c * 10 : c * 10 + 10] = PF.UNIT_MAD
    z[0, :100] = 50
    z[1, 100:110] = np.nan  # NaN residuals: a NaN median (all valid) or one without them
    valid = rng.random((N, P)) > 0.05
    valid[:, 100:105] = True
    out = np.flatnonzero((valid & ~(z <= np.float32(5.0))).any(axis=0))
    expected = valid.copy()
    zo, vo = z[:, out], valid[:, out]
    expected[:, out] = vo & (PF._clip_threshold(zo, vo, 5.0, 1.0)[None, :] >= zo)
    np.testing.assert_array_equal(PF._kept(z, valid, 5.0, weighted=True), expected)
    wide = PF._wider_than_noise(zo, vo)
    assert 0 < wide.sum() < out.size  # both kinds of pixels were looked at
    scale = np.array([PF.UNIT_MAD, above], np.float32) * MAD_SIGMA  # in float32, as the clip's
    assert scale[0] <= 1 < scale[1]
    assert PF._wider_than_noise(zo.astype(np.float64), vo).all()  # only float32 scales are bounded


def _cumsum_box(a, r, axis):
    """The box sum as first written: np.cumsum and gathers."""
    a = np.moveaxis(a, axis, -1)
    c = np.concatenate([np.zeros(a.shape[:-1] + (1,)), np.cumsum(a, axis=-1)], axis=-1)
    n = a.shape[-1]
    hi, lo = np.minimum(np.arange(n) + r + 1, n), np.maximum(np.arange(n) - r, 0)
    return np.moveaxis(c[..., hi] - c[..., lo], -1, axis)


@pytest.mark.parametrize("components", [1, 2])
def test_hot_pixel_laws_tried_a_part_of_the_grid_at_a_time_equal_all_at_once(components):
    """A block's hot pixels fitted in groups within a share of its working set, a few doubling
    temperatures at a time (at 20,000 darks the whole grid's designs alone took 70 MB), from the
    grid's designs held or made for the points asked: the same grid point and coefficients to the
    bit (one pixel whose fit is not possible)."""
    rng = np.random.default_rng(components)
    N, n = 40, 5
    T, t = rng.uniform(-25, -5, N), np.tile([10.0, 30.0], N // 2)
    law = P.Law(-15.0, 8.0, 3.6) if components == 2 else P.Law(-15.0, 8.0)
    taus = rng.uniform(3, 12, n)
    y = (np.exp2((T[:, None] - law.T0) / taus) * t[:, None] * 50 + 100 + rng.normal(0, 3, (N, n))).astype(np.float32)
    ok = rng.random((N, n)) > 0.05
    ok[:, 0] = False  # too few frames: no fit
    var = np.full((N, n), 9.0, np.float32)
    noise = F._Noise(np.full(N, 9.0), np.full(N, 9.0))
    pixels = (y, ok, ok.copy(), var)
    held = PF.HotGrid(T, t, law, 2**30)
    assert held.held is not None
    whole = PF._hot_fits(*pixels, held, noise, 5.0, max_bytes=2**30)
    assert np.isnan(whole[0][0]) and np.isfinite(whole[0][1:]).all()
    made = PF.HotGrid(T, t, law, 0)  # the designs made for the points asked
    for max_bytes in (1, 8 * N * 11 * 7, 8 * N * 141 * 11 * 2):  # a point at a time, 7, two pixels
        for grid in (held, made):
            got = PF._hot_fits(*pixels, grid, noise, 5.0, max_bytes=max_bytes)
            np.testing.assert_array_equal(got[0], whole[0])
            np.testing.assert_array_equal(got[1], whole[1])


@pytest.mark.parametrize("shape", [(40, 52), (7, 7), (6, 9), (1, 12), (12, 1), (3, 2)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_box_sums_equal_cumsum_differences_to_the_bit(shape, dtype):
    a = np.random.default_rng(2).normal(size=shape).astype(dtype)
    for r in (1, 3):
        for axis in (0, 1):
            np.testing.assert_array_equal(PF._box(a, r, axis), _cumsum_box(a, r, axis))


def test_residual_histograms_count_like_bincount():
    rng = np.random.default_rng(4)
    N, edges_max = 5, 3.0
    hist = F._ResidualHistograms(N, edges_max)
    blocks = []
    for width in (7, 300, 151, 90):  # more than the bins: counted on the way
        res = (rng.normal(size=(N, width)) * 2).astype(np.float32)
        res[0, 0] = np.nan  # not counted
        valid = rng.random((N, width)) > 0.1
        blocks.append((res.copy(), valid))
        hist.add(res, valid)
    overflow = len(np.arange(0.0, edges_max + F.HIST_STEP, F.HIST_STEP))
    expected = np.zeros((N, overflow + 1), np.int64)
    for res, valid in blocks:
        with np.errstate(invalid="ignore"):
            bins = np.minimum((np.abs(res) / F.HIST_STEP).astype(np.int64), overflow)
        bins[~valid | np.isnan(res)] = overflow
        for f in range(N):
            expected[f] += np.bincount(bins[f], minlength=overflow + 1)
    np.testing.assert_array_equal(hist.counts(), expected[:, :-1])


def test_pieces_tile_the_rows_in_reading_order():
    for rows, cols, pixels in [(5, 68, 200), (5, 68, 64), (3, 10, 1), (4, 9, 9), (2, 7, 1000)]:
        covered = np.zeros(rows * cols, int)
        last = -1
        for a, b, c0, c1 in F._pieces(rows, cols, pixels):
            assert (b - a) * (c1 - c0) <= max(pixels, cols) and (b - a == 1 or (c0, c1) == (0, cols))
            start, stop = a * cols + c0, (b - 1) * cols + c1
            assert start == last + 1
            covered[start:stop] += 1
            last = stop - 1
        assert (covered == 1).all()


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Two nights of mini darks at two exposure times, with bias frames."""
    return mini_library(
        tmp_path_factory.mktemp("fast"),
        seed=11,
        temperatures=(-5, -15, -25),
        darks_per_temp=2,
        dark_exptimes=(10.0, 30.0),
        bias_per_night=2,
        nights=2,
    )


def _datasets(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_fit_does_not_depend_on_the_memory_budget(library, tmp_path):
    """A budget too small for one block of rows: the library goes through a scratch file (which
    leaves nothing behind) and the fit works on pieces of rows; the maps are those of one block."""
    N = 2 * 3 * 2 * 2 + 2 * 2  # darks and biases per channel
    budget = 0.2
    rows, pixels = F._stack_plan(N, MINI.active.shape, 3, budget)
    assert rows < MINI.active.shape[0] and pixels < MINI.active.shape[1]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    P.fit_physics(library, tmp_path / "whole.h5", progress=False)
    P.fit_physics(library, tmp_path / "small.h5", memory_mb=budget, scratch=scratch, progress=False)
    assert not list(scratch.iterdir())
    whole, small = _datasets(tmp_path / "whole.h5"), _datasets(tmp_path / "small.h5")
    assert whole.keys() == small.keys()
    for name, a in whole.items():
        if a.dtype.kind == "f":
            np.testing.assert_allclose(small[name], a, rtol=1e-5, atol=1e-4, err_msg=name)
        else:
            np.testing.assert_array_equal(small[name], a, err_msg=name)


@pytest.mark.parametrize("budget", [0.2, 20.0])
def test_fit_does_not_depend_on_the_threads(library, tmp_path, budget):
    """Frame states, pass A's histograms (one per thread, summed), pass B and the hot pixels on
    three threads: every dataset equal to the bit to one thread's; at 0.2 MB on pieces of rows
    from a scratch file (many items in flight, bounded histograms and their second pass), at 20 MB
    on whole histograms."""
    P.fit_physics(library, tmp_path / "one.h5", memory_mb=budget, threads=1, progress=False)
    P.fit_physics(library, tmp_path / "three.h5", memory_mb=budget, threads=3, progress=False)
    one, three = _datasets(tmp_path / "one.h5"), _datasets(tmp_path / "three.h5")
    assert one.keys() == three.keys()
    for name, a in one.items():
        np.testing.assert_array_equal(three[name], a, err_msg=name)


def test_threads_are_capped_by_the_memory_budget():
    """More threads hold more at once (blocks in flight, a histogram each): a budget that cannot
    hold them gets fewer, never more than asked."""
    shape, N = (1042, 1042), 20_000

    def held(threads):
        return threads * F._ResidualHistograms.bytes(N, F.HIST_MAX, 512 * 2**20 * F.HIST_SHARE / threads)

    assert F._fit_threads(N, shape, 2, 512, held, 8) < F._fit_threads(N, shape, 2, 8192, held, 8) <= 8
    assert F._fit_threads(64, shape, 2, 512, lambda t: 0, 2) == 2
    for threads in (1, 2, 4):
        pixels = F._stack_plan(N, shape, 2, 4096, held(threads), threads)[1]
        assert pixels == F._stack_plan(N, shape, 2, 4096)[1]  # the pieces do not depend on the threads


@pytest.mark.parametrize("length", [5, 300, 5000])
def test_rows_counted_together_equal_a_bincount_per_row(length, monkeypatch):
    """A histogram of many frames counts short rows many at a time (offset by their row),
    long rows one at a time: the counts of a bincount per row either way, also where a group of
    rows ends mid-way (a small COUNT_BYTES)."""
    rng = np.random.default_rng(length)
    width = 97
    values = rng.integers(0, width, (23, length)).astype(np.uint16)
    expected = np.stack([np.bincount(v, minlength=width) for v in values]) + 7
    monkeypatch.setattr(F, "COUNT_BYTES", 8 * 5 * (length + width))  # five rows a call
    counts = np.full((23, width), 7, np.int64)
    F._count_rows(values, counts)
    np.testing.assert_array_equal(counts, expected)


@pytest.mark.parametrize(
    ("width", "dtype", "length", "by_torch"),
    [
        (2**15, np.uint16, 2 * F.LONG_ROW, True),
        (2**15 + 1, np.uint16, 2 * F.LONG_ROW, False),  # a bin past int16
        (300, np.int64, 2 * F.LONG_ROW, False),
        (300, np.uint16, F.TORCH_GRAIN + 1, False),  # torch would check its range on threads of its own
    ],
)
def test_long_rows_count_the_same_whether_torch_or_numpy_counts_them(width, dtype, length, by_torch, monkeypatch):
    """Bins up to 2**15 (the last int16) in rows up to TORCH_GRAIN values are counted by torch,
    which frees the interpreter lock; the rest by numpy: the same counts, from the strided rows
    of a histogram's gathered bins too."""
    import torch

    calls = []
    bincount = torch.bincount
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: calls.append(1) or bincount(*a, **k))
    rng = np.random.default_rng(width + length)
    gathered = rng.integers(0, width, (5, length + 7)).astype(dtype)
    gathered[:, 0] = width - 1  # the last bin, the sign bit of an int16 at 2**15 + 1
    values = gathered[:, :length]  # rows of a wider array: not contiguous
    expected = np.stack([np.bincount(v, minlength=width) for v in values])
    counts = np.zeros((5, width), np.int32)
    F._count_rows(values, counts)
    np.testing.assert_array_equal(counts, expected)
    assert len(calls) == (5 if by_torch else 0)


@pytest.mark.parametrize("max_bytes", [1e3, 2e7, 6e7, 1.3e8])
def test_bounded_columns_are_the_fine_bins_then_coarse_ones(max_bytes):
    """A bounded histogram's float arithmetic gives every bin its column: the bin itself below
    the fine bins' end, then its coarse bin, the overflow bin alone in the last column; also for
    bins a hair below a whole number and for every whole bin."""
    h = F._ResidualHistograms(1000, F.HIST_MAX, max_bytes)
    assert h.bounded
    fine, over = h.fine, h.overflow
    whole = np.arange(over + 1, dtype=np.float32)
    bins = np.concatenate([whole, np.nextafter(whole[1:], np.float32(0)), whole[:-1] + np.float32(0.5)])
    bins = np.concatenate([bins, np.random.default_rng(0).uniform(0, over, 10_000).astype(np.float32)])
    truth = np.floor(bins).astype(np.int64)
    expected = np.where(truth < fine, truth, fine + (truth - fine) // F.COARSE_BINS)
    expected[truth == over] = h.hist.shape[1] - 1
    got = h.columns_of(bins.reshape(1, -1).copy()).astype(np.uint16).ravel()
    np.testing.assert_array_equal(got, expected)
    assert expected[truth < over].max() == h.hist.shape[1] - 2  # the overflow bin's column is its own
