"""HTML pages for people: the per-night QA page and the archive summary.

Plain HTML with the figures embedded (base64 PNG), so a page is one self-contained file that
``snakemake --report`` can bundle, a browser can open from a cluster's file system, and e-mail
can carry. No template engine: every value goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

from deepdark import __version__

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
td.wide { text-align: left; min-width: 22em; font-size: 0.9em; }
div.scroll { overflow-x: auto; }
tr.flag td { background: #fde2e2; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
.note { color: #8a5a00; } .muted { color: #777; font-size: 0.85em; }
"""


def _esc(x) -> str:
    return html.escape(str(x))


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{v:.{digits}f}"
    return _esc(v)


def table_html(
    frame: pd.DataFrame,
    text_columns: tuple[str, ...] = (),
    flag_column: str | None = None,
    links: dict[str, dict[str, str]] | None = None,
    digits: int = 2,
    wide_columns: tuple[str, ...] = (),
) -> str:
    """A DataFrame as an HTML table; ``links[column][value]`` turns cells into links."""
    if frame.empty:
        return '<p class="muted">none</p>'
    links = links or {}
    head = "".join(f'<th class="{"text" if c in text_columns else ""}">{_esc(c)}</th>' for c in frame.columns)
    body = []
    for _, row in frame.iterrows():
        cls = ' class="flag"' if flag_column and str(row.get(flag_column, "")) not in ("", "nan") else ""
        cells = []
        for c in frame.columns:
            v = row[c]
            text = _fmt(v, digits)
            if c in links and str(v) in links[c]:
                text = f'<a href="{_esc(links[c][str(v)])}">{text}</a>'
            kind = "wide" if c in wide_columns else "text" if c in text_columns else ""
            cells.append(f'<td class="{kind}">{text}</td>')
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def table1_html(table1: dict) -> str:
    """The paper's Table 1: rows = methods, columns = total and each setpoint (ADU)."""
    if not table1:
        return '<p class="muted">no DARK frames: no RMSE table</p>'
    groups = list(table1)
    methods = [m for m in dict.fromkeys(m for g in groups for m in table1[g]) if m != "n_images"]
    rows = [
        {"method": m, **{("total" if g == "total" else f"{g} C"): table1[g].get(m, np.nan) for g in groups}}
        for m in methods
    ]
    rows.append(
        {
            "method": "frame-channels",
            **{("total" if g == "total" else f"{g} C"): str(table1[g]["n_images"]) for g in groups},
        }
    )
    return table_html(pd.DataFrame(rows), text_columns=("method",))


def image_html(path: Path, alt: str = "") -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<figure><img alt="{_esc(alt or Path(path).name)}" src="data:image/png;base64,{data}"></figure>'


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f"<style>{_STYLE}</style></head><body>\n<h1>{_esc(title)}</h1>\n{body}\n"
        f'<p class="muted">deepdark {_esc(__version__)}</p></body></html>\n'
    )


def night_page(
    night: str,
    qa: pd.DataFrame,
    table1: dict,
    quarantine: pd.DataFrame,
    figures: dict[str, Path],
    provenance: dict,
    notes: list[str],
) -> str:
    """The QA page of one night."""
    files = qa.drop_duplicates("file")
    counts = files["imagetyp"].value_counts().to_dict()
    prov = ", ".join(
        f"{k}: {provenance[k]}"
        for k in ("method", "model_name", "model_hash", "software", "created")
        if provenance.get(k)
    )
    parts = [
        f"<p>{len(files)} frames ({', '.join(f'{v} {k}' for k, v in sorted(counts.items())) or 'none'}), "
        f"{len(quarantine)} quarantined.</p>",
        f'<p class="muted">darks from {_esc(prov)}</p>',
        *(f'<p class="note">{_esc(n)}</p>' for n in notes),
        *_dark_section(qa, table1, figures),
        *_guide_section(qa, figures),
        "<h2>Quarantined files</h2>",
        table_html(quarantine, text_columns=tuple(quarantine.columns)),
    ]
    return _page(f"deepdark QA: night {night}", "\n".join(parts))


