# Helpers of the workflow: the config check, night discovery, paths, the deepdark command and
# the environment and size of each kind of job. Included first: it validates the config (and fills
# in the schema's defaults) before any rule reads it.

import contextlib
import functools
import io
import json
import os
import re
import shlex
import stat
import sys
from datetime import datetime, timedelta

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

NIGHT = r"[0-9]{8}"  # YYYYMMDD
NIGHT_RE = re.compile(f"^{NIGHT}$")
SETS = ("archive", "library")
SCHEMA = os.path.join(workflow.basedir, "workflow", "schema", "config.schema.yaml")
# The jobs that run the network: on a GPU, in the CUDA environment, when config `gpu` asks for one.
MODEL_JOBS = ("train", "predict")
# The model presets that learn a residual on the library's physics model
# (deepdark.model.nets.PHYSICS_PRESETS; tests/workflow checks that the two agree).
PHYSICS_PRESETS = ("physics",)


wildcard_constraints:
    night=NIGHT,
    set="|".join(SETS),
    camera=r"[^/]+",


# -- the config ---------------------------------------------------------------------------------


def check_config(config, schema_path):
    """Every schema violation as one line naming its key, before Snakemake's own validate()."""
    import jsonschema
    import yaml

    with open(schema_path) as fh:
        schema = yaml.safe_load(fh)
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        if err.validator == "additionalProperties":
            allowed = ", ".join(sorted(err.schema.get("properties", {})))
            unknown = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            problems.append(f"{key}: unknown key(s) {', '.join(map(repr, unknown))} (allowed: {allowed})")
            continue
        want = err.schema.get("description", "")
        if err.validator in ("oneOf", "anyOf") or not want:
            problems.append(f"{key}: {err.instance!r} is not valid: {want or err.message}")
        else:
            problems.append(f"{key}: {err.message} (expected: {want})")
    if not problems:  # the files the config names
        model, masters = config["model"]["dir"], config["library"]["masters"]
        if model and not all(os.path.isfile(os.path.join(model, f)) for f in ("model.safetensors", "model.json")):
            problems.append(f"model.dir: {model!r} holds no model.safetensors and model.json (from `deepdark train`)")
        if masters and not os.path.isfile(masters):
            problems.append(f"library.masters: {masters!r} is not a file (from `deepdark baseline`)")
        for which in SETS:
            path = config[which]["path"]
            if path and not os.path.isdir(path):
                problems.append(f"{which}.path: {path!r} is not a folder")
    if problems:
        raise WorkflowError("invalid configuration:\n  " + "\n  ".join(problems))


# Readable errors first; then validate() fills in the schema's `default:` values.
check_config(config, SCHEMA)
validate(config, SCHEMA, set_default=True)


# -- nights -------------------------------------------------------------------------------------


def _night(value, key):
    s = str(value)
    if not NIGHT_RE.match(s):
        raise WorkflowError(f"{key}: {value!r} is not a night (YYYYMMDD)")
    return s


def simulated_nights(which):
    sim = config["simulate"][which]
    first = datetime.strptime(_night(sim["first_night"], f"simulate.{which}.first_night"), "%Y%m%d")
    return [(first + timedelta(days=k)).strftime("%Y%m%d") for k in range(sim["nights"])]


def scan_nights(root, which):
    """The YYYYMMDD folders of the archive root of ``which``: one scandir, and a stat and an open
    per night, no per-file work. A night that cannot be used (a symlink loop, a folder without
    read permission) is skipped with a warning naming it; a night folder that is also linked under
    another name is used once, under the first of its names in sorted order."""
    with os.scandir(root) as it:
        entries = sorted((e.name, e.path) for e in it if not e.name.startswith("."))
    candidates = [(name, path) for name, path in entries if NIGHT_RE.match(name)]
    others = [name for name, _ in entries if not NIGHT_RE.match(name)]
    if others:
        shown = ", ".join(map(repr, others[:5])) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        logger.warning(f"{which}.path: {len(others)} entries that are not YYYYMMDD night folders left out: {shown}")
    chosen, first_name = [], {}
    for name, path in candidates:
        try:
            st = os.stat(path)
            if not stat.S_ISDIR(st.st_mode):
                continue
            with os.scandir(path):
                pass  # it can be listed
        except OSError as exc:
            logger.warning(f"{which}.path: night folder {path} skipped: {exc.strerror or exc}")
            continue
        folder = (st.st_dev, st.st_ino)
        if folder in first_name:
            logger.warning(
                f"{which}.path: {path} is the night folder {first_name[folder]} under a second name: used once, "
                f"as {first_name[folder]}"
            )
            continue
        first_name[folder] = name
        chosen.append(name)
    return chosen


