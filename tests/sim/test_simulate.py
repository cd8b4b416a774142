"""The archive simulator: reproducible files, and the physics the pipeline's tests lean on."""

import time

import numpy as np
import pytest

from deepdark.io.frames import FLOOR_KEY, read_frame
from deepdark.io.geometry import load_geometry
from deepdark.sim import simulate as S

MINI = load_geometry("mini")


def _archive(out, **kw):
    args = dict(
        geometry="mini",
        nights=1,
        cameras=("GS1",),
        temperatures=(-15, -5),
        darks_per_temp=2,
        bias_per_night=1,
        guide_per_night=2,
        progress=False,
    )
    args.update(kw)
    return S.simulate_archive(out, **args)


def _region(frame_or_cube, name, g=MINI):
    """(n_channels, ...) stack of one region in readout coordinates, float64."""
    reg = g.active if name == "active" else g.regions[name]
    if frame_or_cube.shape == tuple(g.frame_shape):
        return np.stack([g.readout(frame_or_cube, ch)[reg.slices] for ch in g.channels]).astype(float)
    return frame_or_cube[(slice(None),) + reg.slices].astype(float)


def _frames(model, n, seed=0, **kw):
    return [S.simulate_frame(model, np.random.default_rng([seed, k]), **kw) for k in range(n)]


def test_archive_reproducible_readable_and_complete(tmp_path):
    a = _archive(tmp_path / "a", cameras=("GS1", "GS2"))
    b = _archive(tmp_path / "b", cameras=("GS1", "GS2"))
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(a, b))
    # 2 temperatures x 2 darks + 1 bias + 2 guide, per camera
    names = sorted(p.name for p in a)
    assert len(a) == 14 and "GS1_dark_0004.fits" in names and "GS2_bias_0001.fits" in names
    assert all(p.parent.name == "20240101" for p in a)
    other = _archive(tmp_path / "c", cameras=("GS1", "GS2"), seed=1)
    assert all(p.read_bytes() != q.read_bytes() for p, q in zip(a, other))
    order = {"dark": 0, "bias": 1, "guide": 2}
    dates = {}
    for p in sorted(a, key=lambda p: (p.name[:3], order[p.name.split("_")[1]], p.name)):
        f = read_frame(p, MINI)
        assert f.data.dtype == np.uint16 and f.data.shape == MINI.frame_shape
        kind = p.name.split("_")[1]
        assert f.info.imagetyp == {"dark": "DARK", "bias": "BIAS", "guide": "OBJECT"}[kind]
        assert f.info.camera == f.header["SIMCAM"] == p.name[:3] and f.header["SIMSEED"] == 0
        assert abs(f.info.ccdtemp - f.header["SIMTEMP"]) < 2.5 and abs(f.header["SIMTEMP"] - f.info.settemp) <= 1.0
        if kind == "guide":
            assert f.info.floor == {} and f.info.exptime in S.GUIDE_EXPTIMES
        else:
            assert set(f.info.floor) == {"1", "2", "3", "4"} and all(3 < v < 40 for v in f.info.floor.values())
            assert f.info.exptime == (0.0 if kind == "bias" else 30.0)
        dates.setdefault(f.info.camera, []).append(f.info.date_obs)
    for cam_dates in dates.values():  # darks, then bias, then guiding: time runs forward
        assert cam_dates == sorted(cam_dates) and len(set(cam_dates)) == len(cam_dates)


def test_frames_do_not_depend_on_loop_order_and_gzip_matches(tmp_path):
    alone = _archive(tmp_path / "a", cameras=("GS1",))
    mixed = _archive(tmp_path / "b", cameras=("GS2", "GS1"), compress=True)
    gz = {p.name: p for p in mixed}
    for p in alone:
        q = gz[p.name + ".gz"]
        assert np.array_equal(read_frame(p, MINI).data, read_frame(q, MINI).data)
        assert read_frame(p, MINI).header == read_frame(q, MINI).header


