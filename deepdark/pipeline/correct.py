"""Dark-corrected frames: the raw frame's active mosaic minus its dark, as float32 FITS with provenance.

One output file per raw frame, ``<stem>.fits``: the sensor's active mosaic (every channel's
active area in frame orientation, tiled: 2084 x 2084 for the KAF-4320) minus the dark of each
channel, in ADU (float32). The raw header is kept, less the cards that described the raw pixel
array (BITPIX, NAXISn, BZERO, BSCALE, old checksums) and with its layout and WCS cards made true
of the mosaic (below), with the provenance of the correction as ``DD*`` keywords and HISTORY
lines, and CHECKSUM/DATASUM on every HDU. With ``include_dark`` the dark that was removed
follows as the image extension ``DARK``. Files are written under a temporary name and renamed
when complete.

Compression (``compression``): ``RICE_1`` (the default), ``GZIP_2`` or ``none``. Compressed
files are tile-compressed FITS (tiles of ``TILE_ROWS`` = 16 rows): an empty primary HDU, then
the image with its full header in HDU 1 (``fits.open(path)[1]``; ``fits.getdata(path)`` finds
it), the layout fpack writes; ``none`` keeps the image in the primary HDU. ``GZIP_2`` is
lossless. ``RICE_1`` quantises: the quantisation step is the frame's own pixel-to-pixel noise
(:func:`frame_noise`, measured on the corrected mosaic) divided by ``quantize_level`` (default
:data:`QUANTIZE_LEVEL` = 4, fpack's default), with subtractive dither
(``SUBTRACTIVE_DITHER_2``: exact zeros stay exact). Quantising with dither adds noise of rms
``step / sqrt(12)``, so 4 adds 0.072 of the frame's noise (0.26 % more noise in quadrature):
below the 0.1 that any level of 10 / sqrt(12) = 2.9 or more guarantees, with room for a noise
estimate a few per cent high and for parts of a frame quieter than its median noise. The
dither seed comes from the pixels (cfitsio's checksum seed), so the same frame gives the same
file. The ``DARK`` extension is quantised with the frame's step. The header records the noise,
the step and the level (``DDQNOISE``, ``DDQSTEP``, ``DDQLEVEL``) and ``DDCOMPR``; a frame
without measurable noise (constant) is stored losslessly (``GZIP_2``).

Layout and WCS cards. The mosaic is not the raw layout: cards that locate pixels in the raw
frame (``DATASEC``, ``BIASSEC``, ``TRIMSEC``, ``CCDSEC``, ``DETSEC``, ``AMPSEC``, ``ORIGSEC``,
``PRESEC``, ``POSTSEC`` with any suffix, IRAF's ``LTV``/``LTM``/``DTV``/``DTM``) are moved into
HISTORY as they were. In their place, for the channel of index ``n`` (geometry order, from 1),
``DDMSECn`` is its tile in the mosaic and ``DDRSECn`` the raw-frame section the tile holds
(FITS sections, ``[x1:x2,y1:y2]``, 1-based): every tile is its raw section shifted, never
flipped (tiles are in frame orientation), so a mosaic pixel ``(x, y)`` of tile ``n`` is the raw
pixel ``(x, y)`` + (``DDRSECn`` start - ``DDMSECn`` start). The shifts differ between tiles by
the prescan, overscan and middle rows cut out, so one WCS can be exact in one tile only. The
rule: every WCS of the header (the primary and the alternate ones, ``CRPIXja``) is shifted by
the tile of the *reference channel*, the channel whose raw active area holds the primary WCS's
reference pixel (``CRPIX1``, ``CRPIX2``; where those are not numbers, the first alternate's), or
lies nearest to it (ties: the first channel in the geometry's order). Only ``CRPIXja`` change
(a shift leaves ``CD``, ``PC``, ``CDELT``, ``CRVAL``, projections and SIP terms as they were);
the WCS is then exact, pixel for pixel, in the reference channel's tile (``DDWCSCH`` names the
channel, ``DDWCSSEC`` its tile) and off by the difference of the tiles' shifts elsewhere (for
the KAF-4320 up to 92 columns and 2 rows), which HISTORY states. A WCS whose ``CRPIXja`` is not
a number cannot be shifted: its cards are moved into HISTORY.

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
result would hold no corrected frame never replaces a folder that holds some, unless asked; the
earlier frames a rerun did not make are moved to ``stale/UTC-TIME/`` (:class:`_StaleFrames`).

Header cards are ASCII: a raw file name that is not printable ASCII is written to ``DDSRC``
percent-encoded (its bytes as the operating system gives them, ``DDSRCENC = 'percent'``), from
which :func:`source_name` gives the name back. The manifest is UTF-8 text; a name that is not
UTF-8 shows its odd bytes as ``\\xNN`` (as in the quarantine table).

The arithmetic of a corrected frame (:func:`active_areas`, :func:`corrected_actives`,
:func:`corrected_mosaic`) is public so that the QA measures guide frames corrected exactly as the
files are.
"""

