"""The `deepdark` command line, at the level of parsing: the shared options, -q/-v on either side
of the command, --version, and defaults taken from the package's functions (written once)."""

from __future__ import annotations

import argparse
import importlib
import inspect

import pytest

import deepdark
from deepdark.cli import FunctionDefault, build_parser, main, resolve_defaults

# One command line per subcommand, with its required arguments only.
MINIMAL = {
    "simulate": ["simulate", "out"],
    "extract": ["extract", "night", "--out", "s.h5"],
    "baseline": ["baseline", "s.h5", "--out", "m.h5"],
    "evaluate": ["evaluate", "--test", "s.h5", "--out", "e"],
    "train": ["train", "s.h5", "--out", "model"],
    "predict": ["predict", "s.h5", "--model", "model", "--out", "p.h5"],
    "ablation": ["ablation", "s.h5", "--out", "a"],
    "physics-fit": ["physics-fit", "s.h5", "--out", "physics.h5"],
    "correct": ["correct", "p.h5", "--out", "c"],
    "qa": ["qa", "--shard", "s.h5", "--predictions", "p.h5", "--out", "q"],
    "summary": ["summary", "--qa-dir", "qa", "--csv", "s.csv", "--html", "s.html"],
    "presets": ["presets"],
}


def commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_every_command_has_a_minimal_command_line():
    assert set(MINIMAL) == set(commands())
    for name, argv in MINIMAL.items():
        assert parse(*argv).command == name


@pytest.mark.parametrize("name", sorted(MINIMAL))
@pytest.mark.parametrize(
    "where, flags, quiet, verbose",
    [
        ("nowhere", [], False, False),
        ("before", ["-q"], True, False),
        ("after", ["-q"], True, False),
        ("before", ["--verbose"], False, True),
        ("after", ["-v", "--quiet"], True, True),
    ],
)
def test_quiet_and_verbose_before_or_after_the_command(name, where, flags, quiet, verbose):
    argv = flags + MINIMAL[name] if where == "before" else MINIMAL[name] + flags
    args = parse(*argv)
    assert (args.quiet, args.verbose) == (quiet, verbose)


def test_quiet_before_the_command_is_kept_when_not_repeated_after_it():
    args = parse("-q", "extract", "night", "--out", "s.h5", "-v")
    assert args.quiet and args.verbose


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"deepdark {deepdark.__version__}"


@pytest.mark.parametrize("name", ["evaluate", "train", "predict", "ablation"])
def test_device_is_shared(name):
    assert parse(*MINIMAL[name], "--device", "cpu").device == "cpu"
    with pytest.raises(SystemExit):
        parse(*MINIMAL[name], "--device", "tpu")


@pytest.mark.parametrize("name", ["extract", "correct", "qa"])
def test_keywords_and_cameras_are_shared(name):
    args = parse(*MINIMAL[name], "--keywords", '{"ccdtemp": "TEMP"}', "--cameras", "GS1", "GS2")
    assert args.keywords == '{"ccdtemp": "TEMP"}' and args.cameras == ["GS1", "GS2"]
    args = parse(*MINIMAL[name])
    assert args.keywords is None and args.cameras is None  # all cameras, the default keywords


def _option_defaults():
    """(command, option, default) of every option with a default other than off/None."""
    for name, parser in sorted(commands().items()):
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                yield name, action.option_strings[-1], action.default


def test_defaults_are_read_from_the_functions_they_mirror():
    """Every option default outside `train` (whose options come from TrainConfig) is a function's
    own parameter default, and resolves to it."""
    checked = 0
    for name, option, default in _option_defaults():
        if name == "train":
            continue
        assert isinstance(default, FunctionDefault), f"deepdark {name} {option}: default {default!r} written here"
        module, function = default.function.split(":")
        parameters = inspect.signature(getattr(importlib.import_module(module), function)).parameters
        assert default.parameter in parameters, f"deepdark {name} {option}: {default!r} names no parameter"
        assert default.value() == parameters[default.parameter].default
        checked += 1
    assert checked >= 20


def test_resolve_defaults_fills_only_options_left_out():
    from deepdark.pipeline.predict import predict_shard

    default = inspect.signature(predict_shard).parameters["batch_size"].default
    args = resolve_defaults(parse(*MINIMAL["predict"]))
    assert args.batch_size == default and args.device == "auto"
    args = resolve_defaults(parse(*MINIMAL["predict"], "--batch-size", str(default + 3), "--device", "cpu"))
    assert (args.batch_size, args.device) == (default + 3, "cpu")
    assert not any(isinstance(v, FunctionDefault) for v in vars(resolve_defaults(parse(*MINIMAL["simulate"]))).values())


def test_help_shows_the_function_default(capsys):
    with pytest.raises(SystemExit):
        main(["physics-fit", "--help"])
    from deepdark.physics import fit_physics

    smooth = inspect.signature(fit_physics).parameters["smooth_px"].default
    assert f"default: {smooth})" in " ".join(capsys.readouterr().out.split())
