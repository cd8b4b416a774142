"""The ``summary`` step: every night's QA in one table, one page and Table 1 of the archive.

Table 1 pools the squared errors of every dark of every night, each frame once: a frame that two
nights hold (the same pixels and header facts, ``frame_hash``; a night folder linked under a
second name) counts in the first night only, and the number dropped is reported. Per night, the
frames corrected (``ok``), corrected but flagged by the predictions (``flagged``), not corrected
(``failed``) and quarantined at extraction are counted; a night where more than
``max_failed_fraction`` of the frames tried failed is flagged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from deepdark.evaluation import plots, report
from deepdark.evaluation.evaluate import table_frame
from deepdark.io.atomic import atomic_path
from deepdark.io.errors import InputError
from deepdark.pipeline.correct import MANIFEST, read_manifest
from deepdark.pipeline.qa import QA_COLUMNS, RMSE_METHODS, pooled_table

log = logging.getLogger(__name__)
# the columns without which a table is no QA table (the others may be missing from an older one)
QA_KEY_COLUMNS = ("file", "channel", "imagetyp")

COUNT_COLUMNS = ("n_correct_ok", "n_correct_flagged", "n_correct_failed")
NIGHT_COLUMNS = (
    "night",
    "n_frames",
    "n_darks",
    "n_guide",
    "n_quarantined",
    *COUNT_COLUMNS,
    "failed_fraction",
    "n_duplicates",
    *(f"rmse_{m}" for m in RMSE_METHODS),
    "guide_bg_model",
    "guide_bg_median",
    "guide_noise_model",
    "guide_noise_median",
    "flag",
)
# What Table 1 needs of a QA row.
_POOLED_COLUMNS = ("imagetyp", "setpoint", "n_pixels", *(f"rmse_{m}" for m in RMSE_METHODS))


def summarize(
    qa_dir: str | Path,
    out_csv: str | Path,
    out_html: str | Path,
    out_table: str | Path | None = None,
    nights: Sequence[str] | None = None,
    corrected_dir: str | Path | None = None,
    max_failed_fraction: float = 0.05,
) -> tuple[pd.DataFrame, dict]:
    """All nights in one table and page; returns the per-night table (written to ``out_csv``) and
    the archive's Table 1 (written to ``out_table``).

    Parameters
    ----------
    qa_dir
        Folder of the nights' QA folders (``<night>/qa.csv``, ``<night>/quarantine.csv``).
    out_csv, out_html, out_table
        The per-night table, the page and Table 1 (CSV) to write.
    nights
        The nights, in order; default every folder of ``qa_dir`` holding a ``qa.csv``. A frame
        that several nights hold counts in Table 1 in the first of them only.
    corrected_dir
        Folder of the nights' corrected folders (``<night>/manifest.csv``): adds the per-night
        counts of frames corrected, flagged and not corrected.
    max_failed_fraction
        A night where more than this fraction of the frames tried failed correction is flagged.
    """
    if not 0 <= max_failed_fraction <= 1:
        raise InputError(f"max_failed_fraction {max_failed_fraction} is not a fraction (0 to 1)")
    qa_dir, out_csv, out_html = Path(qa_dir), Path(out_csv), Path(out_html)
    if nights is None:
        nights = sorted(p.parent.name for p in qa_dir.glob("*/qa.csv"))
        for folder in sorted(p for p in qa_dir.iterdir() if p.is_dir() and p.name not in nights):
            log.warning("%s holds no qa.csv (its QA did not finish): the night is left out of the summary", folder)
    rows, pooled, seen = [], [], set()
    for night in map(str, nights):
        qa = read_qa(qa_dir / night / "qa.csv")
        qa["night"] = night
        unique, n_duplicates = _drop_seen(qa, seen)
        pooled.append(unique.loc[unique["imagetyp"] == "DARK", list(_POOLED_COLUMNS)])
        row = _night_row(night, qa, qa_dir / night, corrected_dir)
        row["n_duplicates"] = n_duplicates
        row["flag"] = _flag(row, max_failed_fraction)
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(NIGHT_COLUMNS))
    table1 = pooled_table(pd.concat(pooled, ignore_index=True) if pooled else pd.DataFrame(columns=list(QA_COLUMNS)))
    _write_tables(table, table1, out_csv, out_table)
    _write_page(table, table1, qa_dir, out_html, max_failed_fraction)
    return table, table1


def read_qa(path: str | Path) -> pd.DataFrame:
    """A night's ``qa.csv`` (text columns as text, empty cells NaN; a column of the QA that a file
    written before it lacks, empty; ``frame_hash`` "" there); a one-line error naming the file
    when it is missing, empty or not a QA table."""
    try:
        qa = pd.read_csv(
            path,
            dtype={"night": str, "file": str, "camera": str, "channel": str, "median_kind": str, "frame_hash": str},
            keep_default_na=False,
            na_values=[""],
            encoding="utf-8",
        )
    except FileNotFoundError:
        raise InputError(f"{path}: no such file: the night's QA did not finish (run it again)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise InputError(f"{path}: not a QA table ({' '.join(str(exc).split())})") from None
    missing = [c for c in QA_KEY_COLUMNS if c not in qa]
    if missing:
        raise InputError(f"{path}: not a QA table (no column {', '.join(missing)})")
    qa = qa.reindex(columns=list(dict.fromkeys([*qa.columns, *QA_COLUMNS])))
    qa["frame_hash"] = qa["frame_hash"].astype(object).where(qa["frame_hash"].notna(), "")
    return qa


def _drop_seen(qa: pd.DataFrame, seen: set[str]) -> tuple[pd.DataFrame, int]:
    """``qa`` without the frames of an earlier night (by ``frame_hash``), and how many frames that
    dropped; adds this night's frames to ``seen``."""
    hashes = qa["frame_hash"]
    again = hashes.isin(seen) & (hashes != "")
    n_duplicates = int(qa.loc[again, "file"].nunique())
    seen.update(hashes[hashes != ""])
    return qa[~again], n_duplicates


