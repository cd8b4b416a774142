"""The ``deepdark`` command: a thin shell over the package (anything a workflow rule does, a
user can do from the shell with the same function).

The subcommands and their arguments are a contract other tools script against: add options,
never change what an existing one means.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import importlib
import inspect
import json
import logging
import os
import sys
from datetime import datetime, timedelta
from pathlib import Path

from deepdark import __version__
from deepdark.io.errors import DeepdarkError, InputError, MissingInputError, OutputError
from deepdark.training.config import DEVICES, LR_SCHEDULES

log = logging.getLogger("deepdark")


class UserError(InputError):
    """Bad input: reported in one line, exit status 2."""


# -- subcommands -----------------------------------------------------------------------------------


def cmd_simulate(a: argparse.Namespace) -> None:
    from deepdark.sim.simulate import simulate_archive

    paths = simulate_archive(
        a.out,
        geometry=a.geometry,
        nights=a.nights,
        seed=a.seed,
        cameras=a.cameras,
        temperatures=a.temperatures,
        darks_per_temp=a.darks_per_temp,
        effects=a.effects,
        pattern_scale=a.pattern_scale,
        dark_exptimes=a.dark_exptimes,
        bias_per_night=a.bias_per_night,
        guide_per_night=a.guide_per_night,
        first_night=a.first_night,
        compress=a.compress,
        progress=not a.quiet,
    )
    log.info("wrote %d frames under %s", len(paths), a.out)


def cmd_extract(a: argparse.Namespace) -> None:
    from deepdark.io.geometry import load_geometry
    from deepdark.pipeline.extract import extract

    res = extract(
        a.inputs, a.out, load_geometry(a.geometry), keywords=_keywords(a), progress=not a.quiet, cameras=a.cameras
    )
    log.info(
        "%s: %d frames, %d quarantined (%s)",
        res.shard,
        res.n_frames,
        res.n_quarantined,
        res.shard.name.removesuffix(".h5") + ".quarantine.csv",
    )


def cmd_baseline(a: argparse.Namespace) -> None:
    from deepdark.pipeline.baseline import build_masters

    out = build_masters(a.shards, a.out, memory_mb=a.memory_mb, progress=not a.quiet, scratch=a.scratch)
    log.info("master darks written to %s", out)


def cmd_evaluate(a: argparse.Namespace) -> None:
    from deepdark.evaluation.evaluate import evaluate, format_table, lenient

    if not (a.baseline or a.model or getattr(a, "physics", None)):
        raise UserError("nothing to evaluate: give --baseline, --model and/or --physics")
    predictors = {}
    if a.model:
        from deepdark.model.runner import model_predictor

        predictors["model"] = model_predictor(a.model, device=a.device, batch_size=a.batch_size)
        phys = predictors["model"].runner.model.physics
        if phys is not None and not getattr(a, "physics", None):
            # a physics-mode model: show the physics model it was trained with beside it
            from deepdark.physics import physics_predictor

            predictors["physics"] = physics_predictor(phys["path"])
    if getattr(a, "physics", None):
        from deepdark.physics import physics_predictor

        predictors["physics"] = physics_predictor(a.physics)
    predictors = {name: lenient(p) for name, p in predictors.items()}
    table = evaluate(a.test, a.baseline, a.out, predictors=predictors, progress=not a.quiet)
    print(format_table(table))


# -- model subcommands (train, predict, ablation) --


def _val_nights(values):
    """``--val-nights 2`` (the last two nights) or ``--val-nights 20240103 20240104`` (those)."""
    if not values:
        return None
    if len(values) == 1 and values[0].isdigit() and len(values[0]) < 8:
        return int(values[0])
    return list(values)


def cmd_train(a: argparse.Namespace) -> None:
    from deepdark.model.nets import PHYSICS_PRESETS
    from deepdark.training.config import config_from_args
    from deepdark.training.loop import train

    if a.physics is not None and a.preset not in PHYSICS_PRESETS:
        raise UserError(f"--physics conditions the physics preset; --preset {a.preset} takes strips only")
    res = train(a.shards, a.out, config_from_args(a, val_nights=_val_nights(a.val_nights)), progress=not a.quiet)
    best = "" if res.best_epoch is None else f" (best epoch {res.best_epoch}{', stopped early' * res.stopped_early})"
    print(
        f"{res.model_dir}: {res.epochs} epochs{best} in {res.seconds:.0f} s, trained on nights "
        f"{','.join(res.train_nights)}; validation RMSE {res.val_rmse_adu:.2f} ADU on "
        f"{','.join(res.val_nights) or 'no night'}"
    )


def cmd_predict(a: argparse.Namespace) -> None:
    from deepdark.pipeline.predict import predict_shard

    out = predict_shard(
        a.model, a.shard, a.out, batch_size=a.batch_size, device=a.device, progress=not a.quiet, margin=a.margin
    )
    log.info("predicted darks written to %s", out)


def cmd_ablation(a: argparse.Namespace) -> None:
    from deepdark.evaluation.ablation import ablation, format_table2

    table = ablation(
        a.shards,
        a.out,
        setpoint=a.setpoint,
        losses=a.losses,
        preset=a.preset,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        l1_weight=a.l1_weight,
        crop=a.crop,
        test_nights=_val_nights(a.test_nights),
        device=a.device,
        seed=a.seed,
        max_steps_per_epoch=a.max_steps,
        progress=not a.quiet,
        resume=not a.no_resume,
        lr_schedule=a.lr_schedule,
    )
    print(format_table2(table))


def cmd_physics_fit(a: argparse.Namespace) -> None:
    from deepdark.physics import fit_physics

    if a.threads is not None and a.threads < 1:
        raise UserError(f"--threads must be at least 1, got {a.threads}")

    out = fit_physics(
        a.shards,
        a.out,
        memory_mb=a.memory_mb,
        overscan_skip=a.overscan_skip,
        smooth_px=a.smooth_px,
        cameras=a.cameras,
        progress=not a.quiet,
        threads=a.threads,
    )
    log.info("physics model written to %s", out)


def cmd_physics_merge(a: argparse.Namespace) -> None:
    from deepdark.physics import merge_physics

    log.info("physics model of %d part(s) written to %s", len(a.parts), merge_physics(a.parts, a.out))


def cmd_cameras(a: argparse.Namespace) -> None:
    from deepdark.io.atomic import atomic_path
    from deepdark.io.shards import Shard
    from deepdark.io.tables import library_cameras

    with contextlib.ExitStack() as stack:
        table = library_cameras([stack.enter_context(Shard(p)) for p in a.shards])
    if table.empty:
        raise InputError(f"no DARK or BIAS frames in {len(a.shards)} library shard(s)")
    if a.out is not None:
        with atomic_path(a.out) as tmp:
            table.to_csv(tmp, index=False)
    print(table.to_string(index=False))


# -- workflow subcommands (correct, qa, summary) --


def cmd_correct(a: argparse.Namespace) -> None:
    from deepdark.pipeline.correct import correct_night

    if not a.quantize_level > 0:
        raise UserError(f"--quantize-level must be > 0, got {a.quantize_level:g}")
    res = correct_night(
        a.source,
        a.out,
        method=a.method,
        masters=a.masters,
        include_dark=a.include_dark,
        cameras=a.cameras,
        keywords=_keywords(a),
        replace_with_empty=a.replace_with_empty,
        progress=not a.quiet,
        compression=a.compression,
        quantize_level=a.quantize_level,
    )
    log.info(
        "%s: %d frames corrected (%d flagged), %d failed, %d skipped (%s)",
        a.out,
        res.n_corrected,
        res.n_flagged,
        res.n_failed,
        res.n_skipped,
        res.manifest,
    )
    if res.n_failed and (a.strict or res.n_corrected == 0):
        raise UserError(f"{res.n_failed} frame(s) could not be corrected, see {res.manifest}")


def cmd_qa(a: argparse.Namespace) -> None:
    from deepdark.pipeline.qa import night_qa

    qa = night_qa(
        a.shard, a.predictions, a.masters, a.out, keywords=_keywords(a), cameras=a.cameras, progress=not a.quiet
    )
    log.info("QA of %s: %d frame-channels, %s", a.shard, len(qa), a.out / "qa.html")


def cmd_summary(a: argparse.Namespace) -> None:
    from deepdark.evaluation.evaluate import format_table
    from deepdark.pipeline.summary import summarize

    nights = [n for n in a.nights.split(",") if n] if a.nights else None
    table, table1 = summarize(
        a.qa_dir,
        a.csv,
        a.html,
        a.table,
        nights=nights,
        corrected_dir=a.corrected_dir,
        max_failed_fraction=a.max_failed_fraction,
    )
    log.info("%d nights summarised, %d flagged: %s", len(table), int((table["flag"] != "").sum()), a.html)
    if table1:
        print(format_table(table1))


def cmd_presets(a: argparse.Namespace) -> None:
    from deepdark.io.geometry import presets

    print("geometries:", ", ".join(presets()))
    from deepdark.model.nets import describe_presets, format_presets

    print(format_presets(describe_presets(size=a.size), size=a.size))


# -- argument parsing -----------------------------------------------------------------------------
#
# Options that several commands share come from parent parsers. An option whose value goes
# straight to a package function takes its default from that function's signature
# (FunctionDefault): each default is written once, where the function is.


def _keywords(a: argparse.Namespace):
    """The header keyword names of ``--keywords`` (JSON), each key checked."""
    from deepdark.io.frames import Keywords

    if not a.keywords:
        return Keywords()
    try:
        names = json.loads(a.keywords)
    except json.JSONDecodeError as exc:
        raise UserError(f"--keywords {a.keywords!r} is not JSON ({exc})") from None
    valid = [f.name for f in dataclasses.fields(Keywords)]
    if not isinstance(names, dict):
        raise UserError(f"--keywords {a.keywords!r} is not a JSON object of names ({', '.join(valid)})")
    unknown = sorted(set(names) - set(valid))
    if unknown:
        raise UserError(f"--keywords: unknown key(s) {', '.join(map(repr, unknown))} (valid: {', '.join(valid)})")
    bad = {k: v for k, v in names.items() if not isinstance(v, str) or not v.strip()}
    if bad:
        raise UserError(f"--keywords: {bad} must name header keywords (non-empty text)")
    return Keywords(**names)


class FunctionDefault:
    """The default of ``parameter`` of ``function`` (``"module:name"``), read from its signature.

    The module is imported only when the value is needed (the command runs, or its ``--help``
    shows ``%(default)s``), so that building the parser imports neither torch nor the pipeline.
    """

    def __init__(self, function: str, parameter: str):
        self.function, self.parameter = function, parameter

    def value(self):
        module, name = self.function.split(":")
        parameter = inspect.signature(getattr(importlib.import_module(module), name)).parameters[self.parameter]
        return parameter.default

    def __str__(self) -> str:
        value = self.value()
        return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    def __repr__(self) -> str:
        return f"FunctionDefault({self.function!r}, {self.parameter!r})"


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with every option left out that defaults to a :class:`FunctionDefault` set to its value."""
    for name, value in vars(args).items():
        if isinstance(value, FunctionDefault):
            setattr(args, name, value.value())
    return args


