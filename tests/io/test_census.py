"""Extraction accounts for every file of a night: each ends in the shard, the quarantine (with a
reason) or the list of ignored files (with a reason); bad frames fail alone; copies of one frame
under other names or compressions are caught."""

import os
import re

import h5py
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from deepdark.io.frames import read_frame, write_raw_frame
from deepdark.io.shards import Shard, quarantine_path, read_quarantine
from deepdark.pipeline.extract import extract
from tests.conftest import header, random_frame


def write_fz(path, data, hdr):
    """A tile-compressed copy (fpack's layout: empty primary HDU, the image in HDU 1), lossless."""
    hdu = fits.CompImageHDU(data=data, header=fits.Header(hdr), compression_type="RICE_1")
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)


def census(night, shard):
    """(shard files, quarantined paths, ignored paths) of an extraction."""
    from deepdark.io.shards import read_ignored

    with Shard(shard) as s:
        in_shard = set(s.table["file"])
    return in_shard, set(read_quarantine(shard)["path"]), set(read_ignored(shard)["path"])


# -- every file ends in one place ------------------------------------------------------------------


def test_fz_frame_has_the_same_pixels_as_the_fits_it_came_from(tmp_path, mini):
    data = random_frame(mini, 11)
    data[0, 0], data[1, 1] = 0, 65535
    write_raw_frame(tmp_path / "a.fits", data, header(ccdtemp=-14.6))
    write_fz(tmp_path / "a.fits.fz", data, header(ccdtemp=-14.6))
    with fits.open(tmp_path / "a.fits.fz") as hdul:  # the test writes what fpack writes
        assert isinstance(hdul[1], fits.CompImageHDU) and hdul[0].data is None
    plain, packed = read_frame(tmp_path / "a.fits", mini), read_frame(tmp_path / "a.fits.fz", mini)
    assert packed.data.dtype == np.uint16
    np.testing.assert_array_equal(packed.data, data)
    np.testing.assert_array_equal(packed.data, plain.data)
    assert packed.info == plain.info


@pytest.mark.parametrize(
    "name", ["f.fits", "f.fit", "f.fts", "f.fits.gz", "f.fit.gz", "f.fts.gz", "f.fits.fz", "F.FTS", "F.FITS.FZ"]
)
def test_every_fits_suffix_is_read(tmp_path, mini, name):
    data = random_frame(mini, 12)
    night = tmp_path / "20240101"
    night.mkdir()
    if name.lower().endswith(".fz"):
        write_fz(night / name, data, header())
    else:
        write_raw_frame(night / name, data, header())
        if name.lower().endswith(".gz"):
            assert (night / name).read_bytes()[:2] == b"\x1f\x8b"
    res = extract([night], tmp_path / "n.h5", mini, progress=False)
    assert (res.n_frames, res.n_quarantined, res.n_ignored) == (1, 0, 0)
    with Shard(tmp_path / "n.h5") as s:
        assert set(s.table["file"]) == {str(night / name)}


def test_a_night_of_only_fz_files_is_extracted(tmp_path, mini):
    night = tmp_path / "20240101"
    night.mkdir()
    for i in range(3):
        write_fz(night / f"GS1_dark_{i}.fits.fz", random_frame(mini, 20 + i), header())
    res = extract([night], tmp_path / "n.h5", mini, progress=False)
    assert (res.n_frames, res.n_quarantined, res.n_ignored) == (3, 0, 0)


def test_every_file_of_a_night_ends_in_exactly_one_place(write_night, tmp_path, mini):
    night = write_night(n_dark=3, n_guide=1)  # GS1
    write_night(n_dark=2, n_guide=0, camera="GS2", seed=3)  # same folder
    first = sorted(night.glob("GS1_*.fits"))[0]
    (night / "copy.fits").write_bytes(first.read_bytes())
    (night / "trunc.fits").write_bytes(first.read_bytes()[:4000])
    write_fz(night / "packed.fits.fz", random_frame(mini, 40), header())
    (night / "notes.txt").write_text("observer log\n")
    (night / ".DS_Store").write_bytes(b"\0\0")
    (night / "GS1_dark_0000.fits.md5").write_text("0123\n")
    (night / "calib").mkdir()
    from deepdark.io.shards import read_ignored

    res = extract([night], tmp_path / "n.h5", mini, progress=False, cameras=["GS1"])
    in_shard, quarantined, ignored = census(night, tmp_path / "n.h5")
    every = {str(p) for p in night.iterdir()}
    assert in_shard | quarantined | ignored == every
    assert not (in_shard & quarantined or in_shard & ignored or quarantined & ignored)
    assert (res.n_frames, res.n_quarantined, res.n_ignored) == (5, 2, 6)
    why = read_ignored(tmp_path / "n.h5").set_index("path")["reason"]
    for name in ("notes.txt", ".DS_Store", "GS1_dark_0000.fits.md5", "calib"):
        assert "not a FITS" in why[str(night / name)], why[str(night / name)]
    for p in night.glob("GS2_*.fits"):
        assert re.search(r"other camera GS2 \(not in --cameras", why[str(p)]), why[str(p)]
    assert (why != "").all() and (read_quarantine(tmp_path / "n.h5")["reason"] != "").all()


