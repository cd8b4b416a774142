"""Training Deep-Dark-Net (paper 3.1): a conditional GAN on the dark library, split by night.

Samples
-------
Every channel of every DARK frame of the given shards is one sample: input = its strips A1, A2,
A3 of the model window (``deepdark.model.nets.model_input``), target = its window B, both scaled to
[0, 1]. Samples are split by *night* (never by frame): the validation nights are held out whole,
by default the last night(s) (at least one when there are two or more nights;
:func:`split_nights`).

Crops (CPU training)
--------------------
``crop=None`` trains on whole windows, as the paper. ``crop=c`` (a multiple of the generator's
``multiple``) trains on random c x c crops. Two ways to crop the input (``crop_mode``):

* ``"window"`` (default): the input is built for the whole window exactly as inference builds it
  (each whole strip resized to the window) and input and target are cropped at the same place,
  so the network is trained on exactly the pixels it sees at inference;
* ``"strips"``: the strips are cropped first - A1 and A2 to the crop's rows, A3 to its columns -
  and resized to the crop. Cheaper, but the resize then stretches the 46 overscan columns and 4
  optical-black rows over c pixels instead of the window's S, a different input from inference's.

Validation is run on whole windows, or, when ``crop`` is set, on the centre c x c crop of each
window (cropped from the whole-window input, as above); the card and the log say which. It
reports the RMSE in ADU, pooled over pixels (``deepdark.evaluation.metrics``).

Batch norm (read this)
----------------------
The strips carry the absolute bias and dark level of a frame, and the level is most of a dark.
Batch norm in training mode normalises each feature channel by the statistics of the batch: with
the paper's batch size 1 that is per-image normalisation, which removes any uniform offset of
the input - a generator trained so cannot learn the level from the strips, and it computes a
different function at inference, which runs in eval mode on running statistics
(``Generator.predict``): on our simulated darks it reaches thousands of ADU of error there.
``bn`` chooses what the generator's batch-norm layers do while training:

* ``"running"`` (default): they normalise with their running statistics, exactly as at
  inference, and :func:`track_running_stats` updates those statistics after each forward pass
  (an exponential average of the batches' statistics with rate ``bn_momentum``, no gradient
  through it). Before the first step the statistics are set from one batch of training crops
  (:func:`calibrate_batchnorm`). Training and inference compute the same function and the level
  survives; the topology stays the paper's. (Freezing the statistics of the initial network
  instead diverges: they go stale as the weights grow.)
* ``"batch"``: the reference behaviour (batch statistics while training, running statistics at
  inference). Faithful to pix2pix; with small batches it cannot learn the level (see above).

``norm="none"`` / ``"instance"`` override the preset's normalisation instead (recorded on the
card; instance norm erases the level at inference too). The discriminator always uses batch
statistics, as the reference: it is not used at inference.

Output level
------------
The reference initialisation starts the generator at (tanh(0) + 1) / 2 = 0.5 = 32768 ADU while
darks lie near 0.02 (1000-2000 ADU): at the paper's learning rate Adam needs ~1e5 steps just to
move the output bias there. ``init_level=True`` (default) sets the output bias so that the
untrained generator predicts the mean level of the training targets (:func:`init_output_level`).

Reproducibility, checkpoints, resume
------------------------------------
Weights are initialised from ``seed`` (generator) and ``seed + 1`` (discriminator); the order of
samples and the crop positions of epoch e come from an rng seeded by (seed, e) only. Same seed,
same data, same settings => the same weights on CPU (same torch build and thread count).

After every epoch the generator, the discriminator and both Adam states go to
``checkpoint-eNNNN.safetensors`` (tensors only) and ``checkpoint.json`` (epoch, history, optimiser
scalars, the run's settings and the tensors file's SHA-256) - both atomically, the JSON last,
older tensor files removed after. Nothing is pickled. ``train`` called again on the same
``out_dir`` with the same settings resumes from the last complete epoch (a run killed
mid-epoch loses only that epoch) and gives the weights of an uninterrupted run; ``epochs`` may be
raised to continue (with ``lr_schedule="constant"``: a decaying schedule depends on the epoch
count). ``training_log.csv`` (epoch, losses, val RMSE in ADU, seconds) is rewritten
from the checkpoint's history each epoch. The model file (``deepdark.model.files``) is written when
the last epoch is done.

Data loading
------------
Shards stay open; strips and window targets are read per sample (one HDF5 chunk each) and kept
in memory up to ``cache_mb`` (a small library is read once; a large one streams from disk).

Devices
-------
``device="auto"`` uses CUDA when available, else the CPU. On CUDA the networks run under
autocast with float16 (and a gradient scaler): float16 keeps 11 significant bits, enough for the
inputs' ~1e-5 detail (0.5 ADU at a 1000 ADU level), where bfloat16's 8 bits would lose 4 ADU.
The generator's output layer always runs in float32 (see ``fp32_head``): (tanh + 1) / 2 near the
dark level (~0.02) is computed from tanh ~ -0.96, where half precision resolves only ~16 ADU.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from deepdark import __version__
from deepdark.io.atomic import atomic_path
from deepdark.io.geometry import Geometry
from deepdark.io.shards import Shard
from deepdark.io.tables import common_geometry, library_table
from deepdark.io.units import adu_to_unit, unit_to_adu
from deepdark.model import conditioning as C
from deepdark.model.files import (
    DEFAULT_INPUTS,
    check_state,
    file_sha256,
    json_default,
    read_safetensors,
    save_model,
    state_tensors,
)
from deepdark.model.losses import LossConfig, discriminator_loss, generator_loss
from deepdark.model.nets import PHYSICS_PRESETS, PRESETS, Discriminator, Generator, model_input
from deepdark.model.runtime import autocast, fp32_head, resolve_device

log = logging.getLogger(__name__)

CHECKPOINT_JSON = "checkpoint.json"
CHECKPOINT_FORMAT = "deepdark-checkpoint"
LOG_FILE = "training_log.csv"
LOG_COLUMNS = ("epoch", "steps", "d_loss", "g_loss", "g_bce", "g_mse", "g_l1", "val_rmse_adu", "seconds")
BN_MODES = ("running", "batch")
CROP_MODES = ("window", "strips")
LR_SCHEDULES = ("constant", "linear", "pix2pix")
CALIBRATION_SAMPLES = 16  # crops in the one batch that sets the initial batch-norm statistics
CALIBRATION_CROP = 256  # ... at most this size (statistics are per channel over space)


# ---------------------------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# the library and the night split
# ---------------------------------------------------------------------------------------------


def split_nights(nights: Sequence[str], val_nights: int | Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(train nights, validation nights), disjoint, from the sorted distinct ``nights``.

    ``None``: the last ``max(1, round(n / 5))`` nights when there are two or more, none with
    one night; an int k: the last k nights; a list: those nights. At least one night trains.
    """
    nights = sorted(set(nights))
    if isinstance(val_nights, (int, np.integer)) and not isinstance(val_nights, bool):
        k = int(val_nights)
        if k < 0:
            raise ValueError(f"val_nights must be >= 0, got {k}")
        val = nights[len(nights) - k :] if k else []
    elif val_nights is None:
        val = nights[-max(1, round(len(nights) / 5)) :] if len(nights) >= 2 else []
    else:
        val = sorted({str(v) for v in val_nights})
        unknown = [v for v in val if v not in nights]
        if unknown:
            raise ValueError(f"validation night(s) {unknown} not in the shards' nights {nights}")
    train = [n for n in nights if n not in val]
    if not train:
        raise ValueError(f"no training night left: nights {nights}, validation {val}")
    return train, val


