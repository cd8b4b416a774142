"""Quality assurance of a reprocessed night, and the archive's summary.

Per night (:func:`night_qa`), from the night's shard, its predictions and the library's median
master darks:

* DARK frames: the RMSE (ADU, model window, :mod:`deepdark.metrics`) of the model's dark, of the
  per-temperature and all-temperature median masters, and the noise floor, per frame and channel.
  These are computed by :func:`deepdark.evaluate.evaluate` with the predictions file as the
  ``model`` predictor, so the numbers are defined in one place; it also draws the paper's heat
  map and difference histograms. Added here: RMSE over the night against temperature and time.
* Guide (OBJECT) frames: the sky background and the noise of star-free pixels after model
  correction and after median-dark correction, on the same pixels, side by side.
* The night's quarantine (files that could not be used, and why).

Outputs in the night's QA folder: ``qa.csv`` (one row per frame-channel, for machines),
``qa.html`` (for people, figures embedded), ``quarantine.csv`` (a copy of the night's), and the
files of ``evaluate`` (``table1.*``, ``per_image.csv``, ``histograms.csv``, ``fig*.png``).

:func:`summarize` pools every night's ``qa.csv`` into the archive's Table 1 (squared errors
summed over all nights, never an average of RMSEs), a per-night table with the nights where the
model did worse than the median baseline flagged, and the quarantine counts.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.stats import mad_std, sigma_clip
from tqdm import tqdm

from . import plots  # noqa: F401  (selects the Agg backend before pyplot is imported)
from . import report
from .atomic import atomic_path
from .baselines import Masters, frame_setpoints, temp_label
from .correct import PredictedDarks, active_areas, corrected_actives, read_manifest
from .evaluate import evaluate, ordered_table, table_frame
from .frames import FrameError, Keywords, read_frame
from .metrics import PooledRMSE
from .shards import Shard, quarantine_path, read_quarantine
from .strips import window_of

import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402  (after deepdark.plots chose the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

log = logging.getLogger(__name__)

RMSE_METHODS = ("model", "median_temp", "median_all", "floor")
GUIDE_METHODS = ("model", "median")
QA_COLUMNS = (
    "night", "file", "camera", "channel", "imagetyp", "exptime", "ccdtemp", "setpoint", "date_obs",
    "n_pixels", *(f"rmse_{m}" for m in RMSE_METHODS),
    "bg_raw", *(f"{s}_{m}" for m in GUIDE_METHODS for s in ("bg", "noise", "madstd")), "median_kind",
    "star_free_fraction",
)
EVALUATE_FILES = ("table1.json", "table1.csv", "per_image.csv", "histograms.csv",
                  "fig6_heatmap.png", "fig7_histogram.png", "fig8_histogram_by_temp.png")
QA_FIGURES = ("rmse_vs_temperature.png", "guide_background.png")
CLIP_SIGMA = 3.0
STAR_GROW_PX = 2  # star-free: sigma-clipped pixels grown by this many pixels


# -- per night -------------------------------------------------------------------------------------

def night_qa(shard_path: str | Path, predictions_path: str | Path, masters_path: str | Path | None,
             out_dir: str | Path, keywords: Keywords = Keywords(), cameras: Sequence[str] | None = None,
             progress: bool = True) -> pd.DataFrame:
    """The QA of one night; writes ``qa.csv``, ``qa.html``, ``quarantine.csv`` and figures into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (*EVALUATE_FILES, *QA_FIGURES):  # nothing stale from an earlier run
        (out_dir / name).unlink(missing_ok=True)
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        shard = stack.enter_context(Shard(shard_path))
        preds = stack.enter_context(PredictedDarks(predictions_path))
        masters = stack.enter_context(Masters(masters_path)) if masters_path else None
        _check_same_rows(shard, preds)
        table = shard.table
        setpoints = frame_setpoints(table, masters.setpoints if masters else None)
        qa = table[["night", "file", "camera", "channel", "imagetyp", "exptime", "ccdtemp", "date_obs"]].copy()
        qa["setpoint"] = setpoints
        selected = np.ones(len(table), bool) if not cameras else table["camera"].isin(list(cameras)).to_numpy()
        if cameras and not selected.all():
            notes.append(f"cameras selected: {', '.join(cameras)}; "
                         f"{int((~selected).sum())} frame-channels of other cameras left out of the tables "
                         "(the evaluate figures cover every camera of the night)")
        darks = (table["imagetyp"] == "DARK").to_numpy()
        if darks.any():
            per_image = _evaluate_darks(shard_path, preds, masters_path, out_dir, notes, progress)
            qa = _merge_dark_rmse(qa, per_image, shard.geometry)
        guides = np.flatnonzero((table["imagetyp"] == "OBJECT").to_numpy() & selected)
        if guides.size:
            qa = _merge_guide_stats(qa, _guide_stats(preds, masters, table, guides, setpoints, keywords,
                                                     notes, progress))
        attrs = preds.attrs
    qa = qa[selected].reindex(columns=list(QA_COLUMNS))
    quarantine = read_quarantine(shard_path)
    night = _night_name(shard_path, table)
    with atomic_path(out_dir / "quarantine.csv") as tmp:
        shutil.copyfile(quarantine_path(shard_path), tmp)
    with atomic_path(out_dir / "qa.csv") as tmp:
        qa.to_csv(tmp, index=False)
    figures = {}
    if qa["rmse_model"].notna().any():
        _plot_rmse_over_night(qa, out_dir / "rmse_vs_temperature.png", night)
    if qa["noise_model"].notna().any():
        _plot_guide(qa, out_dir / "guide_background.png", night)
    for name in (*QA_FIGURES, "fig6_heatmap.png", "fig7_histogram.png", "fig8_histogram_by_temp.png"):
        if (out_dir / name).exists():
            figures[name] = out_dir / name
    page = report.night_page(night=night, qa=qa, table1=pooled_table(qa), quarantine=quarantine,
                             figures=figures, provenance=attrs, notes=notes)
    with atomic_path(out_dir / "qa.html") as tmp:
        tmp.write_text(page)
    return qa


