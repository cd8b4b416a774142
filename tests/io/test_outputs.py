"""No output is ever written over an input or over a file of another kind."""

import h5py
import numpy as np
import pytest

from deepdark.io.errors import OutputError
from deepdark.io.outputs import check_output, file_kind


@pytest.fixture
def night(write_night):
    return write_night(n_dark=2, n_guide=1)


def _frame(night):
    return sorted(night.glob("*.fits"))[0]


def test_the_output_may_not_be_an_input(night):
    frame = _frame(night)
    with pytest.raises(OutputError, match=f"{frame}.*it is the input {frame}"):
        check_output(frame, [frame], "shard")


def test_the_output_may_not_lie_inside_an_input_folder(night):
    with pytest.raises(OutputError, match="inside the input folder"):
        check_output(night / "new.h5", [night], "shard")


def test_a_link_to_an_input_is_the_input(night, tmp_path):
    link = tmp_path / "link.h5"
    link.symlink_to(_frame(night))
    with pytest.raises(OutputError, match="it is the input"):
        check_output(link, [_frame(night)], "shard")


def test_an_existing_file_of_another_kind_is_refused_by_content_not_name(night, tmp_path):
    disguised = tmp_path / "looks_like_a_shard.h5"
    disguised.write_bytes(_frame(night).read_bytes())
    with pytest.raises(OutputError, match="FITS file, not a shard"):
        check_output(disguised, [], "shard")


def test_an_hdf5_file_of_another_deepdark_kind_is_refused(tmp_path):
    masters = tmp_path / "masters.h5"
    with h5py.File(masters, "w") as f:
        f["master"] = np.zeros((1, 2, 2))
        f.create_group("table")
    assert file_kind(masters) == "masters"
    with pytest.raises(OutputError, match="masters, not a predictions"):
        check_output(masters, [], "predictions")
    check_output(masters, [], "masters")  # a rerun writes over its own kind


def test_a_folder_output_must_be_new_empty_or_of_its_kind(night, tmp_path):
    with pytest.raises(OutputError, match="a FITS file that deepdark did not write"):
        check_output(night, [], "corrected")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine\n")
    with pytest.raises(OutputError, match="not a corrected folder"):
        check_output(tmp_path / "other", [], "corrected")
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", [], "corrected")
    done = tmp_path / "done"
    done.mkdir()
    (done / "manifest.csv").write_text("file,output,status,reason,camera,imagetyp,file_hash\n")
    check_output(done, [], "corrected")
    check_output(tmp_path / "new", [], "corrected")


def test_a_training_killed_before_its_first_checkpoint_leaves_a_folder_its_rerun_may_finish(tmp_path):
    """It copied (or fitted) its physics model first."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "physics.h5").write_bytes(b"x")
    check_output(folder, [], "model")
    (folder / "notes.txt").write_text("mine\n")  # still its kind: other files beside are kept
    check_output(folder, [], "model")


def test_a_file_output_may_not_be_a_folder(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path / "d", [], "predictions")


def test_a_stray_manifest_does_not_make_a_raw_night_an_output_folder(night):
    (night / "manifest.csv").write_text("frame,seeing\n")
    with pytest.raises(OutputError, match="a FITS file that deepdark did not write"):
        check_output(night, [], "corrected")


def test_a_folder_with_a_foreign_manifest_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "manifest.csv").write_text("frame,seeing\n")
    with pytest.raises(OutputError, match="not written by deepdark correct"):
        check_output(tmp_path / "notes", [], "corrected")


def test_no_output_folder_of_any_kind_may_hold_raw_frames(night):
    for kind in ("model", "qa", "evaluation", "corrected"):
        with pytest.raises(OutputError, match="did not write"):
            check_output(night, [], kind)
