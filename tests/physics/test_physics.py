"""The classical physics predictor: frame state, effective temperature, per-pixel maps, exposures.

Tests may use the simulator's truth (row offsets, SIMTEMP, the noise floor); the pipeline never does.
"""

import json

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from deepdark import physics as P
from deepdark.cli import main
from deepdark.evaluation.evaluate import evaluate
from deepdark.io.geometry import load_geometry
from deepdark.io.predictions import Predictions, write_predictions
from deepdark.io.shards import Shard
from deepdark.io.strips import channel_strips
from deepdark.physics.fit import _chunk_rows
from deepdark.physics.frame_state import OVERSCAN_SKIP
from deepdark.physics.model import _header_temperature
from deepdark.physics.pixelfit import smooth_weighted
from deepdark.pipeline.baseline import build_masters
from deepdark.pipeline.extract import extract
from deepdark.sim import simulate as S

MINI = load_geometry("mini")
TEMPS = (-5, -10, -15, -25)


def _archive(root, name, **kw):
    args = dict(geometry="mini", seed=5, cameras=("GS1",), temperatures=TEMPS, guide_per_night=0, progress=False)
    args.update(kw)
    S.simulate_archive(root / name, **args)
    shards = []
    for night in sorted((root / name).iterdir()):
        shards.append(extract([night], root / f"{name}_{night.name}.h5", MINI, progress=False).shard)
    return shards


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """A 10 s + 30 s library (4 nights), a 30 s test night, and a night of 5 s and 60 s darks."""
    root = tmp_path_factory.mktemp("physics")
    lib = _archive(root, "lib", nights=4, darks_per_temp=3, dark_exptimes=(10.0, 30.0))
    test = _archive(root, "test", nights=1, darks_per_temp=3, dark_exptimes=(30.0,), first_night="20240301")
    other = _archive(
        root, "other", nights=1, darks_per_temp=2, dark_exptimes=(5.0, 60.0), first_night="20240401", guide_per_night=2
    )
    P.fit_physics(lib, root / "phys.h5", progress=False)
    build_masters(lib, root / "masters.h5", progress=False)
    return dict(root=root, lib=lib, test=test, other=other, phys=root / "phys.h5", masters=root / "masters.h5")


# -- frame state ----------------------------------------------------------------------------------


@pytest.mark.parametrize("camera", ["GS1", "GS2"])
def test_row_bias_recovers_the_simulated_row_offsets(camera):
    model = S.camera_model(camera, 0, MINI)
    a = MINI.active
    est, naive, truth = [], [], []
    for k in range(25):
        fr = S.simulate_frame(model, np.random.default_rng([7, k]), "DARK", -15.0, 30.0)
        strips = channel_strips(fr.data, MINI)
        for i, ch in enumerate(MINI.channels):
            a1 = strips[ch.name]["a1"]
            est.append(P.row_bias(a1)[0])
            naive.append(np.median(a1, axis=1))
            truth.append(model.bias[i] + fr.bias_offsets[i] + fr.row_offsets[i][a.r0 : a.r1] - 0.5)
    est, naive, truth = map(np.concatenate, (est, naive, truth))
    err, err_naive = np.sqrt(np.mean((est - truth) ** 2)), np.sqrt(np.mean((naive - truth) ** 2))
    row_sd = model.row_noise_adu
    # the best any estimator can do from 42 overscan pixels with white row noise (posterior sd)
    read = float(np.mean(model.read_noise_e / model.gain))
    est_var = read**2 / (46 - OVERSCAN_SKIP)
    optimum = np.sqrt(row_sd**2 * est_var / (row_sd**2 + est_var))
    assert err < 0.7 * row_sd, (err, row_sd)
    assert err < 1.15 * optimum, (err, optimum)
    assert err < 0.8 * err_naive  # the median of 46 integers: quantised and noisier
    assert abs(np.mean(est - truth)) < 0.1  # unbiased, the floor's -0.5 included


def test_overscan_skip_leaves_out_the_first_columns():
    rng = np.random.default_rng(0)
    a1 = rng.normal(1000, 5, (3, 40, 46)).round()
    spoiled = a1.copy()
    spoiled[..., :4] += 10.0  # charge residue in the first overscan columns
    np.testing.assert_allclose(P.row_bias(spoiled, skip=4)[0], P.row_bias(a1, skip=4)[0])
    shift = P.row_bias(spoiled, skip=0, shrink=False)[0] - P.row_bias(a1, skip=0, shrink=False)[0]
    assert np.median(shift) == pytest.approx(10 * 4 / 46) and shift.mean() > 0.7  # only skipping removes it
    gross = a1.copy()
    gross[..., :4] += 200.0  # gross outliers are clipped even without a skip
    assert np.abs(P.row_bias(gross, skip=0)[0] - P.row_bias(a1, skip=0)[0]).max() < 0.5
    with pytest.raises(ValueError, match="overscan"):
        P.row_bias(a1, skip=45)