def _verbosity_options(in_command: bool) -> argparse.ArgumentParser:
    """-q/-v, before the command (defaults: off) and after it. After it, an option left out is not
    set at all (SUPPRESS), so that it keeps what was given before the command."""
    default = argparse.SUPPRESS if in_command else False
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars, warnings only")
    parent.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    return parent


def _device_option(function: str) -> argparse.ArgumentParser:
    """--device, defaulting to that of ``function`` (``"module:name"``)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--device",
        choices=DEVICES,
        default=FunctionDefault(function, "device"),
        help="auto: CUDA when available, else the CPU (default: %(default)s)",
    )
    return parent


def _frame_options() -> argparse.ArgumentParser:
    """--keywords and --cameras of the commands that read raw frames."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--keywords", help='header keyword names as JSON, e.g. {"ccdtemp": "TEMP"}')
    parent.add_argument("--cameras", nargs="+", help="only the frames of these cameras (CAMERA values; default: all)")
    return parent


class _Commands(argparse._SubParsersAction):
    """The subcommands: every one also takes -q/-v after its name (``deepdark extract -q ...``)."""

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        kwargs["parents"] = [*kwargs.get("parents", []), _verbosity_options(in_command=True)]
        return super().add_parser(name, **kwargs)


def _ablation_options(s: argparse.ArgumentParser) -> None:
    """The training budget and the design of `deepdark ablation` (its function's defaults)."""
    ablation = "deepdark.evaluation.ablation:ablation"
    s.add_argument(
        "--preset",
        default=FunctionDefault(ablation, "preset"),
        help="generator preset (see `deepdark presets`; default: %(default)s)",
    )
    s.add_argument(
        "--epochs",
        type=int,
        default=FunctionDefault(ablation, "epochs"),
        help="epochs per loss configuration (default: %(default)s)",
    )
    s.add_argument(
        "--l1-weight",
        type=float,
        default=FunctionDefault(ablation, "l1_weight"),
        help="weight of the L1 term (pix2pix: 100; default: %(default)s)",
    )
    s.add_argument(
        "--batch-size",
        type=int,
        default=FunctionDefault(ablation, "batch_size"),
        help="paper: 1 (default: %(default)s)",
    )
    s.add_argument(
        "--lr",
        type=float,
        default=FunctionDefault(ablation, "lr"),
        help="Adam learning rate (paper: 2e-5; default: %(default)s)",
    )
    s.add_argument(
        "--lr-schedule",
        default=FunctionDefault("deepdark.training.config:TrainConfig", "lr_schedule"),
        choices=LR_SCHEDULES,
        help="constant (paper), linear decay to zero over the run, or pix2pix's (constant, "
        "then linear to zero over the second half of the epochs; default: %(default)s)",
    )
    s.add_argument("--crop", type=int, help="train on random CROP x CROP crops of the window (CPU)")
    s.add_argument("--max-steps", type=int, help="at most this many optimisation steps per epoch")
    s.add_argument(
        "--seed",
        type=int,
        default=FunctionDefault(ablation, "seed"),
        help="seed of every training (default: %(default)s)",
    )
    s.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in the output folder")
    s.add_argument(
        "--setpoint",
        type=float,
        default=FunctionDefault(ablation, "setpoint"),
        help="the darks' setpoint (paper: -15 C; default: %(default)s)",
    )
    s.add_argument(
        "--losses",
        nargs="+",
        default=FunctionDefault(ablation, "losses"),
        choices=["deepdark", "pix2pix", "lsgan", "mixed"],
        help="the loss configurations to compare (default: %(default)s)",
    )
    s.add_argument(
        "--test-nights",
        nargs="+",
        metavar="N|NIGHT",
        help="held-out nights: a count (the last N) or YYYYMMDD names (default: the last night(s))",
    )