def _night_name(shard_path, table: pd.DataFrame) -> str:
    nights = sorted(set(table["night"]) - {""})
    return nights[0] if len(nights) == 1 else Path(shard_path).name.removesuffix(".h5")


def _check_same_rows(shard: Shard, preds: PredictedDarks) -> None:
    a, b = shard.table, preds.table
    same = len(a) == len(b) and all((a[c].to_numpy() == b[c].to_numpy()).all() for c in ("file", "channel", "file_hash"))
    if not same:
        raise ValueError(f"{preds.path} was not predicted from {shard.path} (its rows differ): predict again")


def _evaluate_darks(shard_path, preds: PredictedDarks, masters_path, out_dir: Path, notes: list[str],
                    progress: bool) -> pd.DataFrame:
    """``evaluate`` on the night's darks, the predictions file as the ``model``; its per-image table."""
    def model(shard: Shard, rows: np.ndarray) -> np.ndarray:
        return window_of(preds.dark(rows), shard.geometry)

    try:
        evaluate([shard_path], masters_path, out_dir, predictors={"model": model}, progress=progress)
    except ValueError as exc:
        if masters_path is None or "master dark" not in str(exc):
            raise
        notes.append(f"median baselines not scored: {exc}")
        log.warning("median baselines not scored: %s", exc)
        evaluate([shard_path], None, out_dir, predictors={"model": model}, progress=progress)
    return pd.read_csv(out_dir / "per_image.csv", dtype={"file": str, "night": str, "camera": str, "channel": str},
                       keep_default_na=False, na_values=[""])


def _merge_dark_rmse(qa: pd.DataFrame, per_image: pd.DataFrame, geometry) -> pd.DataFrame:
    cols = {m: f"rmse_{m}" for m in RMSE_METHODS if m in per_image}
    part = per_image[["file", "channel", *cols]].rename(columns=cols)
    part["n_pixels"] = geometry.window_size ** 2
    return qa.merge(part, on=["file", "channel"], how="left")


