"""The temperature law: a camera's dark vs temperature fitted on block means (see ``deepdark.physics``)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from .frame_state import MAD_SIGMA, streamed_median

log = logging.getLogger(__name__)

LN2 = math.log(2.0)
DEFAULT_TAU = 6.4  # C: the paper's halving temperature, used when one setpoint cannot tell
# The law reads the block means and forms their residuals a part at a time, about LAW_VALUES
# values (some frames, or some blocks of every frame; a caller may give more): at 20,000 darks
# the block means alone are 650 MB, and the residuals held at once were five times that. The
# parts do not change a bit of the result.
LAW_VALUES = 2**18


# -- the temperature law ------------------------------------------------------------------------


@dataclass(frozen=True)
class Law:
    """A camera's dark-vs-temperature law: components 2^((T-T0)/tau) (tau2 NaN: one component;
    tau1 NaN too: none, the law of a bias-only library, whose design is the readout term alone)."""

    T0: float
    tau1: float
    tau2: float = float("nan")

    @property
    def components(self) -> int:
        if math.isnan(self.tau1):
            return 0
        return 1 if math.isnan(self.tau2) else 2

    @property
    def K(self) -> int:  # columns of the design: components + the per-readout term
        return self.components + 1

    def factors(self, T) -> list[np.ndarray]:
        T = np.asarray(T, dtype=np.float64)
        if self.components == 0:
            return []
        f = [np.exp2((T - self.T0) / self.tau1)]
        if self.components == 2:
            f.append(np.exp2((T - self.T0) / self.tau2))
        return f

    def design(self, T, t) -> np.ndarray:
        """(n, K): t * factor per component, then 1 (glow, per readout)."""
        t = np.asarray(t, dtype=np.float64)
        if self.components == 0:  # T may be unknown (NaN): nothing depends on it
            return np.ones((len(t), 1))
        return np.stack([t * f for f in self.factors(T)] + [np.ones_like(t)], axis=1)

    def design_dT(self, T, t) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        taus = [self.tau1, self.tau2][: self.components]
        return np.stack([t * f * LN2 / tau for f, tau in zip(self.factors(T), taus)] + [np.zeros_like(t)], axis=1)


def _grid_ssr(Y: np.ndarray, T, t, T0, pairs, w=None) -> np.ndarray:
    """Weighted residual sum of squares of the block fit for each (tau1, tau2) pair."""
    sw = np.ones(len(t)) if w is None else np.sqrt(np.asarray(w, float))
    Yw = Y * sw[:, None]
    yy = float(np.einsum("fb,fb->", Yw, Yw))
    out = np.empty(len(pairs))
    for i, (t1, t2) in enumerate(pairs):
        q, _ = np.linalg.qr(Law(T0, t1, t2).design(T, t) * sw[:, None])
        proj = q.T @ Yw
        out[i] = yy - float(np.einsum("kb,kb->", proj, proj))
    return out


def _best_taus(Y, T, t, T0, components: int, w=None, ratio: float | None = None) -> Law:
    """Grid search (coarse, then fine) of the doubling temperatures, tau1 > tau2 + 1 C, or
    tau2 = tau1 / ``ratio``."""
    if components == 2 and ratio:
        grid = [(a, a / ratio) for a in np.arange(3.0, 20.01, 0.25)]
        best = grid[int(np.argmin(_grid_ssr(Y, T, t, T0, grid, w)))][0]
        fine = [(a, a / ratio) for a in np.arange(best - 0.25, best + 0.2501, 0.01)]
        a = fine[int(np.argmin(_grid_ssr(Y, T, t, T0, fine, w)))][0]
        return Law(T0, float(a), float(a / ratio))
    if components == 1:
        grid = [(a, float("nan")) for a in np.arange(2.0, 20.01, 0.25)]
        best = grid[int(np.argmin(_grid_ssr(Y, T, t, T0, grid, w)))][0]
        fine = [(a, float("nan")) for a in np.arange(best - 0.25, best + 0.2501, 0.01)]
        return Law(T0, float(fine[int(np.argmin(_grid_ssr(Y, T, t, T0, fine, w)))][0]))
    coarse = [(a, b) for a in np.arange(4.0, 20.01, 0.5) for b in np.arange(1.5, 10.01, 0.25) if b <= a - 1.0]
    a, b = coarse[int(np.argmin(_grid_ssr(Y, T, t, T0, coarse, w)))]
    fine = [
        (x, y)
        for x in np.arange(a - 0.5, a + 0.501, 0.05)
        for y in np.arange(b - 0.25, b + 0.2501, 0.025)
        if y <= x - 0.5 and y > 0.5
    ]
    a, b = fine[int(np.argmin(_grid_ssr(Y, T, t, T0, fine, w)))]
    return Law(T0, float(a), float(b))


def _spans(n: int, size: int) -> list[slice]:
    """Slices of ``size`` (at least 2) that cover ``range(n)``, none of a single element unless
    ``n`` is 1 (the last takes a single leftover): numpy hands the product of a one-row (or
    one-column) matrix to BLAS's matrix-vector routine, whose sums differ in their last bits from
    those of the matrix-matrix routine that computes all at once."""
    size = max(2, size)
    starts = list(range(0, n, size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [n])]


def _newton_T(
    Y: np.ndarray,
    frames: np.ndarray,
    t: np.ndarray,
    T: np.ndarray,
    beta: np.ndarray,
    law: Law,
    steps: int = 12,
    w: np.ndarray | None = None,
    part_values: int = LAW_VALUES,
) -> np.ndarray:
    """Per-frame temperature that best fits its blocks given the block maps ``beta``, blocks
    weighted by ``w`` (blocks,), of the rows ``frames`` of Y (with their exposures ``t`` and
    starting temperatures ``T``). Each step is taken by every frame until all have converged;
    the residuals are formed a few frames at a time (the same numbers as all at once)."""
    T = T.astype(np.float64).copy()
    w = np.ones(Y.shape[1]) if w is None else w
    num, den = np.empty(len(T)), np.empty(len(T))
    for _ in range(steps):
        X, dX = law.design(T, t), law.design_dT(T, t)  # (F, K)
        for at in _spans(len(T), part_values // Y.shape[1]):
            r = Y[frames[at]] - X[at] @ beta
            jac = dX[at] @ beta
            num[at], den[at] = np.einsum("fb,fb,b->f", jac, r, w), np.einsum("fb,fb,b->f", jac, jac, w)
        step = np.clip(num / np.maximum(den, 1e-300), -2.0, 2.0)
        T += step
        if np.all(np.abs(step) < 1e-5):
            break
    return T


def _levenberg_marquardt(fun, p0: np.ndarray, lo: np.ndarray, hi: np.ndarray, iterations: int = 60) -> np.ndarray:
    """Minimise |fun(p)|^2 within [lo, hi] (finite-difference Jacobian; a handful of parameters)."""
    p = np.clip(np.asarray(p0, float), lo, hi)
    r = fun(p)
    cost, lam = float(r @ r), 1e-3
    for _ in range(iterations):
        J = np.empty((r.size, p.size))
        for i in range(p.size):
            h = 1e-4 * max(1.0, abs(p[i]))
            q = p.copy()
            q[i] += h
            J[:, i] = (fun(q) - r) / h
        A, g = J.T @ J, J.T @ r
        while True:
            step = np.linalg.solve(A + lam * np.diag(np.diag(A) + 1e-12), -g)
            q = np.clip(p + step, lo, hi)
            rq = fun(q)
            cq = float(rq @ rq)
            if cq < cost:
                converged = cost - cq < 1e-10 * cost or np.max(np.abs(q - p)) < 1e-6
                p, r, cost, lam = q, rq, cq, max(lam / 3, 1e-9)
                break
            lam *= 4
            if lam > 1e10:
                return p
        if converged:
            break
    return p


@dataclass(frozen=True)
class _Groups:
    """A library's frames by (setpoint, exposure), biases one group: the means the law is fitted on."""

    member: np.ndarray  # (frames,) the group of each frame
    n: np.ndarray  # (groups,) frames per group (float: the groups' weights)
    Y: np.ndarray  # (groups, blocks) mean block means
    t: np.ndarray  # (groups,) exposure, 0 for the biases
    dark: np.ndarray  # (groups,) dark groups (biases have no temperature)
    T0: float  # the law's reference temperature: the darks' median header temperature
    header_T: np.ndarray  # (groups,) mean header temperature (T0 for the biases)
    n_setpoints: int

    @property
    def sw(self) -> np.ndarray:
        """(groups, 1): square-root weights of the group means (a mean of n frames counts n times)."""
        return np.sqrt(self.n)[:, None]

    def maps(self, law: Law, Tg: np.ndarray) -> np.ndarray:
        """(K, blocks): the block maps that best fit the group means at group temperatures ``Tg``."""
        sw = self.sw
        return np.linalg.lstsq(law.design(Tg, self.t) * sw, self.Y * sw, rcond=None)[0]


