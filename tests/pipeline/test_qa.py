"""Per-night QA and the archive summary on the `mini` geometry, checked against plain numpy."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from deepdark.io.masters import Masters
from deepdark.io.predictions import Predictions, write_predictions
from deepdark.io.shards import Shard
from deepdark.io.tables import frame_setpoints
from deepdark.pipeline.baseline import build_masters
from deepdark.pipeline.extract import extract
from deepdark.pipeline.qa import _grow, background_stats, night_qa, pooled_table
from deepdark.pipeline.summary import summarize
from deepdark.sim.simulate import simulate_archive

NIGHTS = ("20240101", "20240102")


@pytest.fixture(scope="module")
def archive(tmp_path_factory, mini):
    """Masters from a mini library; two archive nights with predictions = master + a per-night offset
    (night 2's "model" is far off, so the summary must flag it); one corrupt file in night 2."""
    root = tmp_path_factory.mktemp("qa")
    simulate_archive(
        root / "library",
        geometry=mini,
        nights=2,
        darks_per_temp=2,
        guide_per_night=0,
        first_night="20230101",
        progress=False,
    )
    simulate_archive(
        root / "archive",
        geometry=mini,
        nights=2,
        darks_per_temp=1,
        guide_per_night=2,
        first_night="20240101",
        progress=False,
    )
    (root / "archive" / NIGHTS[1] / "GS1_zzz_broken.fits").write_bytes(b"SIMPLE  =                    T\n")
    lib = [
        extract([p], root / f"lib_{p.name}.h5", mini, progress=False).shard
        for p in sorted((root / "library").iterdir())
    ]
    masters = build_masters(lib, root / "masters.h5", progress=False)
    m = Masters(masters)
    out = {"root": root, "masters": masters}
    for night, offset in zip(NIGHTS, (0.5, 400.0)):
        shard = extract([root / "archive" / night], root / f"{night}.h5", mini, progress=False).shard

        def predict(s, rows, offset=offset):
            t = s.table.iloc[rows]
            sps = frame_setpoints(t, m.setpoints)
            return np.stack(
                [m.lookup("temp", r.camera, r.channel, r.exptime, sp) + offset for r, sp in zip(t.itertuples(), sps)]
            )

        preds = write_predictions(
            shard,
            root / f"pred_{night}.h5",
            predict,
            dict(method="model", model_name="t", model_hash="0"),
            progress=False,
        )
        qa = night_qa(shard, preds, masters, root / "qa" / night, progress=False)
        out[night] = dict(shard=shard, preds=preds, qa=qa)
    return out


def test_qa_rmse_equals_numpy(archive, mini):
    night = archive[NIGHTS[0]]
    qa = pd.read_csv(archive["root"] / "qa" / NIGHTS[0] / "qa.csv", dtype={"channel": str})
    with Shard(night["shard"]) as s, Predictions(night["preds"]) as p:
        darks = np.flatnonzero((s.table["imagetyp"] == "DARK").to_numpy())
        w = mini.window_in_active
        se, n = 0.0, 0
        for r in darks:
            truth = s.active([r])[0][w].astype(np.float64)
            pred = p.dark([r])[0][w].astype(np.float64)
            d = pred - truth
            row = qa[(qa["file"] == s.table["file"].iloc[r]) & (qa["channel"] == s.table["channel"].iloc[r])]
            assert row["rmse_model"].item() == pytest.approx(np.sqrt(np.mean(d * d)), rel=1e-9)
            se += float((d * d).sum())
            n += d.size
    table = pooled_table(qa)
    assert table["total"]["model"] == pytest.approx(np.sqrt(se / n), rel=1e-9)
    # the same numbers evaluate() wrote (one definition)
    t1 = json.loads((archive["root"] / "qa" / NIGHTS[0] / "table1.json").read_text())
    for group, row in t1.items():
        for method in ("model", "median_temp", "median_all", "floor"):
            assert table[group][method] == pytest.approx(row[method], rel=1e-9)


def test_qa_outputs_and_guide_frames(archive):
    d = archive["root"] / "qa" / NIGHTS[1]
    qa = pd.read_csv(d / "qa.csv")
    for name in (
        "qa.html",
        "quarantine.csv",
        "fig6_heatmap.png",
        "fig7_histogram.png",
        "rmse_vs_temperature.png",
        "guide_background.png",
    ):
        assert (d / name).stat().st_size > 0, name
    guides = qa[qa["imagetyp"] == "OBJECT"]
    assert len(guides) == 2 * 4 and guides["bg_model"].notna().all() and guides["bg_median"].notna().all()
    # the model of night 2 is the master + 400 ADU: its background is 400 ADU lower, same noise
    np.testing.assert_allclose(guides["bg_median"] - guides["bg_model"], 400.0, atol=0.51)
    np.testing.assert_allclose(guides["madstd_model"], guides["madstd_median"], rtol=1e-4)
    assert (guides["star_free_fraction"] > 0.5).all()
    page = (d / "qa.html").read_text()
    assert "GS1_zzz_broken.fits" in page and "data:image/png;base64," in page
    q = pd.read_csv(d / "quarantine.csv")
    assert list(q["path"].str.rsplit("/", n=1).str[-1]) == ["GS1_zzz_broken.fits"]


def test_summary_pools_squared_errors_and_flags(archive, tmp_path):
    table, table1 = summarize(archive["root"] / "qa", tmp_path / "s.csv", tmp_path / "s.html", tmp_path / "t.csv")
    assert list(table["night"]) == list(NIGHTS)
    good, bad = table.iloc[0], table.iloc[1]
    assert bad["n_quarantined"] == 1 and good["n_quarantined"] == 0
    assert "model" in bad["flag"] and bad["rmse_model"] > bad["rmse_median_temp"]
    # pooled over both nights from squared errors, not the mean of the two RMSEs
    both = pd.concat([pd.read_csv(archive["root"] / "qa" / n / "qa.csv") for n in NIGHTS])
    d = both[both["imagetyp"] == "DARK"]
    want = np.sqrt((d["rmse_model"] ** 2 * d["n_pixels"]).sum() / d["n_pixels"].sum())
    assert table1["total"]["model"] == pytest.approx(want, rel=1e-12)
    assert table1["total"]["model"] != pytest.approx(table["rmse_model"].mean(), rel=1e-3)
    t = pd.read_csv(tmp_path / "t.csv")
    assert t.loc[t["temperature"] == "total", "model"].item() == pytest.approx(want)
    page = (tmp_path / "s.html").read_text()
    assert 'class="flag"' in page and "qa/20240102/qa.html" in page.replace("\\", "/")


def test_background_stats_ignores_stars():
    rng = np.random.default_rng(1)
    img = rng.normal(100.0, 5.0, (200, 200)).astype(np.float32)
    yy, xx = np.mgrid[:200, :200]
    for y, x in ((50, 50), (120, 160), (170, 30)):
        img += 5000 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 2.0**2))
    stats, free = background_stats({"a": img, "b": img - 10})
    (bg_a, sd_a, mad_a), (bg_b, _, _) = stats["a"], stats["b"]
    assert bg_a == pytest.approx(100.0, abs=0.2) and bg_b == pytest.approx(90.0, abs=0.2)
    assert sd_a == pytest.approx(5.0, rel=0.05) and mad_a == pytest.approx(5.0, rel=0.05)
    assert 0.9 < free < 1.0


def test_grow():
    m = np.zeros((7, 7), bool)
    m[3, 3] = True
    g = _grow(m, 1)
    assert g.sum() == 9 and g[2:5, 2:5].all()
    m[0, 6] = True
    assert _grow(m, 2)[0:3, 4:7].all() and not _grow(m, 2)[6, 0]
