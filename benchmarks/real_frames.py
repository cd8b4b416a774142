"""Bias frames of real cameras: how well each amplifier's bias is predicted.

    python benchmarks/real_frames.py [--data DIR] [--json] [--work DIR]

``DIR`` holds one folder per camera, named as the camera's geometry preset (``nickel-direct``,
``kast-blue``), with its raw bias frames; a folder with a ``geometry.yaml`` of its own is read
with it (the repository's copies in ``tests/data/realdata``, the default, are cropped). Per camera
and amplifier, the RMSE (ADU) over the active area, pooled over all frames, of (pixels that are
saturated or zero in any frame hold no measurement and are left out: a bad column of the Nickel
CCD reads 65535 in almost every row):

* ``scalar``: one overscan level per frame (the level of ``deepdark.physics.row_bias``) plus the
  leave-one-out master (the mean of the other frames, each minus its own level);
* ``physics``: leave one frame out: ``fit_physics`` on the others, predict it (the whole path:
  each frame extracted into a shard, the fit, :meth:`PhysicsModel.serve_rows`);
* ``oracle``: the scalar prediction plus the frame's own image row offsets (the best any per-row
  bias could do with that master);
* ``floor``: the standard deviation of the difference of two frames / sqrt 2, over every pair.

``--json`` prints ``{camera: {amplifier: {"scalar", "physics", "oracle", "floor"}}}``. The
physics fit's transfer coefficient of each amplifier (how far the library trusts the overscan,
``deepdark.physics.transfer``) is printed with the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from deepdark.io.frames import Keywords, is_fits_name
from deepdark.io.geometry import Geometry, load_geometry
from deepdark.io.shards import Shard
from deepdark.io.units import SATURATED
from deepdark.physics import PhysicsModel, fit_physics, row_bias
from deepdark.physics.frame_state import OVERSCAN_SKIP
from deepdark.pipeline.extract import extract

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "tests" / "data" / "realdata"
# How each camera's header names what deepdark reads (its geometry preset's comments say the same).
CAMERAS = {
    "nickel-direct": Keywords(imagetyp="OBSTYPE", ccdtemp="TEMPDET", date_obs="DATE-BEG"),
    "kast-blue": Keywords(imagetyp="OBSTYPE"),
}
METHODS = ("scalar", "physics", "oracle", "floor")


def camera_geometry(folder: Path, camera: str) -> Geometry:
    """The folder's own ``geometry.yaml`` (cropped copies), else the camera's preset."""
    own = folder / "geometry.yaml"
    return load_geometry(own if own.is_file() else camera)


def extract_each(folder: Path, work: Path, g: Geometry, keywords: Keywords) -> list[Path]:
    """One shard per raw frame of ``folder`` (so that any of them can be left out of a fit)."""
    files = sorted(p for p in folder.iterdir() if is_fits_name(p))
    shards = []
    for k, path in enumerate(files):
        res = extract([path], work / f"frame{k:02d}.h5", g, keywords, progress=False)
        if res.n_frames != 1:
            raise SystemExit(f"{path}: not read as a frame (see {work / f'frame{k:02d}.quarantine.csv'})")
        shards.append(res.shard)
    return shards


def read_frames(shards: list[Path]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Channel names, active areas (frames, channels, R, C) float64 and overscan levels (frames, channels)."""
    actives, levels = [], []
    for path in shards:
        with Shard(path) as s:
            rows = np.arange(len(s))
            names = list(s.table["channel"])
            actives.append(s.active(rows).astype(np.float64))
            levels.append(row_bias(s.strips(rows)["a1"], OVERSCAN_SKIP)[1])
    return names, np.stack(actives), np.stack(levels)


def measured(act: np.ndarray) -> np.ndarray:
    """(channels, R, C): the pixels that hold a measurement in every frame (neither saturated nor 0)."""
    return ((act > 0) & (act < SATURATED)).all(axis=0)


