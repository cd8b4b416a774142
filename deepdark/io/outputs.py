"""Never write over what the user has: the check every command runs before it writes.

A command may write its output only where that output is new, or where an earlier output of
the same kind lies (a rerun). It refuses, naming both paths, when

* the output *is* one of its inputs (the same file or folder, through any link);
* the output lies inside an input folder (a raw night, a model directory); or
* the output exists and is not a file of the command's own kind.

Kinds are told by content, never by name: a raw frame renamed ``x.h5`` is still a FITS file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import h5py
from astropy.io import fits

from deepdark.io.errors import OutputError

_FITS_MAGIC = b"SIMPLE  ="
_GZIP_MAGIC = b"\x1f\x8b"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

# HDF5 files of deepdark, by the objects only that kind holds at its top level.
_HDF5_SIGNATURES = {
    "shard": {"a1", "table"},
    "predictions": {"dark", "table"},
    "masters": {"master", "table"},
    "physics": {"cameras"},
}
# Folders of deepdark, by the files their kind holds. A folder output may also be empty. A rerun
# under Snakemake finds its folder with the declared outputs removed, and the rerun of a killed
# command finds what it wrote first: so a signature also names what a kind leaves behind (a
# training log, the QA figures, earlier frames set aside), and what it writes first (a model
# folder its physics model, before the first checkpoint; a QA folder its copy of the quarantine).
_FOLDER_SIGNATURES = {
    "model": {"model.json", "checkpoint.json", "training_log.csv", "physics.h5"},
    "corrected": {"manifest.csv", "status.json", "stale"},
    "qa": {"qa.csv", "qa.html", "quarantine.csv", "rmse_vs_temperature.png", "guide_background.png"},
    "evaluation": {"table1.json"},
    "ablation": {"table2.json", *(f"model-{loss}" for loss in ("deepdark", "pix2pix", "lsgan", "mixed"))},
}
# The header card every corrected frame carries: an interrupted `deepdark correct` leaves such
# frames without its manifest.csv, and its rerun must be allowed to finish the folder.
_CORRECTED_CARD = "DDMETHOD"
_MANIFEST_HEADER = "file,output,status,"  # the first columns of a correct manifest
FILE_KINDS = (*_HDF5_SIGNATURES, "text")
FOLDER_KINDS = tuple(_FOLDER_SIGNATURES)


def file_kind(path: str | Path) -> str:
    """What an existing file is, from its first bytes and (HDF5) its top-level objects."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if head.startswith(_FITS_MAGIC):
        return "FITS file"
    if head.startswith(_GZIP_MAGIC):
        return "gzip file"
    if head.startswith(_HDF5_MAGIC):
        return _hdf5_kind(path)
    if head[:8] and int.from_bytes(head[:8], "little") + 8 <= len(head) and head[8:9] == b"{":
        return "safetensors file"
    if b"\0" in head:
        return "binary file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary file"
    return "text"


def _hdf5_kind(path: Path) -> str:
    try:
        with h5py.File(path, "r") as f:
            keys = set(f.keys())
    except OSError:
        return "unreadable HDF5 file"
    for kind, signature in _HDF5_SIGNATURES.items():
        if signature <= keys:
            return kind
    return "HDF5 file of another program"


def check_output(out: str | Path, inputs: Iterable[str | Path], kind: str) -> None:
    """Raise :class:`OutputError` unless ``out`` may be written as an output of ``kind``.

    Parameters
    ----------
    out
        The file or folder the command is about to write.
    inputs
        Everything the command reads: files and folders (raw nights, model directories).
    kind
        One of :data:`FILE_KINDS` or :data:`FOLDER_KINDS`.

    Examples
    --------
    >>> check_output("results/shards/20240102.h5", ["ARCHIVE/20240102"], "shard")  # doctest: +SKIP
    """
    out = Path(out)
    real_out = Path(os.path.realpath(out))
    for src in map(Path, inputs):
        real_src = Path(os.path.realpath(src))
        if real_out == real_src:
            raise OutputError(f"refusing to write {out}: it is the input {src}")
        if src.is_dir() and real_src in real_out.parents:
            raise OutputError(f"refusing to write {out}: it lies inside the input folder {src}")
    if kind in FOLDER_KINDS:
        _check_folder(out, kind)
    elif out.exists() or out.is_symlink():
        _check_file(out, kind)


def _check_file(out: Path, kind: str) -> None:
    if out.is_dir():
        raise OutputError(f"refusing to write {out}: it is a folder, not a {kind} file")
    found = file_kind(out)
    if found != kind:
        raise OutputError(f"refusing to write {out}: it exists and is a {found}, not a {kind} file of deepdark")


def _check_folder(out: Path, kind: str) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise OutputError(f"refusing to write {out}: it exists and is a {file_kind(out)}, not a folder")
    # Each entry's kind, read once: a night folder holds thousands of frames.
    kinds = {p.name: _entry_kind(p) for p in out.iterdir() if not p.name.endswith(".partial")}
    names = set(kinds)
    # A folder holding any FITS file deepdark did not write (a raw frame) is never an output
    # folder, whatever else it holds: a stray manifest.csv must not make a raw night look ours.
    foreign = sorted(n for n, k in kinds.items() if k in ("FITS file", "gzip file"))
    if foreign:
        raise OutputError(f"refusing to write {out}: it holds {foreign[0]}, a FITS file that deepdark did not write")
    if kind == "corrected" and names and all(k == _CORRECTED_FRAME for k in kinds.values()):
        return
    if kind == "corrected" and "manifest.csv" in names and not _is_manifest(out / "manifest.csv"):
        raise OutputError(f"refusing to write {out}: its manifest.csv was not written by deepdark correct")
    if names and not names & _FOLDER_SIGNATURES[kind]:
        raise OutputError(
            f"refusing to write {out}: it is a folder with other content, not a {kind} folder of deepdark "
            f"(it holds none of {', '.join(sorted(_FOLDER_SIGNATURES[kind]))})"
        )


def _is_manifest(path: Path) -> bool:
    """Whether ``path`` starts with the header line of a ``deepdark correct`` manifest."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.readline().startswith(_MANIFEST_HEADER)
    except OSError:
        return False


_CORRECTED_FRAME = "corrected frame"


def _entry_kind(path: Path) -> str:
    """:func:`file_kind` of a folder entry, with a FITS file written by ``deepdark correct`` (the
    card is in its primary header, or in HDU 1's where the image is tile-compressed) told apart."""
    if not path.is_file():
        return "folder or link"
    found = file_kind(path)
    if found != "FITS file":
        return found
    try:
        with fits.open(path) as hdul:
            return _CORRECTED_FRAME if any(_CORRECTED_CARD in hdu.header for hdu in hdul[:2]) else found
    except (OSError, ValueError):  # astropy's errors for a damaged header
        return found
