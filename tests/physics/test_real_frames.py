"""Real bias frames of two public cameras (cropped copies in ``tests/data/realdata``, see its README):
the whole path, extract -> physics-fit -> predict, one frame left out of the fit at a time.

The Nickel Direct Camera's overscan rows scatter by pickup its image rows never see; the Kast
spectrograph's two amplifiers have their overscans after both images. Neither has optical black,
a model window or (Kast) a temperature card.
"""

import math
from pathlib import Path

import numpy as np
import pytest

from deepdark.io.frames import FrameError, Keywords, is_fits_name, read_frame, write_raw_frame
from deepdark.io.geometry import load_geometry
from deepdark.io.shards import Shard
from deepdark.io.units import SATURATED
from deepdark.physics import PhysicsError, PhysicsModel, fit_physics, row_bias
from deepdark.physics.frame_state import OVERSCAN_SKIP
from deepdark.pipeline.extract import extract

DATA = Path(__file__).resolve().parents[1] / "data" / "realdata"
KEYWORDS = {
    "nickel-direct": Keywords(imagetyp="OBSTYPE", ccdtemp="TEMPDET", date_obs="DATE-BEG"),
    "kast-blue": Keywords(imagetyp="OBSTYPE"),
}
WORSE_AT_MOST = 1.003  # the physics bias may be worse than one overscan level per frame by 0.3 %


def _files(camera):
    return sorted(p for p in (DATA / camera).iterdir() if is_fits_name(p))


def _geometry(camera):
    return load_geometry(DATA / camera / "geometry.yaml")


def _leave_one_out(camera, root):
    """Per frame (one shard each): active areas, overscan levels, the physics prediction of a
    fit on the other frames, and that fit's report of the frame."""
    g = _geometry(camera)
    shards = [extract([p], root / f"{p.name}.h5", g, KEYWORDS[camera], progress=False).shard for p in _files(camera)]
    act, level, dark, reports, transfers = [], [], [], [], []
    for i, held in enumerate(shards):
        model_path = fit_physics([s for s in shards if s != held], root / f"loo{i}.h5", progress=False)
        with PhysicsModel(model_path) as model, Shard(held) as s:
            rows = np.arange(len(s))
            act.append(s.active(rows).astype(np.float64))
            level.append(row_bias(s.strips(rows)["a1"], OVERSCAN_SKIP)[1])
            served = model.serve_rows(s, rows)
            assert served.unserved_reason() is None, served.unserved_reason()
            dark.append(served.dark)
            reports.append(model.frame_report(s, rows))
            transfers.append({ch: model.transfer(s.table["camera"].iloc[0], ch) for ch in s.table["channel"]})
            with pytest.raises(PhysicsError, match="only bias frames"):
                model.check_exposure(s.table["camera"].iloc[0], 30.0)
    return dict(act=np.stack(act), level=np.stack(level), dark=np.stack(dark), reports=reports, transfers=transfers)


@pytest.fixture(scope="module", params=sorted(KEYWORDS))
def run(request, tmp_path_factory):
    camera = request.param
    return camera, _leave_one_out(camera, tmp_path_factory.mktemp(camera))


def _scalar_errors(act, level):
    """Errors of one overscan level per frame plus the mean of the other frames minus their levels."""
    less = act - level[:, :, None, None]
    return np.stack(
        [act[i] - level[i][:, None, None] - np.delete(less, i, axis=0).mean(axis=0) for i in range(len(act))]
    )


def test_the_bias_prediction_is_never_worse_than_one_overscan_level_per_frame(run):
    camera, r = run
    act = r["act"]
    measured = ((act > 0) & (act < SATURATED)).all(axis=0)  # saturated pixels hold no measurement

    def rmse(err):
        return np.sqrt(np.sum(np.where(measured, err**2, 0.0), axis=(0, 2, 3)) / (len(err) * measured.sum((1, 2))))

    scalar, physics = rmse(_scalar_errors(act, r["level"])), rmse(act - r["dark"])
    assert (physics <= WORSE_AT_MOST * scalar).all(), (camera, physics / scalar)


