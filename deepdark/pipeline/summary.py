"""The ``summary`` step: every night's QA in one table, one page and Table 1 of the archive."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from deepdark.evaluation import plots, report
from deepdark.evaluation.evaluate import table_frame
from deepdark.io.atomic import atomic_path
from deepdark.pipeline.correct import read_manifest
from deepdark.pipeline.qa import QA_COLUMNS, RMSE_METHODS, pooled_table


def summarize(
    qa_dir: str | Path,
    out_csv: str | Path,
    out_html: str | Path,
    out_table: str | Path | None = None,
    nights: Sequence[str] | None = None,
    corrected_dir: str | Path | None = None,
) -> tuple[pd.DataFrame, dict]:
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
        qa = pd.read_csv(
            d / "qa.csv",
            dtype={"night": str, "file": str, "camera": str, "channel": str, "median_kind": str},
            keep_default_na=False,
            na_values=[""],
        )
        qa["night"] = str(night)
        frames.append(qa)
        quarantine = pd.read_csv(d / "quarantine.csv", dtype=str, keep_default_na=False)
        t = pooled_table(qa).get("total", {})
        guides = qa[qa["noise_model"].notna()]
        row = dict(
            night=str(night),
            n_frames=qa["file"].nunique(),
            n_darks=qa.loc[qa["imagetyp"] == "DARK", "file"].nunique(),
            n_guide=qa.loc[qa["imagetyp"] == "OBJECT", "file"].nunique(),
            n_quarantined=len(quarantine),
            n_correct_failed=np.nan,
            **{f"rmse_{m}": t.get(m, np.nan) for m in RMSE_METHODS},
            guide_noise_model=_rms(guides["madstd_model"]),
            guide_noise_median=_rms(guides.get("madstd_median")),
            guide_bg_model=guides["bg_model"].median() if len(guides) else np.nan,
            guide_bg_median=guides["bg_median"].median() if len(guides) and "bg_median" in guides else np.nan,
        )
        if corrected_dir is not None and (Path(corrected_dir) / str(night) / "manifest.csv").exists():
            man = read_manifest(Path(corrected_dir) / str(night))
            row["n_correct_failed"] = int((man["status"] == "failed").sum())
        row["flag"] = _flag(row)
        rows.append(row)
    table = pd.DataFrame(
        rows,
        columns=[
            "night",
            "n_frames",
            "n_darks",
            "n_guide",
            "n_quarantined",
            "n_correct_failed",
            *(f"rmse_{m}" for m in RMSE_METHODS),
            "guide_bg_model",
            "guide_bg_median",
            "guide_noise_model",
            "guide_noise_median",
            "flag",
        ],
    )
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
        plots.nights_summary(table, fig, RMSE_METHODS)
        figures[fig.name] = fig
    page = report.summary_page(
        nights=table,
        table1=table1,
        figures=figures,
        qa_links={n: _relpath(qa_dir / n / "qa.html", out_html.parent) for n in table["night"]},
    )
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
