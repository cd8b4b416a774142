"""The paper's evaluation (3.2): RMSE of each dark predictor against real darks, with the floor.

Every method is scored on the same pixels: the model window of every channel of every DARK
frame of the test shards. Predictors are plain callables, so the median baselines, the network
and the physics model are compared by one loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from deepdark.evaluation.metrics import PooledRMSE
from deepdark.io.atomic import atomic_path
from deepdark.io.errors import InputError
from deepdark.io.masters import Masters
from deepdark.io.shards import Shard, printable
from deepdark.io.strips import window_of
from deepdark.io.tables import frame_setpoints, temp_label

log = logging.getLogger(__name__)

# A predictor maps (shard, sorted table rows) to predicted windows in ADU, shape (k, S, S).
Predictor = Callable[[Shard, np.ndarray], np.ndarray]
HIST_EDGES = np.arange(-100.5, 101.5, 1.0)  # 1-ADU bins for the difference histograms
METHOD_ORDER = ("median_all", "median_temp", "physics", "model", "floor")
EVALUATE_FILES = (  # what evaluate writes: none of an earlier run's outlives a run
    "table1.json",
    "table1.csv",
    "per_image.csv",
    "histograms.csv",
    "unserved.csv",
    "fig6_heatmap.png",
    "fig7_histogram.png",
    "fig8_histogram_by_temp.png",
)


def median_predictor(masters: Masters, kind: str, strict: bool = True) -> Predictor:
    """The traditional method: the master dark (``all`` or per-``temp``) of each frame-channel.
    Where the library has none (a camera or setpoint it lacks): an error naming it, or when not
    ``strict`` NaN, so that such a dark is left out as unserved rather than the whole baseline."""

    def predict(shard: Shard, rows: np.ndarray) -> np.ndarray:
        none = np.full(shard.geometry.window_shape, np.nan, np.float32)
        found = masters.for_frames(shard.table.iloc[rows], kind, strict=strict)
        return np.stack([none if m is None else window_of(m, shard.geometry) for m in found])

    return predict


def lenient(predictor: Predictor) -> Predictor:
    """``predictor``'s darks, NaN where its ``serve`` (each row's verdict, as ``predict`` writes
    them) leaves a row unserved (a camera, exposure or temperature it does not cover): such a dark
    is left out of the table and listed, where the predictor itself would stop the evaluation."""
    serve = getattr(predictor, "serve", None)
    if serve is None:
        return predictor
    return lambda shard, rows: serve(shard, rows).dark


class NothingScored(InputError):
    """Every test dark was left out: some method could predict none of them."""


def _unserved_line(unserved: list[dict], path: Path) -> str:
    by = pd.Series([u["unserved_by"] for u in unserved]).value_counts()
    methods = ", ".join(f"{n} by {m}" for m, n in by.items())
    return f"{len(unserved)} dark frame-channel(s) left out of every method's score, not predicted ({methods}): {path}"


class DifferenceHistograms:
    """Histograms of (prediction - truth) in ADU per method and temperature (paper figs. 7-8)."""

    def __init__(self):
        self.counts: dict[tuple[str, str], np.ndarray] = {}
        self.sums: dict[tuple[str, str], list[float]] = {}

    def add(self, method: str, groups: Sequence[str], diff: np.ndarray) -> None:
        h = np.histogram(np.clip(diff, HIST_EDGES[0], HIST_EDGES[-1]), bins=HIST_EDGES)[0]
        for g in groups:
            self.counts[method, g] = self.counts.get((method, g), 0) + h
            s = self.sums.setdefault((method, g), [0.0, 0, 0])
            s[0] += float(diff.sum())
            s[1] += diff.size
            s[2] += int(np.count_nonzero(np.abs(diff) <= 10))

    def summary(self) -> pd.DataFrame:
        rows = [
            dict(method=m, group=g, mean_diff=s[0] / s[1], within_10_adu=s[2] / s[1]) for (m, g), s in self.sums.items()
        ]
        return pd.DataFrame(rows)


class Scores:
    """Predictors scored on real darks: pooled RMSE (and the noise floor) per method and
    temperature group, difference histograms, one record per image and the first image kept
    whole for the heat map. ``library_setpoints`` name each dark's temperature group
    (:func:`deepdark.io.tables.frame_setpoints`)."""

    def __init__(self, library_setpoints: Sequence[float] | None = None):
        self.library_setpoints = library_setpoints
        self.pooled = PooledRMSE()
        self.hists = DifferenceHistograms()
        self.per_image: list[dict] = []
        self.unserved: list[dict] = []
        self.example: dict | None = None

    def add_shard(
        self,
        shard: Shard,
        rows: np.ndarray,
        methods: dict[str, Predictor],
        batch_size: int = 4,
        progress: bool = True,
    ) -> None:
        """Score every predictor of ``methods`` on the DARK table ``rows`` (sorted) of ``shard``,
        ``batch_size`` images at a time, over the model window."""
        setpoints = frame_setpoints(shard.table, self.library_setpoints)
        bar = tqdm(
            total=len(rows), desc=f"evaluate {shard.path.name}", unit="image", disable=None if progress else True
        )
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            truth = shard.target(batch).astype(np.float32)
            preds = {name: fn(shard, batch) for name, fn in methods.items()}
            for k, row in enumerate(batch):
                self._add_image(shard.table.iloc[row], setpoints[row], truth[k], {n: p[k] for n, p in preds.items()})
            bar.update(len(batch))
        bar.close()

    def _add_image(self, rec: pd.Series, setpoint: float, truth: np.ndarray, preds: dict[str, np.ndarray]) -> None:
        groups = ("total", temp_label(setpoint))
        entry = dict(
            file=printable(rec["file"]),
            night=rec["night"],
            camera=rec["camera"],
            channel=rec["channel"],
            setpoint=setpoint,
            exptime=rec["exptime"],
        )
        missing = sorted(name for name, p in preds.items() if not np.isfinite(p).all())
        if missing:
            # A dark some method could not predict is left out for every method, so that all
            # methods of the table are scored on the same images.
            self.unserved.append(dict(entry, unserved_by=",".join(missing)))
            return
        for name, p in preds.items():
            entry[name] = self.pooled.add(name, groups, p, truth)
            self.hists.add(name, groups, p - truth)
        if np.isfinite(rec["floor"]):
            n = truth.size
            self.pooled.add_squared("floor", groups, float(rec["floor"]) ** 2 * n, n)
            entry["floor"] = float(rec["floor"])
        self.per_image.append(entry)
        if self.example is None:
            self.example = dict(entry, truth=truth, preds=preds)


def evaluate(
    test_shards: Sequence[str | Path],
    masters_path: str | Path | None,
    out_dir: str | Path,
    predictors: dict[str, Predictor] | None = None,
    batch_size: int = 4,
    progress: bool = True,
    figures: bool = True,
    cameras: Sequence[str] | None = None,
) -> dict:
    """Score the median baselines (when ``masters_path``) and ``predictors`` on the test darks
    (of ``cameras``; None: of every camera).

    Writes ``table1.json``, ``table1.csv``, ``per_image.csv``, ``histograms.csv``, ``unserved.csv``
    (darks some method could not predict, left out of every method's score; only when there are
    any) and (when ``figures``) the paper's figures 6-8 as PNG into ``out_dir``; returns the table.
    A dark the masters do not cover (a camera or setpoint the library lacks) is unserved by the
    median baselines. Raises :class:`NothingScored` (``unserved.csv`` written) when every dark
    was left out.
    """
    out_dir = Path(out_dir)
    with contextlib.ExitStack() as stack:
        masters = stack.enter_context(Masters(masters_path)) if masters_path else None
        scores = _scores(test_shards, masters, predictors or {}, batch_size, progress, cameras)
    if not scores.per_image and not scores.unserved:
        of = f" of camera(s) {', '.join(cameras)}" if cameras else ""
        raise InputError(f"no DARK frames{of} in the test shards: nothing to evaluate")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in EVALUATE_FILES:
        (out_dir / name).unlink(missing_ok=True)
    if scores.unserved:
        _write_csv(out_dir / "unserved.csv", pd.DataFrame(scores.unserved))
        left_out = _unserved_line(scores.unserved, out_dir / "unserved.csv")
        if not scores.per_image:
            raise NothingScored(f"{left_out}: nothing to score")
        log.warning("%s", left_out)
    table = ordered_table(scores.pooled.table())
    _write_json(out_dir / "table1.json", table)
    _write_csv(out_dir / "table1.csv", table_frame(table))
    _write_csv(out_dir / "per_image.csv", pd.DataFrame(scores.per_image))
    _write_csv(out_dir / "histograms.csv", scores.hists.summary())
    if figures:
        from deepdark.evaluation.plots import difference_histograms, error_heatmap

        error_heatmap(scores.example, out_dir / "fig6_heatmap.png")
        difference_histograms(scores.hists, out_dir / "fig7_histogram.png", by_group=False)
        difference_histograms(scores.hists, out_dir / "fig8_histogram_by_temp.png", by_group=True)
    return table


def _scores(
    test_shards,
    masters: Masters | None,
    predictors: dict,
    batch_size: int,
    progress: bool,
    cameras: Sequence[str] | None,
) -> Scores:
    """The median baselines (with ``masters``) and ``predictors`` scored on the test shards'
    darks (of ``cameras``, None: all)."""
    methods: dict[str, Predictor] = {}
    if masters:
        methods["median_all"] = median_predictor(masters, "all", strict=False)
        methods["median_temp"] = median_predictor(masters, "temp", strict=False)
    methods.update(predictors)
    scores = Scores(masters.setpoints if masters else None)
    for path in test_shards:
        with Shard(path) as shard:
            if masters:
                masters.check_geometry(shard.geometry)
            dark = shard.table["imagetyp"] == "DARK"
            if cameras:
                dark &= shard.table["camera"].isin(list(cameras))
            darks = np.flatnonzero(dark.to_numpy())
            scores.add_shard(shard, darks, methods, batch_size, progress)
    return scores


def ordered_table(table: dict) -> dict:
    """``total`` first, then temperatures from warm to cold; methods in a fixed order."""

    def key(g):
        return (0, 0.0) if g == "total" else (1, -float(g))

    out = {}
    for g in sorted(table, key=key):
        row = table[g]
        known = [m for m in METHOD_ORDER if m in row]
        extra = sorted(m for m in row if m not in METHOD_ORDER and m != "n_images")
        out[g] = {m: row[m] for m in [*known, *extra]} | {"n_images": int(row["n_images"])}
    return out


def table_frame(table: dict) -> pd.DataFrame:
    """Table 1 as rows = temperature group, columns = methods (for CSV and printing)."""
    return pd.DataFrame.from_dict(table, orient="index").rename_axis("temperature").reset_index()


def format_table(table: dict) -> str:
    return table_frame(table).to_string(index=False, float_format=lambda x: f"{x:.2f}")


def _write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
