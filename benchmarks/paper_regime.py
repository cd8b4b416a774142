"""The paper's strips-only generator against the median darks: why it loses on the simulated
camera, and the regime where it wins (a camera with a weak fixed dark pattern).

    python benchmarks/paper_regime.py --out DIR [--pattern-scale 0.1] [--nights 3] [--seed 0]
        [--epochs 30] [--lr 2e-4] [--lr-schedule linear]

Two simulated ``mini`` archives of camera GS1 (``--nights`` library nights and one held-out test
night, the simulator's default darks: three 30 s darks at each of -5, -10, -15, -25 C per night):
*strong*, the simulator's default camera, and *weak*, the same camera with its fixed dark
pattern (polishing rings, gradients, DSNU, hot and RTS pixels) scaled by ``--pattern-scale``
(``deepdark simulate --pattern-scale``). For each: ``extract`` one shard per night,
``baseline`` (median masters of the library), ``physics-fit``, ``train --preset compact --loss
deepdark`` (the paper's strips-only generator, a CPU budget of minutes: 30 epochs, of 96 steps with 3 nights;
the learning rate decaying linearly to zero, since at a constant rate the validation RMSE of
this GAN at batch size 1 swings by a factor of 3 between epochs; the best epoch on the
library's last night is kept), then the paper's Table 1 on the test night (``evaluate``): pooled RMSE
(ADU) over the model window per setpoint and in total, beside the noise floor.

Evidence, per archive, on the test darks (each frame-channel's window; the true pattern P is the
simulator's noise-free dark signal at the frame's actual temperature, less its mean over the
window, in ADU; it holds the rings, gradients, DSNU, hot pixels, mean RTS and glow):

* error decomposition of each predictor: error = level (the image's mean error) + beta P (the
  error's projection on the pattern) + rest; the three terms are orthogonal, so their pooled
  RMS add in quadrature to the RMSE. beta = -1: the prediction lacks the pattern entirely;
  beta = 0: it holds it exactly.
* the prediction's own spatial structure (less its mean): its RMS beside that of P, and its
  correlation with P, for the whole pattern, its smooth part (a 5 x 5 box mean: rings,
  gradients, glow) and its fine part (the rest: DSNU and hot pixels).

Every stage is skipped when its output exists (delete DIR to start over); training resumes from
its checkpoint. Writes ``DIR/paper_regime.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from deepdark.evaluation.evaluate import evaluate, format_table, median_predictor
from deepdark.io.geometry import load_geometry
from deepdark.io.masters import Masters
from deepdark.io.shards import Shard
from deepdark.model.runner import model_predictor
from deepdark.physics import fit_physics, physics_predictor
from deepdark.pipeline.baseline import build_masters
from deepdark.pipeline.extract import extract
from deepdark.sim.simulate import camera_model, expected_dark, simulate_archive
from deepdark.training.loop import train

GEOMETRY = "mini"
CAMERA = "GS1"
TEST_NIGHT = "20240301"
METHODS = ("median_all", "median_temp", "model", "physics")


def simulate(out: Path, nights: int, seed: int, pattern_scale: float) -> tuple[list[Path], Path]:
    """The library shards (one per night) and the test night's shard of one archive."""
    g = load_geometry(GEOMETRY)
    for name, n, first in (("library", nights, "20240101"), ("test", 1, TEST_NIGHT)):
        if not (out / "archive" / name).exists():
            simulate_archive(
                out / "archive" / name,
                geometry=g,
                nights=n,
                seed=seed,
                cameras=(CAMERA,),
                first_night=first,
                guide_per_night=0,
                progress=False,
                pattern_scale=pattern_scale,
            )
    shards = []
    for night in sorted((out / "archive" / "library").iterdir()) + [out / "archive" / "test" / TEST_NIGHT]:
        shard = out / "shards" / f"{night.name}.h5"
        if not shard.exists():
            extract([night], shard, g, progress=False)
        shards.append(shard)
    return shards[:-1], shards[-1]


def fit_references(out: Path, library: list[Path]) -> tuple[Path, Path]:
    """The median masters and the physics model of the library."""
    masters, physics = out / "masters.h5", out / "physics.h5"
    if not masters.exists():
        build_masters(library, masters, progress=False)
    if not physics.exists():
        fit_physics(library, physics, progress=False)
    return masters, physics


def train_compact(out: Path, library: list[Path], a: argparse.Namespace) -> dict:
    """The paper's strips-only generator (compact preset, the paper's loss); its budget and time."""
    model = out / "model"
    t0 = time.perf_counter()
    res = train(
        library,
        model,
        preset="compact",
        loss="deepdark",
        epochs=a.epochs,
        lr=a.lr,
        lr_schedule=a.lr_schedule,
        patience=0,
        seed=a.seed,
        device="cpu",
        progress=False,
    )
    steps = sum(r["steps"] for r in res.history)
    return dict(
        steps=steps,
        seconds=round(time.perf_counter() - t0, 1),
        best_epoch=res.best_epoch,
        val_rmse_adu=round(res.val_rmse_adu, 2),
    )


def true_patterns(shard: Shard, rows: np.ndarray, seed: int, pattern_scale: float) -> np.ndarray:
    """P of each dark row: the simulator's noise-free dark signal in the window at the frame's
    actual temperature (its SIMTEMP card), less its mean; bias and row offsets are left out, as
    they change from frame to frame."""
    g = shard.geometry
    model = camera_model(CAMERA, seed, g, pattern_scale)
    names = [ch.name for ch in g.channels]
    out, cache = [], {}
    for row in rows:
        rec = shard.table.iloc[row]
        if rec["file"] not in cache:
            temp = fits.getheader(rec["file"])["SIMTEMP"]
            cache[rec["file"]] = expected_dark(model, temp, float(rec["exptime"]))  # bias: gone with the mean
        p = cache[rec["file"]][names.index(rec["channel"])][g.window.slices].astype(np.float64)
        out.append(p - p.mean())
    return np.stack(out)


