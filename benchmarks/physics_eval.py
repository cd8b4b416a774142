"""The physics predictor's full-size check (frame state, law, per-pixel maps, exposures) and its cost.

    python benchmarks/physics_eval.py --out /tmp/physics-eval [--cameras GS1 GS2] [--nights 4] [--reuse]

Per camera, with the shell commands a user would type (``deepdark simulate / extract / baseline /
physics-fit / evaluate``): a dark library of ``--nights`` nights (setpoints -5, -10, -15, -25 C,
two darks of 10 s and two of 30 s per setpoint and night), two held-out nights of 30 s darks, and
a held-out night of 5 s and 60 s darks (exposures outside the library) with guide frames. Prints
both tables (physics vs median_temp vs median_all vs the floor), the fit's wall time and peak
memory (``/usr/bin/time -v``), and the time to predict one full frame (4 channels, whole active
areas) on this machine, next to the ``compact`` generator's forward pass over the same four
1024 x 1024 windows for reference. ``--reuse`` keeps every output that already exists.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DD = [sys.executable, "-m", "deepdark", "-q"]
TEMPS = ["-5", "-10", "-15", "-25"]


def run(cmd: list[str], timed: bool = False) -> dict:
    """Run a deepdark command; with ``timed``, under /usr/bin/time -v: wall seconds and peak RSS (MB)."""
    print("$", " ".join(str(c) for c in cmd[2:] if c != "-q").replace("-m deepdark", "deepdark"), flush=True)
    if timed and Path("/usr/bin/time").exists():
        t = time.perf_counter()
        res = subprocess.run(["/usr/bin/time", "-v", *map(str, cmd)], capture_output=True, text=True)
        wall = time.perf_counter() - t
        if res.returncode:
            sys.exit(res.stderr)
        peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
        return dict(wall_s=wall, peak_mb=int(peak.group(1)) / 1024 if peak else float("nan"))
    subprocess.run(list(map(str, cmd)), check=True)
    return {}


def camera(out: Path, cam: str, nights: int, reuse: bool) -> dict:
    root = out / cam
    sims = {
        "lib": [
            "--nights",
            nights,
            "--first-night",
            "20240101",
            "--darks-per-temp",
            2,
            "--dark-exptimes",
            10,
            30,
            "--guide-per-night",
            0,
        ],
        "test": [
            "--nights",
            2,
            "--first-night",
            "20240201",
            "--darks-per-temp",
            2,
            "--dark-exptimes",
            30,
            "--guide-per-night",
            0,
        ],
        "exp": [
            "--nights",
            1,
            "--first-night",
            "20240301",
            "--darks-per-temp",
            2,
            "--dark-exptimes",
            5,
            60,
            "--guide-per-night",
            2,
        ],
    }
    for name, args in sims.items():
        if not (reuse and (root / name).exists()):
            run(DD + ["simulate", root / name, "--cameras", cam, "--temperatures", *TEMPS, *args])
        for night in sorted(p for p in (root / name).iterdir() if p.is_dir()):
            shard = root / "shards" / f"{name}_{night.name}.h5"
            if not (reuse and shard.exists()):
                run(DD + ["extract", night, "--out", shard])
    lib = sorted((root / "shards").glob("lib_*.h5"))
    if not (reuse and (root / "masters.h5").exists()):
        run(DD + ["baseline", *lib, "--out", root / "masters.h5"])
    fit = {}
    if not (reuse and (root / "phys.h5").exists()):
        fit = run(DD + ["physics-fit", *lib, "--out", root / "phys.h5"], timed=True)
    tables = {}
    for name in ("test", "exp"):
        run(
            DD
            + [
                "evaluate",
                "--test",
                *sorted((root / "shards").glob(f"{name}_*.h5")),
                "--baseline",
                root / "masters.h5",
                "--physics",
                root / "phys.h5",
                "--out",
                root / f"eval_{name}",
            ]
        )
        tables[name] = json.loads((root / f"eval_{name}" / "table1.json").read_text())
    return dict(fit=fit, tables=tables, cost=cost(root))


def cost(root: Path, frames: int = 8) -> dict:
    """Median seconds per full frame: physics (whole active areas) and the compact generator (windows)."""
    from deepdark.io.shards import Shard
    from deepdark.physics import PhysicsModel

    model = PhysicsModel.load(root / "phys.h5")
    shard_path = sorted((root / "shards").glob("exp_*.h5"))[0]
    out = {}
    with Shard(shard_path) as s:
        files = list(dict.fromkeys(s.table["file"]))[:frames]
        times = []
        for _k, f in enumerate(files):
            rows = np.flatnonzero((s.table["file"] == f).to_numpy())
            t = time.perf_counter()
            model.predict_rows(s, rows)
            times.append(time.perf_counter() - t)
        out["physics_first_s"] = times[0]  # includes loading the maps
        out["physics_s"] = statistics.median(times[1:])
        try:
            import torch

            from deepdark.model.nets import PRESETS, Generator, model_input

            torch.set_num_threads(2)
            net = Generator(PRESETS["compact"], seed=0).eval()
            rows = np.flatnonzero((s.table["file"] == files[0]).to_numpy())
            strips = s.strips(rows, window=True)
            times = []
            with torch.no_grad():
                for _ in range(3):
                    t = time.perf_counter()
                    net(model_input(strips["a1"], strips["a2"], strips["a3"], s.geometry.window_size))
                    times.append(time.perf_counter() - t)
            out["compact_s"] = statistics.median(times)
        except ImportError:
            pass
    return out


def show(cam: str, res: dict) -> None:
    fit, c = res["fit"], res["cost"]
    print(
        f"\n== {cam}: fit {fit.get('wall_s', float('nan')):.0f} s, peak {fit.get('peak_mb', float('nan')):.0f} MB;"
        f" prediction {1000 * c['physics_s']:.0f} ms per full frame (first {1000 * c['physics_first_s']:.0f} ms)"
        + (f", compact generator {1000 * c['compact_s']:.0f} ms" if "compact_s" in c else "")
    )
    for name, title in (("test", "held-out nights, 30 s darks"), ("exp", "held-out night, 5 s and 60 s darks")):
        print(f"-- {title}")
        print(
            f"{'':>6} {'median_all':>10} {'median_temp':>11} {'physics':>8} {'floor':>7} {'physics/floor':>13} {'n':>4}"
        )
        for group, row in res["tables"][name].items():
            print(
                f"{group:>6} {row['median_all']:10.2f} {row['median_temp']:11.2f} {row['physics']:8.2f}"
                f" {row['floor']:7.2f} {row['physics'] / row['floor']:13.3f} {row['n_images']:4d}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cameras", nargs="+", default=["GS1", "GS2"])
    p.add_argument("--nights", type=int, default=4, help="library nights")
    p.add_argument("--reuse", action="store_true", help="keep outputs that already exist")
    a = p.parse_args()
    results = {cam: camera(a.out, cam, a.nights, a.reuse) for cam in a.cameras}
    for cam, res in results.items():
        show(cam, res)


if __name__ == "__main__":
    main()