def _night_row(night: str, qa: pd.DataFrame, qa_night: Path, corrected_dir) -> dict:
    """One night's row: frames, quarantine, correction counts, pooled RMSE, guide-frame noise."""
    try:
        quarantine = pd.read_csv(qa_night / "quarantine.csv", dtype=str, keep_default_na=False, encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise InputError(f"{qa_night / 'quarantine.csv'}: {' '.join(str(exc).split())}") from None
    t = pooled_table(qa).get("total", {})
    guides = qa[qa["noise_model"].notna()]
    return dict(
        night=night,
        n_frames=qa["file"].nunique(),
        n_darks=qa.loc[qa["imagetyp"] == "DARK", "file"].nunique(),
        n_guide=qa.loc[qa["imagetyp"] == "OBJECT", "file"].nunique(),
        n_quarantined=len(quarantine),
        **_correction_counts(corrected_dir, night),
        **{f"rmse_{m}": t.get(m, np.nan) for m in RMSE_METHODS},
        guide_noise_model=_rms(guides["madstd_model"]),
        guide_noise_median=_rms(guides.get("madstd_median")),
        guide_bg_model=guides["bg_model"].median() if len(guides) else np.nan,
        guide_bg_median=guides["bg_median"].median() if len(guides) and "bg_median" in guides else np.nan,
    )


def _correction_counts(corrected_dir, night: str) -> dict:
    """Frames ``ok``, ``flagged`` and ``failed`` in the night's manifest, and the failed fraction
    of those tried (NaN when there is no manifest)."""
    folder = Path(corrected_dir) / night if corrected_dir is not None else None
    if folder is None or not (folder / MANIFEST).exists():
        return {**dict.fromkeys(COUNT_COLUMNS, np.nan), "failed_fraction": np.nan}
    status = read_manifest(folder)["status"]
    counts = {col: int((status == col.removeprefix("n_correct_")).sum()) for col in COUNT_COLUMNS}
    tried = sum(counts.values())
    return {**counts, "failed_fraction": counts["n_correct_failed"] / tried if tried else 0.0}


def _write_tables(table: pd.DataFrame, table1: dict, out_csv: Path, out_table) -> None:
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False, encoding="utf-8")
    if out_table is not None:
        with atomic_path(Path(out_table)) as tmp:
            table_frame(table1).to_csv(tmp, index=False) if table1 else tmp.write_text("temperature\n")


def _write_page(table: pd.DataFrame, table1: dict, qa_dir: Path, out_html: Path, max_failed_fraction: float) -> None:
    figures = {}
    if len(table):
        fig = out_html.with_name(out_html.stem + "_nights.png")
        plots.nights_summary(table, fig, RMSE_METHODS)
        figures[fig.name] = fig
    page = report.summary_page(
        nights=table,
        table1=table1,
        figures=figures,
        qa_links={n: os.path.relpath(qa_dir / n / "qa.html", out_html.parent) for n in table["night"]},
        totals=_totals(table),
        max_failed_fraction=max_failed_fraction,
    )
    with atomic_path(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")


def _totals(table: pd.DataFrame) -> dict[str, int]:
    """Frames of the archive per status, and the duplicates counted once (NaN counts: none)."""
    columns = {
        "ok": "n_correct_ok",
        "flagged": "n_correct_flagged",
        "failed": "n_correct_failed",
        "quarantined": "n_quarantined",
        "frames": "n_frames",
        "duplicates": "n_duplicates",
    }
    return {name: int(pd.to_numeric(table[col]).fillna(0).sum()) for name, col in columns.items()}


def _rms(values) -> float:
    if values is None:
        return np.nan
    v = pd.Series(values, dtype=float).dropna().to_numpy()
    return float(np.sqrt(np.mean(v * v))) if v.size else np.nan


def _flag(row: dict, max_failed_fraction: float) -> str:
    """Why a night needs a look: the model did worse than a median baseline, or too many frames
    failed correction."""
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
    fraction = row["failed_fraction"]
    if np.isfinite(fraction) and fraction > max_failed_fraction:
        tried = sum(row[c] for c in COUNT_COLUMNS)
        why.append(
            f"{row['n_correct_failed']} of {tried} frames not corrected "
            f"({100 * fraction:.3g}% > {100 * max_failed_fraction:.3g}%)"
        )
    if row["n_frames"] == 0:
        why.append("no usable frame")
    return "; ".join(why)
