"""The classical ``physics`` dark predictor: a per-pixel dark model of the library plus each
frame's own state (issue 6, parts 1, 2, 3 and 5).

A frame's predicted dark, per channel in readout coordinates, is

    dark(x) = bias(row of x)  +  t * (d1(x) 2^((T-T0)/tau1) + d2(x) 2^((T-T0)/tau2))  +  g(x)

* ``bias(row)``: the frame's own per-row bias from its overscan (:func:`row_bias`): a clipped mean
  of the overscan row after skipping its first ``overscan_skip`` columns (charge residue and
  settling in real cameras), then shrunk towards the frame's mean bias by the empirical-Bayes
  factor row_var / (row_var + estimate_var), both variances measured on the frame itself. A
  clipped mean, not a median: overscan pixels are integers with a read noise of a few ADU, and
  the median of 42 integers is both quantised and 1.57x noisier than the mean.
* ``T``: the frame's effective temperature from its optical-black pixels minus its overscan (the
  masked-minus-virtual method of Kepler and TESS, :meth:`PhysicsModel.temperatures`): T is the
  value at which the library's per-pixel model of the OB pixels best matches them (generalised
  least squares over all channels of the frame; OB rows have no overscan row of their own, so
  their unknown row offsets enter as noise shared along the row, of the frame's row variance).
  It beats CCDTEMP (+-1 C control, a 1 C error is an 11 % dark error) because the OB level is
  measured on thousands of pixels of this very frame. Its uncertainty (statistical, plus a
  ``GLOW_SYS`` = 1 % systematic on the OB pixels' per-readout level) is combined with the
  header's (CCDTEMP, else SETTEMP; its scatter is measured on the library) by inverse variance:
  the OB estimate rules whenever the dark signal is well above the glow, the header takes over
  as the OB signal fades (bias frames, short cold exposures, where T hardly matters for the
  prediction); an OB estimate off the header by more than ``TEFF_MAX_OFFSET`` is not trusted.
* ``d1, d2``: two dark-current components with doubling temperatures tau1 > tau2 that are global
  per camera (depletion-like and diffusion-like; the map's *shape* changes with temperature,
  which a per-pixel log-linear law cannot follow), ``g``: what comes with every readout
  (amplifier glow), independent of the exposure ``t``. Hot pixels, which have their own doubling
  temperature, get a third law: t * (h 2^((T-T0)/tau_h) + d2 2^(..tau2)) + g with tau_h per pixel.

Fitting a library (:func:`fit_physics`), per camera:

1. *Frame state* of every DARK/BIAS frame-channel (per-row bias, OB signals) and clipped block
   means of its bias-subtracted active area.
2. *The law* (:func:`fit_law`): tau1, tau2 and every library frame's temperature, from clipped
   block means of all channels (a frame has one temperature): the active area's 10^6 pixels give
   each frame's temperature relative to the others of its (setpoint, exposure) group to a few
   hundredths of a degree; only the groups' absolute temperatures must come from the headers
   (0.5/sqrt(n) C), so they are fitted jointly with tau1, tau2 under a prior of that size. (A
   library without bias frames cannot fully tell an offset between its 10 s and 30 s frames from
   a per-readout term shaped like the dark map; the prior keeps that ambiguity at the size of the
   headers' error, and predictions stay consistent because OB maps and active maps share it.)
   With fewer than three setpoints the law has one component (tau fitted with two setpoints,
   the paper's 6.4 C with one).
3. *Per-pixel maps*, streamed in blocks of rows (bounded memory; pixels are independent, so the
   result does not depend on the block size): per-pixel weighted least squares over all frames
   with the design shared across pixels. Pass A (unweighted, clipped) measures every frame's
   noise variance, and from it the channel's inverse gain (variance vs signal, a photon transfer
   curve of the library); pass B weights every frame-pixel by 1/(its variance) and clips
   outliers (cosmic rays) beyond ``clip`` times the pixel's own robust residual scale. A
   per-pixel scale keeps random-telegraph pixels, whose states spread widely, unclipped, so their
   fitted dark is their *mean*, as it must be; group medians would pick one state.
4. *Smooth prior* (``smooth_px`` > 0): glow and the fast (diffusion) component are smooth on the
   pixel scale physically (light from the amplifier; carriers that diffuse tens of um), while the
   slow component carries the per-pixel DSNU and the polishing rings. Where a pixel's fitted
   (d2, g) agree with their spatial smooth (a chi-square test with the pixel's own covariance,
   false-alarm rate ``irregular_p``), they are replaced by the smooth and d1 is re-fitted given them (from
   the stored normal equations): two noisy parameters per pixel fewer, which is what brings the
   prediction close to the noise floor with a library of tens of frames. Pixels that disagree
   (near a sharp glow peak, hot pixels, defects) keep their own full fit: the data decide, per
   camera, how much the prior is used.

Exposure times (part 5): scaling with ``t`` and arriving with each readout are told apart only by
darks of two exposure times, or darks plus bias frames (``separable``). A separable library
predicts any exposure from 0 to ``max_extrapolation`` (2) x its longest (the law is linear in t,
the intercept g is measured); a library of one exposure time only predicts that exposure, and
any other raises :class:`PhysicsError` ("library has only 30 s darks: cannot predict 10 s ...").
Temperatures outside the library's range extrapolate the two-component law; expect the error
to grow a few degrees beyond it.

Storage: one HDF5 file (float32 maps per camera and channel, the per-camera law as attributes,
the library's frame table), written atomically. Read back with :meth:`PhysicsModel.load`.

Predictors: :func:`physics_predictor` (model window, for ``deepdark.evaluate``),
:func:`physics_active_predictor` (whole active area, for ``deepdark.predictions``), and
:meth:`PhysicsModel.predict` / :meth:`PhysicsModel.predict_rows` (strips and table rows in, the
prediction out: the conditioning input of a learned generator).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from tqdm import tqdm

from . import __version__
from .atomic import atomic_path
from .baselines import frame_setpoints
from .geometry import Geometry, parse_geometry
from .shards import Shard

log = logging.getLogger(__name__)

PHYSICS_SCHEMA = 1
SATURATED = 65535
LIBRARY_TYPES = ("DARK", "BIAS")
LN2 = math.log(2.0)
MAD_SIGMA = 1.4826           # sd / MAD of a normal distribution
# -- frame state --------------------------------------------------------------------------------
OVERSCAN_SKIP = 4            # first overscan columns left out of the row bias (residue, settling)
BIAS_CLIP = 4.0              # overscan pixels beyond this many robust sigmas leave the row mean
# -- library fit --------------------------------------------------------------------------------
PIXEL_CLIP = 5.0             # frame-pixels beyond this many of the pixel's residual scales are cut
BLOCKS = 32                  # block means per side for the law fit (blocks at least MIN_BLOCK px wide)
MIN_BLOCK = 8
DEFAULT_TAU = 6.4            # C: the paper's halving temperature, used when one setpoint cannot tell
HOT_FACTOR = 3.0             # hot pixel: dark at the reference above this many times its block's
HOT_TAUS = np.round(np.arange(2.0, 16.01, 0.1), 2)  # per-pixel doubling temperatures tried, C
SMOOTH_PX = 3                # radius of the smoothing box (3 passes: a ~Gaussian of sd ~sqrt(r(r+1)) px)
IRREGULAR_P = 1e-3           # false-alarm rate of the smooth-prior test per pixel
MAX_EXTRAPOLATION = 2.0      # a separable library predicts up to this many times its longest exposure
# -- effective temperature ----------------------------------------------------------------------
TEFF_MAX_SIGMA = 2.0         # C: an OB temperature less certain than this is not used at all
TEFF_MAX_OFFSET = 5.0        # C: an OB temperature this far from CCDTEMP is not trusted
GLOW_SYS = 0.01              # relative uncertainty of the OB pixels' per-readout level (systematic)


class PhysicsError(ValueError):
    """A request the physics model cannot serve (exposure, camera, geometry); one line."""


# -- frame state --------------------------------------------------------------------------------

@dataclass
class FrameState:
    """The readout state of k frame-channels, measured on their own strips (ADU)."""

    bias: np.ndarray        # (k, active rows): per-row bias, the expected level of a virtual pixel
    level: np.ndarray       # (k,): the frame-channel's mean bias
    read_var: np.ndarray    # (k,): overscan pixel variance about its row level (read noise^2)
    row_var: np.ndarray     # (k,): variance of the per-row offsets (row noise^2)
    bias_var: np.ndarray    # (k, active rows): variance of the error of ``bias``
    ob_cols: np.ndarray     # (k, active rows, n): OB columns minus the per-row bias (float32)
    ob_rows: np.ndarray     # (k, n, active cols): OB rows minus the frame's mean bias (float32)


def row_bias(a1: np.ndarray, skip: int = OVERSCAN_SKIP, shrink: bool = True, smooth: int = 1,
             clip: float = BIAS_CLIP) -> tuple[np.ndarray, ...]:
    """Per-row bias of overscan strips ``a1`` (k, rows, cols) or (rows, cols).

    Returns (bias (k, rows), level (k,), read_var (k,), row_var (k,), bias_var (k, rows)), float64.
    Each row: the mean of its overscan pixels (after ``skip`` columns) within ``clip`` robust
    sigmas of the row median. ``shrink``: pull every row towards the frame's mean bias by
    row_var / (row_var + estimate variance) (the posterior mean for white row noise; a camera
    with large row noise keeps its rows). ``smooth`` > 1: a running mean over that many rows
    instead (for row offsets that drift slowly), without shrinkage.
    """
    a1 = np.asarray(a1)
    squeeze = a1.ndim == 2
    x = (a1[None] if squeeze else a1)[..., skip:].astype(np.float32)
    if x.shape[-1] < 2:
        raise ValueError(f"overscan_skip {skip} leaves {x.shape[-1]} overscan column(s)")
    k, rows, _ = x.shape
    med = np.median(x, axis=-1, keepdims=True)
    dev = x - med
    sigma = np.maximum(MAD_SIGMA * np.median(np.abs(dev).reshape(k, -1), axis=1), 0.5)
    keep = np.abs(dev) <= clip * sigma[:, None, None]
    n = np.maximum(keep.sum(-1), 1)
    raw = med[..., 0].astype(np.float64) + np.where(keep, dev, 0).sum(-1, dtype=np.float64) / n
    res = np.where(keep, x - raw[..., None], 0)
    read_var = np.einsum("krc,krc->k", res, res, dtype=np.float64) / np.maximum(keep.sum((1, 2)) - rows, 1)
    est_var = read_var[:, None] / n
    level = raw.mean(axis=1)
    spread = MAD_SIGMA * np.median(np.abs(raw - np.median(raw, axis=1, keepdims=True)), axis=1)
    row_var = np.maximum(spread ** 2 - est_var.mean(axis=1), 0.0)
    if smooth > 1:
        kernel = np.ones(int(smooth))
        norm = np.convolve(np.ones(rows), kernel, mode="same")
        bias = np.stack([np.convolve(r, kernel, mode="same") / norm for r in raw])
        bias_var = est_var / norm[None, :]
    elif shrink:
        lam = row_var[:, None] / (row_var[:, None] + est_var)
        bias = level[:, None] + lam * (raw - level[:, None])
        bias_var = lam * est_var
    else:
        bias, bias_var = raw, est_var
    out = (bias, level, read_var, row_var, bias_var)
    return tuple(o[0] for o in out) if squeeze else out


def frame_state(strips: dict[str, np.ndarray], skip: int = OVERSCAN_SKIP, shrink: bool = True,
                smooth: int = 1) -> FrameState:
    """The state of k frame-channels from their whole strips a1 (k, R, 46), a2 (k, R, 4), a3 (k, 4, C)."""
    a1, a2, a3 = (np.asarray(strips[s]) for s in ("a1", "a2", "a3"))
    if a1.ndim == 2:
        a1, a2, a3 = a1[None], a2[None], a3[None]
    bias, level, read_var, row_var, bias_var = row_bias(a1, skip, shrink, smooth)
    ob_cols = (a2.astype(np.float32) - bias[:, :, None].astype(np.float32))
    ob_rows = (a3.astype(np.float32) - level[:, None, None].astype(np.float32))
    return FrameState(bias, level, read_var, row_var, bias_var, ob_cols, ob_rows)


# -- the temperature law ------------------------------------------------------------------------

@dataclass(frozen=True)
class Law:
    """A camera's dark-vs-temperature law: components 2^((T-T0)/tau) (tau2 NaN: one component)."""

    T0: float
    tau1: float
    tau2: float = float("nan")

    @property
    def components(self) -> int:
        return 1 if math.isnan(self.tau2) else 2

    @property
    def K(self) -> int:  # columns of the design: components + the per-readout term
        return self.components + 1

    def factors(self, T) -> list[np.ndarray]:
        T = np.asarray(T, dtype=np.float64)
        f = [np.exp2((T - self.T0) / self.tau1)]
        if self.components == 2:
            f.append(np.exp2((T - self.T0) / self.tau2))
        return f

    def design(self, T, t) -> np.ndarray:
        """(n, K): t * factor per component, then 1 (glow, per readout)."""
        t = np.asarray(t, dtype=np.float64)
        return np.stack([t * f for f in self.factors(T)] + [np.ones_like(t)], axis=1)

    def design_dT(self, T, t) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        taus = [self.tau1] + ([self.tau2] if self.components == 2 else [])
        return np.stack([t * f * LN2 / tau for f, tau in zip(self.factors(T), taus)]
                        + [np.zeros_like(t)], axis=1)


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
    fine = [(x, y) for x in np.arange(a - 0.5, a + 0.501, 0.05) for y in np.arange(b - 0.25, b + 0.2501, 0.025)
            if y <= x - 0.5 and y > 0.5]
    a, b = fine[int(np.argmin(_grid_ssr(Y, T, t, T0, fine, w)))]
    return Law(T0, float(a), float(b))