def _merge_guide_stats(qa: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    return qa.merge(stats, on=["file", "channel"], how="left")


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)-pixel square, separably (no scipy)."""
    out = mask.copy()
    for axis in (0, 1):
        grown = out.copy()
        for s in range(1, r + 1):
            for shift in (s, -s):
                rolled = np.roll(out, shift, axis=axis)
                edge = [slice(None)] * 2
                edge[axis] = slice(0, shift) if shift > 0 else slice(shift, None)
                rolled[tuple(edge)] = False
                grown |= rolled
        out = grown
    return out


def background_stats(images: dict[str, np.ndarray], grow: int = STAR_GROW_PX) -> tuple[dict, float]:
    """Background (median) and noise (std and MAD std) of the star-free pixels, the same pixels for
    every image of ``images``: a pixel is left out if sigma clipping (3 sigma, MAD) rejects it in any
    image, grown by ``grow`` pixels. Returns ``({name: (bg, std, mad_std)}, star-free fraction)``."""
    rejected = np.zeros(next(iter(images.values())).shape, bool)
    for img in images.values():
        rejected |= np.ma.getmaskarray(sigma_clip(img, sigma=CLIP_SIGMA, maxiters=5, stdfunc="mad_std",
                                                  masked=True, copy=False))
    free = ~_grow(rejected, grow)
    out = {}
    for name, img in images.items():
        v = img[free].astype(np.float64)
        out[name] = (float(np.median(v)), float(np.std(v)), float(mad_std(v))) if v.size else (np.nan,) * 3
    return out, float(free.mean())


def _guide_stats(preds: PredictedDarks, masters: Masters | None, table: pd.DataFrame, rows: np.ndarray,
                 setpoints: np.ndarray, keywords: Keywords, notes: list[str], progress: bool) -> pd.DataFrame:
    g = preds.geometry
    out = []
    files = list(dict.fromkeys(table["file"].iloc[rows]))
    for f in tqdm(files, desc="guide frames", unit="frame", disable=not progress):
        frows = np.sort(preds.rows_of(f))
        t = table.iloc[frows]
        try:
            raw = read_frame(f, g, keywords)
            if set(t["file_hash"]) != {raw.hash}:
                raise FrameError(f, "file changed since extraction")
        except FrameError as exc:
            notes.append(f"guide frame not measured: {exc}")
            continue
        channels = list(t["channel"])
        model = corrected_actives(raw, g, channels, preds.dark(frows))
        actives = active_areas(raw.data, g)
        median, kinds = {}, {}
        for r, c in zip(frows, channels):
            rec = table.iloc[r]
            for kind in ("temp", "all") if masters is not None else ():
                m = masters.lookup(kind, rec["camera"], c, rec["exptime"], setpoints[r])
                if m is not None:
                    median[c], kinds[c] = actives[c].astype(np.float32) - m.astype(np.float32), f"median_{kind}"
                    break
        for c in channels:
            images = {"model": model[c]} | ({"median": median[c]} if c in median else {})
            stats, free = background_stats(images)
            rec = dict(file=f, channel=c, bg_raw=float(np.median(actives[c])), star_free_fraction=free,
                       median_kind=kinds.get(c, ""))
            for name, (bg, sd, mad) in stats.items():
                rec.update({f"bg_{name}": bg, f"noise_{name}": sd, f"madstd_{name}": mad})
            out.append(rec)
    cols = ["file", "channel", "bg_raw", "star_free_fraction", "median_kind",
            *(f"{s}_{m}" for m in GUIDE_METHODS for s in ("bg", "noise", "madstd"))]
    return pd.DataFrame(out).reindex(columns=cols)


# -- pooling ---------------------------------------------------------------------------------------

def pooled_table(qa: pd.DataFrame) -> dict:
    """Table 1 of the DARK rows of ``qa`` (one night or many): RMSE pooled over every pixel,
    from each row's squared error (rmse^2 x n_pixels), total and per setpoint."""
    pooled = PooledRMSE()
    darks = qa[qa["imagetyp"] == "DARK"]
    for rec in darks.itertuples(index=False):
        groups = ("total", temp_label(float(rec.setpoint)))
        n = int(rec.n_pixels) if np.isfinite(rec.n_pixels) else 0
        for m in RMSE_METHODS:
            v = getattr(rec, f"rmse_{m}")
            if n and np.isfinite(v):
                pooled.add_squared(m, groups, float(v) ** 2 * n, n)
    return ordered_table(pooled.table())


# -- figures ---------------------------------------------------------------------------------------

_COLORS = {"model": "C0", "median_temp": "C1", "median_all": "C2", "floor": "0.4", "median": "C1"}
_MARKERS = {"model": "o", "median_temp": "s", "median_all": "^", "floor": "_"}