def root_of(which):
    """The raw folder of ``archive`` or ``library``: the configured path, or the simulated one."""
    path = config[which]["path"]
    return path if path else f"{config['results']}/simulated/{which}"


@functools.cache
def nights(which):
    """The selected nights of ``archive`` or ``library`` (config ``<which>.nights`` and ``.exclude``)."""
    cfg = config[which]
    if cfg["path"]:
        if not os.path.isdir(cfg["path"]):
            raise WorkflowError(f"{which}.path: {cfg['path']!r} is not a folder")
        available = scan_nights(cfg["path"], which)
    else:
        available = simulated_nights(which)
    sel = cfg["nights"]
    if sel == "all":
        chosen = available
    elif isinstance(sel, list):
        wanted = [_night(n, f"{which}.nights") for n in sel]
        missing = sorted(set(wanted) - set(available))
        if missing:
            raise WorkflowError(f"{which}.nights: {', '.join(missing)} not found in {root_of(which)}")
        chosen = sorted(set(wanted))
    else:
        first = _night(sel["first"], f"{which}.nights.first")
        last = _night(sel["last"], f"{which}.nights.last")
        chosen = [n for n in available if first <= n <= last]
    exclude = {_night(n, f"{which}.exclude") for n in cfg["exclude"]}
    chosen = [n for n in chosen if n not in exclude]
    if not chosen:
        raise WorkflowError(
            f"{which}.nights: selects no night in {root_of(which)} "
            f"({len(available)} night folders there; selection {sel!r}, exclude {sorted(exclude)})"
        )
    return chosen


# -- paths and commands -------------------------------------------------------------------------


def results(path):
    return f"{config['results']}/{path}"


RESULTS_LOCK = ".deepdark.lock"
_held_locks = []  # open, locked files: released when this process ends, however it ends


def hold_results_lock():
    """One run at a time writes a results folder, from whatever folder Snakemake runs in (its own
    lock lives in the working directory's .snakemake/): an exclusive lock on RESULTS/.deepdark.lock
    that this run's Snakemake process holds until it ends (the system frees it after a kill -9)."""
    import fcntl

    os.makedirs(config["results"], exist_ok=True)
    fh = open(results(RESULTS_LOCK), "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise WorkflowError(
            f"results: another Snakemake run is writing {config['results']} (it holds "
            f"{results(RESULTS_LOCK)}): let it finish, or give this run other results"
        ) from None
    except OSError as exc:  # a file system without locks (some parallel file systems)
        fh.close()
        logger.warning(
            f"results: {results(RESULTS_LOCK)} cannot be locked ({exc.strerror}): run one Snakemake at a time"
        )
        return
    _held_locks.append(fh)


def uses_conda():
    from snakemake.settings.types import DeploymentMethod

    return DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method


