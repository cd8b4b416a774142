"""Cost of predicting one full-size frame (every channel, whole active area) with the default
physics-mode model vs the ``compact`` paper preset, end to end as ``deepdark predict`` runs it
(strips read from the shard, physics prediction, input step, generator, output). Not a test.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/physics_model_cost.py --model MODEL_DIR --shard SHARD.h5 \\
        [--frames 4] [--threads 2]

The compact model is an untrained ``compact`` generator saved to a temporary directory (the
weights do not change the cost).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepdark.io.shards import Shard  # noqa: E402
from deepdark.model.files import save_model  # noqa: E402
from deepdark.model.nets import PRESETS, Generator  # noqa: E402
from deepdark.model.runner import model_predictor  # noqa: E402


def frame_times(predict, shard: Shard, frames: int) -> list[float]:
    files = list(dict.fromkeys(shard.table["file"]))[: frames + 1]
    out = []
    for k, f in enumerate(files):
        rows = np.flatnonzero((shard.table["file"] == f).to_numpy())
        t = time.perf_counter()
        predict(shard, rows)
        if k:  # the first frame warms up caches and allocators
            out.append(time.perf_counter() - t)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, type=Path, help="a physics-mode model directory")
    p.add_argument("--shard", required=True, type=Path)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with Shard(a.shard) as shard, tempfile.TemporaryDirectory() as tmp:
        compact = Path(tmp) / "compact"
        save_model(
            compact,
            Generator(PRESETS["compact"], seed=0).eval(),
            preset="compact",
            loss={"name": "deepdark", "l1_weight": 100.0},
            geometry=shard.geometry,
        )
        res = {}
        for name, model in (("compact", compact), ("physics-mode", a.model)):
            pred = model_predictor(model, area="active", device="cpu", batch_size=4)
            res[name] = statistics.median(frame_times(pred, shard, a.frames))
        # the physics prediction alone, for the split
        runner = model_predictor(a.model, area="active", device="cpu").runner
        files = list(dict.fromkeys(shard.table["file"]))[: a.frames]
        ts = []
        for f in files:
            rows = np.flatnonzero((shard.table["file"] == f).to_numpy())
            t = time.perf_counter()
            runner.physics.predict_rows(shard, rows)
            ts.append(time.perf_counter() - t)
        res["physics part"] = statistics.median(ts)
    chans = len(shard.geometry.channels)
    print(
        f"one full frame ({chans} channels x {shard.geometry.active.shape[0]}x{shard.geometry.active.shape[1]}),"
        f" {a.threads} CPU thread(s), median of {a.frames}:"
    )
    for k, v in res.items():
        print(f"  {k:<14} {v:7.2f} s")
    print(f"  ratio physics-mode / compact: {res['physics-mode'] / res['compact']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
