import numpy as np
import pytest

from deepdark.io.frames import write_raw_frame
from deepdark.io.shards import Shard, quarantine_path, read_quarantine
from deepdark.pipeline.extract import extract
from tests.conftest import header, random_frame

# The contract's mini geometry, written out independently of deepdark.io.geometry:
# channel -> (row0, col0, flip_rows, flip_cols); channel 73 x 126.
CHANNELS = {
    "1": (0, 0, False, False),
    "2": (0, 126, False, True),
    "3": (73, 0, True, False),
    "4": (73, 126, True, True),
}


def frame_pixels(frame, ch, rows, cols):
    """Pixels at readout (rows, cols) of channel ``ch``, by explicit index arithmetic."""
    row0, col0, fr, fc = CHANNELS[ch]
    r = np.arange(*rows)
    c = np.arange(*cols)
    fr_rows = row0 + (72 - r if fr else r)
    fr_cols = col0 + (125 - c if fc else c)
    return frame[np.ix_(fr_rows, fr_cols)]


def test_strips_equal_fits_pixels_at_spec_coordinates(tmp_path, mini):
    frames = [random_frame(mini, s) for s in range(3)]
    for i, f in enumerate(frames):
        write_raw_frame(tmp_path / "20240102" / f"GS1_dark_{i}.fits", f, header())
    res = extract([tmp_path / "20240102"], tmp_path / "n.h5", mini, progress=False)
    assert (res.n_frames, res.n_quarantined) == (3, 0)
    with Shard(tmp_path / "n.h5") as s:
        assert len(s) == 12 and set(s.table["night"]) == {"20240102"}
        for row, rec in s.table.iterrows():
            f = frames[int(rec["file"][-6])]
            ch = rec["channel"]
            strips = s.strips([row], window=True)
            # window: active rows 4..72 offset 2 -> rows 6..70, cols 14..78
            np.testing.assert_array_equal(strips["a1"][0], frame_pixels(f, ch, (6, 70), (80, 126)))
            np.testing.assert_array_equal(strips["a2"][0], frame_pixels(f, ch, (6, 70), (8, 12)))
            np.testing.assert_array_equal(strips["a3"][0], frame_pixels(f, ch, (0, 4), (14, 78)))
            whole = s.strips([row])
            np.testing.assert_array_equal(whole["a1"][0], frame_pixels(f, ch, (4, 72), (80, 126)))
            np.testing.assert_array_equal(whole["a2"][0], frame_pixels(f, ch, (4, 72), (8, 12)))
            np.testing.assert_array_equal(whole["a3"][0], frame_pixels(f, ch, (0, 4), (12, 80)))
            np.testing.assert_array_equal(s.active([row])[0], frame_pixels(f, ch, (4, 72), (12, 80)))
            np.testing.assert_array_equal(s.target([row])[0], frame_pixels(f, ch, (6, 70), (14, 78)))


def test_guide_frames_keep_strips_only(write_night, tmp_path):
    night = write_night(n_dark=1, n_guide=2)
    extract([night], tmp_path / "n.h5", load(), progress=False)
    with Shard(tmp_path / "n.h5") as s:
        guide = np.flatnonzero(s.table["imagetyp"] == "OBJECT")
        assert len(guide) == 8 and (s.table["active_index"][guide] == -1).all()
        with pytest.raises(ValueError, match="not darks"):
            s.active(guide[:1])
        got = list(s.batches(batch_size=5))
        assert [len(r) for r, _ in got] == [5, 5, 2] and got[0][1]["a1"].shape == (5, 68, 46)


def load():
    from deepdark.io.geometry import load_geometry

    return load_geometry("mini")


def test_bad_files_are_quarantined_and_the_night_goes_on(write_night, tmp_path, mini):
    night = write_night(n_dark=3, n_guide=1)
    good = sorted(night.iterdir())
    raw = good[0].read_bytes()
    (night / "trunc.fits").write_bytes(raw[:5000])
    write_raw_frame(night / "shape.fits", random_frame(mini, 9)[:, :100].copy(), header())
    write_raw_frame(night / "noexp.fits", random_frame(mini, 9), header(exptime=None))
    (night / "notes.fits").write_text("observer log, not a frame\n")
    (night / "copy.fits").write_bytes(raw)
    res = extract([night], tmp_path / "n.h5", mini, progress=False)
    assert (res.n_frames, res.n_quarantined) == (4, 5)
    q = read_quarantine(tmp_path / "n.h5").set_index("path")["reason"]
    assert "truncated" in q[str(night / "trunc.fits")]
    assert "does not match geometry" in q[str(night / "shape.fits")]
    assert "EXPTIME missing" in q[str(night / "noexp.fits")]
    assert "not a FITS file" in q[str(night / "notes.fits")]
    assert "duplicate of" in q[str(night / "copy.fits")] or "duplicate of" in q[str(good[0])]
    with Shard(tmp_path / "n.h5") as s:
        assert len(set(s.table["file"])) == 4


