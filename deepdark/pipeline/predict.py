"""The ``predict`` step: predicted darks of every frame-channel of a night's shard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from deepdark.io.predictions import write_predictions
from deepdark.io.shards import Shard
from deepdark.model.files import check_geometry, load_model
from deepdark.model.runner import model_predictor
from deepdark.model.runtime import DEFAULT_BATCH_SIZE, DEFAULT_DEVICE
from deepdark.model.selection import DEFAULT_MARGIN, strips_only_note

log = logging.getLogger(__name__)


def predict_shard(
    model_dir: str | Path,
    shard: str | Path,
    out: str | Path,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = DEFAULT_DEVICE,
    progress: bool = True,
    margin: float = DEFAULT_MARGIN,
) -> Path:
    """Predicted darks of every frame-channel of ``shard`` over the whole active area -> ``out`` (HDF5).

    A frame the model cannot serve (a camera or an exposure its library lacks, a temperature far
    outside it) is written NaN with status ``"unserved"`` and its reason, and the rest of the
    night is predicted; a frame whose state is implausible is predicted and ``"flagged"``
    (``deepdark.io.predictions``). ``batch_size`` frame-channels are in memory at a time.

    A physics-mode model runs its network only for the frames of the cameras and groups where it
    beat physics alone on validation by ``margin`` (``deepdark.model.selection``); the others get
    physics alone, and the network is not read when no frame needs it. The file's ``method``
    column says which, per frame; its attributes ``methods``, ``network_margin`` and
    ``network_loaded`` sum it up.
    """
    model = load_model(model_dir, device="cpu", generator=False)
    with Shard(shard) as s:  # fail early, before any file is written, on a foreign geometry
        check_geometry(model.card, s.geometry, where=f"shard {shard}")
    predict = model_predictor(model, area="active", device=device, batch_size=batch_size, margin=margin)
    runner = predict.runner
    provenance = {
        "method": "model",
        "model_name": model.name,
        "model_hash": model.hash,
        "model_path": str(Path(model_dir).resolve()),
    }
    if model.physics is not None:
        provenance["physics_hash"] = model.physics.get("sha256")
        provenance["network_margin"] = float(margin)
        provenance["transfer"] = json.dumps(transfer_summary(runner.physics))
        _log_selection(runner)
    else:
        log.warning("%s", strips_only_note(model.card["architecture"].get("preset")))
    return write_predictions(
        shard,
        out,
        predict,
        provenance,
        batch_size=batch_size,
        progress=progress,
        final_attrs=lambda: {"network_loaded": runner.network_loaded},
    )


def transfer_summary(physics) -> dict[str, str]:
    """{"camera/channel": how far the frame state trusts the overscan's row offsets}: the library's
    overscan-to-image transfer of each channel, for the QA page."""
    return {
        f"{camera}/{channel}": physics.transfer(camera, channel).describe()
        for camera, info in sorted(physics.cameras.items())
        for channel in info.channels
    }


def _log_selection(runner) -> None:
    """Where the network will be used, in one line."""
    if runner.selection is None:
        log.info("the model card records no validation of physics alone: the network predicts every frame")
    else:
        log.info("network margin %.4g: %s", runner.margin, runner.selection.describe())