SIMULATOR = "deepdark.sim.simulate:simulate_archive"


def _geometry_option() -> argparse.ArgumentParser:
    """--geometry, defaulting to the geometry the simulator writes: the package's camera."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--geometry",
        default=FunctionDefault(SIMULATOR, "geometry"),
        help="geometry preset or YAML file (default: %(default)s)",
    )
    return parent


# The simulator's options: flag, argparse keywords, help; each defaults to the simulator's own.
_SIMULATE_OPTIONS = (
    ("--nights", dict(type=int), "nights to write"),
    ("--seed", dict(type=int), "seed of the camera physics and every frame"),
    ("--cameras", dict(nargs="+"), "camera ids, each with its own physics"),
    ("--temperatures", dict(nargs="+", type=float), "dark setpoints, C"),
    ("--darks-per-temp", dict(type=int), "darks per setpoint, night and camera"),
    ("--dark-exptimes", dict(nargs="+", type=float), "dark exposure times, s"),
    ("--bias-per-night", dict(type=int), "BIAS frames per night and camera"),
    ("--guide-per-night", dict(type=int), "guide (OBJECT) frames per night and camera"),
    ("--first-night", {}, "YYYYMMDD of the first night"),
    ("--effects", dict(nargs="*"), "effects the physics model cannot describe (amp_glow, pickup), none by default"),
    (
        "--pattern-scale",
        dict(type=float),
        "strength of the fixed dark pattern (rings, gradients, DSNU, hot pixels): 0 none, 1 the camera as drawn",
    ),
)


def _simulate_command(sub) -> None:
    """simulate: every option defaults to the simulator's own default."""
    s = sub.add_parser(
        "simulate", parents=[_geometry_option()], help="write a simulated raw archive (ARCHIVE/YYYYMMDD/*.fits)"
    )
    s.add_argument("out", type=Path, help="archive folder to create")
    for flag, kwargs, text in _SIMULATE_OPTIONS:
        parameter = flag[2:].replace("-", "_")
        default = FunctionDefault(SIMULATOR, parameter)
        s.add_argument(flag, default=default, help=f"{text} (default: %(default)s)", **kwargs)
    s.add_argument("--compress", action="store_true", help="write .fits.gz")
    s.set_defaults(func=cmd_simulate)


