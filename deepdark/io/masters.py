"""Master-dark files: the per-pixel median darks of a dark library (the paper's traditional
method, 3.2), how they are computed and written, and how a frame-channel finds its master.

Masters are made per camera, channel and exposure time: over all temperatures (kind ``all``)
and per temperature setpoint (kind ``temp``). Each covers the whole active area of its channel
so that it can correct every active pixel, and is evaluated inside the model window like the
model.

Medians are streamed (:func:`streamed_medians`): a block of rows of every library frame at a
time, sized to a memory budget, so a library of thousands of full frames never sits in memory
at once. Each frame's stored chunk (its whole active area) is read and decoded once: when one
block holds every row, straight into the block; otherwise the frames go once through a scratch
file laid out block by block, from which each block is one contiguous read (:class:`StackedRows`).
The time is then linear in the number of frames whatever the budget (the scratch file holds the
family's frames uncompressed, 2.2 MB per KAF-4320 channel, and leaves no name behind). Within a
block, slabs of rows are transposed so that each pixel's frames are contiguous and sorted in
place (numpy's vectorised sort): each setpoint's frames, then all, give the middle values, equal
to ``np.median``'s to the bit.

Each file records the library frames that went in (group ``frames``, :attr:`Masters.frames`):
one row per frame, with its name, the hash of its file and of its pixels and header facts, its
night, shard, camera, image type, exposure time, setpoint, CCD temperature and date;
:meth:`Masters.inputs` gives the frames of one master.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from tqdm import tqdm

from deepdark.io.atomic import atomic_path
from deepdark.io.errors import CorruptFileError, InputError
from deepdark.io.geometry import Geometry, layout_mismatch
from deepdark.io.shards import (
    HDF5_FORMAT,
    TEXT_CHECKSUM,
    Shard,
    closed_on_error,
    geometry_attrs,
    hdf5_written,
    read_checked,
    stored_geometry,
    text_digest,
)
from deepdark.io.tables import common_geometry, frame_setpoints, library_table

MASTER_SCHEMA = 1
# Bytes per frame-pixel of a block: its uint16 stack. The medians sort a transposed copy of a
# slab of it: at most SLAB_BYTES (a size the caches like), and at most SLAB_SHARE of the budget.
MEDIAN_BYTES_PER_FRAME_PIXEL = 2
SLAB_BYTES = 2**20
SLAB_SHARE = 0.2
# Copies of a slab alive while it is sorted, in slab sizes: the lanes, a group's uint32 keys and
# its sorted values.
_SLAB_COPIES = 4
# Values per lane of the tagged sort of few frames, and each pixel's tag (its place in the lane).
_PACKED_LANE = 32
_LANE_TAGS = np.arange(_PACKED_LANE, dtype=np.uint32) << 16
# Strips (a1) read per h5py call when the bias levels are taken.
_STRIP_ROWS_PER_READ = 4096
# The record of the library frames that went into the masters: group ``frames``, one row per frame.
FRAMES_GROUP = "frames"
FRAME_COLUMNS = {
    "file": h5py.string_dtype(),  # the raw file's name as the operating system gives it (bytes)
    "file_hash": h5py.string_dtype(),  # xxh3-128 of the raw file
    "frame_hash": h5py.string_dtype(),  # xxh3-128 of its pixels and header facts
    "night": h5py.string_dtype(),
    "shard": h5py.string_dtype(),  # name of the shard it was read from
    "camera": h5py.string_dtype(),
    "imagetyp": h5py.string_dtype(),
    "exptime": np.float64,
    "setpoint": np.float64,
    "ccdtemp": np.float64,
    "date_obs": h5py.string_dtype(),
}


class MissingMaster(InputError):
    """The library has no master dark of the kind asked for a frame-channel; one line."""


class Masters:
    """Read access to a master-dark file: look up the master for a frame-channel, and which
    library frames went into it (:attr:`frames`, :meth:`inputs`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.f = h5py.File(self.path, "r")
        with closed_on_error(self.f):
            self._read_header()

    def _read_header(self) -> None:
        """The file's geometry, setpoints, table of masters and record of frames, checked."""
        if int(self.f.attrs.get("schema_version", -1)) != MASTER_SCHEMA:
            raise InputError(f"{self.path}: not a deepdark master-dark file of schema {MASTER_SCHEMA}")
        self.geometry = stored_geometry(self.f, self.path)
        self.setpoints = [float(x) for x in self.f.attrs["setpoints"]]
        grp = self.f["table"]
        self.table = pd.DataFrame({c: grp[c][()] for c in grp})
        for c in ("kind", "camera", "channel"):
            self.table[c] = [v.decode() if isinstance(v, bytes) else v for v in self.table[c]]
        self._cache: dict[int, np.ndarray] = {}
        self.frames = self._read_frames() if FRAMES_GROUP in self.f else None

    def _read_frames(self) -> pd.DataFrame:
        """The ``frames`` record: names decoded as the operating system gives them, text
        checksums verified."""
        grp, columns = self.f[FRAMES_GROUP], {}
        for col in FRAME_COLUMNS:
            values = read_checked(self.path, grp[col])
            if values.dtype == object:
                stored = grp[col].attrs.get(TEXT_CHECKSUM)
                if stored is not None and text_digest(values) != stored:
                    raise CorruptFileError(f"{self.path}: the strings of {grp[col].name} fail their checksum")
                decode = os.fsdecode if col in ("file", "shard") else bytes.decode
                values = np.array([decode(v) if isinstance(v, bytes) else v for v in values], dtype=object)
            columns[col] = values
        return pd.DataFrame(columns)

    def check_geometry(self, g: Geometry) -> None:
        """An :class:`InputError` naming the file when its masters are not of data of geometry ``g``."""
        why = layout_mismatch(self.geometry, g)
        if why:
            raise InputError(f"{self.path}: master darks of {why}")

    def inputs(self, i: int) -> pd.DataFrame:
        """The library frames that master ``i`` (a row of :attr:`table`) is the median of: the
        frames of its camera and exposure time, and of its setpoint for kind ``temp``.

        Parameters
        ----------
        i
            Row of :attr:`table`, the master's index in dataset ``master``.
        """
        if self.frames is None:
            raise InputError(f"{self.path}: written before master-dark files recorded their frames")
        m, t = self.table.iloc[i], self.frames
        sel = (t["camera"] == m["camera"]) & np.isclose(t["exptime"], m["exptime"])
        if m["kind"] == "temp":
            sel &= np.isclose(t["setpoint"], m["setpoint"])
        return t[sel.to_numpy()].reset_index(drop=True)

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def lookup(
        self, kind: str, camera: str, channel: str, exptime: float, setpoint: float = np.nan
    ) -> np.ndarray | None:
        """The master (ADU, active area) for a frame-channel, or None when the library has none.

        An exposure time missing from the library is served by the nearest one, its dark part
        (master minus bias) scaled by the exposure ratio: the classical scaled dark.
        """
        t = self.table
        sel = t[(t["kind"] == kind) & (t["camera"] == camera) & (t["channel"] == channel)]
        if kind == "temp":
            sel = sel[np.isclose(sel["setpoint"], setpoint)]
        if sel.empty:
            return None
        i = int((sel["exptime"] - exptime).abs().idxmin())
        master = self._load(i)
        t0 = float(t.at[i, "exptime"])
        if np.isclose(t0, exptime):
            return master
        bias = float(t.at[i, "bias"])
        return bias + (master - bias) * (exptime / t0)

    def for_frames(self, table: pd.DataFrame, kind: str, strict: bool = True) -> list[np.ndarray | None]:
        """The master dark (ADU, active area) of every row of a frame table, by :meth:`lookup`.

        A row's setpoint is its SETTEMP, else its CCDTEMP rounded to the nearest setpoint of the
        library (:func:`deepdark.io.tables.frame_setpoints`). A row the library has no master
        for raises :class:`MissingMaster` (the message names it), or gives None when not ``strict``.
        """
        setpoints = frame_setpoints(table, self.setpoints)
        out = []
        for camera, channel, exptime, sp in zip(table["camera"], table["channel"], table["exptime"], setpoints):
            master = self.lookup(kind, camera, channel, exptime, sp)
            if master is None and strict:
                raise MissingMaster(
                    f"no {kind} master dark for camera {camera} channel {channel} at {sp:g} C in {self.path}"
                )
            out.append(master)
        return out

    def _load(self, i: int) -> np.ndarray:
        if i not in self._cache:
            self._cache[i] = self.f["master"][i]
        return self._cache[i]


def streamed_medians(
    shards: Sequence[Shard],
    frames: pd.DataFrame,
    memory_mb: float,
    rows: slice = slice(None),
    cols: slice = slice(None),
    group_by: str | None = None,
    scratch: str | Path | None = None,
) -> tuple[np.ndarray, dict]:
    """Per-pixel medians (float32) of the active areas of ``frames``, a block of rows at a time.

    Parameters
    ----------
    shards
        Open shards.
    frames
        Rows of a library table (:func:`deepdark.io.tables.library_table`): ``shard_no`` (into
        ``shards``) and ``row`` (of that shard's table), DARK frame-channels.
    memory_mb
        Budget for the block of rows of every frame and the copies its medians work on (see the
        module docstring), one row at the least.
    rows, cols
        The part of the active area (slices of step 1): the whole of it by default.
    group_by
        A column of ``frames``: also the median over each of its values' frames.
    scratch
        Folder of the scratch file a library too large for one block goes through (the system's
        temporary folder by default); the file has no name and vanishes when closed, whatever happens.

    Returns
    -------
    The median over all ``frames``, and ``{value: median over its frames}`` (sorted by value;
    empty without ``group_by``). Each stored chunk is read and decoded once whatever the blocks
    and groups.
    """
    labels = frames[group_by].to_numpy() if group_by else np.zeros(len(frames))
    keys = sorted(set(labels)) if group_by else []
    # The stack holds the frames grouped by label (each group a run of frames) and is read in
    # file order: position[k] is where the k-th frame read goes.
    order = np.argsort(labels, kind="stable")
    groups = [(k, slice(int(a), int(b))) for k, a, b in _runs(labels[order])] if group_by else []
    position = np.empty(len(frames), dtype=np.int64)
    position[order] = np.arange(len(frames))
    n_rows, n_cols = shards[0].geometry.active.shape
    r_start, r_stop, _ = rows.indices(n_rows)
    c_start, c_stop, _ = cols.indices(n_cols)
    height, width = r_stop - r_start, c_stop - c_start
    plan = _BlockPlan.make(memory_mb, len(frames), height, width, len(keys))
    overall = np.empty((height, width), dtype=np.float32)
    per_group = {k: np.empty_like(overall) for k in keys}
    with StackedRows(shards, frames, position, plan.block, rows, cols, scratch) as stacked:
        for r0, _ in stacked.blocks:
            _block_medians(stacked.read(r0), groups, plan.slab_rows, overall, per_group, r0)
    return overall, per_group


class StackedRows:
    """The active areas of library frames stacked (frames, rows, cols), uint16, a block of rows
    at a time, each stored chunk read and decoded once however often the blocks are read.

    When one block holds every row, the frames are read straight into it and it stays in
    memory. Otherwise they go once through a scratch file laid out block by block (block ``b``
    is the stack of every frame's rows of that block), from which each block is one contiguous
    read; the file has no name and vanishes when closed, whatever happens. Use as a context
    manager: the frames are read on entry.

    Parameters
    ----------
    shards
        Open shards.
    frames
        Rows of a library table (:func:`deepdark.io.tables.library_table`): ``shard_no`` (into
        ``shards``) and ``row`` (of that shard's table).
    position
        Where each row of ``frames`` goes in the stack (a permutation of its positions).
    block
        Rows per block.
    rows, cols
        The part of the active area (slices of step 1): the whole of it by default.
    scratch
        Folder of the scratch file (the system's temporary folder by default).
    """

    def __init__(
        self,
        shards: Sequence[Shard],
        frames: pd.DataFrame,
        position: np.ndarray,
        block: int,
        rows: slice = slice(None),
        cols: slice = slice(None),
        scratch: str | Path | None = None,
    ):
        n_rows, n_cols = shards[0].geometry.active.shape
        r_start, r_stop, _ = rows.indices(n_rows)
        c_start, c_stop, _ = cols.indices(n_cols)
        self.area = (slice(r_start, r_stop), slice(c_start, c_stop))
        self.n_frames, self.height, self.width = len(frames), r_stop - r_start, c_stop - c_start
        self.block = int(max(1, min(block, self.height)))
        self.blocks = [(r0, min(self.height, r0 + self.block)) for r0 in range(0, self.height, self.block)]
        self._sources = _sources(shards, frames, np.asarray(position))
        self._scratch = scratch
        self._stack: np.ndarray | None = None  # the one block, or the read buffer of the scratch file's
        self._spill = None

    def __enter__(self) -> StackedRows:
        if len(self.blocks) == 1:  # one block: every frame's chunk straight into the stack
            self._stack = np.empty((self.n_frames, self.height, self.width), dtype=np.uint16)
            for shard, index, at in self._sources:
                _read_into(shard, index, self.area, self._stack[at : at + 1])
            return self
        self._spill = tempfile.TemporaryFile(dir=self._scratch, prefix=".deepdark-stack-")
        try:
            _spill_blocks(self._spill, self._sources, self.area, self.block, self.n_frames)
        except BaseException:
            self.close()
            raise
        self._stack = np.empty(self.n_frames * self.block * self.width, dtype=np.uint16)
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        """Drop the stack and the scratch file."""
        self._stack = None
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def read(self, r0: int) -> np.ndarray:
        """The block of rows that starts at ``r0`` (an entry of :attr:`blocks`): (frames, rows,
        cols). A block from the scratch file lives in a buffer that the next read reuses."""
        if self._spill is None:
            return self._stack
        r1 = min(self.height, r0 + self.block)
        stack = self._stack[: self.n_frames * (r1 - r0) * self.width].reshape(self.n_frames, r1 - r0, self.width)
        _read_exactly(self._spill, stack, self.n_frames * r0 * self.width * 2)
        return stack


def _runs(values: np.ndarray) -> list[tuple]:
    """(value, start, stop) of each run of equal values in sorted ``values``."""
    if not len(values):
        return []
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    stops = np.r_[starts[1:], len(values)]
    return [(values[a], a, b) for a, b in zip(starts, stops)]


def _sources(shards: Sequence[Shard], frames: pd.DataFrame, position: np.ndarray) -> list[tuple]:
    """(shard, index in its ``active``, stack position) of every frame, in file order."""
    shard_no = frames["shard_no"].to_numpy(dtype=int)
    rows = frames["row"].to_numpy()
    index = np.empty(len(frames), dtype=np.int64)
    for k in np.unique(shard_no):
        here = shard_no == k
        index[here] = shards[k].table["active_index"].to_numpy()[rows[here]]
    return [(shards[shard_no[i]], int(index[i]), int(position[i])) for i in np.lexsort((index, shard_no))]


@dataclass(frozen=True)
class _BlockPlan:
    """Rows per block (of the stack of every frame) and per slab (of a block, transposed so that
    each pixel's frames are contiguous, and sorted)."""

    block: int
    slab_rows: int

    @classmethod
    def make(cls, memory_mb: float, n_frames: int, height: int, width: int, n_groups: int) -> _BlockPlan:
        # Outside the stack: the medians themselves and one frame's rows (the spill's read buffer).
        fixed = (1 + n_groups) * height * width * 4 + height * width * 2
        free = max(0.0, memory_mb * 2**20 - fixed)
        row_bytes = n_frames * width * 2
        block = int(max(1, min(height, free * (1 - SLAB_SHARE) // row_bytes)))
        slab = int(max(1, min(block, SLAB_BYTES // row_bytes, free * SLAB_SHARE // (_SLAB_COPIES * row_bytes))))
        return cls(block, slab)


def _read_into(shard: Shard, index: int, area: tuple[slice, slice], out: np.ndarray) -> None:
    """``shard``'s active area ``index`` (the part ``area``) into ``out`` (1, rows, cols): one
    chunk read and decoded, checksums verified (a damaged chunk is a :class:`CorruptFileError`)."""
    ds = shard.f["active"]
    try:
        ds.read_direct(out, np.s_[index : index + 1, area[0], area[1]])
    except OSError as exc:
        raise CorruptFileError(
            f"{shard.path}: cannot read dataset {ds.name} ({exc}): a chunk fails its checksum or cannot be "
            "decoded, the file is damaged; write it again"
        ) from None


def _spill_blocks(spill, sources: list[tuple], area: tuple[slice, slice], block: int, n_frames: int) -> None:
    """Write every frame's rows to ``spill`` block by block, each block the stack of all frames
    (the block of rows from r0: bytes from ``n_frames * r0 * width * 2``), reading each chunk once."""
    height, width = area[0].stop - area[0].start, area[1].stop - area[1].start
    frame = np.empty((1, height, width), dtype=np.uint16)
    for shard, index, at in sources:
        _read_into(shard, index, area, frame)
        for r0 in range(0, height, block):
            r1 = min(height, r0 + block)
            offset = (n_frames * r0 + at * (r1 - r0)) * width * 2
            os.pwrite(spill.fileno(), frame[0, r0:r1].tobytes(), offset)


def _read_exactly(spill, out: np.ndarray, offset: int) -> None:
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(spill.fileno(), [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"scratch file of the medians ended early ({done} of {len(view)} bytes)")
        done += n


def _block_medians(
    stack: np.ndarray, groups: list[tuple], slab_rows: int, overall: np.ndarray, per_group: dict, r0: int
) -> None:
    """Medians of a block (frames, rows, cols) into rows ``r0``... of ``overall`` and of each
    group's: a slab of rows at a time is transposed to (pixels, frames) and each group's frames,
    then all, sorted (:func:`_sort_lanes`) for the middle values."""
    n, height, width = stack.shape
    for s0 in range(0, height, slab_rows):
        s1 = min(height, s0 + slab_rows)
        lanes = np.ascontiguousarray(stack[:, s0:s1].reshape(n, -1).T)
        out = slice(r0 + s0, r0 + s1)
        for key, run in groups:
            if run.stop - run.start < n:  # a single group of every frame is the overall median
                per_group[key][out] = _middle(_sort_lanes(lanes[:, run])).reshape(s1 - s0, width)
        overall[out] = _middle(_sort_lanes(lanes)).reshape(s1 - s0, width)
        for key, run in groups:
            if run.stop - run.start == n:
                per_group[key][out] = overall[out]


def _sort_lanes(lanes: np.ndarray) -> np.ndarray:
    """``lanes`` (pixels, frames), uint16, sorted along the frames (``lanes`` may be sorted itself).

    numpy sorts each lane with a vectorised sort whose cost is mostly per lane up to about 32
    values: a few frames per pixel would spend 30-50 ns a pixel on that. So several pixels
    share a lane, each value tagged with its pixel's place in the lane above its 16 bits
    (uint32 keys): one sort of the lane sorts every pixel's values apart, 4-5x faster for 4 to 8
    frames.
    """
    p, n = lanes.shape
    m = _PACKED_LANE // n  # pixels per lane
    if m < 2:
        lanes = lanes if lanes.flags.c_contiguous else lanes.copy()
        lanes.sort(axis=-1)
        return lanes
    packed = p - p % m
    keys = (lanes[:packed].reshape(packed // m, m, n) | _LANE_TAGS[:m, None]).reshape(packed // m, m * n)
    keys.sort(axis=-1)
    out = np.empty((p, n), dtype=np.uint16)
    out[:packed] = np.bitwise_and(keys, 0xFFFF).reshape(packed, n)
    rest = lanes[packed:].copy()  # the last pixels, fewer than a lane
    rest.sort(axis=-1)
    out[packed:] = rest
    return out


def _middle(sorted_lanes: np.ndarray) -> np.ndarray:
    """As :func:`numpy.median` of each lane: the middle value, or the mean of the two in float64;
    then float32."""
    n = sorted_lanes.shape[-1]
    if n % 2:
        return sorted_lanes[:, n // 2].astype(np.float32)
    return ((sorted_lanes[:, n // 2 - 1].astype(np.float64) + sorted_lanes[:, n // 2]) / 2).astype(np.float32)


def write_masters(
    shards: Sequence[str | Path],
    out: str | Path,
    memory_mb: float = 512,
    progress: bool = True,
    scratch: str | Path | None = None,
) -> Path:
    """Median master darks of the DARK frames in ``shards``, written atomically to ``out``, with
    the record of the frames that went in (``frames``). A library too large for ``memory_mb``
    goes through a scratch file in ``scratch`` (default: the folder of ``out``)."""
    opened = [Shard(p) for p in shards]
    try:
        geometry = common_geometry(opened)
        frames = _with_bias(opened, library_table(opened))
        if frames.empty:
            raise InputError("no DARK frames in the library shards")
        out = Path(out)
        scratch = Path(scratch) if scratch is not None else out.absolute().parent
        with atomic_path(out) as tmp, hdf5_written(tmp, libver=HDF5_FORMAT) as f:
            f.attrs.update(
                schema_version=MASTER_SCHEMA,
                **geometry_attrs(geometry),
                setpoints=np.asarray(sorted(set(frames["setpoint"])), dtype=float),
                nights=",".join(sorted(set(frames["night"]))),
            )
            _write_table(f, _write_medians(f, opened, frames, memory_mb, progress, scratch))
            _write_text_table(f, FRAMES_GROUP, _frame_record(opened, frames))
        return out
    finally:
        for s in opened:
            s.close()


def _write_medians(
    f: h5py.File, shards: Sequence[Shard], frames: pd.DataFrame, memory_mb: float, progress: bool, scratch: Path
) -> pd.DataFrame:
    """Write dataset ``master`` (one per family and kind); return the table that describes it."""
    families = list(frames.groupby(["camera", "channel", "exptime"], sort=True))
    n_masters = sum(1 + sel["setpoint"].nunique() for _, sel in families)
    shape = shards[0].geometry.active.shape
    ds = f.create_dataset("master", shape=(n_masters, *shape), dtype=np.float32, chunks=(1, *shape))
    rows = []
    bar = tqdm(total=n_masters, desc="median masters", unit="master", disable=None if progress else True)
    for (camera, channel, exptime), sel in families:
        # One pass over the family's frames gives its all-temperature master and every
        # per-temperature master: each stored chunk is read once.
        overall, per_setpoint = streamed_medians(shards, sel, memory_mb, group_by="setpoint", scratch=scratch)
        for sp, master in [(np.nan, overall), *per_setpoint.items()]:
            sub = sel if np.isnan(sp) else sel[sel["setpoint"] == sp]
            ds[len(rows)] = master
            rows.append(
                dict(
                    kind="all" if np.isnan(sp) else "temp",
                    setpoint=sp,
                    camera=camera,
                    channel=channel,
                    exptime=exptime,
                    n_frames=len(sub),
                    bias=float(np.median(sub["bias"])),
                )
            )
            bar.update()
        del overall, per_setpoint, master  # before the next family's medians: one family's in memory at a time
    bar.close()
    return pd.DataFrame(rows)


def _with_bias(shards: Sequence[Shard], frames: pd.DataFrame) -> pd.DataFrame:
    """Add each frame-channel's median overscan level: what a master dark holds that does not
    scale with exposure (used to scale a master to another exposure time). Strips are read a
    range of rows at a time (one h5py call, not one per row)."""
    if frames.empty:
        return frames
    bias = np.empty(len(frames))
    for k in np.unique(frames["shard_no"]):
        here = np.flatnonzero(frames["shard_no"].to_numpy() == k)
        rows = frames["row"].to_numpy()[here]
        for lo in range(int(rows.min()), int(rows.max()) + 1, _STRIP_ROWS_PER_READ):
            hi = min(lo + _STRIP_ROWS_PER_READ, int(rows.max()) + 1)
            sel = np.flatnonzero((rows >= lo) & (rows < hi))
            if sel.size:
                strips = shards[k].read("a1", np.s_[lo:hi])[rows[sel] - lo]
                bias[here[sel]] = np.median(strips.reshape(len(sel), -1), axis=1)
    frames["bias"] = bias
    return frames


def _frame_record(shards: Sequence[Shard], frames: pd.DataFrame) -> dict[str, np.ndarray]:
    """One row per library frame that went into the masters (channels share it): the columns of
    :data:`FRAME_COLUMNS`, names as the operating system's bytes."""
    first = frames.drop_duplicates(["shard_no", "file"]).sort_values(["night", "file"], kind="stable")
    columns = {}
    for col, dtype in FRAME_COLUMNS.items():
        if col == "shard":
            values = [os.fsencode(shards[k].path.name) for k in first["shard_no"]]
        elif col == "file":
            values = [os.fsencode(v) for v in first["file"]]
        else:
            values = first[col].to_list()
        columns[col] = np.array(values, dtype=dtype)
    return columns


def _write_text_table(f: h5py.File, name: str, columns: dict[str, np.ndarray]) -> None:
    """A table ``name/<column>``; text columns carry the xxh3-128 of their strings (as shards)."""
    grp = f.create_group(name)
    for col, values in columns.items():
        ds = grp.create_dataset(col, data=values)
        if values.dtype == object:
            ds.attrs[TEXT_CHECKSUM] = text_digest(values)


def _write_table(f: h5py.File, table: pd.DataFrame) -> None:
    grp = f.create_group("table")
    for col in table:
        values = table[col].to_numpy()
        grp.create_dataset(col, data=values.astype(h5py.string_dtype()) if values.dtype == object else values)
