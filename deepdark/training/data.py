"""The training data: the library's DARK frame-channels, the split by night, samples and batches.

Samples
-------
Every channel of every DARK frame of the given shards is one sample: input = its strips A1, A2,
A3 of the model window (``deepdark.model.nets.model_input``), target = its window B, both scaled to
[0, 1]. Samples are split by *night* (never by frame): the validation nights are held out whole,
by default the last night(s) (at least one when there are two or more nights;
:func:`split_nights`).

Crops (CPU training)
--------------------
``crop=None`` trains on whole windows, as the paper. ``crop=c`` (a multiple of the generator's
``multiple``) trains on random c x c crops. Two ways to crop the input (``crop_mode``,
:func:`build_batch`):

* ``"window"`` (default): the input is built for the whole window exactly as inference builds it
  (each whole strip resized to the window) and input and target are cropped at the same place,
  so the network is trained on exactly the pixels it sees at inference;
* ``"strips"``: the strips are cropped first - A1 and A2 to the crop's rows, A3 to its columns -
  and resized to the crop. Cheaper, but the resize then stretches the 46 overscan columns and 4
  optical-black rows over c pixels instead of the window's S, a different input from inference's.

Data loading
------------
Shards stay open; strips and window targets are read per sample (one HDF5 chunk each) and kept
in memory up to ``cache_mb`` (a small library is read once; a large one streams from disk;
:class:`SampleSource`). On the CPU the tensors a sample's window makes (model input, target,
physics prediction) are kept too, within the same budget (:meth:`SampleSource.batch`): every
epoch and every validation would build them again, identically (strip medians, resizing: 0.3 ms
a 64 x 64 window, against 14 ms a training step).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from deepdark.io.errors import InputError
from deepdark.io.geometry import Geometry
from deepdark.io.shards import Shard
from deepdark.io.tables import common_geometry, library_table
from deepdark.io.units import adu_to_unit
from deepdark.model import conditioning as C
from deepdark.model.nets import model_input
from deepdark.training.config import CROP_MODES

CALIBRATION_SAMPLES = 16  # crops in the one batch that sets the initial batch-norm statistics
CALIBRATION_CROP = 256  # ... at most this size (statistics are per channel over space)


def split_nights(nights: Sequence[str], val_nights: int | Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(train nights, validation nights), disjoint, from the sorted distinct ``nights``.

    ``None``: the last ``max(1, round(n / 5))`` nights when there are two or more, none with
    one night; an int k: the last k nights; a list: those nights. At least one night trains.
    """
    nights = sorted(set(nights))
    if isinstance(val_nights, (int, np.integer)) and not isinstance(val_nights, bool):
        k = int(val_nights)
        if k < 0:
            raise InputError(f"val_nights must be >= 0, got {k}")
        val = nights[len(nights) - k :] if k else []
    elif val_nights is None:
        val = nights[-max(1, round(len(nights) / 5)) :] if len(nights) >= 2 else []
    else:
        val = sorted({str(v) for v in val_nights})
        unknown = [v for v in val if v not in nights]
        if unknown:
            raise InputError(f"validation night(s) {unknown} not in the shards' nights {nights}")
    train = [n for n in nights if n not in val]
    if not train:
        raise InputError(f"no training night left: nights {nights}, validation {val}")
    return train, val


@dataclass
class Library:
    """The DARK frame-channels of some shards: one table row per sample."""

    paths: list[Path]
    shards: list[Shard]
    geometry: Geometry
    table: pd.DataFrame  # shard_no, row, night, camera, channel, exptime, setpoint, floor, file_hash

    def close(self) -> None:
        for s in self.shards:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


def open_library(
    shards: Sequence[str | Path], setpoints: Sequence[float] | None = None, nights: Sequence[str] | None = None
) -> Library:
    """Open ``shards`` and list their DARK frame-channels (optionally only ``setpoints`` / ``nights``)."""
    paths = [Path(p) for p in shards]
    if not paths:
        raise InputError("no shards given")
    opened: list[Shard] = []
    try:
        for p in paths:
            opened.append(Shard(p))
        common_geometry(opened)
        columns = ["shard_no", "row", "night", "camera", "channel", "exptime", "setpoint", "floor", "file_hash"]
        table = library_table(opened)
        table = table[columns] if not table.empty else pd.DataFrame(columns=columns)
        if setpoints is not None:
            table = table[
                np.isclose(table["setpoint"].to_numpy()[:, None], np.asarray(setpoints, float)[None, :]).any(axis=1)
            ]
        if nights is not None:
            table = table[table["night"].isin([str(n) for n in nights])]
        if table.empty:
            raise InputError(
                f"no DARK frames in {', '.join(map(str, paths))}"
                + (f" at setpoints {list(setpoints)}" if setpoints is not None else "")
                + (f" in nights {list(nights)}" if nights is not None else "")
            )
        table = table.sort_values(["night", "shard_no", "row"], kind="stable").reset_index(drop=True)
        return Library(paths, opened, opened[0].geometry, table)
    except BaseException:
        for s in opened:
            s.close()
        raise


