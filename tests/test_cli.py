"""The `deepdark` command line, at the level of parsing: the shared options, -q/-v on either side
of the command, --version, and defaults taken from the package's functions (written once)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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
    "physics-merge": ["physics-merge", "a.h5", "b.h5", "--out", "physics.h5"],
    "cameras": ["cameras", "s.h5"],
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


# -- errors: a user error is one line and exit status 2, a bug keeps its traceback ----------------


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    """Exit status and stderr lines of ``deepdark -q ARGV``."""
    code = main(["-q", *map(str, argv)])
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line_error(code: int, err: list[str], command: str, *fragments) -> None:
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"deepdark {command}: error: "), err
    for fragment in fragments:
        assert str(fragment) in err[0], (fragment, err[0])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def night_shard_predictions(write_night, tmp_path, mini):
    """A raw night (mini), its shard and a predictions file (zero darks) of it."""
    from deepdark.io.predictions import write_predictions
    from deepdark.pipeline.extract import extract

    night = write_night(n_dark=2, n_guide=1)
    shard, pred = tmp_path / "s.h5", tmp_path / "p.h5"
    extract([night], shard, mini, progress=False)

    def zeros(_, rows):
        return np.zeros((len(rows), *mini.active.shape), np.float32)

    write_predictions(shard, pred, zeros, {"method": "model"}, progress=False)
    return night, shard, pred


def test_a_misspelt_keyword_is_named(capsys, write_night, tmp_path):
    night = write_night(n_dark=1, n_guide=0)
    code, err = run_cli(capsys, "extract", night, "--out", tmp_path / "s.h5", "--keywords", '{"ccdtmp": "TEMP"}')
    assert_one_line_error(code, err, "extract", "'ccdtmp'", "ccdtemp")
    code, err = run_cli(capsys, "extract", night, "--out", tmp_path / "s.h5", "--keywords", "{ccdtemp: TEMP}")
    assert_one_line_error(code, err, "extract", "is not JSON")
    assert not (tmp_path / "s.h5").exists()


def test_evaluate_without_a_method_says_so(capsys, tmp_path):
    (tmp_path / "s.h5").write_bytes(b"x")
    code, err = run_cli(capsys, "evaluate", "--test", tmp_path / "s.h5", "--out", tmp_path / "e")
    assert_one_line_error(code, err, "evaluate", "--baseline", "--model")
    assert not (tmp_path / "e").exists()


# Command lines whose input MISSING (a path under the working directory) does not exist; every
# other input exists (EXISTING, written as junk: nothing may be read before the check).
EXISTING = ("s.h5", "p.h5", "m.h5", "model", "qa")
MISSING_INPUT = [
    ["extract", "MISSING", "--out", "new.h5"],
    ["baseline", "s.h5", "MISSING", "--out", "new.h5"],
    ["physics-fit", "MISSING", "--out", "new.h5"],
    ["physics-merge", "p.h5", "MISSING", "--out", "new.h5"],
    ["cameras", "MISSING", "--out", "new.csv"],
    ["train", "MISSING", "--out", "new"],
    ["train", "s.h5", "--physics", "MISSING", "--out", "new"],
    ["predict", "MISSING", "--model", "model", "--out", "new.h5"],
    ["predict", "s.h5", "--model", "MISSING", "--out", "new.h5"],
    ["evaluate", "--test", "MISSING", "--baseline", "m.h5", "--out", "new"],
    ["evaluate", "--test", "s.h5", "--baseline", "MISSING", "--out", "new"],
    ["evaluate", "--test", "s.h5", "--model", "MISSING", "--out", "new"],
    ["evaluate", "--test", "s.h5", "--physics", "MISSING", "--out", "new"],
    ["ablation", "MISSING", "--out", "new"],
    ["correct", "MISSING", "--out", "new"],
    ["correct", "s.h5", "--method", "median_temp", "--masters", "MISSING", "--out", "new"],
    ["qa", "--shard", "MISSING", "--predictions", "p.h5", "--out", "new"],
    ["qa", "--shard", "s.h5", "--predictions", "MISSING", "--out", "new"],
    ["qa", "--shard", "s.h5", "--predictions", "p.h5", "--masters", "MISSING", "--out", "new"],
    ["summary", "--qa-dir", "MISSING", "--csv", "new.csv", "--html", "new.html"],
    ["summary", "--qa-dir", "qa", "--corrected-dir", "MISSING", "--csv", "new.csv", "--html", "new.html"],
]


@pytest.mark.parametrize("argv", MISSING_INPUT, ids=lambda argv: "-".join(argv[:1] + argv[1:][: argv.index("MISSING")]))
def test_a_missing_input_is_one_line(capsys, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    for name in EXISTING:
        (tmp_path / name).mkdir() if "." not in name else (tmp_path / name).write_bytes(b"junk")
    missing = tmp_path / "no such dir" / "input"
    argv = [str(missing) if a == "MISSING" else a for a in argv]
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, argv[0], missing, "does not exist")
    assert not list(tmp_path.glob("new*")), "an output was written"


def test_every_command_that_reads_a_path_checks_it():
    from deepdark.cli import READS

    assert {argv[0] for argv in MISSING_INPUT} == set(READS)
    for name, reads in READS.items():
        assert {dest for dest, _ in reads} <= set(vars(parse(*MINIMAL[name]))), name


def test_a_bug_is_not_a_user_error(monkeypatch, capsys):
    """Only a DeepdarkError (or the system refusing a file) is a user error: a ValueError or a
    FileNotFoundError from inside the package is a bug and keeps its traceback."""
    import deepdark.cli as cli

    for bug in (ValueError("max() arg is an empty sequence"), FileNotFoundError(2, "No such file", "x"), KeyError("k")):

        def command(_, bug=bug):
            raise bug

        monkeypatch.setattr(cli, "cmd_presets", command)
        with pytest.raises(type(bug)):
            main(["presets"])


def test_the_system_refusing_a_write_is_one_line(monkeypatch, capsys):
    import errno

    import deepdark.cli as cli

    def command(_):
        raise OSError(errno.ENOSPC, "Can't write data (file write failed:\n errno = 28, 'No space left on device')")

    monkeypatch.setattr(cli, "cmd_presets", command)
    code, err = run_cli(capsys, "presets")
    assert_one_line_error(code, err, "presets", "No space left on device")


def test_an_output_path_through_a_file_is_one_line(capsys, night_shard_predictions, tmp_path):
    night, shard, pred = night_shard_predictions
    for command, args in (
        ("extract", [night, "--out", shard / "x.h5"]),
        ("correct", [pred, "--out", shard / "c"]),
        ("qa", ["--shard", shard, "--predictions", pred, "--out", shard / "q"]),
    ):
        code, err = run_cli(capsys, command, *args)
        assert_one_line_error(code, err, command, shard)


def test_keyboard_interrupt_is_one_line_and_status_130(monkeypatch, capsys):
    import deepdark.cli as cli

    def command(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_presets", command)
    assert main(["presets"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["deepdark presets: interrupted"]


def test_ctrl_c_ends_a_running_command_in_one_line(tmp_path):
    """SIGINT while `deepdark simulate` writes a full-size archive: one line, exit status 130."""
    archive = tmp_path / "archive"
    cmd = [sys.executable, "-m", "deepdark", "simulate", str(archive), "--nights", "20"]
    # SIGINT as an interactive shell leaves it: a run started in the background (nohup, a script's
    # `&`) ignores SIGINT, its children inherit that, and Python keeps an ignored SIGINT ignored
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        t0 = time.monotonic()
        while not any(archive.rglob("*.fits")) and proc.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.05)
        assert proc.poll() is None, "simulate ended before the interrupt"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "deepdark simulate: interrupted"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


# -- outputs are never written over inputs ----------------------------------------------------------


def test_correct_refuses_to_write_into_the_raw_night(capsys, night_shard_predictions):
    night, _, pred = night_shard_predictions
    before = snapshot(night)
    code, err = run_cli(capsys, "correct", pred, "--out", night)
    assert_one_line_error(code, err, "correct", f"refusing to write {night}", f"the input {night}")
    assert snapshot(night) == before


def test_extract_refuses_to_write_over_a_frame(capsys, night_shard_predictions):
    night = night_shard_predictions[0]
    frame = sorted(night.glob("*.fits"))[0]
    before = snapshot(night)
    code, err = run_cli(capsys, "extract", night, "--out", frame)
    assert_one_line_error(code, err, "extract", f"refusing to write {frame}", f"input folder {night}")
    assert snapshot(night) == before


def test_predict_refuses_to_write_over_the_model(capsys, night_shard_predictions, tmp_path):
    shard = night_shard_predictions[1]
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "model.json").write_text("{}")
    before = snapshot(model)
    code, err = run_cli(capsys, "predict", shard, "--model", model, "--out", model / "model.safetensors")
    assert_one_line_error(code, err, "predict", f"refusing to write {model / 'model.safetensors'}", model)
    assert snapshot(model) == before


@pytest.mark.parametrize(
    "argv",
    [
        ["baseline", "s.h5", "--out", "s.h5"],
        ["physics-fit", "s.h5", "--out", "s.h5"],
        ["train", "s.h5", "--out", "s.h5"],
        ["predict", "s.h5", "--model", "model", "--out", "s.h5"],
        ["evaluate", "--test", "s.h5", "--baseline", "p.h5", "--out", "p.h5"],
        ["ablation", "s.h5", "--out", "s.h5"],
        ["correct", "p.h5", "--out", "p.h5"],
        ["qa", "--shard", "s.h5", "--predictions", "p.h5", "--out", "p.h5"],
        ["qa", "--shard", "s.h5", "--predictions", "p.h5", "--out", "archive/20240101/qa"],
        ["summary", "--qa-dir", "archive", "--csv", "archive/summary.csv", "--html", "s.html"],
        ["extract", "q.quarantine.csv", "--out", "q.h5"],  # its quarantine table would be the input
        ["simulate", "archive", "--geometry", "mini", "--nights", "1", "--first-night", "20240101"],
    ],
    ids=lambda argv: argv[0],
)
def test_every_writing_command_refuses_to_write_over_its_inputs(
    capsys, monkeypatch, tmp_path, night_shard_predictions, argv
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    frame = sorted(night_shard_predictions[0].glob("*.fits"))[0]
    (tmp_path / "q.quarantine.csv").write_bytes(frame.read_bytes())
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, argv[0], "refusing to write")
    assert snapshot(tmp_path) == before
