"""The conditioning strips and targets of one frame (paper 2.3), in readout coordinates.

Per channel: A1 = overscan rows of the window (size x 46), A2 = optical-black columns of the
window rows (size x 4), A3 = optical-black rows over the window columns (4 x size), and the whole
active area (the target B is its window). Raw uint16, exactly the pixels of the frame: resizing
and [0, 1] scaling belong to the model's input step (``deepdark.nets.model_input``).
"""

from __future__ import annotations

import numpy as np

from .geometry import Geometry

STRIP_NAMES = ("a1", "a2", "a3")


def strip_shapes(g: Geometry) -> dict[str, tuple[int, int]]:
    s = g.window_size
    return {
        "a1": (s, g.regions["overscan"].shape[1]),
        "a2": (s, g.regions["ob_cols"].shape[1]),
        "a3": (g.regions["ob_rows"].shape[0], s),
        "active": g.active.shape,
    }


def channel_strips(frame: np.ndarray, g: Geometry) -> dict[str, dict[str, np.ndarray]]:
    """``{channel name: {"a1", "a2", "a3", "active"}}`` for one frame (contiguous copies)."""
    w = g.window
    ov, obc, obr = g.regions["overscan"], g.regions["ob_cols"], g.regions["ob_rows"]
    out = {}
    for ch in g.channels:
        ro = g.readout(frame, ch)
        out[ch.name] = {
            "a1": np.ascontiguousarray(ro[w.r0:w.r1, ov.c0:ov.c1]),
            "a2": np.ascontiguousarray(ro[w.r0:w.r1, obc.c0:obc.c1]),
            "a3": np.ascontiguousarray(ro[obr.r0:obr.r1, w.c0:w.c1]),
            "active": np.ascontiguousarray(ro[g.active.slices]),
        }
    return out


def window_of(active: np.ndarray, g: Geometry) -> np.ndarray:
    """Target B: the model window cut from active area(s) (..., rows, cols)."""
    r, c = g.window_in_active
    return active[..., r, c]