def _plot_rmse_over_night(qa: pd.DataFrame, path: Path, night: str) -> None:
    d = qa[qa["imagetyp"] == "DARK"].copy()
    d["time"] = pd.to_datetime(d["date_obs"], errors="coerce")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for m in RMSE_METHODS:
        col = f"rmse_{m}"
        if d[col].notna().any():
            style = dict(s=18, color=_COLORS[m], marker=_MARKERS[m], label=m, alpha=0.7)
            a1.scatter(d["ccdtemp"], d[col], **style)
            a2.scatter(d["time"], d[col], **style)
    a1.set_xlabel("CCD temperature (C)")
    a1.set_ylabel("RMSE per frame and channel (ADU)")
    a1.set_title(f"{night}: RMSE against temperature")
    a1.legend(fontsize=8)
    a2.set_xlabel("time (UTC)")
    a2.set_title("over the night (grey: CCD temperature)")
    tw = a2.twinx()
    tw.plot(d["time"], d["ccdtemp"], ".", color="0.6", ms=3)
    tw.set_ylabel("CCD temperature (C)", color="0.5")
    fig.autofmt_xdate()
    plots._save(fig, path)


def _plot_guide(qa: pd.DataFrame, path: Path, night: str) -> None:
    d = qa[qa["noise_model"].notna()].reset_index(drop=True)
    labels = [f"{Path(f).name.split('.')[0]}:{c}" for f, c in zip(d["file"], d["channel"])]
    x = np.arange(len(d))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.45 * len(d) + 4), 3.8))
    for ax, stat, title in ((axes[0], "bg", "star-free background: median (ADU)"),
                            (axes[1], "madstd", "star-free noise: MAD std (ADU)")):
        for k, m in enumerate(GUIDE_METHODS):
            col = f"{stat}_{m}"
            if col in d and d[col].notna().any():
                ax.bar(x + (k - 0.5) * 0.4, d[col], width=0.4, color=_COLORS[m], label=f"after {m} dark")
        ax.set_xticks(x, labels, rotation=90, fontsize=6)
        ax.set_title(title)
        ax.axhline(0, color="k", lw=0.5)
        ax.legend(fontsize=8)
    fig.suptitle(f"{night}: guide frames after model and median-dark correction", y=1.03)
    plots._save(fig, path)


def _plot_summary(nights: pd.DataFrame, path: Path) -> None:
    d = nights.copy()
    d["date"] = pd.to_datetime(d["night"].astype(str), format="%Y%m%d", errors="coerce")
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=[3, 1])
    for m in RMSE_METHODS:
        col = f"rmse_{m}"
        if col in d and d[col].notna().any():
            a1.plot(d["date"], d[col], "o-", ms=3, lw=0.8, color=_COLORS[m], label=m)
    flagged = d[d["flag"] != ""]
    if len(flagged) and flagged["rmse_model"].notna().any():
        a1.scatter(flagged["date"], flagged["rmse_model"], s=60, facecolors="none", edgecolors="r",
                   label="model worse than median")
    a1.set_ylabel("pooled RMSE of the night's darks (ADU)")
    if a1.get_legend_handles_labels()[0]:
        a1.legend(fontsize=8)
    a2.bar(d["date"], d["n_quarantined"], color="C3", width=0.8)
    a2.set_ylabel("quarantined")
    a2.set_ylim(0, max(1, int(d["n_quarantined"].max())) * 1.15)
    a2.yaxis.set_major_locator(MaxNLocator(integer=True))
    locator = mdates.AutoDateLocator(minticks=3, maxticks=10)
    a2.xaxis.set_major_locator(locator)
    a2.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    if len(d) < 3:  # a day either side, not hours
        a2.set_xlim(d["date"].min() - pd.Timedelta(days=1), d["date"].max() + pd.Timedelta(days=1))
    a2.set_xlabel("night")
    plots._save(fig, path)


# -- the archive ----------------------------------------------------------------------------------

