"""Deep-Dark-Net's networks (paper 2.4) and the model's input step (paper 2.3).

Torch only: this module knows tensors, not files or frames.

Input step
----------
``model_input`` is the one place where raw strips become a model input: uint16 ADU strips A1
(B, size, 46), A2 (B, size, 4) and A3 (B, 4, size) are scaled to [0, 1] with
``deepdark.io.units.adu_to_unit``, each *whole 2-D strip* is resized bilinearly to (size, size)
(``align_corners=False``), as the paper does, and the three planes are stacked as channels.
Optional extra conditioning planes (B, k, size, size) are concatenated after them. A physics-mode
model measures each strip from its own median in units of a few ADU instead
(``strip_offsets``, ``strip_scale``; ``deepdark.model.conditioning``).

Generator (paper 2.4.2, Figure 5)
---------------------------------
A ResNet-style pix2pix generator with U-Net skip connections::

    stem   : ReflectionPad(3) + Conv7x7(in -> w) + norm + ReLU                  -> s0 (w, H)
    down l : Conv3x3 stride 2 (reflect pad 1) (w*2^(l-1) -> w*2^l) + norm + ReLU -> s_l (H / 2^l)
    blocks : n_blocks x [ReflPad1 Conv3x3 norm ReLU ReflPad1 Conv3x3 norm] + identity
    up l   : cat(x, s_l) (2 * w*2^l channels) -> x2 upsampling conv (-> w*2^(l-1)) + norm + ReLU
             for l = n_down .. 1
    head   : cat(x, s0) (2w) -> ReflectionPad(1) + Conv3x3 (-> 1) -> (tanh + 1) / 2

The skip connections (concatenating the same-scale encoder features into the input of each
upsampling stage and of the head) are the paper's change to the reference ResNet generator,
which has none. Upsampling is either ``"transpose"`` (ConvTranspose2d k3 s2 p1 op1, the
reference) or ``"resize"`` (nearest-neighbour x2 + ReflectionPad(1) + Conv3x3, which avoids the
checkerboard artefacts of strided transposed convolutions; costs 4x the transposed conv's MACs
because the conv runs at the higher resolution). The downsampling convs pad by reflection like
every other conv of the paper's generator (the reference pads them with zeros).

Normalisation and the absolute level (important)
------------------------------------------------
The strips carry the absolute bias / dark level of the frame. Batch norm in *training* mode
normalises every feature channel by the statistics of the current batch; with the paper's batch
size 1 that is per-image normalisation, which subtracts each channel's spatial mean and so can
erase the absolute level that the strips carry (a uniform offset of the input becomes a uniform
offset of the stem's features, removed by the first norm layer). In *eval* mode batch norm uses
its running statistics and the level survives. Therefore inference must run in eval mode: use
``Generator.predict`` (or ``model.eval()``). ``norm="instance"`` normalises per image in eval
mode too, so it always erases per-image constant offsets - including constant extra planes such
as frame scalars broadcast to a plane; ``norm="none"`` keeps everything.

Discriminator (paper 2.4.2)
---------------------------
Conditional PatchGAN on cat(A, B) (reference pix2pix ``basic``, n_layers=3, 70x70 receptive
field). Exact layer list for n_layers=3, width=64::

    Conv4x4 s2 p1 (in -> 64)             LeakyReLU(0.2)        (no norm on the first layer)
    Conv4x4 s2 p1 (64 -> 128)   + norm + LeakyReLU(0.2)
    Conv4x4 s2 p1 (128 -> 256)  + norm + LeakyReLU(0.2)
    Conv4x4 s1 p1 (256 -> 512)  + norm + LeakyReLU(0.2)
    Conv4x4 s1 p1 (512 -> 1)                               -> raw logits (B, 1, h, w)

i.e. the paper's "three convolutional layers" with stride 2 (64-128-256, channels doubling,
capped at 512), followed by the stride-1 layers that keep the feature-map size. A 1024 x 1024
window gives 126 x 126 patch logits; ``Discriminator.score`` averages them per image.

Weights are initialised as in the reference: ``init_weights(module, gain=0.02)`` draws conv /
linear weights from N(0, 0.02) and batch-norm scales from N(1, 0.02), biases 0. Pass ``seed=`` to
the constructors (or call ``torch.manual_seed`` first) for a reproducible build.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepdark.io.units import adu_to_unit

NORMS = ("batch", "instance", "none")
UPSAMPLES = ("transpose", "resize")


# ---------------------------------------------------------------------------------------------
# The model's input step
# ---------------------------------------------------------------------------------------------


def _as_float_tensor(x, name: str, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.to(dtype=torch.float32)
    else:
        t = torch.from_numpy(np.asarray(x, dtype=np.float32))
    if device is not None:
        t = t.to(device)
    if t.ndim != 3:
        raise ValueError(f"strip {name} must be batched (B, rows, cols), got {tuple(t.shape)}")
    return t


def model_input(
    a1, a2, a3, size: int, extra=None, *, device=None, strip_offsets=None, strip_scale: float | None = None
) -> torch.Tensor:
    """Raw ADU strips -> model input (B, 3 + k, size, size), float32 (the strips in [0, 1]).

    ``a1`` (B, size, 46), ``a2`` (B, size, 4), ``a3`` (B, 4, size): numpy arrays or tensors of raw
    ADU (any numeric dtype, normally uint16); strip widths are taken from the arrays. Each strip
    is scaled with ``adu_to_unit`` and resized as a whole 2-D image to (size, size) with bilinear
    interpolation (``align_corners=False``). ``extra``: optional (B, k, size, size) float planes
    of additional conditioning, concatenated after the three strip channels. ``device``: where to
    build the input (default: where the tensors are; CPU for numpy arrays).

    ``strip_scale`` (ADU): the strips are scaled as ``(strip - offset) / strip_scale`` instead,
    ``strip_offsets`` the three strips' offsets, each (B,) ADU per sample (the physics-mode
    models' inputs, ``deepdark.model.conditioning``).
    """
    size = int(size)
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    strips = [_as_float_tensor(a, n, device) for a, n in ((a1, "a1"), (a2, "a2"), (a3, "a3"))]
    dev = strips[0].device
    batch = strips[0].shape[0]
    scales = _strip_scaling(strip_offsets, strip_scale, batch, dev)
    planes = []
    for name, s, scale in zip(("a1", "a2", "a3"), strips, scales):
        if s.shape[0] != batch:
            raise ValueError(f"strip {name} has batch {s.shape[0]}, a1 has {batch}")
        s = scale(s.to(dev)).unsqueeze(1)  # (B, 1, rows, cols)
        planes.append(F.interpolate(s, size=(size, size), mode="bilinear", align_corners=False))
    if extra is not None:
        e = extra if isinstance(extra, torch.Tensor) else torch.from_numpy(np.asarray(extra))
        e = e.to(device=dev, dtype=torch.float32)
        if e.ndim != 4 or e.shape[0] != batch or tuple(e.shape[2:]) != (size, size):
            raise ValueError(f"extra must be (B={batch}, k, {size}, {size}), got {tuple(e.shape)}")
        planes.append(e)
    return torch.cat(planes, dim=1)


def _strip_scaling(offsets, scale: float | None, batch: int, dev) -> list:
    """The maps of the three raw ADU strips (B, rows, cols) to the network's units
    (:func:`model_input`)."""
    if scale is None:
        return [adu_to_unit] * 3
    if offsets is None or len(offsets) != 3:
        raise ValueError("strip_scale needs the three strips' offsets (strip_offsets)")
    inv = 1.0 / float(scale)

    def scaling(offset):
        off = torch.as_tensor(np.asarray(offset, dtype=np.float32)).to(device=dev).reshape(-1)
        if off.shape[0] != batch:
            raise ValueError(f"a strip offset has {off.shape[0]} values for a batch of {batch}")
        return lambda s: (s - off[:, None, None]) * inv

    return [scaling(o) for o in offsets]


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")


def _bias(norm: str) -> bool:
    # A batch norm's shift makes a conv bias redundant; instance norm (affine=False) and no norm
    # keep it (as the reference does for instance norm).
    return norm != "batch"


class ResnetBlock(nn.Module):
    """x + [ReflPad1 Conv3x3 norm ReLU ReflPad1 Conv3x3 norm](x)."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        b = _bias(norm)
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=b),
            _norm(norm, channels),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=b),
            _norm(norm, channels),
        )

    def forward(self, x):
        return x + self.body(x)


