"""Snakemake on a live SLURM: a single-node cluster on loopback, started for this module.

`tests/workflow/slurm/local-slurm.sh` installs Debian's slurmctld/slurmd/munge when missing (root and
apt-get needed) and starts them with all state in a temporary directory; the module's fixture
stops them at teardown. The cluster has a default partition `debug` plus the partitions the
SLURM profile names, and its one node is declared as big as the profile's biggest job (the jobs
then share this machine's cores), so that the profile runs unchanged. A file lock keeps two
test sessions on one machine from using the one SLURM (and its /etc/slurm/slurm.conf) at once. Without root, or without SLURM and apt-get, or when the cluster does
not come up, the module is skipped -- except under CI (CI=true) as root, where that is a
failure. Every snakemake call is wrapped in `timeout`: a status-check misconfiguration hangs
rather than fails.

What is checked:
- jobs really run as SLURM jobs (their SLURM_JOB_ID in outputs and logs, the same ids that the
  executor reports, and SLURM's own record of them);
- a job that fails inside SLURM fails the run, with the rule named;
- a GPU request (`gpu=`, `gpu_model=`, `gres=`) becomes the right sbatch option: this cluster
  has no GPU, so SLURM refuses the submission, and the refused sbatch command line, which the
  executor prints, is checked;
- the real workflow on the `mini` geometry through `workflow/profiles/slurm`: every job a SLURM
  job, the science outputs identical to a local run, and the profile's GPU requests for
  predict/train turned into sbatch options.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "workflow" / "slurm" / "local-slurm.sh"
IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
LOCK_PATH = Path("/run/lock" if Path("/run/lock").is_dir() else "/tmp") / "deepdark-test-slurm.lock"
LOCK_WAIT_S = 240  # another test session on this machine may hold the (one) local SLURM
START_TIMEOUT_S = 300  # includes apt-get install on a fresh machine (about 10 s seen)
SNAKEMAKE_TIMEOUT_S = 150

# Options every submission in this module uses. `squeue` as status command because there is
# no accounting (sacct) here, with MinJobAge=300 in slurm.conf so that finished jobs stay
# visible; the executor's first status check after 2 s instead of 40 s.
SLURM_ARGS = [
    "--executor",
    "slurm",
    "--jobs",
    "3",
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "2",
    "--slurm-keep-successful-logs",
    "--latency-wait",
    "10",
]
DEFAULT_RESOURCES = ["--default-resources", "slurm_partition=debug", "mem_mb=200", "runtime=10"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="the local SLURM needs Linux"),
]


def _unavailable(reason: str):
    """Skip, except under CI as root, where SLURM must work."""
    if IN_CI and IS_ROOT:
        pytest.fail(f"CI=true as root, but the local SLURM is unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass
class Cluster:
    state: Path
    start_s: float

    def run(self, *args, timeout=30) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=_env())

    def jobs(self) -> dict[str, dict[str, str]]:
        """SLURM's record of every job it knows (finished ones for MinJobAge=300 s)."""
        r = self.run("squeue", "--states=all", "--noheader", "--format=%i|%T|%j|%k|%N|%P")
        assert r.returncode == 0, r.stderr
        out = {}
        for line in r.stdout.splitlines():
            jobid, state, name, comment, nodes, partition = line.split("|")
            out[jobid] = dict(state=state, name=name, comment=comment, nodes=nodes, partition=partition)
        return out


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SNAKEMAKE_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")])
    return env


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not IS_ROOT:
        pytest.skip("the local SLURM needs root (daemons, /etc/slurm/slurm.conf, apt-get)")
    if not shutil.which("sinfo") and not shutil.which("apt-get"):
        _unavailable("SLURM is not installed and there is no apt-get to install it")
    lock = open(LOCK_PATH, "a+")
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                _unavailable(f"another test session has held the local SLURM ({LOCK_PATH}) for {LOCK_WAIT_S} s")
            time.sleep(1)
    state = tmp_path_factory.mktemp("slurm")
    t0 = time.monotonic()
    try:
        # --takeover: holding the lock, any other local SLURM of this script is a leftover.
        r = subprocess.run(
            ["bash", str(SCRIPT), "start", str(state), "--takeover"],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            env={**os.environ, **profile_cluster_env()},
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        r = subprocess.CompletedProcess(e.cmd, 124, out, f"start timed out after {START_TIMEOUT_S} s")
    start_s = time.monotonic() - t0
    if r.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], capture_output=True, timeout=120)
        lock.close()
        output = (r.stdout + r.stderr).strip()
        if not (IN_CI and IS_ROOT):  # a skip reason: the script's own message and a few log lines
            output = "\n".join(output.splitlines()[-15:])
        _unavailable(f"local SLURM did not start (exit {r.returncode}):\n{output}")
    print(f"local SLURM up in {start_s:.1f} s ({r.stderr.strip().splitlines()[-1]})")
    try:
        yield Cluster(state=state, start_s=start_s)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], capture_output=True, timeout=120)
        lock.close()


