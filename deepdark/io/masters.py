"""Master-dark files (written by ``deepdark.pipeline.baseline``): read access and lookup."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from deepdark.io.geometry import parse_geometry

MASTER_SCHEMA = 1


class Masters:
    """Read access to a master-dark file: look up the master for a frame-channel."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.f = h5py.File(self.path, "r")
        if int(self.f.attrs.get("schema_version", -1)) != MASTER_SCHEMA:
            raise ValueError(f"{self.path}: not a deepdark master-dark file of schema {MASTER_SCHEMA}")
        self.geometry = parse_geometry(self.f.attrs["geometry"], origin=f"{self.path}:geometry")
        self.setpoints = [float(x) for x in self.f.attrs["setpoints"]]
        grp = self.f["table"]
        self.table = pd.DataFrame({c: grp[c][()] for c in grp})
        for c in ("kind", "camera", "channel"):
            self.table[c] = [v.decode() if isinstance(v, bytes) else v for v in self.table[c]]
        self._cache: dict[int, np.ndarray] = {}

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.f.close()

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

    def _load(self, i: int) -> np.ndarray:
        if i not in self._cache:
            self._cache[i] = self.f["master"][i]
        return self._cache[i]
