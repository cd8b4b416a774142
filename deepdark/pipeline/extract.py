"""The ``extract`` step: a night's raw frames -> one HDF5 shard of strips, plus the night's census.

Every file of a night folder ends in exactly one place: the shard; the quarantine table (frames
that cannot be used, repeats of a frame already in the shard), or the table of ignored files
(files without a FITS name, frames of cameras not asked for), each with its reason. Both tables
lie beside the shard (see ``deepdark.io.shards``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from deepdark.io.atomic import atomic_path
from deepdark.io.errors import MissingInputError
from deepdark.io.frames import FrameError, Keywords, RawFrame, is_fits_name, read_frame
from deepdark.io.geometry import Geometry
from deepdark.io.shards import (
    ShardWriter,
    ignored_path,
    prefetched,
    quarantine_path,
    write_ignored,
    write_quarantine,
)

log = logging.getLogger(__name__)

NOT_A_FITS_NAME = "not a FITS file name (.fits, .fit or .fts, optionally .gz or .fz)"


@dataclass
class Census:
    """Where the files of an extraction went, besides the shard: (path, reason) rows."""

    quarantined: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)


def survey_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files to read and the (path, reason) of those left aside.

    A night folder gives its entries with FITS names, sorted, readable or not (a dangling link, a
    folder named x.fits, a file without read permission: those end in the quarantine with the
    reason); every other entry is left aside with its reason. Files are kept as given, in order.
    A path that does not exist raises :class:`MissingInputError`: a mistyped night must not pass
    for an empty one.
    """
    files: list[Path] = []
    ignored: list[tuple[str, str]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            for entry in sorted(item.iterdir()):
                if is_fits_name(entry):
                    files.append(entry)
                elif entry.is_dir():
                    ignored.append((str(entry), f"{NOT_A_FITS_NAME}: a folder (sub-folders are not read)"))
                else:
                    ignored.append((str(entry), NOT_A_FITS_NAME))
        elif item.exists():
            files.append(item)
        else:
            raise MissingInputError(f"{item}: does not exist (no such night folder or file)")
    return files, ignored


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """The files :func:`survey_inputs` would read."""
    return survey_inputs(inputs)[0]


def night_of(path: Path) -> str:
    """The archive's night: the YYYYMMDD folder a file lies in ('' when it lies elsewhere)."""
    name = path.parent.name
    return name if len(name) == 8 and name.isdigit() else ""


@dataclass
class ExtractResult:
    shard: Path
    n_frames: int
    n_quarantined: int
    n_ignored: int = 0


def extract(
    inputs: Iterable[str | Path],
    out: str | Path,
    geometry: Geometry,
    keywords: Keywords = Keywords(),
    progress: bool = True,
    cameras: Sequence[str] | None = None,
) -> ExtractResult:
    """Extract the strips of every readable frame in ``inputs`` into the shard ``out``.

    Frames that cannot be used, and repeats of a frame already taken (the same pixels and header
    facts under another name or compression), go to the quarantine table; files without a FITS
    name and, with ``cameras``, frames of other cameras go to the table of ignored files. The
    shard and both tables appear under their final names only when complete.
    """
    files, ignored = survey_inputs(inputs)
    out = Path(out)
    census = Census(ignored=ignored)
    seen: dict[str, str] = {}  # frame hash -> the file that gave it
    n_frames = 0
    with atomic_path(out) as tmp:
        with ShardWriter(tmp, geometry) as writer:
            frames = prefetched(files, lambda p: read_frame(p, geometry, keywords))
            bar = tqdm(
                frames, total=len(files), desc=f"extract {out.name}", unit="frame", disable=None if progress else True
            )
            for path, future in bar:
                frame = _take(path, future, cameras, seen, census)
                if frame is not None:
                    writer.add(frame, night_of(path))
                    n_frames += 1
        # The shard is renamed last: a shard under its final name always has both tables.
        write_quarantine(quarantine_path(out), census.quarantined)
        write_ignored(ignored_path(out), sorted(census.ignored))
    if not n_frames:
        log.warning("%s: no frames (%d quarantined, %d ignored)", out, len(census.quarantined), len(census.ignored))
    return ExtractResult(out, n_frames, len(census.quarantined), len(census.ignored))


def _take(
    path: Path, future: Future, cameras: Sequence[str] | None, seen: dict[str, str], census: Census
) -> RawFrame | None:
    """The frame read from ``path`` if it belongs in the shard; otherwise None, and its row in
    the census."""
    try:
        frame = future.result()
    except FrameError as exc:
        log.warning("quarantined %s", exc)
        census.quarantined.append((exc.path, exc.reason))
        return None
    except Exception as exc:  # a bug, not a bad frame: fail, but say which file showed it
        raise RuntimeError(f"{path}: unexpected {type(exc).__name__} while reading the frame: {exc}") from exc
    if cameras is not None and frame.info.camera not in cameras:
        census.ignored.append((str(path), f"other camera {frame.info.camera} (not in --cameras {' '.join(cameras)})"))
        return None
    if frame.frame_hash in seen:
        reason = f"duplicate of {seen[frame.frame_hash]} (same pixels and header values)"
        log.warning("quarantined %s: %s", path, reason)
        census.quarantined.append((str(path), reason))
        return None
    seen[frame.frame_hash] = str(path)
    return frame
