"""The library fit: a dark/bias library's per-pixel physics maps into an HDF5 file (``deepdark.physics``)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from tqdm import tqdm

from deepdark import __version__
from deepdark.io.atomic import atomic_path
from deepdark.io.errors import InputError
from deepdark.io.geometry import Geometry
from deepdark.io.masters import StackedRows
from deepdark.io.shards import HDF5_FORMAT, Shard, geometry_attrs, hdf5_written
from deepdark.io.strips import strip_shapes
from deepdark.io.tables import common_geometry, frame_setpoints, library_table
from deepdark.io.threads import PerThread, in_flight, ordered_map, resolve_threads, threads_within
from deepdark.io.units import SATURATED

from .frame_state import (
    MAD_SIGMA,
    OVERSCAN_SKIP,
    active_row_offsets,
    frame_state,
    masked_sum,
    median_last,
    transferred_bias,
)
from .law import LAW_VALUES, Law, fit_law, mean_rows
from .pixelfit import IRREGULAR_P, HotGrid, _hot_fits, _pairs, _PixelFit, _robust_fit, smooth_prior
from .transfer import Transfer, measure_transfer

log = logging.getLogger(__name__)

PHYSICS_SCHEMA = 1
LIBRARY_TYPES = ("DARK", "BIAS")
PIXEL_CLIP = 5.0  # frame-pixels beyond this many of the pixel's residual scales are cut
BLOCKS = 32  # block means per side for the law fit (blocks at least MIN_BLOCK px wide)
MIN_BLOCK = 8
HOT_FACTOR = 3.0  # hot pixel: dark at the reference above this many times its block's
SMOOTH_PX = 3  # radius of the smoothing box (3 passes: a ~Gaussian of sd ~sqrt(r(r+1)) px)
MAX_EXTRAPOLATION = 2.0  # a separable library predicts up to this many times its longest exposure
FRAME_GROUP = 16  # frame-channels measured at once by stage 1
STAGE1_BYTES_PER_PIXEL = 20  # one frame's float copies while its block means and row offsets are measured
FRAME_STORE_BATCH = 2**24  # bytes of a channel's frame-store records read at once (transfer update, typical signal)


# -- the library fit ----------------------------------------------------------------------------


def _block_means(signal: np.ndarray, bs: int, clip: float = PIXEL_CLIP) -> np.ndarray:
    """Clipped means of bs x bs blocks of ``signal`` (k, R, C) -> (k, R//bs, C//bs)."""
    k, R, C = signal.shape
    nr, nc = R // bs, C // bs
    out = np.empty((k, nr, nc))
    for i in range(k):  # a frame at a time: its copies stay small
        v = signal[i, : nr * bs, : nc * bs].reshape(nr, bs, nc, bs).transpose(0, 2, 1, 3).reshape(nr, nc, bs * bs)
        med = median_last(v, keepdims=True)
        dev = np.abs(v - med)
        sig = np.maximum(MAD_SIGMA * median_last(dev, keepdims=True, nonnegative=True), 0.5)
        keep = dev <= clip * sig
        out[i] = masked_sum(v, keep) / np.maximum(keep.sum(-1), 1)
    return out


class _FrameStore:
    """Arrays of each of ``n`` frame-channels (one record per frame-channel and field) in an
    unnamed scratch file that vanishes when closed: what stage 1 measures stays on disk and a
    channel's records are read back when they are needed, so that the library's size does not
    set the memory the fit holds. Plain reads and writes, not a memory map: the pages of a map
    would count as the process's memory.

    Parameters
    ----------
    n
        Frame-channels.
    fields
        Name -> (shape of one record, dtype).
    folder
        Folder of the scratch file.
    """

    def __init__(self, n: int, fields: dict[str, tuple[tuple[int, ...], np.dtype]], folder: str | Path | None):
        self.n, self.fields, offset = n, {}, 0
        for name, (shape, dtype) in fields.items():
            dtype = np.dtype(dtype)
            size = math.prod(shape) * dtype.itemsize
            self.fields[name] = (offset, tuple(shape), dtype, size)
            offset += n * size
        self._file = tempfile.TemporaryFile(dir=folder, prefix=".deepdark-frames-")  # noqa: SIM115 (closed by close())

    def close(self) -> None:
        self._file.close()

    def write(self, name: str, positions: np.ndarray, values: np.ndarray) -> None:
        """Records ``values`` (len(positions), *shape) of field ``name`` at ``positions``."""
        base, shape, dtype, size = self.fields[name]
        values = np.ascontiguousarray(values)
        if values.dtype != dtype or values.shape[1:] != shape:
            raise TypeError(f"{name}: {values.dtype} {values.shape[1:]}, not {dtype} {shape}")
        for p, v in zip(positions, values):
            if os.pwrite(self._file.fileno(), memoryview(v).cast("B"), base + int(p) * size) != size:
                raise OSError(f"short write to the frame store ({name})")

    def read(self, name: str, positions: np.ndarray, part: slice | None = None) -> np.ndarray:
        """Records of field ``name`` at ``positions``: (len(positions), *shape), or with ``part``
        (a slice of step 1 of the flattened record) (len(positions), part's length)."""
        base, shape, dtype, size = self.fields[name]
        flat = math.prod(shape)
        start, stop, _ = (part or slice(None)).indices(flat)
        out = np.empty((len(positions), stop - start), dtype)
        skip = base + start * dtype.itemsize
        for i, p in enumerate(positions):
            buf = memoryview(out[i]).cast("B")
            if os.preadv(self._file.fileno(), [buf], skip + int(p) * size) != len(buf):
                raise OSError(f"short read from the frame store ({name})")
        return out if part is not None else out.reshape((len(positions),) + shape)

    def nbytes(self, name: str) -> int:
        """Bytes of one record of field ``name``."""
        return self.fields[name][3]


@dataclass
class _Members:
    """The library's frame-channels and what stage 1 measured on them: scalars in memory, the
    rest in a frame store (:class:`_FrameStore`), per frame-channel: ``bias`` (R,) float32, the
    row bias; ``blocks`` (nb_r, nb_c) the block means; ``active_rows`` (R,) the active rows'
    offsets from the level (the transfer's data); ``ob`` the optical-black columns minus the row
    bias (R x ob_cols, flattened) then rows minus the level (ob_rows x C), float32, and
    ``ob_valid`` (bool) where they are neither saturated nor zero."""

    table: pd.DataFrame  # one row per frame-channel (shard_no, row, active_index, file, camera, ...)
    level: np.ndarray  # (n,)
    read_var: np.ndarray
    row_var: np.ndarray
    store: _FrameStore
    ob_cols: int  # optical-black columns (0: a geometry without optical black)
    ob_rows: int

    def close(self) -> None:
        self.store.close()


class _Records:
    """Field ``name`` of frame-channels ``positions`` in a frame store, as an array of shape
    (len(positions), *record) read a few frames at a time: ``[frames]`` (a slice or index array)
    reads those frames' records, float64, less ``minus`` (one value per frame-channel)."""

    def __init__(self, store: _FrameStore, name: str, positions: np.ndarray, minus: np.ndarray | None = None):
        self.store, self.name, self.positions, self.minus = store, name, positions, minus
        self.shape = (len(positions),) + store.fields[name][1]

    def __getitem__(self, frames) -> np.ndarray:
        values = self.store.read(self.name, self.positions[frames]).astype(np.float64, copy=False)
        return values if self.minus is None else values - self.minus[frames].reshape((-1,) + (1,) * (values.ndim - 1))


class _BlockMeans:
    """The law's block means (frames, channels x blocks) of a camera's channels, as the law asks
    for them (:func:`deepdark.physics.law.fit_law`): ``[rows]`` those frames, ``[rows, span]`` a
    span of their columns; held when they take at most ``hold_bytes``, else read from the frame
    store each time. ``members``: per channel, the frame-store position of each frame."""

    def __init__(self, store: _FrameStore, members: list[np.ndarray], hold_bytes: float):
        self.store, self.members = store, members
        self.per_channel = math.prod(store.fields["blocks"][1])
        self.shape = (len(members[0]), self.per_channel * len(members))
        self.held = None
        if math.prod(self.shape) * 8 <= hold_bytes:  # filled a channel at a time: one copy
            held = np.empty(self.shape)
            for j, positions in enumerate(members):
                held[:, j * self.per_channel : (j + 1) * self.per_channel] = store.read("blocks", positions).reshape(
                    len(positions), -1
                )
            self.held = held

    def __getitem__(self, key) -> np.ndarray:
        if self.held is not None:
            return self.held[key]
        rows, span = key if isinstance(key, tuple) else (key, slice(None))
        start, stop, step = span.indices(self.shape[1])
        if step != 1:
            raise IndexError("block means: a span of columns of step 1 only")
        parts = [np.empty((len(self.members[0][rows]), 0))]
        for j, positions in enumerate(self.members):
            first, last = max(start, j * self.per_channel), min(stop, (j + 1) * self.per_channel)
            if first < last:
                part = slice(first - j * self.per_channel, last - j * self.per_channel)
                parts.append(self.store.read("blocks", positions[rows], part))
        return np.concatenate(parts, axis=1)


def _library(shards: Sequence[Shard], cameras: Sequence[str] | None = None) -> pd.DataFrame:
    lib = library_table(shards, LIBRARY_TYPES)
    if not lib.empty:
        lib = lib[lib["active_index"] >= 0].reset_index(drop=True)
    if lib.empty:
        raise InputError("no DARK or BIAS frames in the library shards")
    if cameras is not None:
        missing = sorted(set(map(str, cameras)) - set(lib["camera"]))
        if missing:
            raise InputError(f"camera {', '.join(missing)}: no DARK or BIAS frames in the library shards")
        lib = lib[lib["camera"].isin(set(map(str, cameras)))].reset_index(drop=True)
    # the fit needs no hashes: a third of a row's memory, in this table and the camera's copies
    return lib.drop(columns=[c for c in ("file_hash", "frame_hash") if c in lib])


def _stage1(shards, lib: pd.DataFrame, g: Geometry, params: dict, bs: int, progress: bool, scratch, threads=1):
    """Every frame-channel's state (:func:`frame_state`), block means and active-row offsets,
    measured FRAME_GROUP at a time on ``threads`` threads; what is per row or pixel goes to a
    frame store in ``scratch``."""
    n = len(lib)
    R, C = g.active.shape
    level, read_var, row_var = np.empty(n), np.empty(n), np.empty(n)
    groups = [
        (s, part) for k, s in enumerate(shards) for part in _frame_groups(lib[lib["shard_no"] == k].sort_values("row"))
    ]
    shapes = strip_shapes(g)
    ncol, nrow = shapes["a2"][-1], shapes["a3"][-2]
    store = _FrameStore(n, _store_fields(R, C, bs, ncol, nrow), scratch)
    mem = _Members(lib, level, read_var, row_var, store, ncol, nrow)

    def measure(group) -> int:
        s, part = group
        rows, pos = part["row"].to_numpy(), part.index.to_numpy()
        strips = s.strips(rows)
        st = frame_state(strips, params["overscan_skip"], params["shrink"], params["smooth_rows"])
        level[pos], read_var[pos], row_var[pos] = st.level, st.read_var, st.row_var
        _store_frame_state(mem.store, pos, st, strips)
        _store_active(mem.store, shards, part, st, bs, R)
        return len(rows)

    bar = tqdm(total=n, desc="physics: frame state", unit="channel", disable=None if progress else True)
    try:
        for done in ordered_map(measure, groups, threads):
            bar.update(done)
    except BaseException:
        mem.close()
        raise
    finally:
        bar.close()
    return mem


def _stage1_threads(g: Geometry, memory_mb: float, threads: int) -> int:
    """The most threads, up to ``threads``, whose groups of frame-channels in flight (each its
    uint16 stack and one frame's float copies) stay within the budget."""
    R, C = g.active.shape
    group = FRAME_GROUP * R * C * STACK_BYTES_PER_FRAME_PIXEL + R * C * STAGE1_BYTES_PER_PIXEL
    return threads_within(threads, lambda t: in_flight(t) * group, memory_mb * 2**20 * PLANNED_SHARE)


def _frame_groups(sub: pd.DataFrame) -> list[pd.DataFrame]:
    return [sub.iloc[start : start + FRAME_GROUP] for start in range(0, len(sub), FRAME_GROUP)]


def _store_fields(R: int, C: int, bs: int, ncol: int, nrow: int) -> dict:
    nob = R * ncol + nrow * C
    return dict(
        bias=((R,), np.float32),
        blocks=((R // bs, C // bs), np.float64),
        active_rows=((R,), np.float64),
        ob=((nob,), np.float32),
        ob_valid=((nob,), np.bool_),
    )


def _store_frame_state(store: _FrameStore, pos: np.ndarray, st, strips) -> None:
    """The row bias and the optical black of frame-channels ``pos`` (their frame state ``st``)."""
    k = len(pos)
    store.write("bias", pos, st.bias.astype(np.float32))
    store.write("ob", pos, np.concatenate([st.ob_cols.reshape(k, -1), st.ob_rows.reshape(k, -1)], axis=1))
    raw = np.concatenate([np.asarray(strips["a2"]).reshape(k, -1), np.asarray(strips["a3"]).reshape(k, -1)], axis=1)
    store.write("ob_valid", pos, (raw < SATURATED) & (raw > 0))


def _store_active(store: _FrameStore, shards, part: pd.DataFrame, st, bs: int, R: int) -> None:
    """The block means and active-row offsets of the frame-channels of ``part`` (their frame state ``st``)."""
    pos = part.index.to_numpy()
    blocks = np.empty((len(pos),) + store.fields["blocks"][1])
    active_rows = np.empty((len(pos), R))
    with StackedRows(shards, part, np.arange(len(part)), R) as stacked:  # each chunk read once
        raw = stacked.read(0)
        bias32 = st.bias.astype(np.float32)
        for i in range(len(pos)):  # a frame at a time: its float copies stay in the cache
            act = raw[i][None].astype(np.float32) - bias32[i, :, None]
            blocks[i] = _block_means(act, bs)[0]
            active_rows[i] = active_row_offsets(act, st.bias[i : i + 1], st.level[i : i + 1])[0]
    store.write("blocks", pos, blocks)
    store.write("active_rows", pos, active_rows)


# The memory of a channel's fit. The library's pixels are held as their uint16 stack, a block of
# active rows at a time (every row when the budget allows, else from a scratch file; either way
# each stored chunk is read once: :class:`deepdark.io.masters.StackedRows`). The per-pixel fit
# works on a block of pixels at a time, on each thread: its float (frames x pixels) arrays, about
# BYTES_PER_FRAME_PIXEL in all, are a few MB, so that the many passes a robust fit makes over them
# stay in the processor's outer caches, while each numpy call has enough work to release the
# interpreter lock for most of its time (blocks of 2**21 bytes, on two threads: 1.5x faster than
# blocks of 2**19 on 64 full-size darks, 1.2x than 2**20 on 256). The blocks do not depend on the
# threads.
STACK_BYTES_PER_FRAME_PIXEL = 2
BYTES_PER_FRAME_PIXEL = 48  # working set of the per-pixel fit: ~10 float32/bool (frames x pixels) arrays
PIXEL_BLOCK_BYTES = 2**21  # one float32 (frames x pixels) array of a block of pixels
MIN_PIXEL_BLOCK = 64  # pixels: below this, numpy's per-call cost dominates
WORK_SHARE = 0.25  # at most this share of the budget for the blocks of pixels (libraries of many frames)
HIST_SHARE = 0.25  # of the budget for pass A's residual histograms (beyond: coarse bins and a second pass)
OB_SHARE = 0.25  # of the budget for the optical black read back at once (its fit's values and validity)
OB_BYTES_PER_FRAME_PIXEL = 5
# What the plan counts stays within this share of the budget; the rest is room for what it cannot
# count (the interpreter, numpy's temporaries, HDF5's caches, memory the allocator keeps after a
# free: the more so, the more frames). Measured at 512 MB: on 256 full-size darks a plan of the
# whole budget peaked at 546 MB; on 20,000 `mini` darks a plan of 80 % at 526 MB, of 70 % at 483.
PLANNED_SHARE = 0.7
# The law's block means and the transfer's row offsets of every library frame are held when they
# take at most this share of the budget; beyond (a few thousand darks at 512 MB), read from the
# frame store a few frames at a time in each of their passes. The law's parts take at most
# another such share.
LIBRARY_SHARE = 0.25
LAW_BYTES_PER_VALUE = 64  # of a part of the law's block means: the ~8 float64 arrays it makes


def _map_bytes(K: int) -> int:
    """Bytes per pixel of what a channel's passes keep of all its pixels: the packed normal
    matrices, d1's right side and the hot-pixel reference (float64), the maps and the reduced
    chi-square (float32), the hot flags."""
    return 8 * (K * (K + 1) // 2 + 2) + 4 * (K + 1) + 1


def _pixel_block(N: int, memory_mb: float) -> int:
    """Pixels per block of the per-pixel fit: PIXEL_BLOCK_BYTES a float32 array, and within a
    share of ``memory_mb`` (MIN_PIXEL_BLOCK at the least)."""
    cached = max(MIN_PIXEL_BLOCK, PIXEL_BLOCK_BYTES // (4 * N))
    share = memory_mb * 2**20 * WORK_SHARE
    return int(max(MIN_PIXEL_BLOCK, min(cached, share // (N * BYTES_PER_FRAME_PIXEL))))


def _chunk_rows(N: int, cols: int, memory_mb: float, fixed_bytes: float = 0) -> int:
    """Active rows per block of the library's uint16 stack, so that the block and ``fixed_bytes``
    (the channel's maps, a block of pixels' working set) stay within PLANNED_SHARE of ``memory_mb``."""
    free = memory_mb * 2**20 * PLANNED_SHARE - fixed_bytes
    return max(1, int(free // (N * cols * STACK_BYTES_PER_FRAME_PIXEL)))


def _stack_plan(
    N: int, shape: tuple[int, int], K: int, memory_mb: float, held: float = 0, threads: int = 1
) -> tuple[int, int]:
    """(active rows per block of the stack, pixels per block of the per-pixel fit) of a channel of
    ``N`` library frames and K maps, fitted on ``threads`` threads. Beside the stack: ``held``
    bytes (what stage 1 measured, the residual histograms), the maps, the working sets of the
    blocks of pixels in flight and one frame (the scratch file's read buffer)."""
    R, C = shape
    pixels = _pixel_block(N, memory_mb)
    rows, step = _chunk_rows(N, C, memory_mb, _fixed_bytes(N, shape, K, held, pixels, threads)), pixels // C
    if step > 1 and rows < R:  # whole pieces of rows in every block: the same pieces whatever the blocks
        rows = max(step, rows // step * step)
    return rows, pixels


def _fixed_bytes(N: int, shape: tuple[int, int], K: int, held: float, pixels: int, threads: int) -> float:
    """What a channel's fit holds beside its stack (see :func:`_stack_plan`)."""
    R, C = shape
    return (
        held
        + R * C * (_map_bytes(K) + STACK_BYTES_PER_FRAME_PIXEL)
        + in_flight(threads) * N * pixels * BYTES_PER_FRAME_PIXEL
    )


def _fit_threads(N: int, shape: tuple[int, int], K: int, memory_mb: float, held, threads: int) -> int:
    """The most threads, up to ``threads``, whose blocks in flight and residual histograms
    (``held(threads)``: bytes) leave room for one row of the stack within the budget: more
    threads hold more at once, and the budget bounds the fit whatever the cores."""
    pixels = _pixel_block(N, memory_mb)
    room = memory_mb * 2**20 * PLANNED_SHARE - N * shape[1] * STACK_BYTES_PER_FRAME_PIXEL
    return threads_within(threads, lambda t: _fixed_bytes(N, shape, K, held(t), pixels, t), room)


class _LibraryPixels:
    """One channel's library frames, bias-subtracted, a block of pixels at a time (:meth:`blocks`),
    from the blocks of rows of their stack; the frames' pixels are read once however often they
    are gone through.

    Parameters
    ----------
    stacked
        The stack of the channel's frames (entered).
    bias
        (N, R) float32: each frame's row bias.
    pixels
        Pixels per block (whole rows where a row fits, else pieces of one row).
    """

    def __init__(self, stacked: StackedRows, bias: np.ndarray, pixels: int):
        self.stacked, self.bias, self.pixels = stacked, bias, pixels

    def blocks(self, bar=None):
        """Yield the pieces (:class:`_Piece`) of the channel, about ``pixels`` pixels each, in
        reading order; ``bar`` advances by each block of rows. A piece's raw pixels are a copy
        where the stack's read buffer is reused by the next block, so pieces may be used on
        other threads while the next block is read."""
        width, reused = self.stacked.width, len(self.stacked.blocks) > 1
        for r0, r1 in self.stacked.blocks:
            raw = self.stacked.read(r0)
            for a, b, c0, c1 in _pieces(r1 - r0, width, self.pixels):
                part = raw[:, a:b, c0:c1]
                start = (r0 + a) * width + c0
                stop = (r0 + b - 1) * width + c1
                yield _Piece(slice(start, stop), part.copy() if reused else part, self.bias[:, r0 + a : r0 + b])
            if bar is not None:
                bar.update(1)


@dataclass
class _Piece:
    """Some pixels of a channel's library frames: ``pixels`` (a slice of the channel's
    flattened active area), their ``raw`` values (N, rows, cols) uint16 and their rows' ``bias``
    (N, rows) float32."""

    pixels: slice
    raw: np.ndarray
    bias: np.ndarray

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(Y (N, P) float32 bias-subtracted, valid (N, P) bool: neither saturated nor zero)."""
        n = len(self.raw)
        Y = np.subtract(self.raw, self.bias[:, :, None], dtype=np.float32)  # one pass: no float copy of raw
        valid = (self.raw < SATURATED) & (self.raw > 0)
        return Y.reshape(n, -1), valid.reshape(n, -1)


def _pieces(rows: int, cols: int, pixels: int) -> list[tuple[int, int, int, int]]:
    """(row0, row1, col0, col1) of blocks of about ``pixels`` pixels that tile ``rows`` x ``cols``
    in reading order: whole rows when a row fits in a block, else pieces of one row."""
    if pixels >= cols:
        step = pixels // cols
        return [(a, min(rows, a + step), 0, cols) for a in range(0, rows, step)]
    return [(a, a + 1, c, min(cols, c + pixels)) for a in range(rows) for c in range(0, cols, pixels)]


@dataclass
class _Noise:
    """Noise variance of a library frame-pixel: read noise + offset + shot noise of its signal."""

    frame_var: np.ndarray  # (N,) residual variance of each frame (pass A)
    read_var: np.ndarray  # (N,) overscan variance of each frame
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


HIST_STEP = 0.02  # ADU: resolution of the residual histograms of pass A
HIST_MAX = 500.0  # ADU: their range
COARSE_BINS = 64  # bins per coarse bin of a histogram too large for its memory (see _ResidualHistograms)
MIN_PENDING = 256  # gathered bins per frame of such a histogram at the least
COUNT_BYTES = 2**23  # of the rows a histogram counts (or the cumulative counts it searches) at once
LONG_ROW = 1024  # values of a row that a bincount of its own counts as fast as a shared one


class _ResidualHistograms:
    """Per frame, a histogram of |residual| in fixed bins of HIST_STEP up to ``hist_max`` (then
    one bin for larger residuals and invalid pixels, not counted), for the bin that holds each
    frame's median (:meth:`median_bins`). The bins of blocks of pixels are gathered (uint16) and
    counted once they are as many as the bins (:func:`_count_rows`: many frames a call where a
    frame gathered few), so that counting costs about one pass over them whatever the size of
    the blocks.

    When every bin of every frame does not fit in ``max_bytes``, the first bins are counted one
    by one (as many as fit) and the rest in coarse bins of COARSE_BINS, the overflow bin in a
    column of its own (:meth:`columns_of`: float arithmetic on the bins before they are gathered,
    so that a single bincount counts them (:func:`_count_rows`); a gather from a
    lookup table cost more, 3.5 ns a value):
    a frame whose median lies in a coarse bin gets its median's bin from that coarse bin's fine
    bins, counted in a second pass over the residuals (:class:`_MedianWindow`); the bins equal
    those of the whole histogram.
    """

    def __init__(self, n_frames: int, hist_max: float, max_bytes: float | None = None):
        self.overflow = self.bins(hist_max) - 1
        fine, pending = self.plan(n_frames, hist_max, max_bytes)
        self.fine = fine  # bins counted one by one (the overflow bin's index: all)
        self.bounded = fine < self.overflow
        # the counts, the overflow bin's last
        self.hist = np.zeros((n_frames, self.columns(fine, self.overflow)), np.int32)
        self.pending = np.empty((n_frames, pending), np.uint16)
        self.n_pending = 0

    @staticmethod
    def bins(hist_max: float) -> int:
        """Bins per frame, the overflow bin included."""
        return len(np.arange(0.0, hist_max + HIST_STEP, HIST_STEP)) + 1

    @staticmethod
    def columns(fine: int, overflow: int) -> int:
        """Counted columns: ``fine`` bins, the coarse bins up to the overflow bin, and it."""
        return fine + (overflow - fine) // COARSE_BINS + 1

    @classmethod
    def plan(cls, n_frames: int, hist_max: float, max_bytes: float | None) -> tuple[int, int]:
        """(bins counted one by one, gathered bins per frame) of ``n_frames`` frames within
        ``max_bytes`` (None: no bound); at the least MIN_PENDING gathered and COARSE_BINS fine
        bins, and the overflow bin a whole number of coarse bins past the fine ones."""
        B = cls.bins(hist_max)
        if max_bytes is None or n_frames * B * 6 <= max_bytes:
            return B - 1, B
        per_frame = max_bytes / n_frames - 4 * -(-B // COARSE_BINS) - 8
        pending = max(MIN_PENDING, int(per_frame / 3 / 2))
        fine = int((per_frame - 2 * pending) / 4)
        fine -= (fine - (B - 1)) % COARSE_BINS  # down to the overflow bin's residue
        return min(B - 1, max(COARSE_BINS + (B - 1) % COARSE_BINS, fine)), pending

    @classmethod
    def bytes(cls, n_frames: int, hist_max: float, max_bytes: float | None = None) -> int:
        """Memory of the histograms of ``n_frames`` frames: counts (int32), gathered bins (uint16)."""
        fine, pending = cls.plan(n_frames, hist_max, max_bytes)
        return n_frames * (4 * cls.columns(fine, cls.bins(hist_max) - 1) + 2 * pending)

    def binned(self, residual: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """The bins (float32) of |``residual``| (N, P) float32 (overwritten) of the ``valid``
        frame-pixels: floor(|r| / step) at most the overflow bin (NaN and invalid: overflow)."""
        np.abs(residual, out=residual)
        residual /= HIST_STEP
        np.fmin(residual, self.overflow, out=residual)
        if not valid.all():
            np.maximum(residual, np.float32(self.overflow) * ~valid, out=residual)
        return residual

    def columns_of(self, bins: np.ndarray) -> np.ndarray:
        """The columns (float32, truncated when gathered) of ``bins`` (float32, overwritten: as
        :meth:`binned` gives them): ``min(b, fine + floor((b - fine) / COARSE_BINS))``, which is
        ``b`` below ``fine`` and its coarse bin from there, in exact float32 arithmetic (whole
        numbers and 64ths below 2**24); the overflow bin, a whole number of coarse bins past
        ``fine`` (:meth:`plan`), lands in the last column."""
        coarse = np.multiply(bins, np.float32(1 / COARSE_BINS))
        coarse -= np.float32(self.fine / COARSE_BINS)
        np.floor(coarse, out=coarse)
        coarse += np.float32(self.fine)
        return np.minimum(bins, coarse, out=bins)

    def add(self, residual: np.ndarray, valid: np.ndarray) -> None:
        """Count |``residual``| (N, P) float32 (overwritten) of the ``valid`` frame-pixels."""
        bins = self.binned(residual, valid)
        if self.bounded:
            bins = self.columns_of(bins)
        P = bins.shape[1]
        if self.n_pending + P > self.pending.shape[1]:
            self.flush()
        if self.pending.shape[1] < P:
            self.pending = np.empty((len(self.hist), P), np.uint16)
        self.pending[:, self.n_pending : self.n_pending + P] = bins
        self.n_pending += P

    def flush(self) -> None:
        _count_rows(self.pending[:, : self.n_pending], self.hist)
        self.n_pending = 0

    @classmethod
    def summed(cls, parts: list[_ResidualHistograms]) -> _ResidualHistograms:
        """One histogram of what ``parts`` (of the same frames and bins, at least one) counted."""
        total = parts[0]
        total.flush()
        for part in parts[1:]:
            part.flush()
            total.hist += part.hist
        return total

    def counts(self) -> np.ndarray:
        """(N, bins): the counts, without the last bin (a histogram that counts every bin)."""
        if self.bounded:
            raise ValueError("a bounded histogram does not count every bin")
        self.flush()
        return self.hist[:, :-1]

    def median_bins(self) -> tuple[np.ndarray, np.ndarray, _MedianWindow | None]:
        """(N,) the bin of each frame's median (the first whose cumulative count reaches half the
        frame's count), the frames whose median lies in a coarse bin (-1 there) and the window
        (:class:`_MedianWindow`) that finds theirs (None: none)."""
        self.flush()
        counted = self.hist[:, :-1]  # the overflow bin left out
        half = counted.sum(axis=1, dtype=np.int64) / 2.0
        column, below = np.empty(len(half), np.int64), np.empty(len(half), np.int64)
        rows = max(1, COUNT_BYTES // (8 * counted.shape[1]))  # cumulative counts (int64) of some frames at once
        for r0 in range(0, len(half), rows):
            cum = np.cumsum(counted[r0 : r0 + rows], axis=1)
            at = np.array([np.searchsorted(c, h) for c, h in zip(cum, half[r0 : r0 + rows])], dtype=np.int64)
            column[r0 : r0 + rows] = at
            below[r0 : r0 + rows] = np.where(at > 0, cum[np.arange(len(at)), np.maximum(at - 1, 0)], 0)
        beyond = np.flatnonzero(column >= self.fine)
        if not beyond.size:
            return column, beyond, None
        start = self.fine + (column[beyond] - self.fine) * COARSE_BINS
        column[beyond] = -1
        return column, beyond, _MedianWindow(self, beyond, start, below[beyond], half[beyond])


def _count_rows(values: np.ndarray, counts: np.ndarray) -> None:
    """``counts[f] += np.bincount(values[f], minlength=counts.shape[1])`` for every row ``f`` of
    ``values`` (non-negative integers, each below ``counts.shape[1]``), a few rows at a time, so
    no copy of all of ``values`` is made.

    One call per row costs microseconds, more than its values when rows are short (a histogram of
    many frames within its memory gathers a few hundred values per frame), so short rows are
    counted COUNT_BYTES at a time as one bincount of values offset by their row."""
    n, width = counts.shape
    if values.shape[1] == 0:
        return
    if values.shape[1] >= LONG_ROW:  # long rows: a call each costs nothing beside its values
        count = _row_counter(values, width)
        for f in range(n):
            counts[f] += count(f)
        return
    per_row = 8 * (values.shape[1] + width)  # the offset values and the counts, int64
    rows = max(1, COUNT_BYTES // max(per_row, 1))
    for r0 in range(0, n, rows):
        part = values[r0 : r0 + rows].astype(np.int64)
        part += (np.arange(len(part)) * width)[:, None]
        counts[r0 : r0 + rows] += np.bincount(part.ravel(), minlength=len(part) * width).reshape(len(part), width)


TORCH_GRAIN = 2**15  # values of a row past which torch's bincount checks its range on threads of its own


def _row_counter(values: np.ndarray, width: int):
    """A function that gives the counts of row ``f`` of ``values`` in ``width`` bins.

    numpy's bincount holds the interpreter lock, so that two threads count no faster than one;
    torch's does not (as fast on one thread, on int16: bins below 2**15 are the same numbers; two
    threads each counting what one does take 15 ms against numpy's 27-31 for 256 rows of 25,002
    bins). torch counts rows of up to TORCH_GRAIN values: it checks a longer
    row's range on OpenMP threads of its own, which the fit's threads would overbook (100x
    slower); such rows come only from libraries of a few frames, whose blocks are wide."""
    if (
        values.dtype == np.uint16
        and width <= 2**15
        and values.shape[1] <= TORCH_GRAIN
        and values.flags.writeable
        and min(values.strides) >= 0
    ):
        import torch  # here, not at the top: a physics job need not load torch to count

        rows = torch.from_numpy(values.view(np.int16))
        return lambda f: torch.bincount(rows[f], minlength=width).numpy()
    return lambda f: np.bincount(values[f], minlength=width)


class _MedianWindow:
    """The fine bins of one coarse bin per frame (``start`` .. + COARSE_BINS) of some ``frames``
    of a bounded :class:`_ResidualHistograms`, with the count below it (``below``) and half the
    frame's count: the second pass that finds the bin of their median."""

    def __init__(self, hist: _ResidualHistograms, frames, start, below, half):
        self.hist, self.frames, self.start, self.below, self.half = hist, frames, start, below, half
        self.counts = np.zeros((len(frames), COARSE_BINS), np.int64)

    def add(self, residual: np.ndarray, valid: np.ndarray) -> None:
        """Count the bins of |``residual``| (N, P) float32 (of all frames) in the windows."""
        b = self.hist.binned(residual[self.frames], valid[self.frames]).astype(np.uint16).astype(np.int64)
        b -= self.start[:, None]
        np.copyto(b, COARSE_BINS, where=(b < 0) | (b >= COARSE_BINS))  # outside the window: one bin past it
        counts = np.zeros((len(self.frames), COARSE_BINS + 1), np.int64)
        _count_rows(b, counts)
        self.counts += counts[:, :COARSE_BINS]

    def median_bins(self) -> np.ndarray:
        """The bin of each of the frames' median."""
        cum = self.below[:, None] + np.cumsum(self.counts, axis=1)
        return self.start + np.array([np.searchsorted(c, h) for c, h in zip(cum, self.half)], dtype=np.int64)


def _pass_a(
    pixels: _LibraryPixels, X, clip, bar, hist_max: float = HIST_MAX, hist_bytes: float | None = None, threads: int = 1
):
    """Unweighted clipped fit over all blocks of pixels: each frame's robust residual variance.

    Per frame, |residual| histograms (fixed bins, so the result does not depend on the blocks)
    give the median absolute residual; hot and RTS pixels, a few among thousands, cannot pull a
    median. The leverage of each frame in the per-pixel fit (h_f) corrects for the fitted share.
    Histograms beyond ``hist_bytes`` find some frames' medians in a second pass. Each thread
    counts into a histogram of its own (within ``hist_bytes``), and they are summed at the end."""
    N, K = X.shape
    hists = PerThread(lambda: _ResidualHistograms(N, hist_max, hist_bytes))

    def residuals(piece: _Piece) -> tuple[np.ndarray, np.ndarray]:
        Y, valid = piece.arrays()
        return _robust_fit(Y, valid, X, None, clip, chi2=False).z, valid

    def count(piece: _Piece) -> None:
        hists.get().add(*residuals(piece))

    for _ in ordered_map(count, pixels.blocks(bar), threads):
        pass
    hist = _ResidualHistograms.summed(hists.made)
    hists.made.clear()  # the other threads' histograms, now in ``hist``
    i, beyond, window = hist.median_bins()
    if window is not None:
        log.info("pass A: %d of %d frames' medians beyond the fine bins: a second pass", len(beyond), N)
        for z, valid in ordered_map(residuals, pixels.blocks(), threads):
            window.add(z, valid)
        i[beyond] = window.median_bins()
    mad = (i + 0.5) * HIST_STEP
    lev = np.einsum("fk,kl,fl->f", X, np.linalg.pinv(X.T @ X), X)
    return (MAD_SIGMA * mad) ** 2 / np.maximum(1.0 - lev, 0.05)


def _weighted_fit(Y, valid, X, noise: _Noise, clip, extra_var=None) -> _PixelFit:
    """Frame-variance weighted start, then per-pixel variances from the fitted signal."""
    start_var = noise.frame_var.astype(np.float32)[:, None]  # (N, 1): the same for every pixel
    if extra_var is not None:
        start_var = extra_var + start_var
    beta0 = _robust_fit(Y, valid, X, start_var, clip, rounds=1, chi2=False).beta
    var = np.matmul(X.astype(np.float32), beta0.astype(np.float32))
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
    t: np.ndarray  # (F,) exposure, 0 for biases
    header_T: np.ndarray  # (F,)
    members: pd.DataFrame  # frame-channels, with ``fp`` (frame position)


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
    if not dark.any():  # biases only: a model of bias frames, which need no temperature
        log.warning("camera %s: a bias-only library (%d frames): it predicts bias frames only", camera, len(files))
        return _Library(camera, channels, files, t, header_T, members)
    if not np.isfinite(header_T[dark]).all():
        raise ValueError(f"camera {camera}: library darks without CCDTEMP or SETTEMP")
    header_T = np.where(np.isfinite(header_T), header_T, np.median(header_T[dark]))
    return _Library(camera, channels, files, t, header_T, members)


def fit_physics(
    shards: Sequence[str | Path],
    out: str | Path,
    memory_mb: float = 512,
    overscan_skip: int = OVERSCAN_SKIP,
    shrink: bool = True,
    smooth_rows: int = 1,
    smooth_px: int = SMOOTH_PX,
    clip: float = PIXEL_CLIP,
    irregular_p: float = IRREGULAR_P,
    max_extrapolation: float = MAX_EXTRAPOLATION,
    cameras: Sequence[str] | None = None,
    progress: bool = True,
    scratch: str | Path | None = None,
    threads: int | None = None,
) -> Path:
    """Fit the per-pixel dark model of the DARK (and BIAS) frames of library ``shards``; write ``out``.

    ``cameras``: fit only these cameras (None: every camera of the library). Cameras are fitted
    independently, so a cluster can fit one per job and :func:`merge_physics` join the files.

    ``memory_mb`` bounds what the fit holds at once (a budget below the least a library needs
    is a warning, and the fit goes on at its least): the frame tables, the law's block means and
    the transfer's row offsets (read from a scratch file a part at a time when they would take
    more than a quarter of it; the law's parts take at most another quarter), and per channel the
    stack of its library pixels (blocks of active rows), its maps, the residual histograms and
    the working sets of the blocks of pixels in flight; the result does not depend on it. A
    library too large for one block of rows goes through a scratch file in ``scratch`` (default:
    the folder of ``out``), each stored chunk read once. The frame-state options are stored and
    reused by predictions.

    ``threads``: threads of the frame-state measurements and the per-pixel fits (None: every
    core this process may use); the result does not depend on them.
    """
    params = dict(
        overscan_skip=int(overscan_skip),
        shrink=bool(shrink),
        smooth_rows=int(smooth_rows),
        smooth_px=int(smooth_px),
        clip=float(clip),
        irregular_p=float(irregular_p),
        max_extrapolation=float(max_extrapolation),
    )
    threads = resolve_threads(threads)
    out = Path(out)
    scratch = Path(scratch) if scratch is not None else out.absolute().parent
    scratch.mkdir(parents=True, exist_ok=True)  # the output's folder may not exist yet
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(Shard(p)) for p in shards]
        _fit_library(opened, cameras, out, params, (memory_mb, threads), progress, scratch)
    return out


def _fit_library(opened, cameras, out: Path, params: dict, budget, progress: bool, scratch: Path) -> None:
    """:func:`fit_physics` of open shards; ``budget``: (memory_mb, threads)."""
    g = common_geometry(opened)
    lib = _library(opened, cameras)
    budget = (_budget_beside_tables(budget[0], lib, opened), budget[1])
    bs = max(MIN_BLOCK, g.active.shape[0] // BLOCKS)
    mem = _stage1(opened, lib, g, params, bs, progress, scratch, _stage1_threads(g, *budget))
    try:
        with atomic_path(out) as tmp, hdf5_written(tmp, libver=HDF5_FORMAT) as f:
            f.attrs.update(
                schema_version=PHYSICS_SCHEMA,
                **geometry_attrs(g),
                software=f"deepdark {__version__}",
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                params=json.dumps(params),
                nights=",".join(sorted(set(lib["night"]))),
            )
            cams = f.create_group("cameras")
            for ci, camera in enumerate(sorted(set(lib["camera"]))):
                cl = _camera_library(mem, camera, g)
                grp = cams.create_group(str(ci))
                _fit_camera(grp, cl, opened, mem, g, params, bs, budget, progress, scratch)
    finally:
        mem.close()


def _budget_beside_tables(memory_mb: float, lib: pd.DataFrame, shards) -> float:
    """What the budget leaves beside the frame tables (:func:`_table_bytes`); half the budget at
    the least."""
    return max(memory_mb - _table_bytes(lib, shards) / 2**20, memory_mb / 2)


def _table_bytes(lib: pd.DataFrame, shards) -> int:
    """The frame tables the fit holds throughout, the shards' and its library's (about 1.2 KB per
    frame-channel, mostly names and hashes: 90 MB at 20,000 darks of four channels)."""
    return int(lib.memory_usage(deep=True).sum() + sum(s.table.memory_usage(deep=True).sum() for s in shards))


@dataclass
class _CameraFit:
    """What the per-pixel fits of a camera's channels share: its library, its law and the design."""

    cl: _Library
    shards: Sequence[Shard]
    mem: _Members
    shape: tuple[int, int]  # the active area (R, C)
    bs: int  # side of the law's blocks
    params: dict
    memory_mb: float
    progress: bool
    scratch: Path  # folder of the scratch file of a library too large for one block of rows
    law: Law
    T: np.ndarray  # (F,) every library frame's temperature (header's for biases)
    block_beta: np.ndarray  # (K, channels x blocks): the law's block maps
    X: np.ndarray  # (F, K) the design of the per-pixel fit
    x_ref: np.ndarray  # (K,) the design at T0 and the longest exposure: the hot-pixel reference
    transfers: dict[str, Transfer]  # per channel: how far the overscan's row offsets are trusted
    threads: int  # of the per-pixel fits


def _fit_camera(grp, cl: _Library, shards, mem: _Members, g: Geometry, params, bs, budget, progress, scratch):
    """One camera into ``grp``: its law (stage 2) and exposure coverage as attributes, the maps of
    every channel (stages 3 and 4) and the library's frame table. ``budget``: (memory_mb, threads)."""
    memory_mb, threads = budget
    per_frame = cl.members.drop_duplicates("file").sort_values("fp").reset_index(drop=True)
    dark_exptimes = _exposure_coverage(cl)
    law, T, block_beta = _camera_law(cl, mem, per_frame, memory_mb)
    transfers = _library_transfers(cl, mem, law.design(T, cl.t), memory_mb)
    if any(tr.used for tr in transfers.values()):
        _apply_transfers(cl, mem, transfers, bs)
        law, T, block_beta = _camera_law(cl, mem, per_frame, memory_mb)  # on the blocks of the new row bias
    _write_camera_attrs(grp, cl, per_frame, law, T, dark_exptimes)
    t_ref = max(dark_exptimes, default=0.0)
    x_ref = law.design([law.T0], [t_ref])[0]
    X = law.design(T, cl.t)
    cam = _CameraFit(
        cl,
        shards,
        mem,
        g.active.shape,
        bs,
        params,
        memory_mb,
        progress,
        scratch,
        law,
        T,
        block_beta,
        X,
        x_ref,
        transfers,
        threads,
    )
    tables = [_fit_channel(grp, cam, j, ch) for j, ch in enumerate(cl.channels)]
    _write_frame_table(grp.create_group("frames"), tables)


def _exposure_coverage(cl: _Library) -> list[float]:
    """The library's dark exposure times (sorted), with a warning when glow cannot be told from
    dark current (one exposure time and no bias frames)."""
    dark = cl.t > 0
    dark_exptimes = sorted(set(np.round(cl.t[dark], 6).tolist()))
    if dark_exptimes and not _separable(cl, dark_exptimes):
        log.warning(
            "camera %s: library has only %g s darks and no bias frames: glow cannot be told from dark"
            " current; only %g s can be predicted",
            cl.camera,
            dark_exptimes[0],
            dark_exptimes[0],
        )
    return dark_exptimes


def _has_bias(cl: _Library) -> bool:
    return bool((~(cl.t > 0)).any())


def _separable(cl: _Library, dark_exptimes: list[float]) -> bool:
    """Exposure-scaled and per-readout signals are told apart by two exposure times or by biases."""
    return len(dark_exptimes) >= 2 or _has_bias(cl)


def _camera_law(cl: _Library, mem: _Members, per_frame, memory_mb: float) -> tuple[Law, np.ndarray, np.ndarray]:
    """Stage 2: the law and every frame's temperature from the block means of all channels (a
    frame has one temperature); biases keep their header's. A bias-only library has a law without
    dark components (:class:`Law`)."""
    t, header_T, dark = cl.t, cl.header_T, cl.t > 0
    members = [_channel_members(cl, ch) for ch in cl.channels]
    share = memory_mb * 2**20 * LIBRARY_SHARE
    Y = _BlockMeans(mem.store, members, share)
    part_values = max(LAW_VALUES, int(share // LAW_BYTES_PER_VALUE))  # large parts: few reads of every frame
    if not dark.any():
        known = header_T[np.isfinite(header_T)]
        T0 = float(np.round(np.median(known), 1)) if known.size else math.nan
        return Law(T0, math.nan), header_T.astype(np.float64), mean_rows(Y, np.arange(len(cl.files)), part_values)[None]
    law, T, block_beta = fit_law(Y, t, header_T, frame_setpoints(per_frame), part_values=part_values)
    T[~dark] = header_T[~dark]
    log.info(
        "camera %s: T0 %.2f C, tau1 %.2f C, tau2 %.2f C, %d frames",
        cl.camera,
        law.T0,
        law.tau1,
        law.tau2,
        len(cl.files),
    )
    return law, T, block_beta


def _channel_members(cl: _Library, ch: str) -> np.ndarray:
    """Indices (into the members' arrays) of channel ``ch``'s library frames, in frame order."""
    return cl.members[cl.members["channel"] == ch].sort_values("fp").index.to_numpy()


def _library_transfers(cl: _Library, mem: _Members, X: np.ndarray, memory_mb: float) -> dict[str, Transfer]:
    """Per channel: how much of the overscan's per-row offset appears in the active rows
    (:func:`measure_transfer` on the library frames, the per-pixel design ``X`` projected out)."""
    out = {}
    for ch in cl.channels:
        mi = _channel_members(cl, ch)
        offsets = _Records(mem.store, "bias", mi, minus=mem.level[mi])
        active_rows = _Records(mem.store, "active_rows", mi)
        read_var = float(np.mean(mem.read_var[mi]))
        out[ch] = measure_transfer(active_rows, offsets, X, read_var, memory_mb * 2**20 * LIBRARY_SHARE)
        log.info("camera %s channel %s: overscan row transfer %s", cl.camera, ch, out[ch].describe())
    return out


def _apply_transfers(cl: _Library, mem: _Members, transfers: dict[str, Transfer], bs: int) -> None:
    """The library frames' row bias (and what stage 1 derived from it: the OB columns minus the
    bias, the block means) by the transfer coefficient of each channel that uses it, a part of
    the channel's frames at a time."""
    R, nbr = mem.store.fields["bias"][1][0], mem.store.fields["blocks"][1][0]
    step = max(1, FRAME_STORE_BATCH // (mem.store.nbytes("ob") + mem.store.nbytes("blocks") + 12 * R))
    for ch, tr in transfers.items():
        if not tr.used:
            continue
        channel = _channel_members(cl, ch)
        for f0 in range(0, len(channel), step):
            mi = channel[f0 : f0 + step]
            old = mem.store.read("bias", mi)
            new = transferred_bias(old, mem.level[mi], np.full(len(mi), tr.coefficient))
            mem.store.write("bias", mi, new)
            ob = mem.store.read("ob", mi)
            cols = ob[:, : R * mem.ob_cols].reshape(len(mi), R, mem.ob_cols) + (old - new)[:, :, None]
            ob[:, : R * mem.ob_cols] = cols.reshape(len(mi), -1)
            mem.store.write("ob", mi, ob)
            shift = (new - old)[:, : nbr * bs].reshape(len(mi), nbr, bs).mean(axis=2)
            blocks = mem.store.read("blocks", mi)
            blocks -= shift[:, :, None]
            mem.store.write("blocks", mi, blocks)


def _write_camera_attrs(grp, cl: _Library, per_frame: pd.DataFrame, law: Law, T: np.ndarray, dark_exptimes) -> None:
    """The camera's law, the headers' scatter about the fitted temperatures and what the library
    covers."""
    header_T, dark = cl.header_T, cl.t > 0
    setpoints = frame_setpoints(per_frame[dark])
    hdr = header_T[dark] - T[dark]
    header_sigma = float(np.sqrt(np.mean(hdr**2))) if dark.sum() > 2 else float("nan")
    grp.attrs.update(
        camera=cl.camera,
        T0=law.T0,
        tau1=law.tau1,
        tau2=law.tau2,
        components=law.components,
        header_sigma=header_sigma,
        dark_exptimes=np.asarray(dark_exptimes, float),
        has_bias=_has_bias(cl),
        separable=_separable(cl, dark_exptimes),
        n_frames=len(cl.files),
        n_setpoints=len(set(np.round(setpoints, 1))),
        channels=json.dumps(cl.channels),
    )


@dataclass
class _PassB:
    """The weighted per-pixel fit of a channel: maps, their normal equations, the hot pixels' laws."""

    A: np.ndarray | None  # packed normal matrices (pairs, P); None once the smooth prior used them
    b0: np.ndarray | None  # (P,) d1's right side (all the smooth prior needs of b)
    beta: np.ndarray  # (K, P) float32
    chi2: np.ndarray  # (P,) float32
    hot: np.ndarray  # (P,) bool
    hot_index: np.ndarray  # (n,) pixels with a hot-pixel fit
    hot_tau: np.ndarray  # (n,) their doubling temperatures (NaN: no fit)
    hot_coef: np.ndarray  # (n, K)


def _fit_channel(grp, cam: _CameraFit, j: int, ch: str) -> pd.DataFrame:
    """Stages 3 and 4 for channel ``ch`` (the ``j``-th): pass A (the frames' noise), pass B (the
    weighted maps, hot pixels), the smooth prior, the OB maps; written to ``channel_j`` of
    ``grp``. Returns the channel's rows of the library frame table."""
    (R, C), K = cam.shape, cam.law.K
    sel = cam.cl.members[cam.cl.members["channel"] == ch].sort_values("fp").copy()
    sel["pos"] = np.arange(len(sel))
    N, mi = len(sel), sel.index.to_numpy()
    read_var, row_var = cam.mem.read_var[mi], cam.mem.row_var[mi]
    typ = _hot_reference(cam, j)
    if cam.law.components:  # the typical pixel's signal, for the photon transfer curve
        mean_sig = _median_block_means(cam.mem.store, mi)
    # held beside the stack: the channel's row bias, the frame-channels' scalars, each thread's
    # histograms (HIST_SHARE of the budget in all)
    base = N * cam.mem.store.nbytes("bias") + 3 * cam.mem.level.nbytes

    def hist_bytes(threads: int) -> float:  # each thread's histograms
        return cam.memory_mb * 2**20 * HIST_SHARE / threads

    def held(threads: int) -> float:
        return base + threads * _ResidualHistograms.bytes(N, HIST_MAX, hist_bytes(threads))

    threads = _fit_threads(N, (R, C), K, cam.memory_mb, held, cam.threads)
    if threads < cam.threads:
        log.info("camera %s channel %s: %d thread(s) within %g MB", cam.cl.camera, ch, threads, cam.memory_mb)
        cam = replace(cam, threads=threads)
    rows, pixels = _stack_plan(N, (R, C), K, cam.memory_mb, held(threads), threads)
    _warn_over_budget(cam, ch, N, rows, _fixed_bytes(N, (R, C), K, held(threads), pixels, threads))
    with StackedRows(cam.shards, sel, sel["pos"].to_numpy(), rows, scratch=cam.scratch) as stacked:
        library = _LibraryPixels(stacked, cam.mem.store.read("bias", mi), pixels)
        bar = tqdm(
            total=2 * len(stacked.blocks),
            desc=f"physics: {cam.cl.camera} channel {ch}",
            unit="block",
            disable=None if cam.progress else True,
        )
        frame_var = _pass_a(library, cam.X, cam.params["clip"], bar, hist_bytes=hist_bytes(threads), threads=threads)
        if cam.law.components:
            noise = _Noise.from_pass_a(frame_var, read_var, mean_sig)
        else:  # biases carry no signal whose shot noise a photon transfer curve could measure
            noise = _Noise(frame_var, read_var)
        fit = _pass_b(cam, library, noise, typ, read_var, bar)
        bar.close()
    maps, irregular = _smoothed_maps(fit, cam.shape, K, cam.params)
    fit.A = fit.b0 = None  # the normal equations are large and no longer needed
    cg = grp.create_group(f"channel_{j}")
    _write_channel(cg, ch, noise, fit, maps, irregular, K, cam.shape)
    _write_transfer(cg, cam.transfers[ch])
    del maps, irregular, fit
    if cam.mem.ob_cols:  # a geometry without optical black has no OB maps
        og = cg.create_group("ob")
        plan = (pixels, cam.memory_mb)
        _fit_ob(og, cam.mem, mi, cam.X, noise, row_var, cam.x_ref, read_var, cam.params, K, cam.shape, plan)
    return _frame_rows(cam, sel, ch, frame_var, read_var, row_var)


def _warn_over_budget(cam: _CameraFit, ch: str, N: int, rows: int, fixed: float) -> None:
    """A warning when even the least plan of a channel (one thread, blocks of pixels and of rows
    at their least) exceeds what the budget lets it count: what the fit must hold of every frame
    (its row bias, a block of pixels' working set) grows with the library, and 20,000 full-size
    darks need more than 512 MB."""
    need = fixed + rows * N * cam.shape[1] * STACK_BYTES_PER_FRAME_PIXEL
    if need > cam.memory_mb * 2**20 * PLANNED_SHARE:
        log.warning(
            "camera %s channel %s: %d library frames need about %.0f MB at the least, more than the %.0f MB"
            " the memory budget leaves the fit: it goes on at its least and may exceed the budget (a larger"
            " --memory-mb avoids that)",
            cam.cl.camera,
            ch,
            N,
            need / 2**20,
            cam.memory_mb * PLANNED_SHARE,
        )


def _median_block_means(store: _FrameStore, positions: np.ndarray) -> np.ndarray:
    """Each frame-channel's median block mean, read FRAME_STORE_BATCH bytes of records at a time."""
    step = max(1, FRAME_STORE_BATCH // store.nbytes("blocks"))
    parts = (store.read("blocks", positions[f : f + step]) for f in range(0, len(positions), step))
    return np.concatenate([np.median(p.reshape(len(p), -1), axis=1) for p in parts])


def _write_transfer(cg, tr: Transfer) -> None:
    """The channel's overscan row transfer (:mod:`deepdark.physics.transfer`) as attributes."""
    cg.attrs.update(
        transfer=tr.coefficient,
        transfer_sigma=tr.sigma,
        transfer_residual_var=tr.residual_var,
        transfer_used=tr.used,
        transfer_frames=tr.frames,
        transfer_gain=tr.gain,
    )


def _hot_reference(cam: _CameraFit, j: int) -> np.ndarray:
    """(R*C,): the dark at (T0, longest exposure) of the law's blocks of channel ``j``, per pixel:
    the reference of the hot-pixel test."""
    (R, C), K, bs = cam.shape, cam.law.K, cam.bs
    nbr, nbc = R // bs, C // bs
    bb = cam.block_beta[:, j * nbr * nbc : (j + 1) * nbr * nbc].reshape(K, nbr, nbc)
    typ_b = np.einsum("k,kij->ij", cam.x_ref[:-1], bb[:-1])
    return typ_b[np.minimum(np.arange(R) // bs, nbr - 1)][:, np.minimum(np.arange(C) // bs, nbc - 1)].ravel()


def _pass_b(cam: _CameraFit, library: _LibraryPixels, noise: _Noise, typ, read_var, bar) -> _PassB:
    """Pass B over all blocks of pixels: the noise-weighted clipped fit of every pixel, and a law
    of their own for pixels whose dark at the reference exceeds ``HOT_FACTOR`` times their block's."""
    (R, C), K = cam.shape, cam.law.K
    A = np.zeros((len(_pairs(K)), R * C))
    b0 = np.zeros(R * C)  # only d1's right side is needed later
    beta = np.zeros((K, R * C), np.float32)
    chi2 = np.zeros(R * C, np.float32)
    hot = np.zeros(R * C, bool)
    hot_laws = []  # per block of pixels with hot pixels: their doubling temperatures and coefficients
    floor = 10 * math.sqrt(float(np.mean(read_var)))
    # a block's hot-pixel fits within half its working set: its frames and fit stay alive beside;
    # their grid's designs, shared by every block, held within a quarter
    max_bytes = len(cam.T) * library.pixels * BYTES_PER_FRAME_PIXEL / 2
    grid = HotGrid(cam.T, cam.cl.t, cam.law, max_bytes / 2)

    def fit_block(piece: _Piece):
        sl, (Y, valid) = piece.pixels, piece.arrays()
        fit = _weighted_fit(Y, valid, cam.X, noise, cam.params["clip"])
        S_ref = cam.x_ref[:-1] @ fit.beta[:-1]
        h = np.flatnonzero(S_ref > HOT_FACTOR * np.maximum(typ[sl], 0) + floor)
        if not h.size:
            return sl, fit, h, None
        # the hot pixels' own laws, here: their frames held for a fit at the end took 10 bytes
        # per frame and hot pixel (GBs for thousands of hot pixels at 20,000 darks)
        pixels = (Y[:, h], valid[:, h], fit.keep[:, h], fit.var[:, h])
        return sl, fit, h, _hot_fits(*pixels, grid, noise, cam.params["clip"], max_bytes)

    for sl, fit, h, hot_law in ordered_map(fit_block, library.blocks(bar), cam.threads):
        A[:, sl], b0[sl], beta[:, sl], chi2[sl] = fit.A, fit.b[0], fit.beta, fit.chi2
        if h.size:
            hot[sl.start + h] = True
            hot_laws.append(hot_law)
    hot_index = np.flatnonzero(hot)
    tau = np.concatenate([tau for tau, _ in hot_laws]) if hot_laws else np.zeros(0)
    coef = np.concatenate([coef for _, coef in hot_laws]) if hot_laws else np.zeros((0, K))
    return _PassB(A, b0, beta, chi2, hot, hot_index, tau, coef)


def _smoothed_maps(fit: _PassB, shape, K: int, params) -> tuple[np.ndarray, np.ndarray]:
    """Stage 4, the smooth prior (``smooth_px`` > 0): the maps and which pixels keep their own fit."""
    R, C = shape
    if params["smooth_px"] > 0 and K > 1:  # a bias-only library has nothing to smooth towards
        return smooth_prior(
            fit.A, fit.b0, fit.beta, fit.chi2, fit.hot, (R, C), K, params["smooth_px"], params["irregular_p"]
        )
    return fit.beta, np.ones(R * C, bool)


def _write_channel(cg, ch: str, noise: _Noise, fit: _PassB, maps, irregular, K: int, shape) -> None:
    """A channel's maps, flags (1: hot, 2: irregular), reduced chi-square and hot-pixel laws."""
    R, C = shape
    cg.attrs.update(
        channel=ch,
        inv_gain=np.nan if noise.inv_gain is None else noise.inv_gain,
        noise_offset=noise.offset,
        irregular_fraction=float(irregular.mean()),
        hot_pixels=int(fit.hot.sum()),
    )
    _write_maps(cg, maps, K, (R, C))
    flags = (fit.hot.astype(np.uint8) | (irregular.astype(np.uint8) << 1)).reshape(R, C)
    cg.create_dataset("flags", data=flags, compression="gzip", shuffle=True)
    chi2 = np.minimum(fit.chi2, np.finfo(np.float16).max)  # a dead pixel's misfit would overflow float16
    cg.create_dataset("chi2", data=chi2.reshape(R, C).astype(np.float16), compression="gzip", shuffle=True)
    good = np.isfinite(fit.hot_tau)
    cg.create_dataset("hot_index", data=fit.hot_index[good].astype(np.int64))
    cg.create_dataset("hot_tau", data=fit.hot_tau[good].astype(np.float32))
    cg.create_dataset("hot_coef", data=fit.hot_coef[good].astype(np.float32))


def _frame_rows(cam: _CameraFit, sel: pd.DataFrame, ch: str, frame_var, read_var, row_var) -> pd.DataFrame:
    """The channel's rows of the library frame table: headers, fitted temperature, noise."""
    fp = sel["fp"].to_numpy()
    return pd.DataFrame(
        dict(
            file=sel["file"].to_numpy(),
            channel=ch,
            night=sel["night"].to_numpy(),
            imagetyp=sel["imagetyp"].to_numpy(),
            exptime=cam.cl.t[fp].astype(float),
            ccdtemp=sel["ccdtemp"].to_numpy(float),
            settemp=sel["settemp"].to_numpy(float),
            teff=cam.T[fp].astype(float),
            noise_var=np.asarray(frame_var, float),
            read_var=np.asarray(read_var, float),
            row_var=np.asarray(row_var, float),
            bias_level=cam.mem.level[sel.index.to_numpy()].astype(float),
        )
    )


def _write_frame_table(tg, parts: list[pd.DataFrame]) -> None:
    tab = pd.concat(parts, ignore_index=True)
    for col in tab:
        v = tab[col].to_numpy()
        tg.create_dataset(col, data=v.astype(h5py.string_dtype()) if v.dtype == object else v)


def _fit_ob(og, mem: _Members, mi, X, noise: _Noise, row_var, x_ref, read_var, params, K, shape, plan):
    """Per-pixel maps of the optical-black columns and rows (no smoothing: they serve T_eff),
    fitted ``pixels`` at a time, read from the frame store a part of them at a time within a
    share of ``memory_mb`` (``plan``: (pixels, memory_mb))."""
    R, C = shape
    N = len(mi)
    ncol, nrow = mem.ob_cols, mem.ob_rows
    pixels, memory_mb = plan
    P = R * ncol + nrow * C
    part = pixels * max(1, int(memory_mb * 2**20 * OB_SHARE // (N * pixels * OB_BYTES_PER_FRAME_PIXEL)))
    beta, chi2, n = np.empty((K, P)), np.empty(P, np.float32), np.empty(P, np.int64)
    for c0 in range(0, P, part):
        Y = mem.store.read("ob", mi, slice(c0, min(P, c0 + part)))
        valid = mem.store.read("ob_valid", mi, slice(c0, min(P, c0 + part)))
        for p0 in range(c0, min(P, c0 + part), pixels):
            sl = slice(p0, min(P, p0 + pixels))
            # OB rows carry their frame's unknown row offsets: extra noise of variance row_var
            extra = np.zeros((N, sl.stop - p0), np.float32)
            extra[:, max(0, R * ncol - p0) :] = row_var[:, None]
            at = slice(p0 - c0, sl.stop - c0)
            fit = _weighted_fit(Y[:, at], valid[:, at], X, noise, params["clip"], extra_var=extra)
            beta[:, sl], chi2[sl], n[sl] = fit.beta, fit.chi2, fit.n
    S_ref = x_ref[:-1] @ beta[:-1]
    med = float(np.median(S_ref))
    use = (S_ref < HOT_FACTOR * max(med, 0) + 10 * math.sqrt(float(np.mean(read_var)))) & (chi2 < 4) & (n >= K + 2)
    parts = {"cols": (0, R * ncol, (R, ncol)), "rows": (R * ncol, R * ncol + nrow * C, (nrow, C))}
    for name, (a, z, sh) in parts.items():
        sg = og.create_group(name)
        _write_maps(sg, beta[:, a:z], K, sh)
        sg.create_dataset("use", data=use[a:z].reshape(sh))


def _write_maps(grp, maps: np.ndarray, K: int, shape):
    for name, m in zip(_map_names(K), maps):
        grp.create_dataset(name, data=np.asarray(m, np.float32).reshape(shape))


def _map_names(K: int) -> list[str]:
    return {3: ["d1", "d2", "g"], 2: ["d1", "g"], 1: ["g"]}[K]
