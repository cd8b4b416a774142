"""The settings of a training run: :class:`TrainConfig`, one frozen, validated dataclass.

It is the single list of the settings, each with its default and a one-line help: ``deepdark
train`` generates its options from it (:func:`add_train_arguments`, :func:`config_from_args`),
the checkpoint compares :meth:`TrainConfig.signature` to resume, and the model card records
:meth:`TrainConfig.card`. A field's metadata says where it appears: ``cli`` (the argparse options
of its flag, or None when it has no flag), ``resume`` (a checkpoint made with another value is not
resumed) and ``card`` (recorded in the card's training section).

This module imports no torch (``deepdark --help`` stays fast); the model's names (presets, the
physics presets) are imported when a configuration is validated.
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path

from deepdark.io.errors import InputError

BN_MODES = ("running", "batch")
CROP_MODES = ("window", "strips")
LR_SCHEDULES = ("constant", "linear", "pix2pix")
# the loss configurations (deepdark.model.losses.ALL_LOSSES) and normalisations
# (deepdark.model.nets.NORMS), spelled out here, in the order --help lists them, to keep torch out
LOSS_NAMES = ("deepdark", "pix2pix", "lsgan", "mixed", "l1")
NORM_NAMES = ("batch", "instance", "none")
DEVICES = ("auto", "cpu", "cuda")


def _setting(default, help: str, cli: dict | None = None, *, resume: bool = False, card: bool = False):
    """A field of :class:`TrainConfig`: its default, help, argparse options and where it is recorded."""
    return field(default=default, metadata={"help": help, "cli": cli, "resume": resume, "card": card})


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (``deepdark.training.loop.train``), validated on creation.

    The field order is the order of ``deepdark train --help``. Sequences are stored as tuples.
    """

    preset: str = _setting(
        "physics",
        "generator preset (see `deepdark presets`); default: physics (the compact generator on the strips "
        "plus the physics prediction, predicting a residual on it); paper/compact: strips only (the paper)",
        {},
        resume=True,
    )
    epochs: int = _setting(
        40,
        "at most this many passes over the training samples (training stops earlier when the validation "
        "RMSE stops improving: --patience)",
        {"type": int},
    )
    patience: int = _setting(
        10,
        "stop after this many epochs without an improvement of the validation RMSE by --min-improvement, and "
        "keep the best epoch's weights (physics preset: the untrained model, physics alone, is epoch 0); "
        "0: never stop early",
        {"type": int},
        card=True,
    )
    min_improvement: float = _setting(
        0.001,
        "the fraction of the best validation RMSE by which an epoch must lower it to count as an improvement",
        {"type": float},
        card=True,
    )
    margin: float = _setting(
        0.005,
        "physics preset: the network is used for a camera or (setpoint, exposure) group only where it lowered "
        "the validation RMSE of physics alone by at least this fraction (the card records both; `deepdark "
        "predict --margin` may apply another)",
        {"type": float},
        card=True,
    )
    # the command line's choices; the API also takes "cuda:N"
    device: str = _setting("auto", "auto: CUDA when available, else the CPU", {"choices": list(DEVICES)})
    l1_weight: float = _setting(100.0, "weight of the L1 term (pix2pix: 100)", {"type": float}, resume=True)
    batch_size: int = _setting(1, "paper: 1", {"type": int}, resume=True, card=True)
    lr: float = _setting(2e-5, "Adam learning rate (paper: 2e-5)", {"type": float}, resume=True, card=True)
    lr_schedule: str = _setting(
        "constant",
        "constant (paper), linear decay to zero over the run, or pix2pix's (constant, then linear to zero "
        "over the second half of the epochs)",
        {"choices": list(LR_SCHEDULES)},
        resume=True,
        card=True,
    )
    crop: int | None = _setting(
        None, "train on random CROP x CROP crops of the window (CPU)", {"type": int}, resume=True, card=True
    )
    max_steps_per_epoch: int | None = _setting(
        None,
        "at most this many optimisation steps per epoch",
        {"flag": "--max-steps", "metavar": "MAX_STEPS", "type": int},
        resume=True,
        card=True,
    )
    seed: int = _setting(
        0, "seed of the initial weights, the sample order and the crops", {"type": int}, resume=True, card=True
    )
    resume: bool = _setting(
        True, "ignore a checkpoint in the output folder", {"flag": "--no-resume", "action": "store_false"}
    )
    loss: str | None = _setting(
        None,
        "loss configuration (paper 2.5, Table 2; l1: no adversarial term). Default: deepdark for the paper's "
        "presets; l1 for physics, whose residual the adversarial terms only roughen (measured: 16.98 vs 16.90 "
        "ADU at a floor of 16.61)",
        {"choices": list(LOSS_NAMES)},
        resume=True,
    )
    physics: Path | None = _setting(
        None,
        "physics model (`deepdark physics-fit`) the physics preset conditions on; copied into the model "
        "directory. Default: fitted from the same shards into OUT/physics.h5",
        {"type": Path},
    )
    residual_range_adu: float = _setting(
        64.0,
        "physics preset: the learned residual is bounded by +- this many ADU",
        {"flag": "--residual-range", "metavar": "RESIDUAL_RANGE", "type": float},
    )
    physics_memory_mb: float = _setting(
        512, "memory budget of the physics fit when --physics is not given", {"type": float}
    )
    betas: tuple[float, float] = _setting(
        (0.5, 0.999), "Adam betas", {"type": float, "nargs": 2}, resume=True, card=True
    )
    val_nights: int | tuple[str, ...] | None = _setting(
        None,
        "validation nights: a count (the last N nights) or YYYYMMDD names (default: the last night(s))",
        {"nargs": "+", "metavar": "N|NIGHT"},
    )
    bn: str = _setting(
        "running",
        "generator batch norm while training: running statistics as at inference (default) or batch "
        "statistics (the reference; erases the level with small batches)",
        {"choices": list(BN_MODES)},
        resume=True,
        card=True,
    )
    bn_momentum: float = _setting(
        0.01, "update rate of the running statistics", {"type": float}, resume=True, card=True
    )
    norm: str | None = _setting(None, "override the preset's normalisation", {"choices": list(NORM_NAMES)})
    crop_mode: str = _setting(
        "window",
        "crop the whole-window input (default) or crop the strips and resize them to the crop",
        {"choices": list(CROP_MODES)},
        resume=True,
        card=True,
    )
    setpoints: tuple[float, ...] | None = _setting(
        None, "train on darks at these setpoints only (C)", {"type": float, "nargs": "+"}, resume=True
    )
    max_val_samples: int | None = _setting(None, "validate on at most this many held-out channels", {"type": int})
    nights: tuple[str, ...] | None = _setting(None, "use the darks of these nights only (the split is made among them)")
    cache_mb: float = _setting(1024, "memory for samples read once and kept (the rest is read again each epoch)")
    init_level: bool = _setting(
        True, "start the generator's output at the training targets' mean level", resume=True, card=True
    )
    threads: int | None = _setting(
        None,
        "CPU threads of torch (default: 1 when a step sees at most 256 x 256 pixels, where more threads wait "
        "on each other more than they compute, above all on a busy machine; else torch's default)",
        {"type": int},
    )

    def __post_init__(self):
        from deepdark.model.nets import PHYSICS_PRESETS, PRESETS

        for name, value in (("betas", self.betas), ("setpoints", self.setpoints), ("nights", self.nights)):
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if self.val_nights is not None and not isinstance(self.val_nights, numbers.Integral):
            object.__setattr__(self, "val_nights", tuple(self.val_nights))
        if self.physics is not None:
            object.__setattr__(self, "physics", Path(self.physics))
        object.__setattr__(self, "device", str(self.device))  # a torch.device too
        _check_choice("preset", self.preset, tuple(PRESETS))
        _check_choice("loss", self.loss, LOSS_NAMES, optional=True)
        _check_choice("norm", self.norm, NORM_NAMES, optional=True)
        _check_choice("bn", self.bn, BN_MODES)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("crop_mode", self.crop_mode, CROP_MODES)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise InputError(f"unknown device {self.device!r}; valid: {', '.join(DEVICES)} or cuda:N")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 0 or self.min_improvement < 0:
            raise InputError(
                f"patience and min_improvement must be >= 0, got {self.patience} and {self.min_improvement}"
            )
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be >= 1, got {self.threads}")
        if len(self.betas) != 2:
            raise InputError(f"betas must be two numbers, got {self.betas}")
        if self.physics is not None and self.preset not in PHYSICS_PRESETS:
            raise InputError(
                f"preset {self.preset!r} takes strips only; a physics model is used by the "
                f"{', '.join(sorted(PHYSICS_PRESETS))} preset"
            )

    @property
    def physics_mode(self) -> bool:
        """Whether the preset conditions on the physics prediction (``PHYSICS_PRESETS``)."""
        from deepdark.model.nets import PHYSICS_PRESETS

        return self.preset in PHYSICS_PRESETS

    @property
    def loss_name(self) -> str:
        """The loss configuration: ``loss``, or by default l1 for the physics presets, whose residual
        the adversarial terms only roughen, and deepdark (the paper's) for the others."""
        if self.loss is not None:
            return self.loss
        return "l1" if self.physics_mode else "deepdark"

    def record(self) -> dict:
        """All settings as JSON types (``dataclasses.asdict``), the loss resolved and the settings
        that do not apply set to None: ``crop_mode`` without a crop, ``bn_momentum`` without running
        statistics; ``init_level`` is False for the physics presets, which start at the physics
        prediction instead."""
        rec = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        rec.update(
            loss=self.loss_name,
            l1_weight=float(self.l1_weight),
            crop_mode=self.crop_mode if self.crop else None,
            bn_momentum=self.bn_momentum if self.bn == "running" else None,
            init_level=self.init_level and not self.physics_mode,
            setpoints=None if self.setpoints is None else sorted(float(s) for s in self.setpoints),
            physics=None if self.physics is None else str(self.physics),
        )
        return rec

    def signature(self) -> dict:
        """The settings a checkpoint must have been made with to be resumed (fields marked ``resume``).

        ``epochs`` is left out, so that a run can be continued with more epochs, unless the learning
        rate decays: the schedule depends on the epoch count (``schedule_epochs``).
        """
        rec = self.record()
        sig = {f.name: rec[f.name] for f in dataclasses.fields(self) if f.metadata["resume"]}
        sig["schedule_epochs"] = self.epochs if self.lr_schedule != "constant" else None
        return sig

    def card(self) -> dict:
        """The settings recorded in the model card's training section (fields marked ``card``)."""
        rec = self.record()
        return {f.name: rec[f.name] for f in dataclasses.fields(self) if f.metadata["card"]}


def _check_choice(name: str, value, valid: tuple, optional: bool = False) -> None:
    if not (value in valid or (optional and value is None)):
        raise InputError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add an option for every :class:`TrainConfig` field that has one (metadata ``cli``), with the
    field's default and help; the option's value lands under the field's name."""
    for f in dataclasses.fields(TrainConfig):
        cli = f.metadata["cli"]
        if cli is None:
            continue
        opts = dict(cli)
        flag = opts.pop("flag", "--" + f.name.replace("_", "-"))
        parser.add_argument(flag, dest=f.name, default=f.default, help=f.metadata["help"], **opts)


def config_from_args(args: argparse.Namespace, **changes) -> TrainConfig:
    """The :class:`TrainConfig` of parsed options (:func:`add_train_arguments`), with ``changes``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.metadata["cli"] is not None}
    return TrainConfig(**{**values, **changes})
