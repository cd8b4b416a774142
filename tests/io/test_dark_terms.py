"""A physics dark kept as its terms in a predictions file: the same float32 dark, to the bit, as
the physics model predicts; damage to the terms is a named error; older files still read."""

from __future__ import annotations

import shutil
from dataclasses import replace

import h5py
import numpy as np
import pytest

from deepdark import physics as P
from deepdark.io.dark_terms import ChannelMaps, dark_of_terms
from deepdark.io.errors import DeepdarkError, InputError
from deepdark.io.predictions import Predictions, write_predictions
from deepdark.io.shards import Shard
from deepdark.io.units import SATURATED
from deepdark.pipeline.extract import extract
from deepdark.sim.simulate import simulate_archive
from tests.io.test_integrity import damaged_anywhere
from tests.physics.simulated import MINI, mini_library


def summed_by_hand(maps, index, scales, hot, bias):
    """The physics model's arithmetic written out: constant map, each component's product added
    in turn, hot pixels set, the row bias added, capped at saturation (float32 throughout)."""
    s = maps[-1].copy()
    for k, scale in enumerate(scales):
        s += maps[k] * np.float32(scale)
    s.reshape(-1)[index] = np.asarray(hot, np.float32)
    return np.minimum(s + np.asarray(bias, np.float32)[:, None], np.float32(SATURATED))


@pytest.mark.parametrize("components", [0, 1, 2, 3])
def test_a_dark_summed_from_its_terms_is_the_physics_arithmetic_to_the_bit(components):
    rng = np.random.default_rng(components)
    maps = rng.normal(100, 40, (components + 1, 37, 29)).astype(np.float32)
    maps[-1, 3, 4] = 70000  # above saturation: capped
    index = rng.choice(maps[0].size, 9, replace=False)
    scales = rng.uniform(0.1, 30, components).astype(np.float32)
    hot = rng.uniform(500, 90000, 9)  # float64, as the model computes them: rounded once to float32
    bias = rng.normal(1000, 3, 37).astype(np.float32)
    bias[5] = np.nan  # a NaN row stays NaN, as under np.minimum
    got = dark_of_terms(ChannelMaps(maps, index), scales, hot.astype(np.float32), bias)
    want = summed_by_hand(maps, index, scales, hot, bias)
    assert got.dtype == np.float32 and (got == SATURATED).any() and np.isnan(got[5]).all()
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """A physics model of camera GS1, and a night of its guide frames with one frame of GS2,
    which the model cannot serve."""
    root = tmp_path_factory.mktemp("terms")
    library = dict(cameras=("GS1",), temperatures=(-10, -25), nights=2, darks_per_temp=3, dark_exptimes=(10.0, 30.0))
    lib = mini_library(root / "lib", seed=3, **library)
    P.fit_physics(lib, root / "phys.h5", progress=False)
    common = dict(geometry="mini", temperatures=(-15,), darks_per_temp=0, progress=False, first_night="20240301")
    simulate_archive(root / "raw", seed=5, cameras=("GS1",), nights=1, guide_per_night=3, **common)
    simulate_archive(root / "other", seed=6, cameras=("GS2",), nights=1, guide_per_night=1, **common)
    for f in (root / "other" / "20240301").iterdir():
        shutil.copyfile(f, root / "raw" / "20240301" / f.name)
    shard = extract([root / "raw" / "20240301"], root / "night.h5", MINI, progress=False).shard
    physics = P.physics_predictor(root / "phys.h5", area="active")
    pred = write_predictions(shard, root / "pred.h5", physics, {"method": "physics"}, progress=False)
    return dict(root=root, phys=root / "phys.h5", shard=shard, pred=pred)


def test_served_physics_rows_are_kept_as_terms_and_read_back_to_the_bit(night):
    with Shard(night["shard"]) as s, Predictions(night["pred"]) as p:
        rows = np.arange(len(s))
        unserved = (p.table["status"] == "unserved").to_numpy()
        assert unserved.sum() == len(MINI.channels)  # the GS2 frame
        kept = p.f["terms/row_maps"][()] >= 0
        np.testing.assert_array_equal(kept, ~unserved)
        assert p.f["dark"].id.get_num_chunks() == unserved.sum()  # only the unserved rows' pixels
        got = p.dark(rows)
        want = P.PhysicsModel.load(night["phys"]).serve_rows(s, rows).dark
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        assert np.isnan(got[unserved]).all() and np.isfinite(got[~unserved]).all()
        # rows asked for in any mix of kinds and order of reading
        for pick in (rows[::-1][::2][::-1], rows[unserved][:1], rows[~unserved][-2:]):
            np.testing.assert_array_equal(p.dark(pick).view(np.uint32), want[pick].view(np.uint32))


def test_the_same_darks_kept_as_pixels_read_back_the_same(night, tmp_path):
    physics = P.physics_predictor(night["phys"], area="active")
    physics.serve = lambda s, r, serve=physics.serve: replace(serve(s, r), terms=None)  # the darks, not their terms
    pixels = write_predictions(night["shard"], tmp_path / "pixels.h5", physics, {"method": "physics"}, progress=False)
    with Predictions(pixels) as a, Predictions(night["pred"]) as b:
        assert (a.f["terms/row_maps"][()] == -1).all() and a.f["dark"].id.get_num_chunks() == len(a)
        rows = np.arange(len(a))
        np.testing.assert_array_equal(a.dark(rows).view(np.uint32), b.dark(rows).view(np.uint32))
        np.testing.assert_array_equal(a.f["dark_xxh3"][()], b.f["dark_xxh3"][()])


