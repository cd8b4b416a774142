"""The simulator's fixed-pattern strength (``pattern_scale``): the default archive keeps its
bytes, 0 leaves a uniform dark current, and other scales shrink the same pattern in place."""

import numpy as np
import pytest

from deepdark.cli import main
from deepdark.io.errors import InputError
from deepdark.io.frames import read_frame
from deepdark.io.geometry import load_geometry
from deepdark.sim import simulate as S

MINI = load_geometry("mini")
ACTIVE = (slice(None),) + MINI.active.slices


def _archive(out, **kw):
    args = dict(geometry="mini", nights=1, cameras=("GS1",), temperatures=(-15, -5), darks_per_temp=1)
    return S.simulate_archive(out, guide_per_night=1, progress=False, **args, **kw)


def test_scale_one_is_the_default_archive_byte_for_byte(tmp_path):
    default = _archive(tmp_path / "a")
    one = _archive(tmp_path / "b", pattern_scale=1.0)
    assert [p.read_bytes() for p in default] == [p.read_bytes() for p in one]
    assert all("SIMPATT" not in read_frame(p, MINI).header for p in default)
    built = S.CameraModel.build("GS1", 0, MINI, pattern_scale=1)
    model = S.camera_model("GS1", 0, MINI)
    for name in ("dep", "diff", "glow", "hot_rate", "rts_rate"):
        assert np.array_equal(getattr(built, name), getattr(model, name))


def test_scale_zero_leaves_a_uniform_dark_current():
    m = S.CameraModel.build("GS1", 0, MINI, pattern_scale=0.0)
    for temperature in (-25.0, -15.0, -5.0):
        rate = m.dark_rate(temperature)[m.real]
        assert rate.max() - rate.min() < 1e-5 * rate.mean()  # no rings, gradients, DSNU or hot pixels
    assert m.dark_rate(S.T_REF)[ACTIVE].mean() == pytest.approx(S.DARK_RATE_REF, rel=1e-5)
    assert np.array_equal(m.glow, S.camera_model("GS1", 0, MINI).glow)  # the glow is not part of it


def test_other_scales_shrink_the_same_pattern_in_place():
    full, half = S.camera_model("GS1", 0, MINI), S.camera_model("GS1", 0, MINI, pattern_scale=0.5)
    assert half is not full and half.pattern_scale == 0.5
    assert np.array_equal(half.hot_idx, full.hot_idx) and np.array_equal(half.rts_idx, full.rts_idx)
    np.testing.assert_allclose(half.hot_rate, 0.5 * full.hot_rate)
    np.testing.assert_allclose(half.rts_rate, 0.5 * full.rts_rate)
    assert half.params["ring_amplitude"] == 0.5 * full.params["ring_amplitude"]
    for m in (full, half):  # the maps keep their mean; the hot pixels' extra rate comes on top
        assert (m.dep + m.diff)[ACTIVE].mean() == pytest.approx(S.DARK_RATE_REF, rel=1e-5)
    spread = [np.std(np.log(m.dep[ACTIVE])) for m in (full, half)]  # rings, gradient and DSNU together
    assert 0.45 < spread[1] / spread[0] < 0.55
    # the same map, weaker: the deviations from the mean point the same way
    dev = [m.dep[ACTIVE] / m.dep[ACTIVE].mean() - 1 for m in (full, half)]
    assert np.corrcoef(dev[0].ravel(), dev[1].ravel())[0, 1] > 0.99


def test_frames_keep_their_draws_and_record_the_scale(tmp_path):
    default = _archive(tmp_path / "a")
    weak = _archive(tmp_path / "b", pattern_scale=0.25)
    for p, q in zip(default, weak):
        a, b = read_frame(p, MINI).header, read_frame(q, MINI).header
        assert b["SIMPATT"] == 0.25
        assert a["SIMTEMP"] == b["SIMTEMP"] and a["CCDTEMP"] == b["CCDTEMP"]  # the same frame conditions


@pytest.mark.parametrize("scale", [-0.1, float("nan"), float("inf")])
def test_a_scale_below_zero_or_not_finite_is_refused(tmp_path, scale):
    with pytest.raises(InputError, match="pattern_scale"):
        _archive(tmp_path, pattern_scale=scale)
    assert not tmp_path.joinpath("20240101").exists()


def test_the_command_line_passes_the_scale(tmp_path):
    out = tmp_path / "archive"
    argv = ["-q", "simulate", str(out), "--geometry", "mini", "--nights", "1", "--temperatures", "-15"]
    assert main([*argv, "--darks-per-temp", "1", "--guide-per-night", "0", "--pattern-scale", "0.5"]) == 0
    (frame,) = sorted(out.rglob("*.fits"))
    assert read_frame(frame, MINI).header["SIMPATT"] == 0.5
