"""Where every region of a raw frame lies.

The layout is data (``deepdark/io/geometries/*.yaml``); this module loads and validates it and
turns a frame into per-channel views in *readout coordinates* (amplifier at local (0, 0),
overscan at the far end of each row). It imports nothing else of deepdark, does no FITS I/O and
knows nothing of torch.

A geometry file describes one or more channels (amplifiers) in one of two forms:

* *shared regions* (``channel:`` and ``regions:``): the channels tile the frame on a grid, each
  with its corner and its flips, and all of them have the same regions, given once in readout
  coordinates (the LAMOST guide cameras, one-amplifier cameras);
* *own regions*: every channel lists its flips and its own ``regions:`` in frame coordinates,
  for layouts where the parts of a channel are not adjacent (two amplifiers whose overscans both
  follow both images, as on the Kast spectrograph). All channels' regions have the same shapes
  (a shard stacks them); the channel's readout block is assembled from its regions, optical
  black first, then the active area and its overscan (:meth:`Geometry.readout`).

Only ``active`` and ``overscan`` are required. Optical black (``ob_cols`` and ``ob_rows``, both
or neither) and the other strips are optional, and so is the model ``window``: without one,
evaluations cover the whole active area, and the learned model, whose input is a square window,
refuses the geometry (:meth:`Geometry.require_window`).
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
REQUIRED_REGIONS = ("active", "overscan")
OB_REGIONS = ("ob_cols", "ob_rows")
# The regions a channel's strips are cut from; the others document the frame.
STRIP_REGIONS = ("ob_cols", "ob_rows", "active", "overscan")
# The contract lets the serial strips that precede every row run the full channel height, so the
# discarded middle row crosses them; every other pair of regions must be disjoint.
_MAY_CROSS_MIDDLE = {"prescan", "invalid", "amplifier"}


class GeometryError(DeepdarkError, ValueError):
    """A geometry file that cannot describe a real frame; the message names the field."""


@dataclass(frozen=True)
class Region:
    """A rectangle, half-open: rows [r0, r1), cols [c0, c1); in readout coordinates, except a
    channel's own regions (:attr:`Channel.frame_regions`), which are in frame coordinates."""

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
    """One readout channel: its corner in the frame and the flips that bring it to readout order.

    In the own-regions form, ``frame_regions`` holds the channel's regions in frame coordinates
    and the corner is that of its active area."""

    name: str
    row0: int
    col0: int
    flip_rows: bool
    flip_cols: bool
    frame_regions: tuple[tuple[str, Region], ...] = ()

    def layout(self) -> tuple:
        """What identifies the channel in :attr:`Geometry.digest`."""
        own = (tuple((n, dataclasses.astuple(r)) for n, r in sorted(self.frame_regions)),) if self.frame_regions else ()
        return (self.name, self.row0, self.col0, self.flip_rows, self.flip_cols, *own)


