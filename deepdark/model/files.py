"""The model file: a directory with the generator's weights and a JSON card that says what they are.

Layout of ``MODEL_DIR``:

* ``model.safetensors``: the generator's state dict (weights *and* batch-norm running statistics,
  which inference uses), nothing else. The discriminator is a training artefact: it lives in the
  training checkpoint (``deepdark.training.checkpoint``), never in the model file.
* ``model.json``: the card (``CARD_SCHEMA``): architecture (preset name + every
  ``GeneratorConfig`` field), the input channels (``"inputs": ["a1", "a2", "a3"]``, open to extra
  conditioning channels), the loss configuration, the geometry (name, YAML source, window size and
  offset), the training data (nights, setpoints, cameras, frame count), epochs, validation RMSE in
  ADU, where the network is used (``selection``, ``deepdark.model.selection``), the code version
  and the SHA-256 of ``model.safetensors``.

Writing is atomic per file and ordered: an old card is removed first, the weights are renamed into
place, the card last. A directory with a card therefore always has the weights the card
describes (the hash is checked on load), and a directory whose writer died has no card and is
refused as incomplete.

Loading never unpickles: weights are read with ``safetensors.torch.load_file`` only (no
``torch.load``), the card with ``json``. A file that is not safetensors (a ``torch.save`` pickle
renamed, garbage) and a state dict that does not fit the card's architecture are refused with a
message naming the problem (missing, unexpected and shape-mismatched keys).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from deepdark import __version__
from deepdark.io.atomic import atomic_path
from deepdark.io.errors import DeepdarkError
from deepdark.io.geometry import Geometry, parse_geometry
from deepdark.model import conditioning as C
from deepdark.model.nets import Generator, GeneratorConfig

MODEL_FILE = "model.safetensors"
CARD_FILE = "model.json"
CARD_FORMAT = "deepdark-model"
# Schema 2: the weights' SHA-256 and the geometry's content digest are required.
CARD_SCHEMA = 2
# Input channels this version knows how to build (``deepdark.model.nets.model_input``), in order.
KNOWN_INPUTS = ("a1", "a2", "a3", "physics")  # "physics": deepdark.model.conditioning
DEFAULT_INPUTS = ("a1", "a2", "a3")


class ModelError(DeepdarkError, ValueError):
    """A model directory that cannot be used as asked; the message says why."""


@dataclass
class LoadedModel:
    """A generator ready for inference (eval mode) and the card it came with; ``generator`` is
    None when it was not loaded (``load_model(..., generator=False)``): :meth:`load_generator`."""

    generator: Generator | None
    card: dict
    path: Path
    hash: str  # SHA-256 of model.safetensors

    def load_generator(self, device: str | torch.device = "cpu") -> Generator:
        """The generator (eval mode on ``device``), read now if it was not loaded; its weights
        must still be the ones hashed when the card was read."""
        if self.generator is None:
            if model_hash(self.path) != self.hash:
                raise ModelError(f"{self.path / MODEL_FILE}: replaced since the model was opened")
            self.generator = _read_generator(self.path, self.card)
        return self.generator.to(device).eval()

    @property
    def name(self) -> str:
        return self.card.get("name") or self.path.name

    @property
    def geometry(self) -> Geometry:
        g = self.card["geometry"]
        return parse_geometry(g["source"], origin=f"{self.path / CARD_FILE}:geometry")

    @property
    def window_size(self) -> int:
        return int(self.card["geometry"]["window_size"])

    @property
    def inputs(self) -> list[str]:
        return list(self.card["inputs"])

    @property
    def multiple(self) -> int:
        return self.generator.multiple

    @property
    def physics(self) -> dict | None:
        """Physics-mode models: the card's physics section, ``path`` resolved; else None."""
        if "physics" not in self.inputs:
            return None
        from deepdark.model.conditioning import physics_info

        return physics_info(self.card, self.path)


# ---------------------------------------------------------------------------------------------
# hashing
# ---------------------------------------------------------------------------------------------


def physics_card(path: str | Path, source: str, residual_range_adu: float) -> dict:
    """The model card's ``physics`` entry of a physics-mode model whose physics model is ``path``
    (its copy in the model directory): the file and its hash, where it came from, the residual's
    bound and the input scaling it was trained with."""
    return {
        "file": C.PHYSICS_FILE,
        "sha256": file_sha256(path),
        "source": source,
        "residual_range_adu": float(residual_range_adu),
        "physics_scale_adu": C.PHYSICS_SCALE_ADU,
        "strip_scale_adu": C.STRIP_SCALE_ADU,
        "normalisation": C.NORMALISATION,
    }


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_hash(model_dir: str | Path) -> str:
    """Content hash of a model (SHA-256 of its ``model.safetensors``): the provenance of every
    prediction made with it. Recomputed from the bytes, not read from the card."""
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise ModelError(f"{model_dir}: no {MODEL_FILE}")
    return file_sha256(path)


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------