@dataclass
class Library:
    """The DARK frame-channels of some shards: one table row per sample."""

    paths: list[Path]
    shards: list[Shard]
    geometry: Geometry
    table: pd.DataFrame  # shard_no, row, night, camera, channel, exptime, setpoint, floor, file_hash

    def close(self) -> None:
        for s in self.shards:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


def open_library(
    shards: Sequence[str | Path], setpoints: Sequence[float] | None = None, nights: Sequence[str] | None = None
) -> Library:
    """Open ``shards`` and list their DARK frame-channels (optionally only ``setpoints`` / ``nights``)."""
    paths = [Path(p) for p in shards]
    if not paths:
        raise ValueError("no shards given")
    opened: list[Shard] = []
    try:
        for p in paths:
            opened.append(Shard(p))
        common_geometry(opened)
        columns = ["shard_no", "row", "night", "camera", "channel", "exptime", "setpoint", "floor", "file_hash"]
        table = library_table(opened)
        table = table[columns] if not table.empty else pd.DataFrame(columns=columns)
        if setpoints is not None:
            table = table[
                np.isclose(table["setpoint"].to_numpy()[:, None], np.asarray(setpoints, float)[None, :]).any(axis=1)
            ]
        if nights is not None:
            table = table[table["night"].isin([str(n) for n in nights])]
        if table.empty:
            raise ValueError(
                f"no DARK frames in {', '.join(map(str, paths))}"
                + (f" at setpoints {list(setpoints)}" if setpoints is not None else "")
                + (f" in nights {list(nights)}" if nights is not None else "")
            )
        table = table.sort_values(["night", "shard_no", "row"], kind="stable").reset_index(drop=True)
        return Library(paths, opened, opened[0].geometry, table)
    except BaseException:
        for s in opened:
            s.close()
        raise