def _data_commands(sub) -> None:
    """extract, baseline, evaluate."""
    s = sub.add_parser(
        "extract",
        parents=[_geometry_option(), _frame_options()],
        help="strips of a night (or files) into one HDF5 shard",
    )
    s.add_argument("inputs", nargs="+", help="night folders and/or FITS files")
    s.add_argument("--out", required=True, type=Path, help="shard to write (SHARD.h5; quarantine beside it)")
    s.set_defaults(func=cmd_extract)

    s = sub.add_parser("baseline", help="median master darks (all temperatures and per temperature)")
    s.add_argument("shards", nargs="+", type=Path, help="shards of the dark library")
    s.add_argument("--out", required=True, type=Path, help="master-dark file to write (.h5)")
    s.add_argument(
        "--memory-mb",
        type=int,
        default=FunctionDefault("deepdark.pipeline.baseline:build_masters", "memory_mb"),
        help="memory budget of the streamed median, MB (default: %(default)s)",
    )
    s.add_argument(
        "--scratch",
        type=Path,
        help="folder for the scratch file of a library larger than the budget (default: the folder of --out)",
    )
    s.set_defaults(func=cmd_baseline)

    predictor = "deepdark.model.runner:model_predictor"
    s = sub.add_parser(
        "evaluate",
        parents=[_device_option(predictor)],
        help="the paper's Table 1: RMSE of each method against real darks",
    )
    s.add_argument("--test", nargs="+", required=True, type=Path, help="shards of test nights")
    s.add_argument("--baseline", type=Path, help="master-dark file from `deepdark baseline`")
    s.add_argument("--model", type=Path, help="model directory from `deepdark train`")
    s.add_argument("--physics", type=Path, help="physics model from `deepdark physics-fit` (adds the `physics` column)")
    s.add_argument(
        "--batch-size",
        type=int,
        default=FunctionDefault(predictor, "batch_size"),
        help="channels per forward pass of the model (default: %(default)s)",
    )
    s.add_argument("--out", required=True, type=Path, help="folder for table1.json/csv and figures")
    s.set_defaults(func=cmd_evaluate)