def test_the_ignored_table_is_written_with_the_shard_or_not_at_all(write_night, tmp_path, mini, monkeypatch):
    from deepdark.io.shards import ignored_path, read_ignored

    night = write_night(n_dark=1, n_guide=0)
    (night / "notes.txt").write_text("log\n")
    extract([night], tmp_path / "n.h5", mini, progress=False)
    assert read_ignored(tmp_path / "n.h5")["path"].tolist() == [str(night / "notes.txt")]
    assert ignored_path(tmp_path / "n.h5") == tmp_path / "n.ignored.csv"

    import deepdark.io.shards as shards

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards, "channel_strips", boom)
    with pytest.raises(OSError, match="No space left"):
        extract([night], tmp_path / "m.h5", mini, progress=False)
    assert not ignored_path(tmp_path / "m.h5").exists() and not quarantine_path(tmp_path / "m.h5").exists()
    assert not list(tmp_path.glob(".*partial"))


# -- a path that does not exist ---------------------------------------------------------------------


@pytest.mark.parametrize("what", ["night folder", "file"])
def test_a_missing_input_is_an_error_naming_it(write_night, tmp_path, mini, what):
    from deepdark.io.errors import DeepdarkError

    night = write_night(n_dark=1, n_guide=0)
    missing = tmp_path / "archive" / ("20240199" if what == "night folder" else "20240101/GS1_dark_9999.fits")
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))) as exc:
        extract([night, missing], tmp_path / "n.h5", mini, progress=False)
    assert isinstance(exc.value, DeepdarkError)
    assert not (tmp_path / "n.h5").exists() and not quarantine_path(tmp_path / "n.h5").exists()


