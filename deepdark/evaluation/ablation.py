"""The paper's ablation (3.3, Table 2): the four loss configurations at one setpoint (-15 C).

Each configuration (``deepdark.model.losses.LOSSES``) trains the same generator preset with the same
budget (epochs, steps, batch size, learning rate, crops) and the same seed - so the same
initial weights and the same sample order - on the darks at the setpoint of the training nights;
all are then scored, with the median baseline, on the darks at the setpoint of the held-out test
nights (split by night, never by frame; default: the last night(s), as
:func:`deepdark.training.data.split_nights` splits off validation nights).

The median baseline is the paper's: the per-pixel median of the training darks at the setpoint
(per camera, channel and exposure time), computed here from the training nights only.

Writes ``DIR/table2.json`` and ``DIR/table2.csv`` (one row per configuration: generator and
discriminator losses, RMSE in ADU pooled over the test windows, the paper's RMSE for reference,
image count), and keeps each configuration's model in ``DIR/model-<loss>/`` (resumable).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from deepdark.evaluation.evaluate import Predictor, Scores
from deepdark.io.atomic import atomic_path
from deepdark.io.errors import InputError
from deepdark.io.masters import streamed_medians
from deepdark.io.shards import Shard
from deepdark.model.runner import model_predictor
from deepdark.model.runtime import DEFAULT_BATCH_SIZE, DEFAULT_DEVICE
from deepdark.training import TrainConfig, open_library, split_nights, train

# configuration -> (paper's number, generator loss, discriminator loss, paper's RMSE)
CONFIGURATIONS = {
    "median": ("baseline", "per-pixel median of the training darks", "", 20.6),
    "pix2pix": ("1", "L_BCE(G) + L_L1(G)", "L_BCE(D)", 21.1),
    "lsgan": ("2", "L_MSE(G) + L_L1(G)", "L_MSE(D)", 18.7),
    "mixed": ("3", "L_MSE(G) + L_L1(G)", "L_BCE(D)", 23.2),
    "deepdark": ("Deep-Dark-Net", "L_BCE(G) + L_MSE(G) + L_L1(G)", "L_MSE(D)", 16.9),
}
DEFAULT_LOSSES = ("pix2pix", "lsgan", "mixed", "deepdark")


def ablation(
    shards: Sequence[str | Path],
    out_dir: str | Path,
    setpoint: float = -15.0,
    losses: Sequence[str] = DEFAULT_LOSSES,
    preset: str = "compact",
    epochs: int = 5,
    batch_size: int = 1,
    lr: float = 2e-5,
    l1_weight: float = 100.0,
    crop: int | None = None,
    test_nights=None,
    device: str = DEFAULT_DEVICE,
    seed: int = 0,
    max_steps_per_epoch: int | None = None,
    progress: bool = True,
    resume: bool = True,
    memory_mb: int = 512,
    batch_eval: int = DEFAULT_BATCH_SIZE,
    **train_kw,
) -> dict:
    """Train every loss configuration of ``losses`` and score them with the median baseline on
    the held-out nights' darks at ``setpoint``; write ``table2.json``/``table2.csv``; return the table."""
    out_dir = Path(out_dir)
    _check_losses(losses)
    # the budget every configuration trains with, as Table 2 reports it
    budget = dict(
        preset=preset,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        crop=crop,
        max_steps_per_epoch=max_steps_per_epoch,
        seed=seed,
        l1_weight=l1_weight,
    )
    with open_library(shards, setpoints=[setpoint]) as lib:
        train_nights, test = _split(lib, setpoint, test_nights)
        tab = lib.table
        test_tab = tab[tab["night"].isin(test)]
        train_tab = tab[tab["night"].isin(train_nights)]
        medians = _median_masters(lib, train_tab, memory_mb)
        settings = dict(budget, val_nights=0, device=device, resume=resume, setpoints=[setpoint], nights=train_nights)
        runs = {name: _train_one(lib, out_dir, name, settings, train_kw, progress) for name in losses}
        scores = _score(lib, test_tab, medians, runs, device, batch_eval, progress)
        totals, n_images = scores.pooled.table()["total"], len(scores.per_image)

    rows_out = _table_rows(losses, runs, totals)
    table = {
        "setpoint": setpoint,
        "train_nights": train_nights,
        "test_nights": test,
        "n_train_samples": int(len(train_tab)),
        "n_test_images": n_images,
        "budget": budget,
        "rows": rows_out,
    }
    _write_table(out_dir, table)
    return table


def _check_losses(losses: Sequence[str]) -> None:
    unknown = [name for name in losses if name not in CONFIGURATIONS or name == "median"]
    if unknown:
        raise InputError(f"unknown loss configuration(s) {unknown}; valid: {', '.join(DEFAULT_LOSSES)}")


