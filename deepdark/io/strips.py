"""The conditioning strips and targets of one frame (paper 2.3), in readout coordinates.

Per channel the shard keeps the strips along the whole active area (the contract's regions):
A1 = overscan (active rows x 46), A2 = optical-black columns (active rows x 4), A3 =
optical-black rows (4 x active columns), and for darks the active area itself. The model's
window cuts A1/A2/A3 and the target B out of them (:func:`window_strips`, :func:`window_of`);
a prediction of the whole active area uses them whole. Raw uint16, exactly the pixels of the
frame: resizing and [0, 1] scaling belong to the model's input step (``deepdark.model.nets``).

A geometry without optical black gives A2 and A3 without pixels (active rows x 0, 0 x active
columns), so that every consumer sees the same three strips; a geometry without a model window
evaluates the whole active area (:func:`window_of`) and has no window strips for the learned model.
"""

from __future__ import annotations

import numpy as np

from deepdark.io.geometry import Geometry

STRIP_NAMES = ("a1", "a2", "a3")
_REGION_OF = {"a1": "overscan", "a2": "ob_cols", "a3": "ob_rows", "active": "active"}


def strip_shapes(g: Geometry) -> dict[str, tuple[int, int]]:
    """Shape of each strip and of the active area; (rows, 0) and (0, cols) for absent optical black."""
    rows, cols = g.active.shape
    empty = {"a2": (rows, 0), "a3": (0, cols)}
    return {
        name: g.regions[region].shape if region in g.regions else empty[name] for name, region in _REGION_OF.items()
    }


def channel_strips(frame: np.ndarray, g: Geometry) -> dict[str, dict[str, np.ndarray]]:
    """``{channel name: {"a1", "a2", "a3", "active"}}`` for one frame, as views of ``frame``
    (callers copy when they keep them: the shard writer stacks them, which is one copy)."""
    shapes = strip_shapes(g)
    out = {}
    for ch in g.channels:
        out[ch.name] = {
            name: g.region(frame, ch, region) if region in g.regions else np.zeros(shapes[name], frame.dtype)
            for name, region in _REGION_OF.items()
        }
    return out


def window_strips(strips: dict[str, np.ndarray], g: Geometry) -> dict[str, np.ndarray]:
    """The paper's A1 (size x 46), A2 (size x 4), A3 (4 x size) of the window, from whole strips
    (..., rows, cols) as stored in a shard; :class:`GeometryError` for a geometry without a window."""
    g.require_window("the learned model's input (the strips of its window)")
    rows, cols = g.window_in_active
    return {"a1": strips["a1"][..., rows, :], "a2": strips["a2"][..., rows, :], "a3": strips["a3"][..., :, cols]}


def window_of(active: np.ndarray, g: Geometry) -> np.ndarray:
    """Target B: the model window cut from active area(s) (..., rows, cols); all of them for a
    geometry without a window."""
    r, c = g.window_in_active
    return active[..., r, c]
