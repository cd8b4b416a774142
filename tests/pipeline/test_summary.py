"""The archive summary: one frame counted once across nights, nights with too many failed frames
flagged, the counts per status on the page and in the CSV."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest

from deepdark.cli import build_parser, main
from deepdark.io.predictions import write_predictions
from deepdark.pipeline.correct import MANIFEST_COLUMNS
from deepdark.pipeline.extract import extract
from deepdark.pipeline.qa import night_qa, pooled_table
from deepdark.pipeline.summary import summarize

NIGHT, TWIN = "20240101", "20240102"


@pytest.fixture
def qa_dir(write_night, tmp_path, mini):
    """QA of one night and of the same folder linked under a second night's name."""
    folder = write_night(night=NIGHT, n_dark=3, n_guide=1)
    (folder.parent / TWIN).symlink_to(folder, target_is_directory=True)
    for night in (NIGHT, TWIN):
        shard = extract([folder.parent / night], tmp_path / f"{night}.h5", mini, progress=False).shard
        pred = write_predictions(
            shard,
            tmp_path / f"pred_{night}.h5",
            lambda s, rows: np.full((len(rows), *mini.active.shape), 990.0, np.float32),
            {"method": "model"},
            progress=False,
        )
        night_qa(shard, pred, None, tmp_path / "qa" / night, progress=False)
    return tmp_path / "qa"


def write_manifest(folder, statuses: dict[str, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        for status, n in statuses.items():
            for i in range(n):
                w.writerow(dict(file=f"{status}_{i}.fits", status=status, reason="" if status == "ok" else "why"))


def test_a_frame_in_two_nights_counts_once_in_table1(qa_dir, tmp_path):
    table, table1 = summarize(qa_dir, tmp_path / "s.csv", tmp_path / "s.html", tmp_path / "t.csv")
    one = pd.read_csv(qa_dir / NIGHT / "qa.csv", dtype={"file": str, "channel": str})
    want = pooled_table(one)
    assert table1["total"]["model"] == pytest.approx(want["total"]["model"], rel=1e-12)
    assert table1["total"]["n_images"] == want["total"]["n_images"] == 3 * 4
    # each night keeps its own row; the twin's frames are the duplicates dropped from the pool
    assert list(table["night"]) == [NIGHT, TWIN]
    assert list(table["n_duplicates"]) == [0, 4]
    page = (tmp_path / "s.html").read_text(encoding="utf-8")
    assert "4 duplicate frames" in page
    assert pd.read_csv(tmp_path / "s.csv", dtype={"night": str})["n_duplicates"].tolist() == [0, 4]


def test_nights_with_too_many_failed_frames_are_flagged(qa_dir, tmp_path):
    corrected = tmp_path / "corrected"
    write_manifest(corrected / NIGHT, {"ok": 18, "flagged": 1, "failed": 1})  # 5 %: not more than 5 %
    write_manifest(corrected / TWIN, {"ok": 17, "flagged": 1, "failed": 2, "skipped": 3})  # 10 %
    table, _ = summarize(qa_dir, tmp_path / "s.csv", tmp_path / "s.html", corrected_dir=corrected)
    csv_table = pd.read_csv(tmp_path / "s.csv", dtype={"night": str}, keep_default_na=False).set_index("night")
    for t in (table.set_index("night"), csv_table):
        assert t.loc[NIGHT, ["n_correct_ok", "n_correct_flagged", "n_correct_failed"]].tolist() == [18, 1, 1]
        assert t.loc[TWIN, ["n_correct_ok", "n_correct_flagged", "n_correct_failed"]].tolist() == [17, 1, 2]
        assert t["n_quarantined"].tolist() == [0, 0]
        assert float(t.loc[NIGHT, "failed_fraction"]) == pytest.approx(0.05)
        assert float(t.loc[TWIN, "failed_fraction"]) == pytest.approx(0.1)
        assert "not corrected" not in t.loc[NIGHT, "flag"]
        assert "2 of 20 frames not corrected (10% > 5%)" in t.loc[TWIN, "flag"]
    page = (tmp_path / "s.html").read_text(encoding="utf-8")
    assert "more than 5% of its frames" in page
    assert "35 ok, 2 flagged, 3 failed, 0 quarantined" in page  # the totals
    table, _ = summarize(
        qa_dir, tmp_path / "s.csv", tmp_path / "s.html", corrected_dir=corrected, max_failed_fraction=0.01
    )
    assert all("not corrected" in f for f in table["flag"])


def test_cli_max_failed_fraction(qa_dir, tmp_path):
    corrected = tmp_path / "corrected"
    write_manifest(corrected / NIGHT, {"ok": 9, "failed": 1})
    write_manifest(corrected / TWIN, {"ok": 10})
    argv = ["summary", "--qa-dir", str(qa_dir), "--corrected-dir", str(corrected)]
    argv += ["--csv", str(tmp_path / "s.csv"), "--html", str(tmp_path / "s.html"), "-q"]
    assert main([*argv, "--max-failed-fraction", "0.2"]) == 0
    s = pd.read_csv(tmp_path / "s.csv", dtype={"night": str}, keep_default_na=False)
    assert (s["flag"] == "").all()
    assert main(argv) == 0
    s = pd.read_csv(tmp_path / "s.csv", dtype={"night": str}, keep_default_na=False).set_index("night")
    assert "1 of 10 frames not corrected" in s.loc[NIGHT, "flag"] and s.loc[TWIN, "flag"] == ""
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--max-failed-fraction", "x"])


def test_max_failed_fraction_must_be_a_fraction(tmp_path):
    from deepdark.io.errors import InputError

    for bad in (-0.1, 1.5):
        with pytest.raises(InputError, match="not a fraction"):
            summarize(tmp_path, tmp_path / "s.csv", tmp_path / "s.html", max_failed_fraction=bad)
    assert not (tmp_path / "s.csv").exists()


def test_a_qa_table_of_an_older_layout_is_read_and_a_damaged_or_missing_one_is_named(qa_dir, tmp_path, caplog):
    from deepdark.io.errors import InputError

    older = pd.read_csv(qa_dir / TWIN / "qa.csv", dtype=str).drop(columns=["rmse_floor", "frame_hash"])
    older.to_csv(qa_dir / TWIN / "qa.csv", index=False)
    (qa_dir / "20240103").mkdir()  # a night whose QA did not finish: named, left out
    table, _ = summarize(qa_dir, tmp_path / "s.csv", tmp_path / "s.html", tmp_path / "t.csv")
    assert list(table["night"]) == [NIGHT, TWIN] and table["n_frames"].tolist() == [4, 4]
    assert "20240103 holds no qa.csv" in caplog.text
    with pytest.raises(InputError, match=f"{qa_dir / '20240103' / 'qa.csv'}: no such file"):
        summarize(qa_dir, tmp_path / "s.csv", tmp_path / "s.html", tmp_path / "t.csv", nights=[NIGHT, "20240103"])
    (qa_dir / TWIN / "qa.csv").write_text("")
    with pytest.raises(InputError, match=f"{qa_dir / TWIN / 'qa.csv'}: not a QA table"):
        summarize(qa_dir, tmp_path / "s.csv", tmp_path / "s.html", tmp_path / "t.csv")
    (qa_dir / TWIN / "qa.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="not a QA table .no column file, channel, imagetyp"):
        summarize(qa_dir, tmp_path / "s.csv", tmp_path / "s.html", tmp_path / "t.csv")
