"""Where the network earns its compute: physics alone, physics + network and the noise floor per
camera, on a held-out night of a simulated mini library where one camera has effects that the
physics model cannot describe and the other has none.

    python benchmarks/network_selection.py --out DIR [--nights 4] [--effects amp_glow pickup]
        [--seed 0] [--train-args "..."]

Simulates ``DIR/archive`` (``--nights`` library nights and one test night, the simulator's
default darks: -5, -10, -15, -25 C, three 30 s darks each per night) of camera GS1 with
``--effects`` (``deepdark.sim.simulate.EFFECTS``) and camera GS2 without, extracts one shard per
night, then times ``deepdark train`` with no options but ``--train-args`` (it fits the physics
model, trains the physics preset, stops early and records on the card where the network beat
physics alone). Scores on the test night's darks (model window, pooled RMSE in ADU):

* ``physics``: the physics model alone;
* ``selected``: what ``deepdark predict`` serves: physics + network where the card's validation
  says the network beat physics alone by the default margin, physics alone elsewhere;
* ``network``: physics + network for every frame (margin -inf), to show what the selection avoids;
* ``floor``: the noise no predictor can remove (DDFLOOR).

Writes ``DIR/network_selection.json`` and prints the table with each column over the floor.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from deepdark.io.geometry import load_geometry
from deepdark.io.shards import Shard
from deepdark.model.runner import model_predictor
from deepdark.physics import PhysicsModel
from deepdark.pipeline.extract import extract
from deepdark.sim.simulate import simulate_archive

TEST_NIGHT = "20240301"


def simulate(out: Path, nights: int, effects: list[str], seed: int) -> tuple[list[Path], Path]:
    """Library shards (one per night) and the test night's shard, both cameras."""
    g = load_geometry("mini")
    for name, n, first in (("library", nights, "20240101"), ("test", 1, TEST_NIGHT)):
        kw = dict(geometry=g, nights=n, seed=seed, first_night=first, guide_per_night=0, progress=False)
        simulate_archive(out / "archive" / name, cameras=("GS1",), effects=effects, **kw)
        simulate_archive(out / "archive" / name, cameras=("GS2",), **kw)
    lib = [
        extract([night], out / "shards" / f"{night.name}.h5", g, progress=False).shard
        for night in sorted((out / "archive" / "library").iterdir())
    ]
    test = extract([out / "archive" / "test" / TEST_NIGHT], out / "shards" / "test.h5", g, progress=False).shard
    return lib, test


def train_default(shards: list[Path], model: Path, extra: str) -> float:
    """``deepdark train`` with no options (but ``extra``); its wall-clock seconds."""
    cmd = [sys.executable, "-m", "deepdark", "-q", "train", *map(str, shards), "--out", str(model)]
    t0 = time.perf_counter()
    subprocess.run(cmd + shlex.split(extra), check=True)
    return time.perf_counter() - t0


def score(test: Path, model: Path) -> dict:
    """Pooled RMSE (ADU) per camera of each predictor, and the floor."""
    predictors = {
        "physics": PhysicsModel.load(model / "physics.h5"),
        "selected": model_predictor(model, device="cpu"),
        "network": model_predictor(model, device="cpu", margin=-math.inf),
    }
    table = {}
    with Shard(test) as s:
        tab = s.table
        for cam in sorted(set(tab["camera"])):
            rows = np.flatnonzero(((tab["camera"] == cam) & (tab["imagetyp"] == "DARK")).to_numpy())
            truth = s.target(rows).astype(np.float64)
            row = {}
            for name, p in predictors.items():
                pred = p.predict_rows(s, rows, window=True) if name == "physics" else p(s, rows)
                row[name] = math.sqrt(np.mean((pred - truth) ** 2))
            row["floor"] = math.sqrt(np.mean(tab["floor"].to_numpy()[rows] ** 2))
            row["n_images"] = len(rows)
            table[cam] = row
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--nights", type=int, default=4, help="library nights (the last one validates)")
    p.add_argument("--effects", nargs="+", default=["amp_glow", "pickup"], help="effects of camera GS1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-args", default="", help="options added to `deepdark train`")
    a = p.parse_args(argv)
    lib, test = simulate(a.out, a.nights, a.effects, a.seed)
    seconds = train_default(lib, a.out / "model", a.train_args)
    card = json.loads((a.out / "model" / "model.json").read_text())
    table = score(test, a.out / "model")
    result = {
        "train_seconds": round(seconds, 1),
        "epochs": card["epochs"],
        "best_epoch": card["validation"]["best_epoch"],
        "decision": card["selection"]["decision"],
        "validation": card["selection"]["cameras"],
        "test": table,
    }
    (a.out / "network_selection.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"deepdark train: {seconds:.0f} s, {card['epochs']} epochs, best {card['validation']['best_epoch']}")
    print(f"selection: {card['selection']['decision']}")
    print(f"{'camera':8} {'physics':>16} {'selected':>16} {'network':>16} {'floor':>7}  selected/physics")
    for cam, r in table.items():
        cells = [f"{r[k]:7.2f} ({r[k] / r['floor']:.3f})" for k in ("physics", "selected", "network")]
        ratio = r["selected"] / r["physics"]
        print(f"{cam:8} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} {r['floor']:7.2f}  {ratio:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