from __future__ import annotations

import csv
import errno
import itertools
import json
import logging
import os
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.io.fits.verify import VerifyError
from tqdm import tqdm

from deepdark import __version__
from deepdark.io.atomic import atomic_path
from deepdark.io.errors import InputError, MissingInputError, OutputError
from deepdark.io.frames import FITS_SUFFIXES, FrameError, Keywords, RawFrame, read_frame
from deepdark.io.geometry import Geometry
from deepdark.io.masters import Masters, MissingMaster
from deepdark.io.predictions import Predictions
from deepdark.io.shards import Shard, closed_on_error, first_few, printable

__all__ = [
    "COMPRESSIONS",
    "MANIFEST",
    "MANIFEST_COLUMNS",
    "MEDIAN_METHODS",
    "NIGHT_STATUS",
    "QUANTIZE_LEVEL",
    "STATUSES",
    "CorrectionError",
    "DarkSource",
    "EmptyResultError",
    "MedianDarks",
    "MosaicTile",
    "NightResult",
    "PredictedDarks",
    "active_areas",
    "correct_frame",
    "correct_night",
    "corrected_actives",
    "corrected_header",
    "corrected_mosaic",
    "frame_noise",
    "mosaic_header",
    "mosaic_tiles",
    "open_darks",
    "output_name",
    "read_manifest",
    "night_status",
    "read_night_status",
    "source_name",
    "storage_hdus",
]

log = logging.getLogger(__name__)

MEDIAN_METHODS = ("median_temp", "median_all")
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("file", "output", "status", "reason", "camera", "imagetyp", "file_hash")
# A frame's status in the manifest: corrected (ok, or flagged by the predictions), not corrected
# (failed: unserved by the predictions, or an error), or left out (skipped: camera not selected).
STATUSES = ("ok", "flagged", "failed", "skipped")
NIGHT_STATUS = "status.json"
STALE = "stale"  # subfolder of a night's corrected frames that a later run of the night did not make
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
# How corrected frames may be stored: tile-compressed, quantised (RICE_1) or lossless (GZIP_2),
# or plain FITS.
COMPRESSIONS = ("RICE_1", "GZIP_2", "none")
# RICE_1's quantisation step is the frame's noise over this: added rms 1 / (4 sqrt 12) = 0.072 of it.
QUANTIZE_LEVEL = 4.0
_SUBTRACTIVE_DITHER_2 = 2
# Rows per compression tile: astropy compresses tile by tile, and tiles of 16 rows write a
# full-size frame twice as fast as fpack's one row (50 instead of 115 ms), 2 % smaller.
TILE_ROWS = 16
# cfitsio seeds the dither from the first tile's checksum: the same pixels give the same bytes
# (the default seed, the clock, would make every rerun differ).
_DITHER_SEED_CHECKSUM = -1


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
        with closed_on_error(self.masters):
            self.masters.check_geometry(self.geometry)
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
    actives = _checked_actives(raw, geometry, channels, darks)
    # One pass per channel: the raw counts are cast to float32 inside the subtraction, the same
    # values as subtracting from a float32 copy, without making one.
    return {
        c: np.subtract(actives[c], np.asarray(d, dtype=np.float32), dtype=np.float32) for c, d in zip(channels, darks)
    }


