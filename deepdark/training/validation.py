"""Validation: the generator's error on the held-out nights, and physics alone's on the same pixels.

Validation is run on whole windows, or, when ``crop`` is set, on the centre c x c crop of each
window (cropped from the whole-window input, as ``crop_mode="window"``); the card and the log
say which. Errors are pooled over pixels (:func:`deepdark.io.units.pooled_rmse`, the definition
the evaluation uses too). :func:`validation_errors` keeps them per sample, with physics alone's
for a physics-mode model, for the choice of where the network is used
(``deepdark.model.selection``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from deepdark.io.units import pooled_rmse, unit_to_adu
from deepdark.model import conditioning as C
from deepdark.model.nets import Generator
from deepdark.model.runtime import autocast
from deepdark.training.data import SampleSource


def spread(indices: np.ndarray, k: int | None) -> np.ndarray:
    """At most ``k`` of ``indices``, evenly spread over them (every camera and group of the
    validation nights keeps its share, where the first k would be the first frames only)."""
    indices = np.asarray(indices)
    if k is None or k >= len(indices):
        return indices
    if k <= 0:
        return indices[:0]
    return indices[np.unique(np.linspace(0, len(indices) - 1, k).round().astype(int))]


@torch.no_grad()
def validation_errors(
    G: Generator,
    source: SampleSource,
    indices: Sequence[int],
    size: int,
    crop: int | None,
    batch_size: int,
    device: torch.device,
    residual_range_adu: float | None = None,
) -> pd.DataFrame:
    """Per validation sample: ``se_network`` (the generator in eval mode), ``se_physics`` (physics
    alone, physics-mode only, else NaN), both sums of squared errors in ADU^2, and ``n`` pixels;
    the index is the library table's row."""
    was = G.training
    G.eval()
    c = crop if crop and crop < size else None
    corner = ((size - c) // 2,) * 2 if c else None
    rows: list[tuple[float, float, int]] = []
    try:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            corners = [corner] * len(chunk) if c else None
            if residual_range_adu is None:
                x, y = source.batch(chunk, size, c, corners, "window", device)
                with autocast(device):
                    pred = G(x)
                base = None
            else:
                x, y, base = source.batch(chunk, size, c, corners, "window", device, return_base=True)
                with autocast(device):
                    pred = C.compose(G(x), base, residual_range_adu)
            truth = unit_to_adu(y.double())
            se_net = ((unit_to_adu(pred.float().double()) - truth) ** 2).flatten(1).sum(1)
            se_phys = ((unit_to_adu(base.double()) - truth) ** 2).flatten(1).sum(1) if base is not None else None
            for k in range(len(chunk)):
                phys = float("nan") if se_phys is None else float(se_phys[k])
                rows.append((float(se_net[k]), phys, int(y[k].numel())))
    finally:
        G.train(was)
    return pd.DataFrame(rows, columns=["se_network", "se_physics", "n"], index=np.asarray(indices, dtype=int))


def validate(
    G: Generator,
    source: SampleSource,
    indices: Sequence[int],
    size: int,
    crop: int | None,
    batch_size: int,
    device: torch.device,
    residual_range_adu: float | None = None,
) -> float:
    """Pooled RMSE (ADU) of the generator (eval mode) on whole windows or their centre crop."""
    if not len(indices):
        return float("nan")
    err = validation_errors(G, source, indices, size, crop, batch_size, device, residual_range_adu)
    return pooled_rmse(float(err["se_network"].sum()), int(err["n"].sum()))
