"""Inference throughput of every generator preset (``deepdark presets``: paper, compact, physics):
full frames per second, of the generator alone and of the whole network path of ``deepdark
predict``, and the share of the machine's dense-arithmetic peak that the generator achieves. Not
a test.

A full frame = every channel (4 on the LAMOST camera) of the whole active area (1042 x 1042),
padded by reflection to the network's multiple (1044 x 1044), exactly what ``deepdark predict``
runs. Work per frame = the generator's multiply-accumulates on that input
(``deepdark.model.nets.count_macs``: convolutions only) x channels; achieved FLOP/s = 2 x MACs x frames/s.

Two figures per preset:

* the generator alone (``s/pass``, ``frames/s``, ``TFLOP/s``, ``of peak``): the fastest of
  ``--repeats`` forward passes of ``--batch`` channels of random input, eval mode, under
  ``torch.inference_mode`` (the fastest: other work on the machine only ever adds time);
* ``predict f/s``: the network path of ``deepdark predict`` on the frames of a simulated full-size
  night (``ModelRunner.serve_rows``, nothing written): the channels' strips read from the
  shard and resized into the model's inputs, for the ``physics`` preset the physics prediction of
  the same frame (its share in ``physics s``), the generator, the result in ADU. The models are
  untrained (the weights do not change the cost); the ``physics`` preset's physics model is fitted
  on a small simulated full-size library first (not timed, about half a minute on one core).
  ``--no-predict`` leaves this out.

The peak is measured in the same run: the best of a few ``torch.mm`` of two 4096 x 4096 matrices
(2 x 4096^3 FLOP each), in float32 on the CPU; on CUDA in float32 and in float16, compared with
the float32 run and the float16-autocast run (the precision ``deepdark predict`` uses on a GPU).

    .venv/bin/python benchmarks/infer.py                 # CPU (and CUDA when present), all presets
    .venv/bin/python benchmarks/infer.py --presets compact --repeats 1 --devices cpu --no-predict
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepdark.io.geometry import Geometry, load_geometry  # noqa: E402
from deepdark.io.shards import Shard  # noqa: E402
from deepdark.model.files import DEFAULT_INPUTS  # noqa: E402
from deepdark.model.nets import PHYSICS_PRESETS, PRESETS, Generator, count_macs  # noqa: E402
from deepdark.model.runtime import autocast, fp32_head  # noqa: E402

NIGHT = "20240101"
TEMPERATURES = (-5, -10, -15, -25)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_flops(dev: torch.device, dtype=torch.float32, n: int = 4096, repeats: int = 5) -> float:
    """Best FLOP/s of ``torch.mm`` on two n x n matrices."""
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    torch.mm(a, b)
    _sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


@torch.inference_mode()
def time_generator(G: Generator, x: torch.Tensor, dev: torch.device, repeats: int, warmup: int, mixed: bool) -> float:
    """Best seconds of one forward pass (eval mode) on ``x``."""
    ctx = autocast(dev) if mixed else torch.autocast(dev.type, enabled=False)
    for _ in range(warmup):
        with ctx:
            G(x)
        _sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with ctx:
            G(x)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def simulated_night(root: Path, g: Geometry, frames: int, physics: bool) -> dict:
    """A full-size night of ``frames`` guide frames (its shard) and, when ``physics``, a physics
    model fitted on a small simulated library of the same camera (two nights, four setpoints,
    10 s and 30 s darks). Not timed."""
    from deepdark.physics import fit_physics
    from deepdark.pipeline.extract import extract
    from deepdark.sim.simulate import simulate_archive

    common = dict(geometry=g, temperatures=TEMPERATURES, progress=False)
    simulate_archive(root / "archive", nights=1, darks_per_temp=0, guide_per_night=frames, first_night=NIGHT, **common)
    out = {"shard": extract([root / "archive" / NIGHT], root / "night.h5", g, progress=False).shard}
    if physics:
        simulate_archive(
            root / "library", nights=2, darks_per_temp=1, dark_exptimes=(10.0, 30.0), guide_per_night=0, **common
        )
        nights = sorted((root / "library").iterdir())
        library = [extract([n], root / f"library_{n.name}.h5", g, progress=False).shard for n in nights]
        fit_physics(library, root / "physics.h5", progress=False)
        out["physics"] = root / "physics.h5"
    return out


def untrained_model(preset: str, out: Path, g: Geometry, physics: Path | None) -> Path:
    """A model directory of ``preset``, untrained; a physics preset's holds the physics model."""
    from deepdark.model import conditioning as C
    from deepdark.model.files import physics_card, save_model

    out.mkdir(parents=True)
    inputs, extra = list(DEFAULT_INPUTS), None
    if preset in PHYSICS_PRESETS:
        shutil.copyfile(physics, out / C.PHYSICS_FILE)
        inputs.append(C.PHYSICS_INPUT)
        # any residual bound: the cost does not depend on it
        extra = {"physics": physics_card(out / C.PHYSICS_FILE, "benchmark", 64.0)}
    generator = Generator(PRESETS[preset], seed=0).eval()
    return save_model(
        out, generator, preset=preset, loss={"name": "l1", "l1_weight": 1.0}, geometry=g, inputs=inputs, extra=extra
    )


