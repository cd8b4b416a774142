"""The traditional method of the paper (3.2): per-pixel median master darks of a dark library.

Masters are made per camera, channel and exposure time: over all temperatures (``all``) and
per temperature setpoint (``temp``). Each covers the whole active area of its channel so that
it can correct every active pixel, and is evaluated inside the model window like the model.

Medians are streamed: a block of rows of every library frame at a time, sized to a memory
budget, so a library of thousands of full frames never sits in memory at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from tqdm import tqdm

from deepdark.io.atomic import atomic_path
from deepdark.io.geometry import Geometry
from deepdark.io.masters import MASTER_SCHEMA
from deepdark.io.shards import Shard
from deepdark.io.tables import common_geometry, library_table

log = logging.getLogger(__name__)


@dataclass
class _Member:
    shard: Shard
    active_index: np.ndarray  # rows of the shard's ``active`` dataset


def build_masters(shards: Sequence[str | Path], out: str | Path, memory_mb: int = 512, progress: bool = True) -> Path:
    """Median master darks of the DARK frames in ``shards``, written atomically to ``out``."""
    opened = [Shard(p) for p in shards]
    try:
        geometry = common_geometry(opened)
        frames = _with_bias(opened, library_table(opened))
        if frames.empty:
            raise ValueError("no DARK frames in the library shards")
        setpoints = sorted(set(frames["setpoint"]))
        families = list(frames.groupby(["camera", "channel", "exptime"], sort=True))
        n_masters = sum(1 + sel["setpoint"].nunique() for _, sel in families)
        out = Path(out)
        with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
            f.attrs.update(
                schema_version=MASTER_SCHEMA,
                geometry=geometry.source,
                setpoints=np.asarray(setpoints, dtype=float),
                nights=",".join(sorted(set(frames["night"]))),
            )
            ds = f.create_dataset(
                "master",
                shape=(n_masters, *geometry.active.shape),
                dtype=np.float32,
                chunks=(1, *geometry.active.shape),
            )
            rows = []
            bar = tqdm(total=n_masters, desc="median masters", unit="master", disable=not progress)
            for (camera, channel, exptime), sel in families:
                # One pass over the family's frames gives its all-temperature master and every
                # per-temperature master: each frame is read once per block of rows.
                sel = sel.sort_values(["shard_no", "active_index"])
                medians = _streamed_medians(_members(opened, sel), sel["setpoint"].to_numpy(), geometry, memory_mb)
                for sp, master in medians.items():
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
            table = pd.DataFrame(rows)
            grp = f.create_group("table")
            for col in table:
                values = table[col].to_numpy()
                grp.create_dataset(col, data=values.astype(h5py.string_dtype()) if values.dtype == object else values)
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


def _members(shards: Sequence[Shard], sel: pd.DataFrame) -> list[_Member]:
    return [_Member(shards[k], np.sort(g["active_index"].to_numpy())) for k, g in sel.groupby("shard_no")]


def _streamed_medians(
    members: list[_Member], setpoints: np.ndarray, g: Geometry, memory_mb: int
) -> dict[float, np.ndarray]:
    """Per-pixel medians over all member frames (key NaN) and over each setpoint's frames,
    a block of rows at a time; ``setpoints`` follows the members' frame order."""
    n = len(setpoints)
    rows, cols = g.active.shape
    # Live at once per block: the uint16 stack, the copy np.median partitions, a subset and its copy.
    block = max(1, min(rows, int(memory_mb * 2**20 // (8 * n * cols))))
    keys = [np.nan, *sorted(set(setpoints))]
    out = {k: np.empty((rows, cols), dtype=np.float32) for k in keys}
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        stack = np.concatenate([m.shard.f["active"][m.active_index, r0:r1, :] for m in members])
        for k in keys:
            out[k][r0:r1] = np.median(stack if np.isnan(k) else stack[setpoints == k], axis=0)
    return out
