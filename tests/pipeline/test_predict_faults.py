"""`predict` over a night with frames the model cannot serve: each is listed with its reason and
the rest of the night is predicted; an implausible frame state is flagged; an older predictions
file reads as all served; memory stays bounded by the batch (mini geometry, CPU)."""

from __future__ import annotations

import math
import shutil

import h5py
import numpy as np
import pytest

from deepdark import physics as P
from deepdark.cli import main
from deepdark.io.errors import DeepdarkError
from deepdark.io.frames import write_raw_frame
from deepdark.io.geometry import load_geometry
from deepdark.io.predictions import Predictions, write_predictions
from deepdark.io.shards import Shard
from deepdark.pipeline.extract import extract
from deepdark.pipeline.predict import predict_shard
from deepdark.sim import simulate as S
from tests.training import parts as T

MINI = load_geometry("mini")
QUICK = dict(epochs=1, crop=32, max_steps_per_epoch=3, progress=False, max_val_samples=4)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# file name -> (setpoint, exposure, header cards changed (None: removed)), and the verdict expected
NIGHT = {
    "GS1_dark_0001.fits": (-15.0, 30.0, {}, "ok", ""),
    "GS1_guide_0001.fits": (-15.0, 30.0, {"IMAGETYP": "OBJECT"}, "ok", ""),
    "nocam_dark_0001.fits": (-15.0, 30.0, {"CAMERA": None}, "unserved", "no camera name in its header"),
    "GS9_dark_0001.fits": (-15.0, 30.0, {"CAMERA": "GS9"}, "unserved", "no physics model for camera 'GS9'"),
    "GS1_dark_0002.fits": (-15.0, 10.0, {}, "unserved", "library has only 30 s darks: cannot predict 10 s"),
    "GS1_dark_0003.fits": (-45.0, 30.0, {"SETTEMP": -45.0}, "unserved", "below the library's coldest"),
    "GS1_dark_0004.fits": (-15.0, 30.0, {"CCDTEMP": 0.0}, "flagged", "CCDTEMP 0.00 C disagrees"),
    "GS1_dark_0005.fits": (-20.0, 30.0, {}, "ok", ""),
}


def _write_night(folder):
    model = S.camera_model("GS1", 0, MINI)
    for k, (name, (setpoint, exptime, cards, _, _)) in enumerate(NIGHT.items()):
        fr = S.simulate_frame(model, np.random.default_rng([57, k]), "DARK", setpoint, exptime)
        hdr = fr.header.copy()
        for key, value in cards.items():
            if value is None:
                del hdr[key]
            else:
                hdr[key] = value
        write_raw_frame(folder / name, fr.data, hdr)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """A 30 s library at -10 and -20 C, its physics model, a physics-mode model trained on it,
    and a night with one frame of each kind the model cannot serve or must flag."""
    root = tmp_path_factory.mktemp("faults")
    S.simulate_archive(
        root / "lib",
        geometry="mini",
        nights=2,
        seed=0,
        temperatures=(-10, -20),
        darks_per_temp=2,
        guide_per_night=0,
        progress=False,
    )
    nights = sorted((root / "lib").iterdir())
    lib = [extract([n], root / f"lib_{n.name}.h5", MINI, progress=False).shard for n in nights]
    P.fit_physics(lib, root / "phys.h5", progress=False)
    T.train(lib, root / "model", preset="physics", physics=root / "phys.h5", **QUICK)
    _write_night(root / "night" / "20240301")
    shard = extract([root / "night" / "20240301"], root / "night.h5", MINI, progress=False).shard
    return dict(root=root, lib=lib, phys=root / "phys.h5", model=root / "model", shard=shard)


def _check_verdicts(path, shard):
    """Every frame has the expected status and reason; unserved darks are NaN, the others finite."""
    with Predictions(path) as p, Shard(shard) as s:
        assert len(p) == len(s) == 4 * len(NIGHT)
        assert {"status", "reason"} <= set(p.table)
        dark = p.dark(np.arange(len(p)))
        for name, (*_, status, reason) in NIGHT.items():
            rows = np.flatnonzero(p.table["file"].str.endswith("/" + name).to_numpy())
            assert len(rows) == 4, name
            assert set(p.table["status"].iloc[rows]) == {status}, (name, list(p.table["reason"].iloc[rows]))
            got = p.table["reason"].iloc[rows].tolist()
            assert len(set(got)) == 1 and reason in got[0] and (got[0] == "") == (status == "ok"), (name, got)
            if status == "unserved":
                assert np.isnan(dark[rows]).all(), name
            else:
                assert np.isfinite(dark[rows]).all(), name
        return p.table, dark


def _flagged_rmse(table, dark, shard):
    """RMSE (window) of the flagged frame's prediction against its pixels, and its noise floor."""
    rows = np.flatnonzero(table["status"].eq("flagged").to_numpy())
    with Shard(shard) as s:
        truth = s.active(rows).astype(np.float64)
        floor = math.sqrt(np.mean(s.table["floor"].to_numpy()[rows] ** 2))
    r, c = MINI.window_in_active
    return math.sqrt(np.mean((dark[rows][:, r, c] - truth[:, r, c]) ** 2)), floor


