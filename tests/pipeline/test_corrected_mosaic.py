"""The corrected mosaic written straight into its tiles is the tiling of the per-channel
corrected areas, value for value, on every kind of geometry."""

from __future__ import annotations

import numpy as np
import pytest

from deepdark.io.frames import RawFrame
from deepdark.io.geometry import load_geometry
from deepdark.pipeline.correct import CorrectionError, corrected_actives, corrected_mosaic


def _raw(data: np.ndarray) -> RawFrame:
    """A raw frame of ``data``: the pixels are all the correction reads."""
    return RawFrame(path=None, data=data, header=None, info=None, hash="", frame_hash="")


@pytest.mark.parametrize("name", ["mini", "lamost-kaf4320", "kast-blue", "nickel-direct"])
def test_corrected_mosaic_is_the_tiled_corrected_actives(name):
    g = load_geometry(name)
    rng = np.random.default_rng(3)
    raw = _raw(rng.integers(0, 65536, g.frame_shape).astype(np.uint16))
    channels = g.channel_names()[::-1]  # the table's order need not be the geometry's
    darks = rng.normal(100.0, 30.0, (len(channels), *g.active.shape)).astype(np.float32)
    actives = corrected_actives(raw, g, channels, darks)
    want = g.mosaic(actives)
    got = corrected_mosaic(raw, g, channels, darks)
    assert got.dtype == np.float32 and got.shape == g.mosaic_shape
    np.testing.assert_array_equal(got, want)
    # the arithmetic itself: float32 counts minus the float32 dark, channel by channel
    for c, d in zip(channels, darks):
        ch = next(x for x in g.channels if x.name == c)
        plain = g.readout(raw.data, ch)[g.active.slices].astype(np.float32) - d
        np.testing.assert_array_equal(actives[c], plain)


def test_corrected_mosaic_checks_the_channels():
    g = load_geometry("mini")
    raw = _raw(np.zeros(g.frame_shape, np.uint16))
    darks = np.zeros((len(g.channels), *g.active.shape), np.float32)
    with pytest.raises(CorrectionError):
        corrected_mosaic(raw, g, g.channel_names()[:-1], darks)
    with pytest.raises(CorrectionError):
        corrected_mosaic(raw, g, ["nope", *g.channel_names()[1:]], darks)