def baseline_errors(act: np.ndarray, level: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per frame and channel, the errors (frames, channels, R, C) of the scalar and oracle predictions."""
    F = len(act)
    less = act - level[:, :, None, None]
    scalar = np.empty_like(act)
    for i in range(F):
        master = np.delete(less, i, axis=0).mean(axis=0)
        scalar[i] = act[i] - (level[i][:, None, None] + master)
    rows = (scalar * mask).sum(axis=-1, keepdims=True) / np.maximum(mask.sum(axis=-1, keepdims=True), 1)
    return {"scalar": scalar, "oracle": scalar - rows}  # the oracle: the frame's own row offsets removed


def floor(act: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(channels,): RMS over frame pairs of std(frame i - frame j) / sqrt 2 (measured pixels)."""
    var = []
    for i, j in itertools.combinations(range(len(act)), 2):
        d = act[i] - act[j]
        var.append([np.var(d[c][mask[c]]) / 2 for c in range(len(d))])
    return np.sqrt(np.mean(var, axis=0))


def physics_errors(shards: list[Path], act: np.ndarray, work: Path) -> tuple[np.ndarray, list[dict]]:
    """Leave-one-frame-out physics errors (frames, channels, R, C) and each fit's transfers."""
    err = np.empty_like(act)
    transfers = []
    for i, held in enumerate(shards):
        model_path = fit_physics([s for s in shards if s != held], work / f"loo{i:02d}.h5", progress=False)
        with PhysicsModel(model_path) as model, Shard(held) as s:
            served = model.serve_rows(s, np.arange(len(s)))
            if served.unserved_reason() is not None:
                raise SystemExit(f"{held}: {served.unserved_reason()}")
            err[i] = act[i] - served.dark
            cam = s.table["camera"].iloc[0]
            transfers.append({ch: model.transfer(cam, ch) for ch in s.table["channel"]})
    return err, transfers


def rmse(err: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(channels,): RMSE pooled over frames and the measured pixels."""
    return np.sqrt(np.sum(np.where(mask, err**2, 0.0), axis=(0, 2, 3)) / (len(err) * mask.sum(axis=(1, 2))))


def camera_table(folder: Path, camera: str, work: Path) -> tuple[dict, dict]:
    """``{amplifier: {method: RMSE}}`` of one camera, and the transfers of its first fit."""
    g = camera_geometry(folder, camera)
    shards = extract_each(folder, work, g, CAMERAS[camera])
    names, act, level = read_frames(shards)
    mask = measured(act)
    errs = baseline_errors(act, level, mask)
    errs["physics"], transfers = physics_errors(shards, act, work)
    values = {m: rmse(errs[m], mask) for m in ("scalar", "physics", "oracle")}
    values["floor"] = floor(act, mask)
    table = {ch: {m: float(values[m][j]) for m in METHODS} for j, ch in enumerate(names)}
    return table, transfers[0]


def show(camera: str, table: dict, transfers: dict, n_frames: int) -> None:
    print(f"== {camera} ({n_frames} frames; RMSE in ADU over the active area)")
    print(f"{'amplifier':>9} {'scalar':>8} {'physics':>8} {'oracle':>8} {'floor':>8} {'phys/scalar':>11}  transfer")
    for ch, row in table.items():
        print(
            f"{ch:>9} {row['scalar']:8.3f} {row['physics']:8.3f} {row['oracle']:8.3f} {row['floor']:8.3f}"
            f" {row['physics'] / row['scalar']:11.4f}  {transfers[ch].describe()}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="one folder per camera (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the RMSE as JSON only")
    p.add_argument("--work", type=Path, help="where shards and fits go (default: a temporary folder)")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for camera in CAMERAS:
            folder = a.data / camera
            if not folder.is_dir():
                continue
            work = (a.work or Path(tmp)) / camera
            work.mkdir(parents=True, exist_ok=True)
            table, transfers = camera_table(folder, camera, work)
            results[camera] = table
            if not a.json:
                show(camera, table, transfers, len(list(work.glob("frame*.h5"))))
    if not results:
        raise SystemExit(f"{a.data}: no camera folder ({', '.join(CAMERAS)})")
    if a.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
