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
night's ``manifest.csv`` (:func:`read_manifest`) with its reason and never stops the others, and
the night's counts per status go to ``status.json`` (:func:`read_night_status`). The predictions'
verdict on each frame is carried through: a frame they could not serve (``unserved``) is listed
as ``failed`` with their reason; one served with doubts (``flagged``) is corrected, listed as
``flagged`` with the reason, and its header says so (``DDSTATUS``, ``DDREASON``). A rerun whose
result would hold no corrected frame never replaces a folder that holds some, unless asked.

Header cards are ASCII: a raw file name that is not printable ASCII is written to ``DDSRC``
percent-encoded (its bytes as the operating system gives them, ``DDSRCENC = 'percent'``), from
which :func:`source_name` gives the name back. The manifest is UTF-8 text; a name that is not
UTF-8 shows its odd bytes as ``\\xNN`` (as in the quarantine table).

The arithmetic of a corrected frame (:func:`active_areas`, :func:`corrected_actives`) is public
so that the QA measures guide frames corrected exactly as the files are.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import urllib.parse
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
from deepdark.io.errors import InputError, MissingInputError, OutputError
from deepdark.io.frames import FITS_SUFFIXES, FrameError, Keywords, RawFrame, read_frame
from deepdark.io.geometry import Geometry
from deepdark.io.masters import Masters, MissingMaster
from deepdark.io.predictions import Predictions
from deepdark.io.shards import Shard, printable

__all__ = [
    "MANIFEST",
    "MANIFEST_COLUMNS",
    "MEDIAN_METHODS",
    "NIGHT_STATUS",
    "STATUSES",
    "CorrectionError",
    "DarkSource",
    "EmptyResultError",
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
    "night_status",
    "read_night_status",
    "source_name",
]

log = logging.getLogger(__name__)

MEDIAN_METHODS = ("median_temp", "median_all")
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("file", "output", "status", "reason", "camera", "imagetyp", "file_hash")
# A frame's status in the manifest: corrected (ok, or flagged by the predictions), not corrected
# (failed: unserved by the predictions, or an error), or left out (skipped: camera not selected).
STATUSES = ("ok", "flagged", "failed", "skipped")
NIGHT_STATUS = "status.json"
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


class EmptyResultError(OutputError):
    """A rerun whose result holds no corrected frame, refused where earlier frames would be replaced."""


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

    def verdict(self, rows) -> tuple[str, str]:
        """The source's verdict on the frame of ``rows``: ``ok``, ``flagged`` (a dark, but an
        implausible one) or ``unserved`` (no dark), and why. A frame takes the worst verdict of
        its channels; a source without verdicts (median darks, older predictions) says ``ok``."""
        if "status" not in self.table:
            return "ok", ""
        t = self.table.iloc[np.asarray(rows)]
        statuses = t["status"].to_numpy(dtype=object)
        reasons = t["reason"].to_numpy(dtype=object) if "reason" in t else np.full(len(t), "", dtype=object)
        picked = statuses == "unserved"
        worst = "unserved"
        if not picked.any():  # a status this version does not know is a doubt, never silently ok
            picked, worst = ~np.isin(statuses, ["", "ok"]), "flagged"
        if picked.any():
            why = "; ".join(dict.fromkeys(str(r) for r in reasons[picked] if r))
            return worst, why or f"predictions say {', '.join(sorted(set(statuses[picked])))}"
        return "ok", ""

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
    for path, what in ((source, "predictions file" if method == "model" else "shard"), (masters, "master-dark file")):
        if path is not None and not Path(path).exists():
            raise MissingInputError(f"{path}: no such {what}")
    if method in MEDIAN_METHODS:
        if masters is None:
            raise InputError(f"method {method} needs the master-dark file (--masters)")
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


# What a FITS card may hold: printable ASCII.
_PRINTABLE = "".join(map(chr, range(0x20, 0x7F)))


def _ascii_text(text: str) -> str:
    """``text`` for a header card: any character that is not printable ASCII as a Python escape
    (``\\xe9``, ``\\udce9`` for a byte of a name that is not UTF-8)."""
    return "".join(c if c in _PRINTABLE else c.encode("unicode_escape").decode("ascii") for c in text)