def _model_commands(sub) -> None:
    """predict, ablation, physics-fit, physics-merge, cameras."""
    predict = "deepdark.pipeline.predict:predict_shard"
    s = sub.add_parser(
        "predict",
        parents=[_device_option(predict)],
        help="predicted darks over the whole active area of every frame of a shard",
    )
    s.add_argument("shard", type=Path, help="the night's shard")
    s.add_argument("--model", required=True, type=Path, help="model directory from `deepdark train`")
    s.add_argument("--out", required=True, type=Path, help="predictions file to write (.h5)")
    s.add_argument(
        "--batch-size",
        type=int,
        default=FunctionDefault(predict, "batch_size"),
        help="channels per forward pass (default: %(default)s)",
    )
    s.add_argument(
        "--margin",
        type=float,
        default=FunctionDefault(predict, "margin"),
        help="physics-mode models: run the network only for the cameras and (setpoint, exposure) groups where it "
        "lowered the validation RMSE of physics alone by at least this fraction (recorded on the model card); "
        "elsewhere physics alone (default: %(default)s)",
    )
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser(
        "ablation",
        parents=[_device_option("deepdark.evaluation.ablation:ablation")],
        help="the paper's Table 2: the four loss configurations at one setpoint",
    )
    s.add_argument("shards", nargs="+", type=Path, help="shards of the library (train and test nights)")
    s.add_argument("--out", required=True, type=Path, help="folder for table2.csv/json and the models")
    _ablation_options(s)
    s.set_defaults(func=cmd_ablation)

    _physics_fit_command(sub)

    s = sub.add_parser("physics-merge", help="one physics model from per-camera fits (`physics-fit --cameras`)")
    s.add_argument("parts", nargs="+", type=Path, help="physics models of disjoint cameras")
    s.add_argument("--out", required=True, type=Path, help="physics model to write (.h5)")
    s.set_defaults(func=cmd_physics_merge)

    s = sub.add_parser("cameras", help="the cameras of a dark library: frames, darks, biases, nights, setpoints")
    s.add_argument("shards", nargs="+", type=Path, help="shards of the dark library")
    s.add_argument("--out", type=Path, help="also write the table here (CSV)")
    s.set_defaults(func=cmd_cameras)


def _physics_fit_command(sub) -> None:
    fit = "deepdark.physics:fit_physics"
    s = sub.add_parser("physics-fit", help="per-pixel physical dark model of a dark library (the `physics` predictor)")
    s.add_argument("shards", nargs="+", type=Path, help="shards of the dark library (DARK and BIAS frames)")
    s.add_argument("--out", required=True, type=Path, help="physics model to write (.h5)")
    s.add_argument(
        "--memory-mb",
        type=float,
        default=FunctionDefault(fit, "memory_mb"),
        help="memory budget of the fit (below the least the library needs: a warning); the result does not"
        " depend on it (default: %(default)s)",
    )
    s.add_argument(
        "--overscan-skip",
        type=int,
        default=FunctionDefault(fit, "overscan_skip"),
        help="first overscan columns left out of the row bias (default: %(default)s)",
    )
    s.add_argument(
        "--smooth-px",
        type=int,
        default=FunctionDefault(fit, "smooth_px"),
        help="radius of the smooth prior on glow and the fast component (0: per-pixel only; default: %(default)s)",
    )
    s.add_argument(
        "--cameras",
        nargs="+",
        metavar="CAMERA",
        help="fit only these cameras (CAMERA header values; default: every camera of the library)",
    )
    s.add_argument(
        "--threads",
        type=int,
        help="threads of the fit (the result does not depend on them; default: every core this process may use)",
    )
    s.set_defaults(func=cmd_physics_fit)