def _up(cin: int, cout: int, norm: str, upsample: str) -> nn.Sequential:
    b = _bias(norm)
    if upsample == "transpose":
        conv = [nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=b)]
    elif upsample == "resize":
        conv = [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3, bias=b)]
    else:
        raise ValueError(f"unknown upsample {upsample!r}; valid: {', '.join(UPSAMPLES)}")
    return nn.Sequential(*conv, _norm(norm, cout), nn.ReLU(True))


def init_weights(module: nn.Module, gain: float = 0.02, generator: torch.Generator | None = None):
    """Reference pix2pix 'normal' init: conv/linear weights ~ N(0, gain), biases 0; batch-norm
    scales ~ N(1, gain), shifts 0. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain, generator=generator)
            nn.init.zeros_(m.bias)
    return module


def _seeded_init(module: nn.Module, seed: int | None):
    g = None
    if seed is not None:
        g = torch.Generator(device="cpu")
        g.manual_seed(int(seed))
    init_weights(module, 0.02, generator=g)


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratorConfig:
    in_channels: int = 3
    width: int = 64
    n_blocks: int = 9
    norm: str = "batch"  # "batch" | "instance" | "none"
    upsample: str = "transpose"  # "transpose" | "resize"
    n_down: int = 2

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; valid: {', '.join(NORMS)}")
        if self.upsample not in UPSAMPLES:
            raise ValueError(f"unknown upsample {self.upsample!r}; valid: {', '.join(UPSAMPLES)}")
        for f in ("in_channels", "width", "n_blocks", "n_down"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{f} must be a whole number, got {v!r:.40}")
        for f in ("in_channels", "width"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1")
        if self.n_blocks < 0 or self.n_down < 0:
            raise ValueError("n_blocks and n_down must be >= 0")


PRESETS: dict[str, GeneratorConfig] = {
    # The paper: width 64 (64 x 2^l channels), two downsamplings, nine residual blocks, batch norm,
    # transposed-conv upsampling as in the reference. 11.74 M parameters, 823 GMAC per 1024 window.
    "paper": GeneratorConfig(width=64, n_blocks=9, norm="batch", upsample="transpose", n_down=2),
    # Laptop CPU: the same topology at a quarter of the width (1/16 of the MACs of every layer
    # that scales with width^2), four blocks (the bottleneck's receptive field still spans
    # > 70 px of the window), and resize-conv upsampling so no checkerboard pattern gets
    # superimposed on dark frames whose interesting structure is pixel-scale. 0.37 M parameters,
    # 44 GMAC per 1024 window (1/19 of "paper"; 1/32 of its parameters).
    "compact": GeneratorConfig(width=16, n_blocks=4, norm="batch", upsample="resize", n_down=2),
    # The default model: the compact generator with a fourth input plane, the classical
    # physics prediction, predicting a bounded residual on it (deepdark.model.conditioning), so
    # the network learns only what the physics model misses.
    "physics": GeneratorConfig(in_channels=4, width=16, n_blocks=4, norm="batch", upsample="resize", n_down=2),
}
# presets whose model is conditioned on the physics prediction (deepdark.model.conditioning)
PHYSICS_PRESETS = frozenset({"physics"})


class Generator(nn.Module):
    """Deep-Dark-Net generator; see the module docstring. Output (B, 1, H, W) in [0, 1]."""

    def __init__(self, cfg: GeneratorConfig | None = None, *, seed: int | None = None):
        super().__init__()
        cfg = cfg or GeneratorConfig()
        self.cfg = cfg
        w, norm, b = cfg.width, cfg.norm, _bias(cfg.norm)
        self.stem = nn.Sequential(
            nn.ReflectionPad2d(3),
            nn.Conv2d(cfg.in_channels, w, 7, bias=b),
            _norm(norm, w),
            nn.ReLU(True),
        )
        ch = [w * 2**l for l in range(cfg.n_down + 1)]  # channels at each scale
        self.down = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(ch[l - 1], ch[l], 3, stride=2, padding=1, padding_mode="reflect", bias=b),
                _norm(norm, ch[l]),
                nn.ReLU(True),
            )
            for l in range(1, cfg.n_down + 1)
        )
        self.blocks = nn.Sequential(*(ResnetBlock(ch[-1], norm) for _ in range(cfg.n_blocks)))
        # up[i] brings scale l = n_down - i to l - 1; its input is cat(x, skip_l): 2 * ch[l].
        self.up = nn.ModuleList(_up(2 * ch[l], ch[l - 1], norm, cfg.upsample) for l in range(cfg.n_down, 0, -1))
        self.head = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(2 * w, 1, 3, bias=True))
        _seeded_init(self, seed)

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this (2 ** n_down)."""
        return 2**self.cfg.n_down

    def check_input(self, x: torch.Tensor):
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected input (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        m = self.multiple
        if h % m or w % m:
            raise ValueError(f"input size {h}x{w} is not a multiple of {m} (2 ** n_down)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.stem(x)
        skips = [x]
        for d in self.down:
            x = d(x)
            skips.append(x)
        x = self.blocks(x)
        for u, s in zip(self.up, reversed(skips[1:])):
            x = u(torch.cat([x, s], dim=1))
        x = self.head(torch.cat([x, skips[0]], dim=1))
        return (torch.tanh(x) + 1.0) / 2.0

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: eval mode (batch-norm running statistics) under ``torch.inference_mode()``
        (the output is an inference tensor: it cannot enter autograd later); the module's previous
        train/eval mode is restored afterwards."""
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                return self(x)
        finally:
            self.train(was_training)


# ---------------------------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------------------------


class Discriminator(nn.Module):
    """Conditional PatchGAN on cat(A, B); raw logits (B, 1, h, w). Layer list: module docstring."""

    def __init__(
        self,
        in_channels: int = 3 + 1,
        width: int = 64,
        n_layers: int = 3,
        norm: str = "batch",
        *,
        seed: int | None = None,
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
        if n_layers < 1:
            raise ValueError("n_layers must be >= 1")
        b = _bias(norm)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):  # stride-2 layers
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(width * prev, width * mult, 4, stride=2, padding=1, bias=b),
                _norm(norm, width * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)  # stride-1 layers
        layers += [
            nn.Conv2d(width * prev, width * mult, 4, stride=1, padding=1, bias=b),
            _norm(norm, width * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(width * mult, 1, 4, stride=1, padding=1),
        ]
        self.model = nn.Sequential(*layers)
        self.in_channels = in_channels
        _seeded_init(self, seed)

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """``D(a, b)`` on cat(a, b) along channels, or ``D(ab)`` on an already stacked input."""
        x = a if b is None else torch.cat([a, b], dim=1)
        return self.model(x)

    @staticmethod
    def score(logits: torch.Tensor) -> torch.Tensor:
        """Per-image score: mean over patches (B,). Logits: apply ``torch.sigmoid`` first for a
        probability-like (BCE) reading."""
        return patch_score(logits)


def patch_score(logits: torch.Tensor) -> torch.Tensor:
    """Mean of the patch outputs per image: (B, 1, h, w) -> (B,)."""
    return logits.flatten(1).mean(dim=1)


# ---------------------------------------------------------------------------------------------
# Size accounting
# ---------------------------------------------------------------------------------------------


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _layer_macs(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(m, nn.Conv2d):
        # each output element: (in / groups) * kh * kw multiply-accumulates
        kh, kw = m.kernel_size
        return out.numel() * (m.in_channels // m.groups) * kh * kw
    if isinstance(m, nn.ConvTranspose2d):
        # each input element is scattered through (out / groups) * kh * kw weights
        kh, kw = m.kernel_size
        return inp.numel() * (m.out_channels // m.groups) * kh * kw
    if isinstance(m, nn.Linear):
        return out.numel() * m.in_features
    return 0


def count_macs(module: nn.Module, input_shape) -> int:
    """Multiply-accumulates of one forward pass of ``module`` on an input of ``input_shape``
    (batch included), counted exactly for Conv2d, ConvTranspose2d and Linear layers (biases,
    norms, activations, padding and resizing not counted). Runs on a meta-device copy: no memory
    or compute is spent and ``module`` is untouched. ``input_shape`` may be a list of shapes for
    modules with several inputs."""
    shapes = input_shape if isinstance(input_shape[0], (tuple, list, torch.Size)) else [input_shape]
    m = copy.deepcopy(module).to("meta").eval()
    total = 0

    def hook(mod, inputs, output):
        nonlocal total
        total += _layer_macs(mod, inputs[0], output)

    handles = [
        s.register_forward_hook(hook) for s in m.modules() if isinstance(s, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            m(*(torch.empty(tuple(s), device="meta") for s in shapes))
    finally:
        for h in handles:
            h.remove()
    return int(total)


def describe_presets(size: int = 1024) -> list[dict]:
    """One row per generator preset: ``{"preset", "params", "gmacs"}`` for one size x size window
    (batch 1), plus the default discriminator as a row named ``"discriminator"``."""
    rows = []
    for name, cfg in PRESETS.items():
        g = Generator(cfg)
        rows.append(
            {"preset": name, "params": count_params(g), "gmacs": count_macs(g, (1, cfg.in_channels, size, size)) / 1e9}
        )
    d = Discriminator()
    rows.append(
        {
            "preset": "discriminator",
            "params": count_params(d),
            "gmacs": count_macs(d, (1, d.in_channels, size, size)) / 1e9,
        }
    )
    return rows


def format_presets(rows: list[dict], size: int = 1024) -> str:
    """``describe_presets`` rows as a plain-text table."""
    lines = [f"{'preset':<14} {'params':>12} {f'GMACs/{size}px':>14}"]
    for r in rows:
        lines.append(f"{r['preset']:<14} {r['params']:>12,d} {r['gmacs']:>14.1f}")
    return "\n".join(lines)