def test_cameras_differ_in_physics():
    a, b = S.camera_model("GS1", 0, MINI), S.camera_model("GS2", 0, MINI)
    for key in ("gain", "bias", "read_noise_e", "glow_e"):
        assert not np.allclose(a.params[key], b.params[key])
    for key in ("ring_centre", "ring_period", "ring_amplitude", "glow_length", "diffusion_share", "row_noise_adu"):
        assert a.params[key] != b.params[key]
    assert not np.array_equal(a.hot_idx, b.hot_idx)
    assert S.camera_model("GS1", 0, MINI) is a  # cached
    assert np.array_equal(S.CameraModel.build("GS1", 0, "mini").dep, a.dep)  # deterministic


def test_dark_normalisation_and_temperature_dependence():
    m = S.camera_model("GS1", 0, MINI)
    act = (slice(None),) + MINI.active.slices
    mean_ref = m.mean_electrons(S.T_REF, 30.0)[act].mean()
    assert 220 < mean_ref < 290  # paper 2.1: ~240 e- at -15 C, 30 s (plus hot pixels and glow)
    ratio_map = m.dark_rate(-5.0)[act] / m.dark_rate(-25.0)[act]
    assert 6 < np.median(ratio_map) < 20  # 2^(20/6.4) = 8.7, steeper with the diffusion share
    assert ratio_map.std() / ratio_map.mean() > 0.01  # the map's shape changes with temperature
    # observed: active minus overscan, per channel, hot over cold
    level = {}
    for setpoint in (-5.0, -25.0):
        fr = _frames(m, 3, setpoint=setpoint, exptime=30.0)
        level[setpoint] = np.mean(
            [
                np.median(_region(f.data, "active"), axis=(1, 2)) - np.median(_region(f.data, "overscan"), axis=(1, 2))
                for f in fr
            ]
        )
    assert 6 < level[-5.0] / level[-25.0] < 20


def test_exposure_scaling_and_glow_per_readout():
    m = S.camera_model("GS2", 0, MINI)
    e0, e5, e60 = (S.expected_dark(m, -15.0, t) for t in (0.0, 5.0, 60.0))
    np.testing.assert_allclose(e60 - e0, 12 * (e5 - e0), rtol=1e-3, atol=0.05)  # glow does not scale
    glow = _region(e0, "active") - m.bias[:, None, None] + 0.5
    assert glow[:, :3, :3].mean() > 20 and np.abs(glow[:, -10:, -10:]).max() < 1  # corner at the amp
    assert np.all(_region(e0, "overscan") == (m.bias - 0.5).astype(np.float32)[:, None, None])
    # observed: 60 s over 10 s darks
    sig = {
        t: np.mean(
            [
                np.median(_region(f.data, "active") - _region(f.data, "overscan").mean(axis=2, keepdims=True))
                for f in _frames(m, 3, exptime=t)
            ]
        )
        for t in (10.0, 60.0)
    }
    assert 4.5 < sig[60.0] / sig[10.0] < 7.5
    # observed glow in bias frames matches the model's
    bias = _frames(m, 6, imagetyp="BIAS")
    res = np.mean([_region(f.data, "active") - (m.bias + f.bias_offsets)[:, None, None] + 0.5 for f in bias], axis=0)
    assert abs(res[:, :3, :3].mean() - glow[:, :3, :3].mean()) < 3
    assert abs(np.median(res[:, -20:, -20:])) < 1.5


