"""Where every region of a raw guide-camera frame lies.

The layout is data (``deepdark/io/geometries/*.yaml``); this module
loads and validates it and turns a frame into per-channel views in *readout coordinates*
(amplifier at local (0, 0), overscan at the far end of each row). It imports nothing else of
deepdark, does no FITS I/O and knows nothing of torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from deepdark.io.errors import DeepdarkError

REGION_NAMES = ("prescan", "invalid", "amplifier", "ob_cols", "ob_rows", "active", "overscan", "middle")
# The contract lets the serial strips that precede every row run the full channel height, so the
# discarded middle row crosses them; every other pair of regions must be disjoint.
_MAY_CROSS_MIDDLE = {"prescan", "invalid", "amplifier"}


class GeometryError(DeepdarkError, ValueError):
    """A geometry file that cannot describe a real frame; the message names the field."""


@dataclass(frozen=True)
class Region:
    """A rectangle in readout coordinates, half-open: rows [r0, r1), cols [c0, c1)."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.r1 - self.r0, self.c1 - self.c0)

    @property
    def slices(self) -> tuple[slice, slice]:
        return (slice(self.r0, self.r1), slice(self.c0, self.c1))

    def overlaps(self, other: Region) -> bool:
        return self.r0 < other.r1 and other.r0 < self.r1 and self.c0 < other.c1 and other.c0 < self.c1

    def contains(self, other: Region) -> bool:
        return self.r0 <= other.r0 and other.r1 <= self.r1 and self.c0 <= other.c0 and other.c1 <= self.c1


@dataclass(frozen=True)
class Channel:
    """One readout channel: its corner in the frame and the flips that bring it to readout order."""

    name: str
    row0: int
    col0: int
    flip_rows: bool
    flip_cols: bool