def _newton_T(Y: np.ndarray, t: np.ndarray, T: np.ndarray, beta: np.ndarray, law: Law, steps: int = 12,
              w: np.ndarray | None = None) -> np.ndarray:
    """Per-frame temperature that best fits its blocks (rows of Y) given the block maps ``beta``,
    blocks weighted by ``w`` (blocks,)."""
    T = T.astype(np.float64).copy()
    w = np.ones(Y.shape[1]) if w is None else w
    for _ in range(steps):
        X, dX = law.design(T, t), law.design_dT(T, t)        # (F, K)
        r = Y - X @ beta
        jac = dX @ beta
        num, den = np.einsum("fb,fb,b->f", jac, r, w), np.einsum("fb,fb,b->f", jac, jac, w)
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


def fit_law(Y: np.ndarray, t: np.ndarray, header_T: np.ndarray, setpoints: np.ndarray,
            tau_ratio: float | None = None) -> tuple[Law, np.ndarray, np.ndarray]:
    """The camera's law and every library frame's temperature, from block means.

    ``Y`` (frames, blocks): clipped block means of the bias-subtracted active areas of all
    channels; ``t`` exposure (0 for biases); ``header_T`` CCDTEMP (else SETTEMP); ``setpoints``.

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
    sp = np.where(dark, np.round(np.asarray(setpoints, float), 1), np.nan)
    keys = [(s, round(float(x), 6)) if d else ("bias", 0.0) for s, x, d in zip(sp, t, dark)]
    groups = sorted(set(keys), key=str)
    member = np.array([groups.index(k) for k in keys])
    ng = np.bincount(member, minlength=len(groups)).astype(float)
    Yg = np.stack([Y[member == i].mean(axis=0) for i in range(len(groups))])
    tg = np.array([k[1] for k in groups])
    gd = tg > 0                                        # dark groups (biases have no temperature)
    T0 = float(np.round(np.median(header_T[dark]), 1))
    Ag = np.array([header_T[member == i].mean() if gd[i] else T0 for i in range(len(groups))])
    n_setpoints = len(set(sp[dark]))
    # two components need >= 3 setpoints and, per block, a residual degree of freedom beyond its
    # K = 3 maps (the doubling temperatures are shared by all blocks)
    components = 2 if n_setpoints >= 3 and len(groups) >= 4 else 1
    sw = np.sqrt(ng)[:, None]

    def maps(law, Tg):
        return np.linalg.lstsq(law.design(Tg, tg) * sw, Yg * sw, rcond=None)[0]

    if n_setpoints < 2:
        log.warning("library darks at a single setpoint: the dark current is assumed to double every %.1f C"
                    " (the paper's); other temperatures are extrapolations", DEFAULT_TAU)
        law = Law(T0, DEFAULT_TAU)
    else:
        law = _best_taus(Yg, Ag, tg, T0, components, ng, tau_ratio)
    # frames about the anchored law: block misfit weights, block noise, the headers' scatter
    beta = maps(law, Ag)
    T = header_T.astype(np.float64).copy()
    T[dark] = _newton_T(Y[dark], t[dark], T[dark], beta, law)
    r = Y[dark] - law.design(T[dark], t[dark]) @ beta
    misfit = MAD_SIGMA * np.median(np.abs(r), axis=0)
    wb = 1.0 / np.maximum(misfit, 1e-3 * max(float(np.median(misfit)), 1e-12)) ** 2
    wb /= wb.mean()
    noise2 = float(np.median(wb[None, :] * r * r)) / 0.4549          # median of chi2(1) = 0.4549
    within = (header_T - T)[dark] - np.array([np.mean((header_T - T)[member == m]) for m in member[dark]])
    n_per = ng[member[dark]]
    sigma_h = max(float(np.sqrt(np.sum(within ** 2) / max(np.sum(1 - 1 / n_per), 1))), 0.05)
    if n_setpoints >= 2:
        sa = sigma_h / np.sqrt(ng[gd])
        sqw = np.sqrt(wb)[None, :] * sw / math.sqrt(noise2)
        n_tau = 1 if components == 1 or tau_ratio else 2

        def unpack(p):
            Tg = Ag.copy()
            Tg[gd] = p[:gd.sum()]
            taus = p[gd.sum():]
            if n_tau == 1:
                return Tg, Law(T0, taus[0], taus[0] / tau_ratio if tau_ratio and components == 2 else float("nan"))
            return Tg, Law(T0, taus[0] + taus[1], taus[1])       # tau1 = tau2 + gap

        def residuals(p):
            Tg, lw = unpack(p)
            X = lw.design(Tg, tg)
            b = np.linalg.lstsq(X * sw, Yg * sw, rcond=None)[0]
            return np.concatenate([((Yg - X @ b) * sqw).ravel(), (Tg[gd] - Ag[gd]) / sa])

        taus0 = [law.tau1] if n_tau == 1 else [law.tau1 - law.tau2, law.tau2]
        lo = np.concatenate([Ag[gd] - 5, [1.0] if n_tau == 1 else [0.5, 0.5]])
        hi = np.concatenate([Ag[gd] + 5, [40.0] if n_tau == 1 else [30.0, 20.0]])
        best = None
        starts = [taus0] + ([[g1 - g2, g2] for g1 in (6.0, 8.0, 11.0) for g2 in (2.5, 3.5, 5.0)] if n_tau == 2 else
                            [[x] for x in (4.0, 6.0, 9.0, 14.0)])
        for start in starts:
            p = _levenberg_marquardt(residuals, np.concatenate([Ag[gd], start]), lo, hi)
            c = float(np.sum(residuals(p) ** 2))
            if best is None or c < best[0]:
                best = (c, p)
        Tg, law = unpack(best[1])
        beta = maps(law, Tg)
        log.debug("law: group temperatures moved %s C from their headers", np.round(Tg[gd] - Ag[gd], 3))
    T = header_T.astype(np.float64).copy()
    T[dark] = _newton_T(Y[dark], t[dark], T[dark], beta, law, w=wb)
    return law, T, beta


# -- per-pixel weighted least squares -----------------------------------------------------------

def _pairs(K: int) -> list[tuple[int, int]]:
    return [(k, m) for k in range(K) for m in range(k, K)]


def _normal_equations(Y: np.ndarray, W: np.ndarray, X: np.ndarray, block: int = 65536):
    """Packed per-pixel normal matrix A (K(K+1)/2, P) and right side b (K, P), float64.

    Y, W: (N, P); X: (N, K) shared by all pixels."""
    N, P = Y.shape
    K = X.shape[1]
    pairs = _pairs(K)
    XX = np.stack([X[:, k] * X[:, m] for k, m in pairs])        # (npairs, N)
    A = np.empty((len(pairs), P))
    b = np.empty((K, P))
    for p0 in range(0, P, block):
        w = W[:, p0:p0 + block].astype(np.float64)
        A[:, p0:p0 + block] = XX @ w
        b[:, p0:p0 + block] = X.T @ (w * Y[:, p0:p0 + block])
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
    A: np.ndarray       # packed normal matrix (npairs, P) float64
    b: np.ndarray       # (K, P) float64
    beta: np.ndarray    # (K, P) float64
    chi2: np.ndarray    # (P,) reduced chi-square of the kept frames (1 = as noisy as the model says)
    n: np.ndarray       # (P,) frames kept
    keep: np.ndarray    # (N, P) frames kept (for the hot-pixel fits)
    var: np.ndarray     # (N, P) noise variance model


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
        keep = valid & (Z <= (clip * scale).astype(np.float32)[None, :])
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
    rest = law.design(T, t)[:, 1:]                                    # [t u2,] 1
    Xs = np.concatenate([(np.exp2((T[None, :] - law.T0) / taus[:, None]) * t[None, :])[..., None],
                         np.broadcast_to(rest, (len(taus), *rest.shape))], axis=2)   # (ntau, N, K)
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
            c = np.linalg.solve(A, np.einsum("snk,n->sk", Xw, y)[..., None])[..., 0]   # (ntau, K)
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


def smooth_prior(A: np.ndarray, b0: np.ndarray, beta: np.ndarray, chi2: np.ndarray, hot: np.ndarray,
                 shape: tuple[int, int], K: int, r: int, p: float = IRREGULAR_P):
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
            w = np.where(irregular, 0.0, np.maximum(inv_cov[j, j], 0))   # 1 / conditional variance
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


# -- the library fit ----------------------------------------------------------------------------

def _block_means(signal: np.ndarray, bs: int, clip: float = PIXEL_CLIP) -> np.ndarray:
    """Clipped means of bs x bs blocks of ``signal`` (k, R, C) -> (k, R//bs, C//bs)."""
    k, R, C = signal.shape
    nr, nc = R // bs, C // bs
    v = signal[:, :nr * bs, :nc * bs].reshape(k, nr, bs, nc, bs).transpose(0, 1, 3, 2, 4).reshape(k, nr, nc, bs * bs)
    med = np.median(v, axis=-1, keepdims=True)
    sig = np.maximum(MAD_SIGMA * np.median(np.abs(v - med), axis=-1, keepdims=True), 0.5)
    keep = np.abs(v - med) <= clip * sig
    return (np.where(keep, v, 0).sum(-1) / np.maximum(keep.sum(-1), 1)).astype(np.float64)


@dataclass
class _Members:
    """The library's frame-channels and what stage 1 measured on them."""

    table: pd.DataFrame      # one row per frame-channel (shard_no, row, active_index, file, camera, ...)
    bias: np.ndarray         # (n, R) float32
    level: np.ndarray        # (n,)
    read_var: np.ndarray
    row_var: np.ndarray
    blocks: np.ndarray       # (n, nb_r, nb_c)
    ob_cols: np.ndarray      # (n, R, 4) float32
    ob_rows: np.ndarray      # (n, 4, C) float32
    ob_cols_raw: np.ndarray  # uint16, for the saturation mask
    ob_rows_raw: np.ndarray


def _library(shards: Sequence[Shard]) -> pd.DataFrame:
    parts = []
    for k, s in enumerate(shards):
        t = s.table
        sel = t[t["imagetyp"].isin(LIBRARY_TYPES) & (t["active_index"] >= 0)].copy()
        sel["shard_no"], sel["row"] = k, sel.index.to_numpy()
        parts.append(sel)
    lib = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if lib.empty:
        raise ValueError("no DARK or BIAS frames in the library shards")
    lib.loc[lib["imagetyp"] == "BIAS", "exptime"] = 0.0
    return lib


def _stage1(shards, lib: pd.DataFrame, g: Geometry, params: dict, bs: int, progress: bool) -> _Members:
    n = len(lib)
    R, C = g.active.shape
    out = dict(bias=np.empty((n, R), np.float32), level=np.empty(n), read_var=np.empty(n), row_var=np.empty(n),
               blocks=np.empty((n, R // bs, C // bs)), ob_cols=None, ob_rows=None)
    ob_c, ob_r, ob_c_raw, ob_r_raw = [], [], [], []
    pos_all = []
    bar = tqdm(total=n, desc="physics: frame state", unit="channel", disable=not progress)
    for k, s in enumerate(shards):
        sub = lib[lib["shard_no"] == k].sort_values("row")
        for start in range(0, len(sub), 16):
            part = sub.iloc[start:start + 16]
            rows, pos = part["row"].to_numpy(), part.index.to_numpy()
            strips = s.strips(rows)
            st = frame_state(strips, params["overscan_skip"], params["shrink"], params["smooth_rows"])
            act = s.active(rows).astype(np.float32) - st.bias[:, :, None].astype(np.float32)
            out["bias"][pos], out["level"][pos] = st.bias, st.level
            out["read_var"][pos], out["row_var"][pos] = st.read_var, st.row_var
            out["blocks"][pos] = _block_means(act, bs)
            ob_c.append(st.ob_cols), ob_r.append(st.ob_rows)
            ob_c_raw.append(strips["a2"]), ob_r_raw.append(strips["a3"])
            pos_all.append(pos)
            bar.update(len(rows))
    bar.close()
    order = np.argsort(np.concatenate(pos_all))
    return _Members(lib, out["bias"], out["level"], out["read_var"], out["row_var"], out["blocks"],
                    np.concatenate(ob_c)[order], np.concatenate(ob_r)[order],
                    np.concatenate(ob_c_raw)[order], np.concatenate(ob_r_raw)[order])


BYTES_PER_FRAME_PIXEL = 48      # working set of the per-pixel fit: ~10 float32/bool (frames x pixels) arrays


def _chunk_rows(N: int, cols: int, memory_mb: float) -> int:
    """Active rows per block so that the fit's working set stays within ``memory_mb``."""
    return max(1, int(memory_mb * 2 ** 20 // (N * cols * BYTES_PER_FRAME_PIXEL)))


def _read_rows(shards, sel: pd.DataFrame, r0: int, r1: int) -> np.ndarray:
    """Active rows r0:r1 of the frame-channels of ``sel`` (row ``pos`` of the result): (N, r1-r0, C)."""
    out = None
    for k, grp in sel.groupby("shard_no", sort=False):
        order = np.argsort(grp["active_index"].to_numpy())
        idx = grp["active_index"].to_numpy()[order]
        block = shards[k].f["active"][idx.tolist(), r0:r1, :]
        if out is None:
            out = np.empty((len(sel), *block.shape[1:]), np.uint16)
        out[grp["pos"].to_numpy()[order]] = block
    return out


@dataclass
class _Noise:
    """Noise variance of a library frame-pixel: read noise + offset + shot noise of its signal."""

    frame_var: np.ndarray    # (N,) residual variance of each frame (pass A)
    read_var: np.ndarray     # (N,) overscan variance of each frame
    offset: float = 0.0
    inv_gain: float | None = None

    def __call__(self, S: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Variance of frame-pixels with expected signal ``S`` (N, ...) (written into ``out``)."""
        S = np.asarray(S, np.float32)
        shape = (-1,) + (1,) * (S.ndim - 1)
        fv = self.frame_var.reshape(shape).astype(np.float32)
        out = np.empty(S.shape, np.float32) if out is None else out
        if self.inv_gain is None:
            out[...] = fv
            return out
        rv = self.read_var.reshape(shape).astype(np.float32)
        np.maximum(S, 0, out=out)
        out *= np.float32(self.inv_gain)
        out += rv + np.float32(self.offset)
        np.maximum(out, 0.25 * rv, out=out)
        return out

    @classmethod
    def from_pass_a(cls, frame_var, read_var, mean_signal) -> _Noise:
        """The library's photon transfer curve: frame variance - read variance = offset + S / gain."""
        x, y = np.asarray(mean_signal, float), np.asarray(frame_var, float) - np.asarray(read_var, float)
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() >= 3 and np.ptp(x[ok]) > 0:
            slope, offset = np.polyfit(x[ok], y[ok], 1)
            if 0 < slope < 10:
                return cls(frame_var, read_var, float(offset), float(slope))
            log.warning("photon transfer of the library gives 1/gain = %.3g: weights from frame variances", slope)
        return cls(frame_var, read_var)


HIST_STEP = 0.02             # ADU: resolution of the residual histograms of pass A


def _pass_a(chunks, get_chunk, X, clip, bar, hist_max: float = 500.0):
    """Unweighted clipped fit over all chunks: each frame's robust residual variance.

    Per frame, |residual| histograms (fixed bins, so the result does not depend on the chunks)
    give the median absolute residual; hot and RTS pixels, a few among thousands, cannot pull a
    median. The leverage of each frame in the per-pixel fit (h_f) corrects for the fitted share."""
    N, K = X.shape
    edges = np.arange(0.0, hist_max + HIST_STEP, HIST_STEP)
    hist = np.zeros((N, len(edges) + 1), np.int32)
    X32 = X.astype(np.float32)
    for chunk in chunks:
        Y, valid = get_chunk(chunk)
        fit = _robust_fit(Y, valid, X, None, clip)
        beta32 = fit.beta.astype(np.float32)
        del fit
        for f in range(N):                            # a frame at a time: no (N, P) temporaries
            bins = np.minimum((np.abs(Y[f] - X32[f] @ beta32) / HIST_STEP).astype(np.int64), len(edges))
            bins[~valid[f]] = len(edges)              # invalid pixels: the overflow bin, not counted
            hist[f] += np.bincount(bins, minlength=len(edges) + 1)
        bar.update(1)
    counts = hist[:, :-1]
    cum = np.cumsum(counts, axis=1)
    half = cum[:, -1] / 2.0
    i = np.array([np.searchsorted(c, h) for c, h in zip(cum, half)])
    mad = (i + 0.5) * HIST_STEP
    lev = np.einsum("fk,kl,fl->f", X, np.linalg.pinv(X.T @ X), X)
    return (MAD_SIGMA * mad) ** 2 / np.maximum(1.0 - lev, 0.05)


def _weighted_fit(Y, valid, X, noise: _Noise, clip, extra_var=None) -> _PixelFit:
    """Frame-variance weighted start, then per-pixel variances from the fitted signal."""
    var = np.empty(Y.shape, np.float32)
    var[...] = noise.frame_var[:, None]
    if extra_var is not None:
        var += extra_var
    beta0 = _robust_fit(Y, valid, X, var, clip, rounds=1).beta
    np.matmul(X.astype(np.float32), beta0.astype(np.float32), out=var)
    noise(var, out=var)
    if extra_var is not None:
        var += extra_var
    return _robust_fit(Y, valid, X, var, clip)


@dataclass
class _Library:
    """One camera's library: frames (one temperature each) and their channels."""

    camera: str
    channels: list[str]
    files: list[str]
    t: np.ndarray            # (F,) exposure, 0 for biases
    header_T: np.ndarray     # (F,)
    members: pd.DataFrame    # frame-channels, with ``fp`` (frame position)


def _camera_library(mem: _Members, camera: str, g: Geometry) -> _Library:
    lib = mem.table
    cam = lib[lib["camera"] == camera]
    channels = [c for c in g.channel_names() if c in set(cam["channel"])]
    counts = cam.groupby("file")["channel"].nunique()
    complete = set(counts.index[counts == len(channels)])
    if len(complete) < len(counts):
        log.warning("camera %s: %d library frames lack channels and are left out", camera, len(counts) - len(complete))
    first = cam[cam["file"].isin(complete)].drop_duplicates("file").sort_values(["date_obs", "file"])
    files = first["file"].tolist()
    fpos = {fl: i for i, fl in enumerate(files)}
    members = cam[cam["file"].isin(complete)].copy()
    members["fp"] = members["file"].map(fpos)
    t = first["exptime"].to_numpy(float)
    header_T = first["ccdtemp"].to_numpy(float)
    header_T = np.where(np.isfinite(header_T), header_T, first["settemp"].to_numpy(float))
    dark = t > 0
    if not dark.any():
        raise ValueError(f"camera {camera}: no dark frames (exposure > 0) in the library")
    if not np.isfinite(header_T[dark]).all():
        raise ValueError(f"camera {camera}: library darks without CCDTEMP or SETTEMP")
    header_T = np.where(np.isfinite(header_T), header_T, np.median(header_T[dark]))
    return _Library(camera, channels, files, t, header_T, members)


def fit_physics(shards: Sequence[str | Path], out: str | Path, memory_mb: float = 512,
                overscan_skip: int = OVERSCAN_SKIP, shrink: bool = True, smooth_rows: int = 1,
                smooth_px: int = SMOOTH_PX, clip: float = PIXEL_CLIP, irregular_p: float = IRREGULAR_P,
                max_extrapolation: float = MAX_EXTRAPOLATION, progress: bool = True) -> Path:
    """Fit the per-pixel dark model of the DARK (and BIAS) frames of library ``shards``; write ``out``.

    ``memory_mb`` bounds the stack of library pixels held at once (blocks of active rows); the
    result does not depend on it. The frame-state options are stored and reused by predictions.
    """
    opened = [Shard(p) for p in shards]
    try:
        names = {s.geometry.name for s in opened}
        if len(names) != 1:
            raise ValueError(f"library shards mix geometries: {sorted(names)}")
        g = opened[0].geometry
        params = dict(overscan_skip=int(overscan_skip), shrink=bool(shrink), smooth_rows=int(smooth_rows),
                      smooth_px=int(smooth_px), clip=float(clip), irregular_p=float(irregular_p),
                      max_extrapolation=float(max_extrapolation))
        lib = _library(opened)
        bs = max(MIN_BLOCK, g.active.shape[0] // BLOCKS)
        mem = _stage1(opened, lib, g, params, bs, progress)
        out = Path(out)
        with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
            f.attrs.update(schema_version=PHYSICS_SCHEMA, geometry=g.source, software=f"deepdark {__version__}",
                           created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           params=json.dumps(params), nights=",".join(sorted(set(lib["night"]))))
            cams = f.create_group("cameras")
            for ci, camera in enumerate(sorted(set(lib["camera"]))):
                cl = _camera_library(mem, camera, g)
                _fit_camera(cams.create_group(str(ci)), cl, opened, mem, g, params, bs, memory_mb, progress)
        return out
    finally:
        for s in opened:
            s.close()


def _fit_camera(grp, cl: _Library, shards, mem: _Members, g: Geometry, params, bs, memory_mb, progress):
    t, header_T, dark = cl.t, cl.header_T, cl.t > 0
    per_frame = cl.members.drop_duplicates("file").sort_values("fp").reset_index(drop=True)
    setpoints = frame_setpoints(per_frame[dark])
    n_setpoints = len(set(np.round(setpoints, 1)))
    dark_exptimes = sorted(set(np.round(t[dark], 6).tolist()))
    has_bias = bool((~dark).any())
    separable = len(dark_exptimes) >= 2 or has_bias
    if not separable:
        log.warning("camera %s: library has only %g s darks and no bias frames: glow cannot be told from dark"
                    " current; only %g s can be predicted", cl.camera, dark_exptimes[0], dark_exptimes[0])
    # stage 2: the law, from the block means of all channels (one temperature per frame)
    R, C = g.active.shape
    nbr, nbc = R // bs, C // bs
    Y = np.concatenate([mem.blocks[cl.members[cl.members["channel"] == ch].sort_values("fp").index]
                        .reshape(len(cl.files), -1) for ch in cl.channels], axis=1)
    law, T, block_beta = fit_law(Y, t, header_T, frame_setpoints(per_frame))
    T[~dark] = header_T[~dark]
    log.info("camera %s: T0 %.2f C, tau1 %.2f C, tau2 %.2f C, %d frames", cl.camera, law.T0, law.tau1, law.tau2,
             len(cl.files))
    hdr = header_T[dark] - T[dark]
    header_sigma = float(np.sqrt(np.mean(hdr ** 2))) if dark.sum() > 2 else float("nan")
    grp.attrs.update(camera=cl.camera, T0=law.T0, tau1=law.tau1, tau2=law.tau2, components=law.components,
                     header_sigma=header_sigma, dark_exptimes=np.asarray(dark_exptimes, float), has_bias=has_bias,
                     separable=separable, n_frames=len(cl.files), n_setpoints=n_setpoints,
                     channels=json.dumps(cl.channels))
    X = law.design(T, t)
    K = law.K
    t_ref = max(dark_exptimes)
    x_ref = law.design([law.T0], [t_ref])[0]
    rows_tab = []
    for j, ch in enumerate(cl.channels):
        sel = cl.members[cl.members["channel"] == ch].sort_values("fp").copy()
        sel["pos"] = np.arange(len(sel))
        N, mi = len(sel), sel.index.to_numpy()
        bias, read_var, row_var = mem.bias[mi], mem.read_var[mi], mem.row_var[mi]
        # the dark at (T0, longest exposure) of the blocks: the reference of the hot-pixel test
        bb = block_beta[:, j * nbr * nbc:(j + 1) * nbr * nbc].reshape(K, nbr, nbc)
        typ_b = np.einsum("k,kij->ij", x_ref[:-1], bb[:-1])
        typ = typ_b[np.minimum(np.arange(R) // bs, nbr - 1)][:, np.minimum(np.arange(C) // bs, nbc - 1)].ravel()
        step = _chunk_rows(N, C, memory_mb)
        chunks = [(r0, min(R, r0 + step)) for r0 in range(0, R, step)]
        cache: dict = {}

        def get_chunk(chunk, sel=sel, bias=bias, cache=cache, single=len(chunks) == 1, N=N):
            if chunk in cache:
                return cache[chunk]
            r0, r1 = chunk
            raw = _read_rows(shards, sel, r0, r1)
            Yc = (raw.astype(np.float32) - bias[:, r0:r1, None]).reshape(N, -1)
            res = (Yc, ((raw < SATURATED) & (raw > 0)).reshape(N, -1))
            if single:
                cache[chunk] = res
            return res

        bar = tqdm(total=2 * len(chunks), desc=f"physics: {cl.camera} channel {ch}", unit="block",
                   disable=not progress)
        frame_var = _pass_a(chunks, get_chunk, X, params["clip"], bar)
        mean_sig = np.median(mem.blocks[mi].reshape(N, -1), axis=1)   # the typical pixel's signal
        noise = _Noise.from_pass_a(frame_var, read_var, mean_sig)
        A = np.zeros((len(_pairs(K)), R * C))
        b0 = np.zeros(R * C)                      # only d1's right side is needed later
        beta = np.zeros((K, R * C), np.float32)
        chi2 = np.zeros(R * C, np.float32)
        hot = np.zeros(R * C, bool)
        hot_idx, hot_tau, hot_coef = [], [], []
        for chunk in chunks:
            Yc, valid = get_chunk(chunk)
            fit = _weighted_fit(Yc, valid, X, noise, params["clip"])
            sl = slice(chunk[0] * C, chunk[1] * C)
            A[:, sl], b0[sl], beta[:, sl], chi2[sl] = fit.A, fit.b[0], fit.beta, fit.chi2
            S_ref = x_ref[:-1] @ fit.beta[:-1]
            h = np.flatnonzero(S_ref > HOT_FACTOR * np.maximum(typ[sl], 0) + 10 * math.sqrt(float(np.mean(read_var))))
            if h.size:
                hot[sl.start + h] = True
                tau, coef = _hot_fits(Yc, valid, fit, h, T, t, law, lambda S: noise(S), params["clip"])
                hot_idx.append(sl.start + h), hot_tau.append(tau), hot_coef.append(coef)
            bar.update(1)
        bar.close()
        cache.clear()
        if params["smooth_px"] > 0:
            maps, irregular = smooth_prior(A, b0, beta, chi2, hot, (R, C), K, params["smooth_px"],
                                           params["irregular_p"])
        else:
            maps, irregular = beta, np.ones(R * C, bool)
        del A, b0
        cg = grp.create_group(f"channel_{j}")
        cg.attrs.update(channel=ch, inv_gain=np.nan if noise.inv_gain is None else noise.inv_gain,
                        noise_offset=noise.offset, irregular_fraction=float(irregular.mean()),
                        hot_pixels=int(hot.sum()))
        _write_maps(cg, maps, K, (R, C))
        flags = (hot.astype(np.uint8) | (irregular.astype(np.uint8) << 1)).reshape(R, C)
        cg.create_dataset("flags", data=flags, compression="gzip", shuffle=True)
        cg.create_dataset("chi2", data=chi2.reshape(R, C).astype(np.float16), compression="gzip", shuffle=True)
        hi = np.concatenate(hot_idx) if hot_idx else np.zeros(0, np.int64)
        ht = np.concatenate(hot_tau) if hot_tau else np.zeros(0)
        hc = np.concatenate(hot_coef) if hot_coef else np.zeros((0, K))
        good = np.isfinite(ht)
        cg.create_dataset("hot_index", data=hi[good].astype(np.int64))
        cg.create_dataset("hot_tau", data=ht[good].astype(np.float32))
        cg.create_dataset("hot_coef", data=hc[good].astype(np.float32))
        _fit_ob(cg.create_group("ob"), mem, mi, X, noise, row_var, x_ref, read_var, params, K, (R, C))
        for i, (_, r) in enumerate(sel.iterrows()):
            rows_tab.append(dict(file=r["file"], channel=ch, night=r["night"], imagetyp=r["imagetyp"],
                                 exptime=float(t[r["fp"]]), ccdtemp=float(r["ccdtemp"]), settemp=float(r["settemp"]),
                                 teff=float(T[r["fp"]]), noise_var=float(frame_var[i]), read_var=float(read_var[i]),
                                 row_var=float(row_var[i]), bias_level=float(mem.level[mi[i]])))
    tab = pd.DataFrame(rows_tab)
    tg = grp.create_group("frames")
    for col in tab:
        v = tab[col].to_numpy()
        tg.create_dataset(col, data=v.astype(h5py.string_dtype()) if v.dtype == object else v)


def _fit_ob(og, mem: _Members, mi, X, noise: _Noise, row_var, x_ref, read_var, params, K, shape):
    """Per-pixel maps of the optical-black columns and rows (no smoothing: they serve T_eff)."""
    R, C = shape
    N = len(mi)
    obc, obr = mem.ob_cols[mi], mem.ob_rows[mi]
    ncol, nrow = obc.shape[2], obr.shape[1]
    Y = np.concatenate([obc.reshape(N, -1), obr.reshape(N, -1)], axis=1)
    raw = np.concatenate([mem.ob_cols_raw[mi].reshape(N, -1), mem.ob_rows_raw[mi].reshape(N, -1)], axis=1)
    valid = (raw < SATURATED) & (raw > 0)
    # OB rows carry their frame's unknown row offsets: extra noise of variance row_var
    extra = np.zeros(Y.shape, np.float32)
    extra[:, R * ncol:] = row_var[:, None]
    fit = _weighted_fit(Y, valid, X, noise, params["clip"], extra_var=extra)
    S_ref = x_ref[:-1] @ fit.beta[:-1]
    med = float(np.median(S_ref))
    use = ((S_ref < HOT_FACTOR * max(med, 0) + 10 * math.sqrt(float(np.mean(read_var)))) & (fit.chi2 < 4)
           & (fit.n >= K + 2))
    parts = {"cols": (0, R * ncol, (R, ncol)), "rows": (R * ncol, R * ncol + nrow * C, (nrow, C))}
    for name, (a, z, sh) in parts.items():
        sg = og.create_group(name)
        _write_maps(sg, fit.beta[:, a:z], K, sh)
        sg.create_dataset("use", data=use[a:z].reshape(sh))


def _write_maps(grp, maps: np.ndarray, K: int, shape):
    for name, m in zip(_map_names(K), maps):
        grp.create_dataset(name, data=np.asarray(m, np.float32).reshape(shape))


def _map_names(K: int) -> list[str]:
    return ["d1", "d2", "g"] if K == 3 else ["d1", "g"]


# -- the fitted model: effective temperature and prediction -------------------------------------

@dataclass
class ChannelModel:
    """One camera-channel's maps (float32, readout coordinates) and hot pixels."""

    maps: np.ndarray            # (K, active rows, active cols): d1, [d2,] g
    hot_index: np.ndarray       # flat indices into the active area
    hot_tau: np.ndarray         # their own doubling temperatures, C
    hot_coef: np.ndarray        # (n, K): h, [d2,] g
    ob_cols: np.ndarray         # (K, active rows, n) maps of the OB columns
    ob_cols_use: np.ndarray     # bool: OB pixels used for the temperature
    ob_rows: np.ndarray         # (K, n, active cols)
    ob_rows_use: np.ndarray
    inv_gain: float             # 1/gain (ADU of variance per ADU of signal), NaN if unknown
    noise_offset: float


@dataclass
class CameraInfo:
    camera: str
    law: Law
    dark_exptimes: tuple[float, ...]
    has_bias: bool
    separable: bool
    channels: tuple[str, ...]
    group: str
    header_sigma: float        # C: spread of the headers' temperature about the library's fitted ones


@dataclass
class Temperatures:
    """Effective temperature of each frame-channel row: value, 1-sigma (C) and its source."""

    teff: np.ndarray
    sigma: np.ndarray
    source: np.ndarray          # "ob", "ccdtemp", "settemp" or "exposure 0" per row


class PhysicsModel:
    """A fitted physics model (``fit_physics``): effective temperatures and predicted darks."""

    def __init__(self, path: str | Path, cache_channels: int = 16):
        self.path = Path(path)
        try:
            self.f = h5py.File(self.path, "r")
            version = int(self.f.attrs["schema_version"])
            self.f["cameras"]
        except (OSError, KeyError) as exc:
            raise ValueError(f"{self.path}: not a deepdark physics model ({exc})") from None
        if version != PHYSICS_SCHEMA:
            raise ValueError(f"{self.path}: physics schema {version}, this deepdark reads {PHYSICS_SCHEMA}")
        self.geometry: Geometry = parse_geometry(self.f.attrs["geometry"], origin=f"{self.path}:geometry")
        self.params = json.loads(self.f.attrs["params"])
        self.cameras: dict[str, CameraInfo] = {}
        for key, grp in self.f["cameras"].items():
            a = grp.attrs
            law = Law(float(a["T0"]), float(a["tau1"]), float(a["tau2"]))
            self.cameras[str(a["camera"])] = CameraInfo(
                str(a["camera"]), law, tuple(float(x) for x in a["dark_exptimes"]), bool(a["has_bias"]),
                bool(a["separable"]), tuple(json.loads(a["channels"])), f"cameras/{key}", float(a["header_sigma"]))
        self._channels: OrderedDict = OrderedDict()
        self._cache_size = cache_channels
        self._tcache: OrderedDict = OrderedDict()

    @classmethod
    def load(cls, path: str | Path) -> PhysicsModel:
        return cls(path)

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    # -- lookups --------------------------------------------------------------------------------
    def camera(self, camera: str) -> CameraInfo:
        if camera not in self.cameras:
            raise PhysicsError(f"{self.path.name}: no physics model for camera {camera!r}"
                               f" (library cameras: {', '.join(sorted(self.cameras))})")
        return self.cameras[camera]

    def channel(self, camera: str, channel: str) -> ChannelModel:
        key = (camera, channel)
        if key not in self._channels:
            info = self.camera(camera)
            if channel not in info.channels:
                raise PhysicsError(f"{self.path.name}: camera {camera} has no channel {channel!r}")
            cg = self.f[f"{info.group}/channel_{info.channels.index(channel)}"]
            names = _map_names(info.law.K)
            self._channels[key] = ChannelModel(
                maps=np.stack([cg[n][()] for n in names]), hot_index=cg["hot_index"][()],
                hot_tau=cg["hot_tau"][()].astype(np.float64), hot_coef=cg["hot_coef"][()].astype(np.float64),
                ob_cols=np.stack([cg[f"ob/cols/{n}"][()] for n in names]), ob_cols_use=cg["ob/cols/use"][()],
                ob_rows=np.stack([cg[f"ob/rows/{n}"][()] for n in names]), ob_rows_use=cg["ob/rows/use"][()],
                inv_gain=float(cg.attrs["inv_gain"]), noise_offset=float(cg.attrs["noise_offset"]))
            while len(self._channels) > self._cache_size:
                self._channels.popitem(last=False)
        self._channels.move_to_end(key)
        return self._channels[key]

    def library_frames(self, camera: str) -> pd.DataFrame:
        """The library's frame-channels with their fitted temperature and noise (diagnostics)."""
        grp = self.f[f"{self.camera(camera).group}/frames"]
        return pd.DataFrame({c: [v.decode() if isinstance(v, bytes) else v for v in grp[c][()]]
                             if grp[c].dtype == object else grp[c][()] for c in grp})

    def check_exposure(self, camera: str, exptime: float) -> None:
        """Raise :class:`PhysicsError` unless the library can predict ``exptime`` for ``camera``."""
        info = self.camera(camera)
        longest = max(info.dark_exptimes)
        if not np.isfinite(exptime) or exptime < 0:
            raise PhysicsError(f"exposure time {exptime} s: not a valid exposure")
        if not info.separable:
            only = info.dark_exptimes[0]
            if not math.isclose(exptime, only, rel_tol=1e-3, abs_tol=1e-3):
                raise PhysicsError(
                    f"camera {camera}: library has only {only:g} s darks: cannot predict {exptime:g} s without"
                    f" bias frames or a second exposure time (what scales with exposure cannot be told from"
                    f" what comes with each readout)")
            return
        limit = self.params["max_extrapolation"] * longest
        if exptime > limit + 1e-9:
            raise PhysicsError(
                f"camera {camera}: {exptime:g} s is beyond {self.params['max_extrapolation']:g}x the longest library"
                f" exposure ({longest:g} s): the library cannot support it")

    def _check_geometry(self, g: Geometry) -> None:
        if g.name != self.geometry.name or g.active.shape != self.geometry.active.shape:
            raise PhysicsError(f"{self.path.name}: fitted on geometry {self.geometry.name}, data is {g.name}")

    # -- frame state and temperature ----------------------------------------------------------------
    def state(self, strips: dict[str, np.ndarray]) -> FrameState:
        """:func:`frame_state` with the options the model was fitted with."""
        p = self.params
        return frame_state(strips, p["overscan_skip"], p["shrink"], p["smooth_rows"])

    def temperatures(self, state: FrameState, table: pd.DataFrame, max_sigma: float = TEFF_MAX_SIGMA,
                     max_offset: float = TEFF_MAX_OFFSET) -> Temperatures:
        """Effective temperature of every row of ``table`` (one per frame: all rows of a file share
        it, estimated from the OB pixels of all of its rows present), with the header fallback."""
        table = table.reset_index(drop=True)
        n = len(table)
        teff, sigma, source = np.full(n, np.nan), np.full(n, np.inf), np.empty(n, dtype=object)
        for _, rows in table.groupby("file", sort=False).indices.items():
            r0 = table.iloc[rows[0]]
            header, hsrc = _header_temperature(r0)
            exptime = float(r0["exptime"]) if r0["imagetyp"] != "BIAS" else 0.0
            if exptime <= 0:
                teff[rows], sigma[rows], source[rows] = (header if np.isfinite(header) else 0.0), 0.0, "exposure 0"
                continue
            info = self.camera(r0["camera"])
            T, s = self._ob_temperature(state, table, rows, info, exptime,
                                        header if np.isfinite(header) else info.law.T0)
            if np.isfinite(T) and s <= max_sigma and not (np.isfinite(header) and abs(T - header) > max_offset):
                hs = info.header_sigma
                if np.isfinite(header) and np.isfinite(hs) and hs > 0:
                    w_ob, w_h = 1.0 / s ** 2, 1.0 / hs ** 2
                    T, s = (w_ob * T + w_h * header) / (w_ob + w_h), 1.0 / math.sqrt(w_ob + w_h)
                    src = "ob" if w_h < 0.1 * w_ob else "ob+" + hsrc
                else:
                    src = "ob"
                teff[rows], sigma[rows], source[rows] = T, s, src
                continue
            if np.isfinite(T) and np.isfinite(header) and abs(T - header) > max_offset:
                log.warning("%s: OB temperature %.2f C is %.1f C from the header's %.2f C: using the header",
                            r0["file"], T, T - header, header)
            if np.isfinite(header):
                teff[rows], sigma[rows], source[rows] = header, info.header_sigma, hsrc
            elif np.isfinite(T):
                teff[rows], sigma[rows], source[rows] = T, s, "ob"
            else:
                raise PhysicsError(f"{r0['file']}: no temperature (OB signal too weak, no CCDTEMP or SETTEMP)")
        return Temperatures(teff, sigma, source)

    def _ob_temperature(self, state: FrameState, table, rows, info: CameraInfo, t: float, T_start: float,
                        clip: float = PIXEL_CLIP) -> tuple[float, float]:
        """Generalised least squares for T on the OB pixels of ``rows`` (one frame's channels).

        OB pixels of one row share the error of that row's bias (OB columns: the overscan estimate's
        error; OB rows: the whole unknown row offset): each row is a group with a shared variance,
        inverted with Sherman-Morrison."""
        law = info.law
        groups = []   # (y (G, n), maps (K, G, n), use (G, n), pixel var scalar, group var (G,), inv_gain)
        for i in rows:
            ch = self.channel(info.camera, table.iloc[i]["channel"])
            rv = float(state.read_var[i]) + (ch.noise_offset if np.isfinite(ch.noise_offset) else 0.0)
            ig = ch.inv_gain if np.isfinite(ch.inv_gain) else 0.0
            groups.append((state.ob_cols[i].astype(np.float64), ch.ob_cols, ch.ob_cols_use, rv,
                           state.bias_var[i], ig))
            level_var = float(np.mean(state.bias_var[i])) / state.bias.shape[1]
            groups.append((state.ob_rows[i].astype(np.float64), ch.ob_rows, ch.ob_rows_use, rv,
                           np.full(state.ob_rows.shape[1], float(state.row_var[i]) + level_var), ig))
        T = float(T_start)
        keep = [u.copy() for (_, _, u, _, _, _) in groups]
        den = 0.0
        for it in range(12):
            num = den = 0.0
            glow = dark = slope = 0.0
            f = law.factors(T)
            taus = [law.tau1] + ([law.tau2] if law.components == 2 else [])
            for gi, (y, maps, _, rv, gvar, ig) in enumerate(groups):
                model = maps[-1] + sum(t * fi * maps[k] for k, fi in enumerate(f))
                jac = sum(t * fi * maps[k] * (LN2 / taus[k]) for k, fi in enumerate(f))
                v = rv + ig * np.maximum(model, 0)
                r = y - model
                if it == 4:  # cut cosmic rays once the estimate has settled
                    keep[gi] &= np.abs(r) <= clip * np.sqrt(v + gvar[:, None])
                w = np.where(keep[gi], 1.0 / v, 0.0)
                sw, swj, swr = w.sum(1), (w * jac).sum(1), (w * r).sum(1)
                shrink = gvar / (1.0 + gvar * sw)
                num += float((w * jac * r).sum() - np.sum(shrink * swj * swr))
                den += float((w * jac * jac).sum() - np.sum(shrink * swj * swj))
                glow += float((w * maps[-1]).sum())
                dark += float((w * (model - maps[-1])).sum())
                slope += float((w * jac).sum())
            if not den > 0:
                return float("nan"), float("inf")
            step = float(np.clip(num / den, -3.0, 3.0))
            T += step
            if abs(step) < 1e-4 and it >= 5:
                break
        # systematic: the per-readout (glow) level of the OB pixels is known to GLOW_SYS of itself
        sys = GLOW_SYS * abs(glow) / max(abs(slope), 1e-300)
        return T, math.sqrt(1.0 / den + sys ** 2)

    # -- prediction ---------------------------------------------------------------------------------
    def signal(self, camera: str, channel: str, T: float, exptime: float) -> np.ndarray:
        """The model's dark signal (ADU above the bias) of the active area at (T, exptime)."""
        info = self.camera(camera)
        self.check_exposure(camera, exptime)
        ch = self.channel(camera, channel)
        law = info.law
        f = law.factors(T)
        S = ch.maps[-1].copy()
        for k, fk in enumerate(f):
            S += np.float32(exptime * fk) * ch.maps[k]
        if ch.hot_index.size:
            c = ch.hot_coef
            hot = exptime * c[:, 0] * np.exp2((T - law.T0) / ch.hot_tau) + c[:, -1]
            if law.components == 2:
                hot += exptime * c[:, 1] * f[1]
            S.reshape(-1)[ch.hot_index] = hot
        return S

    def predict(self, strips: dict[str, np.ndarray], table: pd.DataFrame, window: bool = False,
                temps: Temperatures | None = None, state: FrameState | None = None) -> np.ndarray:
        """Predicted darks (ADU, float32) of k frame-channels from their whole strips and table rows:
        (k, active rows, active cols), or the model window when ``window``.

        The effective temperature of a frame uses the OB pixels of all of its rows given here; pass
        ``temps`` to reuse temperatures estimated from more channels (:meth:`predict_rows` does)."""
        table = table.reset_index(drop=True)
        for _, r in table.iterrows():
            self.check_exposure(r["camera"], 0.0 if r["imagetyp"] == "BIAS" else float(r["exptime"]))
        state = self.state(strips) if state is None else state
        temps = self.temperatures(state, table) if temps is None else temps
        rows, cols = self.geometry.window_in_active if window else (slice(None), slice(None))
        out = []
        for i, r in table.iterrows():
            t = 0.0 if r["imagetyp"] == "BIAS" else float(r["exptime"])
            S = self.signal(r["camera"], r["channel"], float(temps.teff[i]), t)
            pred = S[rows, cols] + state.bias[i][rows, None].astype(np.float32)
            out.append(np.minimum(pred, np.float32(SATURATED)))
        return np.stack(out) if out else np.zeros((0, *self.geometry.active.shape), np.float32)

    def predict_rows(self, shard: Shard, rows, window: bool = False) -> np.ndarray:
        """Predicted darks of table rows ``rows`` of ``shard`` (whole active area, or the window).

        Every frame's temperature comes from the OB pixels of all of its channels in the shard."""
        self._check_geometry(shard.geometry)
        rows = np.asarray(rows)
        tab = shard.table
        for _, r in tab.iloc[rows].iterrows():
            self.check_exposure(r["camera"], 0.0 if r["imagetyp"] == "BIAS" else float(r["exptime"]))
        files = pd.unique(tab["file"].to_numpy()[rows])
        all_rows = np.flatnonzero(tab["file"].isin(files).to_numpy())
        strips = shard.strips(all_rows)
        sub = tab.iloc[all_rows]
        state = self.state(strips)
        temps = self.temperatures(state, sub)
        where = np.searchsorted(all_rows, rows)
        pick = FrameState(*(getattr(state, k)[where] for k in FrameState.__dataclass_fields__))
        picked = Temperatures(temps.teff[where], temps.sigma[where], temps.source[where])
        return self.predict({s: strips[s][where] for s in strips}, sub.iloc[where], window, picked, pick)


def _header_temperature(row) -> tuple[float, str]:
    for key in ("ccdtemp", "settemp"):
        v = row.get(key, np.nan)
        if v is not None and np.isfinite(v):
            return float(v), key
    return float("nan"), "none"


def physics_predictor(path: str | Path):
    """Predictor for ``deepdark.evaluate``: (shard, rows) -> predicted model windows (k, S, S), ADU."""
    model = PhysicsModel.load(path)

    def predict(shard: Shard, rows: np.ndarray) -> np.ndarray:
        return model.predict_rows(shard, rows, window=True)

    predict.model = model
    return predict


def physics_active_predictor(path: str | Path):
    """Predictor for ``deepdark.predictions.write_predictions``: whole active areas (k, R, C), ADU."""
    model = PhysicsModel.load(path)

    def predict(shard: Shard, rows: np.ndarray) -> np.ndarray:
        return model.predict_rows(shard, rows, window=False)

    predict.model = model
    return predict