def corrected_mosaic(raw: RawFrame, geometry: Geometry, channels: Sequence[str], darks: np.ndarray) -> np.ndarray:
    """The corrected active mosaic (float32, frame orientation): ``geometry.mosaic`` of
    :func:`corrected_actives`, the same values, each channel's difference written straight
    into its tile (no per-channel image and copy).

    Parameters
    ----------
    raw, geometry, channels, darks
        As for :func:`corrected_actives`.
    """
    actives = _checked_actives(raw, geometry, channels, darks)
    dark_of = dict(zip(channels, darks))
    out = (np.zeros if geometry.own_regions else np.empty)(geometry.mosaic_shape, dtype=np.float32)
    for ch in geometry.channels:
        np.subtract(
            geometry.to_frame_orientation(actives[ch.name], ch),
            geometry.to_frame_orientation(np.asarray(dark_of[ch.name], dtype=np.float32), ch),
            out=out[geometry.mosaic_slices(ch)],
            dtype=np.float32,
        )
    return out


def _checked_actives(
    raw: RawFrame, geometry: Geometry, channels: Sequence[str], darks: np.ndarray
) -> dict[str, np.ndarray]:
    """The raw frame's active areas, once ``channels`` are found to match ``darks`` and the geometry."""
    if len(channels) != len(darks):
        raise CorrectionError(f"{len(channels)} channels but {len(darks)} darks")
    actives = active_areas(raw.data, geometry)
    if set(channels) != set(actives):
        raise CorrectionError(f"table has channels {sorted(channels)}, the geometry {sorted(actives)}")
    return actives


def output_name(raw_path: str | Path) -> str:
    """``GS1_guide_0001.fits.gz`` -> ``GS1_guide_0001.fits``."""
    name = Path(raw_path).name
    for suffix in sorted(FITS_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] + ".fits"
    return name + ".fits"


def _free_output_name(raw_path: str | Path, taken) -> str:
    """:func:`output_name`, or where another frame of the night took it (``a.fits`` and
    ``a.fits.gz``), the raw file's whole name with ``.fits``, then numbered: never one ``taken``."""
    whole = Path(raw_path).name
    numbered = (f"{whole}.{n}.fits" for n in itertools.count(2))
    return next(c for c in itertools.chain((output_name(raw_path), whole + ".fits"), numbered) if c not in taken)


def corrected_header(raw_header: fits.Header) -> fits.Header:
    """The raw header without the cards that described the raw pixel array; a card that is not
    FITS standard (a lowercase or illegal keyword, a value such as NaN or 1.0.0, a tab in a
    string), which astropy reads but would refuse to write, kept as HISTORY text."""
    hdr = raw_header.copy()
    for key in list(hdr.keys()):
        base = key.rstrip("0123456789") if key.startswith("NAXIS") else key
        if base in _STRUCTURAL:
            hdr.remove(key, ignore_missing=True, remove_all=True)
    unwritable = []
    for i in reversed(range(len(hdr))):
        card = hdr.cards[i]
        try:
            card.verify("exception")
        except VerifyError:
            # the card's text as read (its ``image`` would try to fix it first, and fail on a
            # byte outside ASCII)
            unwritable.insert(0, getattr(card, "_image", None) or card.keyword)
            del hdr[i]
    for image in unwritable:
        hdr.add_history(f"deepdark: raw card not FITS standard: {' '.join(_ascii_text(image).split())}")
    return hdr


# -- layout and WCS cards of the mosaic ----------------------------------------------------------

