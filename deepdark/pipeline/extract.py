"""The ``extract`` step: a night's raw frames -> one HDF5 shard of strips plus a quarantine table."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from deepdark.io.atomic import atomic_path
from deepdark.io.frames import FrameError, Keywords, is_fits_name, read_frame
from deepdark.io.geometry import Geometry
from deepdark.io.shards import ShardWriter, prefetched, quarantine_path, write_quarantine

log = logging.getLogger(__name__)


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Night folders become their FITS files (sorted); files are kept as given, in order."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            # Every entry with a FITS name, readable or not (a dangling link, a folder named
            # x.fits, a file without read permission): those end in the quarantine with the
            # reason, instead of silently missing from the night.
            out.extend(sorted(p for p in item.iterdir() if is_fits_name(p)))
        else:
            out.append(item)
    return out


def night_of(path: Path) -> str:
    """The archive's night: the YYYYMMDD folder a file lies in ('' when it lies elsewhere)."""
    name = path.parent.name
    return name if len(name) == 8 and name.isdigit() else ""


@dataclass
class ExtractResult:
    shard: Path
    n_frames: int
    n_quarantined: int


def extract(
    inputs: Iterable[str | Path],
    out: str | Path,
    geometry: Geometry,
    keywords: Keywords = Keywords(),
    progress: bool = True,
    cameras: Sequence[str] | None = None,
) -> ExtractResult:
    """Extract the strips of every readable frame in ``inputs`` into the shard ``out``.

    With ``cameras``, frames of other cameras are left out (not quarantined: they are fine).
    Both the shard and its quarantine table appear under their final names only when complete.
    """
    files = expand_inputs(inputs)
    out = Path(out)
    quarantine: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    n_frames = 0
    with atomic_path(out) as tmp:
        with ShardWriter(tmp, geometry) as writer:
            frames = prefetched(files, lambda p: read_frame(p, geometry, keywords))
            for path, frame in tqdm(
                frames, total=len(files), desc=f"extract {out.name}", unit="frame", disable=not progress
            ):
                try:
                    frame = frame.result()
                except FrameError as exc:
                    log.warning("quarantined %s", exc)
                    quarantine.append((exc.path, exc.reason))
                    continue
                if cameras is not None and frame.info.camera not in cameras:
                    continue
                if frame.hash in seen:
                    reason = f"duplicate of {seen[frame.hash]} (same content)"
                    log.warning("quarantined %s: %s", path, reason)
                    quarantine.append((str(path), reason))
                    continue
                seen[frame.hash] = str(path)
                writer.add(frame, night_of(path))
                n_frames += 1
        # The shard is renamed last: a shard under its final name always has its quarantine table.
        write_quarantine(quarantine_path(out), quarantine)
    return ExtractResult(out, n_frames, len(quarantine))
