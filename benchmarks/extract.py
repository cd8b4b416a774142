"""Extraction cost against a bare FITS read of the same files, measured in the same run.

    python benchmarks/extract.py [--frames 40] [--repeats 3] [--dir DIR]

Simulates full-size frames (darks and guide frames) unless --dir names a night folder, warms
the page cache, then alternates: a bare ``astropy.io.fits`` read of every file (pixels
materialised as uint16) and ``deepdark.pipeline.extract.extract`` of the same files. Prints the median
time per frame of each and their ratio, for dark frames (whose active area the shard keeps) and
guide frames (strips only) separately. The target is a ratio of at most 1.5.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from deepdark.io.geometry import load_geometry
from deepdark.pipeline.extract import extract
from deepdark.sim.simulate import simulate_archive


def bare_read(files: list[Path]) -> None:
    for f in files:
        with fits.open(f, memmap=False) as hdul:
            np.asarray(hdul[0].data, dtype=np.uint16)


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=40, help="frames of each kind to simulate")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, help="an existing night folder instead of a simulated one")
    a = p.parse_args()
    g = load_geometry("lamost-kaf4320")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.dir:
            night = a.dir
        else:
            simulate_archive(
                tmp / "archive",
                geometry=g,
                nights=1,
                temperatures=(-15,),
                darks_per_temp=a.frames,
                guide_per_night=a.frames,
                progress=False,
            )
            night = next((tmp / "archive").iterdir())
        files = sorted(night.glob("*.fits"))
        kinds = {"dark": [f for f in files if "_dark_" in f.name], "guide": [f for f in files if "_guide_" in f.name]}
        if a.dir:
            kinds = {"all": files}
        for kind, sel in kinds.items():
            bare_read(sel)  # warm the page cache for both contenders
            bare, ext = [], []
            for _ in range(a.repeats):
                bare.append(timed(bare_read, sel) / len(sel))
                ext.append(
                    timed(lambda sel=sel, kind=kind: extract(sel, tmp / f"{kind}.h5", g, progress=False)) / len(sel)
                )
            b, e = statistics.median(bare), statistics.median(ext)
            print(
                f"{kind:5s} {len(sel):3d} frames: bare read {1e3 * b:6.1f} ms/frame, "
                f"extract {1e3 * e:6.1f} ms/frame, ratio {e / b:.2f}"
            )


if __name__ == "__main__":
    main()