# Cards that locate pixels in the raw layout (NOAO/IRAF sections with any amplifier suffix, and
# IRAF's logical-to-physical and -detector transforms): not true of the mosaic.
_RAW_LAYOUT = re.compile(
    r"^(DATASEC|BIASSEC|TRIMSEC|CCDSEC|DETSEC|AMPSEC|ORIGSEC|PRESEC|POSTSEC)[A-Z0-9_]*$"
    r"|^(LTV|DTV)[0-9]$|^(LTM|DTM)[0-9]_[0-9]$"
)
# The cards of a WCS, the group naming its alternate letter ("" for the primary WCS). SIP terms
# belong to the primary WCS only.
_WCS_CARD = re.compile(
    r"^(?:CRPIX|CRVAL|CDELT|CTYPE|CUNIT|CROTA|CRDER|CSYER)[0-9]([A-Z]?)$"
    r"|^(?:CD|PC|PV|PS)[0-9]_[0-9]+([A-Z]?)$"
    r"|^(?:WCSAXES|WCSNAME|LONPOLE|LATPOLE)([A-Z]?)$"
    r"|^(?:A|B|AP|BP)_(?:ORDER|DMAX|[0-9]+_[0-9]+)()$"
)


@dataclass(frozen=True)
class MosaicTile:
    """Where a channel's active area sits in the raw frame and in the mosaic (0-based row, col
    of its first pixel; both in frame orientation, so the tile is its raw section shifted)."""

    channel: str
    raw: tuple[int, int]
    mosaic: tuple[int, int]
    shape: tuple[int, int]

    @property
    def shift(self) -> tuple[int, int]:
        """(rows, cols) to add to a mosaic pixel of the tile to get its raw pixel."""
        return (self.raw[0] - self.mosaic[0], self.raw[1] - self.mosaic[1])

    def section(self, where: str) -> str:
        """The tile as a FITS section ``[x1:x2,y1:y2]`` (1-based) of the ``raw`` frame or the ``mosaic``."""
        r0, c0 = self.raw if where == "raw" else self.mosaic
        return f"[{c0 + 1}:{c0 + self.shape[1]},{r0 + 1}:{r0 + self.shape[0]}]"


def mosaic_tiles(geometry: Geometry) -> list[MosaicTile]:
    """The tile of every channel (geometry order): its raw section and its place in the mosaic.

    Parameters
    ----------
    geometry
        The frame geometry; the tiles are those :meth:`Geometry.mosaic` fills.
    """
    tiles = []
    for ch in geometry.channels:
        a = geometry.frame_regions(ch)["active"]  # in frame coordinates, as the mosaic holds it
        mr, mc = geometry.mosaic_slices(ch)
        tiles.append(MosaicTile(ch.name, (a.r0, a.c0), (mr.start, mc.start), a.shape))
    return tiles


def _reference_tile(header: fits.Header, tiles: Sequence[MosaicTile], letter: str) -> MosaicTile:
    """The tile whose raw section holds the reference pixel of WCS ``letter``, or lies nearest to
    it (ties: the first); a reference pixel that is not a number counts as the origin."""
    x, y = (header.get(f"CRPIX{j}{letter}", 0.0) for j in (1, 2))
    if not all(_is_number(v) for v in (x, y)):
        x = y = 0.0
    row, col = float(y) - 1, float(x) - 1  # FITS pixel (x, y) is 0-based (row y - 1, col x - 1)

    def distance(t: MosaicTile) -> float:
        dr = max(t.raw[0] - 0.5 - row, 0.0, row - (t.raw[0] + t.shape[0] - 0.5))
        dc = max(t.raw[1] - 0.5 - col, 0.0, col - (t.raw[1] + t.shape[1] - 0.5))
        return float(np.hypot(dr, dc))

    return min(tiles, key=distance)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def mosaic_header(header: fits.Header, geometry: Geometry) -> fits.Header:
    """``header`` with its raw-layout and WCS cards made true of the active mosaic (module docstring).

    Raw-layout cards move into HISTORY; ``DDMSECn``/``DDRSECn`` give each channel's tile and raw
    section; every WCS is shifted to be exact in the reference channel's tile (``DDWCSCH``,
    ``DDWCSSEC``), or, where its ``CRPIX`` is not a number, moved into HISTORY.

    Parameters
    ----------
    header
        The raw header (structural cards already removed); not modified.
    geometry
        The frame geometry.
    """
    hdr = header.copy()
    tiles = mosaic_tiles(geometry)
    _to_history(hdr, [c.keyword for c in hdr.cards if _RAW_LAYOUT.match(c.keyword)], "raw layout, not of the mosaic: ")
    for i, t in enumerate(tiles, start=1):
        _set_card(hdr, f"DDMSEC{i}", t.section("mosaic"), f"deepdark: tile of channel {t.channel} in this image")
        _set_card(hdr, f"DDRSEC{i}", t.section("raw"), f"deepdark: raw section of channel {t.channel}'s tile")
    _shift_wcs(hdr, tiles)
    return hdr