def time_predict(model_dir: Path, shard_path: Path, dev: torch.device, batch: int) -> tuple[float, float]:
    """Seconds per frame of the network path of ``deepdark predict`` over every frame of the shard
    (``ModelRunner.serve_rows``, a frame at a time, nothing written), and of its physics
    prediction alone (0 for a strips-only model)."""
    from deepdark.model.runner import ModelRunner

    runner = ModelRunner(model_dir, device=dev, batch_size=batch)
    with Shard(shard_path) as shard:
        frames = list(shard.table.groupby("file", sort=False).indices.values())
        runner.serve_rows(shard, frames[0][:1], window=False)  # read the generator, warm its kernels
        _sync(dev)
        t0 = time.perf_counter()
        for rows in frames:
            runner.serve_rows(shard, np.sort(rows), window=False)
        _sync(dev)
        total = (time.perf_counter() - t0) / len(frames)
        physics = 0.0
        if runner.physics is not None:
            t0 = time.perf_counter()
            for rows in frames:
                runner.physics.serve_rows(shard, np.sort(rows), window=False)
            physics = (time.perf_counter() - t0) / len(frames)
    return total, physics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument(
        "--devices", nargs="+", default=None, choices=["cpu", "cuda"], help="default: cpu, and cuda when available"
    )
    p.add_argument("--geometry", default="lamost-kaf4320")
    p.add_argument("--repeats", type=int, default=3, help="timed passes (best is kept; default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    p.add_argument("--batch", type=int, help="channels per forward pass (default: 1 on CPU, all channels on CUDA)")
    p.add_argument("--frames", type=int, default=1, help="frames of the simulated night for predict f/s")
    p.add_argument("--no-predict", action="store_true", help="time the generator alone")
    a = p.parse_args(argv)

    g = load_geometry(a.geometry)
    n_ch = len(g.channels)
    devices = a.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    print(
        f"host: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"frame: {n_ch} channels x {g.active.shape[0]} x {g.active.shape[1]} active pixels ({a.geometry})")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = {}
        if not a.no_predict:
            t0 = time.perf_counter()
            night = simulated_night(root, g, a.frames, physics=bool(PHYSICS_PRESETS & set(a.presets)))
            models = {
                preset: untrained_model(preset, root / "models" / preset, g, night.get("physics"))
                for preset in a.presets
            }
            print(f"set up (simulate, extract, fit physics) in {time.perf_counter() - t0:.0f} s")
        for name in devices:
            dev = torch.device(name)
            if dev.type == "cuda" and not torch.cuda.is_available():
                print("cuda: not available, skipped")
                continue
            run_device(dev, a, g, models, night["shard"] if models else None)
    return 0


def run_device(dev: torch.device, a, g: Geometry, models: dict[str, Path], shard: Path | None) -> None:
    """The table of one device: every preset, the generator alone and (with ``models``) predict."""
    n_ch = len(g.channels)
    label = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    modes = [("fp32", False)] if dev.type == "cpu" else [("fp32", False), ("fp16-autocast", True)]
    peaks = {"fp32": peak_flops(dev, torch.float32)}
    if dev.type == "cuda":
        peaks["fp16-autocast"] = peak_flops(dev, torch.float16)
    for mode, _ in modes:
        print(f"{label}: measured {mode.split('-')[0]} matmul peak {peaks[mode] / 1e12:.2f} TFLOP/s (torch.mm 4096^2)")
    batch = a.batch or (1 if dev.type == "cpu" else n_ch)
    print(
        f"{'device':<8} {'preset':<8} {'mode':<14} {'GMAC/frame':>11} {'s/pass':>8} {'frames/s':>9} "
        f"{'TFLOP/s':>8} {'of peak':>8}" + (f" {'predict f/s':>12} {'physics s':>10}" if models else "")
    )
    for preset in a.presets:
        G = fp32_head(Generator(PRESETS[preset], seed=0)).to(dev).eval()
        m = G.multiple
        h, w = g.active.shape
        hp, wp = h + (-h) % m, w + (-w) % m
        x = torch.rand(batch, PRESETS[preset].in_channels, h, w, device=dev)
        x = F.pad(x, (0, wp - w, 0, hp - h), mode="reflect") if (hp, wp) != (h, w) else x
        macs_frame = count_macs(G, (1, PRESETS[preset].in_channels, hp, wp)) * n_ch
        for mode, mixed in modes:
            t = time_generator(G, x, dev, a.repeats, a.warmup, mixed)
            fps = batch / t / n_ch
            achieved = 2.0 * macs_frame * fps
            line = (
                f"{dev.type:<8} {preset:<8} {mode:<14} {macs_frame / 1e9:>11.0f} {t:>8.3f} {fps:>9.4g} "
                f"{achieved / 1e12:>8.3f} {achieved / peaks[mode]:>8.1%}"
            )
            if models and mixed == (dev.type == "cuda"):  # predict runs fp32 on the CPU, autocast on CUDA
                seconds, physics = time_predict(models[preset], shard, dev, batch)
                line += f" {1 / seconds:>12.4g} {physics:>10.3f}"
            print(line)
        del G, x
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