def snakemake(workdir: Path, *args: str, timeout: int = SNAKEMAKE_TIMEOUT_S) -> subprocess.CompletedProcess:
    """snakemake in workdir, under `timeout`, stdout and stderr together in .stdout."""
    cmd = ["timeout", "--kill-after=15", str(timeout), sys.executable, "-m", "snakemake", *args]
    r = subprocess.run(
        cmd, cwd=workdir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout + 60
    )
    assert r.returncode not in (124, 137), f"snakemake hung for {timeout} s (killed by timeout):\n{r.stdout[-6000:]}"
    return r


SUBMITTED = re.compile(r"Job (\S+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


def submitted(output: str) -> dict[str, Path]:
    """SLURM job id -> the executor's log file of that job, from snakemake's output."""
    return {m.group(2): Path(m.group(3).rstrip(").")) for m in SUBMITTED.finditer(output)}


def sbatch_calls(output: str) -> list[tuple[str, list[str]]]:
    """The sbatch command lines the executor ran (--verbose) or printed with a refusal, as
    (rule or group name from their `--comment rule_NAME...`, arguments up to the wrapped
    command), each distinct call once."""
    calls, seen = [], set()
    for m in re.finditer(r"^\s*(?:sbatch call:\s*)?(sbatch --parsable .*)$", output, re.M):
        line = m.group(1).split(" --wrap=", 1)[0].replace(" /dev/stdin", "")
        args = shlex.split(line)
        comment = args[args.index("--comment") + 1]
        key = tuple(a for a in args if a != args[args.index("--job-name") + 1])
        if key in seen:
            continue
        seen.add(key)
        calls.append((re.match(r"rule_(.+?)(?:_wildcards_.*)?$", comment).group(1), args))
    return calls


def gpu_options(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith(("--gpus", "--gres"))]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


# ---------------------------------------------------------------------------------------------


def test_cluster_is_up(slurm):
    r = slurm.run("sinfo", "--noheader", "--format=%P|%a|%T|%N|%c|%m")
    assert r.returncode == 0, r.stderr
    partition, avail, state, node, cpus, mem = r.stdout.split()[0].split("|")
    assert (partition, avail, state, node) == ("debug*", "up", "idle", "localhost")
    assert int(cpus) >= 1 and int(mem) > 0
    r = slurm.run("scontrol", "show", "config")
    assert re.search(r"^MinJobAge\s*=\s*300 sec", r.stdout, re.M), "MinJobAge must be 300 (squeue status checks)"
    assert re.search(r"^DefMemPerCPU\s*=\s*\d+", r.stdout, re.M), "DefMemPerCPU must be set (jobs side by side)"
    assert Path("/etc/slurm/slurm.conf").resolve() == (slurm.state / "etc" / "slurm.conf").resolve()


@pytest.fixture(scope="module")
def small_run(slurm, tmp_path_factory):
    """One snakemake run on SLURM of a small workflow: two rules that succeed, one that fails
    (--keep-going, so that the two finish). One run for both tests below: each run costs at
    least one status-check interval of the executor (2 s, then 12 s more)."""
    workdir = tmp_path_factory.mktemp("small-workflow")
    write(
        workdir / "Snakefile",
        """
        rule all:
            input: "out/first.txt", "out/second.txt", "out/broken.txt"

        rule first:
            output: "out/first.txt"
            log: "logs/first.log"
            shell: "echo job=$SLURM_JOB_ID partition=$SLURM_JOB_PARTITION node=$SLURMD_NODENAME > {output}; echo SLURM_JOB_ID=$SLURM_JOB_ID > {log}"

        rule second:
            output: "out/second.txt"
            log: "logs/second.log"
            shell: "echo job=$SLURM_JOB_ID partition=$SLURM_JOB_PARTITION node=$SLURMD_NODENAME > {output}; echo SLURM_JOB_ID=$SLURM_JOB_ID > {log}"

        rule broken_step:
            output: "out/broken.txt"
            shell: "echo about to fail >&2; exit 3"
        """,
    )
    t0 = time.monotonic()
    r = snakemake(workdir, *SLURM_ARGS, "--keep-going", "--verbose", *DEFAULT_RESOURCES)
    print(f"three-job workflow on SLURM: {time.monotonic() - t0:.1f} s")
    return workdir, r


def test_jobs_run_as_slurm_jobs(slurm, small_run):
    workdir, r = small_run
    ids = submitted(r.stdout)
    assert len(ids) == 3, f"expected 3 submissions, got {ids}\n{r.stdout[-4000:]}"
    record = slurm.jobs()
    seen = set()
    for rule in ("first", "second"):
        out = dict(kv.split("=", 1) for kv in (workdir / "out" / f"{rule}.txt").read_text().split())
        jobid = out["job"]
        assert jobid in ids, f"rule {rule} ran in SLURM job {jobid!r}, not one the executor submitted: {ids}"
        assert out["partition"] == "debug" and out["node"] == "localhost", out
        assert (workdir / "logs" / f"{rule}.log").read_text().strip() == f"SLURM_JOB_ID={jobid}"
        # SLURM's own record: finished, on our node, for this rule
        assert record[jobid]["state"] == "COMPLETED", record[jobid]
        assert record[jobid]["comment"] == f"rule_{rule}", record[jobid]
        assert record[jobid]["nodes"] == "localhost"
        # the executor's per-job SLURM log is named after that id
        assert ids[jobid].name == f"{jobid}.log" and f"rule_{rule}" in ids[jobid].parts
        assert (workdir / ids[jobid]).is_file()
        seen.add(jobid)
    assert len(seen) == 2, "the two rules ran in the same SLURM job"
    # the local rule `all` is not submitted; CPU jobs ask for no GPU
    calls = sbatch_calls(r.stdout)
    assert sorted(rule for rule, _ in calls) == ["broken_step", "first", "second"], calls
    for _rule, args in calls:
        assert args[args.index("-p") + 1] == "debug", args
        assert not gpu_options(args), args


def test_job_failing_inside_slurm_fails_the_run(slurm, small_run):
    workdir, r = small_run
    assert r.returncode != 0, r.stdout[-4000:]
    assert "Error in rule broken_step" in r.stdout, r.stdout[-4000:]
    ids = submitted(r.stdout)
    jobid = next(j for j, log in ids.items() if "rule_broken_step" in log.parts)
    assert re.search(rf"SLURM-job '{jobid}' failed, SLURM status is: 'FAILED'", r.stdout), r.stdout[-4000:]
    assert slurm.jobs()[jobid]["state"] == "FAILED"
    assert not (workdir / "out" / "broken.txt").exists()
    log = ids[jobid] if ids[jobid].is_absolute() else workdir / ids[jobid]
    assert "about to fail" in log.read_text()
    # the others were not failed by it
    assert (workdir / "out" / "first.txt").is_file() and (workdir / "out" / "second.txt").is_file()


def test_gpu_requests_become_sbatch_options(slurm, tmp_path):
    """A real submission: this node has no GPU, so SLURM refuses each of these at sbatch time
    (which proves the option reached SLURM), and the executor prints the refused command."""
    write(
        tmp_path / "Snakefile",
        """
        rule all:
            input: "gpu_count.txt", "gpu_model.txt", "gres_gpu.txt"

        rule gpu_count:
            output: "gpu_count.txt"
            resources: gpu=1
            shell: "touch {output}"

        rule gpu_model:
            output: "gpu_model.txt"
            resources: gpu=2, gpu_model="a100"
            shell: "touch {output}"

        rule gres_gpu:
            output: "gres_gpu.txt"
            resources: gres="gpu:1"
            shell: "touch {output}"
        """,
    )
    r = snakemake(tmp_path, *SLURM_ARGS, "--keep-going", *DEFAULT_RESOURCES, timeout=90)
    assert r.returncode != 0, r.stdout[-4000:]
    assert not submitted(r.stdout), "a GPU job was accepted by a cluster without GPUs"
    assert r.stdout.count("Invalid generic resource (gres) specification") >= 3, r.stdout[-4000:]
    calls = dict(sbatch_calls(r.stdout))
    expected = {"gpu_count": "--gpus=1", "gpu_model": "--gpus=a100:2", "gres_gpu": "--gres=gpu:1"}
    assert set(calls) == set(expected), (calls.keys(), r.stdout[-4000:])
    for rule, option in expected.items():
        assert gpu_options(calls[rule]) == [option], (rule, calls[rule])
        assert f"Error in rule {rule}" in r.stdout


PROFILE = ROOT / "workflow" / "profiles" / "slurm"
LOCAL_PROFILE = ROOT / "workflow" / "profiles" / "local"
WORKFLOW_READY = (ROOT / "Snakefile").is_file() and (PROFILE / "config.yaml").is_file()


# --- the real workflow -----------------------------------------------------------------------
#
# The local run does the whole mini workflow (simulate, extract, baseline, train, predict,
# correct, qa, summary). The SLURM run, through workflow/profiles/slurm, then reprocesses the
# local run's simulated archive and library with the local run's model -- the workflow's "real
# archive, existing model" configuration -- so that SLURM runs everything but simulate and train
# (extract, extract_library, baseline, predict, correct, qa, summary) and its science outputs
# can be compared to the local ones. Training is left out of the SLURM run to stay within the
# time budget of CI (it would add a dependency level, 20-40 s); its GPU request is checked by a
# (refused) submission.

MINI_CONFIG = """
    geometry: mini
    gpu: false
    model: {{epochs: 1, max_steps: 5, crop: null, max_val_samples: 2}}
    threads: {{extract: 1, train: 1, predict: 1, correct: 1, qa: 1}}
    simulate:
      library: {{nights: 2, temperatures: [-5, -15], darks_per_temp: 2, guide_per_night: 0}}
      archive: {{nights: 1, temperatures: [-5, -15], darks_per_temp: 1, guide_per_night: 1}}
    results: {results}
"""
REUSE_CONFIG = """
    results: {results}
    geometry: mini
    gpu: false
    archive: {{path: {local}/simulated/archive}}
    library: {{path: {local}/simulated/library}}
    model: {{dir: {local}/model}}
    threads: {{extract: 1, train: 1, predict: 1, correct: 1, qa: 1}}
"""
# Only what a one-machine cluster needs on top of the profile: squeue status checks (no
# accounting here), a 2 s first status check, the SLURM logs of successful jobs kept.
CLUSTER_ARGS = [
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "2",
    "--slurm-keep-successful-logs",
]


def _profile_resources() -> list[dict]:
    """default-resources and every set-resources entry of the SLURM profile, as dicts."""
    import yaml

    if not (PROFILE / "config.yaml").is_file():
        return []
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text()) or {}

    def as_dict(res):
        if isinstance(res, list):  # ["mem_mb=2000", ...]
            return dict(str(x).split("=", 1) for x in res)
        return dict(res or {})

    out = [as_dict(profile.get("default-resources"))]
    out += [as_dict(r) for r in (profile.get("set-resources") or {}).values()]
    for _rule, threads in (profile.get("set-threads") or {}).items():
        out.append({"cpus_per_task": threads})
    return out


