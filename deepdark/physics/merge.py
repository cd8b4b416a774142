"""One physics model file from per-camera fits (``deepdark.physics``).

Cameras are fitted independently (:func:`deepdark.physics.fit_physics` with ``cameras=``), so a
cluster fits one camera per job and this joins the files: the result holds the same groups as a
fit of every camera at once, in the same order (cameras sorted by name)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import h5py

from deepdark import __version__
from deepdark.io.atomic import atomic_path
from deepdark.io.errors import DeepdarkError, InputError
from deepdark.io.geometry import Geometry
from deepdark.io.shards import HDF5_FORMAT, geometry_attrs, hdf5_written, stored_geometry

from .fit import PHYSICS_SCHEMA

# Root attributes that every part must share: a model is one geometry fitted one way.
SHARED_ATTRS = ("schema_version", "geometry", "params")


def merge_physics(parts: Sequence[str | Path], out: str | Path) -> Path:
    """Join physics model files of disjoint cameras into ``out``; the parts are not changed.

    Raises :class:`InputError` naming the file when a part is not a physics model of this
    schema, differs from the first in geometry or fit options, or fits a camera another part
    fits too.
    """
    if not parts:
        raise InputError("physics-merge: no physics model files given")
    sources = [_camera_groups(Path(p)) for p in parts]
    first_path, first_attrs, _, geometry = sources[0]
    owner: dict[str, Path] = {}
    for path, attrs, cameras, _ in sources:
        for key in SHARED_ATTRS:
            if attrs[key] != first_attrs[key]:
                raise InputError(f"{path}: its {key} differs from that of {first_path}: fitted another way")
        for camera in cameras:
            if camera in owner:
                raise InputError(f"{path}: camera {camera} is also fitted in {owner[camera]}")
            owner[camera] = path
    nights = sorted({n for _, attrs, _, _ in sources for n in str(attrs.get("nights", "")).split(",") if n})
    out = Path(out)
    with atomic_path(out) as tmp, hdf5_written(tmp, libver=HDF5_FORMAT) as dst:
        dst.attrs.update({key: first_attrs[key] for key in SHARED_ATTRS})
        dst.attrs.update(geometry_attrs(geometry))
        dst.attrs.update(
            software=f"deepdark {__version__}",
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            nights=",".join(nights),
            merged_from=json.dumps([str(p) for p in parts]),
        )
        cams = dst.create_group("cameras")
        for i, camera in enumerate(sorted(owner)):
            path = owner[camera]
            with h5py.File(path, "r") as src:
                src.copy(src[f"cameras/{_group_of(src, camera)}"], cams, name=str(i))
    return out


def _camera_groups(path: Path) -> tuple[Path, dict, list[str], Geometry]:
    """(path, root attributes, cameras, geometry) of a physics model file."""
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            cameras = [str(g.attrs["camera"]) for g in f["cameras"].values()]
            if all(key in attrs for key in SHARED_ATTRS):
                geometry = stored_geometry(f, path)  # its checksum, and text that parses
    except DeepdarkError:  # a damaged geometry is named as such (CorruptFileError is an OSError)
        raise
    except (OSError, KeyError) as exc:
        raise InputError(f"{path}: not a deepdark physics model ({exc})") from None
    if attrs.get("schema_version") != PHYSICS_SCHEMA:
        raise InputError(f"{path}: physics schema {attrs.get('schema_version')}, this deepdark writes {PHYSICS_SCHEMA}")
    missing = [key for key in SHARED_ATTRS if key not in attrs]
    if missing:
        raise InputError(f"{path}: not a deepdark physics model (no attribute {', '.join(missing)})")
    return path, attrs, cameras, geometry


def _group_of(f: h5py.File, camera: str) -> str:
    return next(key for key, g in f["cameras"].items() if str(g.attrs["camera"]) == camera)


def _plain(value):
    """An HDF5 attribute as a plain Python value (so that two files' attributes compare)."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value