def _split(lib, setpoint: float, test_nights) -> tuple[list[str], list[str]]:
    """(training nights, test nights) of the darks at ``setpoint``: split by night, as training
    splits off its validation nights."""
    all_nights = sorted(set(lib.table["night"]))
    if len(all_nights) < 2:
        raise InputError(
            f"the ablation needs two nights or more with darks at {setpoint:g} C "
            f"(training and test), found {all_nights}"
        )
    train_nights, test = split_nights(all_nights, test_nights)
    if not test:
        raise InputError("no test night")
    return train_nights, test


def _train_one(lib, out_dir: Path, name: str, settings: dict, train_kw: dict, progress: bool) -> dict:
    """Train loss configuration ``name`` into ``out_dir/model-<name>``: its model, seconds, steps."""
    t0 = time.perf_counter()
    config = TrainConfig(loss=name, **settings, **train_kw)
    res = train(lib.paths, out_dir / f"model-{name}", config, progress=progress)
    return dict(model=res.model_dir, seconds=time.perf_counter() - t0, steps=int(sum(r["steps"] for r in res.history)))


def _write_table(out_dir: Path, table: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "table2.json") as tmp:
        tmp.write_text(json.dumps(table, indent=2, default=str) + "\n")
    with atomic_path(out_dir / "table2.csv") as tmp:
        pd.DataFrame(table["rows"]).to_csv(tmp, index=False)


def _score(lib, test_tab: pd.DataFrame, medians: dict, runs: dict, device, batch_eval: int, progress: bool) -> Scores:
    """The median baseline and every trained model on the test darks, scored by evaluate's loop."""
    methods = {"median": _median_predictor(medians)}
    for name, run in runs.items():
        methods[name] = model_predictor(run["model"], area="window", device=device, batch_size=batch_eval)
    scores = Scores()
    for shard_no, sel in test_tab.groupby("shard_no", sort=True):
        scores.add_shard(lib.shards[int(shard_no)], np.sort(sel["row"].to_numpy()), methods, batch_eval, progress)
    return scores


def _table_rows(losses: Sequence[str], runs: dict, totals: dict) -> list[dict]:
    """Table 2's rows: the median baseline, each loss configuration, and the floor when known."""
    rows = []
    for name in ("median", *losses):
        number, gen, disc, paper = CONFIGURATIONS[name]
        rows.append(
            {
                "configuration": number,
                "loss": name,
                "generator": gen,
                "discriminator": disc,
                "rmse_adu": totals[name],
                "paper_rmse": paper,
                "train_seconds": round(runs[name]["seconds"], 1) if name in runs else None,
                "steps": runs[name]["steps"] if name in runs else None,
            }
        )
    if "floor" in totals:
        rows.append(
            {
                "configuration": "floor",
                "loss": "floor",
                "generator": "noise floor (simulated truth)",
                "discriminator": "",
                "rmse_adu": totals["floor"],
                "paper_rmse": None,
                "train_seconds": None,
                "steps": None,
            }
        )
    return rows


def _median_masters(lib, train_tab: pd.DataFrame, memory_mb: float) -> dict[tuple, np.ndarray]:
    """(camera, channel, exptime) -> per-pixel median window of the training darks (ADU, float32),
    streamed a block of rows at a time within ``memory_mb``, as the master-dark files are."""
    rows, cols = lib.geometry.window_in_active
    return {
        (camera, channel, float(exptime)): streamed_medians(lib.shards, sel, memory_mb, rows, cols)[0]
        for (camera, channel, exptime), sel in train_tab.groupby(["camera", "channel", "exptime"], sort=True)
    }


def _median_predictor(medians: dict) -> Predictor:
    """The ablation's median baseline as a window predictor: each dark's training median."""

    def predict(shard: Shard, rows: np.ndarray) -> np.ndarray:
        return np.stack([_median_of(medians, rec) for _, rec in shard.table.iloc[rows].iterrows()])

    return predict


def _median_of(medians: dict, rec) -> np.ndarray:
    key = (rec["camera"], rec["channel"], float(rec["exptime"]))
    if key not in medians:
        raise ValueError(
            f"no training dark for camera {key[0]} channel {key[1]} exposure {key[2]:g} s: "
            "the median baseline cannot score this test dark"
        )
    return medians[key]


def format_table2(table: dict) -> str:
    frame = pd.DataFrame(table["rows"])[["configuration", "generator", "discriminator", "rmse_adu", "paper_rmse"]]
    head = (
        f"Table 2 at {table['setpoint']:g} C: trained on nights {','.join(table['train_nights'])}, "
        f"tested on {','.join(table['test_nights'])} ({table['n_test_images']} images)"
    )
    return head + "\n" + frame.to_string(index=False, float_format=lambda x: f"{x:.2f}")
