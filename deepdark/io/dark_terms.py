"""A physics dark as the terms it is summed from: the arithmetic of the prediction, in one place.

The physics model predicts the dark of a frame-channel as a few whole-channel maps of its
camera-channel, summed with weights of that frame, plus that frame's row bias:

    dark = min(maps[-1] + sum_k scales[k] * maps[k], hot pixels set to their own values, + bias per row, SATURATED)

(float32, in that order). The maps (K + 1 of them, ``(K + 1, rows, cols)``, and the hot pixels'
flat indices) belong to the camera-channel; the ``scales`` (K), ``hot`` values and ``bias``
(one per active row) to the frame. :func:`dark_of_terms` is that sum: the physics model predicts
with it, and a predictions file that keeps a row as its terms rebuilds the same float32 dark with
it, to the bit (the same operations on the same float32 values), at the cost of a few passes over
the channel, instead of storing, compressing and reading back its four megabytes of pixels.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from deepdark.io.errors import CorruptFileError
from deepdark.io.units import SATURATED


@dataclass(frozen=True)
class ChannelMaps:
    """The maps a camera-channel's darks are summed from: ``maps`` (K + 1, rows, cols) float32,
    the constant one last, and the hot pixels' flat indices ``hot_index`` (n,)."""

    maps: np.ndarray
    hot_index: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.maps.nbytes + self.hot_index.nbytes