class SampleSource:
    """Window strips and targets of library samples, read on demand and cached up to a budget.

    With ``physics`` (a ``deepdark.physics.PhysicsModel``) every item also carries the physics
    prediction of its window (float32 ADU), computed for all channels of a frame at once (the
    frame's effective temperature uses the optical-black pixels of all its channels)."""

    def __init__(self, lib: Library, cache_mb: float = 1024, physics=None):
        self.lib = lib
        self.budget = int(cache_mb * 2**20)
        self.used = 0
        self.cache: dict[int, tuple] = {}
        self.physics = physics
        self._phys: dict[int, np.ndarray] = {}

    def _physics_of(self, i: int) -> np.ndarray:
        hit = self._phys.pop(i, None)
        if hit is not None:
            return hit
        tab = self.lib.table
        rec = tab.iloc[i]
        same = np.flatnonzero(
            ((tab["shard_no"] == rec["shard_no"]) & (tab["file_hash"] == rec["file_hash"])).to_numpy()
        )
        shard_rows = tab["row"].to_numpy()[same]
        order = np.argsort(shard_rows)
        same, shard_rows = same[order], shard_rows[order]
        pred = self.physics.predict_rows(self.lib.shards[int(rec["shard_no"])], shard_rows, window=True)
        out = None
        for k, j in enumerate(same):
            p = np.ascontiguousarray(pred[k], dtype=np.float32)
            if int(j) == i:
                out = p
            elif int(j) not in self.cache and self.used + p.nbytes <= self.budget:
                self._phys[int(j)] = p  # consumed (moved into the item cache) when j is read
                self.used += p.nbytes
        return out

    def get(self, i: int) -> tuple[np.ndarray, ...]:
        """(a1, a2, a3, target) of sample ``i`` (library table row), window-sized, uint16;
        plus the physics prediction of the window (float32 ADU) with ``physics``."""
        hit = self.cache.get(i)
        if hit is not None:
            return hit
        rec = self.lib.table.iloc[i]
        shard = self.lib.shards[int(rec["shard_no"])]
        rows = np.array([int(rec["row"])])
        s = shard.strips(rows, window=True)
        item = (
            np.ascontiguousarray(s["a1"][0]),
            np.ascontiguousarray(s["a2"][0]),
            np.ascontiguousarray(s["a3"][0]),
            np.ascontiguousarray(shard.target(rows)[0]),
        )
        if self.physics is not None:
            had = i in self._phys
            phys = self._physics_of(i)
            if had:
                self.used -= phys.nbytes
            item = (*item, phys)
        size = sum(a.nbytes for a in item)
        if self.used + size <= self.budget:
            self.cache[i] = item
            self.used += size
        return item


def build_batch(
    items: Sequence[tuple],
    size: int,
    crop: int | None,
    corners: Sequence[tuple[int, int]] | None,
    crop_mode: str = "window",
    device: torch.device | str = "cpu",
    return_base: bool = False,
):
    """Model input (B, 3, c, c) and target (B, 1, c, c) in [0, 1] for window samples ``items``.

    ``corners``: the (row, col) of each crop in the window (ignored without ``crop``). Items with a
    fifth element (the physics prediction of the window, ``SampleSource(physics=...)``) add the
    physics plane (``deepdark.model.conditioning.physics_plane``) as a fourth input channel; with
    ``return_base`` the physics prediction of the same pixels ([0, 1] units, (B, 1, c, c)) is
    returned third: ``(x, target, base)``.
    """
    a1 = np.stack([it[0] for it in items])
    a2 = np.stack([it[1] for it in items])
    a3 = np.stack([it[2] for it in items])
    y = np.stack([it[3] for it in items])
    phys = np.stack([it[4] for it in items]) if len(items[0]) > 4 else None
    extra = None if phys is None else C.physics_plane(phys, a1)
    cropped = bool(crop) and crop != size

    def cut(arr):
        return np.stack([arr[k, ..., r : r + crop, c : c + crop] for k, (r, c) in enumerate(corners)])

    if not cropped:
        x = model_input(a1, a2, a3, size, extra=extra, device=device)
    elif crop_mode == "window":
        full = model_input(a1, a2, a3, size, extra=extra, device=device)
        x = torch.stack([full[k, :, r : r + crop, c : c + crop] for k, (r, c) in enumerate(corners)])
    elif crop_mode == "strips":
        x = torch.cat(
            [
                model_input(
                    a1[k : k + 1, r : r + crop],
                    a2[k : k + 1, r : r + crop],
                    a3[k : k + 1, :, c : c + crop],
                    crop,
                    device=device,
                    extra=None if extra is None else extra[k : k + 1, :, r : r + crop, c : c + crop],
                )
                for k, (r, c) in enumerate(corners)
            ]
        )
    else:
        raise ValueError(f"unknown crop_mode {crop_mode!r}; valid: {', '.join(CROP_MODES)}")
    if cropped:
        y = cut(y)
        if phys is not None:
            phys = cut(phys)
    target = adu_to_unit(torch.from_numpy(y.astype(np.float32))).unsqueeze(1).to(device)
    if return_base:
        if phys is None:
            raise ValueError("return_base needs items with a physics prediction")
        return x.contiguous(), target, C.base_unit(phys).to(device)
    return x.contiguous(), target


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


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
        save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT, "epoch": str(epoch)})
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
        raise ValueError(f"{path}: unreadable checkpoint state ({exc}); remove it or train with resume=False") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a deepdark checkpoint")
    tpath = out_dir / state["tensors"]
    if not tpath.is_file() or file_sha256(tpath) != state["sha256"]:
        raise ValueError(f"{path}: its tensors file {state['tensors']} is missing or does not match its hash")
    return state, read_safetensors(tpath)


