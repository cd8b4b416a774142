import gzip

import numpy as np
import pytest
from astropy.io import fits

from deepdark.io.frames import FrameError, Keywords, read_frame, write_raw_frame
from tests.conftest import header, random_frame


def test_round_trip_uint16_and_header(tmp_path, mini):
    data = random_frame(mini, 1)
    data[0, 0], data[1, 1] = 0, 65535
    write_raw_frame(tmp_path / "f.fits", data, header(ccdtemp=-14.6))
    h = fits.getheader(tmp_path / "f.fits")
    assert h["BITPIX"] == 16 and h["BZERO"] == 32768
    fr = read_frame(tmp_path / "f.fits", mini)
    assert fr.data.dtype == np.uint16
    np.testing.assert_array_equal(fr.data, data)
    assert (fr.info.imagetyp, fr.info.exptime, fr.info.ccdtemp, fr.info.settemp) == ("DARK", 30.0, -14.6, -15.0)
    with fits.open(tmp_path / "f.fits") as hdul:  # our fast decoder agrees with astropy's
        np.testing.assert_array_equal(hdul[0].data, fr.data)


def test_gzip_and_fit_suffixes(tmp_path, mini):
    data = random_frame(mini, 2)
    write_raw_frame(tmp_path / "a.fits.gz", data, header())
    write_raw_frame(tmp_path / "b.fit", data, header())
    with gzip.open(tmp_path / "a.fits.gz") as f:
        assert f.read(6) == b"SIMPLE"
    for name in ("a.fits.gz", "b.fit"):
        np.testing.assert_array_equal(read_frame(tmp_path / name, mini).data, data)


def test_signed_int16_without_bzero_is_read_through_astropy(tmp_path, mini):
    data = random_frame(mini, 3).astype(np.int16)
    fits.PrimaryHDU(data, header=fits.Header(header())).writeto(tmp_path / "s.fits")
    np.testing.assert_array_equal(read_frame(tmp_path / "s.fits", mini).data, data.astype(np.uint16))


def test_configurable_keywords(tmp_path, mini):
    h = header()
    h["TEMP"] = h.pop("CCDTEMP")
    write_raw_frame(tmp_path / "k.fits", random_frame(mini, 4), h)
    with pytest.raises(FrameError, match="CCDTEMP missing"):
        read_frame(tmp_path / "k.fits", mini)
    assert read_frame(tmp_path / "k.fits", mini, Keywords(ccdtemp="TEMP")).info.ccdtemp == -15.2


def _bad_files(tmp_path, mini):
    good = random_frame(mini, 5)
    write_raw_frame(tmp_path / "good.fits", good, header())
    raw = (tmp_path / "good.fits").read_bytes()
    (tmp_path / "empty.fits").write_bytes(b"")
    (tmp_path / "truncated.fits").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.fits").write_text("this is not a FITS file\n" * 200)
    write_raw_frame(tmp_path / "shape.fits", good[:, :200].copy(), header())
    fits.PrimaryHDU(good.astype(np.float32), header=fits.Header(header())).writeto(tmp_path / "float.fits")
    write_raw_frame(tmp_path / "noexp.fits", good, header(exptime=None))
    write_raw_frame(tmp_path / "negexp.fits", good, header(exptime=-1.0))
    write_raw_frame(tmp_path / "temp.fits", good, header(ccdtemp="warm"))
    write_raw_frame(tmp_path / "date.fits", good, header(date="yesterday"))
    write_raw_frame(tmp_path / "sat.fits", np.full_like(good, 65535), header())
    (tmp_path / "badgz.fits.gz").write_bytes(gzip.compress(raw)[:300])
    fits.HDUList([fits.PrimaryHDU(header=fits.Header(header())), fits.ImageHDU(good)]).writeto(tmp_path / "ext.fits")
    write_raw_frame(tmp_path / "numdate.fits", good, header(date=20240101))
    return {
        "empty.fits": "empty file",
        "truncated.fits": "truncated",
        "text.fits": "not a FITS file",
        "shape.fits": "does not match geometry",
        "float.fits": "not integer ADU",
        "noexp.fits": "EXPTIME missing",
        "negexp.fits": "EXPTIME=-1.0 must be > 0",
        "temp.fits": "CCDTEMP='warm' is not a number",
        "date.fits": "not an ISO-8601 date",
        "sat.fits": "saturated",
        "badgz.fits.gz": "corrupt gzip",
        "ext.fits": "no image in the primary HDU (NAXIS = 0) nor a tile-compressed one in HDU 1",
        "numdate.fits": "DATE-OBS=20240101 is not text",
    }


def test_each_bad_file_raises_frame_error_with_path_and_reason(tmp_path, mini):
    for name, reason in _bad_files(tmp_path, mini).items():
        with pytest.raises(FrameError) as exc:
            read_frame(tmp_path / name, mini)
        assert str(tmp_path / name) in str(exc.value) and reason in exc.value.reason, (name, exc.value.reason)


def test_unreadable_file(tmp_path, mini):
    with pytest.raises(FrameError, match="cannot read"):
        read_frame(tmp_path / "missing.fits", mini)


def test_a_repeated_card_and_a_byte_outside_ascii_are_read(tmp_path, mini):
    """Both are against the FITS standard and common in archives; neither makes a frame unusable:
    a repeated keyword is read from its first card, as astropy reads it. (A byte outside ASCII in
    a card deepdark needs makes that card's value refused.)"""
    h = fits.Header(header())
    h.append(("EXPTIME", 60.0), bottom=True)
    h["OBSERVER"] = "PLACEHOLDER"
    write_raw_frame(tmp_path / "odd.fits", random_frame(mini, 6), h)
    data = bytearray((tmp_path / "odd.fits").read_bytes())
    at = data.index(b"PLACEHOLDER")
    data[at : at + 11] = "Müller".ljust(11).encode("latin-1")
    (tmp_path / "odd.fits").write_bytes(bytes(data))
    frame = read_frame(tmp_path / "odd.fits", mini)
    assert frame.info.exptime == 30.0 and frame.header.count("OBSERVER") == 1
