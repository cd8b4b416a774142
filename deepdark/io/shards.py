"""HDF5 shards: the strips of a night (or any list of files), written atomically, read in batches.

Layout of a shard (``SCHEMA_VERSION``):

* one row per frame-channel in ``table/<column>`` (see ``TABLE_COLUMNS``);
* ``a1``, ``a2``, ``a3``: uint16 strips along the whole active area (N, ...), one chunk per
  frame-channel (see ``deepdark.io.strips``: the window's strips are slices of them); a geometry
  without optical black has no ``a2`` and ``a3`` (they read back without pixels);
* ``active``: uint16 active areas (M, rows, cols) of the frame-channels whose image type is
  in ``TARGET_TYPES`` (darks and biases: the targets of training and evaluation); the table's
  ``active_index`` points into it, -1 elsewhere. Guide frames keep their pixels in the raw file,
  which the correction step reads anyway for its header;
* attributes: schema version, geometry YAML, software version (no creation time: the same
  inputs give a byte-identical file).

The table's ``file`` holds each raw file's name as the operating system gives it (the bytes of
``os.fsencode``), read back with ``os.fsdecode``: a name that is not UTF-8 still opens the file.
``file_hash`` is the hash of the file's bytes (has the file changed?), ``frame_hash`` that of its
pixels and header facts (is it the same exposure as a frame of another night, under another name
or compression?). Files written before ``frame_hash`` existed read with it empty.

Chunks are compressed with Blosc (LZ4 + byte shuffle, via ``hdf5plugin``): it compresses ADU
noise about 2x at memory speed, where gzip would cost more than reading the FITS. Every chunk,
of the pixel datasets and of the table, carries HDF5's Fletcher-32 checksum, checked on every
read: a flipped bit is a :class:`CorruptFileError` naming the file and the dataset, never
different pixels. The table's strings, which HDF5 keeps in a heap no chunk checksum covers,
carry an xxh3-128 per column (attribute ``xxh3_128``). Files written without checksums read as
before.

Every file of a night ends in one place: the shard; the quarantine table
``<shard>.quarantine.csv`` (frames that fail validation, and repeats of a frame already in the
shard); or the table of ignored files ``<shard>.ignored.csv`` (files that are not frames, frames
of cameras not asked for). Both tables are ``path,reason`` CSV in UTF-8, written atomically
before the shard; a name that is not UTF-8 shows its odd bytes as ``\\xNN``.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pandas as pd
import xxhash

from deepdark import __version__
from deepdark.io.atomic import atomic_path
from deepdark.io.errors import CorruptFileError, DeepdarkError, InputError
from deepdark.io.geometry import Geometry, parse_geometry
from deepdark.io.strips import STRIP_NAMES, channel_strips, strip_shapes, window_of, window_strips

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TARGET_TYPES = ("DARK", "BIAS")
TABLE_COLUMNS = {  # name -> numpy dtype in the file
    "file": h5py.string_dtype(),
    "night": h5py.string_dtype(),
    "camera": h5py.string_dtype(),
    "imagetyp": h5py.string_dtype(),
    "exptime": np.float64,
    "ccdtemp": np.float64,
    "settemp": np.float64,
    "date_obs": h5py.string_dtype(),
    "channel": h5py.string_dtype(),
    "file_hash": h5py.string_dtype(),  # xxh3-128 of the raw file
    "frame_hash": h5py.string_dtype(),  # xxh3-128 of its pixels and header facts
    "floor": np.float64,  # RMS noise floor in the window (ADU), NaN unless simulated
    "active_index": np.int64,
}
# The HDF5 file format of every deepdark HDF5 file: the newest layouts carry a checksum on every
# piece of metadata (object headers, chunk indexes), so a flipped bit that would send a read to
# another chunk is an error too, not other pixels read back in silence (chunk data have theirs).
HDF5_FORMAT = "latest"
# Fast, lossless and shuffle-friendly for 16-bit pixels; shards and prediction files share it.
COMPRESSION = hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)
# Shards: the same, plus a checksum per chunk (verified before decompression).
CHECKED_COMPRESSION = {**COMPRESSION, "fletcher32": True}
# Columns added after the first files were written, and their value in those files.
ADDED_COLUMNS = {"frame_hash": ""}


def quarantine_path(shard: str | Path) -> Path:
    shard = Path(shard)
    return shard.with_name(shard.name.removesuffix(".h5") + ".quarantine.csv")


def ignored_path(shard: str | Path) -> Path:
    shard = Path(shard)
    return shard.with_name(shard.name.removesuffix(".h5") + ".ignored.csv")


def prefetched(items: list, load, depth: int = 2) -> Iterator[tuple]:
    """Yield (item, future of load(item)), loading up to ``depth`` items ahead in a thread.

    Reading, hashing and decoding a frame release the GIL, so the next frame is read while
    this one is written; the bounded depth keeps memory at a few frames whatever the night.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(load, item)))
            if len(pending) > depth:
                yield pending.popleft()
        while pending:
            yield pending.popleft()


