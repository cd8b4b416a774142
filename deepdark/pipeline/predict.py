"""The ``predict`` step: predicted darks of every frame-channel of a night's shard."""

from __future__ import annotations

from pathlib import Path

import torch

from deepdark.io.predictions import write_predictions
from deepdark.io.shards import Shard
from deepdark.model.files import check_geometry, load_model
from deepdark.model.runner import model_predictor


def predict_shard(
    model_dir: str | Path,
    shard: str | Path,
    out: str | Path,
    batch_size: int = 4,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> Path:
    """Predicted darks of every frame-channel of ``shard`` over the whole active area -> ``out`` (HDF5)."""

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