def _group_frames(Y, t: np.ndarray, header_T: np.ndarray, setpoints, dark: np.ndarray, part_values: int) -> _Groups:
    """Group the frames by (setpoint, exposure) and average their block means and headers."""
    sp = np.where(dark, np.round(np.asarray(setpoints, float), 1), np.nan)
    keys = [(s, round(float(x), 6)) if d else ("bias", 0.0) for s, x, d in zip(sp, t, dark)]
    groups = sorted(set(keys), key=str)
    member = np.array([groups.index(k) for k in keys])
    ng = np.bincount(member, minlength=len(groups)).astype(float)
    Yg = np.stack([mean_rows(Y, np.flatnonzero(member == i), part_values) for i in range(len(groups))])
    tg = np.array([k[1] for k in groups])
    gd = tg > 0
    T0 = float(np.round(np.median(header_T[dark]), 1))
    Ag = np.array([header_T[member == i].mean() if gd[i] else T0 for i in range(len(groups))])
    return _Groups(member, ng, Yg, tg, gd, T0, Ag, len(set(sp[dark])))


def _first_law(g: _Groups, components: int, tau_ratio: float | None) -> Law:
    """The law at the groups' header temperatures: grid-searched doubling temperatures, or the
    paper's with a single setpoint."""
    if g.n_setpoints < 2:
        log.warning(
            "library darks at a single setpoint: the dark current is assumed to double every %.1f C"
            " (the paper's); other temperatures are extrapolations",
            DEFAULT_TAU,
        )
        return Law(g.T0, DEFAULT_TAU)
    return _best_taus(g.Y, g.header_T, g.t, g.T0, components, g.n, tau_ratio)


