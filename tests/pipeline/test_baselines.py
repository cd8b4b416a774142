import json

import numpy as np
import pytest

from deepdark.cli import main
from deepdark.evaluation.evaluate import evaluate
from deepdark.io.masters import Masters
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