def test_physics_predictions_list_what_cannot_be_served_and_predict_the_rest(sim):
    out = write_predictions(
        sim["shard"],
        sim["root"] / "phys_pred.h5",
        P.physics_predictor(sim["phys"], area="active"),
        {"method": "physics"},
        batch_size=3,
        progress=False,
    )
    table, dark = _check_verdicts(out, sim["shard"])
    rmse, floor = _flagged_rmse(table, dark, sim["shard"])
    assert rmse <= 1.1 * floor, (rmse, floor)
    # a predictor that does not say what predicted a row: the file's method, "" where unserved
    unserved = table["status"].eq("unserved").to_numpy()
    assert set(table["method"][unserved]) == {""} and set(table["method"][~unserved]) == {"physics"}
    ok = np.flatnonzero(table["status"].eq("ok").to_numpy())
    with Shard(sim["shard"]) as s:  # served frames: the prediction the model gives them alone
        np.testing.assert_allclose(dark[ok], P.PhysicsModel.load(sim["phys"]).predict_rows(s, ok), rtol=1e-6)


def test_model_predict_lists_what_cannot_be_served_and_predicts_the_rest(sim):
    out = sim["root"] / "model_pred.h5"
    argv = ["-q", "predict", "--model", str(sim["model"]), str(sim["shard"]), "--out", str(out)]
    assert main([*argv, "--batch-size", "3", "--device", "cpu"]) == 0
    table, dark = _check_verdicts(out, sim["shard"])
    rmse, floor = _flagged_rmse(table, dark, sim["shard"])
    assert rmse <= 1.2 * floor, (rmse, floor)
    served = ~table["status"].eq("unserved").to_numpy()
    assert set(table["method"][~served]) == {""} and set(table["method"][served]) <= {"physics", "physics+network"}


def test_a_strips_only_model_serves_every_frame_and_flags_foreign_cameras(sim, tmp_path):
    """The network reads only the frame's own strips: no library exposure or temperature limits
    it, but a camera it was not trained on is flagged."""
    T.train(sim["lib"], tmp_path / "strips", preset="compact", **QUICK)
    out = predict_shard(tmp_path / "strips", sim["shard"], tmp_path / "p.h5", device="cpu", progress=False)
    with Predictions(out) as p:
        assert np.isfinite(p.dark(np.arange(len(p)))).all()
        foreign = p.table["file"].str.endswith(("/nocam_dark_0001.fits", "/GS9_dark_0001.fits")).to_numpy()
        assert set(p.table["status"][~foreign]) == {"ok"} and set(p.table["reason"][~foreign]) == {""}
        assert set(p.table["status"][foreign]) == {"flagged"} and set(p.table["method"]) == {"network"}
        reason = p.table["reason"][foreign]
        assert reason.str.contains("not among the model's training cameras (GS1)", regex=False).all()
        assert reason.str.contains("no CAMERA card", regex=False).sum() == 4


def test_an_older_predictions_file_reads_as_all_served(sim, tmp_path):
    out = write_predictions(
        sim["shard"], tmp_path / "p.h5", lambda s, r: np.zeros((len(r), 68, 68)), {"method": "x"}, progress=False
    )
    with Predictions(out) as p:
        assert set(p.table["status"]) == {"ok"} and set(p.table["reason"]) == {""}
    damaged = tmp_path / "damaged.h5"
    shutil.copyfile(out, damaged)
    with h5py.File(out, "r+") as f:  # a file written before the columns existed: schema 1
        del f["table/status"], f["table/reason"], f["table/method"], f["terms"]
        f.attrs["schema_version"] = 1
    with Predictions(out) as p:
        assert len(p.table) == 4 * len(NIGHT)
        assert set(p.table["status"]) == {"ok"} and set(p.table["reason"]) == {""}
        assert set(p.table["method"]) == {"x"}  # the file's method
    with h5py.File(damaged, "r+") as f:  # schema 2 files have them: an unserved row must not read as served
        del f["table/status"]
    with pytest.raises(DeepdarkError, match=f"{damaged}: table column 'status' is missing"):
        Predictions(damaged)


def test_predict_reads_the_night_a_batch_at_a_time(sim, monkeypatch, tmp_path):
    """Memory stays flat: no step reads more than the frames of one batch's rows."""
    seen = []
    strips = Shard.strips

    def spy(self, rows, window=False):
        seen.append(len(rows))
        return strips(self, rows, window=window)

    monkeypatch.setattr(Shard, "strips", spy)
    predict_shard(sim["model"], sim["shard"], tmp_path / "p.h5", batch_size=3, device="cpu", progress=False)
    assert seen and max(seen) <= 2 * 4  # a batch of 3 rows touches at most two frames of 4 channels
    assert sum(seen) < 3 * 4 * len(NIGHT)