def _write_log(out_dir: Path, history: list[dict]) -> None:
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


# ---------------------------------------------------------------------------------------------
# batch norm
# ---------------------------------------------------------------------------------------------


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_training_mode(G: nn.Module, bn: str) -> None:
    """Generator in training mode; with ``bn="running"`` its batch-norm layers normalise with
    their running statistics (eval mode), which :func:`track_running_stats` keeps up to date."""
    G.train()
    if bn == "running":
        for m in _batchnorms(G):
            m.eval()


@contextlib.contextmanager
def track_running_stats(G: nn.Module, momentum: float):
    """While active, every forward pass of ``G`` updates each batch-norm layer's running
    statistics from its input *after* the layer has normalised with the previous ones:
    mean <- (1 - momentum) mean + momentum batch mean, var <- (1 - momentum) var + momentum
    E_batch[(x - mean)^2] (population variance, between images included); no gradient."""

    def hook(m, inputs, output):
        with torch.no_grad():
            x = inputs[0].detach().float()
            mean = x.mean(dim=(0, 2, 3))
            # second moment about the *running* mean, not the batch's: with batch 1 the batch
            # variance misses the variance between images (levels differ by far more than the
            # noise within one), and normalising by it blows level differences up ~100-fold
            var = (x - m.running_mean.float()[None, :, None, None]).square().mean(dim=(0, 2, 3))
            # new tensors, not in-place: the old ones are saved for this pass's backward
            m.running_mean = (1 - momentum) * m.running_mean + momentum * mean.to(m.running_mean.dtype)
            m.running_var = (1 - momentum) * m.running_var + momentum * var.to(m.running_var.dtype)
            m.num_batches_tracked += 1

    handles = [m.register_forward_hook(hook) for m in _batchnorms(G)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate_batchnorm(G: nn.Module, x: torch.Tensor) -> None:
    """Set every batch-norm layer's running statistics to those of the batch ``x`` (one pass)."""
    bns = _batchnorms(G)
    if not bns:
        return
    saved = [m.momentum for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = 1.0  # running stats := this batch's
        G.train()
        G(x)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


@torch.no_grad()
def init_output_level(G: Generator, level: float) -> None:
    """Set the output layer's bias so that an untrained generator predicts ``level`` ([0, 1]).

    With the reference initialisation (weights ~ N(0, 0.02), bias 0) the generator starts at
    (tanh(0) + 1) / 2 = 0.5, i.e. 32768 ADU, while darks lie near 0.02 (~1000 ADU): at the paper's
    learning rate Adam needs ~1e5 steps only to walk the output bias there. Starting at the
    training targets' mean level leaves the steps to the part that varies.
    """
    conv = G.head[-1]
    level = min(max(level, 1e-6), 1 - 1e-6)
    conv.bias.fill_(math.atanh(2.0 * level - 1.0))


def lr_factor(schedule: str, epoch: int, step: int, n_steps: int, epochs: int) -> float:
    """Learning-rate multiplier at ``step`` (0-based) of ``epoch`` (1-based).

    ``constant``: 1 (the paper). ``linear``: from 1 at the first step down to 1/total at the
    last, linearly in steps. ``pix2pix``: the reference policy - constant for the first half of
    the epochs, then linear to zero over the second half (per epoch).
    """
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        total = max(1, n_steps * epochs)
        done = (epoch - 1) * n_steps + step
        return 1.0 - done / total
    if schedule == "pix2pix":
        keep = epochs // 2
        decay = epochs - keep
        return 1.0 - max(0, epoch - keep) / (decay + 1)
    raise ValueError(f"unknown lr_schedule {schedule!r}; valid: {', '.join(LR_SCHEDULES)}")


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def validate(
    G: Generator,
    source: SampleSource,
    indices: Sequence[int],
    size: int,
    crop: int | None,
    batch_size: int,
    device: torch.device,
    residual_range_adu: float | None = None,
) -> float:
    """Pooled RMSE (ADU) of the generator (eval mode) on whole windows or their centre crop."""
    if not len(indices):
        return float("nan")
    was = G.training
    G.eval()
    se, n = 0.0, 0
    c = crop if crop and crop < size else None
    corner = ((size - c) // 2,) * 2 if c else None
    try:
        for start in range(0, len(indices), batch_size):
            items = [source.get(i) for i in indices[start : start + batch_size]]
            corners = [corner] * len(items) if c else None
            if residual_range_adu is None:
                x, y = build_batch(items, size, c, corners, "window", device)
                with autocast(device):
                    pred = G(x)
            else:
                x, y, base = build_batch(items, size, c, corners, "window", device, return_base=True)
                with autocast(device):
                    pred = C.compose(G(x), base, residual_range_adu)
            d = unit_to_adu(pred.float().double()) - unit_to_adu(y.double())
            se += float((d * d).sum())
            n += d.numel()
    finally:
        G.train(was)
    return math.sqrt(se / n)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model_dir: Path
    epochs: int
    val_rmse_adu: float
    history: list[dict] = field(default_factory=list)
    train_nights: list[str] = field(default_factory=list)
    val_nights: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _generator_config(preset: str, norm: str | None, in_channels: int):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    changes = {"in_channels": in_channels}
    if norm is not None:
        changes["norm"] = norm
    return dataclasses.replace(cfg, **changes)


def _data_digest(table: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for fh, ch in zip(table["file_hash"], table["channel"]):
        h.update(f"{fh}:{ch};".encode())
    return h.hexdigest()[:16]


def train(
    shards: Sequence[str | Path],
    out_dir: str | Path,
    preset: str = "compact",
    loss: str = "deepdark",
    l1_weight: float = 100.0,
    epochs: int = 40,
    batch_size: int = 1,
    lr: float = 2e-5,
    betas: tuple[float, float] = (0.5, 0.999),
    crop: int | None = None,
    val_nights=None,
    device: str | torch.device = "auto",
    seed: int = 0,
    max_steps_per_epoch: int | None = None,
    progress: bool = True,
    resume: bool = True,
    bn: str = "running",
    bn_momentum: float = 0.01,
    norm: str | None = None,
    crop_mode: str = "window",
    setpoints: Sequence[float] | None = None,
    nights: Sequence[str] | None = None,
    cache_mb: float = 1024,
    max_val_samples: int | None = None,
    init_level: bool = True,
    lr_schedule: str = "constant",
    physics: str | Path | None = None,
    residual_range_adu: float = C.RESIDUAL_RANGE_ADU,
    physics_memory_mb: float = 512,
) -> TrainResult:
    """Train a generator (and its discriminator) on the DARK frames of ``shards``; write the model
    to ``out_dir`` (``model.safetensors`` + ``model.json``), with checkpoints and the log beside it.

    ``val_nights``: see :func:`split_nights`. ``setpoints`` / ``nights``: use only those darks.
    ``max_steps_per_epoch``: cap on optimisation steps per epoch (a budget for large libraries).
    ``max_val_samples``: validate on the first k held-out samples only. See the module docstring
    for ``bn``, ``crop``/``crop_mode``, checkpoints and devices.

    Physics-mode presets (``deepdark.model.nets.PHYSICS_PRESETS``, the ``physics`` preset): the model
    predicts a residual of at most ``residual_range_adu`` on the physics prediction
    (``deepdark.model.conditioning``). ``physics``: the physics model file to condition on (copied into
    ``out_dir/physics.h5``); without it the physics model is fitted from ``shards`` themselves
    (``deepdark.physics.fit_physics``, ``physics_memory_mb``) into ``out_dir/physics.h5``.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if bn not in BN_MODES:
        raise ValueError(f"unknown bn {bn!r}; valid: {', '.join(BN_MODES)}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
    if crop_mode not in CROP_MODES:
        raise ValueError(f"unknown crop_mode {crop_mode!r}; valid: {', '.join(CROP_MODES)}")
    loss_cfg = LossConfig(loss, float(l1_weight))
    dev = resolve_device(device)
    physics_mode = preset in PHYSICS_PRESETS
    inputs = list(DEFAULT_INPUTS) + ([C.PHYSICS_INPUT] if physics_mode else [])
    if physics is not None and not physics_mode:
        raise ValueError(
            f"preset {preset!r} takes strips only; a physics model is used by the "
            f"{', '.join(sorted(PHYSICS_PRESETS))} preset"
        )
    cfg = _generator_config(preset, norm, len(inputs))
    phys_model = None
    phys_card = None
    if physics_mode:
        phys_path, phys_source = _physics_file(shards, out_dir, physics, physics_memory_mb, progress)
        from deepdark.physics import PhysicsModel

        phys_model = PhysicsModel.load(phys_path)
        phys_card = {
            "file": C.PHYSICS_FILE,
            "sha256": file_sha256(phys_path),
            "source": phys_source,
            "residual_range_adu": float(residual_range_adu),
            "physics_scale_adu": C.PHYSICS_SCALE_ADU,
            "normalisation": C.NORMALISATION,
        }
        init_level = False  # the zero-initialised head starts at the physics prediction instead
    try:
        lib = open_library(shards, setpoints=setpoints, nights=nights)
    except BaseException:
        if phys_model is not None:
            phys_model.close()
        raise
    try:
        g = lib.geometry
        size = g.window_size
        multiple = 2**cfg.n_down
        if size % multiple:
            raise ValueError(f"window size {size} is not a multiple of the generator's {multiple}")
        if crop is not None:
            crop = int(crop)
            if crop <= 0 or crop % multiple or crop > size:
                raise ValueError(f"crop {crop} must be a positive multiple of {multiple} and at most the window {size}")
            if crop == size:
                crop = None
        train_nights, val_list = split_nights(lib.table["night"], val_nights)
        tab = lib.table
        train_idx = np.flatnonzero(tab["night"].isin(train_nights).to_numpy())
        val_idx = np.flatnonzero(tab["night"].isin(val_list).to_numpy())
        if max_val_samples is not None:
            val_idx = val_idx[:max_val_samples]
        assert not set(tab["night"].iloc[train_idx]) & set(tab["night"].iloc[val_idx])
        if not val_list:
            log.warning("one night only: no validation night, validation RMSE will be NaN")
        val_region = f"centre {crop}x{crop} crop of the window" if crop else f"whole {size}x{size} window"
        signature = _jsonify(
            {
                "preset": preset,
                "generator": dataclasses.asdict(cfg),
                "inputs": inputs,
                "loss": loss_cfg.name,
                "l1_weight": loss_cfg.l1_weight,
                "batch_size": batch_size,
                "lr": lr,
                "betas": list(betas),
                "lr_schedule": lr_schedule,
                "schedule_epochs": epochs if lr_schedule != "constant" else None,
                "crop": crop,
                "crop_mode": crop_mode if crop else None,
                "bn": bn,
                "bn_momentum": bn_momentum if bn == "running" else None,
                "init_level": init_level,
                "seed": seed,
                "max_steps_per_epoch": max_steps_per_epoch,
                "train_nights": train_nights,
                "val_nights": val_list,
                "setpoints": None if setpoints is None else sorted(float(s) for s in setpoints),
                "geometry": g.name,
                "window": [g.window_size, g.window_offset],
                "data": _data_digest(tab),
                "n_train": len(train_idx),
                "n_val": len(val_idx),
                "physics": None
                if phys_card is None
                else {k: phys_card[k] for k in ("sha256", "residual_range_adu", "physics_scale_adu")},
            }
        )
        source = SampleSource(lib, cache_mb, physics=phys_model)
        rr = float(residual_range_adu) if physics_mode else None

        G = fp32_head(Generator(cfg, seed=seed)).to(dev)
        D = Discriminator(in_channels=cfg.in_channels + 1, seed=seed + 1).to(dev)
        opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=tuple(betas))
        opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=tuple(betas))
        scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda")
        history: list[dict] = []
        start_epoch = 1
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt = read_checkpoint(out_dir) if resume else None
        if ckpt is not None:
            state, tensors = ckpt
            diff = {k: (state["signature"].get(k), v) for k, v in signature.items() if state["signature"].get(k) != v}
            if diff:
                detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
                raise ValueError(
                    f"{out_dir / CHECKPOINT_JSON} was made with other settings ({detail}); "
                    "use another output directory, or resume=False (--no-resume) to start over"
                )
            gs, ds = _strip_prefix(tensors, "G"), _strip_prefix(tensors, "D")
            check_state(G.state_dict(), gs, "checkpoint generator")
            check_state(D.state_dict(), ds, "checkpoint discriminator")
            G.load_state_dict(gs)
            D.load_state_dict(ds)
            opt_g.load_state_dict(_optimizer_join(tensors, state["optimizers"]["G"], "optG"))
            opt_d.load_state_dict(_optimizer_join(tensors, state["optimizers"]["D"], "optD"))
            if state.get("scaler") and scaler.is_enabled():
                scaler.load_state_dict(state["scaler"])
            history = list(state["history"])
            start_epoch = int(state["epoch"]) + 1
            log.info("resuming %s from epoch %d", out_dir, start_epoch - 1)
        else:
            for old in out_dir.glob("checkpoint-e*.safetensors"):
                old.unlink()
            (out_dir / CHECKPOINT_JSON).unlink(missing_ok=True)
            xc, yc = _calibration_batch(source, train_idx, size, crop, crop_mode, seed, dev, multiple)
            if physics_mode:
                C.zero_head(G)
            elif init_level:
                init_output_level(G, float(yc.mean()))
            if bn == "running":
                calibrate_batchnorm(G, xc)
            del xc, yc

        n_steps = math.ceil(len(train_idx) / batch_size)
        if max_steps_per_epoch:
            n_steps = min(n_steps, int(max_steps_per_epoch))
        for epoch in range(start_epoch, epochs + 1):
            t0 = time.perf_counter()
            rng = np.random.default_rng([seed, epoch])
            order = train_idx[rng.permutation(len(train_idx))]
            sums: dict[str, float] = {}
            set_training_mode(G, bn)
            D.train()
            bar = tqdm(range(n_steps), desc=f"epoch {epoch}/{epochs}", unit="step", disable=not progress, leave=False)
            steps = 0
            for step in bar:
                rate = lr * lr_factor(lr_schedule, epoch, step, n_steps, epochs)
                for opt in (opt_g, opt_d):
                    for group in opt.param_groups:
                        group["lr"] = rate
                sel = order[step * batch_size : (step + 1) * batch_size]
                corners = None
                if crop:
                    corners = [tuple(int(v) for v in rng.integers(0, size - crop + 1, 2)) for _ in sel]
                items = [source.get(int(i)) for i in sel]
                base = None
                if physics_mode:
                    x, y, base = build_batch(items, size, crop, corners, crop_mode, dev, return_base=True)
                else:
                    x, y = build_batch(items, size, crop, corners, crop_mode, dev)
                with track_running_stats(G, bn_momentum) if bn == "running" else contextlib.nullcontext():
                    parts = _train_step(
                        G, D, opt_g, opt_d, scaler, loss_cfg, x, y, dev, base=base, residual_range_adu=rr
                    )
                steps += 1
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                # The l1 loss trains no discriminator: its d_loss is NaN, not worth showing.
                bar.set_postfix(
                    {k: f"{v:.4g}" for k, v in parts.items() if k in ("d_loss", "g_loss", "g_l1") and math.isfinite(v)}
                )
            bar.close()
            val = validate(G, source, val_idx, size, crop, max(1, batch_size), dev, residual_range_adu=rr)
            row = {
                "epoch": epoch,
                "steps": steps,
                **{
                    k: sums.get(k, float("nan")) / max(steps, 1) if k in sums else None
                    for k in ("d_loss", "g_loss", "g_bce", "g_mse", "g_l1")
                },
                "val_rmse_adu": val,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            history.append(row)
            save_checkpoint(out_dir, epoch, G, D, opt_g, opt_d, scaler, signature, history)
            _write_log(out_dir, history)
            d_part = f"d {row['d_loss']:.4g} " if math.isfinite(row["d_loss"]) else ""
            msg = (
                f"epoch {epoch}/{epochs}: {d_part}g {row['g_loss']:.4g} "
                f"(l1 {row['g_l1']:.4g}), val RMSE {val:.2f} ADU ({val_region}), {row['seconds']:.1f} s"
            )
            log.info(msg)
            if progress:
                tqdm.write(msg)
        if not history:
            raise ValueError(f"{out_dir}: nothing trained")
        if len(history) > epochs:
            log.warning(
                "%s: the checkpoint already holds %d epochs (more than the %d asked for); the model is written from it",
                out_dir,
                len(history),
                epochs,
            )
        final_val = history[-1]["val_rmse_adu"]
        final_val = None if final_val is None or math.isnan(final_val) else final_val
        train_tab = tab.iloc[train_idx]
        val_tab = tab.iloc[val_idx]
        training = {
            "shards": [str(p) for p in lib.paths],
            "nights": train_nights,
            "val_nights": val_list,
            "setpoints": sorted(float(s) for s in set(train_tab["setpoint"])),
            "cameras": sorted(set(train_tab["camera"])),
            "exptimes": sorted(float(e) for e in set(train_tab["exptime"])),
            "n_frames": int(train_tab["file_hash"].nunique()),
            "n_samples": len(train_idx),
            "n_val_frames": int(val_tab["file_hash"].nunique()),
            "n_val_samples": len(val_idx),
            "batch_size": batch_size,
            "lr": lr,
            "lr_schedule": lr_schedule,
            "betas": list(betas),
            "seed": seed,
            "crop": crop,
            "crop_mode": crop_mode if crop else None,
            "bn": bn,
            "bn_momentum": bn_momentum if bn == "running" else None,
            "init_level": init_level,
            "max_steps_per_epoch": max_steps_per_epoch,
            "steps": int(sum(r["steps"] for r in history)),
            "device": dev.type,
            "mixed_precision": "float16 autocast, float32 output layer" if dev.type == "cuda" else None,
            "seconds": round(sum(r["seconds"] for r in history), 1),
        }
        G.eval()
        save_model(
            out_dir,
            G,
            preset=preset,
            loss={"name": loss_cfg.name, "l1_weight": loss_cfg.l1_weight},
            geometry=g,
            training=training,
            epochs=len(history),
            validation={
                "rmse_adu": final_val,
                "region": val_region,
                "n_samples": len(val_idx),
                "nights": val_list,
                "history": [None if math.isnan(r["val_rmse_adu"]) else r["val_rmse_adu"] for r in history],
            },
            inputs=inputs,
            extra=None if phys_card is None else {"physics": phys_card},
        )
        return TrainResult(
            out_dir,
            len(history),
            float("nan") if final_val is None else final_val,
            history,
            train_nights,
            val_list,
            time.perf_counter() - t_start,
        )
    finally:
        lib.close()
        if phys_model is not None:
            phys_model.close()


def _physics_file(shards, out_dir: Path, physics, memory_mb: float, progress: bool) -> tuple[Path, str]:
    """``out_dir/physics.h5``: a copy of ``physics``, or (None) fitted from ``shards``; (path, source)."""
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / C.PHYSICS_FILE
    if physics is not None:
        src = Path(physics)
        if not src.is_file():
            raise FileNotFoundError(f"physics model {src} not found")
        same_file = dest.exists() and dest.resolve() == src.resolve()
        if not same_file and not (dest.is_file() and file_sha256(dest) == file_sha256(src)):
            with atomic_path(dest) as tmp:
                shutil.copyfile(src, tmp)
        return dest, str(src.resolve())
    if dest.is_file():  # fitted by an earlier (interrupted) run of the same command: reuse it
        log.info("reusing the physics model %s", dest)
        return dest, "fitted from the training shards"
    from deepdark.physics import fit_physics

    log.info("fitting the physics model of %d shard(s) into %s", len(shards), dest)
    fit_physics(list(shards), dest, memory_mb=memory_mb, progress=progress)
    return dest, "fitted from the training shards"


def _jsonify(obj):
    return json.loads(json.dumps(obj, default=json_default))


def _calibration_batch(
    source: SampleSource,
    train_idx: np.ndarray,
    size: int,
    crop: int | None,
    crop_mode: str,
    seed: int,
    dev: torch.device,
    multiple: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch (input, target) of up to ``CALIBRATION_SAMPLES`` random training crops: for the
    batch-norm statistics and the initial output level."""
    rng = np.random.default_rng([seed, 0])
    pick = train_idx[rng.permutation(len(train_idx))[:CALIBRATION_SAMPLES]]
    c = min(crop or size, CALIBRATION_CROP)
    c -= c % multiple
    corners = [tuple(int(v) for v in rng.integers(0, size - c + 1, 2)) for _ in pick]
    return build_batch(
        [source.get(int(i)) for i in pick], size, c if c < size else None, corners, crop_mode if crop else "window", dev
    )


def _train_step(
    G, D, opt_g, opt_d, scaler, loss_cfg: LossConfig, x, y, dev, base=None, residual_range_adu: float | None = None
) -> dict[str, float]:
    """One pix2pix step: D on (real, detached fake), then G on the adversarial terms + L1.

    ``base`` (physics-mode models): the physics prediction ([0, 1] units); the fake is then
    base + R tanh(h) (``deepdark.model.conditioning.compose``). A loss without adversarial terms
    (``l1``) skips the discriminator."""
    with autocast(dev):
        fake = G(x)
    if base is not None:
        fake = C.compose(fake, base, residual_range_adu or C.RESIDUAL_RANGE_ADU)
    if not loss_cfg.g_forms:
        opt_g.zero_grad(set_to_none=True)
        loss_g, comps = generator_loss(loss_cfg, None, fake.float(), y)
        scaler.scale(loss_g).backward()
        scaler.step(opt_g)
        scaler.update()
        out = {"d_loss": float("nan"), "g_loss": float(loss_g.detach())}
        out.update({k: float(v) for k, v in comps.items()})
        return out
    # discriminator
    for p in D.parameters():
        p.requires_grad_(True)
    opt_d.zero_grad(set_to_none=True)
    with autocast(dev):
        loss_d = discriminator_loss(loss_cfg, D(x, y), D(x, fake.detach()))
    scaler.scale(loss_d).backward()
    scaler.step(opt_d)
    # generator (D frozen: its gradients are not needed)
    for p in D.parameters():
        p.requires_grad_(False)
    opt_g.zero_grad(set_to_none=True)
    with autocast(dev):
        loss_g, comps = generator_loss(loss_cfg, D(x, fake), fake.float(), y)
    scaler.scale(loss_g).backward()
    scaler.step(opt_g)
    scaler.update()
    for p in D.parameters():
        p.requires_grad_(True)
    out = {"d_loss": float(loss_d.detach()), "g_loss": float(loss_g.detach())}
    out.update({k: float(v) for k, v in comps.items()})
    return out