def profile_cluster_env() -> dict[str, str]:
    """Partitions and node size the SLURM profile asks for, for local-slurm.sh: the profile
    runs unchanged, its jobs sharing this machine's cores."""
    res = _profile_resources()
    partitions = sorted({str(r["slurm_partition"]) for r in res if r.get("slurm_partition")})
    cpus = max([16] + [int(r["cpus_per_task"]) for r in res if str(r.get("cpus_per_task", "")).isdigit()])
    mem = max([16000] + [int(r["mem_mb"]) for r in res if str(r.get("mem_mb", "")).isdigit()])
    return {
        "SLURM_PARTITIONS": " ".join(partitions),
        "SLURM_NODE_CPUS": str(cpus),
        "SLURM_NODE_MEMORY_MB": str(mem + 1000),
    }


JOB_BLOCK = re.compile(r"^([ \t]*)(local)?rule (\w+):\n((?:\1[ \t]+\S.*\n?)+)", re.M)


def job_blocks(text: str) -> list[dict]:
    """Snakemake's job announcements: rule, local, output, jobid, resources, threads."""
    blocks = []
    for m in JOB_BLOCK.finditer(text):
        fields = {}
        for line in m.group(4).splitlines():
            key, _, value = line.strip().partition(": ")
            fields.setdefault(key, value)
        res = dict(kv.split("=", 1) for kv in fields.get("resources", "").split(", ") if "=" in kv)
        blocks.append(
            dict(
                rule=m.group(3),
                local=bool(m.group(2)),
                output=fields.get("output", ""),
                jobid=fields.get("jobid"),
                resources=res,
            )
        )
    return blocks


