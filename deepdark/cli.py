"""The ``deepdark`` command: a thin shell over the package (anything a workflow rule does, a
user can do from the shell with the same function).

The subcommands and their arguments are a contract other tools script against: add options,
never change what an existing one means.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("deepdark")


class UserError(Exception):
    """Bad input: reported in one line, exit status 2."""


# -- subcommands -----------------------------------------------------------------------------------

def cmd_simulate(a: argparse.Namespace) -> None:
    from .simulate import simulate_archive

    paths = simulate_archive(a.out, geometry=a.geometry, nights=a.nights, seed=a.seed, cameras=a.cameras,
                             temperatures=a.temperatures, darks_per_temp=a.darks_per_temp,
                             dark_exptimes=a.dark_exptimes, bias_per_night=a.bias_per_night,
                             guide_per_night=a.guide_per_night, first_night=a.first_night,
                             compress=a.compress, progress=not a.quiet)
    log.info("wrote %d frames under %s", len(paths), a.out)


def cmd_extract(a: argparse.Namespace) -> None:
    from .geometry import load_geometry
    from .shards import extract

    res = extract(a.inputs, a.out, load_geometry(a.geometry), keywords=_keywords(a), progress=not a.quiet)
    log.info("%s: %d frames, %d quarantined (%s)", res.shard, res.n_frames, res.n_quarantined,
             res.shard.name.removesuffix(".h5") + ".quarantine.csv")


def cmd_baseline(a: argparse.Namespace) -> None:
    from .baselines import build_masters

    out = build_masters(a.shards, a.out, memory_mb=a.memory_mb, progress=not a.quiet)
    log.info("master darks written to %s", out)


def cmd_evaluate(a: argparse.Namespace) -> None:
    from .evaluate import evaluate, format_table

    predictors = {}
    if a.model:
        from .predict import model_predictor

        predictors["model"] = model_predictor(a.model, device=a.device, batch_size=a.batch_size)
    table = evaluate(a.test, a.baseline, a.out, predictors=predictors, progress=not a.quiet)
    print(format_table(table))


# -- model subcommands (train, predict, ablation) --


# -- workflow subcommands (correct, qa, summary) --


def cmd_presets(a: argparse.Namespace) -> None:
    from .geometry import presets

    print("geometries:", ", ".join(presets()))
    from .nets import describe_presets, format_presets

    print(format_presets(describe_presets(size=a.size), size=a.size))


# -- argument parsing -----------------------------------------------------------------------------

def _keywords(a: argparse.Namespace):
    from .frames import Keywords

    return Keywords(**json.loads(a.keywords)) if a.keywords else Keywords()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepdark", description=__doc__.split("\n\n")[0])
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("simulate", help="write a simulated raw archive (ARCHIVE/YYYYMMDD/*.fits)")
    s.add_argument("out", type=Path, help="archive folder to create")
    s.add_argument("--geometry", default="lamost-kaf4320", help="geometry preset or YAML file")
    s.add_argument("--nights", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cameras", nargs="+", default=["GS1"], help="camera ids (each has its own physics)")
    s.add_argument("--temperatures", nargs="+", type=float, default=[-5, -10, -15, -25], help="dark setpoints, C")
    s.add_argument("--darks-per-temp", type=int, default=3, help="darks per setpoint, night and camera")
    s.add_argument("--dark-exptimes", nargs="+", type=float, default=[30.0], help="dark exposure times, s")
    s.add_argument("--bias-per-night", type=int, default=0)
    s.add_argument("--guide-per-night", type=int, default=2, help="guide (OBJECT) frames per night and camera")
    s.add_argument("--first-night", default="20240101", help="YYYYMMDD of the first night")
    s.add_argument("--compress", action="store_true", help="write .fits.gz")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("extract", help="strips of a night (or files) into one HDF5 shard")
    s.add_argument("inputs", nargs="+", help="night folders and/or FITS files")
    s.add_argument("--out", required=True, type=Path, help="shard to write (SHARD.h5; quarantine beside it)")
    s.add_argument("--geometry", default="lamost-kaf4320", help="geometry preset or YAML file")
    s.add_argument("--keywords", help='header keyword names as JSON, e.g. {"ccdtemp": "TEMP"}')
    s.set_defaults(func=cmd_extract)

    s = sub.add_parser("baseline", help="median master darks (all temperatures and per temperature)")
    s.add_argument("shards", nargs="+", type=Path, help="shards of the dark library")
    s.add_argument("--out", required=True, type=Path, help="master-dark file to write (.h5)")
    s.add_argument("--memory-mb", type=int, default=512, help="memory budget of the streamed median")
    s.set_defaults(func=cmd_baseline)

    s = sub.add_parser("evaluate", help="the paper's Table 1: RMSE of each method against real darks")
    s.add_argument("--test", nargs="+", required=True, type=Path, help="shards of test nights")
    s.add_argument("--baseline", type=Path, help="master-dark file from `deepdark baseline`")
    s.add_argument("--model", type=Path, help="model directory from `deepdark train`")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--out", required=True, type=Path, help="folder for table1.json/csv and figures")
    s.set_defaults(func=cmd_evaluate)

    # -- model parsers (train, predict, ablation) --

    # -- workflow parsers (correct, qa, summary) --

    s = sub.add_parser("presets", help="list geometry presets and model presets (parameters, MACs)")
    s.add_argument("--size", type=int, default=1024, help="window size for the MAC count")
    s.set_defaults(func=cmd_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from .frames import FrameError
    from .geometry import GeometryError

    try:
        args.func(args)
    except (UserError, FrameError, GeometryError, ValueError, FileNotFoundError, OSError) as exc:
        if args.verbose:
            raise
        print(f"deepdark {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
