"""The workflow checks every configuration value before any job runs, and never removes a
finished result because of a bad one.

Each case starts from a working folder whose `results/` already holds finished results (files
standing in for them: no job may run, so none is read), sets one bad value, and runs Snakemake for
real (not a dry run): it must stop before any job with one line naming the key, and leave every
result as it was. Also: the archive root's odd night folders (a symlink loop, a night linked under a
second name), and `correct.replace_with_empty` on the correct job's command line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deepdark.io.frames import write_raw_frame
from deepdark.sim.simulate import simulate_archive
from tests.conftest import header, random_frame
from tests.workflow.test_workflow import REPO, TEST_CONFIG

pytestmark = pytest.mark.slow

NIGHTS = ("20240101", "20240102")
# Finished results that a bad configuration must leave alone.
FINISHED = (
    "results/shards/20240101.h5",
    "results/shards/20240101.quarantine.csv",
    "results/library/20230101.h5",
    "results/predictions/20240101.h5",
    "results/masters.h5",
    "results/model/model.safetensors",
    "results/model/model.json",
    "results/corrected/20240101/GS1_dark_0001.fits",
    "results/qa/20240101/qa.csv",
    "results/summary.csv",
)


def snakemake(work: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    (work / "test.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work)]
    cmd += ["--configfile", str(work / "test.yaml"), "--cores", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=work)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def archive(tmp_path_factory, mini):
    """A simulated archive (mini) and, with other header keyword names, a library: TEMP for CCDTEMP."""
    root = tmp_path_factory.mktemp("archives")
    simulate_archive(root / "archive", geometry="mini", nights=2, darks_per_temp=1, guide_per_night=1, progress=False)
    for night in ("20230101", "20230102"):
        for i in range(2):
            h = header(ccdtemp=None, TEMP=-15.1, date=f"{night[:4]}-{night[4:6]}-{night[6:]}T13:00:0{i}")
            write_raw_frame(root / "library" / night / f"GS1_dark_{i:04d}.fits", random_frame(mini, i), h)
    return root


@pytest.fixture
def work(tmp_path, archive):
    """A working folder with the archives and finished results (stand-ins)."""
    for name in ("archive", "library"):
        shutil.copytree(archive / name, tmp_path / name, symlinks=True)
    for i, name in enumerate(FINISHED):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(f"finished result {i}\n".encode())
    return tmp_path


def config(**changes) -> dict:
    """TEST_CONFIG over the archive and library of the fixture, with ``changes`` merged in."""
    base = {**TEST_CONFIG, "archive": {"path": "archive"}, "library": {"path": "library"}, "keywords": {}}
    for key, value in changes.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return base


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"geometry": "mini-typo"}, "geometry: geometry 'mini-typo': neither a preset"),
        ({"geometry": "geometries/none.yaml"}, "geometry: geometry 'geometries/none.yaml'"),
        (
            {"keywords": {"ccdtemp": "CCD_TEMP"}},
            "keywords.ccdtemp: 'CCD_TEMP' is in none of 10 sampled frame headers of archive.path 'archive'",
        ),
        (
            {"keywords": {"camera": "INSTRUME"}, "library": {"path": None}},
            "keywords.camera: 'INSTRUME' is in none of the simulated library's headers",
        ),
        (
            {},  # the library's frames call CCDTEMP "TEMP"
            "keywords.ccdtemp: 'CCDTEMP' (the default; set keywords.ccdtemp) is in none of 4 sampled frame "
            "headers of library.path 'library'",
        ),
        ({"library": {"masters": "no/masters.h5"}}, "library.masters: 'no/masters.h5' is not a file"),
        ({"model": {"extra_args": "--val-nights 1 --bogus 3"}}, "model.extra_args: '--val-nights 1 --bogus 3': "),
        ({"model": {"extra_args": "--note 'unclosed"}}, 'model.extra_args: "--note \'unclosed": No closing quotation'),
        ({"archive": {"cameras": ["GS9"]}}, "archive.cameras: GS9 is the camera of none of"),
        ({"geometry": "lamost-kaf4320"}, "geometry: 'lamost-kaf4320' describes 2094 x 2200 frames; the"),
        ({"results": "archive/results"}, "results: 'archive/results' lies inside archive.path 'archive'"),
    ],
    ids=[
        "geometry",
        "geometry-file",
        "keyword",
        "keyword-simulated",
        "keyword-default",
        "masters",
        "options",
        "quote",
        "cameras",
        "geometry-of-other-frames",
        "results-in-archive",
    ],
)
def test_a_bad_value_stops_the_run_before_any_job(work, changes, message):
    before = snapshot(work / "results")
    res = snakemake(work, config(**changes))
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert message in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "rule extract" not in out and "Removing" not in out, out[-3000:]
    assert snapshot(work / "results") == before, "a finished result was changed"


def test_the_library_keyword_checked_and_the_model_geometry(work):
    """With the library's name for CCDTEMP given, the configuration passes; a given model or
    master-dark file of another geometry does not."""
    res = snakemake(work, config(keywords={"ccdtemp": "TEMP"}), "-n")
    # the archive's frames call it CCDTEMP: one name for both sets cannot fit
    assert res.returncode != 0 and "keywords.ccdtemp: 'TEMP' is in none of 10 sampled" in res.stdout + res.stderr
    model = work / "given_model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "model.json").write_text(json.dumps({"geometry": {"name": "lamost-kaf4320", "sha256": "0" * 64}}))
    res = snakemake(work, config(model={"dir": "given_model"}, library={"path": None, "masters": None}), "-n")
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "model.dir: 'given_model' was trained on geometry 'lamost-kaf4320'" in out, out


def test_a_good_configuration_passes_and_passes_replace_with_empty(work):
    cfg = config(library={"path": None})
    res = snakemake(work, cfg, "-n", "-p", "-F")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert out.count("deepdark correct") == len(NIGHTS) and "--replace-with-empty" not in out
    res = snakemake(work, config(library={"path": None}, correct={"replace_with_empty": True}), "-n", "-p", "-F")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    corrects = [line for line in out.splitlines() if "deepdark correct" in line]
    assert len(corrects) == len(NIGHTS) and all("--replace-with-empty" in line for line in corrects), corrects


def test_odd_night_folders_are_named_and_skipped(work):
    """A symlink loop named as a night is skipped with a warning; a night folder linked under a
    second name is used once, under its first name."""
    (work / "archive" / "20240103").symlink_to("20240103")  # a loop
    (work / "archive" / "20240109").symlink_to("20240101")  # the same night again
    res = snakemake(work, config(library={"path": None}), "-n", "-F", "--quiet", "rules")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "archive.path: night folder archive/20240103 skipped" in out, out[-3000:]
    assert "archive/20240109 is the night folder 20240101 under a second name" in out, out[-3000:]
    counts = dict(line.split()[:2] for line in out.splitlines() if line.split()[:1] in (["extract"], ["correct"]))
    assert counts == {"extract": str(len(NIGHTS)), "correct": str(len(NIGHTS))}, counts