def test_damage_anywhere_in_a_predictions_file_of_terms_is_a_named_error_or_harmless(night, tmp_path):
    """A flipped bit anywhere (the terms, the map sets, their chunk indexes, the table): reading
    every row either gives the same darks or a one-line error of deepdark's naming the file."""

    def read_all(path):
        with Predictions(path) as p:
            return p.table.copy(), p.dark(np.arange(len(p)))

    def same(a, b):
        return a[0].equals(b[0]) and np.array_equal(a[1].view(np.uint32), b[1].view(np.uint32))

    bad = damaged_anywhere(night["pred"], read_all, same, tmp_path, samples=300, bit=5)
    assert not bad, "\n".join(bad[:10])


@pytest.mark.parametrize("dataset", ["terms/bias", "terms/values", "terms/maps/0/maps"])
def test_changed_terms_are_a_damaged_row(night, tmp_path, dataset):
    copy = tmp_path / "copy.h5"
    shutil.copyfile(night["pred"], copy)
    with h5py.File(copy, "r+") as f:
        values = f[dataset][()]
        values.reshape(-1)[1] += np.float32(0.5)
        f[dataset][...] = values
    with Predictions(copy) as p, pytest.raises(DeepdarkError, match=f"{copy}.*checksum"):
        p.dark(np.arange(len(p)))


def test_a_schema_1_file_reads_as_before_and_a_newer_one_is_refused(night, tmp_path):
    old = tmp_path / "old.h5"
    rng = np.random.default_rng(0)
    noise = lambda s, r: rng.normal(1000, 5, (len(r), *MINI.active.shape))  # noqa: E731
    write_predictions(night["shard"], old, noise, {"method": "x"}, progress=False)
    with Predictions(old) as p:
        dark = p.dark(np.arange(len(p)))
    with h5py.File(old, "r+") as f:  # as written before darks could be kept as terms
        del f["terms"]
        f.attrs["schema_version"] = 1
    with Predictions(old) as p:
        np.testing.assert_array_equal(p.dark(np.arange(len(p))), dark)
    with h5py.File(old, "r+") as f:
        f.attrs["schema_version"] = 3
    with pytest.raises(InputError, match=f"{old}: predictions schema 3, this deepdark reads 1 or 2"):
        Predictions(old)


def _set(name, value):
    def edit(f):
        data = f[name][()]
        data.reshape(-1)[0] = value
        del f[name]
        f[name] = data

    return edit


def _replace(name, value):
    def edit(f):
        del f[name]
        if value is not None:
            f[name] = value

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        _set("terms/row_maps", 7),  # a map set the file does not have
        _set("terms/start", 10**9),  # offsets past the values
        _set("terms/start", -5),
        _replace("terms/maps/0/hot_index", np.array([-1])),  # a hot pixel outside the maps
        _replace("terms/maps/0/hot_index", np.array([10**9])),
        _replace("terms/start", None),
        _replace("terms/maps/0/maps", np.zeros((2, 5, 5), np.float32)),  # maps of another shape
        _replace("terms/bias", np.zeros((3, 2), np.float32)),
        _replace("terms/values", np.zeros(3, np.float32)),
    ],
    ids=lambda e: f"{e.__qualname__.split('.')[0]}",
)
def test_terms_that_do_not_fit_together_are_a_named_error(night, tmp_path, edit):
    copy = tmp_path / "copy.h5"
    shutil.copyfile(night["pred"], copy)
    with h5py.File(copy, "r+") as f:
        edit(f)
    with pytest.raises(DeepdarkError) as info, Predictions(copy) as p:
        p.dark(np.arange(len(p)))
    assert str(copy) in str(info.value) and "\n" not in str(info.value)


def test_a_schema_2_file_without_its_terms_is_a_named_error(night, tmp_path):
    copy = tmp_path / "copy.h5"
    shutil.copyfile(night["pred"], copy)
    with h5py.File(copy, "r+") as f:
        del f["terms"]
    with pytest.raises(DeepdarkError, match=f"{copy}: schema 2 without its group /terms"):
        Predictions(copy)


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda t, st: setattr(t, "key", t.key[:-1]), "terms of 3 rows for 4"),
        (lambda t, st: t.scales.__setitem__(0, np.append(t.scales[0], 1.0)), "do not fit its maps"),
        (lambda t, st: t.bias.__setitem__(1, t.bias[1][:-1]), "do not fit its maps"),
        (lambda t, st: st.__setitem__(2, "unserved"), "which it did not serve"),
    ],
    ids=["rows", "weights", "bias", "unserved"],
)
def test_terms_that_do_not_fit_their_rows_are_refused_when_written(night, tmp_path, spoil, message):
    physics = P.physics_predictor(night["phys"], area="active")
    serve = physics.serve

    def spoiled(s, r):
        served = serve(s, r)
        spoil(served.terms, served.status)
        return served

    physics.serve = spoiled
    with pytest.raises(ValueError, match=message):
        write_predictions(
            night["shard"], tmp_path / "p.h5", physics, {"method": "physics"}, batch_size=4, progress=False
        )
    assert not (tmp_path / "p.h5").exists()


def test_a_dark_summed_into_any_layout_of_array_is_the_same():
    rng = np.random.default_rng(9)
    maps = ChannelMaps(rng.normal(0, 1, (2, 6, 5)).astype(np.float32), np.array([3, 17, 29]))
    args = (np.float32([2.0]), np.float32([7.0, 8.0, 9.0]), np.zeros(6, np.float32))
    whole = dark_of_terms(maps, *args)
    strided = np.empty((5, 6), np.float32).T  # a transposed view: not C-contiguous
    np.testing.assert_array_equal(dark_of_terms(maps, *args, out=strided), whole)
    assert whole.reshape(-1)[[3, 17, 29]].tolist() == [7.0, 8.0, 9.0]