def _to_history(hdr: fits.Header, keys: Sequence[str], note: str) -> None:
    """Move every card of ``keys`` into HISTORY as it was written, after ``note``, in place."""
    keys = set(keys)
    for card in [c for c in hdr.cards if c.keyword in keys]:
        hdr.add_history(_ascii_text(note + str(card).strip()))
    for key in keys:
        hdr.remove(key, remove_all=True)


def _shift_wcs(hdr: fits.Header, tiles: Sequence[MosaicTile]) -> None:
    """Shift every WCS of ``hdr`` by the reference channel's tile, in place (module docstring)."""
    letters: dict[str, list[str]] = {}
    for key in dict.fromkeys(hdr.keys()):
        m = _WCS_CARD.match(key)
        if m:
            letters.setdefault(next(g for g in m.groups() if g is not None), []).append(key)
    if not letters:
        return
    usable = [a for a in sorted(letters) if all(_is_number(hdr.get(f"CRPIX{j}{a}", 0.0)) for j in (1, 2))]
    ref = _reference_tile(hdr, tiles, usable[0] if usable else "")
    dy, dx = ref.shift
    spread = max(abs(t.shift[1] - dx) for t in tiles), max(abs(t.shift[0] - dy) for t in tiles)
    shifted = []
    for letter, keys in sorted(letters.items()):
        crpix = [hdr.get(f"CRPIX{j}{letter}", 0.0) for j in (1, 2)]  # FITS: CRPIX defaults to 0
        if not all(_is_number(v) for v in crpix):
            hdr.add_history(f"WCS{letter} dropped: its CRPIX is not a number; its cards were:")
            _to_history(hdr, keys, "")
            continue
        for j, (value, shift) in enumerate(zip(crpix, (dx, dy)), start=1):
            hdr[f"CRPIX{j}{letter}"] = float(value) - shift
        shifted.append(letter or "primary")
    if shifted:
        _set_card(hdr, "DDWCSCH", _ascii_text(ref.channel), "deepdark: WCS exact in this channel's tile only")
        _set_card(hdr, "DDWCSSEC", ref.section("mosaic"), "deepdark: that tile, in this image")
        hdr.add_history(
            f"WCS ({', '.join(shifted)}): CRPIX shifted by ({-dx}, {-dy}) from the raw frame to the "
            f"mosaic, exact in channel {ref.channel}'s tile {ref.section('mosaic')} only; other tiles "
            f"are off by up to {spread[0]} columns and {spread[1]} rows (raw pixel of tile n: "
            "DDRSECn start - DDMSECn start + mosaic pixel)"
        )


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
    none), so that astropy never has to truncate it with a warning; other values take 20 characters."""
    width = len(value.replace("'", "''")) + 2 if isinstance(value, str) else 20
    room = 80 - 10 - max(width, 20) - 3
    return comment[:room] if room > 0 else ""


def _set_card(hdr: fits.Header, key: str, value, comment: str) -> None:
    """``hdr[key] = value`` with ``comment`` cut to fit the card."""
    hdr[key] = (value, _fit_comment(value, comment))


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
    hdr = mosaic_header(corrected_header(raw.header), source.geometry)
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


def frame_method(table: pd.DataFrame, method: str) -> str:
    """How this frame's dark was made: the predictions' per-frame ``method`` (``physics`` or
    ``physics+network``: a model runs its network only where it helped) when they record one,
    else the file's ``method``."""
    per_frame = sorted({str(m) for m in table.get("method", pd.Series(dtype=object)) if m})
    return "/".join(per_frame) if per_frame else method