def _workflow_commands(sub) -> None:
    """correct, qa, summary, presets."""
    s = sub.add_parser(
        "correct",
        parents=[_frame_options()],
        help="dark-corrected FITS of every frame of a night (active mosaic, float32)",
    )
    s.add_argument("source", type=Path, help="predictions file (method model) or the night's shard (median methods)")
    s.add_argument("--out", required=True, type=Path, help="folder for <frame>.fits and manifest.csv")
    s.add_argument(
        "--method",
        default=FunctionDefault("deepdark.pipeline.correct:correct_night", "method"),
        choices=["model", "median_temp", "median_all"],
        help="dark to remove: the predictions, or a median master (needs --masters; default: %(default)s)",
    )
    s.add_argument("--masters", type=Path, help="master-dark file from `deepdark baseline`")
    s.add_argument("--include-dark", action="store_true", help="append the removed dark as extension DARK")
    s.add_argument(
        "--compression",
        default=FunctionDefault("deepdark.pipeline.correct:correct_night", "compression"),
        choices=["RICE_1", "GZIP_2", "none"],
        help="tile compression of the corrected FITS: RICE_1 (quantised to the frame's noise), GZIP_2 "
        "(lossless) or none (default: %(default)s)",
    )
    s.add_argument(
        "--quantize-level",
        type=float,
        default=FunctionDefault("deepdark.pipeline.correct:correct_night", "quantize_level"),
        help="RICE_1: the frame's noise over the quantisation step; adds noise of 1/(level sqrt 12) of the "
        "frame's (default: %(default)s)",
    )
    s.add_argument("--strict", action="store_true", help="exit 2 when any frame fails (default: only when all fail)")
    s.add_argument(
        "--replace-with-empty",
        action="store_true",
        help="let a result without any corrected frame replace the frames an earlier run left in --out "
        "(default: refuse, exit 2)",
    )
    s.set_defaults(func=cmd_correct)

    s = sub.add_parser(
        "qa",
        parents=[_frame_options()],
        help="per-night QA: RMSE of darks, guide-frame background, quarantine (CSV + HTML)",
    )
    s.add_argument("--shard", required=True, type=Path, help="the night's shard")
    s.add_argument("--predictions", required=True, type=Path, help="the night's predictions file")
    s.add_argument("--masters", type=Path, help="master-dark file: adds the median baselines")
    s.add_argument("--out", required=True, type=Path, help="QA folder of the night (qa.csv, qa.html, figures)")
    s.set_defaults(func=cmd_qa)

    s = sub.add_parser("summary", help="all nights' QA in one table and page: Table 1 over the archive, flags")
    s.add_argument("--qa-dir", required=True, type=Path, help="folder of the nights' QA folders")
    s.add_argument("--nights", help="comma-separated YYYYMMDD (default: every QA folder with a qa.csv)")
    s.add_argument("--corrected-dir", type=Path, help="folder of the nights' corrected folders (failure counts)")
    s.add_argument("--csv", required=True, type=Path, help="per-night table to write")
    s.add_argument("--html", required=True, type=Path, help="page to write")
    s.add_argument("--table", type=Path, help="Table 1 over the archive (CSV) to write")
    s.add_argument(
        "--max-failed-fraction",
        type=float,
        default=FunctionDefault("deepdark.pipeline.summary:summarize", "max_failed_fraction"),
        help="flag a night where more than this fraction of its frames failed correction "
        "(needs --corrected-dir; default: %(default)s)",
    )
    s.set_defaults(func=cmd_summary)

    s = sub.add_parser("presets", help="list geometry presets and model presets (parameters, MACs)")
    s.add_argument(
        "--size",
        type=int,
        default=FunctionDefault("deepdark.model.nets:describe_presets", "size"),
        help="window size for the MAC count (default: %(default)s)",
    )
    s.set_defaults(func=cmd_presets)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepdark", description=__doc__.split("\n\n")[0], parents=[_verbosity_options(in_command=False)]
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.register("action", "parsers", _Commands)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _simulate_command(sub)
    _data_commands(sub)

    # -- model parsers (train, predict, ablation) --

    from deepdark.training.config import add_train_arguments  # no torch: --help stays fast

    s = sub.add_parser("train", help="train Deep-Dark-Net on the darks of a library (split by night)")
    s.add_argument("shards", nargs="+", type=Path, help="shards of the dark library")
    s.add_argument("--out", required=True, type=Path, help="model directory (model.safetensors, model.json)")
    add_train_arguments(s)
    s.set_defaults(func=cmd_train)
    _model_commands(sub)
    _workflow_commands(sub)
    return p


