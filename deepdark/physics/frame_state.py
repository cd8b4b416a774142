"""Frame state: each frame's row bias and overscan/OB levels from its strips (``deepdark.physics``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAD_SIGMA = 1.4826  # sd / MAD of a normal distribution
OVERSCAN_SKIP = 4  # first overscan columns left out of the row bias (residue, settling)
BIAS_CLIP = 4.0  # overscan pixels beyond this many robust sigmas leave the row mean


@dataclass
class FrameState:
    """The readout state of k frame-channels, measured on their own strips (ADU)."""

    bias: np.ndarray  # (k, active rows): per-row bias, the expected level of a virtual pixel
    level: np.ndarray  # (k,): the frame-channel's mean bias
    read_var: np.ndarray  # (k,): overscan pixel variance about its row level (read noise^2)
    row_var: np.ndarray  # (k,): variance of the per-row offsets (row noise^2)
    bias_var: np.ndarray  # (k, active rows): variance of the error of ``bias``
    ob_cols: np.ndarray  # (k, active rows, n): OB columns minus the per-row bias (float32)
    ob_rows: np.ndarray  # (k, n, active cols): OB rows minus the frame's mean bias (float32)


def row_bias(
    a1: np.ndarray, skip: int = OVERSCAN_SKIP, shrink: bool = True, smooth: int = 1, clip: float = BIAS_CLIP
) -> tuple[np.ndarray, ...]:
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
    row_var = np.maximum(spread**2 - est_var.mean(axis=1), 0.0)
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


def frame_state(
    strips: dict[str, np.ndarray], skip: int = OVERSCAN_SKIP, shrink: bool = True, smooth: int = 1
) -> FrameState:
    """The state of k frame-channels from their whole strips a1 (k, R, 46), a2 (k, R, 4), a3 (k, 4, C)."""
    a1, a2, a3 = (np.asarray(strips[s]) for s in ("a1", "a2", "a3"))
    if a1.ndim == 2:
        a1, a2, a3 = a1[None], a2[None], a3[None]
    bias, level, read_var, row_var, bias_var = row_bias(a1, skip, shrink, smooth)
    ob_cols = a2.astype(np.float32) - bias[:, :, None].astype(np.float32)
    ob_rows = a3.astype(np.float32) - level[:, None, None].astype(np.float32)
    return FrameState(bias, level, read_var, row_var, bias_var, ob_cols, ob_rows)
