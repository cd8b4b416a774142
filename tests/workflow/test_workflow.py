"""The Snakemake workflow end to end on the `mini` geometry, through the local executor.

One run (module fixture): a real-archive layout of three simulated nights, one with a planted
truncated file, a dark library simulated by the workflow itself, a model trained for a few steps.
Then: the corrected frames, the quarantine, the QA numbers against numpy, a second run that has
nothing to do, a SLURM-profile dry run that asks for a GPU, lint, and config errors.
"""

from __future__ import annotations

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

from deepdark.io.predictions import Predictions
from deepdark.io.shards import Shard
from deepdark.model.files import model_hash
from deepdark.sim.simulate import simulate_archive

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NIGHTS = ("20240101", "20240102", "20240103")
BROKEN = ("20240102", "GS1_dark_9999.fits")

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
        work / "archive",
        geometry="mini",
        nights=len(NIGHTS),
        darks_per_temp=1,
        guide_per_night=2,
        first_night=NIGHTS[0],
        progress=False,
    )
    good = work / "archive" / BROKEN[0] / "GS1_dark_0001.fits"
    (work / "archive" / BROKEN[0] / BROKEN[1]).write_bytes(good.read_bytes()[:20000])  # truncated
    (work / "test.yaml").write_text(yaml.safe_dump(TEST_CONFIG))
    res = snakemake(work, "--cores", "2", "--profile", str(REPO / "workflow/profiles/local"))
    assert res.returncode == 0, res.stderr[-5000:]
    return work


def good_frames(work: Path, night: str) -> list[Path]:
    return sorted(p for p in (work / "archive" / night).glob("*.fits") if p.name != BROKEN[1])


def test_corrected_fits_for_every_good_frame(run):
    mhash = model_hash(run / "results/model")
    for night in NIGHTS:
        out = run / "results/corrected" / night
        frames = good_frames(run, night)
        assert sorted(p.name for p in out.glob("*.fits")) == [p.name for p in frames]
        assert not list(out.glob(".*partial"))  # no temporary leftovers
        for raw in frames:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a checksum mismatch is a warning in astropy
                with fits.open(out / raw.name, checksum=True) as hdul:
                    hdul.verify("exception")
                    data, h = hdul[0].data, hdul[0].header
                    assert data.shape == (136, 136) and data.dtype.kind == "f" and data.dtype.itemsize == 4
                    assert h["BITPIX"] == -32 and np.isfinite(data).all()
                    assert h["DDMETHOD"] == "model" and h["DDMHASH"] == mhash and h["DDMODEL"]
                    assert h["DDSRC"] == raw.name and h["DDSRCHSH"] == xxhash.xxh3_128_hexdigest(raw.read_bytes())
                    assert h["DDVERS"].startswith("deepdark") and h["DDDATE"] and h["DDNIGHT"] == night
                    assert h["IMAGETYP"] == fits.getheader(raw)["IMAGETYP"]
                    assert "CHECKSUM" in h and "DATASUM" in h and "HISTORY" in h


def test_corrupt_file_quarantined_with_reason(run):
    q = pd.read_csv(run / "results/shards" / f"{BROKEN[0]}.quarantine.csv")
    assert [Path(p).name for p in q["path"]] == [BROKEN[1]]
    assert q["reason"].str.contains("truncated").all()
    for night in NIGHTS:
        q2 = pd.read_csv(run / "results/qa" / night / "quarantine.csv")
        assert len(q2) == (1 if night == BROKEN[0] else 0)
    assert BROKEN[1] in (run / "results/qa" / BROKEN[0] / "qa.html").read_text()
    s = pd.read_csv(run / "results/summary.csv", dtype={"night": str})
    assert dict(zip(s["night"], s["n_quarantined"])) == {n: int(n == BROKEN[0]) for n in NIGHTS}
    assert (s["n_correct_failed"] == 0).all()


def test_qa_numbers_equal_numpy(run):
    """Model RMSE of one night, per frame-channel and pooled, recomputed from the shard and the
    predictions; the archive's Table 1 recomputed over every night."""
    g_se, g_n = 0.0, 0
    for night in NIGHTS:
        qa = pd.read_csv(run / "results/qa" / night / "qa.csv", dtype={"channel": str})
        with (
            Shard(run / "results/shards" / f"{night}.h5") as s,
            Predictions(run / "results/predictions" / f"{night}.h5") as p,
        ):
            w = s.geometry.window_in_active
            se, n = 0.0, 0
            for r in np.flatnonzero((s.table["imagetyp"] == "DARK").to_numpy()):
                d = p.dark([r])[0][w].astype(np.float64) - s.active([r])[0][w].astype(np.float64)
                row = qa[(qa["file"] == s.table["file"].iloc[r]) & (qa["channel"] == s.table["channel"].iloc[r])]
                assert row["rmse_model"].item() == pytest.approx(np.sqrt(np.mean(d * d)), rel=1e-9)
                se, n = se + float((d * d).sum()), n + d.size
        summary = pd.read_csv(run / "results/summary.csv", dtype={"night": str}).set_index("night")
        assert summary.loc[night, "rmse_model"] == pytest.approx(np.sqrt(se / n), rel=1e-9)
        g_se, g_n = g_se + se, g_n + n
    t1 = pd.read_csv(run / "results/summary_table1.csv", dtype={"temperature": str}).set_index("temperature")
    assert t1.loc["total", "model"] == pytest.approx(np.sqrt(g_se / g_n), rel=1e-9)
    assert {"median_temp", "median_all", "floor"} <= set(t1.columns)


def test_second_run_has_nothing_to_do(run):
    res = snakemake(run, "-n", "--cores", "2", "--profile", str(REPO / "workflow/profiles/local"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Nothing to be done" in res.stdout + res.stderr


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

    shutil.copytree(run / "results/model", run / "given_model", dirs_exist_ok=True)
    cfg = yaml.safe_load((run / "test.yaml").read_text())
    cfg["model"]["dir"] = "given_model"
    cfg["library"] = {"masters": "results/masters.h5"}
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