def _source_cards(name: str) -> dict[str, tuple[str, str]]:
    """``DDSRC``, the raw file's name: as it is when printable ASCII, else percent-encoded bytes
    (``%`` itself as ``%25``) with ``DDSRCENC = 'percent'``, so that :func:`source_name` gives
    the full name back whatever its characters or bytes."""
    if all(c in _PRINTABLE for c in name):
        return {"DDSRC": (name, "deepdark: source raw file")}
    encoded = urllib.parse.quote(os.fsencode(name), safe=_PRINTABLE.replace("%", ""))
    return {
        "DDSRC": (encoded, "deepdark: source raw file, percent-encoded"),
        "DDSRCENC": ("percent", "DDSRC: %XX are bytes of the name"),
    }


def source_name(header: fits.Header) -> str:
    """The name of the raw file a corrected frame was made from (``DDSRC``, decoded where the
    header says it is percent-encoded), as the operating system names it.

    Parameters
    ----------
    header
        The primary header of a corrected frame.
    """
    name = header["DDSRC"]
    if header.get("DDSRCENC") == "percent":
        return os.fsdecode(urllib.parse.unquote_to_bytes(name))
    return name


def _status_cards(status: str, reason: str) -> dict[str, tuple[str, str]]:
    """``DDSTATUS`` on every frame; ``DDREASON`` on a frame the predictions flagged."""
    cards = {"DDSTATUS": (status, "deepdark: ok, or flagged by the dark's source")}
    if status != "ok":
        cards["DDREASON"] = (reason, "deepdark: why the frame was flagged")
    return cards


def _fit_comment(value, comment: str) -> str:
    """The comment cut to what the 80-character card leaves beside the value (a 64-hex hash leaves
    none), so that astropy never has to truncate it with a warning."""
    if not isinstance(value, str):
        return comment
    room = 80 - 10 - max(len(value.replace("'", "''")) + 2, 20) - 3
    return comment[:room] if room > 0 else ""


