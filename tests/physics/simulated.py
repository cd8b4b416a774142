"""Simulated dark libraries on the `mini` geometry, extracted night by night (the physics tests'
common setup)."""

from __future__ import annotations

from pathlib import Path

from deepdark.io.geometry import load_geometry
from deepdark.pipeline.extract import extract
from deepdark.sim.simulate import simulate_archive

MINI = load_geometry("mini")


def mini_library(root: Path, **simulate) -> list[Path]:
    """Simulate a library under ``root/raw`` (``simulate_archive``'s arguments; no guide frames
    unless asked) and extract each night into ``root/NIGHT.h5``; the shards, in night order."""
    simulate_archive(root / "raw", **{"geometry": "mini", "guide_per_night": 0, "progress": False, **simulate})
    return [extract([n], root / f"{n.name}.h5", MINI, progress=False).shard for n in sorted((root / "raw").iterdir())]
