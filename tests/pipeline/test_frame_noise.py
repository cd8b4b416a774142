"""The RICE_1 quantisation step's noise estimate: the same number as the plain numpy formula."""

from __future__ import annotations

import warnings

import numpy as np

from deepdark.pipeline.correct import frame_noise


def _numpy_frame_noise(image: np.ndarray) -> float:
    d = np.diff(np.asarray(image, dtype=np.float32)[::4], axis=1).ravel()
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2))


def test_frame_noise_is_the_numpy_formula_to_the_bit():
    """Odd and even counts of differences, ties, NaN, constant and tiny images: the same bits, so
    the quantisation step and the stored files are those of the plain formula."""
    rng = np.random.default_rng(8)
    shapes = ((1, 2), (4, 3), (9, 10), (40, 41), (64, 64))
    images = [rng.normal(300.0, 9.0, shape).astype(np.float32) for shape in shapes]
    images.append(np.round(rng.normal(0.0, 2.0, (33, 34))).astype(np.float32))
    images += [np.zeros((5, 5), np.float32), np.ones((4, 1)), np.full((3, 3), np.nan, np.float32)]
    holed = rng.normal(0.0, 1.0, (30, 30)).astype(np.float32)
    holed[4, 4] = np.nan
    images += [holed, holed.astype(np.float64)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for image in images:
            assert repr(frame_noise(image)) == repr(_numpy_frame_noise(image))
