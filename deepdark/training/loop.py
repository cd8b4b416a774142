"""Training Deep-Dark-Net (paper 3.1): a conditional GAN on the dark library, split by night.

:func:`train` trains a generator and its discriminator with the settings of a
:class:`~deepdark.training.config.TrainConfig`, epoch after epoch; one optimisation step is
:func:`_train_step` (the pix2pix reference's ``optimize_parameters``). Its parts live beside it:
the samples, their split by night and the crops in ``deepdark.training.data``, batch norm and
the initial output level in ``deepdark.training.batchnorm``, checkpoints, resume and the training
log in ``deepdark.training.checkpoint``, the validation in ``deepdark.training.validation``, early
stopping and the best epoch in ``deepdark.training.stopping``.

Validation and stopping
-----------------------
After every epoch the generator is scored on the validation nights (whole windows, or the centre
crop of each; :func:`~deepdark.training.validation.validate`). Training stops after ``patience``
epochs without an improvement of at least ``min_improvement``, and the model file gets the best
epoch's weights (``deepdark.training.stopping``); ``epochs`` is a cap.

Where the network is used
-------------------------
A physics-mode model's card records the validation RMSE of physics alone and of physics + network
per camera and per (camera, setpoint, exposure) group, and the decision taken with ``margin``
(``deepdark.model.selection``); inference runs the network only where it helps. A strips-only
preset has no physics prediction to fall back on: its card and log say so.

Threads
-------
On the CPU a step of a small window or crop is too little work to share: torch's threads spin
waiting on each other, on a busy machine ten times slower than one thread (measured: 22 against
230 ms a step of a 64 x 64 window with another job on the two cores). ``threads`` None uses one
thread when a step sees at most ``SMALL_STEP_PIXELS``, torch's default otherwise.

Physics-mode presets
--------------------
Physics-mode presets (``deepdark.model.nets.PHYSICS_PRESETS``, the ``physics`` preset): the model
predicts a residual of at most ``residual_range_adu`` on the physics prediction
(``deepdark.model.conditioning``). ``physics``: the physics model file to condition on (copied
into ``out_dir/physics.h5``); without it the physics model is fitted from the shards themselves
(``deepdark.physics.fit_physics``, ``physics_memory_mb``) into ``out_dir/physics.h5``
(:func:`_physics_file`).

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
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from deepdark.io.atomic import atomic_path
from deepdark.io.errors import InputError, MissingInputError
from deepdark.io.shards import Shard
from deepdark.model import conditioning as C
from deepdark.model import selection as S
from deepdark.model.files import CARD_FILE, DEFAULT_INPUTS, file_sha256, json_default, physics_card, save_model
from deepdark.model.losses import LossConfig, discriminator_loss, generator_loss
from deepdark.model.nets import PRESETS, Discriminator, Generator
from deepdark.model.runtime import autocast, fp32_head, resolve_device
from deepdark.training.batchnorm import (
    calibrate_batchnorm,
    init_output_level,
    set_training_mode,
    track_running_stats,
)
from deepdark.training.checkpoint import (
    CHECKPOINT_JSON,
    check_signature,
    read_checkpoint,
    remove_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    write_log,
)
from deepdark.training.config import LR_SCHEDULES, TrainConfig
from deepdark.training.data import (
    Library,
    SampleSource,
    calibration_batch,
    data_digest,
    open_library,
    split_nights,
)
from deepdark.training.stopping import EarlyStopping, remove_best, remove_stale_best, restore_best, save_best
from deepdark.training.validation import spread, validate, validation_errors

log = logging.getLogger(__name__)

LOSS_PARTS = ("d_loss", "g_loss", "g_bce", "g_mse", "g_l1")  # the losses of a step, averaged per epoch
SMALL_STEP_PIXELS = 256 * 256  # a CPU step seeing at most this many pixels runs on one thread


@dataclass
class TrainResult:
    """What :func:`train` made: the model directory, the number of epochs run, the validation RMSE
    of the model file (ADU, its best epoch's; NaN without a validation night), the epochs' history,
    the nights, the seconds taken, the best epoch (0: the untrained model; None without
    validation) and whether training stopped before ``epochs``."""

    model_dir: Path
    epochs: int
    val_rmse_adu: float
    history: list[dict] = field(default_factory=list)
    train_nights: list[str] = field(default_factory=list)
    val_nights: list[str] = field(default_factory=list)
    seconds: float = 0.0
    best_epoch: int | None = None
    stopped_early: bool = False


@dataclass
class _Samples:
    """The samples of a run: where they are read from, which train and which validate."""

    source: SampleSource
    size: int  # of the window
    train_idx: np.ndarray  # rows of the library table
    val_idx: np.ndarray
    train_nights: list[str]
    val_nights: list[str]


@dataclass
class _Run:
    """What the epochs of a run share: its settings, networks, optimisers and samples."""

    config: TrainConfig  # its crop None for whole windows
    device: torch.device
    loss: LossConfig
    G: nn.Module
    D: Discriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    samples: _Samples
    residual_range_adu: float | None  # physics-mode models: the bound of the learned residual
    progress: bool
    stopping: EarlyStopping = field(default_factory=lambda: EarlyStopping(0, 0.0))


def train(
    shards: Sequence[str | Path],
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    progress: bool = True,
    **settings,
) -> TrainResult:
    """Train a generator (and its discriminator) on the DARK frames of ``shards``.

    Parameters
    ----------
    shards : sequence of path
        Shards of the dark library (``deepdark.io.shards``); samples are split by night
        (``config.val_nights``, :func:`~deepdark.training.data.split_nights`).
    out_dir : path
        Model directory: ``model.safetensors`` + ``model.json`` (the best epoch's weights) when
        training is done; the checkpoint, the best epoch's ``best-eNNNN.safetensors`` and
        ``training_log.csv`` after every epoch (``deepdark.training.checkpoint``,
        ``deepdark.training.stopping``).
    config : TrainConfig, optional
        The settings (default: ``TrainConfig()``).
    progress : bool
        Progress bars on a terminal, and a line per epoch.
    **settings
        Fields of :class:`TrainConfig` that replace ``config``'s, e.g. ``epochs=2``.

    Returns
    -------
    TrainResult
    """
    t_start = time.perf_counter()
    config = TrainConfig(**settings) if config is None else dataclasses.replace(config, **settings)
    out_dir = Path(out_dir)
    dev = resolve_device(config.device)
    inputs = list(DEFAULT_INPUTS) + ([C.PHYSICS_INPUT] if config.physics_mode else [])
    gen_cfg = _generator_config(config.preset, config.norm, len(inputs))
    with open_library(shards, setpoints=config.setpoints, nights=config.nights) as lib:
        split_nights(lib.table["night"], config.val_nights)  # a bad --val-nights before an hour's physics fit
        phys_model, phys_card = (None, None)
        if config.physics_mode:
            phys_model, phys_card = _physics_model(shards, out_dir, config, progress)
        try:
            config, samples = _samples(lib, config, 2**gen_cfg.n_down, phys_model)
            signature = _signature(config, gen_cfg, inputs, lib, samples, phys_card)
            with _torch_threads(config, dev, samples.size):
                run = _new_run(config, gen_cfg, dev, samples, progress)
                history, start_epoch = _start(run, out_dir, signature, 2**gen_cfg.n_down)
                _run_epochs(run, out_dir, signature, history, start_epoch)
                _save_model(run, out_dir, lib, history, inputs, phys_card)
            return _result(run, out_dir, history, time.perf_counter() - t_start)
        finally:
            if phys_model is not None:
                phys_model.close()


def _result(run: _Run, out_dir: Path, history: list[dict], seconds: float) -> TrainResult:
    stop = run.stopping
    last = history[-1]["val_rmse_adu"]
    val = stop.best_rmse_adu if stop.best_rmse_adu is not None else last
    return TrainResult(
        out_dir,
        len(history),
        float("nan") if val is None else float(val),
        history,
        run.samples.train_nights,
        run.samples.val_nights,
        seconds,
        stop.best_epoch,
        len(history) < run.config.epochs,
    )


@contextlib.contextmanager
def _torch_threads(config: TrainConfig, dev: torch.device, size: int):
    """torch's CPU threads while training: ``config.threads``, or one for small steps (module docstring)."""
    n = config.threads
    if n is None and dev.type == "cpu" and config.batch_size * (config.crop or size) ** 2 <= SMALL_STEP_PIXELS:
        n = 1
    if n is None or dev.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _generator_config(preset: str, norm: str | None, in_channels: int):
    """The preset's generator configuration, with ``in_channels`` inputs and ``norm`` if given."""
    cfg = PRESETS[preset]
    changes = {"in_channels": in_channels}
    if norm is not None:
        changes["norm"] = norm
    return dataclasses.replace(cfg, **changes)


def _samples(lib: Library, config: TrainConfig, multiple: int, physics) -> tuple[TrainConfig, _Samples]:
    """The run's samples, split by night, and ``config`` with its crop checked against the window
    (None when it is the whole window)."""
    size = lib.geometry.window_size
    if size % multiple:
        raise ValueError(f"window size {size} is not a multiple of the generator's {multiple}")
    crop = config.crop
    if crop is not None:
        crop = int(crop)
        if crop <= 0 or crop % multiple or crop > size:
            raise InputError(f"crop {crop} must be a positive multiple of {multiple} and at most the window {size}")
        if crop == size:
            crop = None
    train_nights, val_list = split_nights(lib.table["night"], config.val_nights)
    tab = lib.table
    train_idx = np.flatnonzero(tab["night"].isin(train_nights).to_numpy())
    val_idx = np.flatnonzero(tab["night"].isin(val_list).to_numpy())
    val_idx = spread(val_idx, config.max_val_samples)
    assert not set(tab["night"].iloc[train_idx]) & set(tab["night"].iloc[val_idx])
    if not val_list:
        log.warning("one night only: no validation night, validation RMSE will be NaN")
    source = SampleSource(lib, config.cache_mb, physics=physics)
    return dataclasses.replace(config, crop=crop), _Samples(source, size, train_idx, val_idx, train_nights, val_list)


def _signature(config: TrainConfig, gen_cfg, inputs: list[str], lib: Library, samples: _Samples, phys_card) -> dict:
    """What a checkpoint must have been made with to be resumed: the settings, the generator, the
    data (split, geometry, samples) and the physics model, as JSON types."""
    g = lib.geometry
    return _jsonify(
        {
            **config.signature(),
            "generator": dataclasses.asdict(gen_cfg),
            "inputs": inputs,
            "train_nights": samples.train_nights,
            "val_nights": samples.val_nights,
            "geometry": g.name,
            "window": [g.window_size, g.window_offset],
            "data": data_digest(lib.table),
            "n_train": len(samples.train_idx),
            "n_val": len(samples.val_idx),
            "physics": None
            if phys_card is None
            else {k: phys_card[k] for k in ("sha256", "residual_range_adu", "physics_scale_adu", "strip_scale_adu")},
        }
    )


def _jsonify(obj):
    return json.loads(json.dumps(obj, default=json_default))


def _new_run(config: TrainConfig, gen_cfg, dev: torch.device, samples: _Samples, progress: bool) -> _Run:
    """The networks, initialised from ``seed`` (generator) and ``seed + 1`` (discriminator), their
    Adam optimisers and the gradient scaler (enabled on CUDA)."""
    G = fp32_head(Generator(gen_cfg, seed=config.seed)).to(dev)
    D = Discriminator(in_channels=gen_cfg.in_channels + 1, seed=config.seed + 1).to(dev)
    return _Run(
        config,
        dev,
        LossConfig(config.loss_name, float(config.l1_weight)),
        G,
        D,
        # foreach: the same updates as the per-tensor loop (CUDA's default), in fewer CPU calls
        torch.optim.Adam(G.parameters(), lr=config.lr, betas=config.betas, foreach=True),
        torch.optim.Adam(D.parameters(), lr=config.lr, betas=config.betas, foreach=True),
        torch.amp.GradScaler("cuda", enabled=dev.type == "cuda"),
        samples,
        float(config.residual_range_adu) if config.physics_mode else None,
        progress,
        EarlyStopping(config.patience, config.min_improvement),
    )


def _start(run: _Run, out_dir: Path, signature: dict, multiple: int) -> tuple[list[dict], int]:
    """(history of the epochs done, first epoch to run): a checkpoint's, whose networks, optimisers
    and early-stopping state are restored (when resuming and one is there), or none (any checkpoint
    removed; the output level and the batch-norm statistics initialised from one batch of training
    crops; a physics-mode generator, physics alone, validated as epoch 0)."""
    config, samples = run.config, run.samples
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = read_checkpoint(out_dir) if config.resume else None
    if ckpt is not None:
        state, tensors = ckpt
        check_signature(out_dir, state, signature)
        restore_checkpoint(state, tensors, run.G, run.D, run.opt_g, run.opt_d, run.scaler)
        run.stopping = EarlyStopping.from_state(
            (state.get("extra") or {}).get("stopping"), config.patience, config.min_improvement
        )
        log.info("resuming %s from epoch %d", out_dir, int(state["epoch"]))
        return list(state["history"]), int(state["epoch"]) + 1
    remove_checkpoint(out_dir)
    remove_best(out_dir)
    xc, yc = calibration_batch(
        samples.source,
        samples.train_idx,
        samples.size,
        config.crop,
        config.crop_mode,
        config.seed,
        run.device,
        multiple,
    )
    if config.physics_mode:
        C.zero_head(run.G)  # the zero-initialised head starts at the physics prediction
    elif config.init_level:
        init_output_level(run.G, float(yc.mean()))
    if config.bn == "running":
        calibrate_batchnorm(run.G, xc)
    if config.physics_mode:
        physics = _validate(run)  # the untrained model is physics alone: epoch 0, the one to beat
        run.stopping.physics_rmse_adu = None if math.isnan(physics) else physics
        if run.stopping.improves(physics):
            save_best(out_dir, run.G, run.stopping, 0, physics)
            log.info("epoch 0 (physics alone): val RMSE %.2f ADU (%s)", physics, _val_region(run))
    return [], 1


def _validation_args(run: _Run) -> tuple:
    """The arguments of ``validate`` and ``validation_errors`` for this run's validation samples."""
    config, samples = run.config, run.samples
    return (
        run.G,
        samples.source,
        samples.val_idx,
        samples.size,
        config.crop,
        max(1, config.batch_size),
        run.device,
        run.residual_range_adu,
    )


def _validate(run: _Run) -> float:
    return validate(*_validation_args(run))


def _run_epochs(run: _Run, out_dir: Path, signature: dict, history: list[dict], start_epoch: int) -> None:
    """The epochs from ``start_epoch`` on, each followed by validation, checkpoint and log, until
    the cap or early stopping (``deepdark.training.stopping``)."""
    config, stopping = run.config, run.stopping
    n_steps = math.ceil(len(run.samples.train_idx) / config.batch_size)
    if config.max_steps_per_epoch:
        n_steps = min(n_steps, int(config.max_steps_per_epoch))
    for epoch in range(start_epoch, config.epochs + 1):
        if stopping.should_stop(epoch - 1):
            break
        t0 = time.perf_counter()
        steps, sums = _train_epoch(run, epoch, n_steps)
        val = _validate(run)
        row = {
            "epoch": epoch,
            "steps": steps,
            **{k: sums.get(k, float("nan")) / max(steps, 1) if k in sums else None for k in LOSS_PARTS},
            "val_rmse_adu": val,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        history.append(row)
        best = stopping.improves(val)
        if best:
            save_best(out_dir, run.G, stopping, epoch, val)
        nets = (run.G, run.D, run.opt_g, run.opt_d, run.scaler)
        save_checkpoint(out_dir, epoch, *nets, signature, history, extra={"stopping": stopping.state()})
        remove_stale_best(out_dir, stopping)  # only once the checkpoint names the new one
        write_log(out_dir, history)
        _log_epoch(run, row, best)
    if not history:
        raise ValueError(f"{out_dir}: nothing trained")
    if stopping.should_stop(len(history)) and len(history) < config.epochs:
        log.info(
            "stopped after epoch %d: no improvement of %.3g %% in %d epochs; the model is epoch %d's",
            len(history),
            100 * config.min_improvement,
            config.patience,
            stopping.best_epoch,
        )
    if len(history) > config.epochs:
        log.warning(
            "%s: the checkpoint already holds %d epochs (more than the %d asked for); the model is written from it",
            out_dir,
            len(history),
            config.epochs,
        )


def _log_epoch(run: _Run, row: dict, best: bool) -> None:
    d_part = f"d {row['d_loss']:.4g} " if math.isfinite(row["d_loss"]) else ""
    msg = (
        f"epoch {row['epoch']}/{run.config.epochs}: {d_part}g {row['g_loss']:.4g} (l1 {row['g_l1']:.4g}), "
        f"val RMSE {row['val_rmse_adu']:.2f} ADU ({_val_region(run)}){' best' if best else ''}, "
        f"{row['seconds']:.1f} s"
    )
    log.info(msg)
    if run.progress:
        tqdm.write(msg)


def _train_epoch(run: _Run, epoch: int, n_steps: int) -> tuple[int, dict[str, float]]:
    """``n_steps`` steps on the training samples, shuffled and cropped by an rng seeded by (seed,
    ``epoch``) only; (steps done, sums of the steps' losses)."""
    config, samples = run.config, run.samples
    rng = np.random.default_rng([config.seed, epoch])
    order = samples.train_idx[rng.permutation(len(samples.train_idx))]
    sums: dict[str, float] = {}
    set_training_mode(run.G, config.bn)
    run.D.train()
    bar = tqdm(
        range(n_steps),
        desc=f"epoch {epoch}/{config.epochs}",
        unit="step",
        disable=None if run.progress else True,
        leave=False,
    )
    # The steps make the epoch's only passes of G: one set of hooks serves them all.
    tracking = track_running_stats(run.G, config.bn_momentum) if config.bn == "running" else contextlib.nullcontext()
    steps = 0
    with tracking:
        for step in bar:
            parts = _epoch_step(run, epoch, step, n_steps, order, rng)
            steps += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            if not bar.disable:
                # The l1 loss trains no discriminator: its d_loss is NaN, not worth showing.
                shown = ("d_loss", "g_loss", "g_l1")
                bar.set_postfix({k: f"{v:.4g}" for k, v in parts.items() if k in shown and math.isfinite(v)})
    bar.close()
    return steps, sums


def _epoch_step(run: _Run, epoch: int, step: int, n_steps: int, order: np.ndarray, rng) -> dict[str, float]:
    """Step ``step`` of ``epoch``: its learning rate, its batch of ``order`` (crops drawn from
    ``rng``) and one optimisation step (:func:`_train_step`); the step's losses."""
    config, samples = run.config, run.samples
    rate = config.lr * lr_factor(config.lr_schedule, epoch, step, n_steps, config.epochs)
    for opt in (run.opt_g, run.opt_d):
        for group in opt.param_groups:
            group["lr"] = rate
    sel = order[step * config.batch_size : (step + 1) * config.batch_size]
    corners = None
    if config.crop:
        corners = [tuple(int(v) for v in rng.integers(0, samples.size - config.crop + 1, 2)) for _ in sel]
    physics_mode = run.residual_range_adu is not None  # the batches carry the physics prediction
    batch = samples.source.batch(
        sel, samples.size, config.crop, corners, config.crop_mode, run.device, return_base=physics_mode
    )
    x, y, base = batch if physics_mode else (*batch, None)
    nets = (run.G, run.D, run.opt_g, run.opt_d, run.scaler)
    return _train_step(*nets, run.loss, x, y, run.device, base=base, residual_range_adu=run.residual_range_adu)


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
    adversarial = bool(loss_cfg.g_forms)
    loss_d = _discriminator_step(D, opt_d, scaler, loss_cfg, x, y, fake, dev) if adversarial else None
    loss_g, comps = _generator_step(D if adversarial else None, opt_g, scaler, loss_cfg, x, y, fake, dev)
    scaler.update()
    out = {"d_loss": float("nan") if loss_d is None else float(loss_d.detach()), "g_loss": float(loss_g.detach())}
    out.update({k: float(v) for k, v in comps.items()})
    return out


def _discriminator_step(D, opt_d, scaler, loss_cfg: LossConfig, x, y, fake, dev) -> torch.Tensor:
    """One step of D on the real pair and the fake one (detached: no gradient into G)."""
    _set_requires_grad(D, True)
    opt_d.zero_grad(set_to_none=True)
    with autocast(dev):
        loss_d = discriminator_loss(loss_cfg, D(x, y), D(x, fake.detach()))
    scaler.scale(loss_d).backward()
    scaler.step(opt_d)
    return loss_d


def _generator_step(D, opt_g, scaler, loss_cfg: LossConfig, x, y, fake, dev) -> tuple[torch.Tensor, dict]:
    """One step of G on its loss; ``D`` None: no adversarial term (L1 only)."""
    opt_g.zero_grad(set_to_none=True)
    if D is None:
        loss_g, comps = generator_loss(loss_cfg, None, fake.float(), y)
    else:
        _set_requires_grad(D, False)  # D's gradients are not needed for G's step
        with autocast(dev):
            loss_g, comps = generator_loss(loss_cfg, D(x, fake), fake.float(), y)
    scaler.scale(loss_g).backward()
    scaler.step(opt_g)
    if D is not None:
        _set_requires_grad(D, True)
    return loss_g, comps


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


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


def _val_region(run: _Run) -> str:
    crop, size = run.config.crop, run.samples.size
    return f"centre {crop}x{crop} crop of the window" if crop else f"whole {size}x{size} window"


def _save_model(run: _Run, out_dir: Path, lib: Library, history: list[dict], inputs: list[str], phys_card) -> None:
    """The model file of the best epoch's generator, its card recording the data, settings,
    validation and where the network is used (``deepdark.model.selection``)."""
    samples, stopping = run.samples, run.stopping
    restore_best(out_dir, run.G, stopping)
    train_tab = lib.table.iloc[samples.train_idx]
    val_tab = lib.table.iloc[samples.val_idx]
    training = {
        "shards": [str(p) for p in lib.paths],
        "nights": samples.train_nights,
        "val_nights": samples.val_nights,
        "setpoints": sorted(float(s) for s in set(train_tab["setpoint"])),
        "cameras": sorted(set(train_tab["camera"])),
        "exptimes": sorted(float(e) for e in set(train_tab["exptime"])),
        "n_frames": int(train_tab["file_hash"].nunique()),
        "n_samples": len(samples.train_idx),
        "n_val_frames": int(val_tab["file_hash"].nunique()),
        "n_val_samples": len(samples.val_idx),
        **run.config.card(),
        "steps": int(sum(r["steps"] for r in history)),
        "device": run.device.type,
        "mixed_precision": "float16 autocast, float32 output layer" if run.device.type == "cuda" else None,
        "seconds": round(sum(r["seconds"] for r in history), 1),
    }
    run.G.eval()
    save_model(
        out_dir,
        run.G,
        preset=run.config.preset,
        loss={"name": run.loss.name, "l1_weight": run.loss.l1_weight},
        geometry=lib.geometry,
        training=training,
        epochs=len(history),
        validation=_validation_card(run, history),
        inputs=inputs,
        extra=None if phys_card is None else {"physics": phys_card},
        selection=_selection(run, lib),
    )


def _validation_card(run: _Run, history: list[dict]) -> dict:
    """The card's validation section: the model file's RMSE (its best epoch's), physics alone's
    (physics mode), every epoch's and why training stopped."""
    stopping, config = run.stopping, run.config
    final = history[-1]["val_rmse_adu"]
    rmse = stopping.best_rmse_adu if stopping.best_rmse_adu is not None else final
    if len(history) < config.epochs and stopping.should_stop(len(history)):
        stop = f"no improvement of {100 * config.min_improvement:g} % in {config.patience} epochs"
    else:
        stop = f"epoch cap ({config.epochs})"
    return {
        "rmse_adu": None if rmse is None or math.isnan(rmse) else rmse,
        "region": _val_region(run),
        "n_samples": len(run.samples.val_idx),
        "nights": run.samples.val_nights,
        "history": [None if math.isnan(r["val_rmse_adu"]) else r["val_rmse_adu"] for r in history],
        "best_epoch": stopping.best_epoch,
        "physics_rmse_adu": stopping.physics_rmse_adu,
        "stopped": stop,
    }


def _selection(run: _Run, lib: Library) -> dict:
    """The card's selection section: physics alone against physics + network on the validation
    samples, per camera and group, and the decision (logged); strips-only: nothing to fall back on."""
    config, samples = run.config, run.samples
    if not config.physics_mode:
        log.warning("%s", S.strips_only_note(config.preset))
        return S.strips_only_record(config.preset)
    errors = validation_errors(*_validation_args(run))
    errors = errors.join(lib.table[["camera", "setpoint", "exptime"]])
    record = S.selection_record(
        errors,
        config.margin,
        region=_val_region(run),
        nights=samples.val_nights,
        best_epoch=run.stopping.best_epoch,
    )
    selection = S.Selection.from_card({"selection": record}, config.margin)
    record["decision"] = "no validation night: physics alone" if selection is None else selection.describe()
    log.info("where the network is used (margin %g): %s", config.margin, record["decision"])
    return record


def _physics_model(shards, out_dir: Path, config: TrainConfig, progress: bool):
    """(physics model, its entry of the model card) of a physics-mode run (:func:`_physics_file`)."""
    from deepdark.physics import PhysicsModel

    budget = (config.physics_memory_mb, config.threads)  # a fit on the run's threads (None: every core)
    phys_path, phys_source = _physics_file(shards, out_dir, config.physics, budget, progress)
    return PhysicsModel.load(phys_path), physics_card(phys_path, phys_source, config.residual_range_adu)


def _refuse_other_physics(out_dir: Path, dest: Path, other: str) -> None:
    """A run (a checkpoint, or a finished model) in ``out_dir`` was made with the physics model
    ``dest``: another one in its place (``other``) would break that model and could not resume
    it, so the command stops before it writes anything, as for any other setting that differs."""
    if dest.exists() and any((out_dir / name).exists() for name in (CHECKPOINT_JSON, CARD_FILE)):
        raise InputError(
            f"{out_dir} holds a run made with another physics model ({dest} differs from {other}): "
            "train into another --out, or remove that run"
        )


def _check_physics_source(src: Path, shards) -> None:
    """The physics model ``src`` opens and was fitted on the layout of the (first of) ``shards``
    (errors name ``src``, not the copy a run would make of it)."""
    from deepdark.physics import PhysicsModel

    with PhysicsModel(src) as model:
        for path in shards[:1]:
            with Shard(path) as shard:
                model.check_geometry(shard.geometry)


def _fitted_from(physics: Path, shards) -> bool:
    """Whether the physics model ``physics`` was fitted from the DARK and BIAS frames of ``shards``
    (the file names its frame tables record)."""
    import h5py

    from deepdark.io.tables import library_table

    try:
        with h5py.File(physics, "r") as f:
            fitted = {os.fsdecode(v) for g in f["cameras"].values() for v in g["frames/file"][()]}
    except (OSError, KeyError):
        return False
    with contextlib.ExitStack() as stack:
        lib = library_table([stack.enter_context(Shard(p)) for p in shards], ("DARK", "BIAS"))
    return fitted == set(lib.loc[lib["active_index"] >= 0, "file"])


def _physics_file(shards, out_dir: Path, physics, budget: tuple, progress: bool) -> tuple[Path, str]:
    """``out_dir/physics.h5``: a copy of ``physics``, or (None) fitted from ``shards``; (path, source)."""
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / C.PHYSICS_FILE
    if physics is not None:
        src = Path(physics)
        if not src.is_file():
            raise MissingInputError(f"physics model {src} not found")
        same_file = dest.exists() and dest.resolve() == src.resolve()
        if not same_file and not (dest.is_file() and file_sha256(dest) == file_sha256(src)):
            _refuse_other_physics(out_dir, dest, f"--physics {src}")
            _check_physics_source(src, list(shards))
            with atomic_path(dest) as tmp:
                shutil.copyfile(src, tmp)
        return dest, str(src.resolve())
    if dest.is_file():  # fitted by an earlier (interrupted) run: reused if of these shards' frames
        if _fitted_from(dest, shards):
            _check_physics_source(dest, list(shards))
            log.info("reusing the physics model %s", dest)
            return dest, "fitted from the training shards"
        _refuse_other_physics(out_dir, dest, "a fit of these shards' frames")
        log.info("%s was fitted from other frames: fitting again", dest)
    from deepdark.physics import fit_physics

    log.info("fitting the physics model of %d shard(s) into %s", len(shards), dest)
    fit_physics(list(shards), dest, memory_mb=budget[0], threads=budget[1], progress=progress)
    return dest, "fitted from the training shards"