def state_tensors(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A state dict as plain, contiguous, unshared CPU tensors (what safetensors requires)."""
    return {prefix + k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def geometry_card(g: Geometry) -> dict:
    return {
        "name": g.name,
        "window_size": int(g.window_size),
        "window_offset": int(g.window_offset),
        "active_shape": list(g.active.shape),
        "source": g.source,
        "sha256": g.digest,
    }


def save_model(
    model_dir: str | Path,
    generator: Generator,
    *,
    preset: str | None,
    loss: dict,
    geometry: Geometry,
    training: dict | None = None,
    epochs: int | None = None,
    validation: dict | None = None,
    inputs: Sequence[str] = DEFAULT_INPUTS,
    extra: dict | None = None,
    selection: dict | None = None,
) -> Path:
    """Write ``model.safetensors`` then ``model.json`` into ``model_dir``; return the directory.

    ``loss``: ``{"name", "l1_weight"}``; ``training``: a summary of the training data and run
    (nights, setpoints, cameras, n_frames, ...); ``validation``: ``{"rmse_adu", "region", ...}``;
    ``selection``: where the network is used (``deepdark.model.selection``); ``extra``: anything
    else worth keeping on the card.
    """
    from safetensors.torch import save_file

    inputs = list(inputs)
    if len(inputs) != generator.cfg.in_channels:
        raise ModelError(f"inputs {inputs} do not match the generator's {generator.cfg.in_channels} input channels")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    weights, card_path = model_dir / MODEL_FILE, model_dir / CARD_FILE
    card_path.unlink(missing_ok=True)  # the card appears last: no card = incomplete directory
    tensors = state_tensors(generator)
    with atomic_path(weights) as tmp:
        save_file(
            tensors, str(tmp), metadata=safetensors_metadata(format=CARD_FORMAT, content="generator", preset=preset)
        )
    card = {
        "format": CARD_FORMAT,
        "schema": CARD_SCHEMA,
        "name": model_dir.resolve().name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": __version__,
        "architecture": {
            "preset": preset,
            "generator": dataclasses.asdict(generator.cfg),
            "multiple": generator.multiple,
            "n_params": int(sum(t.numel() for t in generator.parameters())),
        },
        "inputs": inputs,
        "input_scale": "ADU / 65535 (deepdark.io.units), strips resized bilinearly to the window",
        "output_scale": "[0, 1] -> ADU x 65535",
        "loss": dict(loss),
        "geometry": geometry_card(geometry),
        "training": dict(training or {}),
        "epochs": epochs,
        "validation": dict(validation or {}),
        "weights": {"file": MODEL_FILE, "sha256": file_sha256(weights), "n_tensors": len(tensors)},
    }
    if selection is not None:
        card["selection"] = selection
    if extra:
        card["extra"] = extra
    with atomic_path(card_path) as tmp:
        tmp.write_text(json.dumps(card, indent=2, default=json_default) + "\n")
    return model_dir


def safetensors_metadata(**fields) -> dict[str, str]:
    """The safetensors header's metadata as ONE key: safetensors writes a metadata map of several
    keys in an order that changes from run to run, and the same weights must give the same bytes
    (the model's hash is its identity in every corrected frame's header)."""
    return {"deepdark": json.dumps(fields, sort_keys=True, default=str)}


def json_default(o):
    """``json.dumps(default=...)`` for what model cards and checkpoints hold: tensors, numpy
    scalars, tuples and sets, paths."""
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def read_card(model_dir: str | Path) -> dict:
    """The card of a model directory, checked for format and schema."""
    model_dir = Path(model_dir)
    path = model_dir / CARD_FILE
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: not a model directory (expected {CARD_FILE} and {MODEL_FILE})")
    if not path.is_file():
        hint = " (incomplete: its writer did not finish)" if (model_dir / MODEL_FILE).exists() else ""
        raise ModelError(f"{model_dir}: no {CARD_FILE}{hint}")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ModelError(f"{path}: not a deepdark model card")
    if card.get("schema") != CARD_SCHEMA:
        raise ModelError(f"{path}: card schema {card.get('schema')}, this deepdark reads {CARD_SCHEMA}")
    _check_card_fields(card, path)
    return card


def _is_sha256(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


# (dotted key, test, what it must be): the card fields this version relies on.
_CARD_FIELDS = (
    ("architecture", lambda v: isinstance(v, dict), "a mapping"),
    ("architecture.generator", lambda v: isinstance(v, dict), "a mapping"),
    ("inputs", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of names"),
    ("loss", lambda v: isinstance(v, dict), "a mapping"),
    ("geometry", lambda v: isinstance(v, dict), "a mapping"),
    ("geometry.name", lambda v: isinstance(v, str), "a string"),
    ("geometry.source", lambda v: isinstance(v, str), "the geometry's YAML text"),
    ("geometry.window_size", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    ("geometry.window_offset", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    ("geometry.sha256", _is_sha256, "a SHA-256 (64 lowercase hex digits)"),
    ("training", lambda v: isinstance(v, dict), "a mapping"),
    ("validation", lambda v: isinstance(v, dict), "a mapping"),
    ("weights", lambda v: isinstance(v, dict), "a mapping"),
    ("weights.sha256", _is_sha256, "a SHA-256 (64 lowercase hex digits)"),
)
_MISSING = object()


def _check_card_fields(card: dict, path: Path) -> None:
    """One line naming the first field that is missing or of the wrong type."""
    for key, ok, what in _CARD_FIELDS:
        value = card
        for part in key.split("."):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            raise ModelError(f"{path}: card has no {key!r}")
        if not ok(value):
            raise ModelError(f"{path}: card field {key!r} must be {what}, got {value!r:.60}")


def generator_config(card: dict, where: str | Path = "card") -> GeneratorConfig:
    """The generator's configuration from a card's architecture (``where``: the card, for errors)."""
    fields = {f.name for f in dataclasses.fields(GeneratorConfig)}
    given = dict(card["architecture"].get("generator") or {})
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ModelError(f"{where}: architecture has fields this deepdark does not know: {unknown}")
    try:
        return GeneratorConfig(**given)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{where}: architecture is invalid: {exc}") from None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (CPU). Refuses anything else - in particular pickles (a
    ``torch.save`` file renamed) are recognised and refused without being opened by pickle."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: missing")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise ModelError(
            f"{path}: looks like a torch.save / pickle file, not safetensors; deepdark never unpickles model files"
        )
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError/ValueError
        raise ModelError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def check_state(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    """Raise naming missing, unexpected and shape-mismatched keys when ``got`` does not fit."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(got[k].shape)}, model {tuple(expected[k].shape)}"
        for k in set(expected) & set(got)
        if tuple(got[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:

        def show(xs):
            return ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {show(shapes)}")
        raise ModelError(f"{what} does not match the architecture: " + "; ".join(parts))


def check_geometry(card: dict, geometry: Geometry, where: str = "") -> None:
    """Refuse a geometry other than the model's: by name, window, and the layout's content digest
    (an edited geometry file that kept its name is a different geometry)."""
    g = card["geometry"]
    diffs = []
    if g.get("name") != geometry.name:
        diffs.append(f"geometry name {geometry.name!r} (model: {g.get('name')!r})")
    elif g.get("sha256") != geometry.digest:
        diffs.append(
            f"geometry {geometry.name!r} has other regions or channels than the model's (content digest differs)"
        )
    if int(g.get("window_size", -1)) != geometry.window_size:
        diffs.append(f"window size {geometry.window_size} (model: {g.get('window_size')})")
    if int(g.get("window_offset", -1)) != geometry.window_offset:
        diffs.append(f"window offset {geometry.window_offset} (model: {g.get('window_offset')})")
    if diffs:
        raise ModelError(f"{where or 'data'} does not fit the model: " + "; ".join(diffs))


def load_model(
    model_dir: str | Path,
    geometry: Geometry | None = None,
    device: str | torch.device = "cpu",
    check_hash: bool = True,
    generator: bool = True,
) -> LoadedModel:
    """Load a model directory for inference (generator in eval mode on ``device``).

    ``geometry``: when given, it must be the card's (name, window size and offset), else
    :class:`ModelError` says which differs. ``generator=False``: everything is read and checked
    but the weights, which :meth:`LoadedModel.load_generator` reads when they are needed.
    """
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    unknown = [c for c in card["inputs"] if c not in KNOWN_INPUTS]
    if unknown:
        raise ModelError(f"{model_dir}: input channels {unknown} are not known to deepdark {__version__}")
    if geometry is not None:
        check_geometry(card, geometry, where=f"geometry {geometry.name!r}")
    cfg = generator_config(card, model_dir / CARD_FILE)
    if cfg.in_channels != len(card["inputs"]):
        raise ModelError(f"{model_dir}: card lists inputs {card['inputs']} but in_channels={cfg.in_channels}")
    weights = model_dir / MODEL_FILE
    digest = model_hash(model_dir)
    want = card["weights"]["sha256"]
    if check_hash and want != digest:
        raise ModelError(
            f"{weights}: SHA-256 {digest[:12]}... differs from the card's {want[:12]}... "
            "(weights replaced or card from another model)"
        )
    if "physics" in card["inputs"]:
        from deepdark.model.conditioning import physics_info

        info = physics_info(card, model_dir)
        if not info["path"].is_file():
            raise ModelError(f"{model_dir}: physics-mode model without its physics file {info['path'].name}")
        if check_hash and info.get("sha256") and file_sha256(info["path"]) != info["sha256"]:
            raise ModelError(f"{info['path']}: SHA-256 differs from the card's (physics model replaced)")
    net = _read_generator(model_dir, card).to(device).eval() if generator else None
    return LoadedModel(generator=net, card=card, path=model_dir, hash=digest)


def _read_generator(model_dir: Path, card: dict) -> Generator:
    """The generator of a model directory whose card has been checked (:func:`load_model`)."""
    weights = model_dir / MODEL_FILE
    state = read_safetensors(weights)
    net = Generator(generator_config(card, model_dir / CARD_FILE))
    check_state(net.state_dict(), state, f"{weights}")
    net.load_state_dict(state, strict=True)
    return net.eval()
