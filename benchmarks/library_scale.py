"""How the cost of building from a dark library grows with the library: N and 4N full-size
darks (or of ``--geometry``), against a bare read of the same shards in the same run. Not a test.

    .venv/bin/python benchmarks/library_scale.py --step baseline [--darks 16] [--memory-mb 512]

Simulates 4N full-size darks, or of ``--geometry`` (``deepdark.sim.simulate``: four nights of
N, two setpoints), extracts each night into a shard, warms the page cache, then for the first
night's shard (N darks) and all four (4N):

* the bare read: every stored active area read chunk by chunk (``ds[i]``: each chunk decoded
  once, nothing else), per dark;
* the step, in a child process (its peak resident memory above what it held before the
  step, VmHWM, its libraries loaded: torch's import alone is 0.9 s and 181 MB), per dark, and
  its ratio to the bare read; ``--step-repeats K``: the median of K runs, each on a page cache
  warmed again, with the fastest and slowest;
* the scaling ratio time(4N) / time(N) (linear: 4).

It also runs 4N with a budget that gives the blocks of rows the library of the projection
would get at ``--memory-mb``, so that the projection for ``--project`` darks (default 20,000)
uses the path such a library takes (through the scratch file), not the one-block path of a
small library.

Steps: ``baseline`` (median master darks) and ``physics-fit`` (the per-pixel physics fit). A step
is a function ``(shards, out, memory_mb) -> None`` in ``STEPS``, timed the same way, with a
function in ``BLOCK_ROWS`` that gives the rows per block its plan makes of a budget.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepdark.io.geometry import load_geometry  # noqa: E402
from deepdark.io.masters import _BlockPlan  # noqa: E402
from deepdark.io.shards import Shard  # noqa: E402
from deepdark.io.threads import available_cores  # noqa: E402
from deepdark.physics.fit import _library, _stack_plan, _table_bytes  # noqa: E402
from deepdark.pipeline.extract import extract  # noqa: E402
from deepdark.sim.simulate import simulate_archive  # noqa: E402

# step -> (module, function) called as function(shards, out, memory_mb=..., progress=False).
STEPS = {
    "baseline": ("deepdark.pipeline.baseline", "build_masters"),
    "physics-fit": ("deepdark.physics.fit", "fit_physics"),
}
SETPOINTS = (-5, -15)
# The maps of the physics fit of this library: dark current (one component: two setpoints, one
# exposure time) and glow.
PHYSICS_MAPS = 2

# step -> rows per block of the stack of a channel's (a family's) n darks at a budget (MB).
BLOCK_ROWS = {
    "baseline": lambda memory_mb, n, shape: _BlockPlan.make(memory_mb, n, *shape, len(SETPOINTS)).block,
    "physics-fit": lambda memory_mb, n, shape: _stack_plan(
        n, shape, PHYSICS_MAPS, memory_mb, threads=available_cores()
    )[0],
}
# step -> how often its scratch file is read
SCRATCH_READS = {"baseline": "once", "physics-fit": "twice (the fit's two passes)"}

# The child's peak resident memory is its VmHWM (Linux; ru_maxrss would carry the parent's peak
# across fork and exec).
CHILD = """
import importlib, json, sys, time
def peak_kb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
module, name, out, memory_mb, *shards = sys.argv[1:]
step = getattr(importlib.import_module(module), name)
# loaded by the fit when first needed: a library's code, as numpy's, is not the step's (torch
# counts, numba sums: 181 and 150 MB resident); compiling the sums stays in the step (1 s, 44 MB)
import torch
import deepdark.physics.compiled
from deepdark.io.shards import Shard
with Shard(shards[0]) as s:  # load HDF5's filters and caches first: the step's own memory is measured
    s.f["active"][0], s.f["a1"][0]
before = peak_kb()
t = time.perf_counter()
step(shards, out, memory_mb=float(memory_mb), progress=False)
elapsed = time.perf_counter() - t
print(json.dumps({"seconds": elapsed, "peak_rise_mb": (peak_kb() - before) / 1024}))
"""


def bare_read(shards: list[Path]) -> int:
    """Read every stored active area chunk by chunk; return how many."""
    n = 0
    for path in shards:
        with h5py.File(path, "r") as f:
            ds = f["active"]
            for i in range(ds.shape[0]):
                ds[i]
                n += 1
    return n


def timed_bare(shards: list[Path], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        bare_read(shards)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_step(step: str, shards: list[Path], out: Path, memory_mb: float) -> dict:
    module, name = STEPS[step]
    cmd = [sys.executable, "-c", CHILD, module, name, str(out), str(memory_mb), *map(str, shards)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def timed_step(step: str, shards: list[Path], out: Path, memory_mb: float, repeats: int) -> dict:
    """:func:`run_step` ``repeats`` times, each on a page cache warmed again (as the bare read's:
    the machine may have evicted some of the shards meanwhile): the median time, the fastest and
    slowest, and the largest peak rise."""
    runs = []
    for i in range(repeats):
        bare_read(shards)
        runs.append(run_step(step, shards, out.with_name(f"{out.stem}-{i}{out.suffix}"), memory_mb))
    seconds = sorted(r["seconds"] for r in runs)
    peak = max(r["peak_rise_mb"] for r in runs)
    return {"seconds": statistics.median(seconds), "range": (seconds[0], seconds[-1]), "peak_rise_mb": peak}


def library(root: Path, darks: int, g) -> list[Path]:
    """Four nights of ``darks`` darks of geometry ``g`` each, extracted: one shard per night."""
    simulate_archive(
        root / "library",
        geometry=g,
        nights=4,
        temperatures=SETPOINTS,
        darks_per_temp=darks // len(SETPOINTS),
        guide_per_night=0,
        first_night="20230101",
        progress=False,
    )
    return [
        extract([night], root / f"{night.name}.h5", g, progress=False).shard
        for night in sorted((root / "library").iterdir())
    ]


def equivalent_budget(
    step: str, memory_mb: float, n_big: int, n_small: int, table_mb: float, shape
) -> tuple[float, int]:
    """The largest budget (MB) at which ``n_small`` darks get blocks of no more rows than ``n_big``
    get at ``memory_mb`` (the same path, the scratch file, and the same reads per block), and those
    rows. The physics fit plans with what its frame tables leave of the budget: ``table_mb`` per dark."""
    tables = table_mb if step == "physics-fit" else 0.0

    def rows_of(budget: float, n: int) -> int:
        return BLOCK_ROWS[step](max(budget - n * tables, budget / 2), n, shape)

    block = rows_of(memory_mb, n_big)
    lo, hi = 0.0, memory_mb
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rows_of(mid, n_small) <= block else (lo, mid)
    return lo, block


def table_mb_per_dark(shards: list[Path]) -> float:
    """What the fit's frame tables take per dark, as the fit counts them (``_table_bytes``)."""
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(Shard(path)) for path in shards]
        lib = _library(opened)
        return _table_bytes(lib, opened) / lib["file"].nunique() / 2**20


