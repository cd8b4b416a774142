"""Dark-corrected frames on the `mini` geometry: pixels, orientation, header, checksums, failures."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from deepdark.io.frames import read_frame
from deepdark.io.masters import Masters
from deepdark.io.predictions import write_predictions
from deepdark.io.shards import Shard
from deepdark.io.tables import frame_setpoints
from deepdark.pipeline.baseline import build_masters
from deepdark.pipeline.correct import (
    CorrectionError,
    PredictedDarks,
    correct_frame,
    correct_night,
    output_name,
    read_manifest,
)
from deepdark.pipeline.extract import extract
from deepdark.sim.simulate import simulate_archive

OFFSET = 0.25  # the test "model" is the per-temperature master plus this, so it differs from it


@pytest.fixture(scope="module")
def night(tmp_path_factory, mini):
    """A mini library (masters), one archive night (darks + guide frames) and its predictions."""
    root = tmp_path_factory.mktemp("correct")
    simulate_archive(
        root / "library",
        geometry=mini,
        nights=2,
        darks_per_temp=2,
        guide_per_night=0,
        first_night="20230101",
        progress=False,
    )
    simulate_archive(
        root / "archive",
        geometry=mini,
        nights=1,
        darks_per_temp=1,
        guide_per_night=2,
        first_night="20240101",
        progress=False,
    )
    lib = [
        extract([p], root / f"lib_{p.name}.h5", mini, progress=False).shard
        for p in sorted((root / "library").iterdir())
    ]
    masters = build_masters(lib, root / "masters.h5", progress=False)
    shard = extract([root / "archive" / "20240101"], root / "20240101.h5", mini, progress=False).shard
    m = Masters(masters)

    def predict(s, rows):
        t = s.table.iloc[rows]
        sps = frame_setpoints(t, m.setpoints)
        return np.stack(
            [m.lookup("temp", r.camera, r.channel, r.exptime, sp) + OFFSET for r, sp in zip(t.itertuples(), sps)]
        )

    preds = write_predictions(
        shard,
        root / "pred.h5",
        predict,
        dict(method="model", model_name="test-model", model_hash="f" * 64),
        progress=False,
    )
    return dict(root=root, shard=shard, preds=preds, masters=masters)


def expected_mosaic(raw: np.ndarray, dark_readout: dict, g) -> np.ndarray:
    """The corrected mosaic written out by hand from the contract's table (no Geometry.mosaic)."""
    a = g.active
    ar, ac = a.shape
    R, C = g.channel_shape
    out = np.zeros((2 * ar, 2 * ac), np.float32)
    for ch in g.channels:
        # the active area in frame coordinates: readout rows/cols mirrored when the channel is flipped
        rows = np.arange(a.r0, a.r1)
        cols = np.arange(a.c0, a.c1)
        frows = ch.row0 + (R - 1 - rows if ch.flip_rows else rows)
        fcols = ch.col0 + (C - 1 - cols if ch.flip_cols else cols)
        # indexed like the readout arrays; sorting by frame coordinate gives frame orientation
        order_r, order_c = np.argsort(frows), np.argsort(fcols)
        block = raw[np.ix_(frows, fcols)].astype(np.float32)[order_r][:, order_c]
        d = np.asarray(dark_readout[ch.name], np.float32)[order_r][:, order_c]
        i, j = ch.row0 // R, ch.col0 // C
        out[i * ar : (i + 1) * ar, j * ac : (j + 1) * ac] = block - d
    return out


@pytest.mark.parametrize("compression, image_hdu", [("none", 0), ("GZIP_2", 1)])
def test_corrected_frame_pixels_header_checksum(night, mini, tmp_path, compression, image_hdu):
    """The lossless storages give the corrected arithmetic exactly (RICE_1: test_compression)."""
    with PredictedDarks(night["preds"]) as preds:
        guide = next(f for f in preds.table["file"] if "guide" in f)
        rows = preds.rows_of(guide)
        out = correct_frame(guide, preds, rows, tmp_path / "g.fits", include_dark=True, compression=compression)
        darks = preds.dark(rows)
        channels = list(preds.table["channel"].iloc[rows])
    raw = read_frame(guide, mini)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checksum mismatch is a warning in astropy
        hdul = fits.open(out, checksum=True)
    with hdul:
        hdul.verify("exception")
        data = hdul[image_hdu].data
        h = hdul[image_hdu].header
        assert data.dtype.kind == "f" and data.dtype.itemsize == 4 and data.shape == (136, 136) == mini.mosaic_shape
        assert h["BITPIX"] == -32 and "BZERO" not in h and "BSCALE" not in h
        assert h["DDCOMPR"] == compression
        if compression == "none":
            assert "CHECKSUM" in h and "DATASUM" in h and "CHECKSUM" in hdul[1].header
        else:
            # the checksums of a compressed image are those of the table that holds it
            with fits.open(out, disable_image_compression=True) as tables:
                assert all("CHECKSUM" in hdu.header and "DATASUM" in hdu.header for hdu in tables)
            assert hdul[0].data is None and isinstance(hdul[1], fits.CompImageHDU)
            assert isinstance(hdul["DARK"], fits.CompImageHDU)
            np.testing.assert_array_equal(fits.getdata(out), data)  # astropy finds the image
        want = expected_mosaic(raw.data, dict(zip(channels, darks)), mini)
        np.testing.assert_array_equal(data, want)
        # original header kept, provenance added
        for key in ("IMAGETYP", "EXPTIME", "CCDTEMP", "DATE-OBS", "CAMERA"):
            assert h[key] == raw.header[key]
        assert h["DDMETHOD"] == "model" and h["DDMODEL"] == "test-model" and h["DDMHASH"] == "f" * 64
        assert h["DDSRCHSH"] == raw.hash and h["DDSRC"] == Path(guide).name
        assert h["DDVERS"].startswith("deepdark ") and h["DDDATE"] and h["DDNIGHT"] == "20240101"
        assert any("xxh3-128" in str(c) for c in h["HISTORY"])
        # the dark extension is the removed dark, in the same orientation
        raw_mosaic = expected_mosaic(raw.data, {c: np.zeros(mini.active.shape) for c in channels}, mini)
        np.testing.assert_allclose(hdul["DARK"].data + data, raw_mosaic, rtol=0, atol=1e-3)
        np.testing.assert_allclose(hdul["DARK"].data, mini.mosaic(dict(zip(channels, darks))))


