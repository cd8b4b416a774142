"""How far the overscan is trusted (``deepdark.physics.transfer``), and bias-only libraries."""

import math

import numpy as np
import pytest

from deepdark import physics as P
from deepdark.io.geometry import load_geometry
from deepdark.io.shards import Shard
from deepdark.physics.frame_state import with_transfer
from deepdark.pipeline.extract import extract
from deepdark.sim import simulate as S

MINI = load_geometry("mini")


def _rows(gamma, frames=20, rows=300, seed=0):
    """Active-row and (shrunk) overscan-row offsets of a library whose active rows see ``gamma`` of
    the overscan's row offsets, with fixed row patterns and per-frame levels on both."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(0, 2.0, (frames, rows))  # row noise the overscan sees
    lam = 4.0 / (4.0 + 1.0)  # the frames' shrinkage: row variance 4, estimate variance 1
    overscan = (
        lam * (shared + rng.normal(0, 1.0, (frames, rows))) + rng.normal(0, 3, rows) + rng.normal(0, 1, (frames, 1))
    )
    active = (
        gamma * shared + rng.normal(0, 0.3, (frames, rows)) + rng.normal(0, 3, rows) + rng.normal(0, 1, (frames, 1))
    )
    return active, overscan


@pytest.mark.parametrize("gamma", [1.0, 0.5, 0.0])
def test_the_regression_recovers_the_transfer(gamma):
    active, overscan = _rows(gamma)
    tr = P.measure_transfer(active, overscan, np.ones((len(active), 1)), read_var=1.0)
    assert tr.coefficient == pytest.approx(gamma, abs=3 * tr.sigma + 0.02), tr
    assert 0 < tr.sigma < 0.05 and tr.frames == 20
    assert tr.used == (gamma != 1.0)  # shared offsets: the per-frame shrinkage stands


def test_the_per_pixel_design_and_cosmic_rays_do_not_move_it():
    active, overscan = _rows(0.0)
    X = np.ones((len(active), 1))
    base = P.measure_transfer(active, overscan, X, read_var=1.0)
    t = np.linspace(5, 60, len(active))
    dark = t[:, None] * np.random.default_rng(1).normal(1, 0.5, active.shape[1])  # dark signal of each exposure
    spoiled = active + dark
    spoiled[3, 10] += 500.0  # a cosmic ray in one row
    tr = P.measure_transfer(spoiled, overscan, np.stack([t, np.ones_like(t)], axis=1), read_var=1.0)
    assert tr.coefficient == pytest.approx(base.coefficient, abs=0.02) and tr.used


@pytest.mark.parametrize("values", [300, 7 * 300, 19 * 300])
def test_a_few_frames_at_a_time_measure_what_all_at_once_do(monkeypatch, values):
    """A library's row offsets formed again a few frames at a time in every pass, not held (at
    20,000 darks they would be GB): the same coefficient, uncertainty and residual, but for the
    order of the sums (one frame at a time, 7, and all but one then one)."""
    from deepdark.physics import transfer as T

    active, overscan = _rows(0.5, frames=20)
    X = np.stack([np.linspace(5, 60, 20), np.ones(20)], axis=1)
    whole = P.measure_transfer(active, overscan, X, read_var=1.0)
    monkeypatch.setattr(T, "TRANSFER_VALUES", values)
    parts = P.measure_transfer(active, overscan, X, read_var=1.0, hold_bytes=0)
    held = P.measure_transfer(active, overscan, X, read_var=1.0)
    for tr in (parts, held):
        assert tr.used == whole.used and tr.frames == whole.frames
        for name in ("coefficient", "sigma", "residual_var", "gain"):
            assert getattr(tr, name) == pytest.approx(getattr(whole, name), rel=1e-12)
    assert parts == held  # held or formed again: the same numbers


def test_too_few_frames_cannot_tell():
    active, overscan = _rows(0.0, frames=2)
    tr = P.measure_transfer(active, overscan, np.ones((2, 1)), read_var=1.0)
    assert not tr.used and math.isnan(tr.coefficient) and "not measured" in tr.describe()


def test_immaterial_differences_keep_the_shrinkage():
    active, overscan = _rows(0.9)
    tr = P.measure_transfer(active, overscan, np.ones((len(active), 1)), read_var=1e4)  # loud pixels
    assert abs(tr.coefficient - 1) > 3 * tr.sigma and tr.gain < 0.01 and not tr.used
    assert "immaterial" in tr.describe()


def test_with_transfer_remakes_only_the_rows_it_is_given():
    rng = np.random.default_rng(2)
    strips = {
        "a1": rng.normal(1000, 5, (2, 40, 46)).round(),
        "a2": rng.normal(1010, 5, (2, 40, 4)).round(),
        "a3": rng.normal(1010, 5, (2, 4, 30)).round(),
    }
    st = P.frame_state(strips)
    out = with_transfer(st, np.array([0.0, np.nan]), np.array([0.5, 0.0]))
    np.testing.assert_allclose(out.bias[0], st.level[0])  # coefficient 0: one level per frame
    np.testing.assert_array_equal(out.bias[1], st.bias[1])
    np.testing.assert_allclose(out.bias_var[0], 0.5) and np.testing.assert_array_equal(out.bias_var[1], st.bias_var[1])
    np.testing.assert_allclose(out.ob_cols + out.bias[:, :, None], st.ob_cols + st.bias[:, :, None], atol=1e-3)
    assert out.bias_source.tolist() == ["overscan x 0.000 (library transfer)", "overscan, shrunk per frame"]


def test_a_bias_only_library_predicts_bias_frames(tmp_path):
    S.simulate_archive(
        tmp_path / "lib", geometry="mini", seed=3, nights=2, darks_per_temp=0, bias_per_night=5, guide_per_night=0,
        progress=False,
    )  # fmt: skip
    nights = sorted((tmp_path / "lib").iterdir())
    shards = [extract([n], tmp_path / f"{n.name}.h5", MINI, progress=False).shard for n in nights]
    lib, held = shards[:1], shards[1]
    P.fit_physics(lib, tmp_path / "bias.h5", progress=False)
    with P.PhysicsModel(tmp_path / "bias.h5") as model, Shard(held) as s:
        info = model.camera("GS1")
        assert info.law.K == 1 and info.dark_exptimes == () and info.has_bias
        rows = np.arange(len(s))
        dark = model.predict_rows(s, rows)
        truth = s.active(rows).astype(np.float64)
        rmse = np.sqrt(np.mean((dark - truth) ** 2))
        read = np.sqrt(np.mean(s.table["floor"] ** 2))  # the simulator's noise floor of each frame
        assert rmse < 1.15 * read, (rmse, read)
        report = model.frame_report(s, rows)
        assert set(report["temperature_source"]) == {"exposure 0"} and set(report["status"]) == {"ok"}
        with pytest.raises(P.PhysicsError, match="only bias frames"):
            model.check_exposure("GS1", 30.0)
