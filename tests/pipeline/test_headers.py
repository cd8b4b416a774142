"""Headers of corrected frames: raw-layout cards out of the way, each tile's raw section stated, and
a WCS that gives the same sky position for the same pixel where the rule says it is exact."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from deepdark.io.frames import write_raw_frame
from deepdark.io.geometry import load_geometry, presets
from deepdark.pipeline.correct import correct_night, mosaic_header, mosaic_tiles
from tests.conftest import header, random_frame
from tests.pipeline.test_correct_faults import DARK_LEVEL, predictions_of

# astropy.wcs notes that it derives MJD-OBS from DATE-OBS: nothing to do with the test
pytestmark = pytest.mark.filterwarnings("ignore::astropy.wcs.FITSFixedWarning")

RAW_LAYOUT = {
    "DATASEC": "[13:80,5:72]",
    "BIASSEC": "[81:126,5:72]",
    "TRIMSEC": "[13:80,5:72]",
    "CCDSEC": "[1:252,1:146]",
    "DETSEC": "[1:252,1:146]",
    "DATASEC2": "[173:240,5:72]",
    "LTV1": -12.0,
    "LTM1_1": 1.0,
}


def tan_wcs(crpix: tuple[float, float], letter: str = "") -> dict:
    """A TAN WCS of 1 arcsec pixels, rotated 30 degrees, reference pixel ``crpix`` (x, y; 1-based)."""
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    scale = 1 / 3600
    return {
        f"CTYPE1{letter}": "RA---TAN",
        f"CTYPE2{letter}": "DEC--TAN",
        f"CRPIX1{letter}": crpix[0],
        f"CRPIX2{letter}": crpix[1],
        f"CRVAL1{letter}": 150.0,
        f"CRVAL2{letter}": 2.5,
        f"CD1_1{letter}": -scale * c,
        f"CD1_2{letter}": scale * s,
        f"CD2_1{letter}": scale * s,
        f"CD2_2{letter}": scale * c,
        f"CUNIT1{letter}": "deg",
        f"CUNIT2{letter}": "deg",
    }


def index_mosaic(g):
    frame = np.arange(np.prod(g.frame_shape)).reshape(g.frame_shape)
    return frame, g.mosaic({ch.name: g.readout(frame, ch)[g.active.slices] for ch in g.channels})


@pytest.mark.parametrize("name", presets())
def test_every_tile_is_its_raw_section_shifted(name):
    g = load_geometry(name)
    frame, mosaic = index_mosaic(g)
    tiles = mosaic_tiles(g)
    assert [t.channel for t in tiles] == g.channel_names()
    for t in tiles:
        (r0, c0), (m0, n0), (h, w) = t.raw, t.mosaic, t.shape
        np.testing.assert_array_equal(mosaic[m0 : m0 + h, n0 : n0 + w], frame[r0 : r0 + h, c0 : c0 + w])


def test_flipped_channel_tile_is_frame_oriented(mini):
    """Channel 2 is read out with its columns flipped; its tile is still its raw section, shifted."""
    tiles = mosaic_tiles(mini)
    assert tiles[1].section("raw") == "[173:240,5:72]" and tiles[1].section("mosaic") == "[69:136,1:68]"


def test_kaf4320_tiles_differ_by_the_cut_strips():
    """The docstring's figures: the WCS is off by up to 92 columns and 2 rows outside its tile."""
    tiles = mosaic_tiles(load_geometry("lamost-kaf4320"))
    assert [t.shift for t in tiles] == [(4, 12), (4, 104), (6, 12), (6, 104)]


def test_raw_layout_cards_move_to_history(mini):
    h = fits.Header({**header(), **RAW_LAYOUT})
    out = mosaic_header(h, mini)
    assert not set(RAW_LAYOUT) & set(out)
    history = "\n".join(str(v) for v in out["HISTORY"])
    assert "DATASEC = '[13:80,5:72]'" in history and "DATASEC2= '[173:240,5:72]'" in history
    assert "LTV1" in history
    assert out["IMAGETYP"] == "DARK" and out["EXPTIME"] == 30.0  # the observation stays
    for i, t in enumerate(mosaic_tiles(mini), start=1):
        assert out[f"DDMSEC{i}"] == t.section("mosaic") and out[f"DDRSEC{i}"] == t.section("raw")
    assert "DDWCSCH" not in out and "CRPIX1" not in out  # no WCS, none made up
    assert "DATASEC" in h  # the input is left as it was


@pytest.mark.parametrize("crpix, channel", [((200.0, 100.0), "4"), ((40.5, 30.5), "1"), ((126.5, 73.5), "1")])
def test_reference_channel_holds_or_is_nearest_to_the_reference_pixel(mini, crpix, channel):
    out = mosaic_header(fits.Header(tan_wcs(crpix)), mini)
    assert out["DDWCSCH"] == channel  # the frame centre is equally near to all: the first channel


def test_unshiftable_wcs_goes_to_history(mini):
    wcs = {**tan_wcs((30.0, 40.0)), "CRPIX1": "thirty"}
    out = mosaic_header(fits.Header({**wcs, **tan_wcs((30.0, 40.0), "A")}), mini)
    assert not any(k in out for k in ("CTYPE1", "CRPIX1", "CD1_1", "CRVAL2"))
    assert out["CRPIX1A"] == 30.0 - 12 and out["CRPIX2A"] == 40.0 - 4  # the alternate WCS is kept, shifted
    assert any("CRPIX is not a number" in str(v) for v in out["HISTORY"])


