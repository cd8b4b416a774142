"""Quality assurance of a reprocessed night, and the archive's summary.

Per night (:func:`night_qa`), from the night's shard, its predictions and the library's median
master darks:

* DARK frames: the RMSE (ADU, model window, :mod:`deepdark.evaluation.metrics`) of the model's dark, of the
  per-temperature and all-temperature median masters, and the noise floor, per frame and channel.
  These are computed by :func:`deepdark.evaluation.evaluate.evaluate` with the predictions file as the
  ``model`` predictor, so the numbers are defined in one place; it also draws the paper's heat
  map and difference histograms. Added here: RMSE over the night against temperature and time.
* Guide (OBJECT) frames: the sky background and the noise of star-free pixels after model
  correction and after median-dark correction, on the same pixels, side by side.
* The night's quarantine (files that could not be used, and why).

Outputs in the night's QA folder: ``qa.csv`` (one row per frame-channel, for machines; with the
frame's ``frame_hash``, so that the summary counts a frame that two nights hold once; names
that are not UTF-8 with their odd bytes as ``\\xNN``),
``qa.html`` (for people, figures embedded), ``quarantine.csv`` (a copy of the night's), and the
files of ``evaluate`` (``table1.*``, ``per_image.csv``, ``histograms.csv``, ``fig*.png``).

:func:`summarize` pools every night's ``qa.csv`` into the archive's Table 1 (squared errors
summed over all nights, never an average of RMSEs), a per-night table with the nights where the
model did worse than the median baseline flagged, and the quarantine counts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.stats import mad_std, sigma_clip
from tqdm import tqdm

from deepdark.evaluation import plots, report
from deepdark.evaluation.evaluate import evaluate, ordered_table
from deepdark.evaluation.metrics import PooledRMSE
from deepdark.io.atomic import atomic_path
from deepdark.io.errors import InputError
from deepdark.io.frames import FrameError, Keywords, read_frame
from deepdark.io.masters import Masters
from deepdark.io.predictions import Predictions
from deepdark.io.shards import Shard, printable, quarantine_path, read_quarantine
from deepdark.io.strips import window_of
from deepdark.io.tables import frame_setpoints, temp_label
from deepdark.pipeline.correct import active_areas, corrected_actives

log = logging.getLogger(__name__)

RMSE_METHODS = ("model", "median_temp", "median_all", "floor")
GUIDE_METHODS = ("model", "median")
QA_COLUMNS = (
    "night",
    "file",
    "camera",
    "channel",
    "imagetyp",
    "exptime",
    "ccdtemp",
    "setpoint",
    "date_obs",
    "n_pixels",
    *(f"rmse_{m}" for m in RMSE_METHODS),
    "bg_raw",
    *(f"{s}_{m}" for m in GUIDE_METHODS for s in ("bg", "noise", "madstd")),
    "median_kind",
    "star_free_fraction",
    "frame_hash",
)
EVALUATE_FILES = (
    "table1.json",
    "table1.csv",
    "per_image.csv",
    "histograms.csv",
    "fig6_heatmap.png",
    "fig7_histogram.png",
    "fig8_histogram_by_temp.png",
)
QA_FIGURES = ("rmse_vs_temperature.png", "guide_background.png")
CLIP_SIGMA = 3.0
STAR_GROW_PX = 2  # star-free: sigma-clipped pixels grown by this many pixels


# -- per night -------------------------------------------------------------------------------------


def night_qa(
    shard_path: str | Path,
    predictions_path: str | Path,
    masters_path: str | Path | None,
    out_dir: str | Path,
    keywords: Keywords = Keywords(),
    cameras: Sequence[str] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """The QA of one night; writes ``qa.csv``, ``qa.html``, ``quarantine.csv`` and figures into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (*EVALUATE_FILES, *QA_FIGURES):  # nothing stale from an earlier run
        (out_dir / name).unlink(missing_ok=True)
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        shard = stack.enter_context(Shard(shard_path))
        preds = stack.enter_context(Predictions(predictions_path))
        masters = stack.enter_context(Masters(masters_path)) if masters_path else None
        _check_same_rows(shard, preds)
        table = shard.table
        setpoints = frame_setpoints(table, masters.setpoints if masters else None)
        qa = table[
            ["night", "file", "camera", "channel", "imagetyp", "exptime", "ccdtemp", "date_obs", "frame_hash"]
        ].copy()
        qa["setpoint"] = setpoints
        # UTF-8 text for every tool and page: a name that is not UTF-8 shows its odd bytes as \\xNN
        qa["file"] = qa["file"].map(printable)
        selected = np.ones(len(table), bool) if not cameras else table["camera"].isin(list(cameras)).to_numpy()
        if cameras and not selected.all():
            notes.append(
                f"cameras selected: {', '.join(cameras)}; "
                f"{int((~selected).sum())} frame-channels of other cameras left out of the tables "
                "(the evaluate figures cover every camera of the night)"
            )
        notes += _verdict_notes(preds.table[selected])
        if not shard.geometry.has_ob:
            notes.append(
                f"geometry {shard.geometry.name!r} has no optical black: each frame's temperature is its "
                "header's (CCDTEMP, else the setpoint), not measured on the frame"
            )
        darks = (table["imagetyp"] == "DARK").to_numpy()
        if darks.any():
            per_image = _evaluate_darks(shard_path, preds, masters_path, out_dir, notes, progress)
            qa = _merge_dark_rmse(qa, per_image, shard.geometry)
        guides = np.flatnonzero((table["imagetyp"] == "OBJECT").to_numpy() & selected)
        if guides.size:
            qa = _merge_guide_stats(qa, _guide_stats(preds, masters, table, guides, keywords, notes, progress))
        attrs = preds.attrs
        notes += _transfer_notes(attrs)
    qa = qa[selected].reindex(columns=list(QA_COLUMNS))
    _write_night_outputs(qa, shard_path, out_dir, _night_name(shard_path, table), attrs, [printable(n) for n in notes])
    return qa