def write_quarantine(path: Path, rows: list[tuple[str, str]]) -> None:
    """Write the (path, reason) rows of the quarantine table ``path`` atomically."""
    _write_reasons(path, rows)


def write_ignored(path: Path, rows: list[tuple[str, str]]) -> None:
    """Write the (path, reason) rows of the table of ignored files ``path`` atomically."""
    _write_reasons(path, rows)


def read_quarantine(shard: str | Path) -> pd.DataFrame:
    return pd.read_csv(quarantine_path(shard), dtype=str, keep_default_na=False, encoding="utf-8")


def read_ignored(shard: str | Path) -> pd.DataFrame:
    return pd.read_csv(ignored_path(shard), dtype=str, keep_default_na=False, encoding="utf-8")


def _write_reasons(path: Path, rows: list[tuple[str, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "reason"])
        w.writerows([printable(p), printable(r)] for p, r in rows)


def printable(text: str) -> str:
    """``text`` as valid UTF-8, so that any tool reads the table: the bytes of a file name that is
    not UTF-8 (held by Python as surrogates) become ``\\xNN`` escapes."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def first_few(items, most: int = 10) -> str:
    """The first ``most`` of ``items`` joined by commas, with ``, ...`` when there are more: a
    list short enough for one line of a message or note."""
    items = list(items)
    return ", ".join(map(str, items[:most])) + (", ..." if len(items) > most else "")


class ShardWriter:
    """Appends frame-channels to growing, chunked datasets; writes the table on close."""

    def __init__(self, path: Path, geometry: Geometry):
        self.g, self.path = geometry, path
        self.f = h5py.File(path, "w", libver=HDF5_FORMAT)
        # No creation time: the same inputs give a byte-identical shard (reruns are checkable).
        self.f.attrs.update(
            schema_version=SCHEMA_VERSION, software=f"deepdark {__version__}", **geometry_attrs(geometry)
        )
        shapes = strip_shapes(geometry)
        self.ds = {
            name: self.f.create_dataset(
                name,
                shape=(0, *shapes[name]),
                maxshape=(None, *shapes[name]),
                dtype=np.uint16,
                chunks=(1, *shapes[name]),
                **CHECKED_COMPRESSION,
            )
            for name in (*STRIP_NAMES, "active")
            if all(shapes[name])  # strips without pixels (no optical black) are not stored
        }
        self.rows: list[dict] = []

    def add(self, frame, night: str) -> None:
        info = frame.info
        strips = channel_strips(frame.data, self.g)
        names = list(strips)
        for s in STRIP_NAMES:  # one write per dataset and frame: h5py's per-call cost is not small
            if s in self.ds:
                self._append(s, np.stack([strips[c][s] for c in names]))
        active_index = [-1] * len(names)
        if info.imagetyp in TARGET_TYPES:
            first = self._append("active", np.stack([strips[c]["active"] for c in names]))
            active_index = list(range(first, first + len(names)))
        for name, index in zip(names, active_index):
            self.rows.append(
                dict(
                    file=os.fsencode(frame.path),  # the bytes that open it again, UTF-8 or not
                    night=night,
                    camera=info.camera,
                    imagetyp=info.imagetyp,
                    exptime=info.exptime,
                    ccdtemp=info.ccdtemp,
                    settemp=info.settemp,
                    date_obs=info.date_obs,
                    channel=name,
                    file_hash=frame.hash,
                    frame_hash=frame.frame_hash,
                    floor=info.floor.get(name, np.nan),
                    active_index=index,
                )
            )

    def _append(self, name: str, block: np.ndarray) -> int:
        """Append ``block`` (k, ...) to dataset ``name``; return the index of its first row."""
        ds = self.ds[name]
        n = ds.shape[0]
        ds.resize(n + len(block), axis=0)
        ds[n:] = block
        return n

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            _close_quietly(self.f)
            return
        try:
            write_table(self.f, {col: [r[col] for r in self.rows] for col in TABLE_COLUMNS})
        except BaseException:
            _close_quietly(self.f)
            raise
        finish_written(self.f, self.path)


def write_table(f: h5py.File, columns: dict[str, list | np.ndarray]) -> None:
    """Write the frame table ``table/<column>`` (every column of ``TABLE_COLUMNS``) with checksums:
    HDF5's per chunk for numbers (HDF5 cannot chunk a table without rows), and for text, whose
    strings HDF5 keeps in a heap no filter sees, an xxh3-128 of the strings as an attribute."""
    grp = f.create_group("table")
    for col, dtype in TABLE_COLUMNS.items():
        values = np.array(columns[col], dtype=dtype)
        if values.dtype == object:
            grp.create_dataset(col, data=values).attrs[TEXT_CHECKSUM] = text_digest(values)
        else:
            grp.create_dataset(col, data=values, fletcher32=len(values) > 0)


def stored_table(f: h5py.File, path: str | Path) -> dict[str, np.ndarray]:
    """The frame table of an open shard as stored (file names as bytes), checksums verified;
    the columns of ``ADDED_COLUMNS`` that older files lack are filled in."""
    grp = f["table"]
    n = len(grp["file"])
    table = {}
    for col, dtype in TABLE_COLUMNS.items():
        if col not in grp:
            if col not in ADDED_COLUMNS:  # a column every file has: its link is damaged
                raise CorruptFileError(f"{path}: the table has no column {col!r}: the file is damaged")
            table[col] = np.array([ADDED_COLUMNS[col]] * n, dtype=dtype)
            continue
        table[col] = values = read_checked(path, grp[col])
        if values.dtype != np.dtype(dtype):  # a damaged datatype message: the values read as another type
            raise CorruptFileError(f"{path}: table column {col!r} reads as {values.dtype}: the file is damaged")
        stored = grp[col].attrs.get(TEXT_CHECKSUM)  # files written before it have none
        if stored is not None and text_digest(values) != stored:
            raise CorruptFileError(
                f"{path}: the strings of dataset {grp[col].name} fail their checksum: the file is damaged"
            )
    return table


TEXT_CHECKSUM = "xxh3_128"


GEOMETRY_CHECKSUM = "geometry_xxh3_128"


def geometry_attrs(geometry: Geometry) -> dict[str, str]:
    """The geometry's YAML text as a file attribute, with the checksum that guards it."""
    return {"geometry": geometry.source, GEOMETRY_CHECKSUM: text_digest([geometry.source])}


def stored_geometry(f: h5py.File, path: str | Path) -> Geometry:
    """The geometry a deepdark HDF5 file keeps (attribute ``geometry``), checked against its
    checksum; a one-line error naming the file when it is missing, not text or damaged."""
    text = f.attrs.get("geometry")
    if text is None:
        raise InputError(f"{path}: no attribute 'geometry': not a deepdark file, or a damaged one")
    if not isinstance(text, (str, bytes)):
        raise CorruptFileError(f"{path}: attribute 'geometry' is not text: the file is damaged; make it again")
    check_text(path, "geometry", text, f.attrs.get(GEOMETRY_CHECKSUM))  # the bytes as stored
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptFileError(f"{path}: attribute 'geometry' is not UTF-8 text: the file is damaged") from None
    return parse_geometry(text, origin=f"{path}:geometry")


def check_text(path: str | Path, name: str, text: str, stored: str | None) -> None:
    """A :class:`CorruptFileError` naming the file when ``text`` no longer matches its stored
    checksum (files written before checksums have none)."""
    if stored is not None and text_digest([text]) != stored:
        raise CorruptFileError(f"{path}: attribute {name!r} fails its checksum: the file is damaged; make it again")


def text_digest(values: np.ndarray) -> str:
    """xxh3-128 of strings (bytes as stored, str as UTF-8), each prefixed by its length."""
    h = xxhash.xxh3_128()
    for v in values:
        b = v if isinstance(v, bytes) else v.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _raised_in_hdf5(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside h5py (HDF5 reading a file), not by deepdark's own code."""
    tb = exc.__traceback__
    while tb is not None:
        if "h5py" in Path(tb.tb_frame.f_code.co_filename).parts:
            return True
        tb = tb.tb_next
    return False


@contextlib.contextmanager
def damage_named(path: str | Path):
    """Turn an error that HDF5 raises while reading ``path`` (a damaged header, object or
    chunk: h5py raises OSError, KeyError, RuntimeError, TypeError or ValueError, naming no file)
    into a :class:`CorruptFileError` naming the file. Errors of deepdark's own code pass unchanged."""
    try:
        yield
    except (OSError, KeyError, RuntimeError, TypeError, ValueError) as exc:
        if isinstance(exc, DeepdarkError) or not _raised_in_hdf5(exc):
            raise
        raise CorruptFileError(f"{path}: cannot be read ({exc}): the file is damaged; make it again") from None


@contextlib.contextmanager
def hdf5_written(path: str | Path, **options):
    """``h5py.File(path, "w", **options)``, finished on leaving the block (:func:`finish_written`);
    closed without a word when the block fails, whose error is the one to report."""
    f = h5py.File(path, "w", **options)
    try:
        yield f
    except BaseException:
        _close_quietly(f)
        raise
    finish_written(f, path)


def finish_written(f: h5py.File, path: str | Path) -> None:
    """Flush and close ``f``, written to ``path``. What HDF5 still holds in its caches is written
    then, and a write that fails there (a full disk) is a RuntimeError of HDF5's naming no file:
    raised as the OSError it is (its errno, the path), as a failed write earlier would be."""
    try:
        f.flush()
        f.close()
    except RuntimeError as exc:
        _close_quietly(f)
        raise _write_error(path, exc) from None
    except OSError:
        _close_quietly(f)
        raise


@contextlib.contextmanager
def closed_on_error(opened):
    """Close ``opened`` (a file, a reader) if the block raises, and raise on: what a reader's
    ``__init__`` checks after opening its file must not leave the file open."""
    try:
        yield opened
    except BaseException:
        opened.close()
        raise


def _close_quietly(f: h5py.File) -> None:
    with contextlib.suppress(RuntimeError, OSError):
        f.close()


def _write_error(path: str | Path, exc: RuntimeError) -> BaseException:
    """The OSError of a write HDF5 reports as ``exc`` (its message holds ``errno = N``); ``exc``
    itself when it says no errno."""
    found = re.search(r"errno = (\d+)", str(exc))
    if found is None or not _raised_in_hdf5(exc):
        return exc
    code = int(found.group(1))
    return OSError(code, f"{os.strerror(code)} (HDF5 writing {path})", str(path))


def read_checked(path: str | Path, ds: h5py.Dataset, index=()) -> np.ndarray:
    """``ds[index]``, or a :class:`CorruptFileError` naming ``path`` and the dataset when a stored
    chunk fails its checksum or cannot be decoded (h5py's own error names neither)."""
    try:
        return ds[index]
    except OSError as exc:
        raise CorruptFileError(
            f"{path}: cannot read dataset {ds.name} ({exc}): a chunk fails its checksum or cannot be "
            "decoded, the file is damaged; write it again"
        ) from None


def open_versioned(path: Path, kind: str, versions: int | tuple[int, ...]) -> tuple[h5py.File, Geometry, pd.DataFrame]:
    """Open a deepdark HDF5 file of ``kind`` (shard, predictions) and one of the schema
    ``versions``: the file, its geometry and its frame table; a clear error when it is something else."""
    versions = (versions,) if isinstance(versions, int) else versions
    try:
        f = h5py.File(path, "r")
        found = int(f.attrs["schema_version"])
    except (OSError, KeyError) as exc:
        raise InputError(f"{path}: not a deepdark {kind} file ({exc})") from None
    if found not in versions:
        f.close()
        raise InputError(f"{path}: {kind} schema {found}, this deepdark reads {' or '.join(map(str, versions))}")
    try:
        with damage_named(path):
            geometry = stored_geometry(f, path)
            table = pd.DataFrame({c: _decode(c, v) for c, v in stored_table(f, path).items()})
    except DeepdarkError:
        f.close()
        raise
    return f, geometry, table


class Shard:
    """Read access to a shard: the table in memory, pixel data on demand in batches."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.f, self.geometry, self.table = open_versioned(self.path, "shard", SCHEMA_VERSION)

    def __len__(self) -> int:
        return len(self.table)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def close(self) -> None:
        self.f.close()

    def read(self, name: str, index=()) -> np.ndarray:
        """``f[name][index]`` with its checksums verified: a damaged chunk raises a
        :class:`CorruptFileError` that names this shard and the dataset."""
        with damage_named(self.path):
            return read_checked(self.path, self.f[name], index)

    def strips(self, rows: np.ndarray, window: bool = False) -> dict[str, np.ndarray]:
        """``a1``, ``a2``, ``a3`` of table rows ``rows`` (sorted indices): along the whole active
        area, or cut to the model window (the paper's A1, A2, A3) when ``window``."""
        rows = np.asarray(rows)
        shapes = strip_shapes(self.geometry)
        strips = {
            s: self.read(s, rows) if s in self.f else np.zeros((len(rows), *shapes[s]), np.uint16) for s in STRIP_NAMES
        }
        return window_strips(strips, self.geometry) if window else strips

    def active(self, rows: np.ndarray) -> np.ndarray:
        """Active areas of table rows ``rows``; raises for rows without one (guide frames)."""
        idx = self.table["active_index"].to_numpy()[np.asarray(rows)]
        if (idx < 0).any():
            raise ValueError(f"{self.path}: rows without a stored active area (not darks)")
        return self.read("active", np.sort(idx))[np.argsort(np.argsort(idx))]

    def target(self, rows: np.ndarray) -> np.ndarray:
        """Target B (the model window) of dark rows ``rows``."""
        return window_of(self.active(rows), self.geometry)

    def batches(
        self, rows: np.ndarray | None = None, batch_size: int = 8, with_active: bool = False, window: bool = False
    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Yield (row indices, arrays) over ``rows`` (default: all), ``batch_size`` at a time."""
        rows = np.arange(len(self)) if rows is None else np.sort(np.asarray(rows))
        for start in range(0, len(rows), batch_size):
            sel = rows[start : start + batch_size]
            arrays = self.strips(sel, window=window)
            if with_active:
                arrays["active"] = self.active(sel)
            yield sel, arrays


def _decode(column: str, values: np.ndarray) -> np.ndarray:
    if values.dtype == object:
        # File names are the operating system's bytes: os.fsdecode gives back the str that opens them.
        decode = os.fsdecode if column == "file" else bytes.decode
        return np.array([decode(v) if isinstance(v, bytes) else v for v in values], dtype=object)
    return values


def shard_size_mb(path: str | Path) -> float:
    return os.path.getsize(path) / 1e6
