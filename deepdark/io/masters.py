"""Master-dark files: the per-pixel median darks of a dark library (the paper's traditional
method, 3.2), how they are computed and written, and how a frame-channel finds its master.

Masters are made per camera, channel and exposure time: over all temperatures (kind ``all``)
and per temperature setpoint (kind ``temp``). Each covers the whole active area of its channel
so that it can correct every active pixel, and is evaluated inside the model window like the
model.

Medians are streamed (:func:`streamed_medians`): a block of rows of every library frame at a
time, sized to a memory budget, so a library of thousands of full frames never sits in memory
at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from tqdm import tqdm

from deepdark.io.atomic import atomic_path
from deepdark.io.errors import InputError
from deepdark.io.geometry import parse_geometry
from deepdark.io.shards import Shard
from deepdark.io.tables import common_geometry, frame_setpoints, library_table

MASTER_SCHEMA = 1
# Bytes alive per frame-pixel of a block while its medians are taken: the uint16 stack, the copy
# np.median partitions, a setpoint's subset of the stack and that subset's copy.
MEDIAN_BYTES_PER_FRAME_PIXEL = 8


class MissingMaster(ValueError):
    """The library has no master dark of the kind asked for a frame-channel; one line."""


class Masters:
    """Read access to a master-dark file: look up the master for a frame-channel."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.f = h5py.File(self.path, "r")
        if int(self.f.attrs.get("schema_version", -1)) != MASTER_SCHEMA:
            raise InputError(f"{self.path}: not a deepdark master-dark file of schema {MASTER_SCHEMA}")
        self.geometry = parse_geometry(self.f.attrs["geometry"], origin=f"{self.path}:geometry")
        self.setpoints = [float(x) for x in self.f.attrs["setpoints"]]
        grp = self.f["table"]
        self.table = pd.DataFrame({c: grp[c][()] for c in grp})
        for c in ("kind", "camera", "channel"):
            self.table[c] = [v.decode() if isinstance(v, bytes) else v for v in self.table[c]]
        self._cache: dict[int, np.ndarray] = {}

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
        Budget for one block: as many rows as keep the block's stack and the copies the medians
        make within it (``MEDIAN_BYTES_PER_FRAME_PIXEL``), one row at the least.
    rows, cols
        The part of the active area (slices of step 1): the whole of it by default.
    group_by
        A column of ``frames``: also the median over each of its values' frames.

    Returns
    -------
    The median over all ``frames``, and ``{value: median over its frames}`` (sorted by value;
    empty without ``group_by``). Each frame is read once per block whatever the groups.
    """
    shard_no = frames["shard_no"].to_numpy(dtype=int)
    index = np.empty(len(frames), dtype=np.int64)
    for k in np.unique(shard_no):
        here = shard_no == k
        index[here] = shards[k].table["active_index"].to_numpy()[frames["row"].to_numpy()[here]]
    order = np.lexsort((index, shard_no))  # the order the stack is read in
    shard_no, index = shard_no[order], index[order]
    labels = frames[group_by].to_numpy()[order] if group_by else np.zeros(0)
    members = [(shards[k], index[shard_no == k]) for k in np.unique(shard_no)]
    n_rows, n_cols = shards[0].geometry.active.shape
    r_start, r_stop, _ = rows.indices(n_rows)
    width = len(range(*cols.indices(n_cols)))
    block = max(
        1, min(r_stop - r_start, int(memory_mb * 2**20 // (MEDIAN_BYTES_PER_FRAME_PIXEL * len(frames) * width)))
    )
    keys = sorted(set(labels))
    overall = np.empty((r_stop - r_start, width), dtype=np.float32)
    groups = {k: np.empty_like(overall) for k in keys}
    for r0 in range(r_start, r_stop, block):
        r1 = min(r_stop, r0 + block)
        stack = np.concatenate([shard.f["active"][idx, r0:r1, cols] for shard, idx in members])
        overall[r0 - r_start : r1 - r_start] = np.median(stack, axis=0)
        for k in keys:
            groups[k][r0 - r_start : r1 - r_start] = np.median(stack[labels == k], axis=0)
    return overall, groups


def write_masters(shards: Sequence[str | Path], out: str | Path, memory_mb: float = 512, progress: bool = True) -> Path:
    """Median master darks of the DARK frames in ``shards``, written atomically to ``out``."""
    opened = [Shard(p) for p in shards]
    try:
        geometry = common_geometry(opened)
        frames = _with_bias(opened, library_table(opened))
        if frames.empty:
            raise InputError("no DARK frames in the library shards")
        families = list(frames.groupby(["camera", "channel", "exptime"], sort=True))
        n_masters = sum(1 + sel["setpoint"].nunique() for _, sel in families)
        out = Path(out)
        with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
            f.attrs.update(
                schema_version=MASTER_SCHEMA,
                geometry=geometry.source,
                setpoints=np.asarray(sorted(set(frames["setpoint"])), dtype=float),
                nights=",".join(sorted(set(frames["night"]))),
            )
            ds = f.create_dataset(
                "master",
                shape=(n_masters, *geometry.active.shape),
                dtype=np.float32,
                chunks=(1, *geometry.active.shape),
            )
            rows = []
            bar = tqdm(total=n_masters, desc="median masters", unit="master", disable=None if progress else True)
            for (camera, channel, exptime), sel in families:
                # One pass over the family's frames gives its all-temperature master and every
                # per-temperature master: each frame is read once per block of rows.
                overall, per_setpoint = streamed_medians(opened, sel, memory_mb, group_by="setpoint")
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
            bar.close()
            _write_table(f, pd.DataFrame(rows))
        return out
    finally:
        for s in opened:
            s.close()


def _with_bias(shards: Sequence[Shard], frames: pd.DataFrame) -> pd.DataFrame:
    """Add each frame-channel's median overscan level: what a master dark holds that does not
    scale with exposure (used to scale a master to another exposure time)."""
    if not frames.empty:
        frames["bias"] = [float(np.median(shards[k].f["a1"][r])) for k, r in zip(frames["shard_no"], frames["row"])]
    return frames


def _write_table(f: h5py.File, table: pd.DataFrame) -> None:
    grp = f.create_group("table")
    for col in table:
        values = table[col].to_numpy()
        grp.create_dataset(col, data=values.astype(h5py.string_dtype()) if values.dtype == object else values)
