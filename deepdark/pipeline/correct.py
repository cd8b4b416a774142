"""Dark-corrected frames: the raw frame's active mosaic minus its dark, as float32 FITS with provenance.

One output file per raw frame, ``<stem>.fits``: the primary HDU holds the sensor's active mosaic
(every channel's active area flipped back to frame orientation and tiled, 2084 x 2084 for the
KAF-4320) minus the dark of each channel, in ADU (float32); the raw header is kept, less the
cards that described the raw pixel array (BITPIX, NAXISn, BZERO, BSCALE, old checksums), with
the provenance of the correction as ``DD*`` keywords and HISTORY lines, and CHECKSUM/DATASUM on
every HDU. With ``include_dark`` the dark that was removed follows as the image extension
``DARK``. Files are written under a temporary name and renamed when complete.

The dark comes from a :class:`DarkSource`: a predictions file (``deepdark predict``, method
recorded there) or the median master darks of a library (``median_temp`` / ``median_all``, for
comparisons). The raw file is read again (guide frames keep only their strips in the shard) and
its hash must equal the one recorded at extraction: a file that changed since is refused.

A night is corrected by one call (:func:`correct_night`); a frame that fails is reported in the
night's ``manifest.csv`` (:func:`read_manifest`) with its reason and never stops the others.
The arithmetic of a corrected frame (:func:`active_areas`, :func:`corrected_actives`) is public
so that the QA measures guide frames corrected exactly as the files are.
"""

from __future__ import annotations

import csv
import errno
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from tqdm import tqdm

from deepdark import __version__
from deepdark.io.atomic import atomic_path
from deepdark.io.frames import FITS_SUFFIXES, FrameError, Keywords, RawFrame, read_frame
from deepdark.io.geometry import Geometry
from deepdark.io.masters import Masters, MissingMaster
from deepdark.io.predictions import Predictions
from deepdark.io.shards import Shard

__all__ = [
    "MANIFEST",
    "MANIFEST_COLUMNS",
    "MEDIAN_METHODS",
    "CorrectionError",
    "DarkSource",
    "MedianDarks",
    "NightResult",
    "PredictedDarks",
    "active_areas",
    "correct_frame",
    "correct_night",
    "corrected_actives",
    "corrected_header",
    "open_darks",
    "output_name",
    "read_manifest",
]

log = logging.getLogger(__name__)

MEDIAN_METHODS = ("median_temp", "median_all")
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("file", "output", "status", "reason", "camera", "imagetyp", "file_hash")
# Cards of the raw HDU that describe its pixel array, not the observation: astropy writes the
# right ones for the float32 mosaic, and checksums are recomputed.
_STRUCTURAL = (
    "SIMPLE",
    "XTENSION",
    "BITPIX",
    "NAXIS",
    "EXTEND",
    "BZERO",
    "BSCALE",
    "BLANK",
    "PCOUNT",
    "GCOUNT",
    "CHECKSUM",
    "DATASUM",
)


class CorrectionError(Exception):
    """A frame that cannot be corrected; the message says why."""


# -- where darks come from -----------------------------------------------------------------------


class DarkSource:
    """A night's frame-channel table and the dark (ADU, active area, readout coordinates) of each row."""

    table: pd.DataFrame
    geometry: Geometry
    attrs: dict
    path: Path

    def dark(self, rows) -> np.ndarray:  # (k, rows, cols) float32
        raise NotImplementedError

    def rows_of(self, file: str) -> np.ndarray:
        return np.flatnonzero((self.table["file"] == file).to_numpy())

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


class PredictedDarks(DarkSource):
    """Darks from a predictions file (``deepdark predict``)."""

    def __init__(self, path: str | Path):
        self._p = Predictions(path)
        self.path, self.table, self.geometry = self._p.path, self._p.table, self._p.geometry
        self.attrs = dict(self._p.attrs)

    def dark(self, rows) -> np.ndarray:
        return self._p.dark(np.asarray(rows)).astype(np.float32, copy=False)

    def close(self) -> None:
        self._p.f.close()


class MedianDarks(DarkSource):
    """Darks from median master darks (the traditional method), for the rows of a shard."""

    def __init__(self, shard: str | Path, masters: str | Path, kind: str = "temp"):
        if kind not in ("temp", "all"):
            raise ValueError(f"median kind must be 'temp' or 'all', got {kind!r}")
        self.kind = kind
        with Shard(shard) as s:
            self.table, self.geometry = s.table.copy(), s.geometry
        self.path = Path(shard)
        self.masters = Masters(masters)
        self.attrs = dict(
            method=f"median_{kind}", masters=str(masters), shard=str(shard), software=f"deepdark {__version__}"
        )

    def dark(self, rows) -> np.ndarray:
        try:
            masters = self.masters.for_frames(self.table.iloc[np.asarray(rows)], self.kind)
        except MissingMaster as exc:
            raise CorrectionError(str(exc)) from None
        return np.stack(masters).astype(np.float32, copy=False)

    def close(self) -> None:
        self.masters.close()


