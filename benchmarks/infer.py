"""Inference throughput of every generator preset: full frames per second and the share of the
machine's dense-arithmetic peak that this represents. Not a test.

A full frame = every channel (4 on the LAMOST camera) of the whole active area (1042 x 1042),
padded by reflection to the network's multiple (1044 x 1044), exactly what ``deepdark predict``
runs. Work per frame = the generator's multiply-accumulates on that input
(``deepdark.model.nets.count_macs``: convolutions only) x channels; achieved FLOP/s = 2 x MACs x frames/s.

The peak is measured in the same run: the best of a few ``torch.mm`` of two 4096 x 4096 matrices
(2 x 4096^3 FLOP each), in float32 on the CPU; on CUDA in float32 and in float16, compared with
the float32 run and the float16-autocast run (the precision ``deepdark predict`` uses on a GPU).

    .venv/bin/python benchmarks/infer.py                 # CPU (and CUDA when present), all presets
    .venv/bin/python benchmarks/infer.py --presets compact --repeats 3 --devices cpu
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepdark.io.geometry import load_geometry  # noqa: E402
from deepdark.model.nets import PRESETS, Generator, count_macs  # noqa: E402
from deepdark.model.runtime import autocast, fp32_head  # noqa: E402


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


@torch.no_grad()
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument(
        "--devices", nargs="+", default=None, choices=["cpu", "cuda"], help="default: cpu, and cuda when available"
    )
    p.add_argument("--geometry", default="lamost-kaf4320")
    p.add_argument("--repeats", type=int, default=1, help="timed passes (best is kept)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    p.add_argument("--batch", type=int, help="channels per forward pass (default: 1 on CPU, all channels on CUDA)")
    a = p.parse_args(argv)

    g = load_geometry(a.geometry)
    n_ch = len(g.channels)
    devices = a.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    print(
        f"host: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"frame: {n_ch} channels x {g.active.shape[0]} x {g.active.shape[1]} active pixels ({a.geometry})")
    for name in devices:
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped")
            continue
        label = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
        modes = [("fp32", False)] if dev.type == "cpu" else [("fp32", False), ("fp16-autocast", True)]
        peaks = {"fp32": peak_flops(dev, torch.float32)}
        if dev.type == "cuda":
            peaks["fp16-autocast"] = peak_flops(dev, torch.float16)
        for mode, _ in modes:
            print(
                f"{label}: measured {mode.split('-')[0]} matmul peak {peaks[mode] / 1e12:.2f} TFLOP/s (torch.mm 4096^2)"
            )
        batch = a.batch or (1 if dev.type == "cpu" else n_ch)
        print(
            f"{'device':<8} {'preset':<8} {'mode':<14} {'GMAC/frame':>11} {'s/pass':>8} {'frames/s':>9} "
            f"{'TFLOP/s':>8} {'of peak':>8}"
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
                print(
                    f"{name:<8} {preset:<8} {mode:<14} {macs_frame / 1e9:>11.0f} {t:>8.3f} {fps:>9.4g} "
                    f"{achieved / 1e12:>8.3f} {achieved / peaks[mode]:>8.1%}"
                )
            del G, x
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