def test_failed_extraction_leaves_no_shard(write_night, tmp_path, mini, monkeypatch):
    night = write_night(n_dark=2, n_guide=0)
    import deepdark.io.shards as shards

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards, "channel_strips", boom)
    with pytest.raises(OSError, match="No space left"):
        extract([night], tmp_path / "n.h5", mini, progress=False)
    assert not (tmp_path / "n.h5").exists() and not quarantine_path(tmp_path / "n.h5").exists()
    assert not list(tmp_path.glob(".*partial"))


def test_not_a_shard(tmp_path):
    (tmp_path / "x.h5").write_text("nope")
    with pytest.raises(ValueError, match="not a deepdark shard"):
        Shard(tmp_path / "x.h5")


def test_camera_filter_leaves_other_cameras_out_without_quarantine(write_night, tmp_path, mini):
    night = write_night(n_dark=2, n_guide=0, camera="GS1")
    write_night(n_dark=1, n_guide=0, camera="GS2", seed=7)
    res = extract([night], tmp_path / "n.h5", mini, progress=False, cameras=["GS2"])
    assert (res.n_frames, res.n_quarantined) == (1, 0)
    with Shard(tmp_path / "n.h5") as s:
        assert set(s.table["camera"]) == {"GS2"}


def test_a_night_of_only_bad_files_still_gives_an_empty_shard_and_predictions(tmp_path, mini):
    from deepdark.io.predictions import Predictions, write_predictions

    night = tmp_path / "20240105"
    night.mkdir()
    (night / "junk.fits").write_text("not a frame")
    res = extract([night], tmp_path / "n.h5", mini, progress=False)
    assert (res.n_frames, res.n_quarantined) == (0, 1)
    write_predictions(tmp_path / "n.h5", tmp_path / "p.h5", lambda s, r: None, {"method": "none"}, progress=False)
    with Predictions(tmp_path / "p.h5") as p:
        assert len(p) == 0


def test_full_size_round_trip_at_spec_coordinates(tmp_path):
    """One simulated full-size frame: every strip equals the FITS pixels at the contract's
    coordinates, computed here by explicit index arithmetic (channel 1047 x 1100)."""
    from astropy.io import fits

    from deepdark.io.geometry import load_geometry
    from deepdark.sim.simulate import simulate_archive

    g = load_geometry("lamost-kaf4320")
    simulate_archive(
        tmp_path / "a", geometry=g, nights=1, temperatures=(-15,), darks_per_temp=1, guide_per_night=0, progress=False
    )
    night = next((tmp_path / "a").iterdir())
    extract([night], tmp_path / "n.h5", g, progress=False)
    frame = fits.getdata(next(night.glob("*.fits")))
    corners = {
        "1": (0, 0, False, False),
        "2": (0, 1100, False, True),
        "3": (1047, 0, True, False),
        "4": (1047, 1100, True, True),
    }

    def pixels(ch, rows, cols):
        row0, col0, fr, fc = corners[ch]
        r, c = np.arange(*rows), np.arange(*cols)
        return frame[np.ix_(row0 + (1046 - r if fr else r), col0 + (1099 - c if fc else c))]

    with Shard(tmp_path / "n.h5") as s:
        for row, rec in s.table.iterrows():
            ch = rec["channel"]
            w = s.strips([row], window=True)
            np.testing.assert_array_equal(w["a1"][0], pixels(ch, (13, 1037), (1054, 1100)))
            np.testing.assert_array_equal(w["a2"][0], pixels(ch, (13, 1037), (8, 12)))
            np.testing.assert_array_equal(w["a3"][0], pixels(ch, (0, 4), (21, 1045)))
            np.testing.assert_array_equal(s.target([row])[0], pixels(ch, (13, 1037), (21, 1045)))
            np.testing.assert_array_equal(s.active([row])[0], pixels(ch, (4, 1046), (12, 1054)))