def _provenance_header(
    raw: RawFrame,
    raw_path: str | Path,
    source: DarkSource,
    table: pd.DataFrame,
    method: str,
    verdict: tuple[str, str],
    provenance: dict | None,
    shape: tuple[int, int],
) -> fits.Header:
    """The raw header with the provenance of its correction (``DD*`` cards, HISTORY), all ASCII;
    ``provenance`` adds or overrides cards (``{KEY: value}`` or ``{KEY: (value, comment)}``)."""
    attrs = source.attrs
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
        **_source_cards(Path(raw_path).name),
        "DDSRCHSH": (raw.hash, "xxh3-128 of DDSRC"),
        "DDNIGHT": (str(table["night"].iloc[0]), "deepdark: night (YYYYMMDD)"),
        "DDGEOM": (source.geometry.name, "deepdark: frame geometry"),
        "DDDARK": (Path(source.path).name, "deepdark: file the dark came from"),
        "DDLAYOUT": ("active mosaic", "channels' active areas, frame orientation"),
        **_status_cards(*verdict),
    }
    for key, value in (provenance or {}).items():
        cards[key] = value if isinstance(value, tuple) else (value, cards.get(key, (None, ""))[1])
    for key, (value, comment) in cards.items():
        value = _ascii_text(value) if isinstance(value, str) else value
        hdr[key] = (value, _fit_comment(value, comment))
    for line in (
        f"deepdark {__version__} {now}: dark-corrected ({method}); active mosaic "
        f"{shape[0]} x {shape[1]} of channels {', '.join(table['channel'])}, "
        f"frame orientation, minus the dark, in ADU",
        f"source {raw_path} xxh3-128 {raw.hash}",
        f"dark {source.path} method {method} model {attrs.get('model_name', 'none')} "
        f"hash {attrs.get('model_hash', 'none')}",
    ):
        hdr.add_history(_ascii_text(line))
    return hdr


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
    A frame the source flagged is written with ``DDSTATUS = 'flagged'`` and its reason.
    Raises :class:`CorrectionError` (or :class:`FrameError`) when the frame cannot be corrected,
    among them a frame the source could not serve.
    """
    g = predictions.geometry
    rows = np.sort(np.asarray(rows))
    if rows.size == 0:
        raise CorrectionError(f"{raw_path}: no rows in {predictions.path}")
    status, reason = predictions.verdict(rows)
    if status == "unserved":
        raise CorrectionError(f"{raw_path}: no dark predicted ({reason or 'unserved'})")
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
    if not np.isfinite(darks).all():  # a NaN dark would pass for a corrected frame
        raise CorrectionError(f"{raw_path}: the dark from {predictions.path} is not finite everywhere")
    corrected = g.mosaic(corrected_actives(raw, g, channels, darks))
    method = method or predictions.attrs.get("method", "unknown")
    hdr = _provenance_header(raw, raw_path, predictions, t, method, (status, reason), provenance, corrected.shape)
    hdus = [fits.PrimaryHDU(data=corrected.astype(np.float32, copy=False), header=hdr)]
    if include_dark:
        dark_mosaic = g.mosaic(dict(zip(channels, darks))).astype(np.float32, copy=False)
        dh = fits.Header()
        dh["BUNIT"] = ("adu", "the dark removed from the primary HDU")
        dh["DDMETHOD"] = (_ascii_text(method), "deepdark: how the dark was made")
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
    """What :func:`correct_night` did: frames per manifest status, and where it wrote them."""

    out_dir: Path
    n_ok: int
    n_failed: int
    n_skipped: int
    manifest: Path
    n_flagged: int = 0

    @property
    def n_corrected(self) -> int:
        """Frames written: ``ok`` and ``flagged``."""
        return self.n_ok + self.n_flagged

    @property
    def counts(self) -> dict[str, int]:
        return {"ok": self.n_ok, "flagged": self.n_flagged, "failed": self.n_failed, "skipped": self.n_skipped}


def correct_night(
    source: str | Path,
    out_dir: str | Path,
    method: str = "model",
    masters: str | Path | None = None,
    include_dark: bool = False,
    cameras: Sequence[str] | None = None,
    keywords: Keywords = Keywords(),
    replace_with_empty: bool = False,
    progress: bool = True,
) -> NightResult:
    """Correct every frame of a night's predictions file (or shard, for the median methods).

    Writes ``out_dir/<stem>.fits`` per frame, ``out_dir/manifest.csv`` (file, output, status
    ``ok``/``flagged``/``failed``/``skipped``, reason, camera, imagetyp, file_hash) and the
    night's counts per status, ``out_dir/status.json``. A failed frame is logged and listed;
    the others are still corrected. ``cameras`` limits the output to those cameras. The inputs
    are opened before anything is written: a missing one leaves no folder behind.

    A result without any corrected frame (an empty or all-unserved predictions file, every
    frame failed) raises :class:`EmptyResultError` where ``out_dir`` holds corrected frames of
    an earlier run, and leaves them as they are; with ``replace_with_empty`` it is written, and
    the earlier frames that the earlier manifest lists are removed.
    """
    out_dir = Path(out_dir)
    with open_darks(source, method, masters) as darks:
        out_dir.mkdir(parents=True, exist_ok=True)
        records = _correct_frames(darks, out_dir, method, include_dark, cameras, keywords, progress)
    status = night_status(records)
    c = status["counts"]
    if c["ok"] + c["flagged"] == 0:
        _replace_earlier_frames(out_dir, replace_with_empty)
    if c["failed"]:
        tried = c["ok"] + c["flagged"] + c["failed"]
        log.warning("%s: %d of %d frames not corrected, see %s", out_dir, c["failed"], tried, out_dir / MANIFEST)
    # The manifest first: it marks the folder as deepdark's should the job end in between, and
    # no status of an earlier run is left beside it.
    (out_dir / NIGHT_STATUS).unlink(missing_ok=True)
    manifest = _write_manifest(out_dir / MANIFEST, records)
    with atomic_path(out_dir / NIGHT_STATUS) as tmp:
        tmp.write_text(json.dumps(status, indent=2) + "\n", encoding="utf-8")
    return NightResult(out_dir, c["ok"], c["failed"], c["skipped"], manifest, n_flagged=c["flagged"])


def _correct_frames(
    darks: DarkSource,
    out_dir: Path,
    method: str,
    include_dark: bool,
    cameras: Sequence[str] | None,
    keywords: Keywords,
    progress: bool,
) -> list[dict]:
    """Correct each frame of ``darks`` into ``out_dir``; one manifest record per frame."""
    table = darks.table
    files = list(dict.fromkeys(table["file"]))  # table order, once each
    names: dict[str, str] = {}
    records = []
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
        records.append(rec)
        if cameras and first["camera"] not in cameras:
            rec.update(status="skipped", reason=f"camera {first['camera']} not selected")
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
        except (CorrectionError, FrameError, OSError, ValueError) as exc:
            if isinstance(exc, OSError) and exc.errno in _FATAL_ERRNOS:
                # The disk, not the frame: every further frame would fail too, and a night
                # that looks finished with frames missing is worse than a failed job.
                raise OSError(exc.errno, f"cannot write {out_dir / name}: {exc.strerror}") from exc
            log.error("not corrected: %s", exc)
            rec.update(status="failed", reason=str(exc))
            continue
        verdict, reason = darks.verdict(rows)
        rec.update(output=name, status=verdict, reason=reason)
    return records


def night_status(records: Sequence[dict]) -> dict:
    """A night's counts per manifest status and its verdict: ``ok`` (no frame failed),
    ``partial`` (some failed), ``failed`` (every frame tried failed) or ``empty`` (none tried).

    Parameters
    ----------
    records
        The night's manifest records (``status`` one of :data:`STATUSES`).
    """
    counts = dict.fromkeys(STATUSES, 0)
    for rec in records:
        counts[rec["status"]] += 1
    tried = counts["ok"] + counts["flagged"] + counts["failed"]
    if not counts["failed"]:
        verdict = "ok" if tried else "empty"
    else:
        verdict = "failed" if counts["failed"] == tried else "partial"
    return {
        "status": verdict,
        "frames": len(records),
        "counts": counts,
        "failed_fraction": counts["failed"] / tried if tried else 0.0,
    }


def _replace_earlier_frames(out_dir: Path, replace: bool) -> None:
    """Refuse to replace the corrected frames of an earlier run with a result that holds none,
    unless ``replace``; then remove those the earlier manifest lists, so that the folder holds
    what its new manifest says."""
    earlier = sorted(p.name for p in out_dir.glob("*.fits") if not p.name.startswith("."))
    if not earlier:
        return
    if not replace:
        raise EmptyResultError(
            f"refusing to replace the {len(earlier)} corrected frame(s) in {out_dir} with a result that "
            "holds none (no frame could be corrected); to replace them, rerun with --replace-with-empty "
            "(workflow: correct.replace_with_empty: true)"
        )
    if (out_dir / MANIFEST).exists():
        manifest = read_manifest(out_dir)
        for name in manifest.loc[manifest["status"].isin(["ok", "flagged"]), "output"]:
            if name and Path(name).name == name:  # only names inside the folder
                (out_dir / name).unlink(missing_ok=True)


def _write_manifest(path: Path, records: Sequence[dict]) -> Path:
    """The manifest as UTF-8 CSV; a name that is not UTF-8 shows its odd bytes as ``\\xNN``."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows({k: printable(v) if isinstance(v, str) else v for k, v in rec.items()} for rec in records)
    return path


def read_manifest(out_dir: str | Path) -> pd.DataFrame:
    """The ``manifest.csv`` of a night corrected by :func:`correct_night` (every column a string)."""
    return pd.read_csv(Path(out_dir) / MANIFEST, dtype=str, keep_default_na=False, encoding="utf-8")


def read_night_status(out_dir: str | Path) -> dict:
    """The ``status.json`` of a night corrected by :func:`correct_night` (see :func:`night_status`)."""
    return json.loads((Path(out_dir) / NIGHT_STATUS).read_text(encoding="utf-8"))
