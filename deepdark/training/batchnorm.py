"""The generator's batch norm while training, and its initial output level.

Batch norm (read this)
----------------------
The strips carry the absolute bias and dark level of a frame, and the level is most of a dark.
Batch norm in training mode normalises each feature channel by the statistics of the batch: with
the paper's batch size 1 that is per-image normalisation, which removes any uniform offset of
the input - a generator trained so cannot learn the level from the strips, and it computes a
different function at inference, which runs in eval mode on running statistics
(``Generator.predict``): on our simulated darks it reaches thousands of ADU of error there.
``bn`` chooses what the generator's batch-norm layers do while training (:func:`set_training_mode`):

* ``"running"`` (default): they normalise with their running statistics, exactly as at
  inference, and :func:`track_running_stats` updates those statistics after each forward pass
  (an exponential average of the batches' statistics with rate ``bn_momentum``, no gradient
  through it). Before the first step the statistics are set from one batch of training crops
  (:func:`calibrate_batchnorm`). Training and inference compute the same function and the level
  survives; the topology stays the paper's. (Freezing the statistics of the initial network
  instead diverges: they go stale as the weights grow.)
* ``"batch"``: the reference behaviour (batch statistics while training, running statistics at
  inference). Faithful to pix2pix; with small batches it cannot learn the level (see above).

``norm="none"`` / ``"instance"`` override the preset's normalisation instead (recorded on the
card; instance norm erases the level at inference too). The discriminator always uses batch
statistics, as the reference: it is not used at inference.

Output level
------------
The reference initialisation starts the generator at (tanh(0) + 1) / 2 = 0.5 = 32768 ADU while
darks lie near 0.02 (1000-2000 ADU): at the paper's learning rate Adam needs ~1e5 steps just to
move the output bias there. ``init_level=True`` (default) sets the output bias so that the
untrained generator predicts the mean level of the training targets (:func:`init_output_level`).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from deepdark.model.nets import Generator


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_training_mode(G: nn.Module, bn: str) -> None:
    """Generator in training mode; with ``bn="running"`` its batch-norm layers normalise with
    their running statistics (eval mode), which :func:`track_running_stats` keeps up to date."""
    G.train()
    if bn == "running":
        for m in _batchnorms(G):
            m.eval()


@contextlib.contextmanager
def track_running_stats(G: nn.Module, momentum: float):
    """While active, every forward pass of ``G`` updates each batch-norm layer's running
    statistics from its input *after* the layer has normalised with the previous ones:
    mean <- (1 - momentum) mean + momentum batch mean, var <- (1 - momentum) var + momentum
    E_batch[(x - mean)^2] (population variance, between images included); no gradient."""

    def hook(m, inputs, output):
        # called for every layer of every step: few tensor operations, no Module.__setattr__
        with torch.no_grad():  # no graph: the input needs no detach
            x = inputs[0]
            x = x if x.dtype == torch.float32 else x.float()
            running_mean, running_var = m.running_mean, m.running_var
            mean = x.mean(dim=(0, 2, 3))
            # second moment about the *running* mean, not the batch's: with batch 1 the batch
            # variance misses the variance between images (levels differ by far more than the
            # noise within one), and normalising by it blows level differences up ~100-fold
            var = (x - running_mean.float().view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3))
            # new tensors, not in-place: the old ones are saved for this pass's backward
            buffers = m._buffers
            buffers["running_mean"] = (1 - momentum) * running_mean + momentum * mean.to(running_mean.dtype)
            buffers["running_var"] = (1 - momentum) * running_var + momentum * var.to(running_var.dtype)
            m.num_batches_tracked.add_(1)

    handles = [m.register_forward_hook(hook) for m in _batchnorms(G)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate_batchnorm(G: nn.Module, x: torch.Tensor) -> None:
    """Set every batch-norm layer's running statistics to those of the batch ``x`` (one pass)."""
    bns = _batchnorms(G)
    if not bns:
        return
    saved = [m.momentum for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = 1.0  # running stats := this batch's
        G.train()
        G(x)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


@torch.no_grad()
def init_output_level(G: Generator, level: float) -> None:
    """Set the output layer's bias so that an untrained generator predicts ``level`` ([0, 1]).

    With the reference initialisation (weights ~ N(0, 0.02), bias 0) the generator starts at
    (tanh(0) + 1) / 2 = 0.5, i.e. 32768 ADU, while darks lie near 0.02 (~1000 ADU): at the paper's
    learning rate Adam needs ~1e5 steps only to walk the output bias there. Starting at the
    training targets' mean level leaves the steps to the part that varies.
    """
    conv = G.head[-1]
    level = min(max(level, 1e-6), 1 - 1e-6)
    conv.bias.fill_(math.atanh(2.0 * level - 1.0))