def test_overscan_has_no_dark_current_but_shows_row_noise():
    m = S.camera_model("GS1", 0, MINI)
    frames = _frames(m, 6, setpoint=-5.0, exptime=30.0)
    x, y = [], []
    for f in frames:
        base = (m.bias + f.bias_offsets)[:, None, None] - 0.5
        ov, ob, act = (_region(f.data, r) - base for r in ("overscan", "ob_cols", "active"))
        assert np.all(np.abs(np.median(ov, axis=(1, 2))) < 1.5)  # virtual: bias + readout only
        dark = np.median(act, axis=(1, 2))
        assert np.all(dark > 100)
        assert np.all(np.abs(np.median(ob, axis=(1, 2)) / dark - 1) < 0.35)  # masked, but real silicon
        no_rows = S.expected_dark(m, f.temperature, 30.0, f.bias_offsets)
        act_resid = act + base - _region(no_rows, "active")
        x.append(ov.mean(axis=2).ravel())
        y.append(np.median(act_resid, axis=2).ravel())
        np.testing.assert_allclose(
            _region(f.expected, "overscan") - base, f.row_offsets[:, 4:72, None] * np.ones((1, 1, 46)), atol=1e-3
        )
    r = np.corrcoef(np.concatenate(x), np.concatenate(y))[0, 1]
    assert r > 0.3, r


def test_floor_matches_read_and_shot_noise():
    m = S.camera_model("GS1", 0, MINI)
    win = (slice(None),) + MINI.window.slices
    ratios = []
    for kind, t in (("DARK", 30.0), ("BIAS", 0.0)):
        for f in _frames(m, 3, imagetyp=kind, exptime=t):
            shot = m.mean_electrons(f.temperature, t)[win].mean(axis=(1, 2))
            predicted = np.sqrt((m.read_noise_e**2 + shot) / m.gain**2 + 1 / 12)
            got = np.array([f.header[FLOOR_KEY.format(ch.name)] for ch in MINI.channels])
            ratios.extend(got / predicted)
    assert 0.9 < np.median(ratios) < 1.1, ratios
    assert np.percentile(ratios, 25) > 0.85


def test_guide_frames_have_light_only_on_the_active_area():
    m = S.camera_model("GS1", 0, MINI)
    f = S.simulate_frame(m, np.random.default_rng(7), imagetyp="OBJECT", exptime=60.0)
    assert f.header["IMAGETYP"] == "OBJECT" and not f.floor and FLOOR_KEY.format("1") not in f.header
    res = {r: _region(f.data, r) - _region(f.expected, r) for r in ("active", "ob_cols", "ob_rows", "overscan")}
    assert np.all(np.median(res["active"], axis=(1, 2)) > 150)  # sky: hundreds of e- in 60 s
    assert res["active"].max() > np.median(res["active"]) + 500  # at least one star
    noise = (m.read_noise_e / m.gain).max()
    assert np.abs(res["overscan"]).max() < 7 * noise
    for r in ("ob_cols", "ob_rows"):
        assert np.all(np.abs(np.median(res[r], axis=(1, 2))) < 3)


def test_rings_continuous_across_channels():
    m = S.camera_model("GS1", 0, MINI)
    mos = MINI.mosaic({ch.name: m.diff[i][MINI.active.slices] for i, ch in enumerate(MINI.channels)})
    ar, ac = MINI.active.shape
    step_in = max(np.abs(np.diff(mos, axis=0)).max(), np.abs(np.diff(mos, axis=1)).max())
    assert np.abs(mos[ar] - mos[ar - 1]).max() <= 1.5 * step_in
    assert np.abs(mos[:, ac] - mos[:, ac - 1]).max() <= 1.5 * step_in


@pytest.mark.slow
def test_full_size_frame():
    t0 = time.perf_counter()
    m = S.camera_model("GS3", 0, "lamost-kaf4320")
    t1 = time.perf_counter()
    f = S.simulate_frame(m, np.random.default_rng(0), imagetyp="DARK", exptime=30.0)
    t2 = time.perf_counter()
    print(f"camera model {t1 - t0:.2f} s, frame {t2 - t1:.2f} s")
    assert f.data.shape == (2094, 2200) and f.data.dtype == np.uint16
    assert f.expected.shape == (4, 1047, 1100) and f.expected.dtype == np.float32
    assert set(f.floor) == {"1", "2", "3", "4"}
