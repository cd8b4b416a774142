"""Read, validate and write raw guide-camera frames (FITS, BITPIX=16, BZERO=32768).

A frame is read from ``.fits``, ``.fit`` or ``.fts``, each also gzip-compressed (``.gz``) or
tile-compressed as fpack writes it (``.fz``: an empty primary HDU, the image in HDU 1).

Every way a file can be unfit (unreadable, truncated, wrong shape, float pixels, missing,
unparsable or nonsensical header values) raises :class:`FrameError` carrying the path and a
one-line reason (naming the keyword and its value where a header value is at fault), so that
callers can quarantine it and carry on with the rest of the night.
"""

from __future__ import annotations

import gzip
import io
import math
import warnings
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import xxhash
from astropy.io import fits
from astropy.io.fits.verify import VerifyError, VerifyWarning

from deepdark.io.atomic import atomic_path
from deepdark.io.errors import FrameError  # raised here; callers import it from either module
from deepdark.io.geometry import Geometry
from deepdark.io.units import SATURATED

# Names of raw frames, lower case: each FITS name plain, gzip-compressed or tile-compressed.
FITS_SUFFIXES = tuple(base + packed for packed in ("", ".gz", ".fz") for base in (".fits", ".fit", ".fts"))
IMAGE_TYPES = ("DARK", "BIAS", "OBJECT", "FLAT")
_BLOCK = 2880  # FITS record size
# A frame with more than this share of saturated pixels carries no usable dark signal.
MAX_SATURATED_FRACTION = 0.5
# Simulated archives record, per channel, the RMS (ADU) of the frame minus its noise-free
# expected dark inside the model window: the noise floor no predictor can beat.
FLOOR_KEY = "DDFLOOR{}"


UNKNOWN_CAMERA = "unknown"  # the camera of a frame whose header names none


@dataclass(frozen=True)
class Keywords:
    """Header keyword names; configurable because camera software differs between eras."""

    imagetyp: str = "IMAGETYP"
    exptime: str = "EXPTIME"
    ccdtemp: str = "CCDTEMP"
    settemp: str = "SETTEMP"
    date_obs: str = "DATE-OBS"
    camera: str = "CAMERA"


@dataclass
class FrameInfo:
    """The header facts the project needs, validated."""

    imagetyp: str
    exptime: float
    ccdtemp: float
    settemp: float  # NaN when the header has none
    date_obs: str
    camera: str
    floor: dict[str, float] = field(default_factory=dict)  # per channel, simulated archives only


@dataclass
class RawFrame:
    path: Path
    data: np.ndarray  # uint16, shape geometry.frame_shape
    header: fits.Header
    info: FrameInfo
    hash: str  # xxh3-128 of the file's bytes as stored (compressed or not)
    frame_hash: str  # xxh3-128 of pixels and header facts: the same under any name or compression


def is_fits_name(path: str | Path) -> bool:
    return str(path).lower().endswith(FITS_SUFFIXES)


