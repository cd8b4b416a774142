"""Physics conditioning of the generator: the default ``physics`` model.

A physics-mode model (card ``"inputs": ["a1", "a2", "a3", "physics"]``) predicts a frame-channel's
dark as a bounded *residual* on top of the classical physics prediction (``deepdark.physics``)::

    pred_adu = physics_adu + R * tanh(h),        R = card["extra"]["physics"]["residual_range_adu"]

where ``h`` is the generator's raw head output. The generator keeps the paper's topology and its
output ``(tanh(h) + 1) / 2``; ``tanh(h) = 2 * G(x) - 1``. Its output conv is initialised to zero
(weights and bias), so the untrained model *is* the physics prediction exactly; training moves it
only where the loss finds a systematic difference (a zero-initialised last layer still gets
gradients on its own weights at the first step, the rest follow).

Input: the paper's three strip planes (``deepdark.model.nets.model_input``) plus one extra plane, the
physics prediction of the same pixels, normalised as

    (physics_adu - level) / PHYSICS_SCALE_ADU,    level = median of the sample's A1 overscan strip

The level is the frame-channel's bias, taken from the strips, not from the predicted pixels, so
it is the same whichever crop or area (training crop, model window, whole active area) is fed to
the network: a crop's plane is exactly the crop of the window's plane. What remains is the dark
signal above bias (tens to a few thousand ADU), scaled to O(0.1-10), which the batch-norm
running statistics (``deepdark.training.batchnorm``, ``bn="running"``) normalise like any other feature.

The physics model file travels *inside* the model directory (``MODEL_DIR/physics.h5``, its
SHA-256 on the card and checked on load): a model directory is self-contained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deepdark.io.units import adu_to_unit

PHYSICS_INPUT = "physics"
PHYSICS_FILE = "physics.h5"
RESIDUAL_RANGE_ADU = 64.0  # the residual is bounded by +-R ADU around the physics prediction
PHYSICS_SCALE_ADU = 256.0  # physics plane = (physics - bias level) / this
NORMALISATION = (
    "(physics_adu - median(A1 overscan strip of the sample)) / physics_scale_adu; "
    "output = physics_adu + residual_range_adu * tanh(h), tanh(h) = 2 G(x) - 1"
)


def strip_level(a1: np.ndarray) -> np.ndarray:
    """Per-sample bias level (B,) in ADU: the median of each sample's A1 strip (B, rows, 46)."""
    a1 = np.asarray(a1)
    return np.median(a1.reshape(a1.shape[0], -1), axis=1).astype(np.float32)


def physics_plane(physics_adu: np.ndarray, a1: np.ndarray, scale: float = PHYSICS_SCALE_ADU) -> np.ndarray:
    """The extra input plane (B, 1, H, W) float32 from physics predictions (B, H, W) in ADU."""
    p = np.asarray(physics_adu, dtype=np.float32)
    level = strip_level(a1)
    return ((p - level[:, None, None]) / np.float32(scale))[:, None]


def compose(
    g_out: torch.Tensor, base_unit: torch.Tensor, residual_range_adu: float = RESIDUAL_RANGE_ADU
) -> torch.Tensor:
    """Prediction in [0, 1] units: physics (``base_unit``, [0, 1] units) + R tanh(h), from the
    generator's output ``g_out`` = (tanh(h) + 1) / 2."""
    r = float(adu_to_unit(float(residual_range_adu)))
    return base_unit + r * (2.0 * g_out.float() - 1.0)


def compose_adu(
    g_out: torch.Tensor, base_adu: torch.Tensor, residual_range_adu: float = RESIDUAL_RANGE_ADU
) -> torch.Tensor:
    """Prediction in ADU: ``base_adu + R * (2 g_out - 1)`` (float64 for the addition)."""
    return base_adu.double() + float(residual_range_adu) * (2.0 * g_out.double() - 1.0)


def base_unit(physics_adu: np.ndarray) -> torch.Tensor:
    """Physics predictions (B, H, W) ADU -> (B, 1, H, W) float32 [0, 1] units."""
    return adu_to_unit(torch.from_numpy(np.asarray(physics_adu, dtype=np.float32))).unsqueeze(1)


@torch.no_grad()
def zero_head(generator) -> None:
    """Output conv to zero: the untrained generator outputs 0.5 exactly, i.e. a zero residual."""
    conv = generator.head[-1]
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()


def is_physics_card(card: dict) -> bool:
    return PHYSICS_INPUT in list(card.get("inputs") or [])


def physics_info(card: dict, model_dir: str | Path) -> dict:
    """The card's physics section with ``path`` resolved inside ``model_dir``."""
    info = dict((card.get("extra") or {}).get("physics") or {})
    if not info:
        raise ValueError(f"{model_dir}: physics-mode model card has no extra.physics section")
    info["path"] = Path(model_dir) / info.get("file", PHYSICS_FILE)
    return info