def summarize(qa_dir: str | Path, out_csv: str | Path, out_html: str | Path, out_table: str | Path | None = None,
              nights: Sequence[str] | None = None, corrected_dir: str | Path | None = None) -> tuple[pd.DataFrame, dict]:
    """All nights in one table and page; returns the per-night table (written to ``out_csv``) and
    the archive's Table 1 (written to ``out_table``).

    ``nights`` defaults to every folder of ``qa_dir`` holding a ``qa.csv``. ``corrected_dir``
    (``<dir>/<night>/manifest.csv``) adds the per-night count of frames that failed correction.
    """
    qa_dir, out_csv, out_html = Path(qa_dir), Path(out_csv), Path(out_html)
    if nights is None:
        nights = sorted(p.parent.name for p in qa_dir.glob("*/qa.csv"))
    rows, frames = [], []
    for night in nights:
        d = qa_dir / str(night)
        qa = pd.read_csv(d / "qa.csv", dtype={"night": str, "file": str, "camera": str, "channel": str,
                                              "median_kind": str}, keep_default_na=False, na_values=[""])
        qa["night"] = str(night)
        frames.append(qa)
        quarantine = pd.read_csv(d / "quarantine.csv", dtype=str, keep_default_na=False)
        t = pooled_table(qa).get("total", {})
        guides = qa[qa["noise_model"].notna()]
        row = dict(night=str(night), n_frames=qa["file"].nunique(),
                   n_darks=qa.loc[qa["imagetyp"] == "DARK", "file"].nunique(),
                   n_guide=qa.loc[qa["imagetyp"] == "OBJECT", "file"].nunique(),
                   n_quarantined=len(quarantine), n_correct_failed=np.nan,
                   **{f"rmse_{m}": t.get(m, np.nan) for m in RMSE_METHODS},
                   guide_noise_model=_rms(guides["madstd_model"]), guide_noise_median=_rms(guides.get("madstd_median")),
                   guide_bg_model=guides["bg_model"].median() if len(guides) else np.nan,
                   guide_bg_median=guides["bg_median"].median() if len(guides) and "bg_median" in guides else np.nan)
        if corrected_dir is not None and (Path(corrected_dir) / str(night) / "manifest.csv").exists():
            man = read_manifest(Path(corrected_dir) / str(night))
            row["n_correct_failed"] = int((man["status"] == "failed").sum())
        row["flag"] = _flag(row)
        rows.append(row)
    table = pd.DataFrame(rows, columns=["night", "n_frames", "n_darks", "n_guide", "n_quarantined", "n_correct_failed",
                                        *(f"rmse_{m}" for m in RMSE_METHODS), "guide_bg_model", "guide_bg_median",
                                        "guide_noise_model", "guide_noise_median", "flag"])
    everything = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(QA_COLUMNS))
    table1 = pooled_table(everything)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    if out_table is not None:
        with atomic_path(Path(out_table)) as tmp:
            table_frame(table1).to_csv(tmp, index=False) if table1 else tmp.write_text("temperature\n")
    figures = {}
    if len(table):
        fig = out_html.with_name(out_html.stem + "_nights.png")
        _plot_summary(table, fig)
        figures[fig.name] = fig
    page = report.summary_page(nights=table, table1=table1, figures=figures,
                               qa_links={n: _relpath(qa_dir / n / "qa.html", out_html.parent) for n in table["night"]})
    with atomic_path(out_html) as tmp:
        tmp.write_text(page)
    return table, table1


def _rms(values) -> float:
    if values is None:
        return np.nan
    v = pd.Series(values, dtype=float).dropna().to_numpy()
    return float(np.sqrt(np.mean(v * v))) if v.size else np.nan


def _flag(row: dict) -> str:
    """Why a night needs a look: the model did worse than a median baseline, or files failed."""
    why = []
    model = row["rmse_model"]
    for base in ("median_temp", "median_all"):
        b = row[f"rmse_{base}"]
        if np.isfinite(model) and np.isfinite(b) and model > b:
            why.append(f"darks: model {model:.2f} > {base} {b:.2f} ADU")
            break
    gm, gd = row["guide_noise_model"], row["guide_noise_median"]
    if np.isfinite(gm) and np.isfinite(gd) and gm > gd:
        why.append(f"guide noise: model {gm:.2f} > median {gd:.2f} ADU")
    if np.isfinite(row["n_correct_failed"]) and row["n_correct_failed"] > 0:
        why.append(f"{int(row['n_correct_failed'])} frames not corrected")
    if row["n_frames"] == 0:
        why.append("no usable frame")
    return "; ".join(why)


def _relpath(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target, start)

