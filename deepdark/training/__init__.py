"""Training Deep-Dark-Net on a dark library: ``train(shards, out_dir, TrainConfig(...))``.

* ``config``: :class:`TrainConfig`, every setting of a run (also ``deepdark train``'s options);
* ``data``: the library's samples, their split by night (:func:`split_nights`), batches;
* ``batchnorm``: the generator's batch norm while training, its initial output level;
* ``checkpoint``: checkpoints, resume and the training log;
* ``validation``: the generator's and physics alone's errors on the validation nights;
* ``stopping``: early stopping and the best epoch's weights;
* ``loop``: :func:`train`, its epochs and steps, and the model file with where its network is used.

The names from ``data`` and ``loop`` are imported on first use, so that importing
:class:`TrainConfig` (the command line does) does not import torch.
"""

from __future__ import annotations

import importlib

from deepdark.training.config import TrainConfig

__all__ = ["TrainConfig", "TrainResult", "open_library", "split_nights", "train"]

_LAZY = {
    "TrainResult": "deepdark.training.loop",
    "train": "deepdark.training.loop",
    "open_library": "deepdark.training.data",
    "split_nights": "deepdark.training.data",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