def write_wcs_night(folder, mini, crpix):
    cards = {**header("OBJECT"), **RAW_LAYOUT, **tan_wcs(crpix), **tan_wcs((60.0, 20.0), "A")}
    for i in range(2):
        write_raw_frame(folder / f"GS1_object_{i:04d}.fits", random_frame(mini, 40 + i), cards)


def test_sky_of_a_pixel_is_kept_in_the_reference_tile(mini, tmp_path):
    """A raw frame with a TAN WCS whose reference pixel lies in channel 3 (read out with its rows
    flipped): in channel 3's tile every pixel has the sky position of its raw pixel, as does the
    alternate WCS; the corrected pixels are the raw ones; elsewhere the WCS is off by the tiles'
    shift difference, as the header says."""
    folder = tmp_path / "night"
    write_wcs_night(folder, mini, (50.0, 100.0))
    pred = predictions_of(folder, tmp_path / "pred.h5", mini)
    correct_night(pred, tmp_path / "out", compression="none", progress=False)
    raw = folder / "GS1_object_0000.fits"
    with fits.open(raw) as r, fits.open(tmp_path / "out" / raw.name) as c:
        raw_data, raw_wcs, raw_a = r[0].data.astype(float), WCS(r[0].header), WCS(r[0].header, key="A")
        image, h = c[0].data.astype(float), c[0].header
    tiles = {t.channel: t for t in mosaic_tiles(mini)}
    ref = tiles["3"]
    assert h["DDWCSCH"] == "3" and h["DDWCSSEC"] == ref.section("mosaic")
    (m0, n0), (rows, cols), (dr, dc) = ref.mosaic, ref.shape, ref.shift
    y, x = np.mgrid[m0 : m0 + rows, n0 : n0 + cols]
    np.testing.assert_array_equal(image[y, x], raw_data[y + dr, x + dc] - DARK_LEVEL)
    for key, raw_w in ((" ", raw_wcs), ("A", raw_a)):
        sky = WCS(h, key=key).pixel_to_world_values(x, y)  # 0-based pixels
        want = raw_w.pixel_to_world_values(x + dc, y + dr)
        np.testing.assert_allclose(sky, want, rtol=0, atol=1e-10)
    # elsewhere a pixel's true raw pixel is shifted by its own tile: in channel 2's, 92 columns and
    # -2 rows away from where the WCS puts it (1 arcsec pixels)
    other = tiles["2"]
    (m0, n0), (odr, odc) = other.mosaic, other.shift
    ra, dec = WCS(h).pixel_to_world_values(n0 + 5, m0 + 5)
    true_ra, true_dec = raw_wcs.pixel_to_world_values(n0 + 5 + odc, m0 + 5 + odr)
    separation = np.hypot((ra - true_ra) * np.cos(np.radians(dec)), dec - true_dec) * 3600
    assert separation == pytest.approx(np.hypot(odc - dc, odr - dr), abs=0.01) and odc - dc == 92
    assert not set(RAW_LAYOUT) & set(h)
    assert any("exact in channel 3" in str(v) for v in h["HISTORY"])


NONSTANDARD_CARDS = (
    "FOCUS   =                  NaN",  # astropy reads NaN, FITS has no such number
    "FOCUS2  =                1.0.0",
    "OBJECT  = 'a\tb'",  # a tab in a string
    "focus3  =                  1.0",  # a lowercase keyword
    "FOC&US  =                  1.0",  # an illegal keyword
    "OBSERVER= 'M\xfcller'",  # a byte outside ASCII (Latin-1)
)


def test_raw_cards_that_are_not_fits_standard_are_kept_as_history_and_the_frame_written(mini, tmp_path):
    """astropy reads such cards but refuses to write them: the frame is corrected all the same."""
    folder = tmp_path / "night"
    write_raw_frame(
        folder / "GS1_object_0000.fits",
        random_frame(mini, 1),
        header("OBJECT", **{f"PLACE{i}": "x" for i in range(len(NONSTANDARD_CARDS))}),
    )
    raw = folder / "GS1_object_0000.fits"
    data = bytearray(raw.read_bytes())
    for i, card in enumerate(NONSTANDARD_CARDS):
        at = data.index(f"PLACE{i}  =".encode())
        data[at : at + 80] = card.ljust(80).encode("latin-1")
    raw.write_bytes(bytes(data))
    pred = predictions_of(folder, tmp_path / "pred.h5", mini)
    correct_night(pred, tmp_path / "out", compression="none", progress=False)
    with fits.open(tmp_path / "out" / raw.name, checksum=True) as c:
        c.verify("exception")
        history = [str(v) for v in c[0].header["HISTORY"]]
        assert "FOCUS" not in c[0].header and "FOC&US" not in c[0].header
    kept = [" ".join(card.replace("\t", "\\t").replace("\xfc", "\\xfc").split()) for card in NONSTANDARD_CARDS]
    assert [line for line in history if "not FITS standard" in line] == [
        f"deepdark: raw card not FITS standard: {card}" for card in kept
    ]
