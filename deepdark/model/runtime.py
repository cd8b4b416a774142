"""Where and in which precision a network runs: device choice, autocast, a float32 output head."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from deepdark.io.errors import InputError
from deepdark.model.nets import Generator

DEFAULT_DEVICE = "auto"  # CUDA when available, else the CPU (see resolve_device)
DEFAULT_BATCH_SIZE = 4  # images per batch of inference


def resolve_device(device: str | torch.device = DEFAULT_DEVICE) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' asked for, but torch sees no CUDA GPU (use --device cpu or auto)")
    return dev


def autocast(device: torch.device):
    """Mixed precision on CUDA (float16), nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _autocast_on_cuda() -> bool:
    try:
        return torch.is_autocast_enabled("cuda")
    except TypeError:  # torch < 2.4: no device argument, CUDA implied
        return torch.is_autocast_enabled()


class _Float32Head(nn.Sequential):
    """An ``nn.Sequential`` that runs in float32 even under CUDA autocast."""

    def forward(self, x):
        if x.device.type == "cuda" and _autocast_on_cuda():
            with torch.autocast("cuda", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def fp32_head(generator: Generator) -> Generator:
    """Run the generator's output layer in float32 even under autocast (see module docstring).

    Changes the class of ``generator.head`` (an ``nn.Sequential``) to a float32 subclass: same
    modules, same state dict, same result outside autocast. Returns ``generator``.
    """
    if type(generator.head) is nn.Sequential:
        generator.head.__class__ = _Float32Head
    return generator