def test_frame_state_shapes_and_ob_minus_overscan():
    model = S.camera_model("GS1", 0, MINI)
    fr = S.simulate_frame(model, np.random.default_rng(1), "DARK", -15.0, 30.0)
    strips = channel_strips(fr.data, MINI)
    st = P.frame_state({s: np.stack([strips[c.name][s] for c in MINI.channels]) for s in ("a1", "a2", "a3")})
    R, C = MINI.active.shape
    assert st.bias.shape == (4, R) and st.ob_cols.shape == (4, R, 4) and st.ob_rows.shape == (4, 4, C)
    # OB minus overscan is the OB pixels' dark signal: compare with the simulator's expectation
    ob = MINI.regions["ob_cols"]
    for i in range(4):
        expected = fr.expected[i][ob.slices] - (
            model.bias[i] + fr.bias_offsets[i] + fr.row_offsets[i][ob.r0 : ob.r1, None] - 0.5
        )
        assert abs(st.ob_cols[i].mean() - expected.mean()) < 1.0


# -- effective temperature ------------------------------------------------------------------------


def test_effective_temperature_beats_ccdtemp(sim):
    model = P.PhysicsModel.load(sim["phys"])
    err_t, err_h = [], []
    for path in sim["test"] + sim["other"]:
        with Shard(path) as s:
            rows = np.flatnonzero((s.table["imagetyp"] == "DARK").to_numpy())
            temps = model.temperatures(model.state(s.strips(rows)), s.table.iloc[rows])
            for k, r in enumerate(rows):
                rec = s.table.iloc[r]
                true = fits.getheader(rec["file"])["SIMTEMP"]
                err_t.append(temps.teff[k] - true)
                err_h.append(rec["ccdtemp"] - true)
            assert set(temps.source) <= {"ob", "ob+ccdtemp"}
    rms_t, rms_h = np.sqrt(np.mean(np.square(err_t))), np.sqrt(np.mean(np.square(err_h)))
    assert rms_t < 0.6 * rms_h, (rms_t, rms_h)
    assert rms_t < 0.3
    # the library's own frames: temperatures from their active areas
    lf = model.library_frames("GS1").drop_duplicates("file")
    lf = lf[lf["exptime"] > 0]
    true = np.array([fits.getheader(f)["SIMTEMP"] for f in lf["file"]])
    assert np.sqrt(np.mean((lf["teff"] - true) ** 2)) < 0.4 * np.sqrt(np.mean((lf["ccdtemp"] - true) ** 2))


def test_header_temperature_fallback_order():
    tab = pd.DataFrame(dict(ccdtemp=[-14.0, np.nan, np.nan], settemp=[-15.0, -15.0, np.nan]))
    assert _header_temperature(tab.iloc[0]) == (-14.0, "ccdtemp")
    assert _header_temperature(tab.iloc[1]) == (-15.0, "settemp")
    assert np.isnan(_header_temperature(tab.iloc[2])[0])


# -- the predictor --------------------------------------------------------------------------------


def _excess(row, method):
    """Error variance beyond the noise floor, ADU^2."""
    return row[method] ** 2 - row["floor"] ** 2


def test_physics_reaches_the_floor_on_a_held_out_night(sim):
    table = evaluate(
        sim["test"],
        sim["masters"],
        sim["root"] / "eval",
        predictors={"physics": P.physics_predictor(sim["phys"])},
        progress=False,
        figures=False,
    )
    assert set(table) == {"total", *map(str, TEMPS)}
    for group, row in table.items():
        assert row["physics"] <= 1.05 * row["floor"], (group, row)
        assert _excess(row, "physics") < 0.4 * _excess(row, "median_temp"), (group, row)
    assert table["total"]["physics"] <= 1.03 * table["total"]["floor"]