def report(step: str, darks: int, bare: dict, runs: dict, memory_mb: float, project: int, spill: dict, g):
    n, n4 = darks, 4 * darks
    (R, C), channels = g.active.shape, len(g.channels)
    print(f"step {step}, memory budget {memory_mb:g} MB, {g.name} darks ({channels} channels of {R} x {C})")
    print(f"{'darks':>6} {'bare ms/dark':>13} {'step ms/dark':>13} {'ratio':>6} {'peak rise MB':>13} {'of budget':>10}")
    for k in (n, n4):
        per, b, rise = runs[k]["seconds"] / k * 1e3, bare[k] / k * 1e3, runs[k]["peak_rise_mb"]
        print(f"{k:>6} {b:13.1f} {per:13.1f} {per / b:6.1f} {rise:13.0f} {rise / memory_mb:10.0%}")
    ranges = {k: runs[k]["range"] for k in (n, n4)}
    if any(lo != hi for lo, hi in ranges.values()):  # more than one run of the step
        spread = ", ".join(f"{k}: {lo / k * 1e3:.1f}-{hi / k * 1e3:.1f}" for k, (lo, hi) in ranges.items())
        print(f"step ms/dark: the median of its runs (fastest-slowest {spread})")
    print(f"scaling: time({n4}) / time({n}) = {runs[n4]['seconds'] / runs[n]['seconds']:.2f} (linear: 4)")
    projection(step, n4, bare[n4] / n4, runs[n4]["seconds"] / n4, memory_mb, project, spill, g.active.shape)


def projection(step: str, n4: int, bare_per_dark: float, per_dark: float, memory_mb: float, project: int, spill, shape):
    """The path ``project`` darks take at ``memory_mb``, and their time: by the per-dark cost of
    ``n4`` darks on that path."""
    if spill["rows"] >= shape[0]:
        print(f"{project} darks at {memory_mb:g} MB: one block of rows in memory, no scratch file")
    else:
        run = spill["run"]
        per_dark = run["seconds"] / n4
        print(
            f"{project} darks at {memory_mb:g} MB go through the scratch file, blocks of {spill['rows']} rows; "
            f"{n4} darks so (budget {spill['budget']:.1f} MB): {per_dark * 1e3:.1f} ms/dark, "
            f"ratio {per_dark / bare_per_dark:.1f}, peak rise {run['peak_rise_mb']:.0f} MB"
        )
        scratch_gb = project * shape[0] * shape[1] * 2 / 1e9
        print(
            f"  (its scratch file holds one channel's darks uncompressed: {scratch_gb:.0f} GB for {project} "
            f"darks, written once and read {SCRATCH_READS[step]}; here it stayed in the page cache)"
        )
    print(f"projection, {project} darks: {project * per_dark / 60:.1f} min ({per_dark * 1e3:.1f} ms/dark)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step", choices=sorted(STEPS), default="baseline")
    p.add_argument("--darks", type=int, default=16, help="N: darks per night, even (default: %(default)s)")
    p.add_argument("--memory-mb", type=float, default=512, help="the step's budget (default: %(default)s)")
    p.add_argument("--project", type=int, default=20_000, help="library size to project to (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="bare reads, median taken (default: %(default)s)")
    p.add_argument("--step-repeats", type=int, default=1, help="runs of the step, median taken (default: %(default)s)")
    p.add_argument("--geometry", default="lamost-kaf4320", help="of the darks (default: %(default)s)")
    a = p.parse_args()
    g = load_geometry(a.geometry)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        shards = library(tmp, a.darks, g)
        print(f"simulated and extracted {4 * a.darks} darks in {time.perf_counter() - t:.0f} s")
        sets = {a.darks: shards[:1], 4 * a.darks: shards}
        bare_read(shards)  # the page cache holds every shard from here on
        bare = {k: timed_bare(s, a.repeats) for k, s in sets.items()}
        runs = {k: timed_step(a.step, s, tmp / f"out{k}.h5", a.memory_mb, a.step_repeats) for k, s in sets.items()}
        tables = table_mb_per_dark(shards)
        budget, rows = equivalent_budget(a.step, a.memory_mb, a.project, 4 * a.darks, tables, g.active.shape)
        spill = {"budget": budget, "rows": rows}
        if rows < g.active.shape[0]:
            spill["run"] = timed_step(a.step, shards, tmp / "spill.h5", budget, a.step_repeats)
        report(a.step, a.darks, bare, runs, a.memory_mb, a.project, spill, g)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
