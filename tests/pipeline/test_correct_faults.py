"""What `correct` does with frames the predictions could not serve, odd file names, nights where
everything failed and inputs that are missing: no frame lost, none hidden, nothing half-made."""

from __future__ import annotations

import gzip
import json
import os
import urllib.parse
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from deepdark.cli import main
from deepdark.io.errors import DeepdarkError
from deepdark.io.frames import write_raw_frame
from deepdark.io.predictions import DARK_DIGEST, Predictions, row_digests, write_predictions
from deepdark.io.shards import TEXT_CHECKSUM, text_digest
from deepdark.pipeline.correct import (
    NIGHT_STATUS,
    EmptyResultError,
    correct_night,
    read_manifest,
    read_night_status,
    source_name,
)
from deepdark.pipeline.extract import extract
from tests.conftest import header, random_frame

DARK_LEVEL = 100.0


def predictions_of(night: Path, out: Path, mini) -> Path:
    """The night's shard and a predictions file whose every dark is ``DARK_LEVEL`` ADU."""
    shard = extract([night], out.with_name(out.stem + "_shard.h5"), mini, progress=False).shard

    def constant(s, rows):
        return np.full((len(rows), *mini.active.shape), DARK_LEVEL, np.float32)

    return write_predictions(shard, out, constant, {"method": "model", "model_name": "m"}, progress=False)


def set_status(pred: Path, verdicts: dict[str, tuple[str, str]]) -> None:
    """Give the frames of ``verdicts`` (``{file name: (status, reason)}``) that status in the
    predictions table, as predict writes it (every channel row of the frame; unserved darks NaN)."""
    with h5py.File(pred, "r+") as f:
        names = [os.fsdecode(v) for v in f["table/file"][()]]
        status = np.array([verdicts.get(Path(n).name, ("ok", ""))[0] for n in names], dtype=object)
        reason = np.array([verdicts.get(Path(n).name, ("ok", ""))[1] for n in names], dtype=object)
        for col, values in (("status", status), ("reason", reason)):
            if col in f["table"]:
                del f["table"][col]
            stored = f["table"].create_dataset(col, data=values, dtype=h5py.string_dtype())
            stored.attrs[TEXT_CHECKSUM] = text_digest(stored[()])  # as predict writes it
        for row in np.flatnonzero(status == "unserved"):
            f["dark"][row] = np.nan
            f[DARK_DIGEST][row] = row_digests(f["dark"][row : row + 1])[0]
    with Predictions(pred) as p:  # the reader hands the columns on
        assert list(p.table["status"]) == list(status)


@pytest.fixture
def night(write_night, tmp_path, mini):
    folder = write_night(n_dark=2, n_guide=2)
    return folder, predictions_of(folder, tmp_path / "pred.h5", mini)


def fits_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.fits"))


# -- frames the predictions did not serve, or served with doubts ---------------------------------------


def test_unserved_frame_is_listed_as_failed_and_the_rest_of_the_night_corrected(night, tmp_path):
    folder, pred = night
    set_status(pred, {"GS1_dark_0001.fits": ("unserved", "no model for camera GS1 at -40 C")})
    res = correct_night(pred, tmp_path / "out", progress=False)
    assert (res.n_ok, res.n_flagged, res.n_failed) == (3, 0, 1)
    man = read_manifest(tmp_path / "out").set_index("file")
    row = man.loc[str(folder / "GS1_dark_0001.fits")]
    assert row["status"] == "failed" and "no model for camera GS1 at -40 C" in row["reason"] and row["output"] == ""
    assert fits_names(tmp_path / "out") == ["GS1_dark_0000.fits", "GS1_object_0002.fits", "GS1_object_0003.fits"]


def test_flagged_frame_is_corrected_listed_as_flagged_and_marked_in_its_header(night, tmp_path):
    folder, pred = night
    set_status(pred, {"GS1_object_0002.fits": ("flagged", "dark outside the library's range")})
    res = correct_night(pred, tmp_path / "out", progress=False)
    assert (res.n_ok, res.n_flagged, res.n_failed) == (3, 1, 0)
    man = read_manifest(tmp_path / "out").set_index("file")
    row = man.loc[str(folder / "GS1_object_0002.fits")]
    assert row["status"] == "flagged" and row["reason"] == "dark outside the library's range"
    assert (man.drop(index=str(folder / "GS1_object_0002.fits"))["status"] == "ok").all()
    with fits.open(tmp_path / "out" / "GS1_object_0002.fits") as h:
        assert h[1].header["DDSTATUS"] == "flagged"
        assert h[1].header["DDREASON"] == "dark outside the library's range"
    with fits.open(tmp_path / "out" / "GS1_object_0003.fits") as h:
        assert h[1].header["DDSTATUS"] == "ok" and "DDREASON" not in h[1].header


# -- names that are not ASCII, or not UTF-8 --------------------------------------------------------------


