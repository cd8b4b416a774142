"""Predicted darks of a night: one HDF5 file per shard, whatever method made them.

Layout (``SCHEMA_VERSION``): ``dark`` float32 (N, rows, cols), the predicted dark in ADU over
the whole active area of each frame-channel, in readout coordinates, row i for row i of
``table/`` (a copy of the shard's table); attributes name the method, the model and its hash,
the software, the geometry and the source shard. Written under a temporary name. Every chunk
carries a checksum, verified on every read (as in shards, see ``deepdark.io.shards``): a damaged
chunk raises a :class:`~deepdark.io.errors.CorruptFileError` naming the file and the dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from deepdark import __version__
from deepdark.io.atomic import atomic_path
from deepdark.io.shards import CHECKED_COMPRESSION, Shard, open_versioned, read_checked, stored_table, write_table

SCHEMA_VERSION = 1

# Maps (shard, sorted table rows) to predicted darks over the active area, ADU, (k, rows, cols).
ActivePredictor = Callable[[Shard, np.ndarray], np.ndarray]


def write_predictions(
    shard_path: str | Path,
    out: str | Path,
    predict: ActivePredictor,
    provenance: dict[str, str],
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Run ``predict`` over every frame-channel of the shard, ``batch_size`` at a time.

    ``provenance`` must name at least ``method``; ``model_name`` and ``model_hash`` when a model
    made the prediction.
    """
    if "method" not in provenance:
        raise ValueError("provenance must name the method")
    out = Path(out)
    with Shard(shard_path) as shard, atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        g = shard.geometry
        f.attrs.update(
            schema_version=SCHEMA_VERSION,
            geometry=g.source,
            shard=str(shard_path),
            software=f"deepdark {__version__}",
            **provenance,
        )  # no date: reruns are byte-identical
        n = len(shard)
        # A night whose every file was quarantined has no rows, and HDF5 cannot chunk nothing.
        layout = dict(chunks=(1, *g.active.shape), **CHECKED_COMPRESSION) if n else {}
        ds = f.create_dataset("dark", shape=(n, *g.active.shape), dtype=np.float32, **layout)
        bar = tqdm(total=n, desc=f"predict {Path(shard_path).name}", unit="channel", disable=None if progress else True)
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(n, start + batch_size))
            dark = np.asarray(predict(shard, rows), dtype=np.float32)
            if dark.shape != (len(rows), *g.active.shape):
                raise ValueError(f"predictor returned {dark.shape}, expected {(len(rows), *g.active.shape)}")
            ds[start : start + len(rows)] = dark
            bar.update(len(rows))
        bar.close()
        write_table(f, stored_table(shard.f, shard.path))
    return out


class Predictions:
    """Read access to a predictions file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.f, self.geometry, self.table = open_versioned(self.path, "predictions", SCHEMA_VERSION)
        self.attrs = {
            k: (v.decode() if isinstance(v, bytes) else v) for k, v in self.f.attrs.items() if k != "geometry"
        }

    def __len__(self) -> int:
        return len(self.table)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.f.close()

    def dark(self, rows) -> np.ndarray:
        """Predicted darks (ADU, active area, readout coordinates) of table rows (sorted)."""
        return read_checked(self.path, self.f["dark"], np.asarray(rows))

    def rows_of(self, file: str) -> np.ndarray:
        """Table rows of one raw file, in channel order of the table."""
        return np.flatnonzero((self.table["file"] == file).to_numpy())
