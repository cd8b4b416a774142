"""Inference: window and whole-active-area predictors, `deepdark predict`, `evaluate --model`, the
ablation table (mini geometry, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepdark.cli import main
from deepdark.io.predictions import Predictions
from deepdark.io.shards import Shard
from deepdark.model import files as model_io
from deepdark.model.nets import model_input
from deepdark.model.runner import ModelRunner, model_predictor
from deepdark.pipeline.baseline import build_masters
from deepdark.training import train
from tests.training.test_train import MINI, QUICK, make_library

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    shards, test_shard = make_library(root)
    model = root / "model"
    train(shards, model, **{**QUICK, "epochs": 1})
    return root, shards, test_shard, model


def test_predict_covers_every_active_pixel_via_cli(setup):
    root, _, test_shard, model = setup
    out = root / "pred.h5"
    assert (
        main(
            [
                "-q",
                "predict",
                "--model",
                str(model),
                str(test_shard),
                "--out",
                str(out),
                "--batch-size",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    with Predictions(out) as p, Shard(test_shard) as s:
        assert len(p) == len(s)  # every frame-channel, guide frames too
        assert p.attrs["method"] == "model" and p.attrs["model_hash"] == model_io.model_hash(model)
        assert p.attrs["model_name"] == "model"
        # a strips-only model: its network predicts every frame, nothing to fall back on
        assert set(p.table["method"]) == {"network"} and p.attrs["methods"] == "network" and p.attrs["network_loaded"]
        dark = p.dark(np.arange(len(p)))
        assert dark.shape == (len(s), *MINI.active.shape) == (len(s), 68, 68)
        assert np.isfinite(dark).all() and (dark >= 0).all() and (dark <= 65535).all()
        # the level is a dark's: within a few hundred ADU of the real darks' (barely trained model)
        darks = np.flatnonzero((s.table["imagetyp"] == "DARK").to_numpy())
        truth = s.active(darks).astype(np.float32)
        assert abs(np.median(dark[darks]) - np.median(truth)) < 500
        # identical to the in-memory predictor, batch size notwithstanding
        ref = model_predictor(model, area="active", device="cpu", batch_size=1)(s, darks[:2])
        np.testing.assert_allclose(dark[darks[:2]], ref, rtol=0, atol=1e-3)
    assert not list(root.glob(".*partial"))


def test_window_predictor_is_the_active_prediction_method_on_the_window(setup):
    _, _, test_shard, model = setup
    predict = model_predictor(model, device="cpu", batch_size=2)
    m = model_io.load_model(model)
    with Shard(test_shard) as s:
        rows = np.array([0, 1, 2])
        win = predict(s, rows)
        assert win.shape == (3, 64, 64) and win.dtype == np.float32
        st = s.strips(rows, window=True)
        x = model_input(st["a1"], st["a2"], st["a3"], 64)
        np.testing.assert_allclose(win, m.generator.predict(x)[:, 0].double().numpy() * 65535.0, rtol=1e-6, atol=1e-3)


def test_runner_pads_to_the_multiple_and_crops_back(setup):
    _, _, _, model = setup
    runner = ModelRunner(model, device="cpu", batch_size=2)
    x = torch.rand(3, 3, 42, 46) * 0.03
    y = runner.run(x)
    assert y.shape == (3, 42, 46) and np.isfinite(y).all()
    # unpadded input of a multiple size goes straight through
    x = torch.rand(1, 3, 44, 44) * 0.03
    ref = runner.generator.predict(x)[0, 0].double().numpy() * 65535.0
    np.testing.assert_allclose(runner.run(x)[0], ref, rtol=1e-6, atol=1e-3)


def test_predict_refuses_a_foreign_geometry(setup, tmp_path):
    root, _, test_shard, model = setup
    card = json.loads((model / "model.json").read_text())
    card["geometry"]["window_size"] = 60
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    (other / "model.json").write_text(json.dumps(card))
    assert main(["-q", "predict", "--model", str(other), str(test_shard), "--out", str(tmp_path / "p.h5")]) == 2
    assert not (tmp_path / "p.h5").exists()


def test_evaluate_with_model_adds_the_model_column(setup, tmp_path):
    _, shards, test_shard, model = setup
    masters = build_masters(shards, tmp_path / "masters.h5", progress=False)
    out = tmp_path / "eval"
    assert (
        main(
            [
                "-q",
                "evaluate",
                "--test",
                str(test_shard),
                "--baseline",
                str(masters),
                "--model",
                str(model),
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = json.loads((out / "table1.json").read_text())
    assert {"median_all", "median_temp", "model", "floor"} <= set(table["total"])
    assert set(table) == {"total", "-15", "-25"}
    assert all(np.isfinite(table[g]["model"]) for g in table)


def test_train_cli(setup, tmp_path):
    _, shards, _, _ = setup
    out = tmp_path / "cli_model"
    assert (
        main(
            [
                "-q",
                "train",
                *map(str, shards),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--max-steps",
                "2",
                "--crop",
                "32",
                "--val-nights",
                "20240103",
                "--device",
                "cpu",
                "--seed",
                "3",
                "--preset",
                "compact",
            ]
        )
        == 0
    )  # without --preset: the physics model (tests/test_physics_model.py)
    card = model_io.read_card(out)
    assert card["training"]["val_nights"] == ["20240103"] and card["training"]["seed"] == 3
    assert card["training"]["steps"] == 2 and card["architecture"]["preset"] == "compact"


def test_ablation_table(setup, tmp_path):
    _, shards, test_shard, _ = setup
    out = tmp_path / "abl"
    assert (
        main(
            [
                "-q",
                "ablation",
                *map(str, shards),
                str(test_shard),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--max-steps",
                "2",
                "--crop",
                "32",
                "--losses",
                "lsgan",
                "deepdark",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    t = json.loads((out / "table2.json").read_text())
    assert t["setpoint"] == -15 and t["test_nights"] == ["20240110"]
    assert t["n_test_images"] == 4  # one -15 C dark x 4 channels
    names = [r["loss"] for r in t["rows"]]
    assert names == ["median", "lsgan", "deepdark", "floor"]
    assert all(np.isfinite(r["rmse_adu"]) for r in t["rows"])
    assert (out / "table2.csv").is_file() and (out / "model-deepdark" / "model.json").is_file()


def test_fp32_head_keeps_state_and_result():
    from deepdark.model.nets import PRESETS, Generator, count_macs
    from deepdark.model.runtime import fp32_head

    G = Generator(PRESETS["compact"], seed=0).eval()
    x = torch.rand(1, 3, 32, 32) * 0.03
    ref = G(x)
    keys = list(G.state_dict())
    fp32_head(G)
    assert list(G.state_dict()) == keys and type(G.head).__name__ == "_Float32Head"
    torch.testing.assert_close(G(x), ref, rtol=0, atol=0)
    assert count_macs(G, (1, 3, 32, 32)) == count_macs(Generator(PRESETS["compact"]), (1, 3, 32, 32))
