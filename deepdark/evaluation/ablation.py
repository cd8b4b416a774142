"""The paper's ablation (3.3, Table 2): the four loss configurations at one setpoint (-15 C).

Each configuration (``deepdark.model.losses.LOSSES``) trains the same generator preset with the same
budget (epochs, steps, batch size, learning rate, crops) and the same seed - so the same
initial weights and the same sample order - on the darks at the setpoint of the training nights;
all are then scored, with the median baseline, on the darks at the setpoint of the held-out test
nights (split by night, never by frame; default: the last night(s), as ``deepdark.training.loop``).

The median baseline is the paper's: the per-pixel median of the training darks at the setpoint
(per camera, channel and exposure time), computed here from the training nights only.

Writes ``DIR/table2.json`` and ``DIR/table2.csv`` (one row per configuration: generator and
discriminator losses, RMSE in ADU pooled over the test windows, the paper's RMSE for reference,
image count), and keeps each configuration's model in ``DIR/model-<loss>/`` (resumable).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from deepdark.evaluation.metrics import PooledRMSE
from deepdark.io.atomic import atomic_path
from deepdark.model.runner import model_predictor
from deepdark.training.loop import open_library, split_nights, train

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
    device: str = "auto",
    seed: int = 0,
    max_steps_per_epoch: int | None = None,
    progress: bool = True,
    resume: bool = True,
    memory_mb: int = 512,
    batch_eval: int = 4,
    **train_kw,
) -> dict:
    """Train every loss configuration of ``losses`` and score them with the median baseline on
    the held-out nights' darks at ``setpoint``; write ``table2.json``/``table2.csv``; return the table."""
    out_dir = Path(out_dir)
    unknown = [name for name in losses if name not in CONFIGURATIONS or name == "median"]
    if unknown:
        raise ValueError(f"unknown loss configuration(s) {unknown}; valid: {', '.join(DEFAULT_LOSSES)}")
    with open_library(shards, setpoints=[setpoint]) as lib:
        all_nights = sorted(set(lib.table["night"]))
        if len(all_nights) < 2:
            raise ValueError(
                f"the ablation needs two nights or more with darks at {setpoint:g} C "
                f"(training and test), found {all_nights}"
            )
        train_nights, test = split_nights(all_nights, test_nights)
        if not test:
            raise ValueError("no test night")
        tab = lib.table
        test_tab = tab[tab["night"].isin(test)]
        train_tab = tab[tab["night"].isin(train_nights)]
        medians = _median_masters(lib, train_tab, memory_mb)

        runs = {}
        for name in losses:
            t0 = time.perf_counter()
            res = train(
                lib.paths,
                out_dir / f"model-{name}",
                preset=preset,
                loss=name,
                l1_weight=l1_weight,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                crop=crop,
                val_nights=0,
                device=device,
                seed=seed,
                max_steps_per_epoch=max_steps_per_epoch,
                progress=progress,
                resume=resume,
                setpoints=[setpoint],
                nights=train_nights,
                **train_kw,
            )
            runs[name] = dict(
                model=res.model_dir, seconds=time.perf_counter() - t0, steps=int(sum(r["steps"] for r in res.history))
            )

        pooled = PooledRMSE()
        predictors = {
            name: model_predictor(r["model"], device=device, batch_size=batch_eval) for name, r in runs.items()
        }
        n_images = 0
        for shard_no, sel in test_tab.groupby("shard_no", sort=True):
            shard = lib.shards[int(shard_no)]
            rows_all = np.sort(sel["row"].to_numpy())
            for start in range(0, len(rows_all), batch_eval):
                rows = rows_all[start : start + batch_eval]
                truth = shard.target(rows).astype(np.float32)
                recs = shard.table.iloc[rows]
                med = np.stack([_median_of(medians, r) for _, r in recs.iterrows()])
                preds = {"median": med, **{n: fn(shard, rows) for n, fn in predictors.items()}}
                for k in range(len(rows)):
                    for name, p in preds.items():
                        pooled.add(name, ("total",), p[k], truth[k])
                    floor = float(recs.iloc[k]["floor"])
                    if math.isfinite(floor):
                        pooled.add_squared("floor", ("total",), floor**2 * truth[k].size, truth[k].size)
                    n_images += 1
        scores = pooled.table()["total"]

    rows_out = []
    for name in ("median", *losses):
        number, gen, disc, paper = CONFIGURATIONS[name]
        rows_out.append(
            {
                "configuration": number,
                "loss": name,
                "generator": gen,
                "discriminator": disc,
                "rmse_adu": scores[name],
                "paper_rmse": paper,
                "train_seconds": round(runs[name]["seconds"], 1) if name in runs else None,
                "steps": runs[name]["steps"] if name in runs else None,
            }
        )
    if "floor" in scores:
        rows_out.append(
            {
                "configuration": "floor",
                "loss": "floor",
                "generator": "noise floor (simulated truth)",
                "discriminator": "",
                "rmse_adu": scores["floor"],
                "paper_rmse": None,
                "train_seconds": None,
                "steps": None,
            }
        )
    table = {
        "setpoint": setpoint,
        "train_nights": train_nights,
        "test_nights": test,
        "n_train_samples": int(len(train_tab)),
        "n_test_images": n_images,
        "budget": {
            "preset": preset,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "crop": crop,
            "max_steps_per_epoch": max_steps_per_epoch,
            "seed": seed,
            "l1_weight": l1_weight,
        },
        "rows": rows_out,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "table2.json") as tmp:
        tmp.write_text(json.dumps(table, indent=2, default=str) + "\n")
    with atomic_path(out_dir / "table2.csv") as tmp:
        pd.DataFrame(rows_out).to_csv(tmp, index=False)
    return table


def _median_masters(lib, train_tab: pd.DataFrame, memory_mb: int) -> dict[tuple, np.ndarray]:
    """(camera, channel, exptime) -> per-pixel median window of the training darks (ADU, float32),
    streamed a block of rows at a time within ``memory_mb``."""
    g = lib.geometry
    rows, cols = g.window_in_active
    out = {}
    for (camera, channel, exptime), sel in train_tab.groupby(["camera", "channel", "exptime"], sort=True):
        members = []
        for shard_no, part in sel.groupby("shard_no"):
            shard = lib.shards[int(shard_no)]
            members.append((shard, np.sort(shard.table["active_index"].to_numpy()[part["row"].to_numpy()])))
        n = len(sel)
        width = g.active.shape[1]
        block = max(1, min(g.window_size, int(memory_mb * 2**20 // (4 * n * width))))
        med = np.empty((g.window_size, g.window_size), dtype=np.float32)
        for r0 in range(rows.start, rows.stop, block):
            r1 = min(rows.stop, r0 + block)
            stack = np.concatenate([s.f["active"][idx, r0:r1, :] for s, idx in members])
            med[r0 - rows.start : r1 - rows.start] = np.median(stack[..., cols], axis=0)
        out[camera, channel, float(exptime)] = med
    return out


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
