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

import functools
import math
from dataclasses import dataclass

import numpy as np

from .frame_state import MAD_SIGMA, streamed_median

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


TRANSFER_VALUES = 2**18  # row offsets formed at once (a few frames' rows): a library's are too many to hold


def measure_transfer(
    active_rows, overscan_rows, design: np.ndarray, read_var: float, hold_bytes: float = math.inf
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

    hold_bytes
        The residual offsets are held for the fit's passes when they take at most this; else
        they are formed again, a few frames at a time, in every pass (:class:`_Offsets`).

    The row offsets are arrays, or objects of that ``shape`` whose ``[frames]`` (a slice) reads
    those frames' rows, a few frames at a time.

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
    rows = _Offsets(active_rows, overscan_rows, X, hold_bytes)
    for rounds_left in (3, 2, 1, 0):  # fit, cut outlying rows, fit again
        saa, sao, soo, n = rows.sums()
        if not soo.sum() > 1e-12 * max(saa, 1e-300):
            return Transfer.unmeasured(F)
        g = sao.sum() / soo.sum()
        if rounds_left:
            scale = MAD_SIGMA * streamed_median(functools.partial(rows.deviations, g))
            rows.cuts.append((g, TRANSFER_CLIP * max(scale, 1e-12)))
    n = max(n, 1)
    sigma = _jackknife(sao, soo) * math.sqrt(F / dof)
    resid = rows.misfit(g) / n * F / dof
    gain = float((1.0 - g) ** 2 * soo.sum() / n * F / dof / max(read_var, 1e-12))
    used = math.isfinite(sigma) and abs(g - 1.0) > TRANSFER_SIGMAS * sigma and gain > TRANSFER_GAIN
    return Transfer(float(g), sigma, float(resid), bool(used), F, gain)


class _Offsets:
    """A channel's active-row and overscan-row offsets with the per-pixel model projected out
    (the design ``X``'s columns, applied without forming the F x F projector: at 20,000 darks
    that matrix alone would take 3.2 GB) and each frame's mean offset removed (its level, not a
    row offset), a few frames at a time (:meth:`parts`): held when they take at most
    ``hold_bytes``, else formed again in each pass. ``cuts``: the clipping rounds so far,
    (coefficient, limit): a row is kept while |active - coefficient x overscan| is within the
    limit of every round."""

    def __init__(self, active_rows, overscan_rows, X: np.ndarray, hold_bytes: float):
        self.active, self.overscan, self.X = active_rows, overscan_rows, X
        F, R = active_rows.shape
        step = max(1, TRANSFER_VALUES // R)
        self.spans = [slice(first, first + step) for first in range(0, F, step)]
        pinv = np.linalg.pinv(X)  # the model's coefficients of each row: pinv @ rows, summed over the parts
        self.coef = [sum(pinv[:, at] @ self._read(r, at) for at in self.spans) for r in (self.active, self.overscan)]
        self.cuts: list[tuple[float, float]] = []
        self.held = list(self._residuals()) if hold_bytes >= 17 * F * R else None  # two float64, a bool

    @staticmethod
    def _read(rows, at: slice) -> np.ndarray:
        return np.asarray(rows[at], np.float64)

    def _residuals(self):
        """(a, o, finite) of each part of the frames: the residual offsets, 0 where either is not finite."""
        for at in self.spans:
            a, o = (self._read(rows, at) - self.X[at] @ c for rows, c in zip((self.active, self.overscan), self.coef))
            a, o = a - np.nanmean(a, axis=1, keepdims=True), o - np.nanmean(o, axis=1, keepdims=True)
            finite = np.isfinite(a) & np.isfinite(o)
            yield np.where(finite, a, 0.0), np.where(finite, o, 0.0), finite

    def parts(self):
        """(a, o, keep) of each part of the frames: the residual offsets and the rows kept by every cut."""
        for a, o, finite in self.held if self.held is not None else self._residuals():
            keep = finite.copy()
            for g, limit in self.cuts:
                keep &= np.abs(a - g * o) <= limit
            yield a, o, keep

    def sums(self) -> tuple[float, np.ndarray, np.ndarray, int]:
        """Sum of a^2 (every finite row), per frame the sums of a*o and o^2 over the kept rows,
        and the kept rows."""
        saa, sao, soo, n = 0.0, [], [], 0
        for a, o, keep in self.parts():
            saa += float(np.sum(a * a))
            sao.append(np.sum(np.where(keep, a * o, 0.0), axis=1))
            soo.append(np.sum(np.where(keep, o * o, 0.0), axis=1))
            n += int(keep.sum())
        return saa, np.concatenate(sao), np.concatenate(soo), n

    def deviations(self, g: float):
        """|a - g o| of the kept rows, a part at a time."""
        for a, o, keep in self.parts():
            yield np.abs(a - g * o)[keep]

    def misfit(self, g: float) -> float:
        """Sum of (a - g o)^2 over the kept rows."""
        return sum(float(np.sum(np.where(keep, (a - g * o) ** 2, 0.0))) for a, o, keep in self.parts())


def _jackknife(sao: np.ndarray, soo: np.ndarray) -> float:
    """Delete-one-frame jackknife sd of the regression slope, from each frame's sums of a*o and
    o^2 over its kept rows (inf when it cannot be formed)."""
    rest = soo.sum() - soo
    if not (rest > 0).all():
        return math.inf
    slopes = (sao.sum() - sao) / rest
    F = len(slopes)
    return math.sqrt((F - 1) / F * float(np.sum((slopes - slopes.mean()) ** 2)))