def test_the_library_decides_how_far_the_overscan_is_trusted(run):
    camera, r = run
    report = r["reports"][0]
    assert set(report["status"]) == {"ok"} and set(report["temperature_source"]) == {"exposure 0"}
    if camera == "nickel-direct":
        # its overscan rows carry noise the image rows do not: the library uses (almost) none of it
        for transfers in r["transfers"]:
            tr = transfers["1"]
            assert tr.used and abs(tr.coefficient) < 0.3 and tr.sigma < 0.1, tr
        assert report["bias_source"].iloc[0].endswith("(library transfer)")
    else:  # two frames per fit cannot tell: each frame's own shrinkage stands
        for transfers in r["transfers"]:
            assert all(not tr.used and math.isnan(tr.coefficient) for tr in transfers.values())
        assert set(report["bias_source"]) == {"overscan, shrunk per frame"}


def test_real_headers_are_read_with_the_cameras_keywords(tmp_path):
    nickel = read_frame(_files("nickel-direct")[0], _geometry("nickel-direct"), KEYWORDS["nickel-direct"])
    assert (nickel.info.imagetyp, nickel.info.exptime) == ("DARK", 0.0)  # a zero-second dark: a bias
    assert nickel.info.ccdtemp == pytest.approx(-108.8, abs=0.01)  # TEMPDET
    kast = read_frame(_files("kast-blue")[0], _geometry("kast-blue"), KEYWORDS["kast-blue"])
    assert kast.info.exptime == 0.0 and math.isnan(kast.info.ccdtemp)  # no temperature card at all
    with pytest.raises(FrameError, match="IMAGETYP missing"):
        read_frame(_files("nickel-direct")[0], _geometry("nickel-direct"))


def test_only_zero_second_frames_may_lack_a_temperature(tmp_path):
    g = load_geometry("mini")
    data = np.full(g.frame_shape, 1000, np.uint16)
    base = {"IMAGETYP": "DARK", "DATE-OBS": "2024-01-01T13:00:00"}
    write_raw_frame(tmp_path / "zero.fits", data, {**base, "EXPTIME": 0.0})
    write_raw_frame(tmp_path / "dark.fits", data, {**base, "EXPTIME": 30.0, "SETTEMP": -15.0})
    write_raw_frame(tmp_path / "object.fits", data, {**base, "IMAGETYP": "OBJECT", "EXPTIME": 0.0, "CCDTEMP": -15.0})
    assert math.isnan(read_frame(tmp_path / "zero.fits", g).info.ccdtemp)
    with pytest.raises(FrameError, match="CCDTEMP missing"):
        read_frame(tmp_path / "dark.fits", g)
    with pytest.raises(FrameError, match="EXPTIME=0.0 must be > 0"):
        read_frame(tmp_path / "object.fits", g)


def test_a_shard_without_optical_black_stores_no_ob_strips(tmp_path):
    g = _geometry("kast-blue")
    shard = extract(_files("kast-blue")[:1], tmp_path / "k.h5", g, KEYWORDS["kast-blue"], progress=False).shard
    with Shard(shard) as s:
        assert "a2" not in s.f and "a3" not in s.f
        strips = s.strips(np.arange(len(s)))
        R, C = g.active.shape
        assert strips["a1"].shape == (2, R, 32) and strips["a2"].shape == (2, R, 0) and strips["a3"].shape == (2, 0, C)
        frame = read_frame(_files("kast-blue")[0], g, KEYWORDS["kast-blue"]).data
        np.testing.assert_array_equal(s.active([1])[0], frame[:, 256:512][:, ::-1])  # right amplifier, mirrored


def test_qa_of_a_camera_without_optical_black_says_where_the_temperature_comes_from(tmp_path):
    from deepdark.io.predictions import write_predictions
    from deepdark.physics import physics_predictor
    from deepdark.pipeline.qa import night_qa

    camera = "nickel-direct"
    g = _geometry(camera)
    files = _files(camera)
    library = extract(files[1:], tmp_path / "library.h5", g, KEYWORDS[camera], progress=False).shard
    night = extract(files[:1], tmp_path / "night.h5", g, KEYWORDS[camera], progress=False).shard
    model = fit_physics([library], tmp_path / "physics.h5", progress=False)
    pred = write_predictions(
        night, tmp_path / "pred.h5", physics_predictor(model, area="active"), {"method": "physics"}, progress=False
    )
    night_qa(night, pred, None, tmp_path / "qa", progress=False)
    page = (tmp_path / "qa" / "qa.html").read_text(encoding="utf-8")
    assert "has no optical black: each frame&#x27;s temperature is its header&#x27;s" in page