def _write_night_outputs(
    qa: pd.DataFrame, shard_path, out_dir: Path, night: str, attrs: dict, notes: list[str]
) -> None:
    """``quarantine.csv``, ``qa.csv``, the night's figures and ``qa.html``."""
    with atomic_path(out_dir / "quarantine.csv") as tmp:
        shutil.copyfile(quarantine_path(shard_path), tmp)
    with atomic_path(out_dir / "qa.csv") as tmp:
        qa.to_csv(tmp, index=False, encoding="utf-8")
    if qa["rmse_model"].notna().any():
        plots.rmse_over_night(qa, out_dir / "rmse_vs_temperature.png", night, RMSE_METHODS)
    if qa["noise_model"].notna().any():
        plots.guide_background(qa, out_dir / "guide_background.png", night, GUIDE_METHODS)
    names = (*QA_FIGURES, "fig6_heatmap.png", "fig7_histogram.png", "fig8_histogram_by_temp.png")
    figures = {name: out_dir / name for name in names if (out_dir / name).exists()}
    page = report.night_page(
        night=night,
        qa=qa,
        table1=pooled_table(qa),
        quarantine=read_quarantine(shard_path),
        figures=figures,
        provenance=attrs,
        notes=notes,
    )
    with atomic_path(out_dir / "qa.html") as tmp:
        tmp.write_text(page, encoding="utf-8")


def _night_name(shard_path, table: pd.DataFrame) -> str:
    nights = sorted(set(table["night"]) - {""})
    return nights[0] if len(nights) == 1 else Path(shard_path).name.removesuffix(".h5")


def _transfer_notes(attrs) -> list[str]:
    """What the predictions say of the library's overscan-to-image row transfer, per channel."""
    try:
        transfer = json.loads(attrs.get("transfer", "{}"))
    except (TypeError, ValueError):
        return []
    return [f"overscan row transfer of {key}: {text}" for key, text in transfer.items()]


def _verdict_notes(table: pd.DataFrame, listed: int = 10) -> list[str]:
    """A line for the frames the predictions could not serve (their model columns stay empty)
    and one for those they flagged, naming the first ``listed`` of each."""
    if "status" not in table:  # predictions written before verdicts: every frame served
        return []
    notes = []
    for status, meaning in (
        ("unserved", "no dark predicted: the model is not scored on them"),
        ("flagged", "predicted, but flagged as implausible"),
    ):
        files = table.loc[table["status"] == status, "file"].unique()
        if len(files):
            names = ", ".join(Path(f).name for f in files[:listed]) + (", ..." if len(files) > listed else "")
            notes.append(f"{len(files)} frame(s) {status} ({meaning}): {names}")
    return notes