@dataclass(frozen=True)
class Geometry:
    name: str
    frame_shape: tuple[int, int]
    channel_shape: tuple[int, int]
    channels: tuple[Channel, ...]
    regions: dict[str, Region]  # readout coordinates, shared by all channels
    window_size: int | None  # None: no model window
    window_offset: int | None
    source: str = ""  # the YAML text, stored in shards and model cards verbatim

    @property
    def digest(self) -> str:
        """SHA-256 of the resolved layout: frame, channels, regions and window, not the YAML text.

        Two files that describe the same layout (other comments, key order or name) share it; any
        change of a region, channel or the window changes it. Model cards store it, so a model
        refuses data cut with an edited geometry file that kept the old name.
        """
        window = [self.window_size, self.window_offset] if self.has_window else None
        return hashlib.sha256(
            json.dumps({**self._sensor_layout(), "window": window}, sort_keys=True).encode()
        ).hexdigest()

    @property
    def sensor_digest(self) -> str:
        """SHA-256 of the layout without the model window: what master darks and physics models,
        made of whole active areas, depend on."""
        return hashlib.sha256(json.dumps(self._sensor_layout(), sort_keys=True).encode()).hexdigest()

    def _sensor_layout(self) -> dict:
        return {
            "frame_shape": list(self.frame_shape),
            "channel_shape": list(self.channel_shape),
            "channels": [c.layout() for c in self.channels],
            "regions": {k: dataclasses.astuple(r) for k, r in sorted(self.regions.items())},
        }

    # -- what the layout has ------------------------------------------------------------------
    @property
    def own_regions(self) -> bool:
        """Whether the channels list their own regions in frame coordinates."""
        return bool(self.channels[0].frame_regions)

    @property
    def has_ob(self) -> bool:
        """Whether the channels have optical-black columns and rows."""
        return all(name in self.regions for name in OB_REGIONS)

    @property
    def has_window(self) -> bool:
        return self.window_size is not None

    def require_window(self, purpose: str) -> None:
        """Raise :class:`GeometryError` unless the geometry has a model window; ``purpose`` says
        what needs it."""
        if not self.has_window:
            raise GeometryError(
                f"geometry {self.name} has no model window: {purpose} needs one"
                " (window: {size: ..., offset: ...} in the geometry file)"
            )

    # -- derived regions --------------------------------------------------------------------
    @property
    def active(self) -> Region:
        return self.regions["active"]

    @property
    def window(self) -> Region:
        """The model's square window (paper 2.3), in readout coordinates; the whole active area
        of a geometry without one."""
        if not self.has_window:
            return self.active
        a, o, s = self.active, self.window_offset, self.window_size
        return Region(a.r0 + o, a.r0 + o + s, a.c0 + o, a.c0 + o + s)

    @property
    def window_in_active(self) -> tuple[slice, slice]:
        """The window as slices of the active area (all of it without a window)."""
        if not self.has_window:
            return (slice(None), slice(None))
        o, s = self.window_offset, self.window_size
        return (slice(o, o + s), slice(o, o + s))

    @property
    def window_shape(self) -> tuple[int, int]:
        """Shape of what a window-area prediction covers: the window, else the active area."""
        return self.window.shape

    @property
    def mosaic_shape(self) -> tuple[int, int]:
        """Shape of the sensor's active mosaic: the active areas of all channels, tiled."""
        if self.own_regions:
            box = self._active_box()
            return box.shape
        nr, nc = self._tiles()
        ar, ac = self.active.shape
        return (nr * ar, nc * ac)

    # -- views --------------------------------------------------------------------------------
    def readout(self, frame: np.ndarray, channel: Channel) -> np.ndarray:
        """The channel's block of ``frame`` (…, rows, cols) flipped into readout coordinates (a
        view; in the own-regions form a copy, assembled from the channel's regions, zero
        elsewhere)."""
        if channel.frame_regions:
            block = np.zeros((*frame.shape[:-2], *self.channel_shape), dtype=frame.dtype)
            for name in STRIP_REGIONS:
                if name in self.regions:
                    block[(..., *self.regions[name].slices)] = self.region(frame, channel, name)
            return block
        rows, cols = self.channel_shape
        block = frame[..., channel.row0 : channel.row0 + rows, channel.col0 : channel.col0 + cols]
        return _flip(block, channel)

    def region(self, frame: np.ndarray, channel: Channel, name: str) -> np.ndarray:
        """Region ``name`` of the channel in ``frame`` (…, rows, cols), in readout orientation (a view)."""
        if channel.frame_regions:
            return _flip(frame[(..., *dict(channel.frame_regions)[name].slices)], channel)
        return self.readout(frame, channel)[(..., *self.regions[name].slices)]

    def frame_regions(self, channel: Channel) -> dict[str, Region]:
        """The channel's regions in frame coordinates (either form)."""
        if channel.frame_regions:
            return dict(channel.frame_regions)
        rows, cols = self.channel_shape
        out = {}
        for name, r in self.regions.items():
            r0, r1 = (rows - r.r1, rows - r.r0) if channel.flip_rows else (r.r0, r.r1)
            c0, c1 = (cols - r.c1, cols - r.c0) if channel.flip_cols else (r.c0, r.c1)
            out[name] = Region(channel.row0 + r0, channel.row0 + r1, channel.col0 + c0, channel.col0 + c1)
        return out

    def to_frame_orientation(self, readout: np.ndarray, channel: Channel) -> np.ndarray:
        """Undo :meth:`readout`'s flips on any readout-coordinate array (flips are involutions)."""
        return _flip(readout, channel)

    def mosaic_slices(self, channel: Channel) -> tuple[slice, slice]:
        """Where the channel's active area (in frame orientation) sits in the mosaic."""
        if channel.frame_regions:
            box, a = self._active_box(), dict(channel.frame_regions)["active"]
            return (slice(a.r0 - box.r0, a.r1 - box.r0), slice(a.c0 - box.c0, a.c1 - box.c0))
        ar, ac = self.active.shape
        i, j = channel.row0 // self.channel_shape[0], channel.col0 // self.channel_shape[1]
        return (slice(i * ar, (i + 1) * ar), slice(j * ac, (j + 1) * ac))

    def mosaic(self, actives: dict[str, np.ndarray]) -> np.ndarray:
        """Tile per-channel active areas given in readout coordinates into the sensor mosaic
        (in the own-regions form, pixels between the channels' active areas are zero)."""
        first = next(iter(actives.values()))
        out = (np.zeros if self.own_regions else np.empty)(self.mosaic_shape, dtype=first.dtype)
        for ch in self.channels:
            out[self.mosaic_slices(ch)] = self.to_frame_orientation(actives[ch.name], ch)
        return out

    def _tiles(self) -> tuple[int, int]:
        return (self.frame_shape[0] // self.channel_shape[0], self.frame_shape[1] // self.channel_shape[1])

    def _active_box(self) -> Region:
        """The frame-coordinate box around every channel's active area (own-regions form)."""
        act = [dict(c.frame_regions)["active"] for c in self.channels]
        return Region(min(a.r0 for a in act), max(a.r1 for a in act), min(a.c0 for a in act), max(a.c1 for a in act))

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
    """A shipped preset by name (``lamost-kaf4320``, ``mini``, ``nickel-direct``, ``kast-blue``)
    or a user's YAML file by path."""
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


def layout_mismatch(made: Geometry, data: Geometry, window: bool = False) -> str | None:
    """Why what was made for geometry ``made`` cannot serve data of geometry ``data``, or None
    when they share a sensor layout (:attr:`Geometry.sensor_digest`, whatever their names), and
    with ``window`` the model window too (a physics model predicts its own window): master darks
    are whole active areas."""
    if made.sensor_digest == data.sensor_digest and (not window or made.digest == data.digest):
        return None
    if made.name == data.name:
        what = "layout or model window" if window else "layout"
        return f"geometry {made.name!r} of another {what} than the data's (the geometry file was edited since)"
    return f"geometry {made.name!r}, the data's is {data.name!r}"


def parse_geometry(text: str, origin: str = "<text>") -> Geometry:
    """Parse and validate geometry YAML (either form); every error names the offending field."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line, as every error
        raise GeometryError(f"{origin}: not valid YAML{at}: {what}") from None
    if not isinstance(doc, dict):
        raise GeometryError(f"{origin}: expected a mapping at the top level")
    field = _Fields(doc, origin)
    frame = (field.int("frame.rows"), field.int("frame.cols"))
    n_channels = len(field.list("channels"))
    own = "regions" not in doc
    with_own = [i for i, c in enumerate(doc["channels"]) if isinstance(c, dict) and "regions" in c]
    if own and not with_own:
        raise GeometryError(f"{origin}: regions: missing (give them once, or per channel in frame coordinates)")
    if not own and with_own:
        raise GeometryError(
            f"{origin}: channels[{with_own[0]}].regions: regions are given once for all channels (top-level"
            " regions) or per channel, not both"
        )
    if own:
        chan, channels, regions = _own_layout(field, n_channels)
    else:
        chan = (field.int("channel.rows"), field.int("channel.cols"))
        channels = tuple(_channel(field, i, own=False) for i in range(n_channels))
        regions = _regions(field, "regions")
    size = offset = None
    if "window" in doc:
        size, offset = field.int("window.size"), field.int("window.offset", minimum=0)
    geom = Geometry(
        name=str(field.get("name")),
        frame_shape=frame,
        channel_shape=chan,
        channels=channels,
        regions=regions,
        window_size=size,
        window_offset=offset,
        source=text,
    )
    _validate(geom, origin)
    return geom


def _channel(field: _Fields, i: int, own: bool) -> Channel:
    at = f"channels[{i}]"
    name = str(field.get(f"{at}.name"))
    flips = field.bool(f"{at}.flip_rows"), field.bool(f"{at}.flip_cols")
    if not own:
        return Channel(name, field.int(f"{at}.row0", minimum=0), field.int(f"{at}.col0", minimum=0), *flips)
    regions = _regions(field, f"{at}.regions")
    a = regions["active"]
    return Channel(name, a.r0, a.c0, *flips, frame_regions=tuple(regions.items()))


def _regions(field: _Fields, path: str) -> dict[str, Region]:
    """The regions under ``path``, in the order of ``REGION_NAMES``; the required ones must be there."""
    node = field.get(path)
    if not isinstance(node, dict):
        raise GeometryError(f"{field.origin}: {path}: expected a mapping of regions")
    regions = {}
    for name in REGION_NAMES:
        if name in node or name in REQUIRED_REGIONS:
            r0, r1 = field.pair(f"{path}.{name}.rows")
            c0, c1 = field.pair(f"{path}.{name}.cols")
            regions[name] = Region(r0, r1, c0, c1)
    unknown = set(node) - set(REGION_NAMES)
    if unknown:
        raise GeometryError(f"{field.origin}: {path}: unknown region(s) {sorted(unknown)}")
    return regions


def _own_layout(field: _Fields, n: int) -> tuple[tuple[int, int], tuple[Channel, ...], dict[str, Region]]:
    """Channels with their own frame-coordinate regions, and the readout block they share: optical
    black columns, then the active area, then the overscan along each row; optical-black rows
    above the active area."""
    channels = tuple(_channel(field, i, own=True) for i in range(n))
    first = dict(channels[0].frame_regions)
    R, C = first["active"].shape
    n_os = first["overscan"].shape[1]
    n_obr = first["ob_rows"].shape[0] if "ob_rows" in first else 0
    n_obc = first["ob_cols"].shape[1] if "ob_cols" in first else 0
    layout = {
        "ob_cols": Region(n_obr, n_obr + R, 0, n_obc),
        "ob_rows": Region(0, n_obr, n_obc, n_obc + C),
        "active": Region(n_obr, n_obr + R, n_obc, n_obc + C),
        "overscan": Region(n_obr, n_obr + R, n_obc + C, n_obc + C + n_os),
    }
    regions = {name: layout[name] for name in REGION_NAMES if name in layout and name in first}
    return (n_obr + R, n_obc + C + n_os), channels, regions


def _validate(g: Geometry, origin: str) -> None:
    def fail(fieldname: str, why: str) -> None:
        raise GeometryError(f"{origin}: {fieldname}: {why}")

    if g.own_regions:
        _validate_own(g, fail)
    else:
        _validate_shared(g, fail)
    if sum(name in g.regions for name in OB_REGIONS) == 1:
        fail("regions", "give both optical-black strips (ob_cols and ob_rows) or neither")
    _validate_pairing(g, fail)
    if g.has_window and not g.active.contains(g.window):
        fail("window", f"a {g.window_size} window at offset {g.window_offset} leaves the active area {g.active.shape}")
    if len({c.name for c in g.channels}) != len(g.channels):
        fail("channels", "channel names must be unique")


def _validate_shared(g: Geometry, fail) -> None:
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


def _validate_own(g: Geometry, fail) -> None:
    """Regions inside the frame, no pixel in two regions (of one channel or of two), and every
    channel's regions of the first channel's names and shapes (a shard stacks them)."""
    bounds = Region(0, g.frame_shape[0], 0, g.frame_shape[1])
    first = dict(g.channels[0].frame_regions)
    placed: list[tuple[str, Region]] = []
    for i, c in enumerate(g.channels):
        own = dict(c.frame_regions)
        for name, reg in own.items():
            where = f"channels[{i}].regions.{name}"
            if reg.r1 <= reg.r0 or reg.c1 <= reg.c0:
                fail(where, f"empty or reversed range rows {reg.r0}..{reg.r1} cols {reg.c0}..{reg.c1}")
            if not bounds.contains(reg):
                fail(where, f"outside the {g.frame_shape[0]} x {g.frame_shape[1]} frame")
            for other, oreg in placed:
                if reg.overlaps(oreg):
                    fail(where, f"overlaps {other}")
            placed.append((where, reg))
        if set(own) != set(first):
            fail(f"channels[{i}].regions", f"must name the regions of channels[0] ({', '.join(first)})")
        for name, reg in own.items():
            if reg.shape != first[name].shape:
                fail(f"channels[{i}].regions.{name}", f"shape {reg.shape} is not channels[0]'s {first[name].shape}")


def _validate_pairing(g: Geometry, fail) -> None:
    """Every active row has its overscan row and its optical-black columns, every active column
    its optical-black rows: the strips are read against the active area row by row."""
    if g.own_regions:
        sets = [(f"channels[{i}].regions", dict(c.frame_regions)) for i, c in enumerate(g.channels)]
    else:
        sets = [("regions", g.regions)]
    for prefix, regs in sets:
        a = regs["active"]
        for name in ("overscan", "ob_cols"):
            if name not in regs:
                continue
            r = regs[name]
            if r.shape[0] != a.shape[0] or (not g.own_regions and (r.r0, r.r1) != (a.r0, a.r1)):
                fail(f"{prefix}.{name}", f"rows {r.r0}..{r.r1} do not pair with the active rows {a.r0}..{a.r1}")
        if "ob_rows" in regs and regs["ob_rows"].shape[1] != a.shape[1]:
            fail(f"{prefix}.ob_rows", f"{regs['ob_rows'].shape[1]} columns: the active area has {a.shape[1]}")


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
