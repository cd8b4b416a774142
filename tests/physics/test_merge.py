"""Per-camera physics fits joined into one file equal a fit of every camera at once; a cluster
fits the cameras of a library one job each."""

import h5py
import numpy as np
import pandas as pd
import pytest

from deepdark import physics as P
from deepdark.cli import main
from deepdark.io.errors import DeepdarkError, InputError
from deepdark.io.geometry import load_geometry
from deepdark.io.shards import Shard
from deepdark.io.tables import library_cameras
from deepdark.pipeline.extract import extract
from tests.physics.simulated import mini_library

MINI = load_geometry("mini")
CAMERAS = ("GS2", "GS1")  # not in sorted order: the merge orders them as a whole fit does


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    shards = mini_library(
        root, nights=2, cameras=CAMERAS, temperatures=(-5, -15), darks_per_temp=2, dark_exptimes=(10.0, 30.0)
    )
    P.fit_physics(shards, root / "all.h5", progress=False)
    return root, shards


def _datasets(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.update({name: obj[()]}) if isinstance(obj, h5py.Dataset) else None)
        attrs = {name: dict(f[name].attrs) for name in ["cameras", *[f"cameras/{k}" for k in f["cameras"]]]}
    return out, attrs


def test_per_camera_fits_merged_equal_one_fit_of_all_cameras(library, tmp_path):
    root, shards = library
    parts = []
    for camera in CAMERAS:
        parts.append(P.fit_physics(shards, tmp_path / f"{camera}.h5", cameras=[camera], progress=False))
    merged = P.merge_physics(parts, tmp_path / "merged.h5")
    (whole, whole_attrs), (joined, joined_attrs) = _datasets(root / "all.h5"), _datasets(merged)
    assert whole.keys() == joined.keys()
    for name in whole:
        if whole[name].dtype.kind in "fiub":
            np.testing.assert_array_equal(whole[name], joined[name], err_msg=name)
        else:
            assert list(whole[name]) == list(joined[name]), name
    assert repr(whole_attrs) == repr(joined_attrs)
    with h5py.File(root / "all.h5", "r") as a, h5py.File(merged, "r") as b:
        for key in ("schema_version", "geometry", "params", "nights"):
            assert a.attrs[key] == b.attrs[key], key
    with P.PhysicsModel(merged) as m:
        assert sorted(m.cameras) == sorted(CAMERAS)