def test_frames_with_names_that_are_not_ascii_or_not_utf8_are_corrected(tmp_path, mini):
    folder = tmp_path / "archive" / "20240101"
    cafe = folder / "café.fits"
    latin1 = os.fsdecode(os.path.join(os.fsencode(folder), b"guide_\xe9t\xe9.fits"))  # not UTF-8
    write_raw_frame(cafe, random_frame(mini, 1), header())
    write_raw_frame(latin1, random_frame(mini, 2), header("OBJECT"))
    pred = predictions_of(folder, tmp_path / "pred.h5", mini)
    res = correct_night(pred, tmp_path / "out", progress=False)
    assert (res.n_ok, res.n_failed) == (2, 0)
    assert sorted(os.listdir(os.fsencode(tmp_path / "out"))) == sorted(
        [b"caf\xc3\xa9.fits", b"guide_\xe9t\xe9.fits", b"manifest.csv", NIGHT_STATUS.encode()]
    )
    # the manifest stays UTF-8 that any tool reads; the odd bytes shown as escapes
    man = pd.read_csv(tmp_path / "out" / "manifest.csv", encoding="utf-8", dtype=str, keep_default_na=False)
    assert set(man["file"]) == {str(cafe), str(folder / "guide_\\xe9t\\xe9.fits")}
    assert (man["status"] == "ok").all()
    # the header is ASCII, and the full name comes back from it
    for raw in (str(cafe), latin1):
        with fits.open(tmp_path / "out" / (Path(raw).name.removesuffix(".fits") + ".fits")) as h:
            assert source_name(h[1].header) == Path(raw).name
            assert h[1].header["DDSRC"] == urllib.parse.quote(os.fsencode(Path(raw).name), safe="")
    with fits.open(tmp_path / "out" / "café.fits") as h:
        assert h[1].header["DDSRCENC"] == "percent"


def test_plain_names_keep_their_header_card(night, tmp_path):
    _, pred = night
    correct_night(pred, tmp_path / "out", progress=False)
    with fits.open(tmp_path / "out" / "GS1_dark_0000.fits") as h:
        assert h[1].header["DDSRC"] == "GS1_dark_0000.fits" and "DDSRCENC" not in h[1].header
        assert source_name(h[1].header) == "GS1_dark_0000.fits"


# -- the night's status ----------------------------------------------------------------------------------


def test_the_nights_status_is_written_beside_its_frames(night, tmp_path):
    _, pred = night
    set_status(
        pred,
        {
            "GS1_dark_0000.fits": ("unserved", "no dark"),
            "GS1_dark_0001.fits": ("unserved", "no dark"),
            "GS1_object_0002.fits": ("unserved", "no dark"),
            "GS1_object_0003.fits": ("flagged", "odd"),
        },
    )
    res = correct_night(pred, tmp_path / "out", progress=False)
    status = json.loads((tmp_path / "out" / NIGHT_STATUS).read_text())
    assert status["counts"] == {"ok": 0, "flagged": 1, "failed": 3, "skipped": 0}
    assert status["frames"] == 4 and status["failed_fraction"] == 0.75 and status["status"] == "partial"
    assert read_night_status(tmp_path / "out") == status
    assert res.counts == status["counts"] and res.n_corrected == 1


def test_cli_exits_0_on_a_partial_night_and_says_so(night, tmp_path, caplog):
    _, pred = night
    set_status(pred, {"GS1_dark_0000.fits": ("unserved", "no dark")})
    assert main(["correct", str(pred), "--out", str(tmp_path / "out"), "-q"]) == 0
    assert any("1 of 4 frames not corrected" in r.getMessage() for r in caplog.records)
    assert main(["correct", str(pred), "--out", str(tmp_path / "out"), "-q", "--strict"]) == 2


# -- a rerun that would leave the night empty ------------------------------------------------------------


