import numpy as np
import pytest
import yaml

from deepdark.io.geometry import GeometryError, load_geometry, parse_geometry, presets


def test_presets_ship_spec_geometries():
    assert {"lamost-kaf4320", "mini"} <= set(presets())


def test_lamost_matches_the_contract():
    g = load_geometry("lamost-kaf4320")
    assert g.frame_shape == (2094, 2200) and g.channel_shape == (1047, 1100)
    assert g.active.shape == (1042, 1042) and g.regions["overscan"].shape == (1042, 46)
    assert (g.window.r0, g.window.r1, g.window.c0, g.window.c1) == (13, 1037, 21, 1045)
    assert g.mosaic_shape == (2084, 2084)


def test_mini_keeps_strip_widths():
    g = load_geometry("mini")
    assert g.frame_shape == (146, 252) and g.active.shape == (68, 68) and g.window_size == 64
    assert [g.regions[n].shape[1] for n in ("prescan", "invalid", "amplifier", "ob_cols")] == [3, 1, 4, 4]
    assert g.regions["overscan"].shape[1] == 46


def test_user_file_accepted(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(load_geometry("mini").source.replace("name: mini", "name: mine"))
    assert load_geometry(str(path)).name == "mine"


def test_readout_flips_put_amplifier_at_origin():
    g = load_geometry("mini")
    frame = np.arange(np.prod(g.frame_shape)).reshape(g.frame_shape)
    rows, cols = g.channel_shape
    corners = {"1": (0, 0), "2": (0, 251), "3": (145, 0), "4": (145, 251)}  # frame corners
    for ch in g.channels:
        r, c = corners[ch.name]
        assert g.readout(frame, ch)[0, 0] == frame[r, c]
        assert g.readout(frame, ch).shape == (rows, cols)


def test_mosaic_tiles_active_areas_back_in_frame_orientation():
    g = load_geometry("mini")
    frame = np.arange(np.prod(g.frame_shape)).reshape(g.frame_shape)
    actives = {ch.name: g.readout(frame, ch)[g.active.slices] for ch in g.channels}
    m = g.mosaic(actives)
    # Channel 1 is unflipped: its active area is frame rows 4..72, cols 12..80.
    np.testing.assert_array_equal(m[:68, :68], frame[4:72, 12:80])
    # Channel 4 is flipped both ways: readout rows 4..72 are frame rows 141..73.
    np.testing.assert_array_equal(m[68:, 68:], frame[146 - 72 : 146 - 4, 252 - 80 : 252 - 12])


def _mutate(path, value):
    doc = yaml.safe_load(load_geometry("mini").source)
    node = doc
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return yaml.safe_dump(doc)


@pytest.mark.parametrize(
    "path,value,field",
    [
        ("regions.overscan.cols", [70, 126], "regions.overscan"),  # overlaps active
        ("regions.overscan.cols", [80, 130], "regions.overscan"),  # outside the channel
        ("window.size", 70, "window"),  # window outside active
        ("channels.1.col0", 0, "channels"),  # channels do not tile
        ("channels.1.flip_cols", "yes", "channels[1].flip_cols"),
        ("frame.rows", -3, "frame.rows"),
    ],
)
def test_malformed_geometry_names_the_field(path, value, field):
    with pytest.raises(GeometryError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_geometry(_mutate(path, value))


def test_unknown_preset_lists_presets():
    with pytest.raises(GeometryError, match="lamost-kaf4320"):
        load_geometry("no-such-camera")