def test_exposures_outside_a_two_exposure_library(sim):
    table = evaluate(
        sim["other"],
        sim["masters"],
        sim["root"] / "eval2",
        predictors={"physics": P.physics_predictor(sim["phys"])},
        progress=False,
        figures=False,
    )
    for group, row in table.items():
        assert row["physics"] <= 1.08 * row["floor"], (group, row)
        assert row["physics"] < row["median_temp"], (group, row)
    assert table["total"]["physics"] <= 1.05 * table["total"]["floor"]
    model = P.PhysicsModel.load(sim["phys"])
    model.check_exposure("GS1", 60.0)  # 2x the longest: allowed
    model.check_exposure("GS1", 0.0)  # the glow alone
    with pytest.raises(P.PhysicsError, match="beyond 2x the longest"):
        model.check_exposure("GS1", 61.0)
    with pytest.raises(P.PhysicsError, match="no physics model for camera 'GS9'"):
        model.check_exposure("GS9", 30.0)


def test_single_exposure_library_refuses_other_exposures(sim, tmp_path):
    lib = _archive(tmp_path, "one", nights=2, darks_per_temp=2, dark_exptimes=(30.0,))
    P.fit_physics(lib, tmp_path / "one.h5", progress=False)
    model = P.PhysicsModel.load(tmp_path / "one.h5")
    assert not model.camera("GS1").separable
    with Shard(sim["other"][0]) as s:  # 5 s and 60 s darks
        rows = np.flatnonzero((s.table["exptime"] == 5.0).to_numpy())[:4]
        with pytest.raises(
            P.PhysicsError,
            match="library has only 30 s darks: cannot predict 5 s without bias frames or a second exposure time",
        ):
            model.predict_rows(s, rows)
    with Shard(sim["test"][0]) as s:  # 30 s: fine
        rows = np.arange(4)
        assert model.predict_rows(s, rows, window=True).shape == (4, 64, 64)
    # the same library plus bias frames separates glow from dark current
    lib = _archive(tmp_path, "bias", nights=2, darks_per_temp=2, dark_exptimes=(30.0,), bias_per_night=3)
    P.fit_physics(lib, tmp_path / "bias.h5", progress=False)
    assert P.PhysicsModel.load(tmp_path / "bias.h5").camera("GS1").separable
    table = evaluate(
        sim["other"],
        None,
        tmp_path / "ev",
        progress=False,
        figures=False,
        predictors={"physics": P.physics_predictor(tmp_path / "bias.h5")},
    )
    assert table["total"]["physics"] <= 1.12 * table["total"]["floor"]


def test_chunked_fit_equals_unchunked(sim, tmp_path):
    lib = sim["lib"][:2]
    P.fit_physics(lib, tmp_path / "whole.h5", progress=False)
    P.fit_physics(lib, tmp_path / "rows.h5", memory_mb=0, progress=False)  # one active row at a time
    assert _chunk_rows(48, MINI.active.shape[1], 0) == 1
    with P.PhysicsModel(tmp_path / "whole.h5") as a, P.PhysicsModel(tmp_path / "rows.h5") as b:
        for ch in "1234":
            ma, mb = a.channel("GS1", ch), b.channel("GS1", ch)
            np.testing.assert_allclose(ma.maps, mb.maps, rtol=1e-5, atol=1e-3)
            np.testing.assert_allclose(ma.ob_cols, mb.ob_cols, rtol=1e-5, atol=1e-3)
            np.testing.assert_array_equal(ma.hot_index, mb.hot_index)
        fa, fb = a.library_frames("GS1"), b.library_frames("GS1")
        np.testing.assert_allclose(fa["noise_var"], fb["noise_var"], rtol=1e-6)


def test_active_predictions_and_the_conditioning_api(sim, tmp_path):
    path = sim["other"][0]  # has guide frames of 5-60 s too
    out = write_predictions(
        path,
        tmp_path / "pred.h5",
        P.physics_predictor(sim["phys"], area="active"),
        {"method": "physics"},
        progress=False,
    )
    model = P.PhysicsModel.load(sim["phys"])
    with Predictions(out) as pr, Shard(path) as s:
        assert pr.f["dark"].shape == (len(s), *MINI.active.shape)
        rows = np.flatnonzero((s.table["imagetyp"] == "OBJECT").to_numpy())[:4]
        assert len(rows) == 4
        np.testing.assert_allclose(pr.dark(rows), model.predict_rows(s, rows), rtol=1e-6)
        # part 4's input: predictions from strips and table rows; the window is a slice of the whole
        rows = np.flatnonzero((s.table["file"] == s.table["file"].iloc[0]).to_numpy())
        whole = model.predict(s.strips(rows), s.table.iloc[rows])
        win = model.predict(s.strips(rows), s.table.iloc[rows], window=True)
        np.testing.assert_array_equal(win, whole[:, 2:66, 2:66])
        np.testing.assert_allclose(whole, pr.dark(rows), rtol=1e-6)


