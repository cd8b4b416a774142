# Helpers of the workflow: the config check, night discovery, paths, the deepdark command and
# the environment and size of each kind of job. Included first: it validates the config (and fills
# in the schema's defaults) before any rule reads it.

import functools
import json
import os
import re
import shlex
import sys
from datetime import datetime, timedelta

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

NIGHT = r"[0-9]{8}"  # YYYYMMDD
NIGHT_RE = re.compile(f"^{NIGHT}$")
SETS = ("archive", "library")
SCHEMA = os.path.join(workflow.basedir, "workflow", "schema", "config.schema.yaml")
# The jobs that run the network: on a GPU, in the CUDA environment, when config `gpu` asks for one.
MODEL_JOBS = ("train", "predict")


wildcard_constraints:
    night=NIGHT,
    set="|".join(SETS),


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


def scan_nights(root):
    """The YYYYMMDD folders of an archive root: one scandir, no per-file work."""
    with os.scandir(root) as it:
        return sorted(e.name for e in it if NIGHT_RE.match(e.name) and e.is_dir())


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
        available = scan_nights(cfg["path"])
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
