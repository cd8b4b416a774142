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

    strips:  (strip_adu - median of that strip of the sample) / STRIP_SCALE_ADU
    physics: (physics_adu - level) / PHYSICS_SCALE_ADU,    level = median of the sample's A1 overscan strip

The level is the frame-channel's bias, taken from the strips, not from the predicted pixels, so
it is the same whichever crop or area (training crop, model window, whole active area) is fed to
the network: a crop's plane is exactly the crop of the window's plane. What remains is the dark
signal above bias (tens to a few thousand ADU), scaled to O(0.1-10), which the batch-norm
running statistics (``deepdark.training.batchnorm``, ``bn="running"``) normalise like any other feature.

Each strip is measured from its own median, in units of a few ADU of read noise: what a residual
model needs from the strips is what changes within them from frame to frame by a few ADU (the
glow in the optical black near the amplifier, interference along the rows or columns), while the
level (bias) and the dark level (temperature) are the physics plane's. Scaled by 1/65535 as the
paper's strips are, such changes are ~1e-4 of a plane whose constant part is ~0.02: beside the
physics plane's O(1) the first layer cannot see them, and its gradient is the constant part's.
Measured from the bias level instead, the optical-black strips still carry the dark level, which
follows the temperature over tens of units and buries the few-ADU changes (measured on simulated
darks with a varying glow: no gain over 6000 steps, against 2 % with each strip's own median). A
model trained before (card without ``strip_scale_adu``) keeps the paper's strip scaling
(:func:`physics_info`).

The physics model file travels *inside* the model directory (``MODEL_DIR/physics.h5``, its
SHA-256 on the card and checked on load): a model directory is self-contained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deepdark.io.units import adu_to_unit
from deepdark.model.nets import model_input

PHYSICS_INPUT = "physics"
PHYSICS_FILE = "physics.h5"
RESIDUAL_RANGE_ADU = 64.0  # the residual is bounded by +-R ADU around the physics prediction
PHYSICS_SCALE_ADU = 256.0  # physics plane = (physics - bias level) / this
STRIP_SCALE_ADU = 16.0  # strip planes = (strip - bias level) / this
NORMALISATION = (
    "level = median(A1 overscan strip of the sample); strips: (strip_adu - median(strip)) / strip_scale_adu; "
    "physics: (physics_adu - level) / physics_scale_adu; "
    "output = physics_adu + residual_range_adu * tanh(h), tanh(h) = 2 G(x) - 1"
)


def strip_level(a1: np.ndarray) -> np.ndarray:
    """Per-sample bias level (B,) in ADU: the median of each sample's A1 strip (B, rows, 46)."""
    a1 = np.asarray(a1)
    return np.median(a1.reshape(a1.shape[0], -1), axis=1).astype(np.float32)


def strip_offsets(a1: np.ndarray, a2: np.ndarray, a3: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each strip's per-sample median (B,) in ADU: what a physics-mode model's strip planes are
    measured from; an empty strip (a geometry without optical black) gets the bias level."""
    level = strip_level(a1)
    return tuple(strip_level(s) if np.asarray(s).size else level for s in (a1, a2, a3))


def physics_plane(physics_adu: np.ndarray, a1: np.ndarray, scale: float = PHYSICS_SCALE_ADU) -> np.ndarray:
    """The extra input plane (B, 1, H, W) float32 from physics predictions (B, H, W) in ADU."""
    p = np.asarray(physics_adu, dtype=np.float32)
    level = strip_level(a1)
    return ((p - level[:, None, None]) / np.float32(scale))[:, None]


def physics_input(a1, a2, a3, size: int, physics_adu, *, strip_scale=STRIP_SCALE_ADU, physics_scale=PHYSICS_SCALE_ADU):
    """The input (B, 4, size, size) of a physics-mode model: strips (B, size, ...) and the physics
    prediction (B, size, size) in ADU; ``strip_scale`` None: the paper's strip scaling (models
    trained before the strips were measured from the level)."""
    return model_input(
        a1,
        a2,
        a3,
        size,
        extra=physics_plane(physics_adu, a1, physics_scale),
        strip_offsets=strip_offsets(a1, a2, a3) if strip_scale else None,
        strip_scale=strip_scale or None,
    )


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
    """The card's physics section with ``path`` resolved inside ``model_dir``; ``strip_scale_adu``
    None for a model whose strips are scaled as the paper's (trained before it was recorded)."""
    info = dict((card.get("extra") or {}).get("physics") or {})
    if not info:
        raise ValueError(f"{model_dir}: physics-mode model card has no extra.physics section")
    info["path"] = Path(model_dir) / info.get("file", PHYSICS_FILE)
    info.setdefault("strip_scale_adu", None)
    return info