def test_the_cli_reports_a_missing_input_in_one_line(tmp_path, capsys):
    from deepdark.cli import main

    missing = tmp_path / "archive" / "20240199"
    assert main(["-q", "extract", str(missing), "--out", str(tmp_path / "n.h5"), "--geometry", "mini"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "does not exist" in err, err


# -- bad header values stay with their frame ----------------------------------------------------------


def set_card(path, key, value_field):
    """Rewrite card ``key`` of a written (uncompressed) frame to hold ``value_field`` verbatim,
    as a camera's software could: values astropy itself refuses to write (NaN, Inf)."""
    raw = bytearray(path.read_bytes())
    start = next(i for i in range(0, 2880 * 4, 80) if raw[i : i + 8] == key.ljust(8).encode())
    raw[start : start + 80] = f"{key:<8}= {value_field:>20}".ljust(80).encode()
    path.write_bytes(bytes(raw))


BAD_VALUES = {  # file -> (key, value field as written in the card, text the reason must hold)
    "logical_exptime.fits": ("EXPTIME", "T", "EXPTIME=True"),
    "units_exptime.fits": ("EXPTIME", "'30 s'", "EXPTIME='30 s'"),
    "nan_exptime.fits": ("EXPTIME", "NaN", "EXPTIME=NaN"),
    "quoted_nan_exptime.fits": ("EXPTIME", "'NaN'", "EXPTIME='NaN'"),
    "inf_ccdtemp.fits": ("CCDTEMP", "1.0E+999", "CCDTEMP=inf"),
    "logical_ccdtemp.fits": ("CCDTEMP", "F", "CCDTEMP=False"),
    "complex_ccdtemp.fits": ("CCDTEMP", "(1.0, 2.0)", "CCDTEMP=(1+2j)"),
    "garbled_settemp.fits": ("SETTEMP", "-15.0.0", "SETTEMP=-15.0.0"),
    "logical_imagetyp.fits": ("IMAGETYP", "T", "IMAGETYP=True"),
    "logical_camera.fits": ("CAMERA", "T", "CAMERA=True"),
    "nan_floor.fits": ("DDFLOOR1", "NaN", "DDFLOOR1=NaN"),
    "garbled_bitpix.fits": ("BITPIX", "16.5.1", "BITPIX=16.5.1"),
}


def test_a_bad_header_value_quarantines_its_frame_with_key_and_value(write_night, tmp_path, mini):
    night = write_night(n_dark=2, n_guide=0)
    for i, (name, (key, field, _)) in enumerate(BAD_VALUES.items()):
        write_raw_frame(night / name, random_frame(mini, 100 + i), header(DDFLOOR1=16.0))
        set_card(night / name, key, field)
    res = extract([night], tmp_path / "n.h5", mini, progress=False)
    assert (res.n_frames, res.n_quarantined) == (2, len(BAD_VALUES))
    q = read_quarantine(tmp_path / "n.h5").set_index("path")["reason"]
    for name, (_, _, text) in BAD_VALUES.items():
        assert text in q[str(night / name)], (name, q[str(night / name)])


# -- file names that are not ASCII or not UTF-8 --------------------------------------------------------


def test_names_that_are_not_ascii_or_not_utf8_round_trip_through_the_shard(write_night, tmp_path, mini):
    from deepdark.io.predictions import Predictions, write_predictions

    night = write_night(n_dark=1, n_guide=0)
    latin1 = os.path.join(os.fsencode(night), b"caf\xe9_dark.fits")  # not UTF-8
    write_raw_frame(os.fsdecode(latin1), random_frame(mini, 50), header())
    write_raw_frame(night / "café_dark.fits", random_frame(mini, 51), header())
    write_raw_frame(night / "naïve_bias.fits", random_frame(mini, 52), header(imagetyp="BIAS", exptime=0.0))
    bad = os.path.join(os.fsencode(night), b"bad_\xff.fits")
    with open(bad, "wb") as fh:
        fh.write(b"not a frame")
    res = extract([night], tmp_path / "n.h5", mini, progress=False)
    assert (res.n_frames, res.n_quarantined) == (4, 1)
    with Shard(tmp_path / "n.h5") as s:
        files = set(s.table["file"])
    assert {os.fsencode(f) for f in files} >= {latin1, os.fsencode(night / "café_dark.fits")}
    for f in files:  # the correct step opens the raw file by the name in the table
        assert read_frame(f, mini).info.imagetyp in ("DARK", "BIAS")
    write_predictions(tmp_path / "n.h5", tmp_path / "p.h5", lambda s, r: np.zeros((len(r), 68, 68)), {"method": "x"})
    with Predictions(tmp_path / "p.h5") as p:
        assert set(p.table["file"]) == files and len(p.rows_of(os.fsdecode(latin1))) == 4
    # the quarantine stays UTF-8 text that any tool reads, the odd byte shown as an escape
    q = pd.read_csv(quarantine_path(tmp_path / "n.h5"), encoding="utf-8")
    assert q["path"].tolist() == [str(night / "bad_\\xff.fits")] and "not a FITS file" in q["reason"][0]


# -- one frame under two names -------------------------------------------------------------------------


def test_fits_gz_and_fz_copies_of_one_frame_are_duplicates(tmp_path, mini):
    night = tmp_path / "20240101"
    data, hdr = random_frame(mini, 60), header()
    write_raw_frame(night / "a.fits", data, hdr)
    write_raw_frame(night / "b.fits.gz", data, hdr)
    write_fz(night / "c.fits.fz", data, hdr)
    write_raw_frame(night / "d.fits", random_frame(mini, 61), hdr)
    res = extract([night], tmp_path / "n.h5", mini, progress=False)
    assert (res.n_frames, res.n_quarantined) == (2, 2)
    q = read_quarantine(tmp_path / "n.h5").set_index("path")["reason"]
    for name in ("b.fits.gz", "c.fits.fz"):
        assert f"duplicate of {night / 'a.fits'}" in q[str(night / name)]


def test_the_shard_table_identifies_one_frame_across_nights(tmp_path, mini):
    data, hdr = random_frame(mini, 70), header()
    write_raw_frame(tmp_path / "20240101" / "a.fits", data, hdr)
    write_raw_frame(tmp_path / "20240101" / "other.fits", random_frame(mini, 71), hdr)
    write_raw_frame(tmp_path / "20240102" / "a_again.fits.gz", data, hdr)
    for night in ("20240101", "20240102"):
        extract([tmp_path / night], tmp_path / f"{night}.h5", mini, progress=False)
    with Shard(tmp_path / "20240101.h5") as s1, Shard(tmp_path / "20240102.h5") as s2:
        t1, t2 = s1.table.groupby("file").first(), s2.table.groupby("file").first()
    a, again = t1.loc[str(tmp_path / "20240101" / "a.fits")], t2.iloc[0]
    assert a["frame_hash"] == again["frame_hash"] and a["file_hash"] != again["file_hash"]
    assert t1["frame_hash"].nunique() == 2 and re.fullmatch("[0-9a-f]{32}", a["frame_hash"])


def test_a_shard_without_frame_hashes_is_still_read(write_night, tmp_path, mini):
    from deepdark.io.predictions import Predictions, write_predictions

    extract([write_night(n_dark=1, n_guide=0)], tmp_path / "n.h5", mini, progress=False)
    with h5py.File(tmp_path / "n.h5", "a") as f:  # as written before the column existed
        del f["table/frame_hash"]
    with Shard(tmp_path / "n.h5") as s:
        assert (s.table["frame_hash"] == "").all() and len(s) == 4
    write_predictions(tmp_path / "n.h5", tmp_path / "p.h5", lambda s, r: np.zeros((len(r), 68, 68)), {"method": "x"})
    with Predictions(tmp_path / "p.h5") as p:
        assert len(p) == 4


def test_progress_bar_is_not_drawn_off_a_terminal(write_night, tmp_path, mini, capsys):
    extract([write_night(n_dark=1, n_guide=0)], tmp_path / "n.h5", mini, progress=True)
    assert capsys.readouterr().err == ""