def read_frame(path: str | Path, geometry: Geometry, keywords: Keywords = Keywords()) -> RawFrame:
    """Read one raw frame, validate it against ``geometry``, and hash it.

    The file is read once: the same bytes are hashed (xxh3-128, ``hash``) and parsed; the pixels
    and header facts are hashed too (``frame_hash``, see :func:`frame_hash`).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FrameError(path, f"cannot read: {exc.strerror or exc}") from None
    if not raw:
        raise FrameError(path, "empty file")
    digest = xxhash.xxh3_128_hexdigest(raw)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
            raise FrameError(path, f"corrupt gzip: {exc}") from None
    if not raw.startswith(b"SIMPLE  ="):
        raise FrameError(path, "not a FITS file (no SIMPLE card)")
    try:
        header, data_start = _primary_header(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FrameError(path, f"unreadable FITS header: {exc}") from None
    try:
        header, data = _decode(raw, header, data_start, geometry, path)
        info = parse_header(header, keywords, path, geometry)
    except VerifyError as exc:  # a card that astropy, not _card, read and could not parse
        raise FrameError(path, f"unreadable FITS header: {exc}") from None
    return RawFrame(path=path, data=data, header=header, info=info, hash=digest, frame_hash=frame_hash(data, info))


def frame_hash(data: np.ndarray, info: FrameInfo) -> str:
    """xxh3-128 of a frame's pixels and header facts (type, exposure, temperatures, date, camera).

    The same exposure gives the same hash whatever its file name, its compression (none, gzip,
    tile compression) or the layout of its header, so that copies are found in one night and
    across nights; the file's own hash (``RawFrame.hash``) tells whether the file changed.
    """
    h = xxhash.xxh3_128()
    h.update(np.ascontiguousarray(data, dtype="<u2"))
    facts = (data.shape, info.imagetyp, info.exptime, info.ccdtemp, info.settemp, info.date_obs, info.camera)
    h.update(repr(facts).encode())
    return h.hexdigest()


def _decode(
    raw: bytes, header: fits.Header, data_start: int, geometry: Geometry, path: Path
) -> tuple[fits.Header, np.ndarray]:
    """The header that describes the pixels, and the pixels (uint16) checked against ``geometry``.

    A primary HDU without data whose HDU 1 is a tile-compressed image (fpack's layout) gives that
    image and its header; any other file gives its primary HDU.
    """
    packed = _tile_compressed(raw, path) if _card(header, "NAXIS", path) == 0 else None
    if packed is not None:
        header, data = packed
        _check_layout(header, geometry, None, path)
        data = _as_adu(data, path)
    else:
        _check_layout(header, geometry, len(raw) - data_start, path)
        data = _pixels(raw, header, data_start, geometry.frame_shape, path)
    if np.count_nonzero(data == SATURATED) > MAX_SATURATED_FRACTION * data.size:
        raise FrameError(path, "more than half the pixels are saturated")
    return header, data


def _tile_compressed(raw: bytes, path: Path) -> tuple[fits.Header, np.ndarray] | None:
    """Header and pixels of the tile-compressed image in HDU 1; None when HDU 1 is not one."""
    try:
        with fits.open(io.BytesIO(raw), memmap=False) as hdul:
            if len(hdul) < 2 or not isinstance(hdul[1], fits.CompImageHDU):
                return None
            return hdul[1].header.copy(), hdul[1].data
    except Exception as exc:  # astropy raises many types for broken files; the reason is what counts
        raise FrameError(path, f"unreadable tile-compressed image: {type(exc).__name__}: {exc}") from None


def _primary_header(raw: bytes) -> tuple[fits.Header, int]:
    """The primary header and the offset of its data (FITS headers are 2880-byte blocks).

    A byte outside ASCII (``OBSERVER= 'Müller'``, against the standard but common) is read as
    Latin-1 (astropy, reading a compressed file's header, makes it ``?``): the frame is used, its
    card refused only where deepdark needs its value (:func:`_card`) and kept as HISTORY text in
    the corrected frame."""
    for block in range(0, len(raw), _BLOCK):
        for card in range(block, block + _BLOCK, 80):
            if raw[card : card + 8] == b"END     ":
                end = block + _BLOCK
                return fits.Header.fromstring(raw[:end].decode("latin-1")), end
    raise ValueError("no END card")


def _card(header: fits.Header, key: str, path: str | Path):
    """The value of ``key`` (None when absent), or a :class:`FrameError` naming the keyword and
    its text when the card holds no valid FITS value (``NaN``, ``1.0.0``)."""
    if key not in header:
        return None
    # A keyword given twice is read from its first card, as astropy reads it: real headers
    # repeat some with other values (Lick's Kast writes OBSTYPE = 'DARK', then OBSTYPE = 0).
    card = header.cards[key]
    try:
        return card.value
    except VerifyError:
        with warnings.catch_warnings():  # reading the image makes astropy rewrite the value as text, loudly
            warnings.simplefilter("ignore", VerifyWarning)
            text = card.image[10:].strip().strip("'").strip()[:40]
        raise FrameError(path, f"header keyword {key}={text} is not a valid FITS value") from None


def _check_layout(header: fits.Header, geometry: Geometry, nbytes: int | None, path: Path) -> None:
    """Integer pixels of the geometry's shape; with ``nbytes`` (bytes after the header), all there."""
    bitpix = _card(header, "BITPIX", path)
    if isinstance(bitpix, bool) or bitpix not in (8, 16, 32, 64):
        raise FrameError(path, f"pixels are not integer ADU (BITPIX={bitpix})")
    naxis = _card(header, "NAXIS", path)
    if naxis == 0 and not isinstance(naxis, bool):
        raise FrameError(path, "no image in the primary HDU (NAXIS = 0) nor a tile-compressed one in HDU 1")
    axes = [_card(header, f"NAXIS{i}", path) for i in range(1, naxis + 1)] if isinstance(naxis, int) else []
    shape = (axes[1], axes[0]) if naxis == 2 else None
    if shape != tuple(geometry.frame_shape):
        got = "x".join(str(n) for n in axes) or "no data"
        want = f"{geometry.frame_shape[1]}x{geometry.frame_shape[0]}"
        raise FrameError(path, f"shape (NAXIS1xNAXIS2) {got} does not match geometry {geometry.name} ({want})")
    need = geometry.frame_shape[0] * geometry.frame_shape[1] * abs(bitpix) // 8
    if nbytes is not None and nbytes < need:
        raise FrameError(path, f"truncated: {nbytes} bytes of pixel data, the header promises {need}")


def _pixels(raw: bytes, header: fits.Header, start: int, shape: tuple[int, int], path: Path) -> np.ndarray:
    """Pixel data as uint16 ADU.

    The archive's own convention (BITPIX=16, BZERO=32768, BSCALE=1) is decoded here in one
    vectorised pass (flipping the sign bit of big-endian int16 is adding 32768), about 5x faster
    than astropy's general scaling path, which every other integer layout still takes.
    """
    bitpix, bzero, bscale = _card(header, "BITPIX", path), _card(header, "BZERO", path), _card(header, "BSCALE", path)
    if bitpix == 16 and bzero == 32768 and bscale in (1, None):
        n = shape[0] * shape[1]
        return np.frombuffer(raw, dtype=">u2", count=n, offset=start).reshape(shape) ^ np.uint16(0x8000)
    try:
        with fits.open(io.BytesIO(raw), memmap=False) as hdul:
            data = hdul[0].data
    except Exception as exc:  # astropy raises many types for broken files; the reason is what counts
        raise FrameError(path, f"unreadable FITS data: {type(exc).__name__}: {exc}") from None
    return _as_adu(data, path)


def _as_adu(data: np.ndarray | None, path: Path) -> np.ndarray:
    if data is None:
        raise FrameError(path, "no pixel data")
    if not np.issubdtype(data.dtype, np.integer):
        # BSCALE/BZERO other than the unsigned-16 convention give floats: not raw ADU.
        raise FrameError(path, f"pixels are not integer ADU (dtype {data.dtype})")
    if data.dtype != np.uint16:
        if data.min() < 0 or data.max() > SATURATED:
            raise FrameError(path, "pixel values outside the 16-bit ADU range")
        data = data.astype(np.uint16)
    return data


def parse_header(header: fits.Header, kw: Keywords, path: str | Path, geometry: Geometry | None = None) -> FrameInfo:
    """The header facts of a frame, validated: a :class:`FrameError` naming the keyword and its
    value for a value that is missing, unparsable, of the wrong FITS type (a logical where a
    number or text belongs, text such as ``'30 s'`` where a number belongs) or out of range.

    A dark of zero seconds is a bias readout (cameras that name every closed-shutter frame DARK
    write them so), and a zero-second readout needs no temperature: without the temperature card
    its ``ccdtemp`` is NaN. Every other frame must carry one."""
    imagetyp = str(_text(_required(header, kw.imagetyp, path), kw.imagetyp, path)).strip().upper()
    if imagetyp not in IMAGE_TYPES:
        raise FrameError(path, f"header keyword {kw.imagetyp}={imagetyp!r} is not one of {', '.join(IMAGE_TYPES)}")
    exptime = _number(_required(header, kw.exptime, path), kw.exptime, path)
    if exptime <= 0 and imagetyp != "BIAS" and not (exptime == 0 and imagetyp == "DARK"):
        raise FrameError(path, f"header keyword {kw.exptime}={exptime} must be > 0")
    if imagetyp == "BIAS" or exptime == 0:
        ccdtemp = _number(_card(header, kw.ccdtemp, path), kw.ccdtemp, path) if kw.ccdtemp in header else math.nan
    else:
        ccdtemp = _number(_required(header, kw.ccdtemp, path), kw.ccdtemp, path)
    if not -150.0 <= ccdtemp <= 60.0 and not math.isnan(ccdtemp):
        raise FrameError(path, f"header keyword {kw.ccdtemp}={ccdtemp} is not a sensor temperature in deg C")
    settemp = _number(_card(header, kw.settemp, path), kw.settemp, path) if kw.settemp in header else math.nan
    date_obs = _required(header, kw.date_obs, path)
    if not isinstance(date_obs, str):  # 20240101 as a number is no FITS date
        raise FrameError(path, f"header keyword {kw.date_obs}={date_obs!r} is not text (an ISO-8601 date)")
    date_obs = date_obs.strip()
    try:
        datetime.fromisoformat(date_obs.replace("Z", "+00:00"))
    except ValueError:
        raise FrameError(path, f"header keyword {kw.date_obs}={date_obs!r} is not an ISO-8601 date") from None
    camera = _text(_card(header, kw.camera, path), kw.camera, path) if kw.camera in header else ""
    camera = str(camera).strip() or UNKNOWN_CAMERA
    floor = {}
    if geometry is not None:
        for ch in geometry.channel_names():
            key = FLOOR_KEY.format(ch)
            if key in header:
                floor[ch] = _number(_card(header, key, path), key, path)
    return FrameInfo(imagetyp, exptime, ccdtemp, settemp, date_obs, camera, floor)


def _required(header: fits.Header, key: str, path: str | Path):
    value = _card(header, key, path)
    if value is None or str(value).strip() == "":
        raise FrameError(path, f"header keyword {key} missing")
    return value


def _number(value, key: str, path: str | Path) -> float:
    """A finite number; a number written as text (``'30'``) is accepted, units (``'30 s'``) are not."""
    if isinstance(value, (bool, np.bool_)):  # float(True) would be 1.0
        raise FrameError(path, f"header keyword {key}={value!r} is a logical, not a number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise FrameError(path, f"header keyword {key}={value!r} is not a number") from None
    if not math.isfinite(x):
        raise FrameError(path, f"header keyword {key}={value!r} is not finite")
    return x


def _text(value, key: str, path: str | Path):
    """``value`` unless it is a logical (``T``, ``F``), which no text keyword can mean."""
    if isinstance(value, (bool, np.bool_)):
        raise FrameError(path, f"header keyword {key}={value!r} is a logical, not text")
    return value


def write_raw_frame(path: str | Path, data: np.ndarray, header: fits.Header | dict) -> None:
    """Write ``data`` (uint16) as a raw frame in the archive's convention, atomically.

    ``.fits.gz`` names are gzip-compressed.
    """
    if data.dtype != np.uint16:
        raise TypeError(f"raw frames are uint16, got {data.dtype}")
    hdu = fits.PrimaryHDU(data=data, header=fits.Header(header) if isinstance(header, dict) else header)
    # astropy writes uint16 as BITPIX=16 with BZERO=32768, the archive's unsigned-16 convention.
    buf = io.BytesIO()
    hdu.writeto(buf)
    payload = buf.getvalue()
    if str(path).lower().endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=1, mtime=0)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(payload)
