"""The workflow's conda environment files, checked offline.

No conda implementation can create environments without the network, and `snakemake -n` or
`--lint` never open an env file, so a malformed one would only show on a cluster. Here:

- every `envs/*.yaml` is valid YAML with `channels` and `dependencies`;
- every env pins torch to the major.minor release the tests run on (the installed torch);
- every conda dependency is a valid match spec (parsed by py-rattler, no network), every
  `pip:` entry a valid PEP 508 requirement (or a local path / `-e` path that exists);
- every third-party module the package `deepdark/` imports (walked from its source) is
  provided by each environment a rule that runs the package names;
- every rule's `conda:` (as Snakemake resolves it: the workflow is loaded with its API, once
  per value of the config keys that pick environments) names an existing file in envs/; every
  rule that runs deepdark names one; the modules a rule's `script:` imports are in its env.

Skipped, not failed, while envs/ or the Snakefile do not exist yet.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ENVS = ROOT / "envs"
PACKAGE = ROOT / "deepdark"

ENV_FILES = sorted(ENVS.glob("*.yaml")) + sorted(ENVS.glob("*.yml")) if ENVS.is_dir() else []
needs_envs = pytest.mark.skipif(not ENV_FILES, reason="no envs/*.yaml yet (the workflow's conda environments)")

# Import name -> names of the packages that provide it: conda (conda-forge) and PyPI.
# A module missing here is looked up under its own name (lowercase, '_' -> '-').
CONDA_PROVIDERS = {
    "yaml": {"pyyaml"},
    "torch": {"pytorch", "pytorch-gpu", "pytorch-cpu"},
    "numpy": {"numpy"},
    "astropy": {"astropy", "astropy-base"},
    "h5py": {"h5py"},
    "hdf5plugin": {"hdf5plugin"},
    "pandas": {"pandas"},
    "safetensors": {"safetensors"},
    "tqdm": {"tqdm"},
    "matplotlib": {"matplotlib", "matplotlib-base"},
    "xxhash": {"python-xxhash"},  # conda-forge's `xxhash` is the C library only
    "jsonschema": {"jsonschema"},
    "scipy": {"scipy"},
    "PIL": {"pillow"},
    "sklearn": {"scikit-learn"},
    "skimage": {"scikit-image"},
    "snakemake": {"snakemake", "snakemake-minimal"},
}
PIP_PROVIDERS = {
    "yaml": {"pyyaml"},
    "torch": {"torch"},
    "PIL": {"pillow"},
    "sklearn": {"scikit-learn"},
    "skimage": {"scikit-image"},
    "xxhash": {"xxhash"},
    "matplotlib": {"matplotlib"},
    "astropy": {"astropy"},
}

CONDA_NAME = re.compile(r"^[a-z0-9_][a-z0-9_.+-]*$")
CONDA_BUILD = re.compile(r"^[A-Za-z0-9_.*+]+$")


# ---------------------------------------------------------------------------------------------
# helpers


def load_env(path: Path) -> dict:
    with open(path) as f:
        env = yaml.safe_load(f)
    assert isinstance(env, dict), f"{path.name}: top level must be a mapping, got {type(env).__name__}"
    return env


def split_dependencies(path: Path, env: dict) -> tuple[list[str], list[str]]:
    """(conda specs, pip entries) of an env file; asserts the structure."""
    deps = env.get("dependencies")
    assert isinstance(deps, list) and deps, f"{path.name}: `dependencies` must be a non-empty list"
    conda, pip = [], []
    for d in deps:
        if isinstance(d, str):
            conda.append(d)
        elif isinstance(d, dict) and set(d) == {"pip"}:
            assert isinstance(d["pip"], list) and d["pip"], f"{path.name}: `pip:` must be a non-empty list"
            assert all(isinstance(p, str) for p in d["pip"]), f"{path.name}: pip entries must be strings: {d['pip']}"
            pip.extend(d["pip"])
        else:
            pytest.fail(f"{path.name}: dependency {d!r} is neither a match spec string nor a `pip:` list")
    return conda, pip


def parse_conda_spec(spec: str):
    """A rattler MatchSpec, with the checks that rattler's lenient parser leaves out (its strict
    mode rejects valid conda syntax such as `pytorch=2.5.1=cuda*`)."""
    import rattler

    try:
        m = rattler.MatchSpec(spec)
    except Exception as e:  # rattler.exceptions.InvalidMatchSpecError
        raise AssertionError(f"{spec!r} is not a conda match spec: {e}") from None
    name = m.name.normalized if m.name is not None else None
    assert name and CONDA_NAME.match(name), f"{spec!r}: bad package name {name!r}"
    if m.build is not None:
        assert CONDA_BUILD.match(m.build), f"{spec!r}: bad build string {m.build!r} (a stray space or operator?)"
    return m


def is_local_pip(entry: str) -> bool:
    e = entry.strip()
    return e.startswith(("-e ", "--editable", ".", "/", "file:"))


def local_pip_path(env_path: Path, entry: str) -> Path:
    e = entry.strip()
    for prefix in ("--editable=", "--editable ", "-e "):
        if e.startswith(prefix):
            e = e[len(prefix) :].strip()
    for prefix in ("file://", "file:"):
        if e.startswith(prefix):
            e = e[len(prefix) :]
            break
    e = e.split("[", 1)[0].split("#", 1)[0]
    # conda writes the pip requirements next to the env file, so paths are relative to it.
    return (env_path.parent / e).resolve()


def provided(env_path: Path) -> tuple[set[str], set[str], list[Path]]:
    """(conda package names, pip distribution names, local pip paths) of an env file."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    conda, pip = split_dependencies(env_path, load_env(env_path))
    conda_names = {parse_conda_spec(s).name.normalized for s in conda}
    pip_names, local = set(), []
    for p in pip:
        if is_local_pip(p):
            local.append(local_pip_path(env_path, p))
        elif not p.startswith("-"):
            pip_names.add(canonicalize_name(Requirement(p).name))
    return conda_names, pip_names, local


