"""The one place where 16-bit ADU meet the model's [0, 1] scale (paper 2.3: ADU / 65535), and the
one definition of the project's accuracy figure in ADU (:func:`pooled_rmse`).

Works on numpy arrays and torch tensors alike (only arithmetic). The RMSE is defined here, below
every layer, so that training's validation and the evaluation report the same figure.
"""

import math

SATURATED = 65535  # the largest value of a 16-bit readout: a pixel there holds no measurement
ADU_MAX = float(SATURATED)


def adu_to_unit(x):
    """ADU -> [0, 1], in float (callers choose the dtype of ``x`` first when it matters)."""
    return x / ADU_MAX


def unit_to_adu(x):
    """[0, 1] -> ADU (float, not rounded: predictions keep their sub-ADU precision)."""
    return x * ADU_MAX


def pooled_rmse(squared_error: float, pixels: int) -> float:
    """RMSE in ADU pooled over pixels: the square root of the summed squared error over the pixel
    count of a set of images (not the mean of per-image RMSEs), as in the paper's tables."""
    return math.sqrt(squared_error / pixels)
