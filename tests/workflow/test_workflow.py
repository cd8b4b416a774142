"""The Snakemake workflow end to end on the `mini` geometry, through the local executor.

One run (module fixture): a real-archive layout of three simulated nights, one with a planted
truncated file, a dark library simulated by the workflow itself, a model trained for a few steps;
the results folder and the archive have spaces and shell metacharacters in their names. Then: the
corrected frames, the quarantine, the QA numbers against numpy, a second run that has nothing to
do, a SLURM-profile dry run that asks for a GPU, lint, config errors, and last a run that redoes
what was deleted (a shard, a predictions file, the masters) and takes up the completed file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xxhash
import yaml
from astropy.io import fits

from deepdark.io.frames import write_raw_frame
from deepdark.io.predictions import Predictions
from deepdark.io.shards import Shard
from deepdark.model.files import model_hash
from deepdark.sim.simulate import simulate_archive

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NIGHTS = ("20240101", "20240102", "20240103")
BROKEN = ("20240102", "GS1_dark_9999.fits")
# Paths that a shell would split or run if a rule left one unquoted.
RESULTS = "res ults;x"
ARCHIVE = "raw archive;$(touch pwned)"

TEST_CONFIG = {
    "geometry": "mini",
    "archive": {"path": "archive"},
    "model": {"epochs": 1, "max_steps": 3, "crop": None, "max_val_samples": 2},
    "threads": {"train": 1, "predict": 1},
    "simulate": {"library": {"nights": 2, "darks_per_temp": 2}},
}


def snakemake(workdir: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "test.yaml"),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=workdir)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("workflow")
    simulate_archive(
        work / ARCHIVE,
        geometry="mini",
        nights=len(NIGHTS),
        darks_per_temp=1,
        guide_per_night=2,
        first_night=NIGHTS[0],
        progress=False,
    )
    # a frame of its own (one pixel differs from another frame's), still being transferred
    with fits.open(work / ARCHIVE / BROKEN[0] / "GS1_dark_0001.fits") as hdul:
        data, hdr = hdul[0].data.copy(), hdul[0].header.copy()
    for k in ("BZERO", "BSCALE"):
        hdr.remove(k, ignore_missing=True)
    data[0, 0] ^= 1
    write_raw_frame(work / "complete.fits", data, hdr)
    (work / ARCHIVE / BROKEN[0] / BROKEN[1]).write_bytes((work / "complete.fits").read_bytes()[:20000])  # truncated
    (work / "test.yaml").write_text(yaml.safe_dump({**TEST_CONFIG, "results": RESULTS, "archive": {"path": ARCHIVE}}))
    res = snakemake(work, "--cores", "2", "--profile", str(REPO / "workflow/profiles/local"))
    assert res.returncode == 0, res.stderr[-5000:]
    assert not (work / "pwned").exists()
    return work


def good_frames(work: Path, night: str) -> list[Path]:
    return sorted(p for p in (work / ARCHIVE / night).glob("*.fits") if p.name != BROKEN[1])


def test_corrected_fits_for_every_good_frame(run):
    mhash = model_hash(run / RESULTS / "model")
    for night in NIGHTS:
        out = run / RESULTS / "corrected" / night
        frames = good_frames(run, night)
        assert sorted(p.name for p in out.glob("*.fits")) == [p.name for p in frames]
        assert not list(out.glob(".*partial"))  # no temporary leftovers
        for raw in frames:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a checksum mismatch is a warning in astropy
                with fits.open(out / raw.name, checksum=True) as hdul:
                    hdul.verify("exception")
                    data, h = hdul[1].data, hdul[1].header  # tile-compressed (correct.compression: RICE_1)
                    assert data.shape == (136, 136) and data.dtype.kind == "f" and data.dtype.itemsize == 4
                    assert h["BITPIX"] == -32 and np.isfinite(data).all()
                    assert h["DDMETHOD"] in ("physics", "physics+network") and h["DDMHASH"] == mhash and h["DDMODEL"]
                    assert h["DDSRC"] == raw.name and h["DDSRCHSH"] == xxhash.xxh3_128_hexdigest(raw.read_bytes())
                    assert h["DDVERS"].startswith("deepdark") and h["DDDATE"] and h["DDNIGHT"] == night
                    assert h["IMAGETYP"] == fits.getheader(raw)["IMAGETYP"]
                    assert "HISTORY" in h
                # the checksums of a tile-compressed image are those of the table that stores it
                with fits.open(out / raw.name, disable_image_compression=True, checksum=True) as stored:
                    assert stored[1].verify_checksum() == 1 and stored[1].verify_datasum() == 1


def test_corrupt_file_quarantined_with_reason(run):
    q = pd.read_csv(run / RESULTS / "shards" / f"{BROKEN[0]}.quarantine.csv")
    assert [Path(p).name for p in q["path"]] == [BROKEN[1]]
    assert q["reason"].str.contains("truncated").all()
    for night in NIGHTS:
        q2 = pd.read_csv(run / RESULTS / "qa" / night / "quarantine.csv")
        assert len(q2) == (1 if night == BROKEN[0] else 0)
    page = (run / RESULTS / "qa" / BROKEN[0] / "qa.html").read_text()
    assert BROKEN[1] in page
    # how far the library lets the frame state trust the overscan's row offsets, per channel
    assert "overscan row transfer of GS1/1: " in page
    s = pd.read_csv(run / RESULTS / "summary.csv", dtype={"night": str})
    assert dict(zip(s["night"], s["n_quarantined"])) == {n: int(n == BROKEN[0]) for n in NIGHTS}
    assert (s["n_correct_failed"] == 0).all()


def test_qa_numbers_equal_numpy(run):
    """Model RMSE of one night, per frame-channel and pooled, recomputed from the shard and the
    predictions; the archive's Table 1 recomputed over every night."""
    g_se, g_n = 0.0, 0
    for night in NIGHTS:
        qa = pd.read_csv(run / RESULTS / "qa" / night / "qa.csv", dtype={"channel": str})
        with (
            Shard(run / RESULTS / "shards" / f"{night}.h5") as s,
            Predictions(run / RESULTS / "predictions" / f"{night}.h5") as p,
        ):
            w = s.geometry.window_in_active
            se, n = 0.0, 0
            for r in np.flatnonzero((s.table["imagetyp"] == "DARK").to_numpy()):
                d = p.dark([r])[0][w].astype(np.float64) - s.active([r])[0][w].astype(np.float64)
                row = qa[(qa["file"] == s.table["file"].iloc[r]) & (qa["channel"] == s.table["channel"].iloc[r])]
                assert row["rmse_model"].item() == pytest.approx(np.sqrt(np.mean(d * d)), rel=1e-9)
                se, n = se + float((d * d).sum()), n + d.size
        summary = pd.read_csv(run / RESULTS / "summary.csv", dtype={"night": str}).set_index("night")
        assert summary.loc[night, "rmse_model"] == pytest.approx(np.sqrt(se / n), rel=1e-9)
        g_se, g_n = g_se + se, g_n + n
    t1 = pd.read_csv(run / RESULTS / "summary_table1.csv", dtype={"temperature": str}).set_index("temperature")
    assert t1.loc["total", "model"] == pytest.approx(np.sqrt(g_se / g_n), rel=1e-9)
    assert {"median_temp", "median_all", "floor"} <= set(t1.columns)