def third_party_imports(files) -> dict[str, set[str]]:
    """Top-level modules imported by the given Python files that are neither stdlib nor
    deepdark, mapped to the files that import them. Imports guarded by `try: ... except
    ImportError` are optional and left out."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    found: dict[str, set[str]] = {}

    def optional_nodes(tree):
        skip = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try):
                catches = set()
                for h in node.handlers:
                    t = h.type
                    names = t.elts if isinstance(t, ast.Tuple) else [t] if t is not None else []
                    catches |= {n.id for n in names if isinstance(n, ast.Name)}
                if catches & {"ImportError", "ModuleNotFoundError"}:
                    for stmt in node.body:
                        skip |= {id(n) for n in ast.walk(stmt)}
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for stmt in node.body:
                    skip |= {id(n) for n in ast.walk(stmt)}
        return skip

    for f in files:
        tree = ast.parse(Path(f).read_text(), filename=str(f))
        skip = optional_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top not in stdlib and top != "deepdark":
                    found.setdefault(top, set()).add(Path(f).name)
    return found


def package_imports() -> dict[str, set[str]]:
    return third_party_imports(sorted(PACKAGE.rglob("*.py")))


def missing_modules(env_path: Path, modules) -> list[str]:
    conda_names, pip_names, _ = provided(env_path)
    missing = []
    for mod in sorted(modules):
        default = {mod.lower().replace("_", "-")}
        if conda_names & CONDA_PROVIDERS.get(mod, default):
            continue
        if pip_names & PIP_PROVIDERS.get(mod, CONDA_PROVIDERS.get(mod, default)):
            continue
        missing.append(mod)
    return missing


# --- the rules: which env each rule names, and what it runs ---------------------------------
#
# The workflow is loaded with Snakemake's API (in a subprocess: Snakemake changes directory and
# sets up logging) once per config variant that changes the environments (config `gpu`), and
# each rule's `conda:` is read as Snakemake resolved it: helpers such as conda_env("train") included.

SNAKEFILE = ROOT / "Snakefile"


def _config_variants() -> list[dict]:
    """The default config, and both values of each boolean config key that picks environments
    (`gpu`: the CUDA env for train/predict)."""
    variants = [{}]
    default = ROOT / "config.yaml"
    config = yaml.safe_load(default.read_text()) if default.is_file() else {}
    for key in ("gpu",):
        if isinstance((config or {}).get(key), bool):
            variants += [{key: True}, {key: False}]
    return variants


_LOAD_RULES = r"""
import json, sys, tempfile
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

