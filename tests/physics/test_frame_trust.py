"""Which frame states the physics model trusts: a header temperature that contradicts the
optical-black estimate is flagged and the estimate used; a temperature far outside the library,
a camera or an exposure the library lacks leaves the frame unserved, with the reason.

Tests may use the simulator's truth (SIMTEMP, the noise floor); the pipeline never does.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from deepdark import physics as P
from deepdark.io.errors import DeepdarkError
from deepdark.io.frames import write_raw_frame
from deepdark.io.geometry import load_geometry
from deepdark.io.shards import Shard
from deepdark.physics.frame_state import OVERSCAN_SKIP
from deepdark.physics.model import Temperatures
from deepdark.pipeline.extract import extract
from deepdark.sim import simulate as S

MINI = load_geometry("mini")
LIBRARY_TEMPS = (-10, -20)


def _frame(path, setpoint, exptime=30.0, seed=0, **header):
    """A simulated DARK of camera GS1 at ``setpoint``, written with ``header`` cards changed
    (a value of None removes the card)."""
    model = S.camera_model("GS1", 0, MINI)
    fr = S.simulate_frame(model, np.random.default_rng([91, seed]), "DARK", setpoint, exptime)
    hdr = fr.header.copy()
    for key, value in header.items():
        if value is None:
            del hdr[key]
        else:
            hdr[key] = value
    write_raw_frame(path, fr.data, hdr)
    return fr


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """A 30 s library at -10 and -20 C, its physics model, and a night of frames to judge."""
    root = tmp_path_factory.mktemp("trust")
    S.simulate_archive(
        root / "lib",
        geometry="mini",
        nights=2,
        seed=0,
        temperatures=LIBRARY_TEMPS,
        darks_per_temp=2,
        guide_per_night=0,
        progress=False,
    )
    nights = sorted((root / "lib").iterdir())
    lib = [extract([n], root / f"lib_{n.name}.h5", MINI, progress=False).shard for n in nights]
    P.fit_physics(lib, root / "phys.h5", progress=False)
    night = root / "night" / "20240301"
    truth = {
        "honest": _frame(night / "GS1_dark_0001.fits", -15.0, seed=1),
        "ccdtemp0": _frame(night / "GS1_dark_0002.fits", -15.0, seed=1, CCDTEMP=0.0),
        "cold": _frame(night / "GS1_dark_0003.fits", -45.0, seed=2, SETTEMP=-45.0),
        "warm": _frame(night / "GS1_dark_0004.fits", 12.0, seed=3, SETTEMP=12.0),
        "edge": _frame(night / "GS1_dark_0005.fits", -23.0, seed=4, SETTEMP=-23.0),
    }
    shard = extract([night], root / "night.h5", MINI, progress=False).shard
    return dict(root=root, phys=root / "phys.h5", shard=shard, truth=truth)


def _rows(shard, name):
    return np.flatnonzero(shard.table["file"].str.endswith(name).to_numpy())


def test_physics_error_is_a_user_error():
    assert issubclass(P.PhysicsError, DeepdarkError) and issubclass(P.PhysicsError, ValueError)


def test_implausible_header_temperature_is_flagged_and_the_ob_estimate_used(sim):
    model = P.PhysicsModel.load(sim["phys"])
    with Shard(sim["shard"]) as s:
        honest, bad = _rows(s, "GS1_dark_0001.fits"), _rows(s, "GS1_dark_0002.fits")
        assert (s.table["ccdtemp"].to_numpy()[bad] == 0.0).all()
        served = model.serve_rows(s, np.concatenate([honest, bad]))
        status, reason = served.status[len(honest) :], served.reason[len(honest) :]
        assert list(served.status[: len(honest)]) == ["ok"] * len(honest)
        assert set(status) == {"flagged"} and len(set(reason)) == 1
        true_T = sim["truth"]["ccdtemp0"].temperature
        # the reason names both temperatures and says which one the prediction used
        assert "CCDTEMP 0.00 C" in reason[0] and "optical-black" in reason[0]
        ob_T = float(reason[0].split("optical-black estimate ")[1].split(" C")[0])
        assert abs(ob_T - true_T) < 1.0, (reason[0], true_T)
        # the estimate does not depend on the wrong header it started from: the honest twin's
        honest_T = model.temperatures(model.state(s.strips(honest)), s.table.iloc[honest]).teff[0]
        assert abs(ob_T - honest_T) < 0.01, (ob_T, honest_T)
        # the prediction is the honest twin's (the same pixels): near the noise floor (a small
        # library's), not hundreds of ADU off
        dark, truth = served.dark[len(honest) :], s.active(bad).astype(np.float64)
        r, c = MINI.window_in_active
        rmse = math.sqrt(np.mean((dark[:, r, c] - truth[:, r, c]) ** 2))
        rmse_honest = math.sqrt(np.mean((served.dark[: len(honest), r, c] - truth[:, r, c]) ** 2))
        floor = math.sqrt(np.mean(s.table["floor"].to_numpy()[bad] ** 2))
        assert rmse <= 1.2 * floor and rmse <= 1.01 * rmse_honest, (rmse, rmse_honest, floor)
        np.testing.assert_allclose(dark, served.dark[: len(honest)], rtol=1e-3, atol=1.0)
        # the header's temperature would have been far off: the flag is what a user must see
        temps = model.temperatures(model.state(s.strips(bad)), s.table.iloc[bad])
        assert set(temps.source) == {"ob"} and temps.teff[0] == pytest.approx(ob_T, abs=0.005)
        at_header = Temperatures(np.zeros(len(bad)), np.ones(len(bad)), np.full(len(bad), "ccdtemp"))
        header_dark = model.predict(s.strips(bad), s.table.iloc[bad], temps=at_header)
        assert math.sqrt(np.mean((header_dark[:, r, c] - truth[:, r, c]) ** 2)) > 20 * floor


def test_temperature_far_outside_the_library_is_unserved_with_its_distance(sim):
    model = P.PhysicsModel.load(sim["phys"])
    lo, hi = model.temperature_range("GS1")
    margin = model.temperature_margin("GS1")
    assert lo < -19 and hi > -11 and 3 < margin < 15
    with Shard(sim["shard"]) as s:
        for name, side, edge in (("GS1_dark_0003.fits", "below", lo), ("GS1_dark_0004.fits", "above", hi)):
            rows = _rows(s, name)
            served = model.serve_rows(s, rows)
            assert set(served.status) == {"unserved"} and np.isnan(served.dark).all()
            reason = served.reason[0]
            assert f"{side} the library's" in reason and f"{edge:.1f} C" in reason and f"{margin:.1f} C" in reason
            outside = float(reason.split(" C " + side)[0].rsplit(" ", 1)[1])
            assert outside > margin
            with pytest.raises(P.PhysicsError, match=f"{side} the library's"):
                model.predict_rows(s, rows)
        # a few degrees beyond the library: extrapolated, served
        rows = _rows(s, "GS1_dark_0005.fits")
        assert set(model.serve_rows(s, rows).status) == {"ok"}


def test_camera_and_exposure_the_library_lacks_are_unserved(sim, tmp_path):
    night = tmp_path / "20240302"
    _frame(night / "none.fits", -15.0, seed=5, CAMERA=None)
    _frame(night / "gs9.fits", -15.0, seed=6, CAMERA="GS9")
    _frame(night / "short.fits", -15.0, exptime=10.0, seed=7)
    shard = extract([night], tmp_path / "n.h5", MINI, progress=False).shard
    model = P.PhysicsModel.load(sim["phys"])
    with Shard(shard) as s:
        served = model.serve_rows(s, np.arange(len(s)))
        by_file = dict(zip(s.table["file"].str.rsplit("/", n=1).str[-1], served.reason, strict=True))
        assert set(served.status) == {"unserved"} and np.isnan(served.dark).all()
    assert "no camera name in its header" in by_file["none.fits"]
    assert "no physics model for camera 'GS9'" in by_file["gs9.fits"]
    assert "library has only 30 s darks: cannot predict 10 s" in by_file["short.fits"]


def test_a_frame_whose_overscan_holds_no_measurement_is_not_served(sim, tmp_path):
    """A bright source or a fault that saturates (or zeroes) most of a channel's overscan rows
    leaves no row bias: the dark would carry that level (60,000 ADU), so the frame is unserved
    with the reason; a few saturated overscan pixels are clipped out of the row means."""
    import shutil

    import h5py

    shard = tmp_path / "night.h5"
    shutil.copyfile(sim["shard"], shard)
    with Shard(shard) as s:
        blind, speckled = _rows(s, "GS1_dark_0001.fits"), _rows(s, "GS1_dark_0005.fits")
    with h5py.File(shard, "r+") as f:
        a1 = f["a1"][()]
        a1[blind[1], 5:40, OVERSCAN_SKIP:] = 65535  # channel 2: 35 rows saturated
        a1[blind[3], :, OVERSCAN_SKIP:] = 0  # channel 4: read out as zeros
        a1[speckled[0], ::3, -2:] = 65535  # a few saturated pixels in a third of the rows
        f["a1"][...] = a1
    model = P.PhysicsModel.load(sim["phys"])
    with Shard(shard) as s:
        served = model.serve_rows(s, np.concatenate([blind, speckled]))
        assert set(served.status[: len(blind)]) == {"unserved"}
        reason = served.reason[0]
        assert "overscan saturated or empty" in reason and "(35 of" in reason and "GS1_dark_0001.fits" in reason
        assert set(served.status[len(blind) :]) == {"ok"} and np.isfinite(served.dark[len(blind) :]).all()
