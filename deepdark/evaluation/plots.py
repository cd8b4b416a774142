"""Figures people look at: the paper's error heat map (fig. 6) and difference histograms (figs. 7-8),
the QA's RMSE over a night, guide-frame backgrounds, and the archive's nights.

matplotlib with the non-interactive Agg backend: works on cluster nodes without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, FuncFormatter, MaxNLocator  # noqa: E402

from deepdark.io.atomic import atomic_path  # noqa: E402

HIST_CENTERS = np.arange(-100, 101)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def error_heatmap(example: dict, path: Path) -> None:
    """|prediction - truth| of one test image for every method, on a shared colour scale."""
    preds = example["preds"]
    n = len(preds) + 1
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), squeeze=False)
    truth = example["truth"]
    lo, hi = np.percentile(truth, [1, 99])
    im = axes[0, 0].imshow(truth, origin="lower", cmap="gray", vmin=lo, vmax=hi)
    axes[0, 0].set_title("real dark (ADU)")
    fig.colorbar(im, ax=axes[0, 0], fraction=0.046)
    errors = {m: np.abs(p - truth) for m, p in preds.items()}
    vmax = max(np.percentile(e, 99) for e in errors.values())
    for ax, (m, e) in zip(axes[0, 1:], errors.items()):
        im = ax.imshow(e, origin="lower", cmap="inferno", vmin=0, vmax=vmax)
        ax.set_title(f"|{m} - real|  rmse {np.sqrt(np.mean(e.astype(np.float64) ** 2)):.1f}")
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{Path(example['file']).name} channel {example['channel']} at {example['setpoint']:g} C")
    _save(fig, path)


def difference_histograms(hists, path: Path, by_group: bool) -> None:
    """Pixel differences (prediction - truth); ``by_group`` gives one panel per temperature."""
    groups = sorted({g for (_, g) in hists.counts if g != "total"}, key=float, reverse=True) if by_group else ["total"]
    methods = sorted({m for (m, _) in hists.counts})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False, sharey=True)
    for ax, g in zip(axes[0], groups):
        for m in methods:
            c = hists.counts.get((m, g))
            if c is None:
                continue
            s = hists.sums[m, g]
            # The outermost bins collect everything beyond +-100 ADU: said in the label, not drawn.
            outside = 100 * (c[0] + c[-1]) / c.sum()
            ax.step(
                HIST_CENTERS[1:-1],
                c[1:-1] / c.sum(),
                where="mid",
                label=f"{m}: mean {s[0] / s[1]:+.1f}, {100 * s[2] / s[1]:.0f}% within ±10"
                + (f", {outside:.0f}% beyond ±100" if outside >= 0.5 else ""),
            )
        ax.set_title("all test darks" if g == "total" else f"{g} C")
        ax.set_xlabel("prediction - real (ADU)")
        ax.axvspan(-10, 10, color="0.9", zorder=0)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("fraction of pixels")
    _save(fig, path)


_COLORS = {"model": "C0", "median_temp": "C1", "median_all": "C2", "floor": "0.4", "median": "C1"}


_MARKERS = {"model": "o", "median_temp": "s", "median_all": "^", "floor": "_"}


def rmse_over_night(qa: pd.DataFrame, path: Path, night: str, methods: Sequence[str]) -> None:
    d = qa[qa["imagetyp"] == "DARK"].copy()
    d["time"] = pd.to_datetime(d["date_obs"], errors="coerce")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for m in methods:
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
    _save(fig, path)


# Up to this many guide frame-channels, one labelled bar each; beyond, points in a figure of
# fixed size, so that neither memory nor drawing time grows with the night.
MAX_GUIDE_BARS = 48


def guide_background(qa: pd.DataFrame, path: Path, night: str, methods: Sequence[str]) -> None:
    """Star-free background and noise of each guide frame-channel after each correction: two
    panels, one above the other, that share the frame-channel axis (its labels drawn once)."""
    d = qa[qa["noise_model"].notna()].reset_index(drop=True)
    bars = len(d) <= MAX_GUIDE_BARS
    x = np.arange(len(d))
    width = max(8, 0.45 * len(d) + 4) if bars else 12
    fig, axes = plt.subplots(2, 1, figsize=(width, 6.4), sharex=True)
    for ax, stat, title in (
        (axes[0], "bg", "star-free background: median (ADU)"),
        (axes[1], "madstd", "star-free noise: MAD std (ADU)"),
    ):
        for k, m in enumerate(methods):
            col = f"{stat}_{m}"
            if col in d and d[col].notna().any():
                label = f"after {m} dark"
                if bars:
                    _bars(ax, x + (k - 0.5) * 0.4, d[col].to_numpy(dtype=float), 0.4, _COLORS[m], label)
                else:
                    ax.plot(x, d[col], ".", ms=3, color=_COLORS[m], label=label)
        ax.set_title(title)
        ax.axhline(0, color="k", lw=0.5)
        ax.legend(fontsize=8)
    if bars:
        labels = [f"{Path(f).name.split('.')[0]}:{c}" for f, c in zip(d["file"], d["channel"])]
        axes[1].set_xticks(x, labels, rotation=90, fontsize=6)
    else:
        axes[1].set_xlabel(f"frame-channel, in the night's order ({len(d)})")
    fig.suptitle(f"{night}: guide frames after model and median-dark correction")
    _save(fig, path)


def _bars(ax, centers: np.ndarray, heights: np.ndarray, width: float, color, label: str) -> None:
    """Bars from 0 as one collection: what ``ax.bar`` draws (NaN: no bar), without an artist per
    bar, whose making and drawing cost grew with the night's frames."""
    keep = np.isfinite(heights)
    left, top = centers[keep] - width / 2, heights[keep]
    zero = np.zeros_like(top)
    corners = [(left, zero), (left, top), (left + width, top), (left + width, zero)]
    verts = np.stack([np.stack(c, axis=1) for c in corners], axis=1)  # (bars, 4 corners, xy)
    ax.add_collection(PolyCollection(verts, facecolors=color, edgecolors="none", label=label))
    ax.autoscale_view()


def nights_summary(nights: pd.DataFrame, path: Path, methods: Sequence[str]) -> None:
    d = nights.copy()
    d["date"] = pd.to_datetime(d["night"].astype(str), format="%Y%m%d", errors="coerce")
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=[3, 1])
    for m in methods:
        col = f"rmse_{m}"
        if col in d and d[col].notna().any():
            a1.plot(d["date"], d[col], "o-", ms=3, lw=0.8, color=_COLORS[m], label=m)
    flagged = d[d["flag"] != ""]
    if len(flagged) and flagged["rmse_model"].notna().any():
        a1.scatter(
            flagged["date"],
            flagged["rmse_model"],
            s=60,
            facecolors="none",
            edgecolors="r",
            label="flagged night",
        )
    # Log scale: the model sits a few per cent above the floor while the median darks lie 2-15x
    # higher; on a linear axis the model's line hides behind the floor's.
    a1.set_yscale("log")
    # Plain numbers, not powers of ten; between decades only 2, 3 and 5 are labelled.
    a1.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    a1.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else ""))
    a1.set_ylabel("pooled RMSE of the night's darks (ADU, log scale)")
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
    _save(fig, path)
