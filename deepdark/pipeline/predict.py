"""The ``predict`` step: predicted darks of every frame-channel of a night's shard."""

from __future__ import annotations

from pathlib import Path

import torch

from deepdark.io.predictions import write_predictions
from deepdark.io.shards import Shard
from deepdark.model.files import check_geometry, load_model
from deepdark.model.runner import model_predictor
from deepdark.model.runtime import DEFAULT_BATCH_SIZE, DEFAULT_DEVICE


def predict_shard(
    model_dir: str | Path,
    shard: str | Path,
    out: str | Path,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = DEFAULT_DEVICE,
    progress: bool = True,
) -> Path:
    """Predicted darks of every frame-channel of ``shard`` over the whole active area -> ``out`` (HDF5).

    A frame the model cannot serve (a camera or an exposure its library lacks, a temperature far
    outside it) is written NaN with status ``"unserved"`` and its reason, and the rest of the
    night is predicted; a frame whose state is implausible is predicted and ``"flagged"``
    (``deepdark.io.predictions``). ``batch_size`` frame-channels are in memory at a time.
    """

    model = load_model(model_dir, device="cpu")
    with Shard(shard) as s:  # fail early, before any file is written, on a foreign geometry
        check_geometry(model.card, s.geometry, where=f"shard {shard}")
    predict = model_predictor(model, area="active", device=device, batch_size=batch_size)
    provenance = {
        "method": "model",
        "model_name": model.name,
        "model_hash": model.hash,
        "model_path": str(Path(model_dir).resolve()),
    }
    if model.physics is not None:
        provenance["physics_hash"] = model.physics.get("sha256")
    return write_predictions(shard, out, predict, provenance, batch_size=batch_size, progress=progress)
