"""Deep-Dark-Net's losses (paper 2.5) and the ablation configurations of Table 2.

The discriminator outputs raw logits (``deepdark.model.nets.Discriminator``). Two adversarial forms:

* BCE terms use ``binary_cross_entropy_with_logits`` (sigmoid inside, numerically stable);
* MSE terms apply to the raw outputs with targets 1 (real) and 0 (fake), the LSGAN convention.

Mapping from the paper's formulas (x: input strips, y: real window, G(x): prediction)
------------------------------------------------------------------------------------
* ``L_MSE(D) = E_y[(D(y) - 1)^2]``: the paper writes only the real half; the discriminator also
  needs the fake half, so it is the LSGAN loss ``0.5 * (E[(D(x,y) - 1)^2] + E[D(x,G(x))^2])``.
* ``L_BCE(D)`` (configs 1, 3): ``0.5 * (BCE(D(x,y), 1) + BCE(D(x,G(x)), 0))`` - i.e. the
  maximisation of ``E[log D(y)] + E[log(1 - D(G(x)))]`` written as a loss to minimise.
* ``L_BCE(G) = E_x[log(1 - D(x, G(x)))]``: minimising it as written saturates (vanishing
  gradient while D rejects G's outputs), so, as in every practical implementation (Goodfellow et
  al. 2014; the pix2pix reference), it is implemented in the non-saturating form
  ``BCE(D(x,G(x)), 1) = -E[log sigmoid(D(x,G(x)))]``.
* ``L_MSE(G) = E_x[(D(x, G(x)) - 1)^2]`` as written.
* ``L_L1(G) = sum |y - G(x)|``: implemented as the mean, weighted by lambda (``l1_weight``,
  default 100 as in the pix2pix reference; the paper does not state it). The mean is the
  sum / N, so only the scale of lambda differs.

The discriminator loss is the average of its real and fake halves (x 0.5, as the reference does
to slow D relative to G).

Configurations (``LOSSES``; all add lambda * L1 to the generator):

=============  ==================================  =========
name           generator                            discrim.
=============  ==================================  =========
``pix2pix``    BCE(G) + L1         (config 1)       BCE(D)
``lsgan``      MSE(G) + L1         (config 2)       MSE(D)
``mixed``      MSE(G) + L1         (config 3)       BCE(D)
``deepdark``   BCE(G) + MSE(G) + L1 (Deep-Dark-Net) MSE(D)
``l1``         L1 only (no-GAN ablation)            none
=============  ==================================  =========
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# name -> (discriminator form, generator adversarial forms)
_TABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "deepdark": ("mse", ("bce", "mse")),
    "pix2pix": ("bce", ("bce",)),
    "lsgan": ("mse", ("mse",)),
    "mixed": ("bce", ("mse",)),
    # ablation: no adversarial term at all (the discriminator is not trained), to show what the
    # adversarial terms add to L1 alone
    "l1": ("none", ()),
}
LOSSES = frozenset(n for n in _TABLE if n != "l1")  # the paper's Table 2
ALL_LOSSES = frozenset(_TABLE)  # + the L1-only ablation


def _check_name(name: str) -> str:
    if name not in _TABLE:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(_TABLE))}")
    return name


@dataclass(frozen=True)
class LossConfig:
    name: str = "deepdark"
    l1_weight: float = 100.0

    def __post_init__(self):
        _check_name(self.name)
        if not self.l1_weight >= 0:
            raise ValueError(f"l1_weight must be >= 0, got {self.l1_weight}")

    @property
    def d_form(self) -> str:
        return _TABLE[self.name][0]

    @property
    def g_forms(self) -> tuple[str, ...]:
        return _TABLE[self.name][1]


def _cfg(cfg) -> LossConfig:
    return LossConfig(cfg) if isinstance(cfg, str) else cfg


def _adv(form: str, logits: torch.Tensor, target: float) -> torch.Tensor:
    t = torch.full_like(logits, target)
    if form == "bce":
        return F.binary_cross_entropy_with_logits(logits, t)
    return F.mse_loss(logits, t)


def discriminator_loss(cfg: LossConfig | str, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """D's loss: 0.5 * (loss(D(x, y), real) + loss(D(x, G(x)), fake)). ``d_fake`` should come
    from a detached G(x)."""
    form = _cfg(cfg).d_form
    if form == "none":
        return d_real.sum() * 0.0
    return 0.5 * (_adv(form, d_real, 1.0) + _adv(form, d_fake, 0.0))


def generator_loss(
    cfg: LossConfig | str, d_fake: torch.Tensor, fake: torch.Tensor, real: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """G's loss: the configuration's adversarial terms on D(x, G(x)) + l1_weight * mean|G(x)-y|.

    Returns ``(total, components)``; components (detached, summing to ``total``) are named
    ``"g_bce"``, ``"g_mse"`` (those of the configuration) and ``"g_l1"`` (already weighted).
    """
    cfg = _cfg(cfg)
    parts = {f"g_{form}": _adv(form, d_fake, 1.0) for form in cfg.g_forms}
    parts["g_l1"] = cfg.l1_weight * F.l1_loss(fake, real)
    total = sum(parts.values())
    return total, {k: v.detach() for k, v in parts.items()}