def _check_same_rows(shard: Shard, preds: Predictions) -> None:
    a, b = shard.table, preds.table
    same = len(a) == len(b) and all(
        (a[c].to_numpy() == b[c].to_numpy()).all() for c in ("file", "channel", "file_hash")
    )
    if not same:
        raise InputError(f"{preds.path} was not predicted from {shard.path} (its rows differ): predict again")


def _evaluate_darks(
    shard_path, preds: Predictions, masters_path, out_dir: Path, notes: list[str], progress: bool
) -> pd.DataFrame:
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
    return pd.read_csv(
        out_dir / "per_image.csv",
        dtype={"file": str, "night": str, "camera": str, "channel": str},
        keep_default_na=False,
        na_values=[""],
    )


def _merge_dark_rmse(qa: pd.DataFrame, per_image: pd.DataFrame, geometry) -> pd.DataFrame:
    cols = {m: f"rmse_{m}" for m in RMSE_METHODS if m in per_image}
    part = per_image[["file", "channel", *cols]].rename(columns=cols)
    part["file"] = part["file"].map(printable)  # as in the QA table
    part["n_pixels"] = int(np.prod(geometry.window_shape))  # the scored area: the window, else all
    return qa.merge(part, on=["file", "channel"], how="left")


def _merge_guide_stats(qa: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    stats = stats.assign(file=stats["file"].map(printable))  # as in the QA table
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
        rejected |= np.ma.getmaskarray(
            sigma_clip(img, sigma=CLIP_SIGMA, maxiters=5, stdfunc="mad_std", masked=True, copy=False)
        )
    free = ~_grow(rejected, grow)
    out = {}
    for name, img in images.items():
        v = img[free].astype(np.float64)
        out[name] = (float(np.median(v)), float(np.std(v)), float(mad_std(v))) if v.size else (np.nan,) * 3
    return out, float(free.mean())


def _guide_stats(
    preds: Predictions,
    masters: Masters | None,
    table: pd.DataFrame,
    rows: np.ndarray,
    keywords: Keywords,
    notes: list[str],
    progress: bool,
) -> pd.DataFrame:
    g = preds.geometry
    out = []
    files = list(dict.fromkeys(table["file"].iloc[rows]))
    for f in tqdm(files, desc="guide frames", unit="frame", disable=None if progress else True):
        frows = np.sort(preds.rows_of(f))
        t = table.iloc[frows]
        if "status" in preds.table and (preds.table["status"].iloc[frows] == "unserved").any():
            continue  # no dark to measure it with; named in the night's notes
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
        if masters is not None:
            # the per-temperature master where the library has one, else the all-temperature one
            per_temp, overall = (masters.for_frames(t, kind, strict=False) for kind in ("temp", "all"))
            for c, m_temp, m_all in zip(channels, per_temp, overall):
                kind, m = ("temp", m_temp) if m_temp is not None else ("all", m_all)
                if m is not None:
                    median[c], kinds[c] = actives[c].astype(np.float32) - m.astype(np.float32), f"median_{kind}"
        for c in channels:
            images = {"model": model[c]} | ({"median": median[c]} if c in median else {})
            stats, free = background_stats(images)
            rec = dict(
                file=f,
                channel=c,
                bg_raw=float(np.median(actives[c])),
                star_free_fraction=free,
                median_kind=kinds.get(c, ""),
            )
            for name, (bg, sd, mad) in stats.items():
                rec.update({f"bg_{name}": bg, f"noise_{name}": sd, f"madstd_{name}": mad})
            out.append(rec)
    cols = [
        "file",
        "channel",
        "bg_raw",
        "star_free_fraction",
        "median_kind",
        *(f"{s}_{m}" for m in GUIDE_METHODS for s in ("bg", "noise", "madstd")),
    ]
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


# -- the archive ----------------------------------------------------------------------------------