snakefile, variants = Path(sys.argv[1]), json.loads(sys.argv[2])
out = []
for variant in variants:
    with tempfile.TemporaryDirectory() as tmp, SnakemakeApi(OutputSettings()) as api:
        wf = api.workflow(resource_settings=ResourceSettings(), snakefile=snakefile, workdir=Path(tmp),
                          config_settings=ConfigSettings(config=variant))._workflow
        for rule in wf.rules:
            conda = rule.conda_env
            params = [str(v) for v in rule.params] if rule.params is not None else []
            out.append(dict(variant=variant, rule=rule.name, snakefile=str(rule.snakefile),
                            basedir=str(rule.basedir), conda=None if conda is None else str(conda),
                            conda_callable=callable(conda), shell=rule.shellcmd,
                            script=rule.script and str(rule.script),
                            run=bool(rule.run_func and not rule.shellcmd and not rule.script and not rule.norun),
                            params=params))
print("RULES-JSON " + json.dumps(out))
"""


@functools.cache
def workflow_rules() -> list[dict]:
    """Every rule of the workflow under each config variant: name, file, conda (as written,
    resolved by Snakemake), shell command, script and params."""
    import json
    import subprocess

    r = subprocess.run(
        [sys.executable, "-c", _LOAD_RULES, str(SNAKEFILE), json.dumps(_config_variants())],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    line = next((l for l in r.stdout.splitlines() if l.startswith("RULES-JSON ")), None)
    assert r.returncode == 0 and line, f"the workflow does not load:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(line[len("RULES-JSON ") :])


def conda_path(rule: dict) -> Path | None:
    """The env file a rule names (relative paths are relative to the file holding the rule, as
    Snakemake resolves them); None for a named, pre-existing env or none at all."""
    c = rule["conda"]
    if c is None or not c.endswith((".yaml", ".yml")):
        return None
    p = Path(c)
    return p if p.is_absolute() else (Path(rule["basedir"]) / p).resolve()


def runs_package(rule: dict) -> bool:
    text = " ".join([rule["shell"] or "", rule["script"] or "", *rule["params"]])
    return bool(re.search(r"\bdeepdark\b", text))


# ---------------------------------------------------------------------------------------------
# tests


def test_envs_present():
    if not ENVS.is_dir():
        pytest.skip("envs/ does not exist yet")
    assert ENV_FILES, "envs/ holds no *.yaml"


@needs_envs
@pytest.mark.parametrize("env_path", ENV_FILES, ids=lambda p: p.name)
def test_env_file_structure(env_path):
    env = load_env(env_path)
    channels = env.get("channels")
    assert isinstance(channels, list) and channels and all(isinstance(c, str) and c for c in channels), (
        f"{env_path.name}: `channels` must be a non-empty list of channel names"
    )
    conda, pip = split_dependencies(env_path, env)
    assert "python" in {parse_conda_spec(s).name.normalized for s in conda}, f"{env_path.name}: no python"
    if pip:
        assert "pip" in {parse_conda_spec(s).name.normalized for s in conda}, (
            f"{env_path.name}: has a `pip:` list but does not install pip"
        )


@needs_envs
@pytest.mark.parametrize("env_path", ENV_FILES, ids=lambda p: p.name)
def test_env_specs_parse(env_path):
    from packaging.requirements import InvalidRequirement, Requirement

    conda, pip = split_dependencies(env_path, load_env(env_path))
    seen = {}
    for spec in conda:
        name = parse_conda_spec(spec).name.normalized
        assert name not in seen, f"{env_path.name}: {name} listed twice ({seen[name]!r}, {spec!r})"
        seen[name] = spec
    for entry in pip:
        if is_local_pip(entry):
            path = local_pip_path(env_path, entry)
            assert (path / "pyproject.toml").is_file() or (path / "setup.py").is_file(), (
                f"{env_path.name}: pip entry {entry!r} -> {path} is not a Python project"
            )
            continue
        assert not entry.startswith("-"), f"{env_path.name}: pip option {entry!r} cannot be checked offline"
        try:
            Requirement(entry)
        except InvalidRequirement as e:
            pytest.fail(f"{env_path.name}: pip entry {entry!r} is not a valid requirement: {e}")


def installed_torch() -> tuple[int, int] | None:
    """(major, minor) of the torch the tests run on; None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("torch").split("+")[0]
    except PackageNotFoundError:
        return None
    major, minor = release.split(".")[:2]
    return int(major), int(minor)


