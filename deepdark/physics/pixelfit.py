"""Per-pixel weighted least squares (robust, hot pixels) and the smoothing prior (``deepdark.physics``)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from .frame_state import MAD_SIGMA
from .law import Law

HOT_TAUS = np.round(np.arange(2.0, 16.01, 0.1), 2)  # per-pixel doubling temperatures tried, C
IRREGULAR_P = 1e-3  # false-alarm rate of the smooth-prior test per pixel


# -- per-pixel weighted least squares -----------------------------------------------------------


def _pairs(K: int) -> list[tuple[int, int]]:
    return [(k, m) for k in range(K) for m in range(k, K)]


def _normal_equations(Y: np.ndarray, W: np.ndarray, X: np.ndarray, block: int = 65536):
    """Packed per-pixel normal matrix A (K(K+1)/2, P) and right side b (K, P), float64.

    Y, W: (N, P); X: (N, K) shared by all pixels."""
    N, P = Y.shape
    K = X.shape[1]
    pairs = _pairs(K)
    XX = np.stack([X[:, k] * X[:, m] for k, m in pairs])  # (npairs, N)
    A = np.empty((len(pairs), P))
    b = np.empty((K, P))
    for p0 in range(0, P, block):
        w = W[:, p0 : p0 + block].astype(np.float64)
        A[:, p0 : p0 + block] = XX @ w
        b[:, p0 : p0 + block] = X.T @ (w * Y[:, p0 : p0 + block])
    return A, b


def _unpack(A: np.ndarray, K: int) -> np.ndarray:
    """Packed (npairs, P) -> (P, K, K)."""
    P = A.shape[1]
    M = np.empty((P, K, K))
    for i, (k, m) in enumerate(_pairs(K)):
        M[:, k, m] = M[:, m, k] = A[i]
    return M


def _solve(A: np.ndarray, b: np.ndarray, K: int) -> np.ndarray:
    """Per-pixel solution (K, P) of packed normal equations; pixels without data get 0."""
    M = _unpack(A, K)
    diag = np.einsum("pkk->pk", M)
    empty = ~(diag > 0).all(axis=1)
    M[:, range(K), range(K)] += 1e-12 * diag + 1e-300
    M[empty] = np.eye(K)
    rhs = b.T.copy()
    rhs[empty] = 0
    return np.linalg.solve(M, rhs[..., None])[..., 0].T


def _masked_median(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Median over axis 0 of ``values`` (N, P) where ``valid``; NaN for columns without any."""
    out = np.median(values, axis=0)
    partial = ~valid.all(axis=0)
    if partial.any():
        sub = np.where(valid[:, partial], values[:, partial], np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN, as documented
            out[partial] = np.nanmedian(sub, axis=0)
    return out


@dataclass
class _PixelFit:
    A: np.ndarray  # packed normal matrix (npairs, P) float64
    b: np.ndarray  # (K, P) float64
    beta: np.ndarray  # (K, P) float64
    chi2: np.ndarray  # (P,) reduced chi-square of the kept frames (1 = as noisy as the model says)
    n: np.ndarray  # (P,) frames kept
    keep: np.ndarray  # (N, P) frames kept (for the hot-pixel fits)
    var: np.ndarray  # (N, P) noise variance model


def _robust_fit(Y, valid, X, var, clip: float, rounds: int = 2) -> _PixelFit:
    """Weighted, clipped per-pixel fit. ``var`` (N, P) noise variance of every frame-pixel, or
    None for an unweighted fit (residual scale from the pixel's own MAD). Cuts frame-pixels beyond
    ``clip`` times the pixel's robust residual scale (never tighter than the noise model)."""
    K = X.shape[1]
    inv_sd = None if var is None else (1.0 / np.sqrt(var)).astype(np.float32)
    w = valid.astype(np.float32)
    if inv_sd is not None:
        w *= inv_sd
        w *= inv_sd
    A, b = _normal_equations(Y, w, X)
    beta = _solve(A, b, K)
    keep = valid
    Z = np.empty(Y.shape, np.float32)
    for _ in range(rounds):
        np.matmul(X.astype(np.float32), beta.astype(np.float32), out=Z)
        np.subtract(Y, Z, out=Z)
        if inv_sd is not None:
            Z *= inv_sd
        np.abs(Z, out=Z)
        scale = _masked_median(Z, valid) * MAD_SIGMA
        scale = np.where(np.isfinite(scale), np.maximum(scale, 1.0 if inv_sd is not None else 1e-3), np.inf)
        keep = valid & ((clip * scale).astype(np.float32)[None, :] >= Z)
        np.multiply(keep, 1.0 if inv_sd is None else inv_sd, out=w)
        if inv_sd is not None:
            w *= inv_sd
        A, b = _normal_equations(Y, w, X)
        beta = _solve(A, b, K)
    del w
    np.matmul(X.astype(np.float32), beta.astype(np.float32), out=Z)
    np.subtract(Y, Z, out=Z)
    if inv_sd is not None:
        Z *= inv_sd
    Z *= Z
    n = keep.sum(axis=0)
    chi2 = np.where(keep, Z, 0).sum(axis=0) / np.maximum(n - K, 1)
    return _PixelFit(A, b, beta, chi2.astype(np.float32), n, keep, var)


def _hot_fits(Y, valid, fit: _PixelFit, idx: np.ndarray, T, t, law: Law, var_of, clip: float):
    """Hot pixels ``idx`` (columns of Y): t * (h 2^((T-T0)/tau_h) [+ d2 2^((T-T0)/tau2)]) + g with
    tau_h per pixel from a grid (weighted least squares, clipped like the main fit).

    ``var_of(S)`` gives the noise variance (N,) of a pixel whose expected signal is S (N,).
    Returns (tau (n,), coef (n, K)); NaN where no fit was possible."""
    K = law.K
    taus = HOT_TAUS if law.components == 1 else HOT_TAUS[np.abs(HOT_TAUS - law.tau2) > 0.5]
    rest = law.design(T, t)[:, 1:]  # [t u2,] 1
    Xs = np.concatenate(
        [
            (np.exp2((T[None, :] - law.T0) / taus[:, None]) * t[None, :])[..., None],
            np.broadcast_to(rest, (len(taus), *rest.shape)),
        ],
        axis=2,
    )  # (ntau, N, K)
    tau_out, coef_out = np.full(len(idx), np.nan), np.full((len(idx), K), np.nan)
    for j, p in enumerate(idx):
        y, ok = Y[:, p].astype(np.float64), valid[:, p]
        keep, var = fit.keep[:, p], fit.var[:, p].astype(np.float64)
        found = None
        for _ in range(3):
            if keep.sum() < K + 2:
                break
            w = keep / var
            Xw = Xs * w[None, :, None]
            A = np.einsum("snk,snl->skl", Xw, Xs) + 1e-12 * np.eye(K)
            c = np.linalg.solve(A, np.einsum("snk,n->sk", Xw, y)[..., None])[..., 0]  # (ntau, K)
            r = y[None, :] - np.einsum("snk,sk->sn", Xs, c)
            best = int(np.argmin(np.einsum("n,sn->s", w, r * r)))
            found = (taus[best], c[best])
            model = Xs[best] @ c[best]
            var = var_of(model)
            z = (y - model) / np.sqrt(var)
            scale = max(1.0, MAD_SIGMA * float(np.median(np.abs(z[ok]))))
            keep = ok & (np.abs(z) <= clip * scale)
        if found is not None:
            tau_out[j], coef_out[j] = found
    return tau_out, coef_out


# -- smoothing ----------------------------------------------------------------------------------


def _box(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Edge-truncated running sum over 2r+1 samples along ``axis``."""
    a = np.moveaxis(a, axis, -1)
    c = np.cumsum(a, axis=-1)
    c = np.concatenate([np.zeros(a.shape[:-1] + (1,)), c], axis=-1)
    n = a.shape[-1]
    hi = np.minimum(np.arange(n) + r + 1, n)
    lo = np.maximum(np.arange(n) - r, 0)
    return np.moveaxis(c[..., hi] - c[..., lo], -1, axis)


def smooth_weighted(values: np.ndarray, weights: np.ndarray, r: int, passes: int = 3) -> np.ndarray:
    """Normalised convolution: a ~Gaussian (``passes`` boxes of radius ``r``) weighted mean."""
    num, den = values * weights, weights.astype(np.float64)
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