def test_second_run_has_nothing_to_do(run):
    res = snakemake(run, "-n", "--cores", "2", "--profile", str(REPO / "workflow/profiles/local"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Nothing to be done" in res.stdout + res.stderr


def test_a_second_run_on_the_same_results_from_another_folder_is_refused(run, tmp_path):
    """Snakemake's own lock lives in its working folder; the results folder has one of its own,
    held by the run's Snakemake process (here: this test holds it)."""
    import fcntl

    summary = run / RESULTS / "summary.csv"
    before = summary.read_bytes(), summary.stat().st_mtime_ns
    config = yaml.safe_load((run / "test.yaml").read_text())
    config = {**config, "results": str(run / RESULTS), "archive": {"path": str(run / ARCHIVE)}}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(config))
    with open(run / RESULTS / ".deepdark.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = snakemake(tmp_path, "--cores", "1", "--forcerun", "summary")
    assert res.returncode != 0
    assert f"another Snakemake run is writing {run / RESULTS}" in res.stdout + res.stderr
    assert (summary.read_bytes(), summary.stat().st_mtime_ns) == before


def test_slurm_profile_dry_run_requests_gpu_for_predict(run):
    res = snakemake(run, "-n", "-F", "--profile", str(REPO / "workflow/profiles/slurm"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    blocks = [b for b in out.split("\n\n") if "rule predict:" in b]
    assert len(blocks) == len(NIGHTS)
    for b in blocks:
        resources = next(line for line in b.splitlines() if line.strip().startswith("resources:"))
        assert "gpu=1" in resources and "slurm_partition=gpu" in resources, resources
    train = next(b for b in out.split("\n\n") if "rule train:" in b)
    assert "gpu=1" in train
    qa = next(b for b in out.split("\n\n") if "rule qa:" in b)
    assert "gpu=1" not in qa


def test_existing_model_skips_training(run):
    import shutil

    shutil.copytree(run / RESULTS / "model", run / "given_model", dirs_exist_ok=True)
    cfg = yaml.safe_load((run / "test.yaml").read_text())
    cfg["model"]["dir"] = "given_model"
    cfg["library"] = {"masters": f"{RESULTS}/masters.h5"}
    (run / "given.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(run),
        "--configfile",
        str(run / "given.yaml"),
        "-n",
        "-p",
        "-F",
        "--cores",
        "2",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=run)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "rule train:" not in out and "rule baseline:" not in out and "rule simulate:" not in out
    assert out.count("rule predict:") == len(NIGHTS) and "--model given_model" in out


def test_report_bundles_qa_pages(run):
    res = snakemake(run, "--report", str(run / "report.zip"))
    assert res.returncode == 0, res.stderr[-3000:]
    import zipfile

    names = zipfile.ZipFile(run / "report.zip").namelist()
    assert sum(n.endswith("qa.html") for n in names) == len(NIGHTS)
    assert any(n.endswith("summary.html") for n in names)


def test_lint_is_clean():
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint", "-s", str(REPO / "Snakefile")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert res.returncode == 0 and "Lints for" not in res.stdout + res.stderr, res.stdout + res.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ({"archive": {"bogus": 1}}, "archive: unknown key(s) 'bogus'"),
        ({"model": {"epochs": "many"}}, "model.epochs: 'many' is not of type 'integer'"),
        ({"archive": {"nights": "sometimes"}}, "archive.nights: 'sometimes' is not valid"),
        ({"archive": {"nights": {"first": 20300101, "last": 20300131}}}, "archive.nights: selects no night"),
        ({"archive": {"path": "no/such/archive"}}, "archive.path: 'no/such/archive' is not a folder"),
        ({"device": "tpu"}, "device: 'tpu' is not one of"),
        ({"model": {"dir": "nowhere"}}, "model.dir: 'nowhere' holds no model.safetensors"),
    ],
)
def test_config_errors_name_the_key(tmp_path, override, message):
    (tmp_path / "archive" / "20240101").mkdir(parents=True)
    base = {**TEST_CONFIG, "archive": {**TEST_CONFIG["archive"]}}
    for k, v in override.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(base))
    res = snakemake(tmp_path, "-n", timeout=120)
    assert res.returncode != 0
    assert message in res.stdout + res.stderr, (res.stdout + res.stderr)[-3000:]
    assert not (tmp_path / "results").exists()


def test_dag_of_many_nights_builds_fast(tmp_path):
    """Planning scales with nights, not files: 300 night folders dry-run in seconds (3,000 take
    about 18 s of CPU, see the README)."""
    import time

    for k in range(300):
        night = tmp_path / "archive" / f"2015{k // 28 + 1:02d}{k % 28 + 1:02d}"
        night.mkdir(parents=True)
        for i in range(2):
            (night / f"GS1_{i}.fits").write_bytes(b"SIMPLE  =                    T")
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({**TEST_CONFIG, "archive": {"path": "archive"}}))
    t0 = time.perf_counter()
    res = snakemake(tmp_path, "-n", "--quiet", "all", timeout=300)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    counts = dict(
        line.split()[:2]
        for line in (res.stdout + res.stderr).splitlines()
        if line.split()[:1] in (["extract"], ["predict"], ["correct"], ["qa"])
    )
    assert counts == {"extract": "300", "predict": "300", "correct": "300", "qa": "300"}, counts
    assert elapsed < 90, f"dry run of 300 nights took {elapsed:.0f} s"