def expected_gpu_option(res: dict) -> str | None:
    """The sbatch option the plugin should make of a job's resources."""
    if res.get("gres"):
        return f"--gres={res['gres']}"
    gpu = res.get("gpu", "0")
    if res.get("gpu_model"):
        return f"--gpus={res['gpu_model']}:{gpu if gpu not in ('', '0') else 1}"
    return f"--gpus={gpu}" if gpu not in ("", "0") else None


def _science_files(results: Path) -> dict[str, Path]:
    """Outputs that must be identical between two runs: shards, predictions, corrected FITS
    (pixel data), and the QA and summary tables."""
    suffixes = (".h5", ".hdf5", ".fits", ".fits.gz", ".fit", ".safetensors", ".csv", ".json")
    skip = ("logs/", "benchmarks/", "simulated/", "model/")
    return {
        str(p.relative_to(results)): p
        for p in sorted(results.rglob("*"))
        if p.is_file() and p.name.endswith(suffixes) and not str(p.relative_to(results)).startswith(skip)
    }


def _same_science(a: Path, b: Path) -> str | None:
    """None when the science content of two files is identical, else what differs. FITS:
    every HDU's data (headers carry dates and checksums of their own); HDF5: every dataset's
    dtype, shape and bytes; anything else: bytes."""
    import numpy as np

    name = a.name
    if name.endswith((".fits", ".fits.gz", ".fit")):
        from astropy.io import fits

        with fits.open(a) as fa, fits.open(b) as fb:
            if len(fa) != len(fb):
                return f"{len(fa)} vs {len(fb)} HDUs"
            for i, (ha, hb) in enumerate(zip(fa, fb)):
                da, db = ha.data, hb.data
                if (da is None) != (db is None):
                    return f"HDU {i}: data in one only"
                if da is not None and (
                    np.asarray(da).dtype != np.asarray(db).dtype or np.asarray(da).tobytes() != np.asarray(db).tobytes()
                ):
                    return f"HDU {i}: data differ"
        return None
    if name.endswith((".h5", ".hdf5")):
        import h5py
        import hdf5plugin  # noqa: F401  (registers the compression filters)

        diffs = []
        with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:

            def visit(key, obj):
                if not isinstance(obj, h5py.Dataset):
                    return
                if key not in fb:
                    diffs.append(f"{key} missing")
                    return
                x, y = obj[()], fb[key][()]
                if obj.dtype.kind == "O" or h5py.check_vlen_dtype(obj.dtype):
                    same = np.asarray(x).tolist() == np.asarray(y).tolist()
                else:
                    x, y = np.asarray(x), np.asarray(y)
                    same = x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
                if not same:
                    diffs.append(f"{key} differs")

            fa.visititems(visit)
            extra = []
            fb.visit(lambda k: extra.append(k) if k not in fa else None)
            diffs += [f"{k} only in the second" for k in extra]
        return ", ".join(diffs) or None
    return None if a.read_bytes() == b.read_bytes() else "bytes differ"