@dataclass(frozen=True)
class Geometry:
    name: str
    frame_shape: tuple[int, int]
    channel_shape: tuple[int, int]
    channels: tuple[Channel, ...]
    regions: dict[str, Region]
    window_size: int
    window_offset: int
    source: str = ""  # the YAML text, stored in shards and model cards verbatim

    @property
    def digest(self) -> str:
        """SHA-256 of the resolved layout: frame, channels, regions and window, not the YAML text.

        Two files that describe the same layout (other comments, key order or name) share it; any
        change of a region, channel or the window changes it. Model cards store it, so a model
        refuses data cut with an edited geometry file that kept the old name.
        """
        layout = {
            "frame_shape": list(self.frame_shape),
            "channel_shape": list(self.channel_shape),
            "channels": [dataclasses.astuple(c) for c in self.channels],
            "regions": {k: dataclasses.astuple(r) for k, r in sorted(self.regions.items())},
            "window": [self.window_size, self.window_offset],
        }
        return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()

    # -- derived regions --------------------------------------------------------------------
    @property
    def active(self) -> Region:
        return self.regions["active"]

    @property
    def window(self) -> Region:
        """The model's square window (paper 2.3), in readout coordinates."""
        a, o, s = self.active, self.window_offset, self.window_size
        return Region(a.r0 + o, a.r0 + o + s, a.c0 + o, a.c0 + o + s)

    @property
    def window_in_active(self) -> tuple[slice, slice]:
        """The window as slices of the active area."""
        o, s = self.window_offset, self.window_size
        return (slice(o, o + s), slice(o, o + s))

    @property
    def mosaic_shape(self) -> tuple[int, int]:
        """Shape of the sensor's active mosaic: the active areas of all channels, tiled."""
        nr, nc = self._tiles()
        ar, ac = self.active.shape
        return (nr * ar, nc * ac)

    # -- views --------------------------------------------------------------------------------
    def readout(self, frame: np.ndarray, channel: Channel) -> np.ndarray:
        """The channel's block of ``frame`` (…, rows, cols) flipped into readout coordinates (a view)."""
        rows, cols = self.channel_shape
        block = frame[..., channel.row0 : channel.row0 + rows, channel.col0 : channel.col0 + cols]
        return _flip(block, channel)

    def to_frame_orientation(self, readout: np.ndarray, channel: Channel) -> np.ndarray:
        """Undo :meth:`readout`'s flips on any readout-coordinate array (flips are involutions)."""
        return _flip(readout, channel)

    def mosaic_slices(self, channel: Channel) -> tuple[slice, slice]:
        """Where the channel's active area (in frame orientation) sits in the mosaic."""
        ar, ac = self.active.shape
        i, j = channel.row0 // self.channel_shape[0], channel.col0 // self.channel_shape[1]
        return (slice(i * ar, (i + 1) * ar), slice(j * ac, (j + 1) * ac))

    def mosaic(self, actives: dict[str, np.ndarray]) -> np.ndarray:
        """Tile per-channel active areas given in readout coordinates into the sensor mosaic."""
        first = next(iter(actives.values()))
        out = np.empty(self.mosaic_shape, dtype=first.dtype)
        for ch in self.channels:
            out[self.mosaic_slices(ch)] = self.to_frame_orientation(actives[ch.name], ch)
        return out

    def _tiles(self) -> tuple[int, int]:
        return (self.frame_shape[0] // self.channel_shape[0], self.frame_shape[1] // self.channel_shape[1])

    def channel_names(self) -> list[str]:
        return [c.name for c in self.channels]


def _flip(a: np.ndarray, channel: Channel) -> np.ndarray:
    if channel.flip_rows:
        a = a[..., ::-1, :]
    if channel.flip_cols:
        a = a[..., :, ::-1]
    return a


# -- loading ---------------------------------------------------------------------------------


DEFAULT_GEOMETRY = "lamost-kaf4320"  # the LAMOST guide cameras' layout: what a geometry defaults to


def presets() -> list[str]:
    """Names of the geometries shipped with the package."""
    return sorted(p.name[:-5] for p in resources.files("deepdark.io.geometries").iterdir() if p.name.endswith(".yaml"))


def load_geometry(name_or_path: str | Path) -> Geometry:
    """A shipped preset by name (``lamost-kaf4320``, ``mini``) or a user's YAML file by path."""
    text = _geometry_text(str(name_or_path))
    return parse_geometry(text, origin=str(name_or_path))


def _geometry_text(name_or_path: str) -> str:
    shipped = resources.files("deepdark.io.geometries") / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped.read_text()
    path = Path(name_or_path)
    if path.is_file():
        return path.read_text()
    raise GeometryError(f"geometry {name_or_path!r}: neither a preset ({', '.join(presets())}) nor a readable file")


def parse_geometry(text: str, origin: str = "<text>") -> Geometry:
    """Parse and validate geometry YAML; every error names the offending field."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GeometryError(f"{origin}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise GeometryError(f"{origin}: expected a mapping at the top level")
    field = _Fields(doc, origin)
    frame = (field.int("frame.rows"), field.int("frame.cols"))
    chan = (field.int("channel.rows"), field.int("channel.cols"))
    channels = tuple(
        Channel(
            name=str(field.get(f"channels[{i}].name")),
            row0=field.int(f"channels[{i}].row0", minimum=0),
            col0=field.int(f"channels[{i}].col0", minimum=0),
            flip_rows=field.bool(f"channels[{i}].flip_rows"),
            flip_cols=field.bool(f"channels[{i}].flip_cols"),
        )
        for i in range(len(field.list("channels")))
    )
    regions = {}
    for name in REGION_NAMES:
        r0, r1 = field.pair(f"regions.{name}.rows")
        c0, c1 = field.pair(f"regions.{name}.cols")
        regions[name] = Region(r0, r1, c0, c1)
    unknown = set(field.get("regions")) - set(REGION_NAMES)
    if unknown:
        raise GeometryError(f"{origin}: regions: unknown region(s) {sorted(unknown)}")
    geom = Geometry(
        name=str(field.get("name")),
        frame_shape=frame,
        channel_shape=chan,
        channels=channels,
        regions=regions,
        window_size=field.int("window.size"),
        window_offset=field.int("window.offset", minimum=0),
        source=text,
    )
    _validate(geom, origin)
    return geom


def _validate(g: Geometry, origin: str) -> None:
    def fail(fieldname: str, why: str) -> None:
        raise GeometryError(f"{origin}: {fieldname}: {why}")

    bounds = Region(0, g.channel_shape[0], 0, g.channel_shape[1])
    for name, reg in g.regions.items():
        if reg.r1 <= reg.r0 or reg.c1 <= reg.c0:
            fail(f"regions.{name}", f"empty or reversed range rows {reg.r0}..{reg.r1} cols {reg.c0}..{reg.c1}")
        if not bounds.contains(reg):
            fail(f"regions.{name}", f"outside the {g.channel_shape[0]} x {g.channel_shape[1]} channel")
    names = list(g.regions)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if {a, b} & {"middle"} and {a, b} & _MAY_CROSS_MIDDLE:
                continue
            if g.regions[a].overlaps(g.regions[b]):
                fail(f"regions.{b}", f"overlaps regions.{a}")
    if not g.active.contains(g.window):
        fail("window", f"a {g.window_size} window at offset {g.window_offset} leaves the active area {g.active.shape}")
    if len({c.name for c in g.channels}) != len(g.channels):
        fail("channels", "channel names must be unique")
    # Channels must tile the frame exactly: each on the channel grid, every tile used once.
    nr, nc = g.frame_shape[0] // g.channel_shape[0], g.frame_shape[1] // g.channel_shape[1]
    if (nr * g.channel_shape[0], nc * g.channel_shape[1]) != g.frame_shape:
        fail("channel", f"{g.channel_shape} does not divide the frame {g.frame_shape}")
    tiles = set()
    for i, c in enumerate(g.channels):
        if c.row0 % g.channel_shape[0] or c.col0 % g.channel_shape[1]:
            fail(f"channels[{i}]", f"corner ({c.row0}, {c.col0}) is not on the channel grid")
        tiles.add((c.row0 // g.channel_shape[0], c.col0 // g.channel_shape[1]))
        if c.row0 + g.channel_shape[0] > g.frame_shape[0] or c.col0 + g.channel_shape[1] > g.frame_shape[1]:
            fail(f"channels[{i}]", "extends outside the frame")
    if len(tiles) != len(g.channels) or len(tiles) != nr * nc:
        fail("channels", f"the channels do not tile the {g.frame_shape[0]} x {g.frame_shape[1]} frame")


class _Fields:
    """Dotted-path access into the YAML document, with errors that name the path."""

    def __init__(self, doc: dict, origin: str):
        self.doc, self.origin = doc, origin

    def get(self, path: str):
        node = self.doc
        for part in path.replace("[", ".[").split("."):
            try:
                node = node[int(part[1:-1])] if part.startswith("[") else node[part]
            except (KeyError, IndexError, TypeError):
                raise GeometryError(f"{self.origin}: {path}: missing") from None
        return node

    def int(self, path: str, minimum: int = 1) -> int:
        v = self.get(path)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise GeometryError(f"{self.origin}: {path}: expected an integer >= {minimum}, got {v!r}")
        return v

    def bool(self, path: str) -> bool:
        v = self.get(path)
        if not isinstance(v, bool):
            raise GeometryError(f"{self.origin}: {path}: expected true or false, got {v!r}")
        return v

    def list(self, path: str) -> list:
        v = self.get(path)
        if not isinstance(v, list) or not v:
            raise GeometryError(f"{self.origin}: {path}: expected a non-empty list")
        return v

    def pair(self, path: str) -> tuple[int, int]:
        v = self.get(path)
        if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
            raise GeometryError(f"{self.origin}: {path}: expected [start, stop], got {v!r}")
        return (v[0], v[1])
