"""Per-night QA and the archive summary on the `mini` geometry, checked against plain numpy."""

from __future__ import annotations

import gc
import json
import os
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from deepdark.io.frames import write_raw_frame
from deepdark.io.masters import Masters
from deepdark.io.predictions import Predictions, write_predictions
from deepdark.io.shards import Shard, printable
from deepdark.io.tables import frame_setpoints
from deepdark.pipeline.baseline import build_masters
from deepdark.pipeline.extract import extract
from deepdark.pipeline.qa import (
    STAR_GROW_PX,
    _grow,
    background_stats,
    clipped,
    median_of_counts,
    night_qa,
    pooled_table,
)
from deepdark.pipeline.summary import summarize
from deepdark.sim.simulate import simulate_archive
from tests.conftest import header, random_frame

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


def _square_dilation(mask: np.ndarray, r: int) -> np.ndarray:
    """Dilation by a (2r+1)-pixel square, shift by shift: the definition, for comparison."""
    padded = np.pad(mask, r)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def _stats_cases() -> list[dict[str, np.ndarray]]:
    """Images for the exactness checks: odd and even pixel counts, float32 and float64, ties,
    stars, NaN and infinities, a constant image, two images with different outliers."""
    rng = np.random.default_rng(11)
    cases = []
    for shape in ((1, 1), (1, 2), (3, 3), (6, 7), (10, 10), (31, 30), (64, 65)):
        sky = rng.normal(400.0, 7.0, shape).astype(np.float32)
        stars = sky.copy()
        stars.flat[:: max(1, sky.size // 5)] += 3000.0
        counts = np.round(rng.normal(50.0, 2.0, shape)).astype(np.float32)  # many ties
        cases += [{"a": sky}, {"model": stars, "median": counts}, {"a": sky.astype(np.float64), "b": counts - 3}]
    odd = rng.normal(0.0, 1.0, (40, 41)).astype(np.float32)
    odd[3, 4], odd[5, 6], odd[7, 8], odd[9, 10] = np.nan, np.inf, -np.inf, 1e6
    cases += [{"a": odd}, {"a": np.full((9, 9), 3.0, np.float32)}, {"a": np.full((4, 4), np.nan, np.float32)}]
    return cases


def test_clipped_is_astropys_sigma_clip_to_the_bit():
    import warnings

    from astropy.stats import sigma_clip

    for images in _stats_cases():
        for img in images.values():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                want = np.ma.getmaskarray(sigma_clip(img, sigma=3.0, maxiters=5, stdfunc="mad_std", masked=True))
            np.testing.assert_array_equal(clipped(img), want)


def test_background_stats_are_astropys_and_numpys_to_the_bit():
    """The sort-based statistics are those of astropy's sigma clipping and mad_std and numpy's
    median and std, every bit: the QA's numbers did not change when they became fast."""
    import warnings

    from astropy.stats import mad_std, sigma_clip

    for images in _stats_cases():
        rejected = np.zeros(next(iter(images.values())).shape, bool)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for img in images.values():
                rejected |= np.ma.getmaskarray(sigma_clip(img, sigma=3.0, maxiters=5, stdfunc="mad_std", masked=True))
        free = ~_square_dilation(rejected, STAR_GROW_PX)
        want = {}
        for name, img in images.items():
            v = img[free].astype(np.float64)
            want[name] = (float(np.median(v)), float(np.std(v)), float(mad_std(v))) if v.size else (np.nan,) * 3
        got, fraction = background_stats(images)
        assert repr(got) == repr(want) and fraction == float(free.mean())


def _selection_cases() -> list[np.ndarray]:
    """float32 values for the median and MAD by selection: odd and even counts; ties; values
    far from the median beside tiny ones; a large level with little noise; magnitudes from
    1e-30 to 1e30; raw counts minus a float dark, as the QA measures them."""
    rng = np.random.default_rng(12)
    cases = []
    for trial in range(480):
        n = int(rng.integers(1, 300))
        kind = trial % 8
        if kind == 0:
            v = rng.normal(100.0, 10.0, n)
        elif kind == 1:
            v = np.round(rng.normal(50.0, 2.0, n))
        elif kind == 2:
            v = rng.normal(0.0, 1e-3, n) + rng.choice([0.0, 1e6], n)
        elif kind == 3:
            v = rng.normal(3e4, 1.0, n)
        elif kind == 4:
            v = rng.standard_cauchy(n) * 1e-20
        elif kind == 5:
            v = np.full(n, 3.0) + (rng.random(n) < 0.3)
        elif kind == 6:
            v = rng.normal(0.0, 1.0, n) * 10.0 ** rng.integers(-30, 30, n)
        else:
            v = np.round(rng.normal(1000.0, 30.0, n)) - rng.normal(990.0, 5.0, n).astype(np.float32)
        cases.append(v.astype(np.float32))
    return cases


def test_robust_stats_by_selection_are_numpys_and_astropys_to_the_bit(monkeypatch):
    """The median and MAD by partitions of float32 values (no sort, no float64 copy) are those of
    numpy and astropy on the float64 values, every bit, and the band's bound always held here;
    the sort it falls back to gives the same."""
    from astropy.stats import mad_std

    from deepdark.pipeline import qa

    selected = qa._mad_by_selection
    fell_back = []
    monkeypatch.setattr(qa, "_mad_by_selection", lambda v, m: fell_back.append(1) or None)
    sorted_path = [qa.robust_stats(v) for v in _selection_cases()[:80]]
    monkeypatch.setattr(qa, "_mad_by_selection", selected)
    fell_back.clear()

    def counting(v, m):
        out = selected(v, m)
        if out is None:
            fell_back.append(1)
        return out

    monkeypatch.setattr(qa, "_mad_by_selection", counting)
    for k, v in enumerate(_selection_cases()):
        w = v.astype(np.float64)
        want = (float(np.median(w)), float(np.std(w)), float(mad_std(w)))
        got = qa.robust_stats(v)
        assert repr(got) == repr(want), (k, got, want)
        if k < len(sorted_path):
            assert repr(sorted_path[k]) == repr(want)
    assert not fell_back


def test_grow_is_the_square_dilation():
    rng = np.random.default_rng(2)
    for shape in ((1, 1), (3, 8), (20, 17)):
        mask = rng.random(shape) < 0.05
        for r in (0, 1, 2, 5):
            np.testing.assert_array_equal(_grow(mask, r), _square_dilation(mask, r))


def test_median_of_counts_is_numpys():
    rng = np.random.default_rng(4)
    for dtype, high in ((np.uint16, 65536), (np.uint8, 256)):
        for n in (1, 2, 3, 1000, 1001):
            a = rng.integers(0, high, n).astype(dtype)
            assert median_of_counts(a) == float(np.median(a))
    view = rng.integers(0, 65536, (50, 61)).astype(np.uint16)[::-1, 3:]  # a readout-coordinates view
    assert median_of_counts(view) == float(np.median(view))
    assert median_of_counts(np.array([1.5, 2.5, 9.0])) == 2.5  # other types: numpy's


# -- names, duplicates and memory ------------------------------------------------------------------


def _zero_predictions(night, tmp_path, mini, name):
    shard = extract([night], tmp_path / f"{name}.h5", mini, progress=False).shard
    pred = write_predictions(
        shard,
        tmp_path / f"pred_{name}.h5",
        lambda s, rows: np.zeros((len(rows), *mini.active.shape), np.float32),
        {"method": "model"},
        progress=False,
    )
    return shard, pred


def test_qa_csv_carries_frame_hash_and_odd_names(write_night, tmp_path, mini):
    night = write_night(n_dark=1, n_guide=1)
    write_raw_frame(night / "café_dark.fits", random_frame(mini, 7), header())
    latin1 = os.fsdecode(os.path.join(os.fsencode(night), b"guide_\xe9.fits"))  # not UTF-8
    write_raw_frame(latin1, random_frame(mini, 8), header("OBJECT"))
    shard, pred = _zero_predictions(night, tmp_path, mini, "odd")
    night_qa(shard, pred, None, tmp_path / "qa", progress=False)
    qa = pd.read_csv(tmp_path / "qa" / "qa.csv", encoding="utf-8", dtype=str, keep_default_na=False)
    assert str(night / "café_dark.fits") in set(qa["file"])
    guide = qa[qa["file"] == str(night / "guide_\\xe9.fits")]
    assert len(guide) == 4 and (guide["bg_model"] != "").all()
    with Shard(shard) as s:
        want = dict(zip(s.table["file"].map(printable), s.table["frame_hash"]))
    assert all(want[f] == h and h for f, h in zip(qa["file"], qa["frame_hash"]))
    assert "guide_\\xe9.fits" in (tmp_path / "qa" / "qa.html").read_text(encoding="utf-8")


def _qa_peak(night, tmp_path, mini, name) -> int:
    shard, pred = _zero_predictions(night, tmp_path, mini, name)
    gc.collect()  # garbage of earlier figures would be freed at a moment that varies
    tracemalloc.start()
    try:
        night_qa(shard, pred, None, tmp_path / f"qa_{name}", progress=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_qa_memory_does_not_grow_with_the_nights_frames(write_night, tmp_path, mini):
    """Peak memory (Python and numpy allocations) at 4x the guide frames: about the same. Both
    nights have more frame-channels than the guide figure draws as bars, so both draw points."""
    _qa_peak(write_night(night="20240100", n_dark=1, n_guide=2), tmp_path, mini, "warm")  # imports, caches
    small = _qa_peak(write_night(night="20240101", n_dark=1, n_guide=14), tmp_path, mini, "small")
    large = _qa_peak(write_night(night="20240102", n_dark=1, n_guide=56), tmp_path, mini, "large")
    # What a figure leaves to the garbage collector varies the peak by about a megabyte; a table
    # or image kept per frame would add ~1 MB per 4 frames here (0.8 MB a frame at full size).
    assert large - small < 3e6, f"peak {small / 1e6:.1f} MB at 14 guide frames, {large / 1e6:.1f} MB at 56"


def test_frames_the_predictions_did_not_serve_are_named_not_scored(write_night, tmp_path, mini):
    from tests.pipeline.test_correct_faults import set_status

    night = write_night(n_dark=2, n_guide=1)
    shard, pred = _zero_predictions(night, tmp_path, mini, "unserved")
    set_status(pred, {"GS1_dark_0001.fits": ("unserved", "no model"), "GS1_object_0002.fits": ("unserved", "no")})
    qa = night_qa(shard, pred, None, tmp_path / "qa", progress=False)
    served = qa["file"] == str(night / "GS1_dark_0000.fits")
    assert qa.loc[served, "rmse_model"].notna().all() and qa.loc[~served, ["rmse_model", "bg_model"]].isna().all().all()
    assert np.isfinite(pooled_table(qa)["total"]["model"])
    page = (tmp_path / "qa" / "qa.html").read_text(encoding="utf-8")
    assert "2 frame(s) unserved" in page and "GS1_object_0002.fits" in page


def test_a_night_whose_darks_were_none_predicted_still_gets_its_page(write_night, tmp_path, mini):
    from tests.pipeline.test_correct_faults import set_status

    night = write_night(n_dark=2, n_guide=1)
    shard, pred = _zero_predictions(night, tmp_path, mini, "no_darks")
    set_status(pred, {f"GS1_dark_000{i}.fits": ("unserved", "no model") for i in range(2)})
    qa = night_qa(shard, pred, None, tmp_path / "qa", progress=False)
    assert qa["rmse_model"].isna().all() and qa.loc[qa["imagetyp"] == "OBJECT", "bg_model"].notna().all()
    page = (tmp_path / "qa" / "qa.html").read_text(encoding="utf-8")
    assert "none predicted: no RMSE on the night" in page


def test_a_camera_without_master_darks_loses_its_own_darks_not_the_baselines(archive, write_night, tmp_path, mini):
    write_night(n_dark=2, n_guide=1)
    night = write_night(n_dark=1, n_guide=1, camera="GS9", seed=1)  # the library has no GS9
    shard, pred = _zero_predictions(night, tmp_path, mini, "two_cameras")
    qa = night_qa(shard, pred, archive["masters"], tmp_path / "qa", progress=False)
    darks = qa[qa["imagetyp"] == "DARK"]
    known = darks["camera"] == "GS1"
    rmse = ["rmse_model", "rmse_median_all", "rmse_median_temp"]
    assert darks.loc[known, rmse].notna().all().all() and darks.loc[~known, rmse].isna().all().all()
    table = pooled_table(qa)["total"]
    assert all(np.isfinite(table[m]) for m in ("model", "median_all", "median_temp"))
    unserved = pd.read_csv(tmp_path / "qa" / "unserved.csv", dtype=str)
    assert set(unserved["camera"]) == {"GS9"} and len(unserved) == 4
    page = (tmp_path / "qa" / "qa.html").read_text(encoding="utf-8")
    assert "4 dark frame-channel(s) without a median master dark in masters.h5 (camera GS9 at -15 C)" in page


def test_darks_without_any_master_are_scored_by_the_model_alone_and_a_rerun_forgets_them(
    archive, write_night, tmp_path, mini
):
    uncovered = write_night(night="20240101", n_dark=2, n_guide=1, camera="GS9")
    shard, pred = _zero_predictions(uncovered, tmp_path, mini, "uncovered")
    qa = night_qa(shard, pred, archive["masters"], tmp_path / "qa", progress=False)
    darks = qa[qa["imagetyp"] == "DARK"]
    assert darks["rmse_model"].notna().all() and darks[["rmse_median_all", "rmse_median_temp"]].isna().all().all()
    page = (tmp_path / "qa" / "qa.html").read_text(encoding="utf-8")
    assert "8 dark frame-channel(s) without a median master dark in masters.h5 (camera GS9 at -15 C): " in page
    assert "the baselines are not scored" in page and not (tmp_path / "qa" / "unserved.csv").exists()
    # the library gains nothing, but the night's darks are now of a covered camera: nothing stale
    (tmp_path / "qa" / "unserved.csv").write_text("stale\n")
    covered = write_night(night="20240102", n_dark=2, n_guide=1)
    shard, pred = _zero_predictions(covered, tmp_path, mini, "covered")
    night_qa(shard, pred, archive["masters"], tmp_path / "qa", progress=False)
    assert not (tmp_path / "qa" / "unserved.csv").exists()
    assert "without a median master" not in (tmp_path / "qa" / "qa.html").read_text(encoding="utf-8")


def test_a_qa_killed_in_the_nights_evaluation_leaves_a_folder_its_rerun_may_finish(
    write_night, tmp_path, mini, monkeypatch
):
    import deepdark.pipeline.qa as Q
    from deepdark.io.outputs import check_output

    shard, pred = _zero_predictions(write_night(n_dark=1, n_guide=1), tmp_path, mini, "killed")

    def killed(*args, **kwargs):
        (tmp_path / "qa" / "per_image.csv").write_text("file\n")  # what evaluate writes, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(Q, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        night_qa(shard, pred, None, tmp_path / "qa", progress=False)
    check_output(tmp_path / "qa", [], "qa")
    monkeypatch.undo()
    night_qa(shard, pred, None, tmp_path / "qa", progress=False)
    assert (tmp_path / "qa" / "qa.html").is_file()


def test_a_selected_camera_the_night_lacks_is_named(write_night, tmp_path, mini):
    shard, pred = _zero_predictions(write_night(n_dark=1, n_guide=1), tmp_path, mini, "absent")
    qa = night_qa(shard, pred, None, tmp_path / "qa", cameras=["GS1", "GS9"], progress=False)
    assert set(qa["camera"]) == {"GS1"}
    page = (tmp_path / "qa" / "qa.html").read_text(encoding="utf-8")
    assert "camera(s) GS9 selected, but none of this night" in page


def test_selected_cameras_are_the_only_ones_scored_on_the_page_and_in_the_figures(write_night, tmp_path, mini):
    write_night(n_dark=2, n_guide=1, camera="GS2", seed=1)
    shard, pred = _zero_predictions(write_night(n_dark=1, n_guide=1), tmp_path, mini, "two")
    qa = night_qa(shard, pred, None, tmp_path / "qa", cameras=["GS2"], progress=False)
    assert set(qa["camera"]) == {"GS2"}
    scored = pd.read_csv(tmp_path / "qa" / "per_image.csv", dtype={"camera": str})
    assert set(scored["camera"]) == {"GS2"} and len(scored) == 2 * len(mini.channels)
    table = json.loads((tmp_path / "qa" / "table1.json").read_text())
    assert table["total"]["n_images"] == len(scored)
    # a selected camera without darks: nothing of the other camera's darks is scored
    write_night(night="20240102", n_dark=0, n_guide=1, camera="GS3")
    write_night(night="20240102", n_dark=1, n_guide=0, camera="GS1")
    shard, pred = _zero_predictions(tmp_path / "archive" / "20240102", tmp_path, mini, "guides")
    night_qa(shard, pred, None, tmp_path / "qa2", cameras=["GS3"], progress=False)
    assert not (tmp_path / "qa2" / "per_image.csv").exists()


def test_evaluate_scores_every_method_on_the_same_darks_and_lists_the_unserved(tmp_path):
    from deepdark.evaluation.evaluate import Scores

    scores = Scores()
    rec = pd.Series(dict(file="a.fits", night="20240101", camera="GS1", channel="1", exptime=30.0, floor=np.nan))
    truth = np.zeros((4, 4), np.float32)
    scores._add_image(rec, -15.0, truth, {"model": truth + 1, "physics": truth + 2})
    scores._add_image(rec, -15.0, truth, {"model": np.full_like(truth, np.nan), "physics": truth + 2})
    table = scores.pooled.table()
    assert table["total"]["model"] == 1.0 and table["total"]["physics"] == 2.0
    assert [u["unserved_by"] for u in scores.unserved] == ["model"]
