"""Frame state: each frame's row bias and overscan/OB levels from its strips (``deepdark.physics``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from deepdark.io.units import SATURATED

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
    # (k,): how ``bias`` was made from the overscan (see :func:`bias_rule`, :func:`with_transfer`)
    bias_source: np.ndarray = field(default=None)
    # (k,): rows whose overscan holds no measurement (:func:`blind_overscan_rows`)
    blind_rows: np.ndarray = field(default=None)

    def __post_init__(self):
        if self.bias_source is None:
            self.bias_source = np.full(len(self.level), "overscan", dtype=object)
        if self.blind_rows is None:
            self.blind_rows = np.zeros(len(self.level), dtype=np.int64)


def bias_rule(shrink: bool, smooth: int) -> str:
    """How :func:`row_bias` makes the per-row bias with these options, in words."""
    if smooth > 1:
        return f"overscan, running mean of {smooth} rows"
    return "overscan, shrunk per frame" if shrink else "overscan"


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
    med = median_last(x, keepdims=True)
    dev = x - med
    sigma = np.maximum(MAD_SIGMA * median_last(np.abs(dev).reshape(k, -1), nonnegative=True), 0.5)
    keep = np.abs(dev) <= clip * sigma[:, None, None]
    n = np.maximum(keep.sum(-1), 1)
    raw = med[..., 0].astype(np.float64) + masked_sum(dev, keep, dtype=np.float64) / n
    res = np.where(keep, x - raw[..., None], 0)
    read_var = np.einsum("krc,krc->k", res, res, dtype=np.float64) / np.maximum(keep.sum((1, 2)) - rows, 1)
    est_var = read_var[:, None] / n
    level = raw.mean(axis=1)
    spread = MAD_SIGMA * median_last(np.abs(raw - median_last(raw, keepdims=True)), nonnegative=True)
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
    source = np.full(len(level), bias_rule(shrink, smooth), dtype=object)
    return FrameState(bias, level, read_var, row_var, bias_var, ob_cols, ob_rows, source, blind_overscan_rows(a1, skip))


def blind_overscan_rows(a1: np.ndarray, skip: int = OVERSCAN_SKIP) -> np.ndarray:
    """(k,): how many rows of each of k overscan strips (k, R, cols) have most of their pixels
    (after ``skip`` columns) saturated or at 0: a bright source or a readout fault left no
    measurement of their bias there, and the row bias made of them is that fault's level, not
    the bias (a few such pixels in a row are clipped out of its mean)."""
    used = np.asarray(a1)[:, :, skip:]
    blind = (used >= SATURATED) | (used <= 0)
    return (2 * blind.sum(-1) > used.shape[-1]).sum(-1)


def transferred_bias(bias: np.ndarray, level: np.ndarray, coefficient: np.ndarray) -> np.ndarray:
    """Row bias ``level + coefficient x (bias - level)`` of k rows (k, R); the dtype of ``bias``.

    ``coefficient`` (k,): how much of the overscan's per-row offset appears in the active rows,
    as the library measured it (:func:`deepdark.physics.transfer.measure_transfer`)."""
    lv = np.asarray(level, np.float64)[:, None]
    return (lv + np.asarray(coefficient, np.float64)[:, None] * (bias - lv)).astype(bias.dtype)


def with_transfer(state: FrameState, coefficient: np.ndarray, residual_var: np.ndarray) -> FrameState:
    """``state`` with the row bias of the rows whose ``coefficient`` (k,) is finite made by the
    library's transfer coefficient instead (:func:`transferred_bias`); their bias error variance
    becomes the library's ``residual_var`` (k,) (active-row offsets the overscan does not predict)
    plus the coefficient's share of the frame's own. NaN rows keep the frame state as it is."""
    use = np.isfinite(coefficient)
    if not use.any():
        return state
    bias, bias_var, ob_cols = state.bias.copy(), state.bias_var.copy(), state.ob_cols.copy()
    source = state.bias_source.copy()
    g = coefficient[use]
    bias[use] = transferred_bias(state.bias[use], state.level[use], g)
    bias_var[use] = g[:, None] ** 2 * state.bias_var[use] + residual_var[use][:, None]
    ob_cols[use] += (state.bias[use] - bias[use])[:, :, None].astype(ob_cols.dtype)
    source[use] = [f"overscan x {x:.3f} (library transfer)" for x in g]
    return replace(state, bias=bias, bias_var=bias_var, ob_cols=ob_cols, bias_source=source)


def median_last(a: np.ndarray, keepdims: bool = False, nonnegative: bool = False) -> np.ndarray:
    """``np.median(a, axis=-1)`` of a float array, equal to it to the bit (NaN where a lane holds
    NaN; the mean of the two middle values in ``a``'s dtype for an even count), from a copy
    sorted or partitioned about the middle (:func:`middle_values`): ``np.median`` partitions
    about both middle values, which numpy's vectorised partition does not do, several times
    slower. ``nonnegative``: values without a sign bit (``np.abs`` gives them), which order as
    their bit patterns, faster."""
    a = np.asarray(a)
    n = a.shape[-1]
    lanes = np.array(a, dtype=a.dtype.newbyteorder("="), order="C").reshape(-1, n)  # bit patterns in native order
    nan = np.isnan(lanes).any(axis=1) if lanes.size and np.isnan(lanes.max()) else None
    keys = lanes.view(f"u{lanes.itemsize}") if nonnegative else lanes
    out = middle_values(keys, n, lanes.dtype)
    if nan is not None:
        out[nan] = np.nan
    out = out.reshape(a.shape[:-1])
    return out[..., None] if keepdims else out


PARTITION_LANE = 512  # values: from this long a lane, a partition about its middle beats a sort


def middle_values(keys: np.ndarray, n: int, dtype) -> np.ndarray:
    """(lanes,): the median, in ``dtype`` (whose values ``keys`` hold, or order as), of the first
    ``n`` values in order of each lane of ``keys`` (lanes, values), reordered in place: NaN and
    values to leave out must order last. numpy's vectorised sort costs about as much as its
    partition up to a few hundred values a lane, 2-4x more from a thousand (on 2**19 float32
    values: 0.48 against 0.24 ms in lanes of 1,024 values, 0.60 against 0.16 in lanes of 4,096)."""
    partitioned = keys.shape[1] >= PARTITION_LANE
    if partitioned:
        keys.partition(n // 2, axis=1)
    else:
        keys.sort(axis=1)
    middle = keys[:, n // 2].view(dtype)
    if n % 2:
        return middle.copy()
    # the largest value below the middle one: the largest of those before it, or its neighbour
    below = keys[:, : n // 2].max(axis=1) if partitioned else keys[:, n // 2 - 1]
    return (below.view(dtype) + middle) / 2


RADIX_BITS = 16  # bits of the values' bit patterns told apart per pass of streamed_median
GATHER_MAX = 2**20  # values a pass of streamed_median gathers and sorts at the most
INF_BITS = np.uint64(0x7FF0000000000000)  # the pattern of inf: NaN's (without their sign) lie above


def streamed_median(parts) -> float:
    """``np.median`` of the values that ``parts()`` yields (float64 arrays of values >= 0, or
    NaN), to the bit, holding one part at a time: a library's residuals are too many to hold.

    ``parts`` is called once per pass and must yield the same values each time. A value >= 0
    sorts as its bit pattern: the patterns are counted by their top RADIX_BITS bits, then the
    next ones of the bin that holds a middle rank, until that bin is small enough to gather and
    sort (two passes, as a rule; a bin of equal values is found without gathering)."""
    counts, nan = _counts(parts, 0, 64, RADIX_BITS)
    n = int(counts.sum())
    if nan or not n:
        return math.nan
    lo, hi = _ranked(parts, [(n - 1) // 2, n // 2], counts, 0, 64 - RADIX_BITS, 0)
    return lo if n % 2 else (lo + hi) / 2  # np.median's mean of the two middle values


def _ranked(parts, ranks: list[int], counts: np.ndarray, prefix: int, shift: int, below: int) -> list[float]:
    """The values of the (ascending, 0-based) ``ranks``, given ``counts``: the values whose
    patterns' top bits are ``prefix``, counted by their next bits down to bit ``shift``, with
    ``below`` values lying below them all."""
    cum = np.cumsum(counts)
    width = counts.size.bit_length() - 1
    out = []
    for b in sorted({int(np.searchsorted(cum, r - below, side="right")) for r in ranks}):
        lower = below + (int(cum[b - 1]) if b else 0)
        mine = [r for r in ranks if lower <= r < lower + counts[b]]
        inner = (prefix << width) | b
        if shift == 0:  # every value of the bin is this one
            out += [float(np.array(inner, np.uint64).view(np.float64))] * len(mine)
        elif counts[b] <= GATHER_MAX:
            kept = np.sort(np.concatenate(list(_patterns(parts, inner, shift))).view(np.float64))
            out += [float(kept[r - lower]) for r in mine]
        else:
            step = min(RADIX_BITS, shift)
            out += _ranked(parts, mine, _counts(parts, inner, shift, step)[0], inner, shift - step, lower)
    return out


def _counts(parts, prefix: int, shift: int, width: int) -> tuple[np.ndarray, bool]:
    """How many patterns whose top (64 - shift) bits are ``prefix`` have each value of their next
    ``width`` bits; and whether any value is NaN."""
    counts, nan = np.zeros(2**width, np.int64), False
    for bits in _patterns(parts, prefix, shift):
        digit = (bits >> np.uint64(shift - width)) & np.uint64(2**width - 1)
        counts += np.bincount(digit.astype(np.intp), minlength=2**width)
        nan = nan or bool(bits.size and bits.max() > INF_BITS)
    return counts, nan


def _patterns(parts, prefix: int, shift: int):
    """The bit patterns (uint64) of the values of ``parts()`` whose top (64 - shift) bits are ``prefix``."""
    for p in parts():
        p = np.asarray(p, np.float64)
        if shift == 64 and (p < 0).any():  # the first pass: the values must be >= 0
            raise ValueError("streamed_median: negative values")
        bits = np.abs(p).ravel().view(np.uint64)  # abs: -0.0 sorts as 0
        yield bits if shift == 64 else bits[(bits >> np.uint64(shift)) == np.uint64(prefix)]


def active_row_offsets(active_minus_bias: np.ndarray, bias: np.ndarray, level: np.ndarray, clip: float = 5.0):
    """(k, R) float64: each active row's offset from its frame-channel's bias level, from the
    active area minus the row bias (k, R, C) and that bias (k, R): a mean of the row clipped at
    ``clip`` robust sigmas of its median (cosmic rays, defects), plus the row's bias offset.

    The sigma is the frame's own (median absolute deviation over every 8th row), not the row's:
    one row's deviations are too few to be robust on a narrow active area."""
    x = np.asarray(active_minus_bias, np.float32)
    mean = np.empty(x.shape[:2])
    for i, frame in enumerate(x):  # a frame at a time: its copies stay in the cache
        med = median_last(frame, keepdims=True)
        dev = frame - med
        sigma = MAD_SIGMA * median_last(np.abs(dev[::8]).ravel(), nonnegative=True)
        keep = np.abs(dev) <= clip * np.maximum(sigma, 0.5)
        mean[i] = med[:, 0] + masked_sum(dev, keep, dtype=np.float64) / np.maximum(keep.sum(-1), 1)
    return mean + (np.asarray(bias, np.float64) - np.asarray(level, np.float64)[:, None])


def masked_sum(values: np.ndarray, keep: np.ndarray, dtype=None) -> np.ndarray:
    """``np.where(keep, values, 0).sum(-1, dtype)``, equal to it in value: where every value is
    finite, the values times ``keep`` (a dropped negative value adds -0), about ten times faster
    than ``np.where``."""
    if np.isfinite(values).all():
        return np.multiply(values, keep).sum(-1, dtype=dtype)
    return np.where(keep, values, 0).sum(-1, dtype=dtype)