@pytest.mark.parametrize("compression, image_hdu", [("none", 0), ("RICE_1", 1)])
def test_corrected_checksum_detects_tampering(night, tmp_path, compression, image_hdu):
    with PredictedDarks(night["preds"]) as preds:
        f = preds.table["file"].iloc[0]
        out = correct_frame(f, preds, preds.rows_of(f), tmp_path / "a.fits", compression=compression)
    blob = bytearray(out.read_bytes())
    blob[-100] ^= 0xFF  # flip a data byte
    bad = tmp_path / "bad.fits"
    bad.write_bytes(bytes(blob))
    with pytest.warns(Warning, match="[Cc]hecksum"), fits.open(bad, checksum=True) as hdul:
        hdul[image_hdu].data.sum()


def test_changed_raw_file_is_refused_and_night_goes_on(night, tmp_path):
    night_dir = tmp_path / "archive" / "20240101"
    shutil.copytree(night["root"] / "archive" / "20240101", night_dir)
    # predictions that point at the copies: rewrite the table's paths
    with Shard(night["shard"]) as s:
        files = list(dict.fromkeys(s.table["file"]))
    pred = tmp_path / "pred.h5"
    shutil.copyfile(night["preds"], pred)
    import h5py

    with h5py.File(pred, "r+") as f:
        paths = [p.decode() if isinstance(p, bytes) else p for p in f["table/file"][()]]
        del f["table/file"]
        f["table"].create_dataset(
            "file", data=np.array([str(night_dir / p.split("/")[-1]) for p in paths], dtype=h5py.string_dtype())
        )
    victim = night_dir / files[1].split("/")[-1]
    data = bytearray(victim.read_bytes())
    data[-10] ^= 1
    victim.write_bytes(bytes(data))
    res = correct_night(pred, tmp_path / "out", progress=False)
    assert res.n_failed == 1 and res.n_ok == len(files) - 1
    man = read_manifest(tmp_path / "out")
    bad = man[man["status"] == "failed"]
    assert list(bad["file"]) == [str(victim)] and "changed since extraction" in bad["reason"].iloc[0]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.fits")) == sorted(
        output_name(f) for f in man.loc[man["status"] == "ok", "file"]
    )
    assert not list((tmp_path / "out").glob(".*partial"))
    with PredictedDarks(pred) as preds, pytest.raises(CorrectionError, match="changed since extraction"):
        correct_frame(victim, preds, preds.rows_of(str(victim)), tmp_path / "x.fits")


def test_median_method_and_camera_filter(night, tmp_path):
    res = correct_night(
        night["shard"], tmp_path / "median", method="median_temp", masters=night["masters"], progress=False
    )
    assert res.n_failed == 0 and res.n_ok > 0
    f = next((tmp_path / "median").glob("*.fits"))
    with fits.open(f) as h:  # RICE_1 by default: the image and its header in HDU 1
        assert h[1].header["DDMETHOD"] == "median_temp" and h[1].header["DDMODEL"] == "none"
    res = correct_night(night["preds"], tmp_path / "none", cameras=["GS9"], progress=False)
    assert res.n_ok == 0 and res.n_skipped > 0 and not list((tmp_path / "none").glob("*.fits"))
    with pytest.raises(ValueError, match="masters"):
        correct_night(night["shard"], tmp_path / "x", method="median_all", progress=False)


def test_output_names():
    assert output_name("/a/GS1_guide_0001.fits.gz") == "GS1_guide_0001.fits"
    assert output_name("x.FIT") == "x.fits"
    assert output_name("x.fits") == "x.fits"


def test_manifest_lists_every_frame(night, tmp_path):
    res = correct_night(night["preds"], tmp_path / "c", progress=False)
    man = pd.read_csv(res.manifest, dtype=str, keep_default_na=False)
    with Shard(night["shard"]) as s:
        assert set(man["file"]) == set(s.table["file"])
    assert (man["status"] == "ok").all()


def test_output_names_of_a_night_never_clash():
    """In the order a night's files may come: every frame its own corrected file."""
    from deepdark.pipeline.correct import _free_output_name

    taken: dict[str, str] = {}
    for raw in ("a.fits.gz", "a.fits.fits", "a.fits", "a.FITS", "a.fits.2.fits", "a.fz"):
        name = _free_output_name(f"/night/{raw}", taken)
        assert name not in taken and name.endswith(".fits")
        taken[name] = raw
    assert taken == {
        "a.fits": "a.fits.gz",
        "a.fits.fits": "a.fits.fits",
        "a.fits.2.fits": "a.fits",
        "a.FITS.fits": "a.FITS",
        "a.fits.2.fits.fits": "a.fits.2.fits",
        "a.fz.fits": "a.fz",
    }