def _dark_section(qa: pd.DataFrame, table1: dict, figures: dict[str, Path]) -> list[str]:
    """Table 1 of the night's darks, its figures and the per frame-channel RMSE."""
    parts = [
        "<h2>Dark frames: RMSE against the real dark (ADU, model window)</h2>",
        "<p>Pooled over every pixel of the night's darks (the paper's Table 1); "
        "<em>floor</em> is the frames' own temporal noise, which no predictor can beat.</p>",
        table1_html(table1),
    ]
    darks = qa[qa["imagetyp"] == "DARK"]
    if not len(darks):
        return parts
    rmse = [c for c in ("rmse_model", "rmse_median_temp", "rmse_median_all", "rmse_floor") if darks[c].notna().any()]
    d = darks[["file", "camera", "channel", "ccdtemp", "setpoint", "exptime", *rmse]].copy()
    d["file"] = [Path(f).name for f in d["file"]]
    for name, alt in (
        ("rmse_vs_temperature.png", "RMSE against temperature and over the night"),
        ("fig6_heatmap.png", "|prediction - real| of one dark (paper fig. 6)"),
        ("fig7_histogram.png", "pixel differences, all darks (paper fig. 7)"),
        ("fig8_histogram_by_temp.png", "pixel differences per temperature (paper fig. 8)"),
    ):
        if name in figures:
            parts.append(image_html(figures[name], alt))
    return [*parts, "<h3>Per frame and channel</h3>", table_html(d, text_columns=("file", "camera", "channel"))]


_GUIDE_COLUMNS = (
    "file",
    "camera",
    "channel",
    "exptime",
    "ccdtemp",
    "bg_raw",
    "bg_model",
    "bg_median",
    "noise_model",
    "noise_median",
    "madstd_model",
    "madstd_median",
    "median_kind",
    "star_free_fraction",
)


def _guide_section(qa: pd.DataFrame, figures: dict[str, Path]) -> list[str]:
    """The star-free background and noise of the night's guide frames after each correction."""
    guides = qa[qa["noise_model"].notna()] if "noise_model" in qa else qa.iloc[:0]
    parts = ["<h2>Guide frames: star-free background after correction</h2>"]
    if not len(guides):
        return [*parts, '<p class="muted">no guide frames</p>']
    parts.append(
        "<p>Background = median, noise = standard deviation and MAD standard deviation of the "
        "pixels that 3-sigma clipping keeps in both corrections (grown by 2 pixels around rejected "
        "ones), in ADU. A better dark leaves a background nearer zero and less noise.</p>"
    )
    if "guide_background.png" in figures:
        parts.append(image_html(figures["guide_background.png"], "guide frame background and noise"))
    g = guides[[c for c in _GUIDE_COLUMNS if c in guides]].copy()
    g["file"] = [Path(f).name for f in g["file"]]
    return [*parts, table_html(g, text_columns=("file", "camera", "channel", "median_kind"))]


def summary_page(
    nights: pd.DataFrame,
    table1: dict,
    figures: dict[str, Path],
    qa_links: dict[str, str],
    totals: dict[str, int] | None = None,
    max_failed_fraction: float | None = None,
) -> str:
    """The archive's page: Table 1 over every night, then one row per night (flagged rows red).

    ``totals`` counts the archive's frames (``frames``, ``duplicates``, ``ok``, ``flagged``,
    ``failed``, ``quarantined``); ``max_failed_fraction`` is the share of failed frames above
    which a night is flagged.
    """
    flagged = nights[nights["flag"] != ""]
    totals = totals or {}
    failed_rule = (
        f", or more than {100 * max_failed_fraction:.3g}% of its frames failed correction"
        if max_failed_fraction is not None
        else ", or frames failed correction"
    )
    parts = [
        f"<p>{len(nights)} nights, {int(nights['n_frames'].sum()) if len(nights) else 0} frames, "
        f"{int(nights['n_quarantined'].sum()) if len(nights) else 0} quarantined; "
        f"{len(flagged)} nights flagged.</p>",
        *_totals_html(totals),
        "<h2>Table 1 over the archive: RMSE against the real darks (ADU)</h2>",
        "<p>Pooled over every pixel of every dark of every night (squared errors summed, not RMSEs averaged); "
        "a frame that several nights hold counts once.</p>",
        table1_html(table1),
        *(image_html(p, "per-night RMSE and quarantine") for p in figures.values()),
        "<h2>Nights</h2>",
        "<p>Flagged (red): the model's dark was worse than a median dark on the night's darks, or left noisier "
        f"guide frames{_esc(failed_rule)}.</p>",
        table_html(
            nights.drop(columns=[c for c in ("guide_bg_model", "guide_bg_median") if c in nights]),
            text_columns=("night",),
            wide_columns=("flag",),
            flag_column="flag",
            links={"night": qa_links},
        ),
    ]
    return _page("deepdark: archive summary", "\n".join(parts))


def _totals_html(totals: dict[str, int]) -> list[str]:
    """The archive's frames per status, and the duplicates counted once."""
    if not totals:
        return []
    counts = ", ".join(f"{totals.get(k, 0)} {k}" for k in ("ok", "flagged", "failed", "quarantined"))
    return [
        f"<p>Frames corrected and not: {_esc(counts)}.</p>",
        f"<p>{totals.get('duplicates', 0)} duplicate frames (a frame that an earlier night also holds) "
        "counted once.</p>",
    ]