def torch_matchers(env_path: Path) -> list:
    """One predicate per torch requirement of an env file (conda or pip): does it admit a
    version, given as a string?"""
    import rattler
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    conda, pip = split_dependencies(env_path, load_env(env_path))
    matchers = []
    for spec in conda:
        m = parse_conda_spec(spec)
        if m.name.normalized in CONDA_PROVIDERS["torch"]:
            allowed = rattler.VersionSpec(m.version) if m.version else None
            matchers.append(lambda v, allowed=allowed: allowed is None or allowed.matches(rattler.Version(v)))
    for entry in pip:
        if not is_local_pip(entry) and not entry.startswith("-"):
            req = Requirement(entry)
            if canonicalize_name(req.name) in PIP_PROVIDERS["torch"]:
                matchers.append(lambda v, req=req: req.specifier.contains(v, prereleases=True))
    return matchers


@needs_envs
@pytest.mark.parametrize("env_path", ENV_FILES, ids=lambda p: p.name)
def test_env_pins_the_tested_torch(env_path):
    """An env's torch is the major.minor release the test suite ran on: no other release."""
    tested = installed_torch()
    if tested is None:
        pytest.skip("torch is not installed")
    major, minor = tested
    matchers = torch_matchers(env_path)
    if not matchers:
        pytest.skip(f"{env_path.name} installs no torch")
    same = [f"{major}.{minor}.{patch}" for patch in range(10)]
    others = [f"{major}.{minor + 1}.0", f"{major}.{minor - 1}.99", f"{major + 1}.{minor}.0", f"{major - 1}.{minor}.0"]
    for admits in matchers:
        assert any(admits(v) for v in same), f"{env_path.name}: torch is not pinned to {major}.{minor} (tested)"
        wrong = [v for v in others if admits(v)]
        assert not wrong, f"{env_path.name}: torch admits {', '.join(wrong)}; pin it to {major}.{minor} (tested)"


def test_parser_catches_malformed_specs():
    """The checks above really reject what conda would reject, and accept conda's own forms."""
    for good in [
        "python=3.11",
        "numpy>=1.24,<3",
        "pytorch=2.5.1=cuda*",
        "conda-forge::h5py 3.11.*",
        "pytorch 2.5.* *cpu*",
        "pyyaml",
    ]:
        parse_conda_spec(good)
    for bad in ["", "numpy>=1.24 <2", "numpy=>1", "foo bar baz qux", ">=1", "numpy==1.2 ==="]:
        with pytest.raises(AssertionError):
            parse_conda_spec(bad)


def test_package_imports_are_known():
    """The walk over deepdark/ sees what the package really needs (guards the AST walk)."""
    mods = package_imports()
    for expected in ("numpy", "torch", "h5py", "astropy", "yaml"):
        assert expected in mods, f"{expected} not found among deepdark's imports: {sorted(mods)}"
    assert not {"os", "pathlib", "deepdark", "__future__"} & set(mods)


