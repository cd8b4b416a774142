"""Guide frames per second per core through extract -> predict -> correct -> qa, against the I/O
limit (a bare read of the raw frames and the compressed write of the corrected ones), measured
in the same run; the projection for an archive; and, optionally, the planning time of the
archive's workflow. Not a test.

    .venv/bin/python benchmarks/throughput.py [--frames 6] [--per-night 500 2000] [--no-model] [--repeats 3] [--dag]

One core: BLAS, OpenMP, Blosc and torch run one thread each (set before numpy loads). Simulates
a small full-size dark library (two nights, four setpoints, 10 s and 30 s darks), fits the
physics model and the median masters on it (not timed), and two archive nights of ``--frames``
and four times as many full-size guide frames of the same camera. Then, timed, one night at a time
as the workflow runs it (the two nights give each step's cost per night and per frame; frames
per second count the cost per frame, the projection both). The nights differ fourfold: a
night's fixed costs are not quite fixed (the QA's figures and tables took 0.30 s for a night of
12 frames, 0.13 s for one of 24), and over nights of n and 2n frames such changes moved the
QA's cost per frame from 0.09 s (6 and 12 frames) to 0.06 s (12 and 24), about its statistics'
0.075 s a guide frame. The physics path and the I/O limit
run ``--repeats`` times and keep each step's fastest run (other work on the machine only adds
time); the model path, dominated by the network, runs once:

* physics: ``extract``, ``write_predictions`` with ``physics_predictor(..., area="active")``,
  ``correct_night`` (RICE_1, the default), ``night_qa``;
* model: the same with ``predict_shard`` of the default preset (``physics``: the physics
  prediction plus the generator), untrained (the weights do not change the cost);
* I/O limit: each raw frame read by astropy (pixels as uint16) and its corrected mosaic written
  as ``correct`` stores it (``storage_hdus``: RICE_1), nothing else.

It also prints the physics ``predict`` step apart (per frame: the whole step, the prediction
alone, the share of writing the predictions file, reading its darks back as ``correct`` and
``qa`` do, the file's size; the peak memory of a fresh process predicting each night, which must
not grow with the night; and what predicting again at correction time instead of reading the
file would cost or save), what each storage costs per frame (size; RICE_1's added error against
the frame's noise), and with ``--dag`` the time of ``snakemake -n`` over an archive of
``--dag-nights`` nights of ``--dag-cameras`` cameras (placeholder files, two per camera and night).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLOSC_NTHREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # one core, before numpy loads

import argparse  # noqa: E402
import io  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from astropy.io import fits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deepdark.io.geometry import load_geometry  # noqa: E402
from deepdark.io.predictions import Predictions, write_predictions  # noqa: E402
from deepdark.io.shards import Shard  # noqa: E402
from deepdark.physics import fit_physics, physics_predictor  # noqa: E402
from deepdark.pipeline.baseline import build_masters  # noqa: E402
from deepdark.pipeline.correct import correct_night, frame_noise, storage_hdus  # noqa: E402
from deepdark.pipeline.extract import extract  # noqa: E402
from deepdark.pipeline.qa import night_qa  # noqa: E402
from deepdark.sim.simulate import simulate_archive  # noqa: E402

NIGHTS = ("20240101", "20240102")  # n and LARGE x n guide frames: each step's cost per night and per frame
LARGE = 4
MOSAIC_MB = 2084 * 2084 * 4 / 1e6  # a float32 full-size mosaic


def setup(root: Path, frames: int) -> dict:
    """Library shards, its physics model and masters, and the archive night (not timed)."""
    g = load_geometry("lamost-kaf4320")
    common = dict(geometry=g, temperatures=(-5, -10, -15, -25), progress=False)
    simulate_archive(
        root / "library", nights=2, darks_per_temp=1, dark_exptimes=(10.0, 30.0), guide_per_night=0, **common
    )
    for night, n in zip(NIGHTS, (frames, LARGE * frames)):
        simulate_archive(root / "archive", nights=1, darks_per_temp=0, guide_per_night=n, first_night=night, **common)
    nights = sorted((root / "library").iterdir())
    lib = [extract([n], root / f"lib_{n.name}.h5", g, progress=False).shard for n in nights]
    fit_physics(lib, root / "physics.h5", progress=False)
    build_masters(lib, root / "masters.h5", progress=False)
    return dict(g=g, archive=root / "archive", physics=root / "physics.h5", masters=root / "masters.h5")


def timed(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def physics_predict(env: dict, shard: Path, out: Path) -> None:
    predict = physics_predictor(env["physics"], area="active")
    write_predictions(shard, out, predict, {"method": "physics", "model_name": "physics"}, progress=False)


def model_predict(env: dict, shard: Path, out: Path) -> None:
    from deepdark.pipeline.predict import predict_shard

    predict_shard(env["model"], shard, out, device="cpu", progress=False)


def run_night(env: dict, work: Path, night: str, predict) -> dict[str, float]:
    """Seconds of each step of one night: extract, predict, correct, qa."""
    work.mkdir(parents=True)
    shard, preds = work / f"{night}.h5", work / "pred.h5"
    return {
        "extract": timed(extract, [env["archive"] / night], shard, env["g"], progress=False),
        "predict": timed(predict, env, shard, preds),
        "correct": timed(correct_night, preds, work / "corrected", progress=False),
        "qa": timed(night_qa, shard, preds, env["masters"], work / "qa", progress=False),
    }


def run_path(env: dict, work: Path, predict, frames: int, repeats: int = 1) -> dict[str, tuple[float, float]]:
    """{step: (seconds per night, seconds per frame)}, from nights of n and LARGE x n frames, each step's
    fastest of ``repeats`` runs of each night (the first run's files stay in ``work/NIGHT``)."""
    small, large = (
        min_per_step(
            [run_night(env, work / (night if r == 0 else f"{night}-{r}"), night, predict) for r in range(repeats)]
        )
        for night in NIGHTS
    )
    per_frame = {k: max(0.0, (large[k] - small[k]) / ((LARGE - 1) * frames)) for k in small}
    return {k: (max(0.0, small[k] - frames * per_frame[k]), per_frame[k]) for k in small}


def min_per_step(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each step's fastest time over ``runs``: other work on the machine only ever adds time."""
    return {k: min(run[k] for run in runs) for k in runs[0]}


def predict_step(env: dict, work: Path, frames: int, repeats: int = 3) -> dict[str, float]:
    """The physics predict step of both nights of ``work`` (as :func:`run_path` left them), per
    frame (best of ``repeats``): ``step`` (``write_predictions``, reading the shard and writing
    the file), ``compute`` (the same predictions, nothing written), ``read`` (every frame's darks
    read back, as ``correct`` and ``qa`` each do) and ``mb`` (the file's size; ``mb_night``: what
    a night's file holds whatever its number of frames, the channels' maps); and the peak
    memory (MB) of a fresh process predicting each night, ``peak_small`` and ``peak_large``."""
    per_night = {}
    for night in NIGHTS:
        shard, written = work / night / f"{night}.h5", work / night / "pred.h5"
        per_night[night] = {
            "step": min(timed(physics_predict, env, shard, work / night / "again.h5") for _ in range(repeats)),
            "compute": min(timed(physics_only, env, shard) for _ in range(repeats)),
            "read": min(timed(read_darks, written) for _ in range(repeats)),
            "mb": written.stat().st_size / 1e6,
            "peak": peak_predict_mb(env, shard, work / night / "peak.h5"),
        }
    small, large = (per_night[n] for n in NIGHTS)
    out = {k: max(0.0, (large[k] - small[k]) / ((LARGE - 1) * frames)) for k in ("step", "compute", "read", "mb")}
    out["mb_night"] = small["mb"] - frames * out["mb"]  # what a night's file holds whatever its frames
    return out | {"peak_small": small["peak"], "peak_large": large["peak"]}


def physics_only(env: dict, shard: Path) -> None:
    """What :func:`physics_predict` computes, in its batches, nothing written."""
    predict = physics_predictor(env["physics"], area="active")
    with Shard(shard) as s:
        for start in range(0, len(s), 8):
            predict.serve(s, np.arange(start, min(len(s), start + 8)))
    predict.model.close()


def read_darks(path: Path) -> None:
    """Every frame's predicted darks, read as ``correct`` and ``qa`` read them."""
    with Predictions(path) as p:
        for f in dict.fromkeys(p.table["file"]):
            p.dark(np.sort(p.rows_of(f)))


def peak_predict_mb(env: dict, shard: Path, out: Path) -> float:
    """Peak resident memory (MB) of a fresh Python process that runs the physics predict step:
    its VmHWM (getrusage's maximum would carry this process's over the fork)."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import throughput as T; "
        f"T.physics_predict({{'physics': {str(env['physics'])!r}}}, {str(shard)!r}, {str(out)!r}); "
        "print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.split()[-2]) / 1024  # "VmHWM:  123456 kB"


def print_predict_step(fig: dict, frames: int) -> None:
    """The physics predict step's figures (:func:`predict_step`) and what predicting again at
    correction time, instead of writing the darks once and reading them twice, would change."""
    write = max(0.0, fig["step"] - fig["compute"])
    print(
        f"predict  {1 / fig['step']:6.3f} frames/s/core  ({fig['step']:.3f} s/frame: the prediction "
        f"{fig['compute']:.3f} s, writing the file {write:.3f} s = {write / fig['step']:.0%} of the step; "
        f"file {fig['mb'] * 1e3:.0f} kB/frame + {fig['mb_night']:.1f} MB/night; "
        f"peak memory {fig['peak_small']:.0f} MB at {frames} frames, "
        f"{fig['peak_large']:.0f} MB at {LARGE * frames})"
    )
    net = 2 * (fig["compute"] - fig["read"]) - write  # correct and qa each predict, predict writes nothing
    print(
        f"         predicting again in correct and qa instead of reading: -{write:.3f} s (no darks written), "
        f"2 x (+{fig['compute']:.3f} s predicted - {fig['read']:.3f} s read) = {net:+.3f} s/frame, "
        f"-{fig['mb'] * 1e3:.0f} kB/frame of predictions files"
    )


def untrained_default_model(env: dict, out: Path) -> Path:
    """The default preset (``physics``), untrained, with the fitted physics model inside."""
    import torch

    from deepdark.model import conditioning as C
    from deepdark.model.files import physics_card, save_model
    from deepdark.model.nets import PRESETS, Generator

    torch.set_num_threads(1)
    out.mkdir()
    shutil.copyfile(env["physics"], out / C.PHYSICS_FILE)
    card = physics_card(out / C.PHYSICS_FILE, "benchmark", 64.0)  # any bound: the cost does not depend on it
    return save_model(
        out,
        Generator(PRESETS["physics"], seed=0).eval(),
        preset="physics",
        loss={"name": "l1", "l1_weight": 1.0},
        geometry=env["g"],
        inputs=["a1", "a2", "a3", "physics"],
        extra={"physics": card},
    )


def exact_images(folder: Path) -> list[np.ndarray]:
    """The corrected mosaics of ``folder`` (written with ``compression="none"``)."""
    images = []
    for f in sorted(folder.glob("*.fits")):
        with fits.open(f) as hdul:
            images.append(np.asarray(hdul[0].data, dtype=np.float32))
    return images


def io_limit(env: dict, exact: Path, repeats: int = 1) -> dict[str, float]:
    """Seconds per frame of a bare astropy read of the raw frames and of the RICE_1 write of their
    corrected mosaics (as ``correct`` writes them: step = the frame's noise / 4, dithered); the
    fastest of ``repeats`` runs of each."""
    raws = sorted((env["archive"] / NIGHTS[1]).glob("*.fits"))
    images = exact_images(exact)

    def read() -> None:
        for f in raws:
            with fits.open(f, memmap=False) as hdul:
                np.asarray(hdul[0].data, dtype=np.uint16)

    def write() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for k, image in enumerate(images):
                storage_hdus(image).writeto(Path(tmp) / f"{k}.fits", checksum=True)

    return {
        "read": min(timed(read) for _ in range(repeats)) / len(raws),
        "write": min(timed(write) for _ in range(repeats)) / len(images),
    }


def storage_figures(images: list[np.ndarray]) -> dict[str, dict]:
    """Mean size (MB) of a mosaic in each storage, and RICE_1's added error against the noise."""
    out = {}
    for name in ("none", "GZIP_2", "RICE_1"):
        sizes, errors = [], []
        for image in images:
            noise = frame_noise(image)
            hdus = storage_hdus(image, compression=name)
            buf = io.BytesIO()
            hdus.writeto(buf, checksum=True)
            sizes.append(buf.tell() / 1e6)
            with fits.open(io.BytesIO(buf.getvalue())) as back:
                err = np.asarray(back[-1].data, dtype=np.float64) - image
            errors.append((np.sqrt(np.mean(err**2)) / noise, np.abs(err).max() / noise))
        out[name] = {"mb": float(np.mean(sizes)), "rms": max(e[0] for e in errors), "max": max(e[1] for e in errors)}
    return out


def dag_seconds(root: Path, nights: int, cameras: int) -> tuple[float, str]:
    """Wall time of ``snakemake -n`` over ``nights`` night folders of ``cameras`` cameras."""
    archive = root / "dag" / "archive"
    for k in range(nights):
        night = archive / f"{2010 + k // 336:04d}{k // 28 % 12 + 1:02d}{k % 28 + 1:02d}"
        night.mkdir(parents=True)
        for c in range(cameras):
            for i in range(2):
                (night / f"GS{c + 1}_{i}.fits").write_bytes(b"SIMPLE  =                    T")
    (root / "dag" / "bench.yaml").write_text(yaml.safe_dump({"archive": {"path": "archive"}}))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(root / "dag")]
    cmd += ["--configfile", str(root / "dag" / "bench.yaml"), "-n", "--quiet", "all"]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=root / "dag")
    elapsed = time.perf_counter() - t
    jobs = [line for line in (res.stdout + res.stderr).splitlines() if line.split()[:1] in (["correct"], ["total"])]
    jobs = [" ".join(line.split()) for line in dict.fromkeys(jobs)]
    return elapsed, (", ".join(jobs) + " jobs" if res.returncode == 0 else "FAILED: " + res.stderr[-500:])


def print_path(name: str, steps: dict[str, tuple[float, float]]) -> float:
    """Print a path's cost per frame (and per night); return its frames per second per core."""
    per_frame = sum(f for _, f in steps.values())
    parts = ", ".join(f"{k} {f:.2f} (+{n:.1f}/night)" for k, (n, f) in steps.items())
    print(f"{name:<8} {1 / per_frame:6.3f} frames/s/core  ({per_frame:.2f} s/frame: {parts})")
    return 1 / per_frame


def print_projection(paths: dict[str, dict], per_night: list[int], nights: int, cameras: int) -> None:
    """Core-hours of each path for the archive: per night its fixed cost plus its cost per frame."""
    print(f"projection: {nights} nights x {cameras} cameras x F frames per camera and night")
    for f in per_night:
        n = cameras * f  # frames of a night
        cells = []
        for name, steps in paths.items():
            night = sum(fixed + per * n for fixed, per in steps.values())
            cells.append(f"{name} {nights * night / 3600:,.0f} core-hours")
        print(f"  F = {f:>5}: {nights * n:>12,} frames: {', '.join(cells)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=6, help="full-size guide frames of the night (default: %(default)s)")
    p.add_argument("--per-night", type=int, nargs="+", default=[500, 2000], help="F, frames per camera and night")
    p.add_argument("--nights", type=int, default=3000)
    p.add_argument("--cameras", type=int, default=8)
    p.add_argument("--no-model", action="store_true", help="leave out the default model's path")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each night of the physics path and of the I/O limit, the fastest kept (default: %(default)s)",
    )
    p.add_argument("--dag", action="store_true", help="also time the dry run of the archive's workflow")
    p.add_argument("--dag-nights", type=int, default=3000)
    p.add_argument("--dag-cameras", type=int, default=8)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        env = setup(root, a.frames)
        print(f"set up (simulate, extract, fit physics, masters) in {time.perf_counter() - t:.0f} s; one core")
        paths = {"physics": run_path(env, root / "physics", physics_predict, a.frames, a.repeats)}
        if not a.no_model:
            env["model"] = untrained_default_model(env, root / "model")
            paths["model"] = run_path(env, root / "model-run", model_predict, a.frames)
        predict = predict_step(env, root / "physics", a.frames, a.repeats)
        for name, steps in paths.items():
            print_path(name, steps)
        print_predict_step(predict, a.frames)
        # the exact mosaics (stored without loss), for the I/O limit and the storage figures
        exact = root / "physics" / "exact"
        correct_night(root / "physics" / NIGHTS[1] / "pred.h5", exact, compression="none", progress=False)
        limit = io_limit(env, exact, a.repeats)
        paths["I/O"] = {"read": (0.0, limit["read"]), "write": (0.0, limit["write"])}
        print(
            f"I/O      {1 / (limit['read'] + limit['write']):6.3f} frames/s/core  (bare read {limit['read']:.3f} s, "
            f"RICE_1 write {limit['write']:.3f} s per frame)"
        )
        print(f"storage of a corrected full-size frame (2084 x 2084 float32, {MOSAIC_MB:.1f} MB of pixels):")
        for name, s in storage_figures(exact_images(exact)).items():
            error = f"added error rms {s['rms']:.3f}, max {s['max']:.3f} of the frame's noise"
            print(f"  {name:<7} {s['mb']:6.2f} MB; {error}")
        print_projection(paths, a.per_night, a.nights, a.cameras)
        if a.dag:
            seconds, jobs = dag_seconds(root, a.dag_nights, a.dag_cameras)
            print(f"dry run of {a.dag_nights} nights x {a.dag_cameras} cameras: {seconds:.1f} s ({jobs})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
