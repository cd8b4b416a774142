"""Frame tables: the rules that turn a shard's frame table into setpoints and library selections."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from deepdark.io.errors import InputError

# Without SETTEMP, a frame's setpoint is its CCDTEMP rounded to this grid (the paper's setpoints
# -5, -10, -15, -25 C lie on it; control precision is +-1 C).
SETPOINT_GRID = 5.0


def frame_setpoints(table: pd.DataFrame, library_setpoints: Sequence[float] | None = None) -> np.ndarray:
    """Setpoint of each row: SETTEMP when present, else CCDTEMP rounded to the nearest library
    setpoint (or to the 5 C grid when no library is given)."""
    settemp = table["settemp"].to_numpy(dtype=float)
    ccdtemp = table["ccdtemp"].to_numpy(dtype=float)
    if library_setpoints is not None and len(library_setpoints):
        grid = np.asarray(sorted(library_setpoints), dtype=float)
        nearest = grid[np.abs(ccdtemp[:, None] - grid[None, :]).argmin(axis=1)]
    else:
        nearest = np.round(ccdtemp / SETPOINT_GRID) * SETPOINT_GRID
    return np.where(np.isfinite(settemp), settemp, nearest)


def temp_label(setpoint: float) -> str:
    """How a setpoint is named in tables: "-15", "-2.5"."""
    return f"{setpoint:g}"


def library_table(shards: Sequence, types: Sequence[str] = ("DARK",)) -> pd.DataFrame:
    """The frame-channels of the given image ``types`` in open ``shards``, one table.

    Adds ``shard_no`` (position in ``shards``), ``row`` (row of that shard's table) and
    ``setpoint`` (:func:`frame_setpoints`); BIAS frames get an exposure time of 0 s whatever
    their header says, since a bias is a zero-second readout by definition.
    """
    parts = []
    for k, s in enumerate(shards):
        t = s.table
        sel = t[t["imagetyp"].isin(types)].copy()
        sel["shard_no"], sel["row"] = k, sel.index.to_numpy()
        parts.append(sel)
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if table.empty:
        return table
    table.loc[table["imagetyp"] == "BIAS", "exptime"] = 0.0
    table["night"] = table["night"].astype(str)
    table["setpoint"] = frame_setpoints(table)
    return table


def library_cameras(shards: Sequence, types: Sequence[str] = ("DARK", "BIAS")) -> pd.DataFrame:
    """What a library holds of each camera: one row per camera (sorted), with its frames of the
    given ``types`` (``frames``, ``darks``, ``biases``), ``nights`` and ``setpoints`` (of its darks).

    The cameras are what the workflow fits one job each; ``frames`` counts files, not channels."""
    columns = ["camera", "frames", "darks", "biases", "nights", "setpoints"]
    lib = library_table(shards, types)
    if lib.empty:
        return pd.DataFrame(columns=columns)
    per_frame = lib.drop_duplicates(["camera", "file"])
    rows = []
    for camera, grp in per_frame.groupby("camera", sort=True):
        dark = grp["imagetyp"] == "DARK"
        rows.append(
            dict(
                camera=str(camera),
                frames=len(grp),
                darks=int(dark.sum()),
                biases=int((grp["imagetyp"] == "BIAS").sum()),
                nights=grp["night"].nunique(),
                setpoints=" ".join(temp_label(t) for t in sorted(set(grp.loc[dark, "setpoint"]))),
            )
        )
    return pd.DataFrame(rows, columns=columns)


def common_geometry(shards: Sequence):
    """The one geometry that all open ``shards`` share; ValueError when they mix geometries."""
    names = {s.geometry.name for s in shards}
    if len(names) != 1:
        raise InputError(f"shards mix geometries: {sorted(names)}")
    return shards[0].geometry
