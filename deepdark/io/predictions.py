"""Predicted darks of a night: one HDF5 file per shard, whatever method made them.

Layout (``SCHEMA_VERSION`` 2): ``dark`` float32 (N, rows, cols), the predicted dark in ADU over
the whole active area of each frame-channel, in readout coordinates, row i for row i of
``table/`` (a copy of the shard's table); attributes name the method, the model and its hash,
the software, the geometry and the source shard. Written under a temporary name. The darks are
compressed as shards are, one chunk per row, and each row's xxh3-64 is kept in ``dark_xxh3``
(N,) uint64 and verified on every read: a damaged row (or a damaged chunk index that sends the
read to another row) raises a :class:`~deepdark.io.errors.CorruptFileError` naming the file and
the dataset. The hash costs 0.3 ms a full-size frame, HDF5's Fletcher-32 on every chunk 3-4 ms
of each write and read. Files written with Fletcher-32 chunks and no ``dark_xxh3`` read as
before, their chunks checked by HDF5.

A dark the physics model predicted is kept as the terms it was summed from (``terms/``,
:mod:`deepdark.io.dark_terms`: its channel's maps once per file, then per row a few weights, its
hot pixels' values and its row bias, about 7 kB a KAF-4320 channel) instead of its pixels, whose
chunk is never written; reading sums it again, the same float32 dark to the bit, checked against
the same row hash. Writing 4 MB of pixels a channel was two thirds of the physics ``predict``
step, and they made the file 11.8 MB a full-size frame. Darks a network made, and unserved rows,
are kept as pixels. Schema 1 files (every dark as pixels) read as before.

The table also holds each row's verdict, ``table/status`` and ``table/reason`` (text, with the
table's text checksums): ``"ok"`` (reason ""), ``"flagged"`` (predicted, but something about the
frame is implausible; the reason says what, and which estimate the prediction used) or
``"unserved"`` (the method cannot predict this frame, the reason says why; its ``dark`` is NaN).
Files written before these columns existed read as every row ``"ok"``.

``table/method`` says what predicted each row: ``"physics"`` or ``"physics+network"`` for a
physics-mode model (its network runs only where it beat physics alone on validation,
``deepdark.model.selection``), ``"network"`` for a strips-only model, the file's ``method``
attribute for a predictor that does not say, "" for an unserved row. The attribute ``methods``
lists the distinct methods used. Files written before the column existed read as the file's
``method`` attribute on every row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import xxhash
from tqdm import tqdm

from deepdark import __version__
from deepdark.io.atomic import atomic_path
from deepdark.io.dark_terms import DarkTerms, TermsReader, TermsWriter
from deepdark.io.errors import CorruptFileError
from deepdark.io.shards import (
    COMPRESSION,
    TEXT_CHECKSUM,  # the verdict columns carry the same text checksum as the rest of the table
    Shard,
    damage_named,
    geometry_attrs,
    hdf5_written,
    open_versioned,
    read_checked,
    stored_table,
    text_digest,
    write_table,
)

log = logging.getLogger(__name__)

# 1: every dark kept as pixels (files without the verdict columns read as every row served);
# 2: a physics dark kept as its terms (``terms/``). Both are read.
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Map sets of the rows kept as terms that a reader keeps in memory: the 32 channels of eight
# KAF-4320 cameras with two-component laws (13 MB each), so that frames of a night's cameras in
# any order find their maps held.
MAPS_KEPT_MB = 512
DARK_DIGEST = "dark_xxh3"  # each row's hash (absent from files whose chunks carry HDF5's checksum)
OK, FLAGGED, UNSERVED = "ok", "flagged", "unserved"
STATUSES = (OK, FLAGGED, UNSERVED)
VERDICT_COLUMNS = {"status": OK, "reason": ""}  # column -> its value in files written without it


@dataclass
class Served:
    """Predictions of k table rows with each row's verdict.

    ``dark`` (k, rows, cols) float32 ADU, NaN where unserved; ``status`` (k,) one of
    ``STATUSES``; ``reason`` (k,) "" for ok, else one line saying why; ``method`` (k,) what
    predicted each row ("" where unserved), or None when the predictor does not say;
    ``terms``: the terms the darks of some rows were summed from (the physics predictor's), which
    a predictions file keeps instead of their pixels, or None.
    """

    dark: np.ndarray
    status: np.ndarray
    reason: np.ndarray
    method: np.ndarray | None = None
    terms: DarkTerms | None = None

    @classmethod
    def all_ok(cls, dark: np.ndarray) -> Served:
        k = len(dark)
        return cls(dark, np.full(k, OK, dtype=object), np.full(k, "", dtype=object))

    def unserved_reason(self) -> str | None:
        """The reason of the first unserved row, None when every row is served."""
        bad = np.flatnonzero(self.status == UNSERVED)
        return str(self.reason[bad[0]]) if bad.size else None


# Maps (shard, sorted table rows) to predicted darks over the active area, ADU, (k, rows, cols).
ActivePredictor = Callable[[Shard, np.ndarray], np.ndarray]
# The same with each row's verdict.
ServingPredictor = Callable[[Shard, np.ndarray], Served]


def write_predictions(
    shard_path: str | Path,
    out: str | Path,
    predict: ActivePredictor,
    provenance: dict[str, str],
    batch_size: int = 8,
    progress: bool = True,
    final_attrs: Callable[[], dict] | None = None,
) -> Path:
    """Run ``predict`` over every frame-channel of the shard, ``batch_size`` at a time.

    ``provenance`` must name at least ``method``; ``model_name`` and ``model_hash`` when a model
    made the prediction. A predictor with a ``serve`` attribute (a :data:`ServingPredictor`,
    as ``physics_predictor`` and ``model_predictor`` have) gives each row's verdict: a frame it
    cannot serve is written NaN with its reason and the rest of the night is predicted; any
    other predictor's rows are all ``"ok"``. Only one batch is in memory at a time.
    ``final_attrs``: file attributes known only once every row is predicted (called then).
    """
    if "method" not in provenance:
        raise ValueError("provenance must name the method")
    serve = getattr(predict, "serve", None) or (lambda shard, rows: Served.all_ok(predict(shard, rows)))
    out = Path(out)
    with Shard(shard_path) as shard, atomic_path(out) as tmp, hdf5_written(tmp) as f:
        g = shard.geometry
        f.attrs.update(
            schema_version=SCHEMA_VERSION,
            **geometry_attrs(g),
            shard=str(shard_path),
            software=f"deepdark {__version__}",
            **provenance,
        )  # no date: reruns are byte-identical
        n = len(shard)
        # A night whose every file was quarantined has no rows, and HDF5 cannot chunk nothing.
        layout = dict(chunks=(1, *g.active.shape), **COMPRESSION) if n else {}
        ds = f.create_dataset("dark", shape=(n, *g.active.shape), dtype=np.float32, **layout)
        digests = f.create_dataset(DARK_DIGEST, shape=(n,), dtype=np.uint64)
        terms = TermsWriter(f, n, g.active.shape, COMPRESSION)
        bar = tqdm(total=n, desc=f"predict {Path(shard_path).name}", unit="channel", disable=None if progress else True)
        status, reason = np.full(n, OK, dtype=object), np.full(n, "", dtype=object)
        method = np.full(n, "", dtype=object)
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(n, start + batch_size))
            served = serve(shard, rows)
            dark = np.asarray(served.dark, dtype=np.float32)
            if dark.shape != (len(rows), *g.active.shape):
                raise ValueError(f"predictor returned {dark.shape}, expected {(len(rows), *g.active.shape)}")
            if served.terms is not None:
                served.terms.check(len(rows), g.active.shape, np.asarray(served.status) == UNSERVED)
            _write_darks(ds, terms, start, dark, served.terms)
            digests[start : start + len(rows)] = row_digests(dark)
            status[rows], reason[rows] = served.status, served.reason
            method[rows] = _row_methods(served, provenance["method"])
            bar.update(len(rows))
        bar.close()
        terms.close()
        write_table(f, stored_table(shard.f, shard.path))
        _write_verdicts(f["table"], {"status": status, "reason": reason, "method": method})
        f.attrs["methods"] = ",".join(sorted({str(m) for m in method if m}))
        if final_attrs is not None:
            f.attrs.update(final_attrs())
        _log_verdicts(shard.table["file"].to_numpy(), status, reason)
    return out


def _write_darks(ds: h5py.Dataset, terms: TermsWriter, start: int, dark: np.ndarray, served: DarkTerms | None) -> None:
    """Rows ``start``, ``start + 1``, ... of a predictions file: as their terms where ``served``
    gives them (a few KB a row, summed again when read), else as pixels."""
    terms.add(start, len(dark), served)
    kept = np.zeros(len(dark), bool) if served is None else served.rows
    if not kept.any():
        ds[start : start + len(dark)] = dark
        return
    for i in np.flatnonzero(~kept):  # a chunk a row
        ds[start + i] = dark[i]


def row_digests(dark: np.ndarray) -> np.ndarray:
    """(N,) uint64: the xxh3-64 of each row's float32 bytes (as stored: native little-endian)."""
    dark = np.ascontiguousarray(dark, dtype="<f4")
    return np.array([xxhash.xxh3_64_intdigest(row) for row in dark], dtype=np.uint64)


def _row_methods(served: Served, default: str) -> np.ndarray:
    """What predicted each row: the predictor's ``method``, else ``default``; "" where unserved."""
    k = len(served.status)
    method = np.full(k, default, dtype=object) if served.method is None else np.asarray(served.method, dtype=object)
    if method.shape != (k,):
        raise ValueError(f"predictor returned {method.shape} methods for {k} rows")
    return np.where(np.asarray(served.status) == UNSERVED, "", method)


def _write_verdicts(table: h5py.Group, columns: dict[str, np.ndarray]) -> None:
    """The text columns of each row's verdict (``status``, ``reason``, ``method``), checksummed."""
    unknown = set(columns["status"]) - set(STATUSES)
    if unknown:
        raise ValueError(f"predictor returned status {sorted(unknown)}, expected one of {', '.join(STATUSES)}")
    for col, values in columns.items():
        values = np.array([str(v) for v in values], dtype=h5py.string_dtype())
        table.create_dataset(col, data=values).attrs[TEXT_CHECKSUM] = text_digest(values)


def _log_verdicts(files: np.ndarray, status: np.ndarray, reason: np.ndarray) -> None:
    """One warning per frame that is not plainly served (its channels share the verdict)."""
    seen = set()
    for file, st, why in zip(files, status, reason, strict=True):
        if st != OK and file not in seen:
            seen.add(file)
            log.warning("%s: %s: %s", file, st, why)
    counts = {st: int(np.sum(status == st)) for st in (FLAGGED, UNSERVED)}
    if any(counts.values()):
        log.warning("%d frame-channel(s) flagged, %d unserved", counts[FLAGGED], counts[UNSERVED])


class Predictions:
    """Read access to a predictions file: ``table`` is the frame table plus each row's
    ``status``, ``reason`` and ``method`` (see the module's description)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.f, self.geometry, self.table = open_versioned(self.path, "predictions", READABLE_VERSIONS)
        try:
            with damage_named(self.path):  # a damaged object header: HDF5's errors name no file
                self.attrs = {
                    k: (v.decode() if isinstance(v, bytes) else v) for k, v in self.f.attrs.items() if k != "geometry"
                }
                defaults = {**VERDICT_COLUMNS, "method": str(self.attrs.get("method", ""))}
                self.version = int(self.f.attrs["schema_version"])
                # written with every schema 2 file: a missing column or checksum is damage, not an older file
                columns = _read_verdicts(self.path, self.f["table"], len(self.table), defaults, self.version >= 2)
                for col, value in columns.items():
                    self.table[col] = value
                _check_dark_checksums(self.path, self.f)
                self._terms = self._terms_reader()
        except CorruptFileError:
            self.f.close()
            raise

    def _terms_reader(self) -> TermsReader | None:
        """The reader of the rows kept as terms; None for a schema 1 file (every row as pixels)."""
        if self.version < 2:
            return None
        if not isinstance(self.f.get("terms"), h5py.Group):
            raise CorruptFileError(
                f"{self.path}: schema 2 without its group /terms: the file is damaged; write it again"
            )
        shape = self.geometry.active.shape
        return TermsReader(self.path, self.f["terms"], len(self.table), shape, MAPS_KEPT_MB * 2**20)

    def __len__(self) -> int:
        return len(self.table)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.f.close()

    def dark(self, rows) -> np.ndarray:
        """Predicted darks (ADU, active area, readout coordinates) of table rows (sorted), each
        checked against its stored hash."""
        rows = np.asarray(rows)
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):  # not a scalar, nor a mask
            raise ValueError(f"rows must be a 1-D array of row numbers, got {rows.dtype} of shape {rows.shape}")
        rows = rows.astype(np.int64, copy=False)
        with damage_named(self.path):
            dark = self._darks(rows)
            stored = read_checked(self.path, self.f[DARK_DIGEST], rows) if DARK_DIGEST in self.f else None
        if stored is not None:
            failed = row_digests(dark) != stored
            if failed.any():
                summed = np.zeros(len(rows), bool) if self._terms is None else self._terms.has[rows]
                where = " and ".join(
                    f"{name} row(s) {', '.join(map(str, rows[failed & kind][:5]))}"
                    for name, kind in (("dataset /dark", ~summed), ("the terms (/terms) of", summed))
                    if (failed & kind).any()
                )
                raise CorruptFileError(
                    f"{self.path}: {where} fail their checksum ({DARK_DIGEST}): the file is damaged; write it again"
                )
        return dark

    def _darks(self, rows: np.ndarray) -> np.ndarray:
        """The darks of ``rows``, read as pixels or summed from their terms."""
        summed = np.zeros(len(rows), bool) if self._terms is None else self._terms.has[rows]
        if not summed.any():
            return read_checked(self.path, self.f["dark"], rows)
        dark = np.empty((len(rows), *self.geometry.active.shape), np.float32)
        if not summed.all():
            dark[~summed] = read_checked(self.path, self.f["dark"], rows[~summed])
        for i in np.flatnonzero(summed):
            self._terms.dark(int(rows[i]), out=dark[i])
        return dark

    def rows_of(self, file: str) -> np.ndarray:
        """Table rows of one raw file, in channel order of the table."""
        return np.flatnonzero((self.table["file"] == file).to_numpy())


def _check_dark_checksums(path: Path, f: h5py.File) -> None:
    """Every row of ``dark`` must be checkable: a hash per row, or (files written before the
    hashes) HDF5's checksum on every chunk; a file with neither lost its hashes to damage."""
    n = len(f["dark"])
    if DARK_DIGEST in f:
        if f[DARK_DIGEST].shape != (n,):
            raise CorruptFileError(f"{path}: dataset /{DARK_DIGEST} has shape {f[DARK_DIGEST].shape}, not ({n},)")
    elif n and not f["dark"].fletcher32:
        raise CorruptFileError(
            f"{path}: dataset /dark has neither row hashes ({DARK_DIGEST}) nor chunk checksums: "
            "the file is damaged; write it again"
        )


def _read_verdicts(
    path: Path, table: h5py.Group, n: int, defaults: dict[str, str], complete: bool
) -> dict[str, np.ndarray]:
    """The verdict columns (``defaults``: column -> its value in files written without it) of
    every row, checksums verified; ``complete``: the file was written with every column and its
    checksum (a missing one is damage: an unserved row must not read as served)."""
    out = {}
    for col, default in defaults.items():
        if col not in table:
            if complete:
                raise CorruptFileError(f"{path}: table column {col!r} is missing: the file is damaged")
            out[col] = np.full(n, default, dtype=object)
            continue
        values = read_checked(path, table[col])
        stored = table[col].attrs.get(TEXT_CHECKSUM)
        if complete and stored is None:
            raise CorruptFileError(f"{path}: table column {col!r} has lost its checksum: the file is damaged")
        if stored is not None and text_digest(values) != stored:
            raise CorruptFileError(
                f"{path}: the strings of dataset {table[col].name} fail their checksum: the file is damaged"
            )
        out[col] = np.array([v.decode() if isinstance(v, bytes) else v for v in values], dtype=object)
    return out
