"""The package's import direction: a layer never imports one above it.

deepdark's sub-packages follow the data flow, io < physics < model < training < evaluation <
pipeline < cli, so that each can be used, tested and read without the ones above it; the
simulator (``sim``) only writes raw frames, so it needs ``io`` alone, and nothing but the CLI
runs it. ``io`` is what every step and the workflow's light jobs read and write with: it never
imports torch. Imports inside functions count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deepdark"
# The package root (``deepdark/__init__.py``: the version) is below every layer.
ORDER = ("", "io", "physics", "model", "training", "evaluation", "pipeline", "cli")
RANK = {layer: k for k, layer in enumerate(ORDER)}


def module_name(path: Path) -> str:
    parts = ["deepdark", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """``deepdark.io.shards`` -> ``io``; ``deepdark.__main__`` -> ``cli``; the root -> ``""``."""
    parts = module.split(".")
    if len(parts) < 2:
        return ""
    top = parts[1]
    if top == "__main__":
        return "cli"
    return top if top in RANK or top == "sim" else ""


def imports(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, imported name)`` of every import in ``source``, in functions too, relative
    imports resolved; ``from a import b`` gives ``a.b`` (``b`` may be a module)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            origin = ".".join([*base, *([node.module] if node.module else [])])
            found += [(node.lineno, f"{origin}.{alias.name}") for alias in node.names]
    return found


def violations(path: Path, source: str | None = None) -> list[str]:
    """What a module of deepdark imports against the layering rule, one line each."""
    module = module_name(path)
    own = layer_of(module)
    source = path.read_text() if source is None else source
    out = []
    for line, name in imports(source, module, path.name == "__init__.py"):
        where = f"{path.relative_to(PACKAGE.parent)}:{line}: {module} ({own or 'root'}) imports {name}"
        top = name.split(".")[0]
        if own == "io" and top == "torch":
            out.append(f"{where}: io never imports torch")
        if top != "deepdark":
            continue
        target = layer_of(name)
        if own == "sim" and target not in ("", "io", "sim"):
            out.append(f"{where}: sim imports only io")
        elif target == "sim" and own not in ("sim", "cli"):
            out.append(f"{where}: only the CLI runs the simulator")
        elif own in RANK and target in RANK and RANK[target] > RANK[own]:
            out.append(f"{where}: {target} is above {own or 'the root'}")
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_layer_above_its_own(path):
    assert violations(path) == []


def test_every_module_is_in_a_known_layer():
    unknown = [str(p) for p in MODULES if layer_of(module_name(p)) == "" and p.parent != PACKAGE]
    assert unknown == [], "a sub-package that is in no layer: add it to ORDER"


@pytest.mark.parametrize(
    "path, source, why",
    [
        ("io/x.py", "def f():\n    from deepdark.pipeline import qa\n", "pipeline is above io"),
        ("io/x.py", "import torch.nn\n", "io never imports torch"),
        ("physics/x.py", "from ..model import nets\n", "model is above physics"),
        ("physics/__init__.py", "from ..evaluation.evaluate import evaluate\n", "evaluation is above physics"),
        ("sim/x.py", "from deepdark.physics import PhysicsModel\n", "sim imports only io"),
        ("evaluation/x.py", "from deepdark.sim.simulate import simulate_archive\n", "only the CLI runs"),
        ("x.py", "from deepdark import cli\n", "cli is above the root"),
    ],
)
def test_the_check_finds_violations(path, source, why):
    """The check itself: imports in functions, relative ones and ``from package import module``."""
    found = violations(PACKAGE / path, source)
    assert len(found) == 1 and why in found[0]


def test_the_check_allows_imports_downwards():
    assert violations(PACKAGE / "pipeline/x.py", "from deepdark.io.shards import Shard\nimport torch\n") == []
    assert (
        violations(PACKAGE / "physics/x.py", "from .fit import fit_physics\nfrom deepdark import __version__\n") == []
    )
    assert violations(PACKAGE / "cli.py", "def f():\n    from deepdark.sim.simulate import simulate_archive\n") == []