# -- before a command runs: its inputs exist, its outputs write over none of them -------------------
#
# READS names, per command, the options that are inputs (argparse dest, and the option as typed;
# None for a positional argument), WRITES its outputs (dest, kind of deepdark.io.outputs). A missing
# input or an output over an input stops the command before it reads or writes anything.

READS = {
    "extract": (("inputs", None),),
    "baseline": (("shards", None),),
    "physics-fit": (("shards", None),),
    "physics-merge": (("parts", None),),
    "cameras": (("shards", None),),
    "train": (("shards", None), ("physics", "--physics")),
    "predict": (("shard", None), ("model", "--model")),
    "evaluate": (("test", "--test"), ("baseline", "--baseline"), ("model", "--model"), ("physics", "--physics")),
    "ablation": (("shards", None),),
    "correct": (("source", None), ("masters", "--masters")),
    "qa": (("shard", "--shard"), ("predictions", "--predictions"), ("masters", "--masters")),
    "summary": (("qa_dir", "--qa-dir"), ("corrected_dir", "--corrected-dir")),
}
WRITES = {
    "extract": (("out", "shard"),),
    "baseline": (("out", "masters"),),
    "physics-fit": (("out", "physics"),),
    "physics-merge": (("out", "physics"),),
    "cameras": (("out", "text"),),
    "train": (("out", "model"),),
    "predict": (("out", "predictions"),),
    "evaluate": (("out", "evaluation"),),
    "ablation": (("out", "ablation"),),
    "correct": (("out", "corrected"),),
    "qa": (("out", "qa"),),
    "summary": (("csv", "text"), ("html", "text"), ("table", "text")),
}
# Commands that also read the raw frames a shard or predictions file names (dest of that file).
READS_RAW_FRAMES_OF = {"correct": "source", "qa": "shard"}
# The card every simulated frame carries (deepdark.sim.simulate).
SIMULATED_CARD = "SIMSEED"


def check_paths(a: argparse.Namespace) -> None:
    """Raise a :class:`DeepdarkError` when an input of the command is missing or an output would
    be written over an input (or over something that is not an earlier output of its kind)."""
    from deepdark.io.outputs import check_output

    inputs = _existing_inputs(a) + _geometry_inputs(a)
    if a.command in READS_RAW_FRAMES_OF:
        inputs += _raw_folders(getattr(a, READS_RAW_FRAMES_OF[a.command]))
    for dest, kind in WRITES.get(a.command, ()):
        if getattr(a, dest, None) is not None:
            check_output(getattr(a, dest), inputs, kind)
    if a.command == "extract":
        from deepdark.io.shards import ignored_path, quarantine_path

        for table in (quarantine_path(a.out), ignored_path(a.out)):
            check_output(table, inputs, "text")
    if a.command == "simulate":
        _check_simulated_archive(a, inputs)


def _existing_inputs(a: argparse.Namespace) -> list[Path]:
    """The command's input paths; :class:`MissingInputError` naming the first that does not exist."""
    paths = []
    for dest, option in READS.get(a.command, ()):
        value = getattr(a, dest, None)
        for path in map(Path, value if isinstance(value, list) else [] if value is None else [value]):
            if not path.exists():
                given = f"{option} {path}" if option else str(path)
                raise MissingInputError(f"{given}: does not exist")
            paths.append(path)
    return paths


def _geometry_inputs(a: argparse.Namespace) -> list[Path]:
    """The geometry YAML file the command reads (none for a preset)."""
    from deepdark.io.geometry import presets

    geometry = getattr(a, "geometry", None)
    if geometry is None or geometry in presets() or not Path(geometry).exists():
        return []
    return [Path(geometry)]


def _raw_folders(path: Path) -> list[Path]:
    """The folders of the raw frames that a shard's or predictions file's frame table names."""
    from deepdark.io.outputs import file_kind

    kind = file_kind(path) if Path(path).is_file() else None
    if kind not in ("shard", "predictions"):
        return []  # the command itself says what is wrong with it
    from deepdark.io.predictions import Predictions
    from deepdark.io.shards import Shard

    with (Predictions if kind == "predictions" else Shard)(path) as opened:
        return sorted({Path(name).parent for name in opened.table["file"]})