class SampleSource:
    """Window strips and targets of library samples, read on demand and cached up to a budget.

    With ``physics`` (a ``deepdark.physics.PhysicsModel``) every item also carries the physics
    prediction of its window (float32 ADU), computed for all channels of a frame at once (the
    frame's effective temperature uses the optical-black pixels of all its channels)."""

    def __init__(self, lib: Library, cache_mb: float = 1024, physics=None):
        self.lib = lib
        self.budget = int(cache_mb * 2**20)
        self.used = 0
        self.cache: dict[int, tuple] = {}
        self.physics = physics
        self._phys: dict[int, np.ndarray] = {}
        self._tensors: dict[tuple[int, int], tuple] = {}  # (sample, size) -> (input, target, base or None)

    def _physics_of(self, i: int) -> np.ndarray:
        hit = self._phys.pop(i, None)
        if hit is not None:
            return hit
        tab = self.lib.table
        rec = tab.iloc[i]
        same = np.flatnonzero(
            ((tab["shard_no"] == rec["shard_no"]) & (tab["file_hash"] == rec["file_hash"])).to_numpy()
        )
        shard_rows = tab["row"].to_numpy()[same]
        order = np.argsort(shard_rows)
        same, shard_rows = same[order], shard_rows[order]
        pred = self.physics.predict_rows(self.lib.shards[int(rec["shard_no"])], shard_rows, window=True)
        out = None
        for k, j in enumerate(same):
            p = np.ascontiguousarray(pred[k], dtype=np.float32)
            if int(j) == i:
                out = p
            elif int(j) not in self.cache and self._reserve(p.nbytes):
                self._phys[int(j)] = p  # consumed (moved into the item cache) when j is read
        return out

    def get(self, i: int) -> tuple[np.ndarray, ...]:
        """(a1, a2, a3, target) of sample ``i`` (library table row), window-sized, uint16;
        plus the physics prediction of the window (float32 ADU) with ``physics``."""
        hit = self.cache.get(i)
        if hit is not None:
            return hit
        rec = self.lib.table.iloc[i]
        shard = self.lib.shards[int(rec["shard_no"])]
        rows = np.array([int(rec["row"])])
        s = shard.strips(rows, window=True)
        item = (
            np.ascontiguousarray(s["a1"][0]),
            np.ascontiguousarray(s["a2"][0]),
            np.ascontiguousarray(s["a3"][0]),
            np.ascontiguousarray(shard.target(rows)[0]),
        )
        if self.physics is not None:
            had = i in self._phys
            phys = self._physics_of(i)
            if had:
                self.used -= phys.nbytes
            item = (*item, phys)
        if self._reserve(sum(a.nbytes for a in item)):
            self.cache[i] = item
        return item

    def batch(
        self,
        indices: Sequence[int],
        size: int,
        crop: int | None,
        corners: Sequence[tuple[int, int]] | None,
        crop_mode: str = "window",
        device: torch.device | str = "cpu",
        return_base: bool = False,
    ):
        """:func:`build_batch` of the samples ``indices`` (library table rows), the same values.

        On the CPU, for whole windows or window-mode crops, each sample's whole-window tensors are
        built once (on their own: every sample's input depends on that sample alone) and kept
        within the budget; a batch concatenates them, or their crops at ``corners``.
        """
        dev = torch.device(device)
        cropped = bool(crop) and crop != size
        if dev.type != "cpu" or (cropped and crop_mode != "window"):
            items = [self.get(int(i)) for i in indices]
            return build_batch(items, size, crop, corners, crop_mode, dev, return_base)
        parts = [self._window_tensors(int(i), size) for i in indices]
        if return_base and parts[0][2] is None:
            raise ValueError("return_base needs items with a physics prediction")
        if cropped:
            parts = [
                tuple(None if t is None else t[:, :, r : r + crop, c : c + crop] for t in part)
                for part, (r, c) in zip(parts, corners)
            ]
        x, y, base = (None if part[0] is None else torch.cat(part) for part in zip(*parts))
        return (x.contiguous(), y, base) if return_base else (x.contiguous(), y)

    def _window_tensors(self, i: int, size: int) -> tuple:
        """(input (1, C, size, size), target (1, 1, size, size), physics base or None) of sample
        ``i``'s whole window, kept within the budget."""
        hit = self._tensors.get((i, size))
        if hit is not None:
            return hit
        item = self.get(i)
        physics = len(item) > 4
        built = build_batch([item], size, None, None, "window", "cpu", return_base=physics)
        tensors = built if physics else (*built, None)
        if self._reserve(sum(t.nbytes for t in tensors if t is not None)):
            self._tensors[i, size] = tensors
        return tensors

    def _reserve(self, nbytes: int) -> bool:
        """Count ``nbytes`` against the budget if they fit in it; whether they did."""
        if self.used + nbytes > self.budget:
            return False
        self.used += nbytes
        return True


