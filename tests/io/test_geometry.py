import numpy as np
import pytest
import yaml

from deepdark.io.geometry import GeometryError, load_geometry, parse_geometry, presets
from deepdark.io.strips import channel_strips, window_of, window_strips


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


# -- layouts beyond the LAMOST guide cameras ------------------------------------------------------


def test_shipped_layouts_keep_their_digests():
    """The resolved layout of the LAMOST presets is what model cards were made with."""
    assert load_geometry("mini").digest == "f5d15d79f6b1bbbf1204c355842dbd6c0b7af01d815241b0c868dbf974080fce"
    assert load_geometry("lamost-kaf4320").digest == (
        "af3d211d092394ed5c79ef162e2670c4ebaa9d6f7fbd343b9f179d0633b7ac21"
    )


def test_presets_of_real_cameras():
    assert {"nickel-direct", "kast-blue"} <= set(presets())
    nickel = load_geometry("nickel-direct")
    assert nickel.frame_shape == (1024, 1056) and len(nickel.channels) == 1
    assert nickel.active.shape == (1024, 1023) and nickel.regions["overscan"].shape == (1024, 30)
    assert not nickel.has_ob and not nickel.has_window and not nickel.own_regions
    kast = load_geometry("kast-blue")
    assert kast.own_regions and kast.channel_names() == ["left", "right"]
    assert kast.active.shape == (350, 1023) and kast.regions["overscan"].shape == (350, 32)
    assert kast.mosaic_shape == (350, 2046)


def test_own_regions_read_each_amplifier_in_its_readout_order():
    g = load_geometry("kast-blue")
    frame = np.arange(np.prod(g.frame_shape)).reshape(g.frame_shape) % g.frame_shape[1]  # = column
    left, right = g.channels
    # The left amplifier reads its image from column 1 and its overscan from column 2048; the right
    # one, mirrored, from 2046 and from 2111: the overscan skip drops the first columns read.
    assert g.region(frame, left, "active")[0, :2].tolist() == [1, 2]
    assert g.region(frame, left, "overscan")[0, :2].tolist() == [2048, 2049]
    assert g.region(frame, right, "active")[0, :2].tolist() == [2046, 2045]
    assert g.region(frame, right, "overscan")[0, :2].tolist() == [2111, 2110]
    for ch in g.channels:  # the assembled readout block holds the same strips where the regions say
        block = g.readout(frame, ch)
        for name in ("active", "overscan"):
            np.testing.assert_array_equal(block[g.regions[name].slices], g.region(frame, ch, name))
    mosaic = g.mosaic({ch.name: g.region(frame, ch, "active") for ch in g.channels})
    np.testing.assert_array_equal(mosaic, frame[:, 1:2047])


def test_both_forms_of_one_layout_cut_the_same_strips():
    shared = load_geometry("nickel-direct")
    own = parse_geometry(
        """
name: nickel-own
frame: {rows: 1024, cols: 1056}
channels:
  - name: "1"
    flip_rows: false
    flip_cols: false
    regions:
      active:   {rows: [0, 1024], cols: [0, 1023]}
      overscan: {rows: [0, 1024], cols: [1026, 1056]}
"""
    )
    frame = np.random.default_rng(0).integers(0, 2**16, shared.frame_shape, dtype=np.uint16)
    a, b = channel_strips(frame, shared)["1"], channel_strips(frame, own)["1"]
    for name in ("a1", "a2", "a3", "active"):
        np.testing.assert_array_equal(a[name], b[name])
    assert a["a2"].shape == (1024, 0) and a["a3"].shape == (0, 1023)  # no optical black: strips without pixels
    assert own.frame_regions(own.channels[0]) == {
        k: v for k, v in shared.frame_regions(shared.channels[0]).items() if k != "invalid"
    }
    np.testing.assert_array_equal(shared.mosaic({"1": a["active"]}), own.mosaic({"1": b["active"]}))


def test_frame_regions_of_the_shared_form_follow_the_flips():
    g = load_geometry("mini")
    frame = np.arange(np.prod(g.frame_shape)).reshape(g.frame_shape)
    for ch in g.channels:
        for name, reg in g.frame_regions(ch).items():
            np.testing.assert_array_equal(
                np.sort(frame[reg.slices], axis=None), np.sort(g.region(frame, ch, name), axis=None)
            )