@dataclass
class DarkTerms:
    """The terms of k predicted darks: row i is summed from ``maps[key[i]]`` with ``scales[i]``
    (K,), ``hot[i]`` (one value per hot pixel of its maps) and ``bias[i]`` (one per active row),
    all float32; ``key[i]`` is None for a row that has no terms (its dark is kept as pixels)."""

    key: np.ndarray  # (k,) object: (camera, channel), or None
    scales: list[np.ndarray]
    hot: list[np.ndarray]
    bias: list[np.ndarray]
    maps: dict[tuple[str, str], ChannelMaps]

    def __len__(self) -> int:
        return len(self.key)

    def dark(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Row ``i``'s dark (:func:`dark_of_terms`)."""
        return dark_of_terms(self.maps[self.key[i]], self.scales[i], self.hot[i], self.bias[i], out)

    def check(self, k: int, shape: tuple[int, int], unserved: np.ndarray) -> None:
        """A ValueError unless these are the terms of ``k`` rows of darks of ``shape``, none of
        them an ``unserved`` one, each with a weight per component map and a value per hot pixel."""
        if len(self.key) != k:
            raise ValueError(f"predictor returned terms of {len(self.key)} rows for {k}")
        for i in np.flatnonzero(self.rows):
            maps = self.maps.get(self.key[i])
            if maps is None or maps.maps.ndim != 3 or maps.maps.shape[1:] != tuple(shape):
                raise ValueError(f"predictor returned terms of row {i} without maps of shape {tuple(shape)}")
            if unserved[i]:
                raise ValueError(f"predictor returned terms for row {i}, which it did not serve")
            sizes = (np.size(self.scales[i]), np.size(self.hot[i]), np.shape(self.bias[i]))
            if sizes != (maps.maps.shape[0] - 1, maps.hot_index.size, (shape[0],)):
                raise ValueError(f"predictor returned terms of row {i} that do not fit its maps: {sizes}")

    @property
    def rows(self) -> np.ndarray:
        """(k,) bool: the rows that have terms."""
        return np.array([k is not None for k in self.key], dtype=bool)

    def only(self, rows: np.ndarray) -> DarkTerms:
        """The same terms with every row outside boolean ``rows`` marked as having none."""
        key = self.key.copy()
        key[~np.asarray(rows, dtype=bool)] = None
        return DarkTerms(key, self.scales, self.hot, self.bias, self.maps)

    def spread(self, at: np.ndarray) -> DarkTerms:
        """These terms at the True positions of boolean ``at`` (one per row of these terms),
        the other positions without terms."""
        at = np.asarray(at, dtype=bool)
        key = np.full(len(at), None, dtype=object)
        scales, hot, bias = ([None] * len(at) for _ in range(3))
        for j, i in enumerate(np.flatnonzero(at)):
            key[i], scales[i], hot[i], bias[i] = self.key[j], self.scales[j], self.hot[j], self.bias[j]
        return DarkTerms(key, scales, hot, bias, self.maps)


def dark_of_terms(
    maps: ChannelMaps, scales: np.ndarray, hot: np.ndarray, bias: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """The dark (float32, rows x cols) summed from its terms (module docstring), into ``out`` when given.

    Parameters
    ----------
    maps
        The camera-channel's maps and hot pixels.
    scales
        (K,) float32: each component map's weight (exposure time times its law's factor).
    hot
        (n,) float32: each hot pixel's signal, in the order of ``maps.hot_index``.
    bias
        (rows,) float32: each active row's bias.
    """
    m, scales = maps.maps, np.asarray(scales, dtype=np.float32)
    out = np.empty(m.shape[1:], np.float32) if out is None else out
    if len(scales):  # the first product in ``out``, then the constant map added: a + b is b + a, to the bit
        np.multiply(m[0], scales[0], out=out)
        out += m[-1]
    else:
        np.copyto(out, m[-1])
    product = np.empty_like(out) if len(scales) > 1 else None  # a second component's product
    for k in range(1, len(scales)):
        out += np.multiply(m[k], scales[k], out=product)
    out[np.unravel_index(maps.hot_index, out.shape)] = np.asarray(hot, dtype=np.float32)  # any layout of ``out``
    out += np.asarray(bias, dtype=np.float32)[:, None]
    # np.minimum(out, SATURATED), in a sixth of its time: the few pixels above set, NaN left NaN
    over = out > np.float32(SATURATED)
    if over.any():
        out[over] = np.float32(SATURATED)
    return out


# -- in a predictions file ---------------------------------------------------------------------
#
# Group ``terms/`` of a predictions file: ``row_maps`` (N,) int32, the map set of each row (-1:
# the row's dark is kept as pixels); ``bias`` (N, rows) float32; ``values`` float32, each row's
# scales then hot values, row i's from ``start[i]`` to ``start[i + 1]`` ((N + 1,) int64); and one
# group per map set, ``maps/<j>`` with datasets ``maps`` and ``hot_index`` and the attributes
# ``camera`` and ``channel``. The row hashes of the predictions file are those of the darks
# summed from the terms, so any damage to them is found as a damaged row.

BIAS_CHUNK_ROWS = 64  # rows of ``terms/bias`` per chunk (256 KB of a KAF-4320 channel)
VALUES_CHUNK = 2**12  # values of ``terms/values`` per chunk (a few rows' weights and hot pixels)


class TermsWriter:
    """Writes the terms of a predictions file's rows into its group ``terms``, batch by batch."""

    def __init__(self, f: h5py.File, n: int, shape: tuple[int, int], compression: dict):
        self.group = f.create_group("terms")
        self.compression = compression
        chunked = n > 0  # HDF5 cannot chunk nothing
        self.row_maps = self.group.create_dataset("row_maps", shape=(n,), dtype=np.int32, fillvalue=-1)
        self.bias = self.group.create_dataset(
            "bias",
            shape=(n, shape[0]),
            dtype=np.float32,
            chunks=(min(n, BIAS_CHUNK_ROWS), shape[0]) if chunked else None,
        )
        self.values = self.group.create_dataset(
            "values", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(VALUES_CHUNK,)
        )
        self.start = np.zeros(n + 1, np.int64)
        self.sets: dict[tuple, int] = {}

    def add(self, first: int, k: int, terms: DarkTerms | None) -> None:
        """Rows ``first`` to ``first + k - 1``: the terms of those ``terms`` gives (None: none)."""
        values = []
        for i in range(k):
            key = None if terms is None else terms.key[i]
            size = 0
            if key is not None:
                self.row_maps[first + i] = self._map_set(key, terms.maps[key])
                self.bias[first + i] = terms.bias[i]
                values.append(
                    np.concatenate([np.asarray(terms.scales[i], np.float32), np.asarray(terms.hot[i], np.float32)])
                )
                size = values[-1].size
            self.start[first + i + 1] = self.start[first + i] + size
        if values:
            v = np.concatenate(values)
            end = self.values.shape[0]
            self.values.resize((end + v.size,))
            self.values[end:] = v

    def _map_set(self, key: tuple, maps: ChannelMaps) -> int:
        if key not in self.sets:
            j = self.sets[key] = len(self.sets)
            g = self.group.create_group(f"maps/{j}")
            g.attrs.update(camera=str(key[0]), channel=str(key[1]))
            g.create_dataset("maps", data=maps.maps, chunks=(1, *maps.maps.shape[1:]), **self.compression)
            g.create_dataset("hot_index", data=np.asarray(maps.hot_index, np.int64))
        return self.sets[key]

    def close(self) -> None:
        """Write the rows' offsets into ``values`` (known once every row is added)."""
        self.group.create_dataset("start", data=self.start)


class TermsReader:
    """The darks of a predictions file's rows that are kept as terms (darks of ``shape``); the map
    sets read when first needed and kept while they take at most ``kept_bytes``. What does not fit
    together (a row's values, its map set, their shapes) is a :class:`CorruptFileError`; values
    that fit but were changed sum to a dark that fails the row's hash."""

    def __init__(self, path: Path, group: h5py.Group, n: int, shape: tuple[int, int], kept_bytes: float):
        self.path, self.group, self.shape, self.kept_bytes = path, group, tuple(shape), kept_bytes
        self.row_maps = self._read("row_maps")
        self.start = self._read("start")
        if self.row_maps.shape != (n,) or self.start.shape != (n + 1,):
            self._damaged(f"the terms of {n} rows have map sets {self.row_maps.shape} and offsets {self.start.shape}")
        self.has = self.row_maps >= 0
        bias = self.group.get("bias")
        if not isinstance(bias, h5py.Dataset) or bias.shape != (n, self.shape[0]):
            self._damaged(f"the row biases are {getattr(bias, 'shape', 'missing')}, not {(n, self.shape[0])}")
        self._kept: OrderedDict[int, ChannelMaps] = OrderedDict()

    def _damaged(self, what: str):
        raise CorruptFileError(f"{self.path}: {what} in /terms: the file is damaged; write it again")

    def _read(self, name: str, index=()) -> np.ndarray:
        try:
            return self.group[name][index]
        except (OSError, KeyError, ValueError, IndexError) as exc:
            self._damaged(f"cannot read {name} ({exc})")

    def maps(self, j: int) -> ChannelMaps:
        if j not in self._kept:
            maps, hot_index = self._read(f"maps/{j}/maps"), self._read(f"maps/{j}/hot_index")
            size = int(np.prod(self.shape))
            if (
                maps.ndim != 3
                or maps.shape[1:] != self.shape
                or hot_index.ndim != 1
                or hot_index.dtype.kind not in "iu"
            ):
                self._damaged(f"map set {j} has maps {maps.shape} and hot pixels {hot_index.shape} {hot_index.dtype}")
            if hot_index.size and not (hot_index.min() >= 0 and hot_index.max() < size):
                self._damaged(f"map set {j} has hot pixels outside its {self.shape} maps")
            self._kept[j] = ChannelMaps(maps.astype(np.float32, copy=False), hot_index)
            while len(self._kept) > 1 and sum(m.nbytes for m in self._kept.values()) > self.kept_bytes:
                self._kept.popitem(last=False)
        self._kept.move_to_end(j)
        return self._kept[j]

    def dark(self, row: int, out: np.ndarray) -> np.ndarray:
        """Row ``row``'s dark, summed from its terms into ``out``."""
        maps = self.maps(int(self.row_maps[row]))
        a, b = int(self.start[row]), int(self.start[row + 1])
        k, n_hot = maps.maps.shape[0] - 1, maps.hot_index.size
        values = self._read("values", slice(a, b)) if 0 <= a <= b else np.zeros(0, np.float32)
        if values.shape != (k + n_hot,):
            self._damaged(f"row {row} has {values.size} values from offset {a}, its map set needs {k + n_hot}")
        bias = self._read("bias", row)
        if bias.shape != self.shape[:1]:
            self._damaged(f"row {row} has a bias of shape {bias.shape}, not ({self.shape[0]},)")
        return dark_of_terms(maps, values[:k], values[k:], bias, out)