def _smooth(x: np.ndarray) -> np.ndarray:
    """The 5 x 5 box mean of images (k, S, S): their structure on scales above a few pixels."""
    k, h, w = x.shape
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2)), mode="edge")
    return sum(padded[:, i : i + h, j : j + w] for i in range(5) for j in range(5)) / 25.0


def _fine(x: np.ndarray) -> np.ndarray:
    """The part of images (k, S, S) that a 5 x 5 box mean does not hold: pixel-scale structure."""
    return x - _smooth(x)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * b) / math.sqrt(np.sum(a * a) * np.sum(b * b)))


def evidence(test: Path, predictors: dict, seed: int, pattern_scale: float) -> dict:
    """Per predictor: pooled RMS of the level, pattern and rest terms of its error, the pooled
    beta, and its output's structure beside the true pattern's (module docstring)."""
    with Shard(test) as shard:
        rows = np.flatnonzero((shard.table["imagetyp"] == "DARK").to_numpy())
        truth = shard.target(rows).astype(np.float64)
        pattern = true_patterns(shard, rows, seed, pattern_scale)
        preds = {name: fn(shard, rows).astype(np.float64) for name, fn in predictors.items()}
    n = truth[0].size
    pp = np.sum(pattern * pattern, axis=(1, 2))
    result = {
        "pattern_rms": math.sqrt(np.mean(pattern**2)),
        "pattern_fine_rms": math.sqrt(np.mean(_fine(pattern) ** 2)),
    }
    for name, pred in preds.items():
        err = pred - truth
        level = err.mean(axis=(1, 2))
        dev = err - level[:, None, None]
        beta = np.sum(dev * pattern, axis=(1, 2)) / pp
        rest = dev - beta[:, None, None] * pattern
        shape = pred - pred.mean(axis=(1, 2), keepdims=True)
        result[name] = dict(
            rmse=math.sqrt(np.mean(err**2)),
            level=math.sqrt(np.mean(level**2)),
            pattern=math.sqrt(np.sum(beta**2 * pp) / (n * len(beta))),
            rest=math.sqrt(np.mean(rest**2)),
            beta=float(np.sum(beta * pp) / np.sum(pp)),
            output_rms=math.sqrt(np.mean(shape**2)),
            corr=_corr(shape, pattern),
            smooth_corr=_corr(_smooth(shape), _smooth(pattern)),
            fine_rms=math.sqrt(np.mean(_fine(shape) ** 2)),
            fine_corr=_corr(_fine(shape), _fine(pattern)),
        )
    return result


def run_regime(out: Path, pattern_scale: float, a: argparse.Namespace) -> dict:
    """One archive end to end: Table 1, the training budget and the evidence."""
    library, test = simulate(out, a.nights, a.seed, pattern_scale)
    masters, physics = fit_references(out, library)
    budget = train_compact(out, library, a)
    predictors = {
        "median_all": median_predictor(Masters(masters), "all"),
        "median_temp": median_predictor(Masters(masters), "temp"),
        "model": model_predictor(out / "model", device="cpu"),
        "physics": physics_predictor(physics),
    }
    table = evaluate([test], masters, out / "eval", predictors=predictors, progress=False, figures=False)
    return dict(
        pattern_scale=pattern_scale,
        train=budget,
        table=table,
        evidence=evidence(test, predictors, a.seed, pattern_scale),
    )


def print_evidence(label: str, ev: dict) -> None:
    print(
        f"\n{label}: error = level + beta P + rest on the test darks (pooled RMS, ADU); true pattern P: "
        f"RMS {ev['pattern_rms']:.2f}, fine part {ev['pattern_fine_rms']:.2f}"
    )
    print(f"{'method':12} {'RMSE':>8} {'level':>8} {'beta*P':>8} {'rest':>8} {'beta':>6}   output vs P:", end="")
    print(f" {'RMS':>7} {'corr':>6} {'smooth corr':>11} {'fine RMS':>8} {'fine corr':>9}")
    for name in METHODS:
        e = ev[name]
        print(
            f"{name:12} {e['rmse']:8.2f} {e['level']:8.2f} {e['pattern']:8.2f} {e['rest']:8.2f} {e['beta']:6.2f}"
            f"   {'':11} {e['output_rms']:7.2f} {e['corr']:6.2f} {e['smooth_corr']:11.2f} {e['fine_rms']:8.2f}"
            f" {e['fine_corr']:9.2f}"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--pattern-scale", type=float, default=0.1, help="fixed-pattern strength of the weak archive")
    p.add_argument("--nights", type=int, default=3, help="library nights (the last one validates)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cameras, the frames and the training")
    p.add_argument("--epochs", type=int, default=30, help="training epochs of the compact generator")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate")
    p.add_argument("--lr-schedule", default="linear", help="constant, linear or pix2pix (deepdark train)")
    a = p.parse_args(argv)
    results = {}
    for label, scale in (("strong", 1.0), ("weak", a.pattern_scale)):
        results[label] = run_regime(a.out / label, scale, a)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "paper_regime.json").write_text(json.dumps(results, indent=1) + "\n")
    for label, r in results.items():
        t = r["train"]
        print(
            f"\n{label} pattern (scale {r['pattern_scale']:g}): Table 1 on the test night, RMSE (ADU); compact "
            f"generator {t['steps']} steps in {t['seconds']:.0f} s"
        )
        print(format_table(r["table"]))
    for label, r in results.items():
        print_evidence(label, r["evidence"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