def job_shell_prefix():
    """What every job's shell runs first. Rules call ``python3 -m deepdark``: the package from this
    workflow's own source tree (first on PYTHONPATH), in the job's Python: the conda env's with
    --use-conda (activated before this prefix runs), otherwise the interpreter running Snakemake
    (its bin first on PATH). Kept out of the rules' params and code, so that moving a checkout
    or a virtualenv is no reason to redo a night."""
    # shell.prefix() formats its argument: {{ }} there are literal braces for bash
    parts = [
        "set -euo pipefail;",
        f"export PYTHONPATH={shlex.quote(workflow.basedir)}${{{{PYTHONPATH:+:$PYTHONPATH}}}};",
    ]
    if not uses_conda():
        parts.append(f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:$PATH;")
    parts.append("")
    return " ".join(parts)


shell.prefix(job_shell_prefix())


def model_dir():
    return config["model"]["dir"] or results("model")


def masters_file():
    return config["library"]["masters"] or results("masters.h5")


def predictions_output():
    """A night's predictions file; a temporary one (removed once correct and qa have read it)
    unless config ``predict.keep``."""
    path = results("predictions/{night}.h5")
    return path if config["predict"]["keep"] else temp(path)


def trains_physics_model():
    """Whether the workflow trains a model that needs the library's physics model."""
    return not config["model"]["dir"] and config["model"]["preset"] in PHYSICS_PRESETS


def camera_file_name(camera):
    """A camera id (a header value: any text) as a file name; :func:`camera_of_file` reverses it."""
    from urllib.parse import quote

    return quote(camera, safe="")


def camera_of_file(name):
    from urllib.parse import unquote

    return unquote(name)


def physics_parts(wildcards):
    """The per-camera physics fits, one per camera of the extracted library (its checkpoint table)."""
    import csv

    with open(checkpoints.library_cameras.get().output[0], newline="") as fh:
        cameras = [row["camera"] for row in csv.DictReader(fh)]
    return expand(results("physics/{camera}.h5"), camera=[camera_file_name(c) for c in cameras])


def library_shards(wildcards):
    """The shards of the selected library nights."""
    return expand(results("library/{night}.h5"), night=nights("library"))


def train_inputs(wildcards):
    """The library's shards, and the physics model when the preset learns a residual on it."""
    inputs = {"shards": library_shards(wildcards)}
    if trains_physics_model():
        inputs["physics"] = results("physics.h5")
    return inputs


def physics_args(wildcards, input):
    return ["--physics", input.physics] if "physics" in input.keys() else []


def model_files():
    d = model_dir()
    return {"weights": f"{d}/model.safetensors", "card": f"{d}/model.json"}


# -- environment and size of each kind of job -----------------------------------------------------


def on_gpu(job):
    """Whether a job of this kind runs on a GPU: the model jobs, when config `gpu` asks for one."""
    return job in MODEL_JOBS and config["gpu"]


def conda_env(job):
    """The conda environment of a kind of job (a rule's name): CUDA for the model jobs on a GPU,
    the CPU build of everything else."""
    return "../envs/deepdark-gpu.yaml" if on_gpu(job) else "../envs/deepdark-cpu.yaml"


def gpus(job):
    """The GPUs a job of this kind requests (resource `gpu`; SLURM --gpus)."""
    return 1 if on_gpu(job) else 0


def job_threads(job):
    return config["threads"][job]


def job_mem_mb(job):
    return config["resources"][job]["mem_mb"]


def job_runtime(job):
    """Minutes."""
    return config["resources"][job]["runtime"]


# -- arguments of the rules ---------------------------------------------------------------------
#
# Lists of arguments: a shell command quotes each element with `{params.x:q}`, and an empty
# list leaves no trace in it.


def keywords_args():
    kw = config["keywords"]
    return ["--keywords", json.dumps(kw, sort_keys=True)] if kw else []


def cameras_args():
    cams = config["archive"]["cameras"]
    return [] if cams == "all" else ["--cameras", *map(str, cams)]


def correct_args():
    flags = {
        "--include-dark": config["correct"]["include_dark"],
        "--strict": config["correct"]["strict"],
        "--replace-with-empty": config["correct"]["replace_with_empty"],
    }
    return [flag for flag, on in flags.items() if on]


def simulate_args(wildcards):
    sim, top = config["simulate"][wildcards.set], config["simulate"]
    args = [
        "--geometry",
        config["geometry"],
        "--seed",
        str(top["seed"]),
        "--cameras",
        *top["cameras"],
    ]
    args += ["--temperatures", *(f"{t:g}" for t in sim["temperatures"])]
    args += [
        "--darks-per-temp",
        str(sim["darks_per_temp"]),
        "--guide-per-night",
        str(sim["guide_per_night"]),
    ]
    return args + ["--dark-exptimes", *(f"{t:g}" for t in sim["dark_exptimes"])]


def night_folder(which):
    """Input function: the raw folder of a night (the simulate job's output when simulated)."""

    def folder(wildcards):
        return f"{root_of(which)}/{wildcards.night}"

    return folder


def night_inventory(which):
    """Input function: ``RESULTS/inventory/<which>/<night>.tsv``, the night's entries with their
    sizes and modification times, written when that list changes and only then. A file completed,
    replaced or added after a run changes it, and so reruns the night's extract (rewriting a file
    changes no folder's modification time). Nothing for a simulated set: its nights are this
    workflow's own outputs."""

    def inventory(wildcards):
        if not config[which]["path"]:
            return []
        path = results(f"inventory/{which}/{wildcards.night}.tsv")
        text = inventory_text(f"{root_of(which)}/{wildcards.night}")
        if read_text(path) != text:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            partial = f"{path}.{os.getpid()}.partial"
            with open(partial, "w") as fh:
                fh.write(text)
            os.replace(partial, path)
        return path

    return inventory


def inventory_text(folder):
    """One line per entry of ``folder``: its name (JSON: any byte survives), size and mtime (ns)."""
    lines = ["name\tsize\tmtime_ns\n"]
    with os.scandir(folder) as it:
        for e in sorted(it, key=lambda e: e.name):
            try:
                st = e.stat()
            except OSError:  # a dangling link or a loop: the link itself
                st = e.stat(follow_symlinks=False)
            lines.append(f"{json.dumps(e.name)}\t{st.st_size}\t{st.st_mtime_ns}\n")
    return "".join(lines)


def read_text(path):
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def needs_library():
    """Whether the library is read: to build the masters or to train the model."""
    return not (config["library"]["masters"] and config["model"]["dir"])


def every_intermediate(wildcards):
    """Every result the summary is made from, night by night, and the masters and the model. The
    default target asks for each, so that one deleted is made again and what it feeds reruns on
    its newer modification time (Snakemake leaves a missing intermediate alone otherwise)."""
    archive = nights("archive")
    kept = ("shards", "predictions") if config["predict"]["keep"] else ("shards",)
    files = expand(results("{dir}/{night}.h5"), dir=kept, night=archive)
    files += expand(results("shards/{night}.quarantine.csv"), night=archive)
    files += expand(results("corrected/{night}/manifest.csv"), night=archive)
    files += expand(results("qa/{night}/{name}"), night=archive, name=("qa.csv", "qa.html", "quarantine.csv"))
    if not config["archive"]["path"]:
        files += expand(results("simulated/archive/{night}"), night=archive)
    if needs_library():
        library = nights("library")
        files += expand(results("library/{night}{ext}"), night=library, ext=(".h5", ".quarantine.csv"))
        if not config["library"]["path"]:
            files += expand(results("simulated/library/{night}"), night=library)
    if trains_physics_model():
        files += [results("physics.h5"), *physics_parts(wildcards)]
    return files + [masters_file(), *model_files().values()]


def train_args():
    m = config["model"]
    args = ["--preset", m["preset"], "--loss", m["loss"], "--epochs", str(m["epochs"])]
    args += [
        "--batch-size",
        str(m["batch_size"]),
        "--seed",
        str(m["seed"]),
        "--device",
        config["device"],
    ]
    for option, key in (
        ("--crop", "crop"),
        ("--max-steps", "max_steps"),
        ("--max-val-samples", "max_val_samples"),
    ):
        if m[key]:
            args += [option, str(m[key])]
    return args + shlex.split(m["extra_args"])


# -- every value resolved before any job runs ---------------------------------------------------
#
# A job that fails has its outputs removed, and a changed value reruns (and so first removes)
# every result it reaches: a value that cannot work must stop the run here, before any job, or a
# misspelt keyword would remove every finished shard, the masters and the model.

# The header keywords every raw frame must carry (deepdark.io.frames.parse_header).
REQUIRED_KEYWORDS = ("imagetyp", "exptime", "ccdtemp", "date_obs")
SAMPLED_NIGHTS = 3  # the first, the middle and the last selected night
SAMPLED_FRAMES = 12  # readable frames per sampled night, spread over its sorted file names
TRIED_FRAMES = 24  # files tried per sampled night to find them


def deepdark_importable():
    """Whether this workflow's deepdark (as the jobs run it) imports in Snakemake's Python; a
    warning when it does not (the checks of geometry, keywords and options are then skipped)."""
    try:
        import deepdark  # noqa: F401
    except ImportError:
        sys.path.append(workflow.basedir)
    try:
        import deepdark.cli  # noqa: F401
        import deepdark.io.frames  # noqa: F401
    except ImportError as exc:
        logger.warning(f"geometry, keywords and train options not checked before the jobs: {exc}")
        return False
    return True


def geometry_problems():
    """The geometry loads, and is that of the given model and masters."""
    from deepdark.io.errors import DeepdarkError
    from deepdark.io.geometry import load_geometry, parse_geometry

    try:
        geometry = load_geometry(config["geometry"])
    except DeepdarkError as exc:
        return [f"geometry: {exc}"]
    problems = []
    model, masters = config["model"]["dir"], config["library"]["masters"]
    if model:
        try:
            with open(os.path.join(model, "model.json")) as fh:
                trained_on = json.load(fh)["geometry"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return [f"model.dir: {model!r}: model.json unreadable ({exc})"]
        if trained_on.get("sha256") != geometry.digest:
            problems.append(
                f"model.dir: {model!r} was trained on geometry {trained_on.get('name')!r}, not on geometry "
                f"{config['geometry']!r}"
            )
    if masters:
        import h5py

        try:
            with h5py.File(masters, "r") as f:
                made_from = parse_geometry(f.attrs["geometry"], origin=masters)
        except (OSError, KeyError, DeepdarkError) as exc:
            return problems + [f"library.masters: {masters!r} is not a master-dark file ({exc})"]
        if made_from.digest != geometry.digest:
            problems.append(
                f"library.masters: {masters!r} was made on geometry {made_from.name!r}, not on geometry "
                f"{config['geometry']!r}"
            )
    return problems


def frame_header(path):
    """The header of a raw frame as a plain dict (HDU 1's cards over HDU 0's for a tile-compressed
    file, where the image lies); None when it cannot be read (extract quarantines it)."""
    import warnings

    from astropy.io import fits

    try:
        with warnings.catch_warnings(), fits.open(path, memmap=False) as hdul:
            warnings.simplefilter("ignore")
            header = dict(hdul[0].header)
            if hdul[0].header.get("NAXIS", 0) == 0 and len(hdul) > 1:
                header.update(hdul[1].header)
            return header
    except Exception:  # astropy raises many types for a damaged file; it is only left out here
        return None


def spread(items, n):
    """``n`` items spread evenly over ``items`` (all of them when there are fewer)."""
    if len(items) <= n:
        return list(items)
    return [items[round(k * (len(items) - 1) / (n - 1))] for k in range(n)]


def sampled_headers(which):
    """{path: header} of a few readable frames of the first, middle and last selected night of
    ``which``, spread over each night's sorted file names (so that every camera is likely met)."""
    from deepdark.io.frames import is_fits_name

    selected = nights(which)
    picks = sorted({selected[0], selected[len(selected) // 2], selected[-1]})[:SAMPLED_NIGHTS]
    headers = {}
    for night in picks:
        folder = os.path.join(root_of(which), night)
        names = spread(sorted(n for n in os.listdir(folder) if is_fits_name(n)), TRIED_FRAMES)
        found = 0
        for name in names:
            header = frame_header(os.path.join(folder, name))
            if header is not None and found < SAMPLED_FRAMES:
                headers[os.path.join(folder, name)] = header
                found += 1
    return headers


def keyword_problems():
    """Each header keyword a frame must have, and each one the config names, is in at least one
    sampled header of each raw set read (the simulator writes the default names)."""
    from deepdark.io.frames import Keywords

    names = Keywords(**config["keywords"])
    fields = sorted(set(REQUIRED_KEYWORDS) | set(config["keywords"]))
    problems = []
    for which in ("archive", "library") if needs_library() else ("archive",):
        if config[which]["path"]:
            headers = sampled_headers(which)
            where = f"{len(headers)} sampled frame headers of {which}.path {config[which]['path']!r}"
        else:
            headers = {"simulated": set(vars(Keywords()).values())}
            where = f"the simulated {which}'s headers (the simulator writes {', '.join(vars(Keywords()).values())})"
        if not headers:
            logger.warning(f"keywords: no readable frame among those sampled in {which}.path: not checked")
            continue
        for field in fields:
            name = getattr(names, field)
            if field == "ccdtemp" and field not in config["keywords"] and zero_second_only(headers, names):
                continue  # bias frames may have no temperature card (a bias hardly depends on it)
            if not any(name in keys for keys in headers.values()):
                default = "" if field in config["keywords"] else f" (the default; set keywords.{field})"
                problems.append(f"keywords.{field}: {name!r}{default} is in none of {where}")
    return problems


def zero_second_only(headers, names):
    """Whether every sampled header is of a zero-second readout (a bias-only set)."""
    exptimes = [h.get(names.exptime) for h in headers.values() if isinstance(h, dict)]
    return bool(exptimes) and all(isinstance(t, (int, float)) and t == 0 for t in exptimes)


def frame_problems():
    """The sampled frames of each configured raw set have the geometry's shape, and each camera
    that ``archive.cameras`` names is the camera of at least one of them."""
    from deepdark.io.frames import Keywords
    from deepdark.io.geometry import load_geometry

    rows, cols = load_geometry(config["geometry"]).frame_shape
    camera_key = Keywords(**config["keywords"]).camera
    problems = []
    for which in ("archive", "library") if needs_library() else ("archive",):
        if not config[which]["path"]:
            continue  # simulated with this geometry
        headers = sampled_headers(which)
        shapes = {(h.get("NAXIS2"), h.get("NAXIS1")) for h in headers.values()}
        if headers and (rows, cols) not in shapes:
            seen = ", ".join(f"{r} x {c}" for r, c in sorted(shapes, key=str))
            problems.append(
                f"geometry: {config['geometry']!r} describes {rows} x {cols} frames; the {len(headers)} sampled "
                f"frames of {which}.path are {seen}"
            )
        wanted = config[which].get("cameras", "all")
        if headers and wanted != "all":
            seen = {str(h.get(camera_key, "")).strip() for h in headers.values()}
            missing = [str(c) for c in wanted if str(c) not in seen]
            if missing:
                problems.append(
                    f"{which}.cameras: {', '.join(missing)} is the camera of none of {len(headers)} sampled frames "
                    f"(cameras seen: {', '.join(sorted(seen)) or 'none'})"
                )
    return problems


def results_problems():
    """The results folder lies outside every raw set: deepdark never writes into an archive."""
    out = os.path.realpath(config["results"])
    problems = []
    for which in ("archive", "library"):
        raw = config[which]["path"]
        if raw and (out == os.path.realpath(raw) or out.startswith(os.path.realpath(raw) + os.sep)):
            problems.append(f"results: {config['results']!r} lies inside {which}.path {raw!r}")
    return problems


def train_options_problems():
    """The options of the train job parse as `deepdark train` parses them."""
    if config["model"]["dir"]:
        return []
    try:
        args = train_args()
    except ValueError as exc:  # shlex: an unclosed quote
        return [f"model.extra_args: {config['model']['extra_args']!r}: {exc}"]
    from deepdark.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(["train", "library.h5", "--out", "model", *args])
    except SystemExit:
        message = err.getvalue().strip().splitlines()[-1:] or ["not valid"]
        return [f"model.extra_args: {config['model']['extra_args']!r}: {message[0]}"]
    return []


def check_values():
    """Stop with every problem, one line each naming its key, when a value cannot work."""
    problems = results_problems()
    if deepdark_importable():
        geometry = geometry_problems()
        problems += geometry + keyword_problems() + (frame_problems() if not geometry else [])
        problems += train_options_problems()
    if problems:
        raise WorkflowError("invalid configuration:\n  " + "\n  ".join(problems))


check_values()
