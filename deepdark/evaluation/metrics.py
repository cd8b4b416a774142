"""The project's accuracy figures, per image and pooled per method and group.

RMSE is in ADU; pooled over a set of images it is the square root of the mean squared error
over every pixel of every image (not the mean of per-image RMSEs), as in the paper's tables:
:func:`deepdark.io.units.pooled_rmse`, the one definition, which training's validation uses too.
The noise floor of an image is the RMS of its own temporal noise (simulated archives record it).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from deepdark.io.units import pooled_rmse


def squared_error(pred: np.ndarray, truth: np.ndarray) -> tuple[float, int]:
    """Sum of squared differences (float64) and the pixel count."""
    d = (np.asarray(pred, dtype=np.float64) - np.asarray(truth, dtype=np.float64)).ravel()
    return float(d @ d), d.size


def rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    se, n = squared_error(pred, truth)
    return pooled_rmse(se, n)


class PooledRMSE:
    """Accumulates squared errors per (method, group) and pools them."""

    def __init__(self):
        self.se = defaultdict(float)
        self.n = defaultdict(int)
        self.images = defaultdict(int)

    def add_squared(self, method: str, groups: tuple[str, ...], se: float, n: int) -> None:
        for g in groups:
            self.se[method, g] += se
            self.n[method, g] += n
            self.images[method, g] += 1

    def add(self, method: str, groups: tuple[str, ...], pred: np.ndarray, truth: np.ndarray) -> float:
        """Add one image; return its own RMSE."""
        se, n = squared_error(pred, truth)
        self.add_squared(method, groups, se, n)
        return pooled_rmse(se, n)

    def table(self) -> dict[str, dict[str, float]]:
        """``{group: {method: rmse, ..., "n_images": k}}``."""
        out: dict[str, dict[str, float]] = defaultdict(dict)
        for (method, g), se in self.se.items():
            out[g][method] = pooled_rmse(se, self.n[method, g])
            out[g]["n_images"] = max(out[g].get("n_images", 0), self.images[method, g])
        return dict(out)