def open_darks(source: str | Path, method: str = "model", masters: str | Path | None = None) -> DarkSource:
    """``source`` is a predictions file (method ``model``) or a shard (``median_temp``/``median_all``)."""
    if method in MEDIAN_METHODS:
        if masters is None:
            raise ValueError(f"method {method} needs the master-dark file (--masters)")
        return MedianDarks(source, masters, kind=method.removeprefix("median_"))
    if method != "model":
        raise ValueError(f"unknown correction method {method!r} (model, {', '.join(MEDIAN_METHODS)})")
    return PredictedDarks(source)


# -- one frame -----------------------------------------------------------------------------------


def active_areas(data: np.ndarray, geometry: Geometry) -> dict[str, np.ndarray]:
    """Each channel's active area of a raw frame, in readout coordinates (views).

    Parameters
    ----------
    data
        The raw frame (frame orientation), as :func:`deepdark.io.frames.read_frame` gives it.
    geometry
        Its geometry.
    """
    return {ch.name: geometry.readout(data, ch)[geometry.active.slices] for ch in geometry.channels}


def corrected_actives(
    raw: RawFrame, geometry: Geometry, channels: Sequence[str], darks: np.ndarray
) -> dict[str, np.ndarray]:
    """``{channel: raw active - dark}`` (float32, readout coordinates) for the frame's channels:
    the arithmetic of a corrected frame, also what the QA measures guide frames on.

    Parameters
    ----------
    raw
        The raw frame.
    geometry
        Its geometry.
    channels
        The channels of ``darks``, in their order; must be every channel of the geometry.
    darks
        One dark per channel (ADU, active area, readout coordinates).
    """
    if len(channels) != len(darks):
        raise CorrectionError(f"{len(channels)} channels but {len(darks)} darks")
    actives = active_areas(raw.data, geometry)
    if set(channels) != set(actives):
        raise CorrectionError(f"table has channels {sorted(channels)}, the geometry {sorted(actives)}")
    return {c: actives[c].astype(np.float32) - np.asarray(d, dtype=np.float32) for c, d in zip(channels, darks)}


def output_name(raw_path: str | Path) -> str:
    """``GS1_guide_0001.fits.gz`` -> ``GS1_guide_0001.fits``."""
    name = Path(raw_path).name
    for suffix in sorted(FITS_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] + ".fits"
    return name + ".fits"


def corrected_header(raw_header: fits.Header) -> fits.Header:
    """The raw header without the cards that described the raw pixel array."""
    hdr = raw_header.copy()
    for key in list(hdr.keys()):
        base = key.rstrip("0123456789") if key.startswith("NAXIS") else key
        if base in _STRUCTURAL:
            hdr.remove(key, ignore_missing=True, remove_all=True)
    return hdr


def _fit_comment(value, comment: str) -> str:
    """The comment cut to what the 80-character card leaves beside the value (a 64-hex hash leaves
    none), so that astropy never has to truncate it with a warning."""
    if not isinstance(value, str):
        return comment
    room = 80 - 10 - max(len(value.replace("'", "''")) + 2, 20) - 3
    return comment[:room] if room > 0 else ""


def correct_frame(
    raw_path: str | Path,
    predictions: DarkSource,
    rows: Sequence[int],
    out_path: str | Path,
    method: str | None = None,
    provenance: dict | None = None,
    include_dark: bool = False,
    keywords: Keywords = Keywords(),
) -> Path:
    """Write the dark-corrected active mosaic of one raw frame to ``out_path`` (float32 FITS).

    ``rows`` are the frame's rows in ``predictions.table`` (one per channel); ``method`` defaults
    to the source's; ``provenance`` adds or overrides header keywords (``{KEY: value}``).
    Raises :class:`CorrectionError` (or :class:`FrameError`) when the frame cannot be corrected.
    """
    g = predictions.geometry
    rows = np.sort(np.asarray(rows))
    if rows.size == 0:
        raise CorrectionError(f"{raw_path}: no rows in {predictions.path}")
    t = predictions.table.iloc[rows]
    raw = read_frame(raw_path, g, keywords)
    expected = set(t["file_hash"])
    if expected != {raw.hash}:
        raise CorrectionError(
            f"{raw_path}: file changed since extraction (hash {raw.hash}, "
            f"shard recorded {', '.join(sorted(expected))}); extract the night again"
        )
    channels = list(t["channel"])
    darks = predictions.dark(rows)
    corrected = g.mosaic(corrected_actives(raw, g, channels, darks))
    attrs = predictions.attrs
    method = method or attrs.get("method", "unknown")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    hdr = corrected_header(raw.header)
    cards = {
        "BUNIT": ("adu", "dark-corrected ADU"),
        "DDMETHOD": (method, "deepdark: how the dark was made"),
        "DDMODEL": (str(attrs.get("model_name", "")) or "none", "deepdark: model name"),
        "DDMHASH": (str(attrs.get("model_hash", "")) or "none", "deepdark: model hash"),
        "DDVERS": (f"deepdark {__version__}", "deepdark: software of the correction"),
        "DDPVERS": (str(attrs.get("software", "")), "deepdark: software of the dark"),
        "DDDATE": (now, "deepdark: correction date, UTC"),
        "DDSRC": (Path(raw_path).name, "deepdark: source raw file"),
        "DDSRCHSH": (raw.hash, "xxh3-128 of DDSRC"),
        "DDNIGHT": (str(t["night"].iloc[0]), "deepdark: night (YYYYMMDD)"),
        "DDGEOM": (g.name, "deepdark: frame geometry"),
        "DDDARK": (Path(predictions.path).name, "deepdark: file the dark came from"),
        "DDLAYOUT": ("active mosaic", "channels' active areas, frame orientation"),
    }
    for key, value in (provenance or {}).items():
        cards[key] = value if isinstance(value, tuple) else (value, cards.get(key, (None, ""))[1])
    for key, (value, comment) in cards.items():
        hdr[key] = (value, _fit_comment(value, comment))
    hdr.add_history(
        f"deepdark {__version__} {now}: dark-corrected ({method}); active mosaic "
        f"{corrected.shape[0]} x {corrected.shape[1]} of channels {', '.join(channels)}, "
        f"frame orientation, minus the dark, in ADU"
    )
    hdr.add_history(f"source {raw_path} xxh3-128 {raw.hash}")
    hdr.add_history(
        f"dark {predictions.path} method {method} model {attrs.get('model_name', 'none')} "
        f"hash {attrs.get('model_hash', 'none')}"
    )
    hdus = [fits.PrimaryHDU(data=corrected.astype(np.float32, copy=False), header=hdr)]
    if include_dark:
        dark_mosaic = g.mosaic(dict(zip(channels, darks))).astype(np.float32, copy=False)
        dh = fits.Header()
        dh["BUNIT"] = ("adu", "the dark removed from the primary HDU")
        dh["DDMETHOD"] = (method, "deepdark: how the dark was made")
        hdus.append(fits.ImageHDU(data=dark_mosaic, header=dh, name="DARK"))
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        fits.HDUList(hdus).writeto(tmp, checksum=True)
    return out_path