def test_a_geometry_without_a_window_evaluates_the_whole_active_area():
    g = load_geometry("nickel-direct")
    active = np.zeros((2, *g.active.shape))
    assert window_of(active, g).shape == active.shape and g.window == g.active
    assert g.window_shape == g.active.shape
    with pytest.raises(GeometryError, match="no model window: the learned model"):
        window_strips({"a1": active, "a2": active[..., :0], "a3": active[..., :0, :]}, g)


_OWN = """
name: two
frame: {rows: 10, cols: 40}
channels:
  - name: a
    flip_rows: false
    flip_cols: false
    regions:
      active: {rows: [0, 10], cols: [0, 15]}
      overscan: {rows: [0, 10], cols: [30, 35]}
  - name: b
    flip_rows: false
    flip_cols: true
    regions:
      active: {rows: [0, 10], cols: [15, 30]}
      overscan: {rows: [0, 10], cols: [35, 40]}
"""


@pytest.mark.parametrize(
    "text,field",
    [
        (_OWN.replace("cols: [35, 40]", "cols: [36, 40]"), r"channels\[1\].regions.overscan"),  # shapes differ
        (_OWN.replace("cols: [30, 35]", "cols: [10, 15]"), r"channels\[0\].regions.overscan"),  # overlaps its active
        (_OWN.replace("cols: [15, 30]", "cols: [14, 29]"), r"channels\[1\].regions.active"),  # overlaps a's active
        (_OWN.replace("cols: [35, 40]", "cols: [35, 41]"), r"channels\[1\].regions.overscan"),  # outside the frame
        (
            _OWN.replace("overscan: {rows: [0, 10]", "overscan: {rows: [0, 9]"),
            r"channels\[0\].regions.overscan: rows 0..9 do not pair",
        ),
        (
            _OWN.replace("overscan: {rows: [0, 10], cols: [30, 35]}", "invalid: {rows: [0, 10], cols: [30, 35]}"),
            "overscan",
        ),
        (_OWN + "regions: {active: {rows: [0, 1], cols: [0, 1]}}\n", r"channels\[0\].regions: regions are given once"),
        (_OWN.replace("    regions:", "    where:"), "regions: missing"),
    ],
)
def test_malformed_own_regions_name_the_field(text, field):
    with pytest.raises(GeometryError, match=field):
        parse_geometry(text)


def test_own_regions_parse():
    g = parse_geometry(_OWN)
    assert g.channel_shape == (10, 20) and g.active.shape == (10, 15) and g.mosaic_shape == (10, 30)


@pytest.mark.parametrize(
    "drop,field",
    [("overscan", "regions.overscan"), ("ob_rows", "both optical-black strips"), ("active", "regions.active")],
)
def test_optional_and_required_regions(drop, field):
    doc = yaml.safe_load(load_geometry("mini").source)
    del doc["regions"][drop]
    with pytest.raises(GeometryError, match=field):
        parse_geometry(yaml.safe_dump(doc))


def test_strips_and_window_are_optional():
    doc = yaml.safe_load(load_geometry("mini").source)
    for name in ("prescan", "invalid", "amplifier", "middle", "ob_cols", "ob_rows"):
        del doc["regions"][name]
    del doc["window"]
    g = parse_geometry(yaml.safe_dump(doc))
    assert not g.has_ob and not g.has_window and set(g.regions) == {"active", "overscan"}
    with pytest.raises(GeometryError, match="has no model window"):
        g.require_window("the learned model")


def test_masters_and_physics_models_depend_on_the_sensor_layout_not_the_window_nor_the_name():
    from deepdark.io.geometry import layout_mismatch, parse_geometry

    mini = load_geometry("mini")
    window = parse_geometry(mini.source.replace("window: {size: 64, offset: 2}", "window: {size: 32, offset: 4}"))
    renamed = parse_geometry(mini.source.replace("name: mini", "name: mini-copy"))
    flipped = parse_geometry(mini.source.replace("col0: 126, flip_rows: false", "col0: 126, flip_rows: true"))
    assert window.digest != mini.digest  # a model card's digest holds the window
    assert layout_mismatch(mini, window) is None and layout_mismatch(mini, renamed) is None
    assert "another layout or model window" in layout_mismatch(mini, window, window=True)  # a physics model's
    assert layout_mismatch(mini, renamed, window=True) is None
    assert "another layout" in layout_mismatch(mini, flipped)
    assert layout_mismatch(mini, load_geometry("nickel-direct")) == "geometry 'mini', the data's is 'nickel-direct'"
