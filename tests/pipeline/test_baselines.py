import json

import numpy as np
import pandas as pd
import pytest

from deepdark.cli import main
from deepdark.evaluation.evaluate import evaluate
from deepdark.io.masters import Masters, _BlockPlan
from deepdark.io.shards import Shard
from deepdark.io.tables import frame_setpoints
from deepdark.pipeline.baseline import build_masters
from deepdark.pipeline.extract import extract
from deepdark.sim.simulate import simulate_archive


@pytest.fixture(scope="module")
def sim(tmp_path_factory, mini):
    """Three library nights and one test night of simulated mini darks, extracted."""
    root = tmp_path_factory.mktemp("sim")
    simulate_archive(
        root / "archive", geometry="mini", nights=4, seed=3, darks_per_temp=3, guide_per_night=1, progress=False
    )
    nights = sorted(p for p in (root / "archive").iterdir())
    shards = []
    for night in nights:
        extract([night], root / f"{night.name}.h5", mini, progress=False)
        shards.append(root / f"{night.name}.h5")
    return root, shards[:3], shards[3:]


def test_streamed_median_equals_numpy_median(sim):
    root, library, _ = sim
    build_masters(library, root / "tiny.h5", memory_mb=0, progress=False)  # one row per block
    with Masters(root / "tiny.h5") as m:
        got = m.lookup("temp", "GS1", "3", 30.0, -15.0)
    stack = []
    for path in library:
        with Shard(path) as s:
            t = s.table
            rows = np.flatnonzero((t["imagetyp"] == "DARK") & (t["channel"] == "3") & (t["settemp"] == -15.0))
            stack.append(s.active(rows))
    np.testing.assert_array_equal(got, np.median(np.concatenate(stack), axis=0).astype(np.float32))


def numpy_masters(library) -> dict[tuple, np.ndarray]:
    """Every master as np.median of its frames read plainly: {(kind, channel, setpoint): master}."""
    tables, stacks = [], []
    for path in library:
        with Shard(path) as s:
            rows = np.flatnonzero(s.table["imagetyp"] == "DARK")
            tables.append(s.table.iloc[rows])
            stacks.append(s.active(rows))
    t, stack = pd.concat(tables, ignore_index=True), np.concatenate(stacks)
    out = {}
    for ch in sorted(set(t["channel"])):
        mine = (t["channel"] == ch).to_numpy()
        out[("all", ch, None)] = np.median(stack[mine], axis=0).astype(np.float32)
        for sp in sorted(set(t["settemp"])):
            sel = mine & (t["settemp"] == sp).to_numpy()
            out[("temp", ch, sp)] = np.median(stack[sel], axis=0).astype(np.float32)
    return out


@pytest.mark.parametrize("memory_mb", [512, 0.3, 0], ids=["one-block", "scratch-file", "one-row"])
def test_masters_equal_numpy_median_whatever_the_budget(sim, tmp_path, memory_mb):
    """One block, blocks through the scratch file, one row a block: np.median's masters to the bit,
    and no scratch file left behind."""
    root, library, _ = sim
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    build_masters(library, tmp_path / "m.h5", memory_mb=memory_mb, progress=False, scratch=scratch)
    want = numpy_masters(library)
    with Masters(tmp_path / "m.h5") as m:
        assert len(m.table) == len(want)
        for i, rec in m.table.iterrows():
            key = (rec["kind"], rec["channel"], None if rec["kind"] == "all" else rec["setpoint"])
            np.testing.assert_array_equal(m.f["master"][i], want[key], err_msg=str(key))
    assert not list(scratch.iterdir())


def test_block_plan_keeps_to_the_budget():
    n_frames, height, width, groups = 500, 1042, 1042, 4
    for memory_mb in (64, 512, 4096):
        plan = _BlockPlan.make(memory_mb, n_frames, height, width, groups)
        row = n_frames * width * 2
        fixed = (1 + groups) * height * width * 4 + height * width * 2
        assert 1 <= plan.slab_rows <= plan.block <= height
        assert fixed + plan.block * row + plan.slab_rows * row <= memory_mb * 2**20
    assert _BlockPlan.make(512, 20, height, width, groups).block == height  # a small library: one block


