"""The network is used only where it beat physics alone on validation: a library of two cameras,
one with frame-specific effects the physics model cannot describe (the network learns them) and
one without (the network has nothing to add); mini geometry, CPU."""

from __future__ import annotations

import numpy as np
import pytest

from deepdark import physics as P
from deepdark.cli import main
from deepdark.io.geometry import load_geometry
from deepdark.io.predictions import Predictions
from deepdark.io.shards import Shard
from deepdark.model import files as model_io
from deepdark.model import selection as S
from deepdark.pipeline.extract import extract
from deepdark.pipeline.predict import predict_shard
from deepdark.sim.simulate import simulate_archive
from deepdark.training import train

MINI = load_geometry("mini")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _night_shards(root, name, nights, first_night="20240101", darks=4):
    """GS1 with the effects, GS2 without: -15 C darks, one shard per night."""
    kw = dict(geometry="mini", nights=nights, temperatures=(-15,), darks_per_temp=darks, progress=False)
    kw.update(first_night=first_night, guide_per_night=0)
    simulate_archive(root / name, cameras=("GS1",), effects=("amp_glow", "pickup"), **kw)
    simulate_archive(root / name, cameras=("GS2",), **kw)
    folders = sorted((root / name).iterdir())
    return [extract([n], root / f"{name}_{n.name}.h5", MINI, progress=False).shard for n in folders]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """A physics-mode model trained (16 epochs of 32 steps, no early stop) on two nights of two
    cameras, and a test night of both."""
    root = tmp_path_factory.mktemp("selection")
    lib = _night_shards(root, "lib", 2)
    (test,) = _night_shards(root, "test", 1, first_night="20240301", darks=1)
    P.fit_physics(lib, root / "phys.h5", progress=False)
    model = root / "model"
    res = train(lib, model, physics=root / "phys.h5", epochs=16, patience=0, progress=False)
    return dict(root=root, lib=lib, test=test, phys=root / "phys.h5", model=model, result=res)


def test_the_card_records_physics_alone_and_physics_plus_network_per_camera_and_group(sim):
    card = model_io.read_card(sim["model"])
    sel = card["selection"]
    assert sel["margin"] == S.DEFAULT_MARGIN and sel["nights"] == ["20240102"] and "rule" in sel
    cams = {r["camera"]: r for r in sel["cameras"]}
    assert set(cams) == {"GS1", "GS2"} and all(r["n_samples"] == 16 for r in cams.values())
    # the effects are learned: the network beats physics alone on the camera that has them ...
    assert cams["GS1"]["network_rmse_adu"] < (1 - S.DEFAULT_MARGIN) * cams["GS1"]["physics_rmse_adu"]
    # ... and adds nothing on the other, which gets physics alone
    assert cams["GS2"]["gain"] < S.DEFAULT_MARGIN
    assert (cams["GS1"]["network"], cams["GS2"]["network"]) == (True, False)
    groups = {(r["camera"], r["setpoint"], r["exptime"]): r["network"] for r in sel["groups"]}
    assert groups == {("GS1", -15.0, 30.0): True, ("GS2", -15.0, 30.0): False}
    assert sel["decision"] == "GS1: physics+network (1 of 1 validated groups); GS2: physics alone"
    assert card["validation"]["physics_rmse_adu"] > card["validation"]["rmse_adu"]
    assert sel["best_epoch"] == card["validation"]["best_epoch"] == sim["result"].best_epoch > 0


def test_predict_runs_the_network_only_where_it_helped(sim, tmp_path):
    out = tmp_path / "pred.h5"
    argv = ["-q", "predict", "--model", str(sim["model"]), str(sim["test"]), "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    with Predictions(out) as p, Shard(sim["test"]) as s:
        gs1 = (p.table["camera"] == "GS1").to_numpy()
        assert set(p.table["method"][gs1]) == {S.PHYSICS_NETWORK} and set(p.table["method"][~gs1]) == {S.PHYSICS}
        assert p.attrs["methods"] == "physics,physics+network" and p.attrs["network_loaded"]
        assert p.attrs["method"] == "model" and p.attrs["network_margin"] == S.DEFAULT_MARGIN
        dark = p.dark(np.arange(len(p)))
        phys = P.PhysicsModel.load(sim["phys"]).predict_rows(s, np.arange(len(s)))
        np.testing.assert_array_equal(dark[~gs1], phys[~gs1])  # physics alone, exactly
        resid = np.abs(dark[gs1] - phys[gs1])
        assert resid.max() > 1 and resid.max() <= 64 + 1e-3  # the network's bounded residual
        # physics alone is kept as its terms; the network's darks as pixels
        np.testing.assert_array_equal(p.f["terms/row_maps"][()] >= 0, ~gs1)
        assert p.f["dark"].id.get_num_chunks() == gs1.sum()


def test_a_margin_nothing_reaches_leaves_the_network_unread(sim, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the network was read")

    monkeypatch.setattr(model_io, "_read_generator", refuse)
    out = predict_shard(sim["model"], sim["test"], tmp_path / "p.h5", device="cpu", progress=False, margin=0.5)
    with Predictions(out) as p, Shard(sim["test"]) as s:
        assert set(p.table["method"]) == {S.PHYSICS} and p.attrs["methods"] == "physics"
        assert not p.attrs["network_loaded"] and p.attrs["network_margin"] == 0.5
        phys = P.PhysicsModel.load(sim["phys"]).predict_rows(s, np.arange(len(s)))
        np.testing.assert_array_equal(p.dark(np.arange(len(p))), phys)


def test_selection_rule_and_fallbacks():
    card = {
        "selection": {
            "cameras": [
                {"camera": "A", "physics_rmse_adu": 20.0, "network_rmse_adu": 19.0},
                {"camera": "B", "physics_rmse_adu": 20.0, "network_rmse_adu": 19.95},
            ],
            "groups": [
                {"camera": "A", "setpoint": -25.0, "exptime": 30.0, "physics_rmse_adu": 10.0, "network_rmse_adu": 10.0}
            ],
        }
    }
    sel = S.Selection.from_card(card)
    # group decides where validated, else the camera; an unvalidated camera gets physics alone
    assert sel.decisions(["A", "A", "B", "C"], [-15, -25, -15, -15], [30, 30, 30, 30]).tolist() == [
        True,
        False,
        False,
        False,
    ]
    assert S.Selection.from_card(card, margin=0.001).use("B", -15, 30)  # 0.25 % gain passes a 0.1 % margin
    assert not S.Selection.from_card(card, margin=0.1).any_network
    assert S.Selection.from_card({}) is None  # a card from before: the network everywhere
    assert not S.uses_network(None, 1.0, 0.0) and not S.uses_network(float("nan"), 1.0, 0.0)
    # a card field of another type is named, not a traceback
    from deepdark.io.errors import InputError

    bad = {"selection": {"cameras": [{"camera": "A", "physics_rmse_adu": "abc", "network_rmse_adu": 1.0}]}}
    with pytest.raises(InputError, match=r"cameras\[0\].physics_rmse_adu must be a number or null, got 'abc'"):
        S.Selection.from_card(bad)
    with pytest.raises(InputError, match="card's selection is not valid"):
        S.Selection.from_card({"selection": {"cameras": [{"physics_rmse_adu": 1.0, "network_rmse_adu": 1.0}]}})
    # a tie is no gain, even at a margin of 0 (two zeros: darks the physics fit had seen)
    assert not S.uses_network(0.0, 0.0, 0.005) and not S.uses_network(2.0, 2.0, 0.0)
    assert S.uses_network(2.0, 1.99, 0.0)