def test_profile_cluster_env_reads_profile():
    env = profile_cluster_env()
    assert int(env["SLURM_NODE_CPUS"]) >= 16 and int(env["SLURM_NODE_MEMORY_MB"]) > 16000
    if WORKFLOW_READY:
        assert env["SLURM_PARTITIONS"], "the SLURM profile names no partition"


@pytest.mark.skipif(not WORKFLOW_READY, reason="the workflow (Snakefile, workflow/profiles/slurm) is not there yet")
def test_mini_workflow_on_slurm_matches_local(slurm, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "slurm"
    for d in (local, remote):
        d.mkdir()
    write(local / "mini.yaml", MINI_CONFIG.format(results=local / "results"))
    write(remote / "mini.yaml", REUSE_CONFIG.format(results=remote / "results", local=local / "results"))
    snakefile = ["--snakefile", str(ROOT / "Snakefile")]

    t0 = time.monotonic()
    local_profile = ["--profile", str(LOCAL_PROFILE)] if (LOCAL_PROFILE / "config.yaml").is_file() else []
    r = snakemake(local, *snakefile, "--configfile", "mini.yaml", *local_profile, "--cores", "2", timeout=300)
    t_local = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-6000:]

    # Through the real profile, unchanged but for the cluster arguments; gpu=False: no GPU here
    # (the GPU request is checked below).
    t0 = time.monotonic()
    r = snakemake(
        remote,
        *snakefile,
        "--configfile",
        "mini.yaml",
        "--profile",
        str(PROFILE),
        *CLUSTER_ARGS,
        "--verbose",
        "--config",
        "gpu=False",
        timeout=300,
    )
    t_slurm = time.monotonic() - t0
    print(f"mini workflow: local {t_local:.0f} s, through the SLURM profile {t_slurm:.0f} s")
    assert r.returncode == 0, r.stdout[-8000:]

    # Every job of the run ran as a SLURM job: each non-local job is announced in the SLURM log
    # (named by SLURM after its job id) of a job that the executor submitted and SLURM completed.
    ids = submitted(r.stdout)
    assert ids, "no job was submitted to SLURM"
    record = slurm.jobs()
    ran_in_slurm = set()
    for jobid, log in ids.items():
        assert record[jobid]["state"] == "COMPLETED", (jobid, record[jobid])
        log = log if log.is_absolute() else remote / log
        assert log.name == f"{jobid}.log" and log.is_file(), log
        text = log.read_text()
        assert f"'SLURM_JOB_ID': '{jobid}'" in text, f"{log} does not show SLURM_JOB_ID={jobid}"
        ran_in_slurm |= {(b["rule"], b["output"]) for b in job_blocks(text)}
    jobs = list(job_blocks(r.stdout))
    remote_jobs = {(b["rule"], b["output"]) for b in jobs if not b["local"]}
    assert {b["rule"] for b in jobs if not b["local"]} >= {
        "extract",
        "extract_library",
        "baseline",
        "predict",
        "correct",
        "qa",
        "summary",
    }
    assert remote_jobs <= ran_in_slurm, f"not run in a SLURM job: {sorted(remote_jobs - ran_in_slurm)}"
    # ... with the profile's partitions
    partitions = {b["rule"]: b["resources"].get("slurm_partition") for b in jobs}
    for rule, args in sbatch_calls(r.stdout):
        if partitions.get(rule):  # (groups: named after the group)
            assert args[args.index("-p") + 1] == partitions[rule], (rule, args)

    # The same science outputs as the local run.
    local_files = _science_files(local / "results")
    remote_files = _science_files(remote / "results")
    for kind in ("shards/", "library/", "masters.h5", "predictions/", "corrected/", "qa/", "summary"):
        assert any(k.startswith(kind) for k in remote_files), f"the SLURM run wrote no {kind}"
    missing = sorted(set(remote_files) - set(local_files))
    assert not missing, f"only in the SLURM run: {missing}"
    diffs = {k: d for k, p in remote_files.items() if (d := _same_science(local_files[k], p))}
    assert not diffs, diffs

    # The profile's GPU requests (train and predict, config gpu: true in the profile) become
    # sbatch options. Forced again with the profile's own config, they are refused here.
    for workdir, rule, extra in ((remote, "predict", []), (local, "train", ["--until", "train"])):
        r = snakemake(
            workdir,
            *snakefile,
            "--configfile",
            "mini.yaml",
            "--profile",
            str(PROFILE),
            *CLUSTER_ARGS,
            "--forcerun",
            rule,
            *extra,
            timeout=120,
        )
        assert r.returncode != 0, f"{rule} with a GPU request ran on a cluster without GPUs"
        assert not submitted(r.stdout)
        blocks = [b for b in job_blocks(r.stdout) if b["rule"] == rule]
        assert blocks, f"{rule} was not scheduled:\n{r.stdout[-4000:]}"
        option = expected_gpu_option(blocks[0]["resources"])
        assert option, f"the SLURM profile gives {rule} no GPU: {blocks[0]['resources']}"
        calls = [args for name, args in sbatch_calls(r.stdout) if name.split("_wildcards_")[0] == rule]
        assert calls, f"no sbatch call of {rule} in the output:\n{r.stdout[-4000:]}"
        for args in calls:
            assert gpu_options(args) == [option], (rule, args)
            assert args[args.index("-p") + 1] == blocks[0]["resources"]["slurm_partition"]
        assert "Invalid generic resource (gres) specification" in r.stdout
        assert f"Error in rule {rule}" in r.stdout