def test_a_camera_fitted_twice_or_another_way_is_refused(library, tmp_path):
    _, shards = library
    one = P.fit_physics(shards, tmp_path / "one.h5", cameras=["GS1"], progress=False)
    again = P.fit_physics(shards, tmp_path / "again.h5", cameras=["GS1"], progress=False)
    with pytest.raises(InputError, match="camera GS1 is also fitted in"):
        P.merge_physics([one, again], tmp_path / "m.h5")
    other = P.fit_physics(shards, tmp_path / "other.h5", cameras=["GS2"], smooth_px=0, progress=False)
    with pytest.raises(InputError, match="params differs"):
        P.merge_physics([one, other], tmp_path / "m.h5")
    with pytest.raises(InputError, match="not a deepdark physics model"):
        P.merge_physics([one, shards[0]], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def test_a_camera_the_library_lacks_is_named(library, tmp_path):
    _, shards = library
    with pytest.raises(InputError, match="camera GS9: no DARK or BIAS frames"):
        P.fit_physics(shards, tmp_path / "x.h5", cameras=["GS9"], progress=False)
    assert not (tmp_path / "x.h5").exists()


def test_library_cameras_counts_each_cameras_frames(library, tmp_path):
    _, shards = library
    opened = [Shard(p) for p in shards]
    try:
        table = library_cameras(opened)
    finally:
        for s in opened:
            s.close()
    assert list(table["camera"]) == ["GS1", "GS2"]
    assert list(table["frames"]) == [16, 16] and list(table["darks"]) == [16, 16]  # 2 nights x 2 setpoints x 2 x 2
    assert list(table["nights"]) == [2, 2] and list(table["setpoints"]) == ["-15 -5", "-15 -5"]
    assert main(["cameras", *map(str, shards), "--out", str(tmp_path / "cameras.csv"), "-q"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cameras.csv"), table, check_dtype=False)


def test_cli_fits_one_camera_and_merges(library, tmp_path):
    _, shards = library
    for camera in CAMERAS:
        args = ["physics-fit", *map(str, shards), "--cameras", camera, "--out", str(tmp_path / f"{camera}.h5"), "-q"]
        assert main(args) == 0
    parts = [str(tmp_path / f"{c}.h5") for c in CAMERAS]
    assert main(["physics-merge", *parts, "--out", str(tmp_path / "physics.h5"), "-q"]) == 0
    assert main(["physics-merge", *parts, "--out", parts[0], "-q"]) == 2  # never over an input
    with P.PhysicsModel(tmp_path / "physics.h5") as m:
        assert sorted(m.cameras) == ["GS1", "GS2"]


def test_cameras_of_a_library_without_darks_is_a_one_line_error(tmp_path, write_night, capsys):
    night = write_night(n_dark=0, n_guide=2)
    shard = extract([night], tmp_path / "guide.h5", MINI, progress=False).shard
    assert main(["cameras", str(shard), "--out", str(tmp_path / "cameras.csv"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no DARK or BIAS frames in 1 library shard" in err[0], err
    assert not (tmp_path / "cameras.csv").exists()


def test_fit_into_a_folder_that_does_not_exist_yet(library, tmp_path):
    _, shards = library
    out = tmp_path / "new" / "folder" / "physics.h5"
    assert main(["physics-fit", *map(str, shards), "--cameras", "GS1", "--out", str(out), "-q"]) == 0
    assert out.is_file() and sorted(p.name for p in out.parent.iterdir()) == ["physics.h5"]


def test_a_part_without_the_fit_options_is_named(library, tmp_path):
    _, shards = library
    part = P.fit_physics(shards, tmp_path / "GS1.h5", cameras=["GS1"], progress=False)
    with h5py.File(part, "a") as f:
        del f.attrs["params"]
    with pytest.raises(InputError, match="GS1.h5: not a deepdark physics model .no attribute params"):
        P.merge_physics([part], tmp_path / "m.h5")


def test_a_changed_geometry_is_named_by_the_model_the_merge_and_the_masters(library, tmp_path):
    """The geometry is kept as text that no chunk checksum covers: it has its own, as in shards."""
    from deepdark.io.errors import CorruptFileError
    from deepdark.io.masters import Masters
    from deepdark.pipeline.baseline import build_masters

    _, shards = library
    part = P.fit_physics(shards, tmp_path / "GS1.h5", cameras=["GS1"], progress=False)
    masters = build_masters(shards, tmp_path / "masters.h5", progress=False)
    for path in (part, masters):
        with h5py.File(path, "a") as f:
            f.attrs["geometry"] = f.attrs["geometry"].replace("mini", "mine", 1)
    for read in (P.PhysicsModel, lambda p: P.merge_physics([p], tmp_path / "m.h5"), Masters):
        path = masters if read is Masters else part
        with pytest.raises(CorruptFileError, match=f"{path}: attribute 'geometry' fails its checksum"):
            read(path)
    assert not (tmp_path / "m.h5").exists()


def _set_geometry(path, text, checksum=True):
    from deepdark.io.shards import GEOMETRY_CHECKSUM, text_digest

    with h5py.File(path, "a") as f:
        if text is None:
            del f.attrs["geometry"]
        else:
            f.attrs["geometry"] = text
        if GEOMETRY_CHECKSUM in f.attrs:
            del f.attrs[GEOMETRY_CHECKSUM]
        if checksum and isinstance(text, str):
            f.attrs[GEOMETRY_CHECKSUM] = text_digest([text])


GEOMETRY_ERRORS = [(None, ".*no attribute '?geometry"), (5, "attribute 'geometry' is not text")]


@pytest.mark.parametrize("stored, error", GEOMETRY_ERRORS, ids=["gone", "a number"])
def test_a_missing_or_odd_geometry_is_one_line_for_the_model_the_merge_and_the_masters(
    library, tmp_path, stored, error
):
    from deepdark.io.masters import Masters
    from deepdark.pipeline.baseline import build_masters

    _, shards = library
    part = P.fit_physics(shards, tmp_path / "GS1.h5", cameras=["GS1"], progress=False)
    masters = build_masters(shards, tmp_path / "masters.h5", progress=False)
    for path in (part, masters):
        _set_geometry(path, stored)
    for read in (P.PhysicsModel, lambda p: P.merge_physics([p], tmp_path / "m.h5"), Masters):
        path = masters if read is Masters else part
        with pytest.raises(DeepdarkError, match=f"{path}: {error}"):
            read(path)
        h5py.File(path, "a").close()  # the refusal closed the file (HDF5 refuses a second opening)


def test_masters_and_models_of_another_layout_under_the_same_name_are_refused(library, tmp_path):
    """A channel read out the other way round: the same name, frame and active area, another layout."""
    from deepdark.evaluation.evaluate import evaluate
    from deepdark.io.masters import Masters
    from deepdark.physics.model import PhysicsError
    from deepdark.pipeline.baseline import build_masters
    from deepdark.pipeline.correct import MedianDarks
    from deepdark.training.loop import _physics_file

    _, shards = library
    flipped = MINI.source.replace("col0: 126, flip_rows: false", "col0: 126, flip_rows: true")
    assert load_geometry_text(flipped).digest != MINI.digest
    part = P.fit_physics(shards, tmp_path / "GS1.h5", cameras=["GS1"], progress=False)
    masters = build_masters(shards, tmp_path / "masters.h5", progress=False)
    for path in (part, masters):
        _set_geometry(path, flipped)
    same_layout = "of another layout than the data's"
    with pytest.raises(InputError, match=f"{masters}: master darks of geometry 'mini' {same_layout}"):
        MedianDarks(shards[0], masters)
    with pytest.raises(InputError, match=f"{masters}: master darks of geometry 'mini' {same_layout}"):
        evaluate([shards[0]], masters, tmp_path / "eval", progress=False, figures=False)
    with Masters(masters) as m:  # the geometry itself reads: it is only not the data's
        assert m.geometry.name == "mini"
    model_layout = "of another layout or model window than the data's"
    with pytest.raises(PhysicsError, match=f"{part}: fitted on geometry 'mini' {model_layout}"):
        P.physics_predictor(part)(Shard(shards[0]), np.array([0]))
    with pytest.raises(PhysicsError, match=f"{part}: fitted on geometry 'mini' {model_layout}"):
        _physics_file(shards, tmp_path / "model", part, (512, 1), progress=False)
    assert not (tmp_path / "model" / "physics.h5").exists()


def load_geometry_text(text):
    from deepdark.io.geometry import parse_geometry

    return parse_geometry(text)


def test_evaluate_leaves_out_and_lists_the_darks_a_predictor_or_the_masters_do_not_cover(library, tmp_path):
    """A physics model of camera GS1 only, on darks of GS1 and GS2: GS1's are scored, by every method."""
    from deepdark.pipeline.baseline import build_masters

    _, shards = library
    part = P.fit_physics(shards, tmp_path / "GS1.h5", cameras=["GS1"], progress=False)
    with Shard(shards[0]) as s:
        gs1 = s.table[s.table["camera"] == "GS1"]
    masters = build_masters(shards, tmp_path / "masters.h5", progress=False)
    out = tmp_path / "eval"
    assert (
        main(
            ["evaluate", "--test", str(shards[0]), "--physics", str(part), "--baseline", str(masters)]
            + ["--out", str(out), "-q"]
        )
        == 0
    )
    scored = pd.read_csv(out / "per_image.csv", dtype=str)
    unserved = pd.read_csv(out / "unserved.csv", dtype=str)
    assert set(scored["camera"]) == {"GS1"} and len(scored) == len(gs1)
    assert set(unserved["camera"]) == {"GS2"}
    assert set(unserved["unserved_by"]) == {"physics"}


def test_a_physics_model_left_in_a_model_folder_is_reused_only_for_its_own_frames(library, tmp_path):
    """A training refused after its physics fit leaves physics.h5; a run on other shards fits
    again (where a run of its own is there, it is refused)."""
    from deepdark.training.loop import _fitted_from, _physics_file

    _, shards = library
    out = tmp_path / "model"
    P.fit_physics(shards[:1], out / "physics.h5", progress=False)
    assert _fitted_from(out / "physics.h5", shards[:1]) and not _fitted_from(out / "physics.h5", shards)
    (out / "checkpoint.json").write_text("{}")
    with pytest.raises(InputError, match="holds a run made with another physics model"):
        _physics_file(shards, out, None, (512, 1), progress=False)
    (out / "checkpoint.json").unlink()
    path, source = _physics_file(shards, out, None, (512, 1), progress=False)
    assert _fitted_from(path, shards) and source == "fitted from the training shards"
    before = path.read_bytes()
    assert _physics_file(shards, out, None, (512, 1), progress=False)[0].read_bytes() == before  # reused


def test_a_camera_with_bias_frames_only_is_fitted_for_its_biases_with_a_warning(tmp_path, caplog):
    shards = mini_library(tmp_path, nights=1, cameras=("GS1",), temperatures=(-5,), darks_per_temp=0, bias_per_night=3)
    out = P.fit_physics(shards, tmp_path / "x.h5", progress=False)
    assert "camera GS1: a bias-only library (3 frames): it predicts bias frames only" in caplog.text
    with P.PhysicsModel(out) as model:
        model.check_exposure("GS1", 0.0)
        with pytest.raises(P.PhysicsError, match="only bias frames"):
            model.check_exposure("GS1", 30.0)