def correct_frame(
    raw_path: str | Path,
    predictions: DarkSource,
    rows: Sequence[int],
    out_path: str | Path,
    method: str | None = None,
    provenance: dict | None = None,
    include_dark: bool = False,
    keywords: Keywords = Keywords(),
    compression: str = "RICE_1",
    quantize_level: float = QUANTIZE_LEVEL,
) -> Path:
    """Write the dark-corrected active mosaic of one raw frame to ``out_path`` (float32 FITS).

    ``rows`` are the frame's rows in ``predictions.table`` (one per channel); ``method`` defaults
    to the source's; ``provenance`` adds or overrides header keywords (``{KEY: value}``);
    ``compression`` is one of :data:`COMPRESSIONS` and ``quantize_level`` the frame's noise over
    RICE_1's quantisation step (module docstring).
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
    corrected = corrected_mosaic(raw, g, channels, darks)
    method = frame_method(t, method or predictions.attrs.get("method", "unknown"))
    hdr = _provenance_header(raw, raw_path, predictions, t, method, (status, reason), provenance, corrected.shape)
    dark = g.mosaic(dict(zip(channels, darks))).astype(np.float32, copy=False) if include_dark else None
    return _write_corrected(
        Path(out_path), corrected.astype(np.float32, copy=False), hdr, dark, method, compression, quantize_level
    )


def _write_corrected(
    out_path: Path,
    image: np.ndarray,
    header: fits.Header,
    dark: np.ndarray | None,
    method: str,
    compression: str,
    quantize_level: float,
) -> Path:
    """Write a corrected image (and the dark removed from it), compressed as asked, atomically."""
    dh = fits.Header()
    dh["BUNIT"] = ("adu", "the dark removed from the image")
    dh["DDMETHOD"] = (_ascii_text(method), "deepdark: how the dark was made")
    hdus = storage_hdus(image, header, compression, quantize_level, dark, dh)
    with atomic_path(out_path) as tmp:
        hdus.writeto(tmp, checksum=True)
    return out_path


def storage_hdus(
    image: np.ndarray,
    header: fits.Header | None = None,
    compression: str = "RICE_1",
    quantize_level: float = QUANTIZE_LEVEL,
    dark: np.ndarray | None = None,
    dark_header: fits.Header | None = None,
) -> fits.HDUList:
    """The HDUs of a corrected file, stored as ``compression`` says (module docstring): what
    ``correct`` writes (with ``checksum=True``).

    Parameters
    ----------
    image
        The corrected mosaic (float32).
    header
        Its header; the compression's cards and HISTORY are added to it (a new one when None).
    compression, quantize_level
        One of :data:`COMPRESSIONS`, and RICE_1's level.
    dark, dark_header
        The dark removed from ``image``, stored the same way as extension ``DARK``, or None.
    """
    header = fits.Header() if header is None else header
    dark_header = fits.Header() if dark_header is None else dark_header
    compression, cards = _quantization(image, compression, quantize_level)
    for key, (value, comment) in cards.items():
        _set_card(header, key, value, comment)
    step = cards["DDQSTEP"][0] if "DDQSTEP" in cards else 0.0
    if step:
        noise, level = cards["DDQNOISE"][0], cards["DDQLEVEL"][0]
        header.add_history(
            f"RICE_1, quantised with subtractive dither: step {step:.4g} ADU = noise {noise:.4g} ADU / "
            f"{level:g}; added rms step/sqrt(12) = {step / np.sqrt(12):.4g} ADU "
            f"({1 / (level * np.sqrt(12)):.3f} of the noise)"
        )
    for key in ("DDCOMPR", "DDQSTEP"):  # the dark is stored with the image's step
        if key in cards:
            _set_card(dark_header, key, *cards[key])
    return fits.HDUList(_image_hdus(image, header, dark, dark_header, compression, step))


# -- compression ---------------------------------------------------------------------------------


def frame_noise(image: np.ndarray) -> float:
    """The pixel-to-pixel noise of an image (ADU): the robust standard deviation (1.4826 MAD) of
    the differences of horizontal neighbours, over sqrt(2). Differences ignore what varies slowly
    (gradients, glow, row offsets) and the median ignores stars, hot pixels and cosmic rays;
    every fourth row is plenty (a million differences of a full-size frame). 0 for an image
    without noise; NaN where it has no finite pair.

    Parameters
    ----------
    image
        A 2-D image.
    """
    d = np.diff(np.asarray(image, dtype=np.float32)[::4], axis=1).ravel()
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan")
    return float(1.4826 * median_by_partition(np.abs(d - median_by_partition(d))) / np.sqrt(2))


def median_by_partition(values: np.ndarray, dtype=None, in_place: bool = False) -> np.generic:
    """``np.median`` of finite ``values`` taken as ``dtype`` (their own by default; float64
    gives the median of their float64 copy without making it), to the bit, from one partition
    about the upper middle (numpy's about both middles of an even count takes four times as
    long): the lower middle is the largest value below it. ``in_place``: reorder ``values`` (1-D)
    instead of a copy of them."""
    dtype = np.dtype(dtype or values.dtype).type
    k = values.size // 2
    if in_place:
        values.partition(k)
        part = values
    else:
        part = np.partition(values, k, axis=None)
    if values.size % 2:
        return dtype(part[k])
    return np.mean(np.array([part[:k].max(), part[k]], dtype=dtype))


def _check_storage(compression: str, level: float) -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r} ({', '.join(COMPRESSIONS)})")
    if not level > 0:
        raise ValueError(f"quantize level must be > 0, got {level}")


def _quantization(image: np.ndarray, compression: str, level: float) -> tuple[str, dict[str, tuple]]:
    """The compression to use for ``image`` (RICE_1 falls back to lossless GZIP_2 for an image
    without measurable noise) and its header cards: ``DDCOMPR``, and for RICE_1 the noise, the
    quantisation step and the level."""
    _check_storage(compression, level)
    if compression != "RICE_1":
        return compression, {"DDCOMPR": (compression, "deepdark: compression of the image (lossless)")}
    noise = frame_noise(image)
    if not noise > 0:  # nothing to measure a step by: keep every bit
        return "GZIP_2", {"DDCOMPR": ("GZIP_2", "deepdark: lossless, the image has no noise")}
    return compression, {
        "DDCOMPR": ("RICE_1", "deepdark: quantised, then Rice-compressed"),
        "DDQNOISE": (noise, "deepdark: pixel-to-pixel noise of the image"),
        "DDQSTEP": (noise / level, "deepdark: quantisation step, ADU"),
        "DDQLEVEL": (float(level), "deepdark: DDQNOISE / DDQSTEP"),
    }


def _image_hdus(
    image: np.ndarray,
    header: fits.Header,
    dark: np.ndarray | None,
    dark_header: fits.Header,
    compression: str,
    step: float,
) -> list[fits.hdu.base.ExtensionHDU | fits.PrimaryHDU]:
    """The HDUs of a corrected file: the image in the primary HDU (``none``), or an empty primary
    HDU and the tile-compressed image (quantised with ``step`` ADU when > 0, else lossless),
    then the dark as extension ``DARK`` stored the same way."""
    if compression == "none":
        hdus = [fits.PrimaryHDU(data=image, header=header)]
        if dark is not None:
            hdus.append(fits.ImageHDU(data=dark, header=dark_header, name="DARK"))
        return hdus
    options = dict(
        compression_type=compression,
        tile_shape=(min(TILE_ROWS, image.shape[0]), image.shape[1]),
        quantize_level=-step if step > 0 else 0.0,  # negative: the step itself, in ADU; 0: lossless
        quantize_method=_SUBTRACTIVE_DITHER_2,
        dither_seed=_DITHER_SEED_CHECKSUM,
    )
    hdus = [fits.PrimaryHDU(), fits.CompImageHDU(data=image, header=header, **options)]
    if dark is not None:
        hdus.append(fits.CompImageHDU(data=dark, header=dark_header, name="DARK", **options))
    return hdus


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
    compression: str = "RICE_1",
    quantize_level: float = QUANTIZE_LEVEL,
) -> NightResult:
    """Correct every frame of a night's predictions file (or shard, for the median methods).

    Writes ``out_dir/<stem>.fits`` per frame, ``out_dir/manifest.csv`` (file, output, status
    ``ok``/``flagged``/``failed``/``skipped``, reason, camera, imagetyp, file_hash) and the
    night's counts per status, ``out_dir/status.json``. A failed frame is logged and listed;
    the others are still corrected. ``cameras`` limits the output to those cameras. The inputs
    are opened before anything is written: a missing one leaves no folder behind. Frames are
    stored as ``compression`` says (one of :data:`COMPRESSIONS`; RICE_1 quantised to the frame's
    noise over ``quantize_level``, see the module docstring).

    A result without any corrected frame (an empty or all-unserved predictions file, every
    frame failed) raises :class:`EmptyResultError` where ``out_dir`` holds corrected frames of
    an earlier run, and leaves them as they are; with ``replace_with_empty`` it is written, and
    the earlier frames that the earlier manifest lists are removed. Otherwise the earlier frames
    that this run did not make are moved to ``out_dir/stale/UTC-TIME/`` (listed in ``status.json``).
    """
    out_dir = Path(out_dir)
    storage = _Storage(include_dark, compression, quantize_level)  # a bad option fails before any frame
    with open_darks(source, method, masters) as darks:
        out_dir.mkdir(parents=True, exist_ok=True)
        aside = _StaleFrames(out_dir)
        records = _correct_frames(darks, out_dir, method, storage, cameras, keywords, progress, aside)
    status = night_status(records)
    c = status["counts"]
    if c["ok"] + c["flagged"] == 0:
        _replace_earlier_frames(out_dir, replace_with_empty)
    made = {rec["output"] for rec in records if rec["status"] in ("ok", "flagged")}
    aside.move(name for name in aside.earlier if name not in made and (out_dir / name).is_file())
    status["stale"] = aside.moved
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


@dataclass(frozen=True)
class _Storage:
    """How a night's corrected files are stored."""

    include_dark: bool
    compression: str
    quantize_level: float

    def __post_init__(self):
        _check_storage(self.compression, self.quantize_level)