def _package_envs() -> list[Path]:
    """The env files that rules running the package name; every env file when there is no
    workflow yet -- each env exists to run the package."""
    if not SNAKEFILE.is_file():
        return list(ENV_FILES)
    envs = {conda_path(r) for r in workflow_rules() if runs_package(r)}
    envs.discard(None)
    return sorted(envs) or list(ENV_FILES)


@needs_envs
def test_envs_provide_package_imports():
    mods = package_imports()
    problems = []
    for env_path in _package_envs():
        if not env_path.is_file():
            continue  # reported by test_rules_name_existing_envs
        try:
            _, _, local = provided(env_path)
        except Exception as e:
            problems.append(f"{env_path.relative_to(ROOT)} does not parse: {str(e).splitlines()[0]}")
            continue
        for path in local:
            assert path == ROOT.resolve() or (path / "deepdark").is_dir(), (
                f"{env_path.name}: local pip install {path} is not this project"
            )
        for mod in missing_modules(env_path, mods):
            problems.append(
                f"{env_path.relative_to(ROOT)} lacks `{mod}` (imported by deepdark/"
                f"{', deepdark/'.join(sorted(mods[mod]))}); conda name(s): "
                f"{', '.join(sorted(CONDA_PROVIDERS.get(mod, {mod})))}"
            )
    assert not problems, "\n".join(problems)


WORKFLOW_PRESENT = SNAKEFILE.is_file()
needs_workflow = pytest.mark.skipif(not WORKFLOW_PRESENT, reason="no Snakefile yet")


@needs_workflow
def test_rules_name_existing_envs():
    rules = workflow_rules()
    assert rules, "the workflow has no rule"
    problems = []
    for r in rules:
        where = f"{Path(r['snakefile']).relative_to(ROOT)}: rule {r['rule']} (config {r['variant'] or 'default'})"
        if r["conda_callable"]:
            continue  # an input function: resolved per job, cannot be checked here
        path = conda_path(r)
        if r["conda"] is not None and path is None:
            problems.append(f"{where}: conda: {r['conda']!r} is not an env file (a named env cannot be checked)")
        elif path is not None and not path.is_file():
            problems.append(f"{where}: conda: {r['conda']} -> {path} does not exist")
        elif path is not None and path.parent != ENVS.resolve():
            problems.append(f"{where}: env {path} is outside envs/")
    assert not problems, "\n".join(problems)


@needs_workflow
def test_rules_running_the_package_name_an_env():
    """Every rule that runs deepdark (a shell command or a script; `run:` blocks run inside
    Snakemake's own process, where conda does not apply) names a conda environment, so that
    --use-conda runs it with everything it imports."""
    problems = [
        f"{Path(r['snakefile']).relative_to(ROOT)}: rule {r['rule']} runs deepdark but has no conda: directive"
        for r in workflow_rules()
        if runs_package(r) and not r["run"] and r["conda"] is None
    ]
    assert not problems, "\n".join(sorted(set(problems)))


@needs_workflow
def test_rule_scripts_imports_provided():
    """A rule's `script:` runs inside the rule's env: what it imports must be there."""
    problems = []
    for r in workflow_rules():
        env, script = conda_path(r), r["script"]
        if env is None or not env.is_file() or not script or not script.endswith(".py"):
            continue
        path = Path(script) if Path(script).is_absolute() else (Path(r["basedir"]) / script).resolve()
        assert path.is_file(), f"rule {r['rule']}: script {path} does not exist"
        mods = third_party_imports([path])
        mods.pop("snakemake", None)  # injected by Snakemake into scripts
        problems += [
            f"rule {r['rule']}: {path.name} imports `{mod}`, not in {env.name}" for mod in missing_modules(env, mods)
        ]
    assert not problems, "\n".join(sorted(set(problems)))