def _check_simulated_archive(a: argparse.Namespace, inputs: list[Path]) -> None:
    """The simulator writes frames under fixed names: refuse a night folder of ``a.out`` that holds
    a frame it did not write (a real archive), and an archive folder that is an input."""
    from deepdark.io.frames import is_fits_name
    from deepdark.io.outputs import file_kind

    out = Path(a.out)
    if any(os.path.realpath(out) == os.path.realpath(src) for src in inputs):
        raise OutputError(f"refusing to write {out}: it is an input")
    if out.exists() and not out.is_dir():
        raise OutputError(f"refusing to write {out}: it exists and is a {file_kind(out)}, not an archive folder")
    try:
        first = datetime.strptime(str(a.first_night), "%Y%m%d")
    except ValueError:
        raise UserError(f"--first-night {a.first_night!r} is not a night (YYYYMMDD)") from None
    for k in range(a.nights):
        night = out / (first + timedelta(days=k)).strftime("%Y%m%d")
        frames = sorted(p for p in night.iterdir() if is_fits_name(p)) if night.is_dir() else []
        foreign = next((p for p in frames if not _is_simulated_frame(p)), None)
        if foreign is not None:
            raise OutputError(f"refusing to write {out}: {foreign} is a frame the simulator did not write")


def _is_simulated_frame(path: Path) -> bool:
    from astropy.io import fits

    try:
        return SIMULATED_CARD in fits.getheader(path, 0)
    except (OSError, ValueError):  # unreadable, or not FITS: not the simulator's
        return False


# OSErrors that are the system refusing what was asked (a full disk or quota, a read-only file
# system, a file without permission, an output path through a file or onto a folder): not bugs,
# so reported in one line like a DeepdarkError.
SYSTEM_REFUSALS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}
)
INTERRUPTED = 130  # the shell's status of a command ended by SIGINT (128 + 2)


# Writes the system refused for want of room or of a working device.
WRITE_REFUSALS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})
# Set once a command reported a refused write: HDF5 may then crash freeing the files it could not
# close (SIGSEGV at exit), so the ``deepdark`` command ends at once (:func:`entry`).
_write_refused = False


def _is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, DeepdarkError) or (isinstance(exc, OSError) and exc.errno in SYSTEM_REFUSALS)


class _HDF5Cleanup:
    """h5py's complaints of HDF5 objects that fail to write their last bytes as they are freed
    ("Exception ignored in ... ObjectID.__dealloc__"), held while a command runs: after a write
    the system refused (a full disk) every object freed fails again, dozens of tracebacks that
    only repeat the one-line error, so they are dropped then; otherwise they are printed when the
    command ends, as Python would have. Any other unraisable error is printed at once."""

    def __enter__(self):
        self.held, self.previous, self.refused = [], sys.unraisablehook, False
        sys.unraisablehook = self._hook
        return self

    def _hook(self, unraisable) -> None:
        tb = unraisable.exc_traceback
        frames = []
        while tb is not None:
            frames.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        if any("h5py" in f for f in frames) or "h5py" in repr(unraisable.object):
            self.held.append(unraisable)
        else:
            self.previous(unraisable)

    def __exit__(self, *_):
        sys.unraisablehook = self.previous
        if not self.refused:
            for unraisable in self.held:
                self.previous(unraisable)


def _one_line(exc: BaseException) -> str:
    """The message on one line (HDF5's messages of a failed write span several)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (a :class:`DeepdarkError`, or the system refusing a file) is
    one line on stderr and exit status 2; Ctrl-C one line and 130; anything else is a bug and
    keeps its traceback (exit status 1). ``-v`` shows the traceback of a user error too."""
    global _write_refused
    name = "deepdark"
    with _HDF5Cleanup() as cleanup:
        try:
            args = resolve_defaults(build_parser().parse_args(argv))
            name = f"deepdark {args.command}"
            level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
            logging.basicConfig(
                level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
            )
            try:
                check_paths(args)
                args.func(args)
            except (DeepdarkError, OSError) as exc:
                if args.verbose or not _is_user_error(exc):
                    raise
                print(f"{name}: error: {_one_line(exc)}", file=sys.stderr)
                if isinstance(exc, OSError) and exc.errno in WRITE_REFUSALS:
                    cleanup.refused = _write_refused = True
                return 2
        except KeyboardInterrupt:
            print(f"{name}: interrupted", file=sys.stderr)
            return INTERRUPTED
    return 0


def entry() -> None:
    """The ``deepdark`` command: :func:`main`, its status the process's. After a refused write
    the process ends at once, its output flushed: HDF5's clean-up at exit can crash (SIGSEGV)
    freeing a file whose close failed, which would turn the reported error's status 2 into 139."""
    code = main()
    if _write_refused:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