def test_a_rerun_with_no_corrected_frame_keeps_the_earlier_frames(night, tmp_path):
    folder, pred = night
    out = tmp_path / "out"
    correct_night(pred, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    set_status(pred, {p.name: ("unserved", "model refused") for p in folder.iterdir()})
    with pytest.raises(EmptyResultError, match=f"{out}.*--replace-with-empty") as exc:
        correct_night(pred, out, progress=False)
    assert isinstance(exc.value, DeepdarkError) and "\n" not in str(exc.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # the command line refuses in one line, exit status 2
    assert main(["correct", str(pred), "--out", str(out), "-q"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # asked to, it replaces them: the folder and its manifest agree
    res = correct_night(pred, out, replace_with_empty=True, progress=False)
    assert res.n_corrected == 0 and res.n_failed == 4
    assert fits_names(out) == [] and (read_manifest(out)["status"] == "failed").all()


def test_a_rerun_on_an_empty_predictions_file_keeps_the_earlier_frames(night, tmp_path, mini):
    _, pred = night
    out = tmp_path / "out"
    correct_night(pred, out, progress=False)
    empty_night = tmp_path / "empty" / "20240101"
    empty_night.mkdir(parents=True)
    (empty_night / "broken.fits").write_bytes(b"SIMPLE  =                    T\n")
    empty = predictions_of(empty_night, tmp_path / "empty.h5", mini)
    assert len(Predictions(empty).table) == 0
    with pytest.raises(EmptyResultError):
        correct_night(empty, out, progress=False)
    assert len(fits_names(out)) == 4 and (read_manifest(out)["status"] == "ok").all()
    # a new folder may well be empty
    res = correct_night(empty, tmp_path / "new", progress=False)
    assert res.n_corrected == 0 and read_manifest(tmp_path / "new").empty


def set_aside(out: Path) -> list[dict[str, bytes]]:
    """The contents of each run's folder in ``out/stale``, in the order of the runs."""
    return [{p.name: p.read_bytes() for p in run.iterdir()} for run in sorted((out / "stale").iterdir())]


def test_earlier_frames_this_run_did_not_make_are_set_aside_not_lost(night, tmp_path, mini):
    """A raw frame deleted, one damaged (now quarantined), one the model now refuses: their
    corrected files of the earlier run leave the night's folder for stale/, byte for byte. As in
    the workflow, whose rerun removes the manifest first: the frames' headers say what they are."""
    folder, pred = night
    out = tmp_path / "out"
    correct_night(pred, out, progress=False)
    earlier = {p.name: p.read_bytes() for p in out.glob("*.fits")}
    (out / "manifest.csv").unlink()
    (folder / "GS1_dark_0000.fits").unlink()
    (folder / "GS1_object_0002.fits").write_bytes(b"SIMPLE  =                    T\n")
    again = predictions_of(folder, tmp_path / "again.h5", mini)
    set_status(again, {"GS1_dark_0001.fits": ("unserved", "no model")})
    correct_night(again, out, progress=False)
    assert fits_names(out) == ["GS1_object_0003.fits"]
    stale = ["GS1_dark_0000.fits", "GS1_dark_0001.fits", "GS1_object_0002.fits"]
    assert set_aside(out) == [{n: earlier[n] for n in stale}]
    assert sorted(read_night_status(out)["stale"]) == stale
    # a rerun that makes one of them again has nothing stale; what was set aside stays
    correct_night(predictions_of(folder, tmp_path / "served.h5", mini), out, progress=False)
    assert fits_names(out) == ["GS1_dark_0001.fits", "GS1_object_0003.fits"]
    assert read_night_status(out)["stale"] == [] and set_aside(out) == [{n: earlier[n] for n in stale}]


def test_a_name_another_raw_file_takes_sets_the_earlier_frame_aside_first(tmp_path, mini):
    """``a.fits`` and ``a.fits.gz`` in a night: ``a.fits`` is the first's; once the first is gone
    the second takes the name, and the first's corrected frame is set aside, not written over."""
    folder = tmp_path / "archive" / "20240101"
    write_raw_frame(folder / "a.fits", random_frame(mini, 1), header("OBJECT"))
    write_raw_frame(tmp_path / "b.fits", random_frame(mini, 2), header("OBJECT"))
    (folder / "a.fits.gz").write_bytes(gzip.compress((tmp_path / "b.fits").read_bytes()))
    out = tmp_path / "out"
    correct_night(predictions_of(folder, tmp_path / "p1.h5", mini), out, progress=False)
    first = (out / "a.fits").read_bytes()
    (folder / "a.fits").unlink()
    correct_night(predictions_of(folder, tmp_path / "p2.h5", mini), out, progress=False)
    assert fits_names(out) == ["a.fits"] and (out / "a.fits").read_bytes() != first
    assert set_aside(out)[0]["a.fits"] == first and len(set_aside(out)[0]) == 2


def test_cli_replace_with_empty(night, tmp_path):
    folder, pred = night
    out = tmp_path / "out"
    assert main(["correct", str(pred), "--out", str(out), "-q"]) == 0
    set_status(pred, {p.name: ("unserved", "model refused") for p in folder.iterdir()})
    assert main(["correct", str(pred), "--out", str(out), "-q", "--replace-with-empty"]) == 2  # all failed
    assert fits_names(out) == [] and len(read_manifest(out)) == 4


# -- inputs checked before anything is made ----------------------------------------------------------------


def test_missing_predictions_leave_no_output_folder(tmp_path):
    out = tmp_path / "results" / "corrected" / "20240101"
    with pytest.raises((DeepdarkError, ValueError, FileNotFoundError)):
        correct_night(tmp_path / "missing.h5", out, progress=False)
    assert not out.exists() and not out.parent.exists()
    assert main(["correct", str(tmp_path / "missing.h5"), "--out", str(out), "-q"]) == 2
    assert not out.exists() and not out.parent.exists()
