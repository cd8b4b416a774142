"""Early stopping on the validation nights, and the best epoch's generator.

After every epoch the validation RMSE is compared with the best so far: an epoch that lowers it by
at least ``min_improvement`` (a fraction of the best) is the new best, and its generator is kept in
``best-eNNNN.safetensors`` (:func:`save_best`; the one the checkpoint names is kept, older ones are
removed once the checkpoint no longer names them, so that a run killed between the two files
resumes with the best file its checkpoint names); training stops after ``patience`` epochs without one
(:meth:`EarlyStopping.should_stop`), and the model file gets the best epoch's weights. For a
physics-mode model the untrained generator, whose zero-initialised head predicts physics alone
exactly, is epoch 0: a network that never beats physics alone by the margin ends as physics alone.
Without validation nights (RMSE NaN) nothing is compared: every epoch of ``epochs`` runs and the
last one is the model.

The state (best epoch, its RMSE, physics alone's, the best file and its SHA-256) travels in the
checkpoint (``deepdark.training.checkpoint``), so a resumed run stops where an uninterrupted one
would, with the same best weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from deepdark.io.atomic import atomic_path
from deepdark.io.errors import InputError
from deepdark.model.files import file_sha256, read_safetensors, safetensors_metadata, state_tensors

BEST_FILE = "best-e{epoch:04d}.safetensors"


@dataclass
class EarlyStopping:
    """The best epoch so far and when to stop (see the module's description)."""

    patience: int
    min_improvement: float
    best_epoch: int | None = None  # 0: the untrained generator (physics alone for physics mode)
    best_rmse_adu: float | None = None
    physics_rmse_adu: float | None = None  # physics alone on the validation samples (physics mode)
    best_file: str | None = None
    best_sha256: str | None = None

    def improves(self, rmse: float) -> bool:
        """Whether ``rmse`` beats the best by at least ``min_improvement`` (always, for a first one)."""
        if rmse is None or not math.isfinite(rmse):
            return False
        return self.best_rmse_adu is None or rmse < self.best_rmse_adu * (1.0 - self.min_improvement)

    def should_stop(self, epoch: int) -> bool:
        """Whether the epochs up to ``epoch`` went ``patience`` epochs without a new best."""
        return self.patience > 0 and self.best_epoch is not None and epoch - self.best_epoch >= self.patience

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict | None, patience: int, min_improvement: float) -> EarlyStopping:
        """The state a checkpoint saved, with the (possibly changed) ``patience`` and ``min_improvement``."""
        known = {k: v for k, v in (state or {}).items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "patience": patience, "min_improvement": min_improvement})


def save_best(out_dir: Path, G: nn.Module, stopping: EarlyStopping, epoch: int, rmse: float) -> None:
    """``G``'s weights as the best so far (``best-eNNNN.safetensors``, atomic), noted in ``stopping``."""
    from safetensors.torch import save_file

    path = Path(out_dir) / BEST_FILE.format(epoch=epoch)
    with atomic_path(path) as tmp:
        save_file(state_tensors(G), str(tmp), metadata=safetensors_metadata(content="best generator", epoch=epoch))
    stopping.best_epoch, stopping.best_rmse_adu = epoch, float(rmse)
    stopping.best_file, stopping.best_sha256 = path.name, file_sha256(path)


def remove_stale_best(out_dir: Path, stopping: EarlyStopping) -> None:
    """Remove the best files ``stopping`` (as the checkpoint now records it) does not name."""
    for old in Path(out_dir).glob(BEST_FILE.replace("{epoch:04d}", "*")):
        if old.name != stopping.best_file:
            old.unlink(missing_ok=True)


def restore_best(out_dir: Path, G: nn.Module, stopping: EarlyStopping) -> None:
    """Load the best epoch's weights into ``G`` (nothing to do without a best epoch)."""
    if stopping.best_file is None:
        return
    path = Path(out_dir) / stopping.best_file
    if not path.is_file() or file_sha256(path) != stopping.best_sha256:
        raise InputError(
            f"{path}: the best epoch's weights are missing or do not match the checkpoint; "
            "train with resume=False (--no-resume) to start over"
        )
    G.load_state_dict(read_safetensors(path))


def remove_best(out_dir: Path) -> None:
    """Remove every best file (a run that starts over)."""
    remove_stale_best(out_dir, EarlyStopping(0, 0.0))
