"""Where a physics-mode model's network is used: only where it beat physics alone on validation.

A physics-mode model predicts physics + a learned residual (``deepdark.model.conditioning``). The
residual is worth its cost (the network costs ~200x the physics prediction) only where it lowers
the error of physics alone: after training, the validation darks are scored with physics alone
and with physics + network, per camera and per (camera, setpoint, exposure) group, and the card
records both RMSEs and the decision (``card["selection"]``, :func:`selection_record`).

The rule (:func:`uses_network`): the network is used for a group whose validation RMSE it lowered
by at least ``margin`` (a fraction of physics alone's, default :data:`DEFAULT_MARGIN`):
``network <= physics * (1 - margin)``. A frame of a group the validation nights did not have
follows its camera's pooled decision; a frame of a camera they did not have gets physics alone
(nothing says the network helps there). Inference applies the rule again with its own margin
(``deepdark predict --margin``), from the RMSEs on the card.

A predictions file names, per frame, what predicted it (:data:`PHYSICS`, :data:`PHYSICS_NETWORK`,
or :data:`NETWORK` for the paper's strips-only presets, which have no physics prediction to fall
back on). A card without a selection (a model trained before it was recorded) uses its network
for every frame, as then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from deepdark.io.errors import InputError
from deepdark.io.units import pooled_rmse

PHYSICS = "physics"  # the physics prediction alone
PHYSICS_NETWORK = "physics+network"  # physics plus the network's residual
NETWORK = "network"  # a strips-only network (no physics prediction)
DEFAULT_MARGIN = 0.005  # the network must lower physics alone's validation RMSE by 0.5 %
RULE = (
    "the network is used for a (camera, setpoint, exposure) group whose validation RMSE it lowered by at least"
    " `margin` (network <= physics x (1 - margin)); a group without validation darks follows its camera's"
    " pooled decision; a camera without them gets physics alone"
)
GROUP_KEYS = ("camera", "setpoint", "exptime")


def uses_network(physics_rmse: float | None, network_rmse: float | None, margin: float) -> bool:
    """Whether the network's validation RMSE beat physics alone's by at least ``margin``."""
    if physics_rmse is None or network_rmse is None or not np.isfinite([physics_rmse, network_rmse]).all():
        return False
    # strictly lower too: a tie (two zeros, a group the physics fit had seen) is no gain
    return bool(network_rmse < physics_rmse and network_rmse <= physics_rmse * (1.0 - margin))


def _scores(errors: pd.DataFrame, keys: Sequence[str], margin: float) -> list[dict]:
    """One record per group of ``keys``: samples, both RMSEs (ADU), the gain and the decision."""
    rows = []
    for key, part in errors.groupby(list(keys), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        n = int(part["n"].sum())
        phys = pooled_rmse(float(part["se_physics"].sum()), n)
        net = pooled_rmse(float(part["se_network"].sum()), n)
        rec = {k: (str(v) if k == "camera" else float(v)) for k, v in zip(keys, key)}
        rec.update(
            n_samples=len(part),
            physics_rmse_adu=round(phys, 4),
            network_rmse_adu=round(net, 4),
            gain=round(1.0 - net / phys, 5) if phys > 0 else None,
            network=uses_network(phys, net, margin),
        )
        rows.append(rec)
    return rows


def selection_record(errors: pd.DataFrame, margin: float = DEFAULT_MARGIN, **context) -> dict:
    """The card's ``selection`` section from per-sample validation errors.

    ``errors``: one row per validation sample with ``camera``, ``setpoint``, ``exptime``,
    ``se_physics`` and ``se_network`` (sums of squared errors, ADU^2) and ``n`` (pixels).
    ``context``: anything else to record (region, nights, best epoch).
    """
    cameras = _scores(errors, ("camera",), margin)
    groups = _scores(errors, GROUP_KEYS, margin)
    return {"rule": RULE, "margin": float(margin), **context, "cameras": cameras, "groups": groups}


def strips_only_record(preset: str) -> dict:
    """The card's ``selection`` section of a strips-only preset: nothing to fall back on."""
    return {"fallback": None, "decision": strips_only_note(preset)}


def strips_only_note(preset: str) -> str:
    return (
        f"preset {preset!r} takes the strips only: there is no physics prediction to fall back on, the"
        " network predicts every frame whether or not it beats anything"
    )


def _group_key(record: dict) -> tuple[str, float, float]:
    return str(record["camera"]), float(record["setpoint"]), float(record["exptime"])


@dataclass(frozen=True)
class Selection:
    """The rule applied to a card's recorded validation RMSEs with a given ``margin``."""

    margin: float
    cameras: dict[str, bool]
    groups: dict[tuple[str, float, float], bool]

    @classmethod
    def from_card(cls, card: dict, margin: float = DEFAULT_MARGIN) -> Selection | None:
        """The selection of a physics-mode card; None when the card records none (older models:
        the network for every frame)."""
        rec = card.get("selection") or {}
        if "cameras" not in rec:
            return None

        def decision(r: dict, where: str) -> bool:
            for key in ("physics_rmse_adu", "network_rmse_adu"):
                v = r.get(key) if isinstance(r, dict) else None
                if not (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))):
                    raise InputError(f"card field selection.{where}.{key} must be a number or null, got {v!r:.40}")
            return uses_network(r["physics_rmse_adu"], r["network_rmse_adu"], margin)

        try:
            cameras = {str(r["camera"]): decision(r, f"cameras[{i}]") for i, r in enumerate(rec["cameras"])}
            groups = {_group_key(r): decision(r, f"groups[{i}]") for i, r in enumerate(rec.get("groups", []))}
        except InputError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"card's selection is not valid ({type(exc).__name__}: {exc})") from None
        return cls(float(margin), cameras, groups)

    @property
    def any_network(self) -> bool:
        """Whether any camera or group may use the network."""
        return any(self.cameras.values()) or any(self.groups.values())

    def use(self, camera: str, setpoint: float, exptime: float) -> bool:
        """The decision for one frame (see the module's rule)."""
        for (cam, sp, t), decision in self.groups.items():
            if cam == camera and np.isclose(sp, setpoint) and np.isclose(t, exptime):
                return decision
        return self.cameras.get(str(camera), False)

    def decisions(self, cameras: Sequence[str], setpoints: Sequence[float], exptimes: Sequence[float]) -> np.ndarray:
        """:meth:`use` for every row (bool array)."""
        return np.array([self.use(c, float(s), float(t)) for c, s, t in zip(cameras, setpoints, exptimes)], bool)

    def describe(self) -> str:
        """One line: which cameras get the network, and for how many of their validated groups."""
        parts = []
        for cam, decision in sorted(self.cameras.items()):
            mine = [d for (c, _, _), d in self.groups.items() if c == cam]
            if decision or any(mine):
                parts.append(f"{cam}: physics+network ({sum(mine)} of {len(mine)} validated groups)")
            else:
                parts.append(f"{cam}: physics alone")
        return "; ".join(parts) or "no camera validated: physics alone"
