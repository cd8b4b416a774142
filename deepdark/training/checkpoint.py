"""Training checkpoints and the training log.

Reproducibility, checkpoints, resume
------------------------------------
Weights are initialised from ``seed`` (generator) and ``seed + 1`` (discriminator); the order of
samples and the crop positions of epoch e come from an rng seeded by (seed, e) only. Same seed,
same data, same settings => the same weights on CPU (same torch build and thread count).

After every epoch the generator, the discriminator and both Adam states go to
``checkpoint-eNNNN.safetensors`` (tensors only) and ``checkpoint.json`` (epoch, history, optimiser
scalars, the run's settings and the tensors file's SHA-256) - both atomically, the JSON last,
older tensor files removed after (:func:`save_checkpoint`). Nothing is pickled. ``train`` called
again on the same ``out_dir`` with the same settings resumes from the last complete epoch (a run
killed mid-epoch loses only that epoch) and gives the weights of an uninterrupted run; ``epochs``
may be raised to continue (with ``lr_schedule="constant"``: a decaying schedule depends on the
epoch count; ``deepdark.training.config.TrainConfig.signature``). ``training_log.csv`` (epoch,
losses, val RMSE in ADU, seconds) is rewritten from the checkpoint's history each epoch
(:func:`write_log`). The checkpoint also carries the early-stopping state (``extra["stopping"]``,
``deepdark.training.stopping``). The model file (``deepdark.model.files``) is written when training
is done, with the best epoch's weights.
"""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from deepdark import __version__
from deepdark.io.atomic import atomic_path
from deepdark.io.errors import InputError
from deepdark.model.files import (
    check_state,
    file_sha256,
    json_default,
    read_safetensors,
    safetensors_metadata,
    state_tensors,
)

CHECKPOINT_JSON = "checkpoint.json"
CHECKPOINT_FORMAT = "deepdark-checkpoint"
LOG_FILE = "training_log.csv"
LOG_COLUMNS = ("epoch", "steps", "d_loss", "g_loss", "g_bce", "g_mse", "g_l1", "val_rmse_adu", "seconds")


def _optimizer_split(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser's state dict as (tensors for safetensors, JSON-able scalars)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}/state/{idx}/{name}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[name] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "state_scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> dict:
    """The state dict of an optimiser from :func:`_optimizer_split`'s two parts."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "/state/"):
            _, _, idx, name = key.split("/", 3)
            state.setdefault(int(idx), {})[name] = v
    for idx, d in meta.get("state_scalars", {}).items():
        state.setdefault(int(idx), {}).update(d)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}


def save_checkpoint(
    out_dir: Path,
    epoch: int,
    G: nn.Module,
    D: nn.Module,
    opt_g,
    opt_d,
    scaler,
    signature: dict,
    history: list[dict],
    extra: dict | None = None,
) -> Path:
    """Tensors to ``checkpoint-eNNNN.safetensors``, then ``checkpoint.json``, both atomic."""
    from safetensors.torch import save_file

    tensors = {**state_tensors(G, "G/"), **state_tensors(D, "D/")}
    tg, mg = _optimizer_split(opt_g, "optG")
    td, md = _optimizer_split(opt_d, "optD")
    tensors.update(tg)
    tensors.update(td)
    name = f"checkpoint-e{epoch:04d}.safetensors"
    with atomic_path(out_dir / name) as tmp:
        save_file(tensors, str(tmp), metadata=safetensors_metadata(format=CHECKPOINT_FORMAT, epoch=epoch))
    state = {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "tensors": name,
        "sha256": file_sha256(out_dir / name),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": __version__,
        "signature": signature,
        "history": history,
        "optimizers": {"G": mg, "D": md},
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "extra": extra or {},
    }
    with atomic_path(out_dir / CHECKPOINT_JSON) as tmp:
        tmp.write_text(json.dumps(state, indent=1, default=json_default) + "\n")
    for old in out_dir.glob("checkpoint-e*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return out_dir / CHECKPOINT_JSON


def read_checkpoint(out_dir: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(JSON state, tensors) of the last complete checkpoint in ``out_dir``, or None."""
    path = out_dir / CHECKPOINT_JSON
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: unreadable checkpoint state ({exc}); remove it or train with resume=False") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a deepdark checkpoint")
    tpath = out_dir / state["tensors"]
    if not tpath.is_file() or file_sha256(tpath) != state["sha256"]:
        raise InputError(f"{path}: its tensors file {state['tensors']} is missing or does not match its hash")
    return state, read_safetensors(tpath)


def write_log(out_dir: Path, history: list[dict]) -> None:
    """``training_log.csv`` from the history of the epochs (missing and NaN values left empty)."""
    with atomic_path(out_dir / LOG_FILE) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=LOG_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow(
                {
                    k: ("" if row.get(k) is None or (isinstance(row.get(k), float) and math.isnan(row[k])) else row[k])
                    for k in LOG_COLUMNS
                }
            )


def check_signature(out_dir: Path, state: dict, signature: dict) -> None:
    """Refuse to resume a checkpoint made with other settings (any key of ``signature`` that differs)."""
    diff = {k: (state["signature"].get(k), v) for k, v in signature.items() if state["signature"].get(k) != v}
    if diff:
        detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise InputError(
            f"{out_dir / CHECKPOINT_JSON} was made with other settings ({detail}); "
            "use another output directory, or resume=False (--no-resume) to start over"
        )


def restore_checkpoint(state: dict, tensors: dict[str, torch.Tensor], G, D, opt_g, opt_d, scaler) -> None:
    """Load the networks, optimisers and gradient scaler from a checkpoint (:func:`read_checkpoint`)."""
    gs, ds = _strip_prefix(tensors, "G"), _strip_prefix(tensors, "D")
    check_state(G.state_dict(), gs, "checkpoint generator")
    check_state(D.state_dict(), ds, "checkpoint discriminator")
    G.load_state_dict(gs)
    D.load_state_dict(ds)
    opt_g.load_state_dict(_optimizer_join(tensors, state["optimizers"]["G"], "optG"))
    opt_d.load_state_dict(_optimizer_join(tensors, state["optimizers"]["D"], "optD"))
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])


def remove_checkpoint(out_dir: Path) -> None:
    """Remove the checkpoint of ``out_dir`` (its tensors files, then its state), to start over."""
    for old in out_dir.glob("checkpoint-e*.safetensors"):
        old.unlink()
    (out_dir / CHECKPOINT_JSON).unlink(missing_ok=True)
