"""The simulator's switchable effects: off by default (the same bytes as before they existed), and
when on, frame-specific, in the expected dark and visible in the frame's own strips."""

import hashlib

import numpy as np
import pytest

from deepdark.io.geometry import load_geometry
from deepdark.sim import simulate as S

MINI = load_geometry("mini")
# SHA-256 of the frames below as the simulator made them before the effects existed
BEFORE_EFFECTS = "e093c101b2deda27776a38792653b72950cebfb8be22eeaa7e26bbf36b93114d"


def _frames_digest(**kw) -> str:
    h = hashlib.sha256()
    for cam in ("GS1", "GS2"):
        m = S.camera_model(cam, 0, MINI)
        plan = [("DARK", -15.0, 30.0), ("BIAS", -15.0, 0.0), ("OBJECT", -10.0, 10.0), ("DARK", -25.0, 10.0)]
        for k, (typ, setpoint, exptime) in enumerate(plan):
            fr = S.simulate_frame(m, S.frame_rng(0, cam, "20240101", "dark", k + 1), typ, setpoint, exptime, **kw)
            h.update(fr.data.tobytes())
            h.update(fr.expected.tobytes())
            h.update(repr([(c.keyword, c.value) for c in fr.header.cards]).encode())
    return h.hexdigest()


def test_without_effects_frames_are_byte_identical_to_before():
    assert _frames_digest() == BEFORE_EFFECTS
    assert _frames_digest(effects=()) == BEFORE_EFFECTS
    assert _frames_digest(effects=("pickup",)) != BEFORE_EFFECTS


def test_unknown_effect_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown simulator effect\(s\) \['glare'\]; valid: amp_glow, pickup"):
        S.simulate_archive(tmp_path, geometry="mini", effects=("glare",), progress=False)


def _stack(n, effects, seed=0):
    m = S.camera_model("GS1", 0, MINI)
    return m, [S.simulate_frame(m, np.random.default_rng([seed, k]), effects=effects) for k in range(n)]


def _region(cube, name):
    """One region of every channel, from a frame (frame shape) or a readout-coordinate cube."""
    reg = MINI.active if name == "active" else MINI.regions[name]
    if cube.shape == tuple(MINI.frame_shape):
        return np.stack([MINI.readout(cube, ch)[reg.slices] for ch in MINI.channels]).astype(float)
    return cube[(slice(None),) + reg.slices].astype(float)


def _without_effects(m, f):
    """The frame's expected dark without its effects (its temperature, drift and row offsets)."""
    return S.expected_dark(m, f.temperature, 30.0, f.bias_offsets, f.row_offsets)


def test_amp_glow_changes_per_frame_and_shows_in_the_optical_black():
    m, frames = _stack(12, ("amp_glow",))
    factors = np.array([[f.header[f"SIMGLOW{ch.name}"] for ch in MINI.channels] for f in frames])
    assert factors.std() > 0.2 and abs(np.log(factors).mean()) < 0.3  # changes, about 1 on average
    assert all(f.header["SIMEFF"] == "amp_glow" for f in frames)
    # the expected dark carries the frame's glow (and the amplifier columns' residue of it) ...
    glow = m.glow * (factors[0] - 1)[:, None, None] / m.gain[:, None, None]
    np.testing.assert_allclose(frames[0].expected - _without_effects(m, frames[0]), glow, atol=0.05)
    # ... and the optical-black columns next to the amplifier show it, frame by frame
    seen = np.array(
        [
            (_region(f.data, "ob_cols") - _region(_without_effects(m, f), "ob_cols"))[:, :6].mean(axis=(1, 2))
            for f in frames
        ]
    )
    r = np.corrcoef(seen.ravel(), factors.ravel())[0, 1]
    assert r > 0.8, r


def test_pickup_is_a_column_pattern_per_frame_seen_in_the_optical_black_rows():
    m, frames = _stack(6, ("pickup",))
    assert S.effect_params(m).pickup_pattern.shape == (4, 2, MINI.channel_shape[1])
    hits = []
    for f in frames:
        pickup = f.expected - _without_effects(m, f)  # the same in every row, prescan and overscan included
        assert np.abs(pickup - pickup[:, :1, :]).max() < 1e-3 and np.abs(pickup).max() > 1
        assert all(f.header[f"SIMPICK{ch.name}"] > 0 for ch in MINI.channels)
        # the OB rows, read above the active columns, show the frame's stripes
        seen = (_region(f.data, "ob_rows") - _region(_without_effects(m, f), "ob_rows")).mean(axis=1)
        hits.append(np.corrcoef(seen.ravel(), _region(pickup, "ob_rows")[:, 0].ravel())[0, 1])
    assert np.mean(hits) > 0.4, hits


def test_effects_keep_the_floor_and_their_parameters_fixed_per_camera():
    _, plain = _stack(4, ())
    _, both = _stack(4, ("amp_glow", "pickup"))
    floors = [np.mean(list(f.floor.values())) for f in plain], [np.mean(list(f.floor.values())) for f in both]
    assert abs(np.mean(floors[1]) / np.mean(floors[0]) - 1) < 0.05  # deterministic: in the expected dark
    m = S.camera_model("GS1", 0, MINI)
    a, b = S.effect_params(m), S.effect_params(m)
    assert a.glow_sigma == b.glow_sigma and np.array_equal(a.pickup_pattern, b.pickup_pattern)
    assert S.effect_params(S.camera_model("GS2", 0, MINI)).glow_sigma != a.glow_sigma
