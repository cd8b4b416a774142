"""Ablation of the default model: strips only (the paper) / physics only / both, each
learned variant with and without the adversarial terms (``deepdark`` loss vs ``l1``).

    python benchmarks/ablation_physics.py --lib LIB_SHARDS... --test TEST_SHARDS... \\
        [--exp EXP_SHARDS...] [--masters MASTERS.h5] [--physics PHYS.h5] --out DIR \\
        [--epochs 1] [--max-steps 200] [--crop 256] [--lr 2e-4] [--reuse]

Every learned configuration trains with the same budget and seed (``deepdark.training.loop.train``) on
the library shards (validation: the library's last night); all are scored with
``deepdark.evaluation.evaluate.evaluate`` on the same held-out test darks (and, with ``--exp``, a second
set, e.g. exposures outside the library), beside the physics model, the median masters (when
``--masters``) and the noise floor. Configurations:

=====================  ==============  ===============================
column                 generator input  loss
=====================  ==============  ===============================
``strips+adv``         strips           deepdark (paper: BCE + MSE + L1)
``strips+l1``          strips           L1 only
``physics``            -                (classical, not learned)
``both+adv``           strips+physics   deepdark
``both+l1``            strips+physics   L1 only
=====================  ==============  ===============================

Writes ``DIR/ablation.json`` / ``ablation.csv`` (one row per test set and temperature group) and
prints the tables. ``--reuse`` keeps trained models (training resumes from checkpoints anyway).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from deepdark.evaluation.evaluate import evaluate, format_table
from deepdark.model.runner import model_predictor
from deepdark.physics import fit_physics, physics_predictor
from deepdark.training.loop import train

CONFIGS = {  # column -> (preset, loss)
    "strips+adv": ("compact", "deepdark"),
    "strips+l1": ("compact", "l1"),
    "both+adv": ("physics", "deepdark"),
    "both+l1": ("physics", "l1"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lib", nargs="+", required=True, type=Path, help="library shards (training)")
    p.add_argument("--test", nargs="+", required=True, type=Path, help="held-out test shards")
    p.add_argument("--exp", nargs="+", type=Path, help="a second test set (e.g. other exposure times)")
    p.add_argument("--masters", type=Path, help="median masters of the library (adds median columns)")
    p.add_argument("--physics", type=Path, help="physics model of the library (default: fitted into DIR)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-val-samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    phys = a.physics
    if phys is None:
        phys = a.out / "physics.h5"
        if not phys.exists():
            t = time.perf_counter()
            fit_physics(a.lib, phys, progress=False)
            print(f"physics fit: {time.perf_counter() - t:.0f} s", flush=True)
    seconds = {}
    predictors = {"physics": physics_predictor(phys)}
    for name in a.configs:
        preset, loss = CONFIGS[name]
        t = time.perf_counter()
        res = train(
            a.lib,
            a.out / f"model-{name}",
            preset=preset,
            loss=loss,
            epochs=a.epochs,
            crop=a.crop,
            max_steps_per_epoch=a.max_steps,
            lr=a.lr,
            seed=a.seed,
            device=a.device,
            progress=False,
            max_val_samples=a.max_val_samples,
            physics=phys if preset == "physics" else None,
        )
        seconds[name] = round(time.perf_counter() - t, 1)
        print(
            f"{name}: trained {sum(r['steps'] for r in res.history)} steps in {seconds[name]} s, "
            f"val RMSE {res.val_rmse_adu:.2f} ADU",
            flush=True,
        )
        predictors[name] = model_predictor(res.model_dir, device=a.device)
    rows, tables = [], {}
    for label, shards in (("test", a.test), ("exp", a.exp)):
        if not shards:
            continue
        table = evaluate(
            shards, a.masters, a.out / f"eval_{label}", predictors=predictors, progress=False, figures=False
        )
        tables[label] = table
        print(f"\n{label}: RMSE (ADU) inside the window")
        print(format_table(table))
        for group, row in table.items():
            rows.append({"set": label, "temperature": group, **row})
    budget = dict(epochs=a.epochs, max_steps=a.max_steps, crop=a.crop, lr=a.lr, seed=a.seed)
    (a.out / "ablation.json").write_text(
        json.dumps(
            {
                "budget": budget,
                "train_seconds": seconds,
                "configs": {k: CONFIGS[k] for k in a.configs},
                "tables": tables,
            },
            indent=2,
        )
        + "\n"
    )
    pd.DataFrame(rows).to_csv(a.out / "ablation.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