def test_masters_record_their_frames(sim):
    """The masters file names every library frame that went in, with its hashes; each master's
    inputs are as many as its n_frames."""
    root, library, _ = sim
    build_masters(library, root / "rec.h5", progress=False)
    want = []
    for path in library:
        with Shard(path) as s:
            t = s.table[s.table["imagetyp"] == "DARK"].drop_duplicates("file")
            want += [(f, h, fh, path.name) for f, h, fh in zip(t["file"], t["file_hash"], t["frame_hash"])]
    with Masters(root / "rec.h5") as m:
        got = m.frames
        assert sorted(zip(got["file"], got["file_hash"], got["frame_hash"], got["shard"])) == sorted(want)
        assert got["file_hash"].str.fullmatch("[0-9a-f]{32}").all()
        for i, rec in m.table.iterrows():
            inputs = m.inputs(i)
            assert len(inputs) == rec["n_frames"] and (inputs["camera"] == rec["camera"]).all()
            if rec["kind"] == "temp":
                assert np.allclose(inputs["setpoint"], rec["setpoint"])


def test_per_temperature_median_beats_all_temperature_median_and_floor_is_lowest(sim):
    root, library, test = sim
    build_masters(library, root / "masters.h5", progress=False)
    table = evaluate(test, root / "masters.h5", root / "eval", progress=False, figures=True)
    assert set(table) == {"total", "-5", "-10", "-15", "-25"}
    for group, row in table.items():
        assert row["floor"] < row["median_temp"] < row["median_all"], group
    assert table["total"]["n_images"] == 4 * 4 * 3
    saved = json.loads((root / "eval" / "table1.json").read_text())
    assert saved["total"]["median_temp"] == pytest.approx(table["total"]["median_temp"])
    for fig in ("fig6_heatmap.png", "fig7_histogram.png", "fig8_histogram_by_temp.png"):
        assert (root / "eval" / fig).stat().st_size > 10_000


def test_pooled_rmse_is_recomputable_from_files(sim):
    """Table 1's median_temp for -15 C equals an independent numpy computation."""
    root, library, test = sim
    build_masters(library, root / "m2.h5", progress=False)
    table = evaluate(test, root / "m2.h5", root / "e2", progress=False, figures=False)
    se, n = 0.0, 0
    with Shard(test[0]) as s, Masters(root / "m2.h5") as m:
        rows = np.flatnonzero((s.table["imagetyp"] == "DARK") & (s.table["settemp"] == -15.0))
        for r in rows:
            rec = s.table.iloc[r]
            master = m.lookup("temp", rec["camera"], rec["channel"], rec["exptime"], -15.0)[2:66, 2:66]
            truth = s.active([r])[0][2:66, 2:66].astype(float)
            se += ((master - truth) ** 2).sum()
            n += truth.size
    assert table["-15"]["median_temp"] == pytest.approx(np.sqrt(se / n), rel=1e-9)


def test_setpoint_falls_back_to_nearest_library_setpoint():
    import pandas as pd

    t = pd.DataFrame({"settemp": [np.nan, -10.0, np.nan], "ccdtemp": [-14.2, -9.1, -26.0]})
    np.testing.assert_array_equal(frame_setpoints(t, [-5, -10, -15, -25]), [-15, -10, -25])


def test_cli_extract_baseline_evaluate(sim, tmp_path, capsys):
    root, library, test = sim
    assert main(["-q", "baseline", *map(str, library), "--out", str(tmp_path / "m.h5")]) == 0
    assert (
        main(
            [
                "-q",
                "evaluate",
                "--test",
                str(test[0]),
                "--baseline",
                str(tmp_path / "m.h5"),
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    assert "median_temp" in capsys.readouterr().out
    assert main(["-q", "baseline", str(tmp_path / "nope.h5"), "--out", str(tmp_path / "x.h5")]) == 2
    assert "nope.h5" in capsys.readouterr().err