def _block_weights(
    Y, frames: np.ndarray, model: tuple[np.ndarray, np.ndarray], part_values: int
) -> tuple[np.ndarray, float]:
    """Weights of the blocks, 1 / their misfit^2 (mean 1), and the weighted noise variance, from
    the residuals of the rows ``frames`` of Y (dark frames) about the law, ``model`` = (X (frames,
    K), maps (K, blocks)), formed a few blocks of every frame at a time: the noise is the median
    of the weighted squares, found without holding them (:func:`streamed_median`)."""
    spans = _spans(Y.shape[1], part_values // max(len(frames), 1))

    def residuals():
        for at in spans:
            yield at, Y[frames, at] - model[0] @ model[1][:, at]

    misfit = np.empty(Y.shape[1])
    for at, r in residuals():
        misfit[at] = MAD_SIGMA * np.median(np.abs(r), axis=0)
    wb = 1.0 / np.maximum(misfit, 1e-3 * max(float(np.median(misfit)), 1e-12)) ** 2
    wb /= wb.mean()
    noise2 = streamed_median(lambda: (wb[None, at] * r * r for at, r in residuals())) / 0.4549  # median of chi2(1)
    return wb, noise2


def mean_rows(Y, rows: np.ndarray, part_values: int = LAW_VALUES) -> np.ndarray:
    """``Y[rows].mean(axis=0)`` to the bit (numpy adds the rows in order, as here), reading
    about ``part_values`` values at a time."""
    total = np.zeros(Y.shape[1])
    step = max(1, part_values // Y.shape[1])
    for start in range(0, len(rows), step):
        for row in Y[rows[start : start + step]]:
            total += row
    return total / len(rows)


def _header_scatter(header_T: np.ndarray, T: np.ndarray, dark: np.ndarray, g: _Groups) -> float:
    """The headers' own scatter: CCDTEMP about the frames' fitted temperatures, within each group
    (at least 0.05 C)."""
    member = g.member
    within = (header_T - T)[dark] - np.array([np.mean((header_T - T)[member == m]) for m in member[dark]])
    n_per = g.n[member[dark]]
    return max(float(np.sqrt(np.sum(within**2) / max(np.sum(1 - 1 / n_per), 1))), 0.05)


def _lm_starts(law: Law, n_tau: int) -> list[list[float]]:
    """Starting doubling temperatures of the joint fit: the grid's, then a spread of others
    (the joint fit has local minima)."""
    taus0 = [law.tau1] if n_tau == 1 else [law.tau1 - law.tau2, law.tau2]
    return [taus0] + (
        [[g1 - g2, g2] for g1 in (6.0, 8.0, 11.0) for g2 in (2.5, 3.5, 5.0)]
        if n_tau == 2
        else [[x] for x in (4.0, 6.0, 9.0, 14.0)]
    )


def _fit_group_temperatures(
    g: _Groups,
    law: Law,
    components: int,
    tau_ratio: float | None,
    wb: np.ndarray,
    noise2: float,
    sigma_h: float,
) -> tuple[np.ndarray, Law]:
    """The doubling temperatures and the dark groups' temperatures, fitted jointly on the group
    means (block maps projected out; blocks weighted by ``wb`` / ``noise2``), the temperatures held
    to their headers' mean by a prior of the headers' scatter ``sigma_h`` / sqrt(n)."""
    gd, Ag = g.dark, g.header_T
    sw = g.sw
    sa = sigma_h / np.sqrt(g.n[gd])
    sqw = np.sqrt(wb)[None, :] * sw / math.sqrt(noise2)
    n_tau = 1 if components == 1 or tau_ratio else 2

    def unpack(p):
        Tg = Ag.copy()
        Tg[gd] = p[: gd.sum()]
        taus = p[gd.sum() :]
        if n_tau == 1:
            return Tg, Law(g.T0, taus[0], taus[0] / tau_ratio if tau_ratio and components == 2 else float("nan"))
        return Tg, Law(g.T0, taus[0] + taus[1], taus[1])  # tau1 = tau2 + gap

    def residuals(p):
        Tg, lw = unpack(p)
        X = lw.design(Tg, g.t)
        b = np.linalg.lstsq(X * sw, g.Y * sw, rcond=None)[0]
        return np.concatenate([((g.Y - X @ b) * sqw).ravel(), (Tg[gd] - Ag[gd]) / sa])

    lo = np.concatenate([Ag[gd] - 5, [1.0] if n_tau == 1 else [0.5, 0.5]])
    hi = np.concatenate([Ag[gd] + 5, [40.0] if n_tau == 1 else [30.0, 20.0]])
    best = None
    for start in _lm_starts(law, n_tau):
        p = _levenberg_marquardt(residuals, np.concatenate([Ag[gd], start]), lo, hi)
        c = float(np.sum(residuals(p) ** 2))
        if best is None or c < best[0]:
            best = (c, p)
    return unpack(best[1])


def fit_law(
    Y,
    t: np.ndarray,
    header_T: np.ndarray,
    setpoints: np.ndarray,
    tau_ratio: float | None = None,
    part_values: int = LAW_VALUES,
) -> tuple[Law, np.ndarray, np.ndarray]:
    """The camera's law and every library frame's temperature, from block means.

    ``Y`` (frames, blocks): clipped block means of the bias-subtracted active areas of all
    channels, an array or any object of that ``shape`` whose ``Y[rows]`` and ``Y[rows, span]``
    give those rows (a span of their columns), read about ``part_values`` values at a time; ``t``
    exposure (0 for biases); ``header_T`` CCDTEMP (else SETTEMP); ``setpoints``.

    What a library can tell: each frame's temperature *relative* to the others of its (setpoint,
    exposure) group, from its own blocks (10^3 of them: hundredths of a degree); not the group's
    absolute temperature, which only the headers give (a frame's CCDTEMP is off by ~0.5 C, a group
    mean by 0.5/sqrt(n)). Where group temperatures are wrong, a per-readout term proportional to
    the dark map can absorb the error (warm groups' level errors of ~1 % leak into the glow and
    ruin cold, short frames), and with free per-frame temperatures the law is nearly degenerate
    (a warp of the temperature scale trades against tau1, tau2). So: group means are fitted
    jointly for the doubling temperatures and the group temperatures, the latter held to their
    headers' mean by a prior of the headers' own scatter (measured here: CCDTEMP about the
    frames' fitted temperatures), the block maps projected out (Levenberg-Marquardt; started from
    a grid of doubling temperatures). Then every frame's temperature is the one that best fits its
    own blocks given the law (blocks weighted by 1 / their misfit^2, so a sharp glow peak counts
    less). Returns (law, T (frames,), block maps (K, blocks) of the group means).
    """
    dark = t > 0
    if not dark.any():
        raise ValueError("no dark frames (exposure > 0) in the library")
    g = _group_frames(Y, t, header_T, setpoints, dark, part_values)
    # two components need >= 3 setpoints and, per block, a residual degree of freedom beyond its
    # K = 3 maps (the doubling temperatures are shared by all blocks)
    components = 2 if g.n_setpoints >= 3 and len(g.n) >= 4 else 1
    law = _first_law(g, components, tau_ratio)
    # frames about the anchored law: block misfit weights, block noise, the headers' scatter
    beta = g.maps(law, g.header_T)
    T = header_T.astype(np.float64).copy()
    frames = np.flatnonzero(dark)  # rows of Y taken a part at a time: no copy of the darks' rows
    T[dark] = _newton_T(Y, frames, t[dark], T[dark], beta, law, part_values=part_values)
    wb, noise2 = _block_weights(Y, frames, (law.design(T[dark], t[dark]), beta), part_values)
    sigma_h = _header_scatter(header_T, T, dark, g)
    if g.n_setpoints >= 2:
        Tg, law = _fit_group_temperatures(g, law, components, tau_ratio, wb, noise2, sigma_h)
        beta = g.maps(law, Tg)
        log.debug("law: group temperatures moved %s C from their headers", np.round(Tg[g.dark] - g.header_T[g.dark], 3))
    T = header_T.astype(np.float64).copy()
    T[dark] = _newton_T(Y, frames, t[dark], T[dark], beta, law, w=wb, part_values=part_values)
    return law, T, beta
