"""Training, the model file and checkpoints, on a small simulated library (mini geometry, CPU)."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from deepdark.cli import build_parser
from deepdark.io.geometry import load_geometry
from deepdark.model import conditioning as C
from deepdark.model import files as model_io
from deepdark.model.losses import ALL_LOSSES, LossConfig
from deepdark.model.nets import NORMS, PRESETS, Discriminator, Generator
from deepdark.pipeline.extract import extract
from deepdark.sim.simulate import simulate_archive
from deepdark.training import TrainConfig, open_library, split_nights, train
from deepdark.training.batchnorm import calibrate_batchnorm, init_output_level, set_training_mode, track_running_stats
from deepdark.training.config import LOSS_NAMES, NORM_NAMES, config_from_args
from deepdark.training.data import SampleSource, build_batch
from deepdark.training.loop import _train_step

MINI = load_geometry("mini")
NIGHTS = ["20240101", "20240102", "20240103"]
TEST_NIGHT = "20240110"
# A few steps on 32 x 32 crops: enough to exercise every path in well under a second a run.
QUICK_SETTINGS = dict(preset="compact", epochs=1, crop=32, max_steps_per_epoch=3, max_val_samples=4)
QUICK_CONFIG = TrainConfig(**QUICK_SETTINGS)
QUICK = {**QUICK_SETTINGS, "progress": False}  # as keywords: train(shards, out, **QUICK)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quick_train(shards, out, **changes):
    """``train`` with the quick settings, ``changes`` replacing some of them."""
    return train(shards, out, dataclasses.replace(QUICK_CONFIG, **changes), progress=False)


def make_library(root):
    """Three library nights and one test night of simulated mini darks (-15 and -25 C, one dark
    per setpoint and night, plus a guide frame), one shard per night."""
    lib = root / "lib_archive"
    simulate_archive(
        lib,
        geometry="mini",
        nights=3,
        seed=0,
        temperatures=(-15, -25),
        darks_per_temp=1,
        guide_per_night=1,
        progress=False,
    )
    test = root / "test_archive"
    simulate_archive(
        test,
        geometry="mini",
        nights=1,
        seed=0,
        temperatures=(-15, -25),
        darks_per_temp=1,
        guide_per_night=1,
        first_night=TEST_NIGHT,
        progress=False,
    )
    shards = [extract([lib / n], root / f"{n}.h5", MINI, progress=False).shard for n in NIGHTS]
    test_shard = extract([test / TEST_NIGHT], root / f"{TEST_NIGHT}.h5", MINI, progress=False).shard
    return shards, test_shard


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return make_library(tmp_path_factory.mktemp("library"))


@pytest.fixture(scope="module")
def trained(library, tmp_path_factory):
    """A model trained for two quick epochs (shared by the read-only tests)."""
    shards, _ = library
    out = tmp_path_factory.mktemp("model") / "m"
    res = quick_train(shards, out, epochs=2)
    return out, res


def _weights(model_dir):
    return model_io.read_safetensors(model_dir / model_io.MODEL_FILE)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the settings -------------------------------------------------------------------------------


def test_config_refuses_bad_settings_naming_the_field_and_its_values():
    for change, message in [
        ({"bn": "frozen"}, "unknown bn 'frozen'; valid: running, batch"),
        ({"crop_mode": "tiles"}, "unknown crop_mode 'tiles'; valid: window, strips"),
        ({"lr_schedule": "cosine"}, "unknown lr_schedule 'cosine'; valid: constant, linear, pix2pix"),
        ({"loss": "wgan"}, "unknown loss 'wgan'; valid: deepdark, pix2pix, lsgan, mixed, l1"),
        ({"norm": "layer"}, "unknown norm 'layer'; valid: batch, instance, none"),
        ({"preset": "huge"}, "unknown preset 'huge'; valid: paper"),
        ({"device": "tpu"}, "unknown device 'tpu'; valid: auto, cpu, cuda"),
        ({"epochs": 0}, "epochs must be >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"patience": -1}, "patience and min_improvement must be >= 0, got -1 and 0.001"),
        ({"threads": 0}, "threads must be >= 1, got 0"),
        ({"preset": "compact", "physics": "phys.h5"}, "preset 'compact' takes strips only"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            TrainConfig(**change)
    with pytest.raises(dataclasses.FrozenInstanceError):
        QUICK_CONFIG.epochs = 2


def test_config_default_loss_follows_the_preset():
    assert TrainConfig().preset == "physics" and TrainConfig().loss_name == "l1"
    assert TrainConfig(preset="compact").loss_name == "deepdark"
    assert TrainConfig(preset="physics", loss="deepdark").loss_name == "deepdark"
    # the rule is applied when asked, so a changed preset changes the default loss too
    assert dataclasses.replace(TrainConfig(), preset="paper").loss_name == "deepdark"


def test_config_names_agree_with_the_model():
    assert set(LOSS_NAMES) == ALL_LOSSES and set(NORM_NAMES) == set(NORMS)
    assert TrainConfig().residual_range_adu == C.RESIDUAL_RANGE_ADU


def test_train_options_are_the_config_fields():
    parser = build_parser()
    defaults = config_from_args(parser.parse_args(["train", "a.h5", "--out", "m"]))
    assert defaults == TrainConfig()
    assert dataclasses.asdict(defaults) == {
        **dict(preset="physics", epochs=40, device="auto", l1_weight=100.0, batch_size=1, lr=2e-5),
        **dict(lr_schedule="constant", crop=None, max_steps_per_epoch=None, seed=0, resume=True, loss=None),
        **dict(physics=None, residual_range_adu=64.0, physics_memory_mb=512, betas=(0.5, 0.999), val_nights=None),
        **dict(bn="running", bn_momentum=0.01, norm=None, crop_mode="window", setpoints=None, max_val_samples=None),
        **dict(nights=None, cache_mb=1024, init_level=True, patience=10, min_improvement=0.001, margin=0.005),
        **dict(threads=None),
    }
    args = parser.parse_args(
        ["train", "a.h5", "--out", "m", "--max-steps", "5", "--residual-range", "32", "--no-resume"]
        + ["--betas", "0.9", "0.99", "--setpoints", "-15", "-25", "--physics", "p.h5", "--loss", "lsgan"]
    )
    config = config_from_args(args, val_nights=2)
    assert (config.max_steps_per_epoch, config.residual_range_adu, config.resume) == (5, 32.0, False)
    assert (config.betas, config.setpoints, config.val_nights) == ((0.9, 0.99), (-15.0, -25.0), 2)
    assert (config.physics, config.loss_name) == (Path("p.h5"), "lsgan")


def test_signature_and_card_record_the_settings_that_apply():
    sig = QUICK_CONFIG.signature()
    # the keys a checkpoint is resumed on (checkpoints of earlier versions hold the same)
    assert set(sig) == {
        *("preset", "loss", "l1_weight", "batch_size", "lr", "betas", "lr_schedule", "schedule_epochs", "crop"),
        *("crop_mode", "bn", "bn_momentum", "init_level", "seed", "max_steps_per_epoch", "setpoints"),
    }
    assert sig["loss"] == "deepdark" and sig["betas"] == [0.5, 0.999] and sig["schedule_epochs"] is None
    # ... and, on the card, when training stops and where the network is used
    assert set(QUICK_CONFIG.card()) == set(sig) - {"preset", "loss", "l1_weight", "schedule_epochs", "setpoints"} | {
        "patience",
        "min_improvement",
        "margin",
    }
    # settings that do not apply are recorded as None
    whole = dataclasses.replace(QUICK_CONFIG, crop=None, bn="batch", lr_schedule="linear", setpoints=[-15, -25.0])
    assert (whole.signature()["crop_mode"], whole.card()["bn_momentum"]) == (None, None)
    assert whole.signature()["schedule_epochs"] == 1 and whole.signature()["setpoints"] == [-25.0, -15.0]
    assert TrainConfig().signature()["init_level"] is False  # physics: starts at the physics prediction


# --- the night split ----------------------------------------------------------------------------


def test_split_nights_rules():
    n5 = [f"2024010{i}" for i in range(1, 6)]
    assert split_nights(n5) == (n5[:4], n5[4:])
    assert split_nights(n5[:2]) == (n5[:1], n5[1:2])
    assert split_nights(n5[:1]) == (n5[:1], [])
    assert split_nights(n5, 2) == (n5[:3], n5[3:])
    assert split_nights(n5, 0) == (n5, [])
    assert split_nights(n5 + n5, ["20240102"]) == ([n for n in n5 if n != "20240102"], ["20240102"])
    with pytest.raises(ValueError, match="no training night"):
        split_nights(n5, 5)
    with pytest.raises(ValueError, match="not in the shards"):
        split_nights(n5, ["20231231"])


def test_training_never_puts_a_night_in_both_sets(trained, library):
    out, res = trained
    card = model_io.read_card(out)
    train_n, val_n = card["training"]["nights"], card["training"]["val_nights"]
    assert train_n == NIGHTS[:2] and val_n == NIGHTS[2:] == res.val_nights
    assert not set(train_n) & set(val_n)
    # every sample of a night lies on one side: the library's samples of the validation night
    with open_library(library[0]) as lib:
        nights = set(lib.table["night"])
        assert nights == set(NIGHTS)
        # 2 darks x 4 channels per night: all 8 of the two training nights train
        assert card["training"]["n_samples"] == 16 and card["training"]["n_frames"] == 4


# --- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bn", ["running", "batch"])
def test_few_steps_lower_the_training_loss_on_a_fixed_batch(library, bn):
    with open_library(library[0]) as lib:
        src = SampleSource(lib)
        items = [src.get(i) for i in range(4)]
        x, y = build_batch(items, 64, 32, [(16, 16)] * 4)
    G = Generator(PRESETS["compact"], seed=0)
    D = Discriminator(in_channels=4, seed=1)
    init_output_level(G, float(y.mean()))
    if bn == "running":
        calibrate_batchnorm(G, x)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    cfg = LossConfig("deepdark", 100.0)
    l1 = []
    for _ in range(30):
        set_training_mode(G, bn)
        with track_running_stats(G, 0.1) if bn == "running" else torch.enable_grad():
            parts = _train_step(G, D, opt_g, opt_d, scaler, cfg, x, y, torch.device("cpu"))
        l1.append(parts["g_l1"])
    assert np.mean(l1[-5:]) < 0.5 * np.mean(l1[:3])


def test_running_batchnorm_keeps_the_level_train_batch_mode_erases_it():
    """Why bn="running" is the default: with batch statistics (batch 1) a uniform offset of the
    input cannot reach the output; with running statistics - as at inference - it does."""
    G = Generator(PRESETS["compact"], seed=0)
    x = torch.rand(1, 3, 32, 32) * 0.01 + 0.02
    calibrate_batchnorm(G, torch.cat([x, x + 0.01]))
    with torch.no_grad():
        G.train()
        a, b = G(x), G(x + 0.005)
        assert torch.allclose(a, b, atol=1e-6)  # per-image normalisation: level erased
        set_training_mode(G, "running")
        a, b = G(x), G(x + 0.005)
        assert (a - b).abs().max() > 1e-4  # the level reaches the output
        torch.testing.assert_close(a, G.predict(x))  # training computes what inference does


def test_track_running_stats_updates_after_the_forward():
    G = Generator(PRESETS["compact"], seed=0)
    bn = [m for m in G.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    set_training_mode(G, "running")
    x = torch.rand(2, 3, 16, 16)
    before = bn.running_mean.clone()
    with torch.no_grad():
        ref = G(x)
    with track_running_stats(G, 0.5):
        out = G(x)
    torch.testing.assert_close(out, ref)  # normalised with the old statistics
    assert not torch.equal(bn.running_mean, before)  # then updated
    after = bn.running_mean.clone()
    G(x)  # outside the context: no update
    assert torch.equal(bn.running_mean, after)


def test_one_tracking_context_updates_after_every_pass_as_one_context_a_pass_does():
    """Training keeps the hooks on for an epoch: each pass updates the statistics as a context
    entered for that pass alone would."""
    G = Generator(PRESETS["compact"], seed=0)
    H = Generator(PRESETS["compact"], seed=0)
    xs = [torch.rand(1, 3, 16, 16) for _ in range(3)]
    for net in (G, H):
        set_training_mode(net, "running")
    with track_running_stats(G, 0.1):
        outs = [G(x) for x in xs]
    for x, out in zip(xs, outs):
        with track_running_stats(H, 0.1):
            assert torch.equal(H(x), out)
    assert _same(G.state_dict(), H.state_dict())


def test_training_writes_model_card_log_and_checkpoint(trained):
    out, res = trained
    files = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "model.json",
        "checkpoint.json",
        "checkpoint-e0002.safetensors",
        "training_log.csv",
    } <= files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".pkl", ".partial"))]
    card = model_io.read_card(out)
    assert card["architecture"]["preset"] == "compact"
    assert card["architecture"]["generator"] == dataclasses.asdict(PRESETS["compact"])
    assert card["inputs"] == ["a1", "a2", "a3"]
    assert card["loss"] == {"name": "deepdark", "l1_weight": 100.0}
    assert card["geometry"]["name"] == "mini" and card["geometry"]["window_size"] == 64
    assert card["geometry"]["window_offset"] == 2 and "regions:" in card["geometry"]["source"]
    assert card["training"]["setpoints"] == [-25.0, -15.0] and card["training"]["cameras"] == ["GS1"]
    assert card["epochs"] == 2 and card["code_version"]
    assert np.isfinite(card["validation"]["rmse_adu"]) and "centre 32x32" in card["validation"]["region"]
    assert card["weights"]["sha256"] == model_io.model_hash(out)
    settings = dataclasses.replace(QUICK_CONFIG, epochs=2)
    assert {k: card["training"][k] for k in settings.card()} == settings.card()
    signature = json.loads((out / "checkpoint.json").read_text())["signature"]
    assert {k: signature[k] for k in settings.signature()} == settings.signature()
    import pandas as pd

    log = pd.read_csv(out / "training_log.csv")
    assert log["epoch"].tolist() == [1, 2] and (log["steps"] == 3).all()
    assert np.isfinite(log[["d_loss", "g_loss", "g_l1", "val_rmse_adu", "seconds"]].to_numpy()).all()


def test_training_is_reproducible_with_a_seed(library, trained, tmp_path):
    shards, _ = library
    train(shards, tmp_path / "a", **{**QUICK, "epochs": 2})  # the settings as keywords
    assert _same(_weights(tmp_path / "a"), _weights(trained[0]))
    # byte-identical model files, so the model hash written into corrected frames (DDMHASH) too
    assert model_io.model_hash(tmp_path / "a") == model_io.model_hash(trained[0])
    quick_train(shards, tmp_path / "b", seed=1)
    assert not _same(_weights(tmp_path / "b"), _weights(tmp_path / "a"))


def test_resume_continues_from_the_saved_epoch(library, trained, tmp_path, monkeypatch):
    shards, _ = library
    out = tmp_path / "r"
    quick_train(shards, out)  # "killed" after epoch 1
    (out / "model.json").unlink()
    first = json.loads((out / "checkpoint.json").read_text())
    assert first["epoch"] == 1

    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    res = quick_train(shards, out, epochs=2)
    assert [r["epoch"] for r in res.history] == [1, 2]
    assert res.history[0] == first["history"][0]  # epoch 1 was not redone
    import pandas as pd

    assert pd.read_csv(out / "training_log.csv")["epoch"].tolist() == [1, 2]
    assert _same(_weights(out), _weights(trained[0]))  # = an uninterrupted 2-epoch run
    assert [p.name for p in out.glob("checkpoint-e*.safetensors")] == ["checkpoint-e0002.safetensors"]
    with pytest.raises(ValueError, match="other settings.*lr"):
        quick_train(shards, out, epochs=3, lr=1e-3)


def test_resume_refuses_a_corrupt_checkpoint(library, tmp_path):
    shards, _ = library
    out = tmp_path / "c"
    quick_train(shards, out)
    (out / "checkpoint-e0001.safetensors").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="does not match its hash"):
        quick_train(shards, out, epochs=2)
    quick_train(shards, out, epochs=1, resume=False)  # starting over is allowed


def test_bad_training_arguments(library, tmp_path):
    shards, _ = library
    with pytest.raises(ValueError, match="multiple of 4"):
        quick_train(shards, tmp_path / "x", crop=30)
    with pytest.raises(ValueError, match="unknown preset"):
        quick_train(shards, tmp_path / "x", preset="huge")
    with pytest.raises(ValueError, match="no DARK frames"):
        quick_train(shards, tmp_path / "x", setpoints=[-40])
    with pytest.raises(ValueError, match="no training night"):
        quick_train(shards, tmp_path / "x", val_nights=3)


# --- the model file -----------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_outputs(trained):
    out, _ = trained
    m = model_io.load_model(out, geometry=MINI)
    assert not m.generator.training and m.hash == model_io.model_hash(out)
    ref = Generator(PRESETS["compact"])
    ref.load_state_dict(_weights(out))
    x = torch.rand(2, 3, 64, 64) * 0.05
    torch.testing.assert_close(m.generator(x), ref.predict(x), rtol=0, atol=0)
    # saving the loaded generator again gives the same weights file content
    model_io.save_model(out.parent / "copy", m.generator, preset="compact", loss=m.card["loss"], geometry=MINI)
    assert _same(_weights(out.parent / "copy"), _weights(out))


def test_load_refuses_other_architecture(trained, tmp_path):
    out, _ = trained
    other = tmp_path / "other"
    G = Generator(dataclasses.replace(PRESETS["compact"], width=8, n_blocks=2), seed=0)
    model_io.save_model(other, G, preset=None, loss={"name": "deepdark", "l1_weight": 100}, geometry=MINI)
    # weights of the small network under the compact card
    card = json.loads((out / "model.json").read_text())
    card["weights"]["sha256"] = model_io.model_hash(other)
    (other / "model.json").write_text(json.dumps(card))
    with pytest.raises(model_io.ModelError) as err:
        model_io.load_model(other)
    msg = str(err.value)
    assert "does not match the architecture" in msg and "missing keys: blocks.2" in msg
    assert "shape mismatches: blocks.0.body.1.weight: file (32, 32, 3, 3), model (64, 64, 3, 3)" in msg


def test_load_refuses_wrong_geometry(trained):
    out, _ = trained
    with pytest.raises(model_io.ModelError, match=r"window size 60 \(model: 64\)"):
        model_io.load_model(out, geometry=dataclasses.replace(MINI, window_size=60))
    with pytest.raises(model_io.ModelError, match=r"window offset 3 \(model: 2\)"):
        model_io.load_model(out, geometry=dataclasses.replace(MINI, window_offset=3))
    with pytest.raises(model_io.ModelError, match="geometry name 'lamost-kaf4320'"):
        model_io.load_model(out, geometry=load_geometry("lamost-kaf4320"))


def test_load_never_unpickles(trained, tmp_path, monkeypatch):
    out, _ = trained
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text((out / "model.json").read_text())

    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    # garbage under the safetensors name
    (bad / "model.safetensors").write_bytes(b"this is not a tensor file at all" * 10)
    with pytest.raises(model_io.ModelError, match="not a readable safetensors file"):
        model_io.load_model(bad, check_hash=False)
    # a torch.save pickle renamed (zip format and the legacy raw pickle)
    monkeypatch.undo()
    torch.save(Generator(PRESETS["compact"]).state_dict(), bad / "model.safetensors")
    with open(bad / "legacy.pkl", "wb") as fh:
        pickle.dump({"x": 1}, fh)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    with pytest.raises(model_io.ModelError, match="pickle file"):
        model_io.load_model(bad, check_hash=False)
    (bad / "model.safetensors").write_bytes((bad / "legacy.pkl").read_bytes())
    with pytest.raises(model_io.ModelError, match="pickle file"):
        model_io.load_model(bad, check_hash=False)
    # weights that are not the card's
    with pytest.raises(model_io.ModelError, match="differs from the card"):
        model_io.load_model(bad)


def test_incomplete_model_directory(trained, tmp_path):
    out, _ = trained
    half = tmp_path / "half"
    half.mkdir()
    (half / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    with pytest.raises(model_io.ModelError, match="incomplete"):
        model_io.load_model(half)
    with pytest.raises(model_io.ModelError, match="not a model directory"):
        model_io.load_model(tmp_path / "nowhere")


@pytest.mark.parametrize("earlier", ["checkpoint.json", "model.json"])
def test_another_physics_model_for_a_folder_holding_a_run_is_refused_before_anything_is_written(tmp_path, earlier):
    """Its physics.h5 belongs to the run there (a checkpoint to resume, or a finished model whose
    card names the file's hash): replacing it would break that model."""
    from deepdark.io.errors import InputError
    from deepdark.training.loop import _physics_file

    out = tmp_path / "model"
    out.mkdir()
    (out / C.PHYSICS_FILE).write_bytes(b"the run's physics model")
    (out / earlier).write_text("{}")
    other = tmp_path / "other.h5"
    other.write_bytes(b"another physics model")
    with pytest.raises(InputError, match=f"{out} holds a run made with another physics model"):
        _physics_file([], out, other, (512, 1), progress=False)
    assert (out / C.PHYSICS_FILE).read_bytes() == b"the run's physics model"
    (out / earlier).unlink()  # no run there: the file is the command's to replace, with a physics model
    with pytest.raises(InputError, match=f"{other}: not a deepdark physics model"):
        _physics_file([], out, other, (512, 1), progress=False)
    assert (out / C.PHYSICS_FILE).read_bytes() == b"the run's physics model"


def test_a_validation_night_not_there_is_refused_before_the_physics_fit(library, tmp_path):
    """At the paper's scale the fit takes an hour: a typo must not cost it, nor leave its file."""
    from deepdark.io.errors import InputError

    shards, _ = library
    out = tmp_path / "m"
    with pytest.raises(InputError, match=r"validation night\(s\) \['20990101'\] not in"):
        quick_train(shards, out, preset="physics", val_nights=("20990101",))
    assert not (out / C.PHYSICS_FILE).exists()
