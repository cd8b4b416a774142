"""The default model: a generator conditioned on the physics prediction that
predicts a bounded residual on it. Mini geometry, CPU, a few steps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from deepdark import physics as P
from deepdark.cli import main
from deepdark.io.geometry import load_geometry
from deepdark.io.predictions import Predictions
from deepdark.io.shards import Shard
from deepdark.model import conditioning as C
from deepdark.model import files as model_io
from deepdark.model.losses import LossConfig
from deepdark.model.nets import PRESETS, Discriminator, Generator
from deepdark.model.runner import model_predictor
from deepdark.model.runtime import fp32_head
from deepdark.pipeline.baseline import build_masters
from deepdark.pipeline.extract import extract
from deepdark.pipeline.predict import predict_shard
from deepdark.sim.simulate import simulate_archive
from tests.training import parts as T

MINI = load_geometry("mini")
QUICK = dict(epochs=1, crop=32, max_steps_per_epoch=3, progress=False, max_val_samples=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _archive(root, name, **kw):
    args = dict(geometry="mini", seed=3, cameras=("GS1",), temperatures=(-10, -25), guide_per_night=0, progress=False)
    args.update(kw)
    simulate_archive(root / name, **args)
    return [
        extract([n], root / f"{name}_{n.name}.h5", MINI, progress=False).shard for n in sorted((root / name).iterdir())
    ]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """A 10 s + 30 s library of three nights, a test night with guide frames, the physics model."""
    root = tmp_path_factory.mktemp("physnet")
    lib = _archive(root, "lib", nights=3, darks_per_temp=2, dark_exptimes=(10.0, 30.0))
    test = _archive(
        root, "test", nights=1, darks_per_temp=1, dark_exptimes=(30.0,), first_night="20240301", guide_per_night=1
    )
    P.fit_physics(lib, root / "phys.h5", progress=False)
    build_masters(lib, root / "masters.h5", progress=False)
    model = root / "model"
    T.train(lib, model, preset="physics", physics=root / "phys.h5", **QUICK)
    return dict(root=root, lib=lib, test=test, phys=root / "phys.h5", masters=root / "masters.h5", model=model)


def test_card_and_self_contained_directory(sim):
    card = model_io.read_card(sim["model"])
    assert card["inputs"] == ["a1", "a2", "a3", "physics"]
    assert card["architecture"]["preset"] == "physics"
    info = card["extra"]["physics"]
    assert info["file"] == "physics.h5"
    assert info["sha256"] == model_io.file_sha256(sim["phys"]) == model_io.file_sha256(sim["model"] / "physics.h5")
    assert info["residual_range_adu"] == C.RESIDUAL_RANGE_ADU
    loaded = model_io.load_model(sim["model"])
    assert loaded.physics["path"] == sim["model"] / "physics.h5"
    # a replaced physics file is refused
    bad = sim["root"] / "bad_model"
    bad.mkdir()
    for f in ("model.json", "model.safetensors"):
        (bad / f).write_bytes((sim["model"] / f).read_bytes())
    (bad / "physics.h5").write_bytes(b"not the same")
    with pytest.raises(model_io.ModelError, match="physics model replaced"):
        model_io.load_model(bad)


def test_untrained_model_equals_physics(sim):
    """A zero-initialised head: the untrained physics-mode model is the physics prediction."""
    G = Generator(PRESETS["physics"], seed=0)
    C.zero_head(G)
    with Shard(sim["test"][0]) as s:
        rows = np.flatnonzero((s.table["imagetyp"] == "DARK").to_numpy())[:4]
        phys = P.PhysicsModel.load(sim["phys"]).predict_rows(s, rows, window=True)
        strips = s.strips(rows, window=True)
    x = T.model_input(
        strips["a1"], strips["a2"], strips["a3"], MINI.window_size, extra=C.physics_plane(phys, strips["a1"])
    )
    pred = C.compose_adu(G.predict(x)[:, 0], torch.from_numpy(phys.astype(np.float64))).numpy()
    assert np.max(np.abs(pred - phys)) < 1e-3


def test_few_steps_keep_the_training_batch_near_physics(sim):
    with T.open_library(sim["lib"]) as lib, P.PhysicsModel(sim["phys"]) as phys:
        src = T.SampleSource(lib, physics=phys)
        items = [src.get(i) for i in range(4)]
        x, y, base = T.build_batch(items, MINI.window_size, 32, [(8, 16)] * 4, return_base=True)
        assert x.shape == (4, 4, 32, 32) and base.shape == y.shape == (4, 1, 32, 32)
        G = fp32_head(Generator(PRESETS["physics"], seed=0))
        C.zero_head(G)
        T.calibrate_batchnorm(G, x)
        D = Discriminator(in_channels=5, seed=1)
        opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
        scaler = torch.amp.GradScaler("cuda", enabled=False)

        def rmse():
            with torch.no_grad():
                G.eval()
                d = (C.compose(G(x), base) - y).double() * 65535
                return float(torch.sqrt((d**2).mean()))

        physics_rmse = float(torch.sqrt((((base - y).double() * 65535) ** 2).mean()))
        assert abs(rmse() - physics_rmse) < 1e-3
        for loss in ("deepdark", "l1"):
            for _ in range(5):
                T.set_training_mode(G, "running")
                with T.track_running_stats(G, 0.01):
                    parts = T._train_step(
                        G,
                        D,
                        opt_g,
                        opt_d,
                        scaler,
                        LossConfig(loss),
                        x,
                        y,
                        torch.device("cpu"),
                        base=base,
                        residual_range_adu=C.RESIDUAL_RANGE_ADU,
                    )
                assert all(np.isfinite(v) for k, v in parts.items() if k != "d_loss")
            assert rmse() <= 1.05 * physics_rmse, (loss, rmse(), physics_rmse)


def test_predictors_cover_window_and_active_area(sim, tmp_path):
    phys = P.PhysicsModel.load(sim["phys"])
    with Shard(sim["test"][0]) as s:
        rows = np.arange(len(s))  # darks and guide frames
        win = model_predictor(sim["model"], area="window", device="cpu")(s, rows)
        act = model_predictor(sim["model"], area="active", device="cpu")(s, rows)
        assert win.shape == (len(rows), MINI.window_size, MINI.window_size)
        assert act.shape == (len(rows), *MINI.active.shape)
        assert np.isfinite(act).all()
        # bounded residual around the physics prediction, over the whole active area
        dev = act - phys.predict_rows(s, rows)
        assert np.abs(dev).max() <= C.RESIDUAL_RANGE_ADU + 1e-3
        r, c = MINI.window_in_active
        np.testing.assert_allclose(win, act[:, r, c], atol=C.RESIDUAL_RANGE_ADU)  # same model, other area
    out = predict_shard(sim["model"], sim["test"][0], tmp_path / "pred.h5", device="cpu", progress=False)
    with Predictions(out) as pr:
        assert pr.f["dark"].shape == (len(rows), *MINI.active.shape)


def test_cli_train_without_preset_is_physics_mode_and_evaluate_adds_physics(sim, tmp_path):
    lib = [str(p) for p in sim["lib"]]
    out = tmp_path / "m"
    # no --preset and no --physics: one command fits the physics model from the same shards
    assert (
        main(
            [
                "-q",
                "train",
                *lib,
                "--out",
                str(out),
                "--epochs",
                "1",
                "--crop",
                "32",
                "--max-steps",
                "2",
                "--max-val-samples",
                "2",
                "--loss",
                "l1",
            ]
        )
        == 0
    )
    card = json.loads((out / "model.json").read_text())
    assert card["inputs"] == ["a1", "a2", "a3", "physics"]
    assert card["extra"]["physics"]["source"] == "fitted from the training shards"
    assert (out / "physics.h5").is_file()
    assert (
        main(
            [
                "-q",
                "evaluate",
                "--test",
                *map(str, sim["test"]),
                "--baseline",
                str(sim["masters"]),
                "--model",
                str(out),
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    table = json.loads((tmp_path / "ev" / "table1.json").read_text())
    assert list(table["total"])[:5] == ["median_all", "median_temp", "physics", "model", "floor"]
    # an untrained-like residual stays near physics
    assert table["total"]["model"] <= 1.1 * table["total"]["physics"]
    # strips-only presets refuse a physics file
    assert (
        main(["-q", "train", *lib, "--out", str(tmp_path / "x"), "--preset", "compact", "--physics", str(sim["phys"])])
        == 2
    )


def test_exposures_outside_the_training_range_get_physics_alone(sim):
    """The residual is learned on the library's exposure times; beyond them physics answers."""
    phys = P.PhysicsModel.load(sim["phys"])
    predict = model_predictor(sim["model"], device="cpu")
    with Shard(sim["test"][0]) as s:
        rows = np.arange(len(s))
        exptime = s.table["exptime"].to_numpy(float)
        predict.runner.exposure_range = (exptime.max() + 1, exptime.max() + 2)  # every frame outside
        np.testing.assert_array_equal(predict(s, rows), phys.predict_rows(s, rows, window=True))
        predict.runner.exposure_range = (0.0, math.inf)  # every frame inside: the learned residual
        inside = predict(s, rows)
        assert inside.shape == (len(rows), MINI.window_size, MINI.window_size)