def test_the_workflow_knows_the_physics_presets():
    """rules/common.smk cannot import torch to read them: its copy must agree with the package's."""
    import ast
    import re

    from deepdark.model.nets import PHYSICS_PRESETS

    text = (REPO / "rules" / "common.smk").read_text()
    copy = ast.literal_eval(re.search(r"^PHYSICS_PRESETS = (.+)$", text, re.M).group(1))
    assert set(copy) == set(PHYSICS_PRESETS)


def test_slurm_run_fits_the_physics_model_one_job_per_camera(tmp_path):
    """Eight cameras: once the library is extracted (the checkpoint lists its cameras), a SLURM
    dry run plans eight physics-fit jobs, each with the profile's resources, joined before train."""
    cameras = [f"GS{k}" for k in range(1, 9)]
    config = {
        **TEST_CONFIG,
        "archive": {"path": None},
        "simulate": {"cameras": cameras, "library": {"nights": 1, "darks_per_temp": 1}, "archive": {"nights": 1}},
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(config))
    res = snakemake(tmp_path, "--cores", "2", "--until", "library_cameras", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    listed = pd.read_csv(tmp_path / "results" / "library" / "cameras.csv")
    assert list(listed["camera"]) == cameras
    res = snakemake(tmp_path, "-n", "--profile", str(REPO / "workflow/profiles/slurm"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert job_counts(out)["physics_fit"] == len(cameras)
    blocks = [b for b in out.split("\n\n") if "rule physics_fit:" in b]
    assert sorted(line.split("camera=")[1] for b in blocks for line in b.splitlines() if "camera=" in line) == cameras
    for b in blocks:
        resources = next(line for line in b.splitlines() if line.strip().startswith("resources:"))
        assert "mem_mb=4000" in resources and "cpus_per_task=2" in resources, resources
    merge = next(b for b in out.split("\n\n") if "rule physics_merge:" in b)
    assert all(f"physics/{c}.h5" in merge for c in cameras)


# -- recovery: last, on the finished run ------------------------------------------------------------


def job_counts(out: str) -> dict[str, int]:
    """{rule: jobs} of the first job table Snakemake printed."""
    lines = out.split("Job stats:", 1)[1].split("\n\n", 1)[0].splitlines()
    return {w[0]: int(w[1]) for w in map(str.split, lines) if len(w) == 2 and w[1].isdigit() and w[0] != "total"}


@pytest.fixture(scope="module")
def recovered(run):
    """The finished run, then: the first night's shard, the last night's predictions and the
    masters deleted, and the truncated file completed in place (appended, as a resumed transfer
    does: its folder's modification time stays, and the file keeps its source's old time); then
    one more run. Returns its output and the deleted files' bytes."""
    results = run / RESULTS
    deleted = [results / "shards" / f"{NIGHTS[0]}.h5", results / "predictions" / f"{NIGHTS[2]}.h5"]
    before = {p: p.read_bytes() for p in deleted}
    for p in [*deleted, results / "masters.h5"]:
        p.unlink()
    broken = run / ARCHIVE / BROKEN[0] / BROKEN[1]
    folder_time = broken.parent.stat().st_mtime_ns
    with open(broken, "ab") as fh:
        fh.write((run / "complete.fits").read_bytes()[broken.stat().st_size :])
    os.utime(broken, (1e9, 1e9))  # 2001: older than every result
    assert broken.parent.stat().st_mtime_ns == folder_time
    res = snakemake(run, "--cores", "2", "--profile", str(REPO / "workflow/profiles/local"))
    assert res.returncode == 0, res.stderr[-5000:]
    return res.stdout + res.stderr, before


def test_deleted_results_are_made_again_and_what_they_feed_reruns(run, recovered):
    out, before = recovered
    counts = job_counts(out)
    assert counts.pop("extract") == 2  # the deleted shard's night and the completed file's
    assert counts.pop("baseline") == 1
    for rule in ("predict", "correct", "qa"):
        assert counts.pop(rule) == len(NIGHTS), rule
    assert counts == {"summary": 1, "all": 1}, counts  # no simulation, no training
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path}: made again, but not as before"
    assert (run / RESULTS / "masters.h5").is_file()


def test_a_completed_file_is_taken_up(run, recovered):
    q = pd.read_csv(run / RESULTS / "shards" / f"{BROKEN[0]}.quarantine.csv")
    assert q.empty, q
    assert (run / RESULTS / "corrected" / BROKEN[0] / BROKEN[1]).is_file()
    s = pd.read_csv(run / RESULTS / "summary.csv", dtype={"night": str})
    assert (s["n_quarantined"] == 0).all()
    res = snakemake(run, "-n", "--cores", "2", "--profile", str(REPO / "workflow/profiles/local"))
    assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr, res.stdout[-3000:]


def test_a_rerun_that_quarantines_a_whole_night_keeps_its_corrected_frames(run, recovered):
    """Every file of a night damaged after it was corrected: the rerun extracts, predicts and
    quarantines them all, and then refuses to replace the night's corrected frames with nothing
    (the job fails and says how to ask for it); the frames stay as they were."""
    night = NIGHTS[1]
    corrected = run / RESULTS / "corrected" / night
    before = {p.name: p.read_bytes() for p in corrected.glob("*.fits")}
    assert before
    for raw in (run / ARCHIVE / night).glob("*.fits"):
        raw.write_bytes(raw.read_bytes()[:2880])  # header only: truncated
    res = snakemake(run, "--cores", "2", "--profile", str(REPO / "workflow/profiles/local"))
    assert res.returncode != 0
    log = (run / RESULTS / "logs" / "correct" / f"{night}.log").read_text()
    assert "--replace-with-empty" in log, log[-2000:]
    assert {p.name: p.read_bytes() for p in corrected.glob("*.fits")} == before


def test_predictions_not_kept_are_removed_once_corrected_and_measured(run, recovered):
    """predict.keep false: a night's predictions file is a temporary, gone once its corrected
    frames and QA are written; rule all no longer asks for it."""
    night = NIGHTS[2]
    cfg = yaml.safe_load((run / "test.yaml").read_text())
    (run / "test.yaml").write_text(yaml.safe_dump({**cfg, "predict": {"keep": False}}))
    try:
        targets = [f"{RESULTS}/corrected/{night}/manifest.csv", f"{RESULTS}/qa/{night}/qa.csv"]
        # --forcerun takes a list: the targets go before it
        res = snakemake(run, "--cores", "2", *targets, "--forcerun", "predict")
        assert res.returncode == 0, res.stderr[-3000:]
        assert not (run / RESULTS / "predictions" / f"{night}.h5").exists()
        qa = run / RESULTS / "qa" / night / "qa.csv"
        assert qa.stat().st_mtime > (run / RESULTS / "shards" / f"{night}.h5").stat().st_mtime
        dry = snakemake(run, "-n", "--cores", "2", *targets)
        assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
    finally:
        (run / "test.yaml").write_text(yaml.safe_dump(cfg))