def build_batch(
    items: Sequence[tuple],
    size: int,
    crop: int | None,
    corners: Sequence[tuple[int, int]] | None,
    crop_mode: str = "window",
    device: torch.device | str = "cpu",
    return_base: bool = False,
):
    """Model input (B, 3, c, c) and target (B, 1, c, c) in [0, 1] for window samples ``items``.

    ``corners``: the (row, col) of each crop in the window (ignored without ``crop``). Items with a
    fifth element (the physics prediction of the window, ``SampleSource(physics=...)``) add the
    physics plane (``deepdark.model.conditioning.physics_plane``) as a fourth input channel, and
    their strips are measured from their medians (``deepdark.model.conditioning``); with
    ``return_base`` the physics prediction of the same pixels ([0, 1] units, (B, 1, c, c)) is
    returned third: ``(x, target, base)``.
    """
    a1 = np.stack([it[0] for it in items])
    a2 = np.stack([it[1] for it in items])
    a3 = np.stack([it[2] for it in items])
    y = np.stack([it[3] for it in items])
    phys = np.stack([it[4] for it in items]) if len(items[0]) > 4 else None
    extra = None if phys is None else C.physics_plane(phys, a1)
    # physics-mode inputs: each strip measured from its median over the window
    offsets = None if phys is None else C.strip_offsets(a1, a2, a3)
    scaling = {} if phys is None else {"strip_offsets": offsets, "strip_scale": C.STRIP_SCALE_ADU}
    cropped = bool(crop) and crop != size

    def cut(arr):
        return np.stack([arr[k, ..., r : r + crop, c : c + crop] for k, (r, c) in enumerate(corners)])

    if not cropped:
        x = model_input(a1, a2, a3, size, extra=extra, device=device, **scaling)
    elif crop_mode == "window":
        full = model_input(a1, a2, a3, size, extra=extra, device=device, **scaling)
        x = torch.stack([full[k, :, r : r + crop, c : c + crop] for k, (r, c) in enumerate(corners)])
    elif crop_mode == "strips":
        x = torch.cat(
            [
                model_input(
                    a1[k : k + 1, r : r + crop],
                    a2[k : k + 1, r : r + crop],
                    a3[k : k + 1, :, c : c + crop],
                    crop,
                    device=device,
                    extra=None if extra is None else extra[k : k + 1, :, r : r + crop, c : c + crop],
                    **({} if offsets is None else {**scaling, "strip_offsets": [o[k : k + 1] for o in offsets]}),
                )
                for k, (r, c) in enumerate(corners)
            ]
        )
    else:
        raise ValueError(f"unknown crop_mode {crop_mode!r}; valid: {', '.join(CROP_MODES)}")
    if cropped:
        y = cut(y)
        if phys is not None:
            phys = cut(phys)
    target = adu_to_unit(torch.from_numpy(y.astype(np.float32))).unsqueeze(1).to(device)
    if return_base:
        if phys is None:
            raise ValueError("return_base needs items with a physics prediction")
        return x.contiguous(), target, C.base_unit(phys).to(device)
    return x.contiguous(), target


def calibration_batch(
    source: SampleSource,
    train_idx: np.ndarray,
    size: int,
    crop: int | None,
    crop_mode: str,
    seed: int,
    device: torch.device,
    multiple: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch (input, target) of up to ``CALIBRATION_SAMPLES`` random training crops: for the
    batch-norm statistics and the initial output level."""
    rng = np.random.default_rng([seed, 0])
    pick = train_idx[rng.permutation(len(train_idx))[:CALIBRATION_SAMPLES]]
    c = min(crop or size, CALIBRATION_CROP)
    c -= c % multiple
    corners = [tuple(int(v) for v in rng.integers(0, size - c + 1, 2)) for _ in pick]
    return build_batch(
        [source.get(int(i)) for i in pick],
        size,
        c if c < size else None,
        corners,
        crop_mode if crop else "window",
        device,
    )


def data_digest(table: pd.DataFrame) -> str:
    """A short hash of the samples of a library table (frames and channels), for the checkpoint."""
    h = hashlib.sha256()
    for fh, ch in zip(table["file_hash"], table["channel"]):
        h.update(f"{fh}:{ch};".encode())
    return h.hexdigest()[:16]
