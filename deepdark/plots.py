"""Figures people look at: the paper's error heat map (fig. 6) and difference histograms (figs. 7-8).

matplotlib with the non-interactive Agg backend: works on cluster nodes without a display.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .atomic import atomic_path  # noqa: E402

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
            ax.step(HIST_CENTERS[1:-1], c[1:-1] / c.sum(), where="mid",
                    label=f"{m}: mean {s[0] / s[1]:+.1f}, {100 * s[2] / s[1]:.0f}% within ±10"
                          + (f", {outside:.0f}% beyond ±100" if outside >= 0.5 else ""))
        ax.set_title("all test darks" if g == "total" else f"{g} C")
        ax.set_xlabel("prediction - real (ADU)")
        ax.axvspan(-10, 10, color="0.9", zorder=0)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("fraction of pixels")
    _save(fig, path)