# -- one night -----------------------------------------------------------------------------------

# Write failures that are the output's fault (disk full, quota, read-only, I/O error), not a frame's.
_FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


@dataclass
class NightResult:
    out_dir: Path
    n_ok: int
    n_failed: int
    n_skipped: int
    manifest: Path


def correct_night(
    source: str | Path,
    out_dir: str | Path,
    method: str = "model",
    masters: str | Path | None = None,
    include_dark: bool = False,
    cameras: Sequence[str] | None = None,
    keywords: Keywords = Keywords(),
    progress: bool = True,
) -> NightResult:
    """Correct every frame of a night's predictions file (or shard, for the median methods).

    Writes ``out_dir/<stem>.fits`` per frame and ``out_dir/manifest.csv`` (file, output, status
    ``ok``/``failed``/``skipped``, reason, camera, imagetyp, file_hash). A failed frame is logged
    and listed; the others are still corrected. ``cameras`` limits the output to those cameras.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    with open_darks(source, method, masters) as darks:
        table = darks.table
        files = list(dict.fromkeys(table["file"]))  # table order, once each
        names: dict[str, str] = {}
        for f in tqdm(files, desc=f"correct {out_dir.name}", unit="frame", disable=None if progress else True):
            rows = darks.rows_of(f)
            first = table.iloc[rows[0]]
            rec = dict(
                file=f,
                output="",
                status="ok",
                reason="",
                camera=first["camera"],
                imagetyp=first["imagetyp"],
                file_hash=first["file_hash"],
            )
            if cameras and first["camera"] not in cameras:
                rec.update(status="skipped", reason=f"camera {first['camera']} not selected")
                records.append(rec)
                continue
            name = output_name(f)
            if name in names:  # a.fits and a.fits.gz in one night
                name = Path(f).name + ".fits"
            names[name] = f
            try:
                correct_frame(
                    f,
                    darks,
                    rows,
                    out_dir / name,
                    method=darks.attrs.get("method", method),
                    include_dark=include_dark,
                    keywords=keywords,
                )
                rec["output"] = name
            except (CorrectionError, FrameError, OSError, ValueError) as exc:
                if isinstance(exc, OSError) and exc.errno in _FATAL_ERRNOS:
                    # The disk, not the frame: every further frame would fail too, and a night
                    # that looks finished with frames missing is worse than a failed job.
                    raise OSError(exc.errno, f"cannot write {out_dir / name}: {exc.strerror}") from exc
                log.error("not corrected: %s", exc)
                rec.update(status="failed", reason=str(exc))
            records.append(rec)
    manifest = out_dir / MANIFEST
    with atomic_path(manifest) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(records)
    counts = pd.Series([r["status"] for r in records], dtype=object).value_counts()
    return NightResult(
        out_dir, int(counts.get("ok", 0)), int(counts.get("failed", 0)), int(counts.get("skipped", 0)), manifest
    )


def read_manifest(out_dir: str | Path) -> pd.DataFrame:
    """The ``manifest.csv`` of a night corrected by :func:`correct_night` (every column a string)."""
    return pd.read_csv(Path(out_dir) / MANIFEST, dtype=str, keep_default_na=False)
