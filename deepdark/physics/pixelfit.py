"""Per-pixel weighted least squares (robust, hot pixels) and the smoothing prior (``deepdark.physics``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .frame_state import MAD_SIGMA, middle_values
from .law import Law

HOT_TAUS = np.round(np.arange(2.0, 16.01, 0.1), 2)  # per-pixel doubling temperatures tried, C
IRREGULAR_P = 1e-3  # false-alarm rate of the smooth-prior test per pixel


# -- per-pixel weighted least squares -----------------------------------------------------------


def _pairs(K: int) -> list[tuple[int, int]]:
    return [(k, m) for k in range(K) for m in range(k, K)]


def _normal_equations(Y: np.ndarray, W: np.ndarray, X: np.ndarray):
    """Packed per-pixel normal matrix A (K(K+1)/2, P) and right side b (K, P), float64.

    Y: (N, P) float32; W: (N, P) float32, or bool for weights of 1; X: (N, K) shared by all
    pixels. Summed in one pass over Y and W without the interpreter lock
    (:func:`deepdark.physics.compiled.normal_sums`): numpy's matrix products need float64 copies
    of W and of W * Y first, 2-3x the time (0.9 against 0.36-0.5 ms for 2**19 frame-pixels),
    which was a fifth of a library fit."""
    from .compiled import normal_sums  # here: loading numba is for jobs that fit

    P, K = Y.shape[1], X.shape[1]
    XX = np.stack([X[:, k] * X[:, m] for k, m in _pairs(K)])  # (npairs, N)
    A, b = np.zeros((len(XX), P)), np.zeros((K, P))
    # C order (a refit's columns come out of numpy's indexing in another): rows read in order,
    # and one compiled version per dtype (float32 or bool weights), not per layout
    Y, W = np.ascontiguousarray(Y), np.ascontiguousarray(W)
    normal_sums(Y, W, np.ascontiguousarray(X.T, np.float64), np.ascontiguousarray(XX, np.float64), A, b)
    return A, b


def _unpack(A: np.ndarray, K: int) -> np.ndarray:
    """Packed (npairs, P) -> (P, K, K)."""
    P = A.shape[1]
    M = np.empty((P, K, K))
    for i, (k, m) in enumerate(_pairs(K)):
        M[:, k, m] = M[:, m, k] = A[i]
    return M


def _solve(A: np.ndarray, b: np.ndarray, K: int) -> np.ndarray:
    """Per-pixel solution (K, P) of packed normal equations; pixels without data get 0.

    Each system is regularised (1e-12 of its diagonal); up to K = 3 it is solved in closed form
    over all pixels at once (a symmetric L D L' factorisation): batched LAPACK calls cost about
    100 ns a pixel, most of a small library's fit."""
    at = {km: i for i, km in enumerate(_pairs(K))}
    diag = np.stack([A[at[k, k]] for k in range(K)])
    empty = ~(diag > 0).all(axis=0)
    if K > 3:
        return _solve_lapack(A, b, K, diag, empty)
    d = diag + (1e-12 * diag + 1e-300)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if K == 1:
            beta = b / d
        elif K == 2:
            beta = _ldl2(d, A[at[0, 1]], b)
        else:
            beta = _ldl3(d, A[at[0, 1]], A[at[0, 2]], A[at[1, 2]], b)
    beta[:, empty] = 0
    return beta


def _ldl2(d: np.ndarray, a01: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solutions (2, P) of symmetric 2 x 2 systems with diagonal ``d`` (2, P) and off-diagonal
    ``a01``: L D L' without pivoting (the systems are positive definite)."""
    l10 = a01 / d[0]
    d1 = d[1] - l10 * a01
    x1 = (b[1] - l10 * b[0]) / d1
    x0 = b[0] / d[0] - l10 * x1
    return np.stack([x0, x1])


def _ldl3(d: np.ndarray, a01: np.ndarray, a02: np.ndarray, a12: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solutions (3, P) of symmetric 3 x 3 systems with diagonal ``d`` (3, P) and off-diagonal
    ``a01``, ``a02``, ``a12``: L D L' without pivoting (the systems are positive definite)."""
    l10, l20 = a01 / d[0], a02 / d[0]
    d1 = d[1] - l10 * a01
    c12 = a12 - l20 * a01
    l21 = c12 / d1
    d2 = d[2] - l20 * a02 - l21 * c12
    y1 = b[1] - l10 * b[0]
    x2 = (b[2] - l20 * b[0] - l21 * y1) / d2
    x1 = y1 / d1 - l21 * x2
    x0 = b[0] / d[0] - l10 * x1 - l20 * x2
    return np.stack([x0, x1, x2])


def _solve_lapack(A: np.ndarray, b: np.ndarray, K: int, diag: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """:func:`_solve` by batched LAPACK calls (any K)."""
    M = _unpack(A, K)
    M[:, range(K), range(K)] += (1e-12 * diag + 1e-300).T
    M[empty] = np.eye(K)
    rhs = b.T.copy()
    rhs[empty] = 0
    return np.linalg.solve(M, rhs[..., None])[..., 0].T


def _masked_median(values: np.ndarray, valid: np.ndarray, nonnegative: bool = False) -> np.ndarray:
    """Median over axis 0 of ``values`` (N, P) where ``valid``; NaN for columns without any.

    Equal to the bit to :func:`numpy.median` of fully valid columns (NaN if they hold one) and to
    :func:`numpy.nanmedian` of the valid values of the others (the mean of the two middle values
    in the values' dtype for an even count). The columns are transposed so that each pixel's
    values are contiguous (:func:`middle_values`): several times faster than ``np.median``'s
    partition along a strided axis. ``nonnegative``: float32 values without a sign bit
    (``np.abs`` gives them), which order as their bit patterns, faster still."""
    N, P = values.shape
    lanes = _transposed(values)
    partial = ~valid.all(axis=0)
    if partial.any():
        np.copyto(lanes, np.nan, where=~valid.T)  # invalid values order last, as NaN values do
    if partial.any() or (P and np.isnan(lanes.max())):
        count = N - np.isnan(lanes).sum(axis=1)  # each pixel's valid values that are not NaN
    else:
        count = np.full(P, N)
    keys = lanes.view(np.uint32) if nonnegative and lanes.dtype == np.float32 else lanes
    out = np.empty(P, values.dtype)
    for n in np.unique(count):
        here = count == n
        if not n:
            out[here] = np.nan
            continue
        out[here] = middle_values(keys if here.all() else keys[here], int(n), values.dtype)
    out[(count < N) & ~partial] = np.nan  # np.median of a column that holds NaN
    return out


CACHE_LINE = 64  # bytes


def _transposed(a: np.ndarray) -> np.ndarray:
    """A C-ordered copy of ``a.T`` (2-D), a band of ``a``'s rows at a time, as many as fill a cache
    line of each row of the copy: numpy's copy of a whole transposed view walks one of the two with
    a stride of a whole row, twice as slow on blocks of a megabyte or more; square tiles of 64
    (measured on blocks of the per-pixel fit: 1.3-2x slower) cost a Python step for every tile.
    A narrow ``a`` (rows of up to 4 cache lines: the few pixels a clip looks at) is copied whole:
    the bands' Python steps would cost more (48 against 28 us for 1,024 x 64 float32)."""
    rows, cols = a.shape
    if cols * a.itemsize <= 4 * CACHE_LINE:
        return a.T.copy()
    out = np.empty((cols, rows), a.dtype)
    band = max(1, CACHE_LINE // a.itemsize)
    for i in range(0, rows, band):
        out[:, i : i + band] = a[i : i + band].T
    return out


@dataclass
class _PixelFit:
    A: np.ndarray  # packed normal matrix (npairs, P) float64
    b: np.ndarray  # (K, P) float64
    beta: np.ndarray  # (K, P) float64
    chi2: np.ndarray | None  # (P,) reduced chi-square of the kept frames (1 = as noisy as the model says)
    n: np.ndarray | None  # (P,) frames kept
    keep: np.ndarray  # (N, P) frames kept (for the hot-pixel fits)
    var: np.ndarray  # (N, P) noise variance model (or (N, 1): one per frame)
    z: np.ndarray  # (N, P) float32 |residual| of every frame-pixel (in noise sigmas when weighted)


def _robust_fit(Y, valid, X, var, clip: float, rounds: int = 2, chi2: bool = True) -> _PixelFit:
    """Weighted, clipped per-pixel fit. ``var`` (N, P) noise variance of every frame-pixel, (N, 1)
    that of every frame (the same for all pixels: not written out for each), or
    None for an unweighted fit (residual scale from the pixel's own MAD). Cuts frame-pixels beyond
    ``clip`` times the pixel's robust residual scale (never tighter than the noise model), and
    fits again; ``rounds`` times. Without ``chi2`` the fit's ``chi2`` and ``n`` are None.

    A pixel whose kept frames do not change in a round is done: fitting it again would repeat
    the same sums to the bit, and every later round would keep the same frames. So after the
    first round only the few pixels that lost (or regained) frames are fitted again."""
    K, P = X.shape[1], Y.shape[1]
    X32 = X.astype(np.float32)
    inv_sd = None if var is None else (1.0 / np.sqrt(var)).astype(np.float32, copy=False)
    A, b = _normal_equations(Y, _weights(valid, inv_sd), X)
    beta = _solve(A, b, K)
    z = _scaled_residuals(Y, X32, beta, inv_sd)
    keep = valid
    todo = np.arange(P)  # pixels whose fit may still change
    for _ in range(rounds):
        if todo.size == P:
            kept = _kept(z, valid, clip, inv_sd is not None)
            todo = np.flatnonzero((kept != keep).any(axis=0))
            keep = kept
        else:
            kept = _kept(z[:, todo], valid[:, todo], clip, inv_sd is not None)
            moved = (kept != keep[:, todo]).any(axis=0)
            keep[:, todo] = kept
            todo = todo[moved]
        if not todo.size:
            break
        sd = inv_sd if inv_sd is None or inv_sd.shape[1] == 1 else inv_sd[:, todo]
        A[:, todo], b[:, todo] = _normal_equations(Y[:, todo], _weights(keep[:, todo], sd), X)
        beta[:, todo] = _solve(A[:, todo], b[:, todo], K)
        z[:, todo] = _scaled_residuals(Y[:, todo], X32, beta[:, todo], sd)
    if not chi2:
        return _PixelFit(A, b, beta, None, None, keep, var, z)
    n = keep.sum(axis=0)
    reduced = _kept_sum_of_squares(z, keep) / np.maximum(n - K, 1)
    return _PixelFit(A, b, beta, reduced.astype(np.float32), n, keep, var, z)


def _weights(keep: np.ndarray, inv_sd: np.ndarray | None) -> np.ndarray:
    """(N, P) weights of the kept frame-pixels: the flags themselves (1), or 1 / variance
    (float32); the normal equations take them as float64."""
    if inv_sd is None:
        return keep
    w = np.multiply(keep, inv_sd)
    w *= inv_sd
    return w


def _scaled_residuals(Y, X32, beta, inv_sd) -> np.ndarray:
    """|Y - X beta| (N, P) float32, times ``inv_sd`` when given."""
    z = np.matmul(X32, beta.astype(np.float32))
    np.subtract(Y, z, out=z)
    if inv_sd is not None:
        z *= inv_sd
    return np.abs(z, out=z)


def _kept(z, valid, clip: float, weighted: bool) -> np.ndarray:
    """The valid frame-pixels within ``clip`` robust residual scales (the MAD of |residual| ``z``;
    at least 1 noise sigma when weighted).

    Weighted, a pixel none of whose valid frame-pixels lies beyond ``clip`` sigmas keeps them all
    whatever its scale (at least 1); of the others (more of them the more frames: one cosmic ray
    is enough), those whose scale is 1 are known by a count (:func:`_wider_than_noise`): only the
    rest need their median."""
    if not weighted:
        return valid & (_clip_threshold(z, valid, clip, 1e-3)[None, :] >= z)
    keep = valid.copy()
    # (a NaN residual is not within the bound: its pixel is looked at)
    out = np.flatnonzero((valid & ~(z <= np.float32(clip))).any(axis=0))
    if out.size:
        zo, vo = z[:, out], valid[:, out]
        bound = np.full(out.size, np.float32(clip))  # clip times a scale of 1
        wide = _wider_than_noise(zo, vo)
        if wide.any():
            bound[wide] = _clip_threshold(zo[:, wide], vo[:, wide], clip, 1.0)
        keep[:, out] = vo & (bound[None, :] >= zo)
    return keep


def _unit_mad() -> np.float32:
    """The largest float32 median |residual| whose robust scale (times MAD_SIGMA, in float32, as
    :func:`_clip_threshold` computes it) is at most 1."""

    def scale(m) -> float:  # as an array: numpy 1.x would multiply a float32 scalar in float64
        return float((np.array([m], np.float32) * MAD_SIGMA)[0])

    m = np.float32(1 / MAD_SIGMA)
    while scale(m) > 1:
        m = np.nextafter(m, np.float32(0))
    while scale(np.nextafter(m, np.float32(np.inf))) <= 1:
        m = np.nextafter(m, np.float32(np.inf))
    return m


UNIT_MAD = _unit_mad()


def _wider_than_noise(z, valid) -> np.ndarray:
    """(P,) bool: the pixels whose robust scale of ``z`` (N, P) may exceed 1, those that need their
    median. The others' median is at most UNIT_MAD: more than half their valid values are, which
    a count tells at a fraction of a median's cost (a transposed copy and a partition of every
    lane). A pixel with a NaN residual is counted wide: its median may be NaN; so is every pixel
    of residuals other than float32, whose scale UNIT_MAD does not bound."""
    if z.dtype != np.float32:
        return np.ones(z.shape[1], bool)
    n = valid.sum(axis=0)
    within = (valid & (z <= UNIT_MAD)).sum(axis=0)
    wide = within < n // 2 + 1
    if np.isnan(z.max()):
        wide |= np.isnan(z).any(axis=0)
    return wide


def _clip_threshold(z, valid, clip: float, floor: float) -> np.ndarray:
    """(P,) float32: ``clip`` times the robust scale of ``z`` (at least ``floor``; inf where no
    frame-pixel is valid)."""
    scale = _masked_median(z, valid, nonnegative=True) * MAD_SIGMA
    scale = np.where(np.isfinite(scale), np.maximum(scale, floor), np.inf)
    return (clip * scale).astype(np.float32)


def _kept_sum_of_squares(z, keep) -> np.ndarray:
    """Per pixel, the float32 sum over the kept frames of ``z``^2."""
    sq = z * z
    # every square finite (a NaN or inf would be the max): a term times 0 drops as np.where drops it
    if not sq.size or np.isfinite(sq.max()):
        return np.multiply(sq, keep, out=sq).sum(axis=0)
    return np.where(keep, sq, 0).sum(axis=0)


HOT_PAIR_VALUES = 8  # values per frame of a (pixel, doubling temperature) pair: 2K + 2, K <= 3


class HotGrid:
    """The designs of the hot-pixel laws of library frames (temperatures ``T``, exposures ``t``)
    under ``law``, one per doubling temperature of the grid (``taus``): (points, N, K). Held when
    they take at most ``max_bytes`` (made once for all the blocks of a channel), else made for
    the points asked (24 bytes per frame and point: 70 MB at 20,000 frames)."""

    def __init__(self, T, t, law: Law, max_bytes: float):
        self.T, self.t, self.law = np.asarray(T), np.asarray(t), law
        self.taus = HOT_TAUS if law.components == 1 else HOT_TAUS[np.abs(HOT_TAUS - law.tau2) > 0.5]
        self.rest = law.design(T, t)[:, 1:]  # [t u2,] 1
        whole = 8 * len(self.taus) * len(self.T) * law.K <= max_bytes
        self.held = self._designs(self.taus) if whole else None

    def __len__(self) -> int:
        return len(self.taus)

    def designs(self, points) -> np.ndarray:
        """The designs of grid ``points`` (a slice or indices)."""
        return self.held[points] if self.held is not None else self._designs(self.taus[points])

    def _designs(self, taus: np.ndarray) -> np.ndarray:
        hot = (np.exp2((self.T[None, :] - self.law.T0) / taus[:, None]) * self.t[None, :])[..., None]
        return np.concatenate([hot, np.broadcast_to(self.rest, (len(taus), *self.rest.shape))], axis=2)


def _hot_fits(y, ok, keep, var, grid: HotGrid, var_of, clip: float, max_bytes: float):
    """Hot pixels: t * (h 2^((T-T0)/tau_h) [+ d2 2^((T-T0)/tau2)]) + g with tau_h per pixel
    from a grid (``grid``: weighted least squares, clipped like the main fit).

    ``y``, ``ok``, ``keep``, ``var`` (N, n): the pixels' frames, which are valid, which the main fit
    kept and their noise variance there. ``var_of(S)`` gives the noise variance (N, ...) of
    pixels whose expected signal is S (N, ...). Returns (tau (n,), coef (n, K)); NaN where no fit
    was possible. Groups of pixels are fitted within ``max_bytes``, each trying a part of the
    grid at a time: a pixel's fits take 64 bytes per frame and grid point."""
    K, N = grid.law.K, len(grid.T)
    n = y.shape[1]
    group = int(max(1, max_bytes // (8 * N * len(grid) * (K + HOT_PAIR_VALUES))))
    part = int(max(1, max_bytes // (8 * N * (K + group * HOT_PAIR_VALUES))))  # grid points at once

    def fit_group(p0: int):
        sl = slice(p0, min(n, p0 + group))
        pixels = (y[:, sl].T.astype(np.float64), ok[:, sl].T, keep[:, sl].T, var[:, sl].T)
        return _hot_group(*pixels, grid, part, var_of, clip)

    fits = [fit_group(p0) for p0 in range(0, n, group)]
    if not fits:
        return np.full(0, np.nan), np.full((0, K), np.nan)
    return np.concatenate([tau for tau, _ in fits]), np.concatenate([coef for _, coef in fits])


def _hot_group(y, ok, keep, var, grid: HotGrid, part: int, var_of, clip: float):
    """:func:`_hot_fits` of a group of pixels: ``y``, ``ok``, ``keep``, ``var`` (pixels, N);
    ``part`` grid points at a time."""
    m, K = len(y), grid.law.K
    tau_out, coef_out = np.full(m, np.nan), np.full((m, K), np.nan)
    w_of = var.astype(np.float64)  # the main fit's variances, then (float32) those of the pixel's own law
    keep = keep.copy()
    going = np.ones(m, bool)
    for _ in range(3):
        going &= keep.sum(axis=1) >= K + 2
        a = np.flatnonzero(going)
        if not a.size:
            break
        w = keep[a] / w_of[a]
        best, cb = _best_grid_point(y[a], w, grid, part)
        tau_out[a], coef_out[a] = grid.taus[best], cb
        model = np.matmul(grid.designs(best), cb[:, :, None])[..., 0]  # (pixels, N)
        v = var_of(model.T).T
        if w_of.dtype != v.dtype:
            w_of = w_of.astype(v.dtype)
        w_of[a] = v
        z = (y[a] - model) / np.sqrt(v)
        scale = np.fmax(1.0, MAD_SIGMA * _masked_median(np.abs(z).T, ok[a].T))
        keep[a] = ok[a] & (np.abs(z) <= clip * scale[:, None])
    return tau_out, coef_out


def _best_grid_point(y, w, grid: HotGrid, part: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel (rows of ``y``, weights ``w``): the grid point whose weighted least-squares fit
    leaves the least weighted sum of squares, and that fit's coefficients, ``part`` grid points
    at a time: the point ``np.argmin`` picks over the whole grid (the first of equals, or of NaNs)."""
    h = np.arange(len(y))
    best, least, coef = np.zeros(len(y), int), np.full(len(y), np.inf), None
    for first in range(0, len(grid), part):
        Xs = grid.designs(slice(first, first + part))  # (part, N, K)
        K = Xs.shape[2]
        Xw = Xs[None] * w[:, None, :, None]  # (pixels, part, N, K)
        A = np.einsum("hsnk,snl->hskl", Xw, Xs) + 1e-12 * np.eye(K)
        c = np.linalg.solve(A, np.einsum("hsnk,hn->hsk", Xw, y)[..., None])[..., 0]  # (pixels, part, K)
        r = y[:, None, :] - np.einsum("snk,hsk->hsn", Xs, c)
        ssr = np.einsum("hn,hsn->hs", w, r * r)
        at = np.argmin(ssr, axis=1)
        value = ssr[h, at]
        better = (value < least) | (np.isnan(value) & ~np.isnan(least))
        coef = c[h, at] if coef is None else np.where(better[:, None], c[h, at], coef)
        best, least = np.where(better, first + at, best), np.where(better, value, least)
    return best, coef


# -- smoothing ----------------------------------------------------------------------------------


def _box(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Edge-truncated running sum over 2r+1 samples along ``axis`` (0 or 1) of a 2-d float64
    array: differences of its cumulative sum (:func:`_cumsum`), of slices of it (a gather along
    the rows costs several times more)."""
    n = a.shape[axis]
    c = _cumsum(a, axis)
    if n < 2 * r + 1:
        hi = np.minimum(np.arange(n) + r + 1, n)
        lo = np.maximum(np.arange(n) - r, 0)
        return np.take(c, hi, axis=axis) - np.take(c, lo, axis=axis)

    def part(start, stop):
        return (slice(None), slice(start, stop)) if axis else slice(start, stop)

    out = np.empty(a.shape)
    np.subtract(c[part(r + 1, 2 * r + 2)], c[part(0, 1)], out=out[part(0, r + 1)])  # the first: from the edge
    np.subtract(c[part(2 * r + 2, n + 1)], c[part(1, n - 2 * r)], out=out[part(r + 1, n - r)])
    np.subtract(c[part(n, n + 1)], c[part(n - 2 * r, n - r)], out=out[part(n - r, n)])  # the last: to the edge
    return out


def _cumsum(a: np.ndarray, axis: int) -> np.ndarray:
    """``np.cumsum(a, axis)`` of a 2-d array after a zero, to the bit. Down the rows of a float64
    array, a row at a time: each row's sums in one vectorised call, about 4x faster than numpy's
    accumulation down the columns."""
    if a.dtype != np.float64:
        zero = np.zeros((a.shape[0], 1) if axis else (1, a.shape[1]))
        return np.concatenate([zero, np.cumsum(a, axis=axis)], axis=axis)
    if axis == 1:
        c = np.empty((a.shape[0], a.shape[1] + 1))
        c[:, 0] = 0
        np.cumsum(a, axis=1, out=c[:, 1:])
        return c
    c = np.empty((a.shape[0] + 1, a.shape[1]))
    c[0] = 0
    if len(a):
        c[1] = a[0]
    for i in range(1, len(a)):
        np.add(c[i], a[i], out=c[i + 1])
    return c


def smooth_weighted(values: np.ndarray, weights: np.ndarray, r: int, passes: int = 3) -> np.ndarray:
    """Normalised convolution: a ~Gaussian (``passes`` boxes of radius ``r``) weighted mean."""
    num, den = values * weights, weights.astype(np.float64, copy=False)
    for _ in range(passes):
        for axis in (0, 1):
            num, den = _box(num, r, axis), _box(den, r, axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _chi2_quantile(dof: int, p: float) -> float:
    """Upper ``p`` quantile of chi-square with 1 or 2 degrees of freedom."""
    if dof == 2:
        return -2.0 * math.log(p)
    # dof 1: z^2 with P(|z| > z_p) = p; inverse erfc by bisection
    lo, hi = 0.0, 40.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if math.erfc(math.sqrt(mid / 2)) > p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def smooth_prior(
    A: np.ndarray,
    b0: np.ndarray,
    beta: np.ndarray,
    chi2: np.ndarray,
    hot: np.ndarray,
    shape: tuple[int, int],
    K: int,
    r: int,
    p: float = IRREGULAR_P,
):
    """Replace (d2, g) of regular pixels by their spatial smooth and re-fit d1 given them.

    ``A``: packed per-pixel normal matrices (K(K+1)/2, P); ``b0``: the d1 row of the right side;
    ``beta``: the full per-pixel fits (K, P). Returns (maps (K, P) float32, irregular (P,) bool).
    """
    # packed index of (k, m); the smoothed parameters are 1..K-1
    at = {km: i for i, km in enumerate(_pairs(K))}
    a11 = A[at[0, 0]]
    safe = np.where(a11 > 0, a11, np.inf)
    inflate = np.maximum(chi2.astype(np.float64), 1.0)
    # inverse covariance of the smoothed parameters: the Schur complement of d1 in A (packed)
    S = [(j, k) for j in range(1, K) for k in range(j, K)]
    inv_cov = {(j, k): (A[at[j, k]] - A[at[0, j]] * A[at[0, k]] / safe) / inflate for j, k in S}
    ok = (a11 > 0) & np.isfinite(beta).all(axis=0)
    irregular = hot | ~ok
    threshold = _chi2_quantile(K - 1, p)
    smooth = np.empty((K - 1, beta.shape[1]))
    for _ in range(3):
        for j in range(1, K):
            w = np.where(irregular, 0.0, np.maximum(inv_cov[j, j], 0))  # 1 / conditional variance
            smooth[j - 1] = smooth_weighted(beta[j].reshape(shape), w.reshape(shape), r).ravel()
        dchi2 = np.zeros(beta.shape[1])
        for j, k in S:
            dchi2 += (1 if j == k else 2) * (beta[j] - smooth[j - 1]) * (beta[k] - smooth[k - 1]) * inv_cov[j, k]
        new = hot | ~ok | ~np.isfinite(dchi2) | (dchi2 > threshold)
        if np.array_equal(new, irregular):
            break
        irregular = new
    maps = beta.astype(np.float32)
    reg = ~irregular
    rhs = b0[reg].copy()
    for j in range(1, K):
        rhs -= A[at[0, j]][reg] * smooth[j - 1, reg]
        maps[j, reg] = smooth[j - 1, reg]
    maps[0, reg] = rhs / a11[reg]
    return maps, irregular