def _correct_frames(
    darks: DarkSource,
    out_dir: Path,
    method: str,
    storage: _Storage,
    cameras: Sequence[str] | None,
    keywords: Keywords,
    progress: bool,
    aside: _StaleFrames,
) -> list[dict]:
    """Correct each frame of ``darks`` into ``out_dir``; one manifest record per frame. A file of
    an earlier run made from another raw file is moved ``aside`` before its name is written."""
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
        name = _free_output_name(f, names)
        names[name] = f
        if aside.earlier.get(name, Path(f).name) != Path(f).name:
            aside.move([name])
        try:
            correct_frame(
                f,
                darks,
                rows,
                out_dir / name,
                method=darks.attrs.get("method", method),
                include_dark=storage.include_dark,
                keywords=keywords,
                compression=storage.compression,
                quantize_level=storage.quantize_level,
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


class _StaleFrames:
    """The corrected frames an earlier run wrote into a night's folder (:attr:`earlier`: file name
    -> its raw file's name, from their headers, since a workflow rerun removes the manifest
    first), and those of them this run did not make, moved into ``stale/UTC-TIME/`` (one folder a
    run: nothing is ever written over): the night's folder holds what its new manifest says."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.moved = out_dir, []
        self.earlier = {p.name: source for p in sorted(out_dir.glob("*.fits")) if (source := _made_from(p))}
        self.folder = out_dir / STALE / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")

    def move(self, names) -> None:
        now = [name for name in names if name not in self.moved]
        for name in now:
            self.folder.mkdir(parents=True, exist_ok=True)
            os.replace(self.out_dir / name, self.folder / name)
        self.moved += now
        if now:
            log.warning(
                "%s: %d frame(s) corrected by an earlier run, not by this one, moved to %s: %s",
                self.out_dir,
                len(now),
                self.folder,
                first_few(now),
            )


def _made_from(path: Path) -> str | None:
    """The raw file's name of a frame ``deepdark correct`` wrote (its ``DDSRC``), else None."""
    try:
        with fits.open(path) as hdul:
            header = next((h.header for h in hdul[:2] if "DDMETHOD" in h.header and "DDSRC" in h.header), None)
            return None if header is None else source_name(header)
    except (OSError, ValueError):  # not a FITS file astropy reads: not one of ours
        return None


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