def test_cli_physics_fit_and_evaluate(sim, tmp_path):
    lib = [str(p) for p in sim["lib"]]
    assert main(["-q", "physics-fit", *lib, "--out", str(tmp_path / "p.h5")]) == 0
    assert (
        main(
            [
                "-q",
                "evaluate",
                "--test",
                *map(str, sim["test"]),
                "--baseline",
                str(sim["masters"]),
                "--physics",
                str(tmp_path / "p.h5"),
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    table = json.loads((tmp_path / "ev" / "table1.json").read_text())
    assert list(table["total"])[:4] == ["median_all", "median_temp", "physics", "floor"]
    assert main(["-q", "physics-fit", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "x.h5")]) == 2


# -- pieces ---------------------------------------------------------------------------------------


def test_fit_law_recovers_doubling_temperatures():
    rng = np.random.default_rng(3)
    setpoints = np.repeat([-5.0, -10.0, -15.0, -25.0], 12)
    true_T = setpoints + rng.uniform(-1, 1, setpoints.size)
    header = np.round(true_T + rng.normal(0, 0.5, setpoints.size), 1)
    t = np.tile([10.0, 30.0], setpoints.size // 2)
    d1, d2, g = rng.uniform(3, 6, 300), rng.uniform(0.5, 2, 300), rng.uniform(0, 50, 300)
    truth = P.Law(-15.0, 8.0, 3.6)
    Y = truth.design(true_T, t) @ np.stack([d1, d2, g]) + rng.normal(0, 0.05, (setpoints.size, 300))
    law, T, _ = P.fit_law(Y, t, header, setpoints)
    assert law.components == 2
    assert np.sqrt(np.mean((T - true_T) ** 2)) < 0.15 < np.sqrt(np.mean((header - true_T) ** 2))
    assert abs(law.tau1 - 8.0) < 1.0 and abs(law.tau2 - 3.6) < 0.5


@pytest.mark.parametrize("values", [800, 17 * 200, 199 * 18, 1])
def test_fit_law_a_part_of_the_frames_at_a_time_equals_all_at_once(values):
    """The law's block means read and their residuals formed ``part_values`` at a time (a few
    frames, or a few blocks of every dark frame), so that a library of 20,000 darks does not
    hold them: the law, every frame's temperature and the block maps equal those of one part, to
    the bit (biases among the frames; 200 blocks; parts of 4, 17 and 2 frames of 18 darks, the
    17 leaving one; of 44, 188 and 199 blocks, the 199 leaving one; and the least parts)."""

    rng = np.random.default_rng(5)
    setpoints = np.repeat([-5.0, -15.0, -25.0], 9)
    true_T = setpoints + rng.uniform(-1, 1, setpoints.size)
    header = np.round(true_T + rng.normal(0, 0.5, setpoints.size), 1)
    t = np.tile([10.0, 30.0, 0.0], setpoints.size // 3)
    maps = np.stack([rng.uniform(3, 6, 200), rng.uniform(0.5, 2, 200), rng.uniform(0, 50, 200)])
    Y = P.Law(-15.0, 8.0, 3.6).design(true_T, t) @ maps + rng.normal(0, 0.05, (setpoints.size, 200))
    whole = P.fit_law(Y, t, header, setpoints)
    parts = P.fit_law(Y, t, header, setpoints, part_values=values)
    assert (parts[0].T0, parts[0].tau1, parts[0].tau2) == (whole[0].T0, whole[0].tau1, whole[0].tau2)
    np.testing.assert_array_equal(parts[1], whole[1])
    np.testing.assert_array_equal(parts[2], whole[2])


def test_smooth_weighted_is_a_normalised_convolution():
    rng = np.random.default_rng(0)
    w = rng.uniform(0.5, 2, (30, 40))
    np.testing.assert_allclose(smooth_weighted(np.full((30, 40), 7.0), w, 3), 7.0)
    ramp = np.add.outer(np.arange(30.0), 2 * np.arange(40.0))
    np.testing.assert_allclose(smooth_weighted(ramp, np.ones_like(ramp), 3)[9:-9, 9:-9], ramp[9:-9, 9:-9])
    w[10:20, 10:20] = 0  # holes are filled from their neighbours
    assert np.isfinite(smooth_weighted(ramp, w, 3)).all()
