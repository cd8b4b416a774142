"""Model cards: required hashes, type-checked fields, geometry identified by its content."""

import json

import pytest

from deepdark.io.geometry import parse_geometry
from deepdark.model.files import CARD_FILE, ModelError, load_model, read_card, save_model
from deepdark.model.nets import PRESETS, Generator


@pytest.fixture
def model_dir(tmp_path, mini):
    return save_model(
        tmp_path / "m", Generator(PRESETS["compact"], seed=0), preset="compact", loss={"name": "l1"}, geometry=mini
    )


def _edit_card(model_dir, edit):
    path = model_dir / CARD_FILE
    card = json.loads(path.read_text())
    edit(card)
    path.write_text(json.dumps(card))


def test_a_saved_model_loads_and_records_the_geometry_digest(model_dir, mini):
    card = read_card(model_dir)
    assert card["geometry"]["sha256"] == mini.digest
    load_model(model_dir, geometry=mini)


def test_a_card_without_the_weights_hash_is_refused(model_dir):
    _edit_card(model_dir, lambda c: c["weights"].pop("sha256"))
    with pytest.raises(ModelError, match="weights.sha256"):
        load_model(model_dir)


@pytest.mark.parametrize(
    ("key", "value"),
    [("inputs", "a1"), ("geometry.window_size", "64"), ("weights.sha256", 12), ("architecture", [])],
)
def test_card_fields_of_the_wrong_type_give_one_line_errors(model_dir, key, value):
    def edit(card):
        *parents, last = key.split(".")
        node = card
        for p in parents:
            node = node[p]
        node[last] = value

    _edit_card(model_dir, edit)
    with pytest.raises(ModelError) as err:
        load_model(model_dir)
    assert key in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("field", "value"), [("width", "16"), ("width", 16.0), ("n_blocks", True), ("norm", "layer")])
def test_a_generator_field_of_the_wrong_type_or_value_names_the_card(model_dir, field, value):
    _edit_card(model_dir, lambda c: c["architecture"]["generator"].update({field: value}))
    with pytest.raises(ModelError) as err:
        load_model(model_dir)
    assert str(model_dir / CARD_FILE) in str(err.value) and field in str(err.value) and "\n" not in str(err.value)


def test_an_edited_geometry_that_kept_its_name_is_refused(model_dir, mini):
    # Same name and window, the channels' flips swapped: only the content digest tells them apart.
    swapped = mini.source.replace("flip_cols: false}", "flip_cols: TMP}").replace(
        "flip_cols: true}", "flip_cols: false}"
    )
    moved = parse_geometry(swapped.replace("flip_cols: TMP}", "flip_cols: true}"), origin="edited")
    assert moved.name == mini.name and moved.digest != mini.digest
    with pytest.raises(ModelError, match="content digest"):
        load_model(model_dir, geometry=moved)


def test_the_digest_ignores_comments_and_key_order(mini):
    assert parse_geometry("# a comment\n" + mini.source, origin="commented").digest == mini.digest
