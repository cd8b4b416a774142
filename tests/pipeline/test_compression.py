"""Storage of corrected frames: RICE_1 within its stated error, GZIP_2 and none exact, same pixels
same file, the image readable through astropy, the option on the command line."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.io import fits

from deepdark.cli import main
from deepdark.io.predictions import write_predictions
from deepdark.pipeline.correct import (
    QUANTIZE_LEVEL,
    PredictedDarks,
    _quantization,
    correct_frame,
    correct_night,
    frame_noise,
)
from deepdark.pipeline.extract import extract
from deepdark.sim.simulate import simulate_archive


@pytest.fixture(scope="module")
def night(tmp_path_factory, mini):
    """One simulated mini night (darks and guide frames) and predictions with structure: a smooth
    dark per channel, so that the removed dark is not a constant."""
    root = tmp_path_factory.mktemp("compression")
    simulate_archive(root / "archive", geometry=mini, nights=1, darks_per_temp=1, guide_per_night=2, progress=False)
    shard = extract([next((root / "archive").iterdir())], root / "night.h5", mini, progress=False).shard
    rows, cols = np.mgrid[: mini.active.shape[0], : mini.active.shape[1]]
    dark = (1000 + 0.05 * rows + 0.02 * cols + 3 * np.sin(cols / 5.0)).astype(np.float32)

    def predict(s, r):
        return np.repeat(dark[None], len(r), axis=0)

    preds = write_predictions(shard, root / "pred.h5", predict, dict(method="model"), progress=False)
    return dict(root=root, preds=preds)


def read_image(path, hdu: int):
    """Pixels and header of HDU ``hdu``, with every checksum verified (a mismatch fails)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fits.open(path, checksum=True) as hdul:
            hdul.verify("exception")
            return hdul[hdu].data.astype(np.float64), hdul[hdu].header.copy(), hdul["DARK"].data.astype(np.float64)


def write_all(night, out, file, compression):
    with PredictedDarks(night["preds"]) as preds:
        return correct_frame(
            file, preds, preds.rows_of(file), out / f"{compression}.fits", include_dark=True, compression=compression
        )


@pytest.fixture(scope="module")
def stored(night, tmp_path_factory):
    """One guide frame stored every way: {compression: (image, header, dark)}."""
    out = tmp_path_factory.mktemp("stored")
    with PredictedDarks(night["preds"]) as preds:
        guide = next(f for f in preds.table["file"] if "guide" in f)
    hdu = {"none": 0, "GZIP_2": 1, "RICE_1": 1}
    return {c: read_image(write_all(night, out, guide, c), hdu[c]) for c in hdu}


def test_lossless_storages_are_exact(stored):
    image, _, dark = stored["none"]
    np.testing.assert_array_equal(stored["GZIP_2"][0], image)
    np.testing.assert_array_equal(stored["GZIP_2"][2], dark)
    assert stored["GZIP_2"][1]["DDCOMPR"] == "GZIP_2" and "DDQSTEP" not in stored["GZIP_2"][1]


def test_rice_error_within_a_tenth_of_the_frame_noise(stored):
    exact, _, exact_dark = stored["none"]
    image, h, dark = stored["RICE_1"]
    noise, step = h["DDQNOISE"], h["DDQSTEP"]
    assert h["DDCOMPR"] == "RICE_1" and h["DDQLEVEL"] == QUANTIZE_LEVEL
    assert noise == pytest.approx(frame_noise(exact), rel=1e-6) and step == pytest.approx(noise / QUANTIZE_LEVEL)
    err = image - exact
    # dithered quantisation: uniform error of rms step/sqrt(12), never beyond half a step
    assert np.abs(err).max() <= step / 2 * (1 + 1e-5)
    assert np.sqrt(np.mean(err**2)) == pytest.approx(step / np.sqrt(12), rel=0.05)
    assert np.sqrt(np.mean(err**2)) <= 0.1 * noise
    # the dark is stored with the same step: image + dark gives the raw mosaic back as closely
    dark_err = dark - exact_dark
    assert np.abs(dark_err).max() <= step / 2 * (1 + 1e-5) and np.sqrt(np.mean(dark_err**2)) <= 0.1 * noise
    assert any("added rms" in str(line) for line in h["HISTORY"])


def test_frame_noise_is_the_pixel_noise_whatever_the_structure():
    rng = np.random.default_rng(0)
    image = rng.normal(0, 5.0, (300, 300)) + np.linspace(0, 400, 300)[None, :]  # a gradient
    image[rng.random(image.shape) < 0.01] += 5000  # hot pixels and stars
    image[::7] += 30  # row offsets
    # 1 % outliers spoil 2 % of the differences: the estimate is a few per cent high, which only
    # makes the step that much coarser (0.075 of the noise added instead of 0.072)
    assert frame_noise(image) == pytest.approx(5.0, rel=0.05)
    assert frame_noise(rng.normal(0, 5.0, (300, 300))) == pytest.approx(5.0, rel=0.02)


def test_noiseless_frame_is_stored_losslessly():
    compression, cards = _quantization(np.full((10, 10), 3.25, np.float32), "RICE_1", QUANTIZE_LEVEL)
    assert compression == "GZIP_2" and cards["DDCOMPR"][0] == "GZIP_2"
    with pytest.raises(ValueError, match="compression"):
        _quantization(np.zeros((4, 4), np.float32), "RICE", QUANTIZE_LEVEL)
    with pytest.raises(ValueError, match="quantize level"):
        _quantization(np.zeros((4, 4), np.float32), "RICE_1", 0)


def test_same_frame_same_pixels(night, tmp_path):
    """The dither seed comes from the pixels, not the clock: reruns give the same file content."""
    with PredictedDarks(night["preds"]) as preds:
        f = preds.table["file"].iloc[0]
    a = write_all(night, tmp_path / "a", f, "RICE_1")
    b = write_all(night, tmp_path / "b", f, "RICE_1")
    with fits.open(a) as ha, fits.open(b) as hb:
        np.testing.assert_array_equal(ha[1].data, hb[1].data)
        with fits.open(a, disable_image_compression=True) as ta, fits.open(b, disable_image_compression=True) as tb:
            assert ta[1].header["ZQUANTIZ"] == "SUBTRACTIVE_DITHER_2"
            assert ta[1].header["ZDITHER0"] == tb[1].header["ZDITHER0"]
            np.testing.assert_array_equal(ta[1].data["COMPRESSED_DATA"][0], tb[1].data["COMPRESSED_DATA"][0])


def test_cli_compression_option(night, tmp_path):
    for compression, image_hdu in (("none", 0), ("GZIP_2", 1)):
        out = tmp_path / compression
        assert main(["-q", "correct", str(night["preds"]), "--out", str(out), "--compression", compression]) == 0
        for f in out.glob("*.fits"):
            with fits.open(f) as hdul:
                assert hdul[image_hdu].header["DDCOMPR"] == compression and hdul[image_hdu].data.ndim == 2
    res = correct_night(night["preds"], tmp_path / "default", progress=False)
    assert res.n_ok > 0
    for f in (tmp_path / "default").glob("*.fits"):
        with fits.open(f) as hdul:
            assert isinstance(hdul[1], fits.CompImageHDU) and hdul[1].header["DDCOMPR"] == "RICE_1"
    assert main(["-q", "correct", str(night["preds"]), "--out", str(tmp_path / "x"), "--quantize-level", "0"]) == 2
