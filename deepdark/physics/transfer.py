"""How far the overscan is trusted: the library's transfer coefficient (``deepdark.physics``).

A frame's row bias is measured in its overscan: the overscan row's level shrunk towards the
frame's mean bias (:func:`deepdark.physics.frame_state.row_bias`). That assumes the overscan's
per-row offset is the offset of the active row beside it. On the simulated guide cameras it is;
on real cameras it may be only partly, or not at all (a serial overscan whose rows scatter by
pickup that the image rows never see): there the per-row bias adds the overscan's noise to
every prediction, and one level per frame does better.

The library measures it, per camera and channel: over its frames, the regression of the active
rows' offsets (clipped row means of the active area, minus the frame's level) on the overscan
rows' offsets as the frame state estimates them (row bias minus level). Both are taken after
the per-pixel model of the library is projected out (the design of the per-pixel fit, so fixed
row patterns and the dark signal of each exposure do not enter) and each frame's mean offset is
removed (its level, not a row offset), and rows
beyond ``TRANSFER_CLIP`` robust sigmas (cosmic rays) are left out. The coefficient is 1 where the
overscan's row offsets are the active rows' (the shrinkage already accounts for the overscan's
read noise), 0 where none of them reaches the active rows; its uncertainty is a jackknife over
frames (rows of one frame may share their errors).

The frame state uses the coefficient (row bias = level + coefficient x overscan row offset)
only where the library shows that it matters: the coefficient differs from 1 by more than
``TRANSFER_SIGMAS`` of its uncertainty, and using it lowers the error variance of a predicted
pixel, (1 - coefficient)^2 times the variance of the overscan row offsets, by more than
``TRANSFER_GAIN`` of the read-noise variance. Elsewhere, and where the library cannot tell (too
few frames, overscan rows without a row noise of their own), each frame's own empirical-Bayes
shrinkage stands. (With few rows, the per-frame shrinkage factor is itself noisy and the
coefficient comes out somewhat below 1 even where the offsets are shared; the second condition
keeps such immaterial differences from changing the row bias.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .frame_state import MAD_SIGMA

TRANSFER_SIGMAS = 3.0  # a coefficient this many sigmas from 1 overrules the per-frame shrinkage ...
TRANSFER_GAIN = 0.01  # ... when it lowers a pixel's error variance by this share of the read variance
TRANSFER_CLIP = 5.0  # rows whose residual is beyond this many robust sigmas are left out
MIN_TRANSFER_DOF = 2  # library frames beyond the per-pixel model needed to measure it


@dataclass(frozen=True)
class Transfer:
    """How much of the overscan's per-row offset appears in the active rows of a camera-channel."""

    coefficient: float  # NaN when the library cannot measure it
    sigma: float  # its 1-sigma uncertainty (inf when not measured)
    residual_var: float  # ADU^2: variance of the active-row offsets the overscan does not predict
    used: bool  # whether the frame state uses it (else each frame's own shrinkage)
    frames: int = 0  # library frames it was measured on
    gain: float = 0.0  # what using it saves of a pixel's error variance, in units of the read variance

    @classmethod
    def unmeasured(cls, frames: int = 0) -> Transfer:
        return cls(math.nan, math.inf, math.nan, False, frames)

    def describe(self) -> str:
        """One line: the coefficient and what the frame state does with it."""
        if not math.isfinite(self.sigma):
            return f"not measured ({self.frames} frames): overscan rows shrunk per frame"
        if self.used:
            verdict = "used for the row bias"
        elif abs(self.coefficient - 1.0) <= TRANSFER_SIGMAS * self.sigma:
            verdict = "consistent with 1: overscan rows shrunk per frame"
        else:
            verdict = "immaterial: overscan rows shrunk per frame"
        return (
            f"{self.coefficient:.3f} +- {self.sigma:.3f} ({self.frames} frames, saves {100 * self.gain:.2g} % of"
            f" the read variance): {verdict}"
        )


def measure_transfer(
    active_rows: np.ndarray, overscan_rows: np.ndarray, design: np.ndarray, read_var: float
) -> Transfer:
    """The transfer coefficient of one camera-channel from its library frames.

    Parameters
    ----------
    active_rows
        (F, R) ADU: each library frame's active-row offsets from its level
        (:func:`deepdark.physics.frame_state.active_row_offsets`).
    overscan_rows
        (F, R) ADU: the same frames' row bias minus level, as the frame state made it.
    design
        (F, K): the design of the library's per-pixel fit (:meth:`deepdark.physics.law.Law.design`).
    read_var
        ADU^2: the frames' read-noise variance (the least a pixel's noise variance is).

    Returns
    -------
    Transfer
        The coefficient, its jackknife uncertainty, the variance of what it leaves, and whether
        the frame state uses it (see the module's description).
    """
    X = np.asarray(design, np.float64)
    F = len(X)
    dof = F - np.linalg.matrix_rank(X)
    if dof < MIN_TRANSFER_DOF:
        return Transfer.unmeasured(F)
    a, o = _residuals(X, active_rows), _residuals(X, overscan_rows)
    # a frame's mean offset is its level, not a row offset: only the rows' spread about it counts
    a, o = a - np.nanmean(a, axis=1, keepdims=True), o - np.nanmean(o, axis=1, keepdims=True)
    keep = np.isfinite(a) & np.isfinite(o)
    a, o = np.where(keep, a, 0.0), np.where(keep, o, 0.0)
    for rounds_left in (3, 2, 1, 0):  # fit, cut outlying rows, fit again
        soo = float(np.sum(np.where(keep, o * o, 0.0)))
        if not soo > 1e-12 * max(float(np.sum(a * a)), 1e-300):
            return Transfer.unmeasured(F)
        g = float(np.sum(np.where(keep, a * o, 0.0))) / soo
        e = a - g * o
        if rounds_left:
            scale = MAD_SIGMA * float(np.median(np.abs(e[keep])))
            keep &= np.abs(e) <= TRANSFER_CLIP * max(scale, 1e-12)
    n = max(int(keep.sum()), 1)
    sigma = _jackknife(a, o, keep, g) * math.sqrt(F / dof)
    resid = float(np.sum(np.where(keep, e * e, 0.0))) / n * F / dof
    gain = (1.0 - g) ** 2 * float(np.sum(np.where(keep, o * o, 0.0))) / n * F / dof / max(read_var, 1e-12)
    used = math.isfinite(sigma) and abs(g - 1.0) > TRANSFER_SIGMAS * sigma and gain > TRANSFER_GAIN
    return Transfer(g, sigma, resid, bool(used), F, gain)


def _residuals(X: np.ndarray, rows) -> np.ndarray:
    """What the per-pixel model (design ``X``, (F, K)) leaves of each row's offsets (F, R): the
    projection off X's columns, applied without forming the F x F projector (at the paper's
    20,000 darks that matrix alone would take 3.2 GB and its product minutes)."""
    rows = np.asarray(rows, np.float64)
    return rows - X @ (np.linalg.pinv(X) @ rows)


def _jackknife(a: np.ndarray, o: np.ndarray, keep: np.ndarray, g: float) -> float:
    """Delete-one-frame jackknife sd of the regression slope (inf when it cannot be formed)."""
    sao = np.sum(np.where(keep, a * o, 0.0), axis=1)
    soo = np.sum(np.where(keep, o * o, 0.0), axis=1)
    rest = soo.sum() - soo
    if not (rest > 0).all():
        return math.inf
    slopes = (sao.sum() - sao) / rest
    F = len(slopes)
    return math.sqrt((F - 1) / F * float(np.sum((slopes - slopes.mean()) ** 2)))
