"""Inference: a trained model turns the strips of frames into predicted darks, in ADU.

:func:`model_predictor` makes a plain callable ``(shard, sorted table rows) -> (k, rows, cols)
float32 ADU`` over one of two areas:

* ``"window"``: the model window (what the model was trained on and what
  ``deepdark.evaluation.evaluate`` scores, the paper's B);
* ``"active"``: the whole active area of every channel (1042 x 1042 on the LAMOST camera), which
  a corrected frame needs: the strips along the whole active area (``Shard.strips(rows)``) are
  resized to the active shape exactly as the window's strips are resized to the window, the input
  is padded by reflection to the network's multiple (1042 -> 1044: one row and column on each
  side), run, and cropped back. The network is fully convolutional, so the active area is one
  pass, without tiling seams.

``deepdark.pipeline.predict`` writes a night's predictions of the whole active area with
``deepdark.io.predictions.write_predictions`` (temporary name, renamed when complete), with the
model's name and hash as provenance.

The generator runs in eval mode (batch-norm running statistics, see ``deepdark.model.nets``) under
``torch.inference_mode`` (no autograd bookkeeping), batched (``batch_size`` channels per forward
pass), on CUDA under float16 autocast with a float32 output layer when a GPU is used, on the CPU
in float32 otherwise. The model's geometry and window must be the shard's: another camera
layout is refused with a message saying what differs.

Physics-mode models (card inputs ``a1, a2, a3, physics``; ``deepdark.model.conditioning``) are handled
transparently: the runner opens the physics model stored in the model directory, computes the
physics prediction of the same rows (window or whole active area), feeds its normalised plane as
the fourth channel and returns physics + R tanh(h).

Each row gets a verdict (:meth:`ModelRunner.serve_rows`, ``deepdark.io.predictions.Served``): a
physics-mode model serves, and flags, exactly what its physics model does (a frame the physics
cannot predict is not run through the network); a strips-only model serves every frame of its
geometry and flags those of a camera it was not trained on.

A physics-mode model runs its network only for the frames of the cameras and (setpoint,
exposure) groups where it beat physics alone on validation by ``margin``
(``deepdark.model.selection``); the others get the physics prediction alone, and the network is
not even read when no frame needs it. Each row records which (``Served.method``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deepdark.io.errors import InputError
from deepdark.io.predictions import FLAGGED, OK, UNSERVED, Served
from deepdark.io.shards import Shard
from deepdark.io.units import unit_to_adu
from deepdark.model import conditioning as C
from deepdark.model.files import LoadedModel, ModelError, check_geometry, load_model
from deepdark.model.nets import model_input
from deepdark.model.runtime import DEFAULT_BATCH_SIZE, DEFAULT_DEVICE, autocast, fp32_head, resolve_device
from deepdark.model.selection import DEFAULT_MARGIN, NETWORK, PHYSICS, PHYSICS_NETWORK, Selection

AREAS = ("window", "active")  # what a predictor covers: the model window, or the whole active area


class ModelRunner:
    """A model on a device: ``run(x)`` maps model inputs to ADU, ``batch_size`` at a time.

    ``margin``: a physics-mode model uses its network only where it beat physics alone on
    validation by this fraction (``deepdark.model.selection``). The generator is read on first
    use (:attr:`generator`); :attr:`network_loaded` says whether it was.
    """

    def __init__(
        self,
        model: LoadedModel | str | Path,
        device: str | torch.device = DEFAULT_DEVICE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        margin: float = DEFAULT_MARGIN,
    ):
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.model = model if isinstance(model, LoadedModel) else load_model(model, device="cpu", generator=False)
        self._generator = None
        self.batch_size = int(batch_size)
        self.margin = float(margin)
        self._checked: set[str] = set()
        info = self.model.physics
        self.physics = None
        self.residual_range_adu = None
        if info is not None:
            from deepdark.physics import PhysicsModel

            self.physics = PhysicsModel.load(info["path"])
            self.residual_range_adu = float(info.get("residual_range_adu", C.RESIDUAL_RANGE_ADU))
            self.physics_scale_adu = float(info.get("physics_scale_adu", C.PHYSICS_SCALE_ADU))
            self.strip_scale_adu = info["strip_scale_adu"]
            exptimes = self.model.card.get("training", {}).get("exptimes") or [0.0, math.inf]
            self.exposure_range = (min(exptimes), max(exptimes))
        self.cameras = tuple(self.model.card.get("training", {}).get("cameras") or ())
        # physics-mode models: where the network is used (None: everywhere, a card without one)
        try:
            self.selection = None if self.physics is None else Selection.from_card(self.model.card, self.margin)
        except InputError as exc:
            raise ModelError(f"{self.model.path}: {exc}") from None

    @property
    def generator(self):
        """The generator on the device, in eval mode, read when first needed."""
        if self._generator is None:
            self._generator = fp32_head(self.model.load_generator()).to(self.device).eval()
        return self._generator

    @property
    def network_loaded(self) -> bool:
        return self._generator is not None

    def predict_rows(self, shard: Shard, rows: np.ndarray, window: bool) -> np.ndarray:
        """Predicted darks (ADU) of table ``rows`` over the window or the whole active area;
        ``deepdark.physics.PhysicsError`` when the model cannot serve one (:meth:`serve_rows`)."""
        served = self.serve_rows(shard, rows, window)
        reason = served.unserved_reason()
        if reason is not None:
            from deepdark.physics import PhysicsError

            raise PhysicsError(reason)
        return served.dark

    def serve_rows(self, shard: Shard, rows: np.ndarray, window: bool) -> Served:
        """Predicted darks (ADU) of table ``rows`` with each row's verdict; NaN where unserved.

        A physics-mode model learned its residual on the library's exposure times only: for a
        frame exposed outside their range the network has never seen its input, so the physics
        prediction (which knows how dark current scales with exposure) answers alone; so it does
        where the network did not beat it on validation (:attr:`selection`). ``Served.method``
        says which, per row ("" for an unserved row).
        """
        self.check(shard)
        rows = np.asarray(rows)
        if self.physics is None:
            x, _ = self.inputs(shard, rows, window=window)
            status, reason = self._camera_verdicts(shard.table["camera"].to_numpy()[rows])
            return Served(self.run(x), status, reason, np.full(len(rows), NETWORK, dtype=object))
        phys = self.physics.serve_rows(shard, rows, window=window)
        dark = np.full_like(phys.dark, np.nan)
        method = np.full(len(rows), "", dtype=object)
        served = phys.status != UNSERVED
        dark[served] = phys.dark[served]
        method[served] = PHYSICS
        net = served & self._network_rows(shard, rows)
        if net.any():
            x, base = self.inputs(shard, rows[net], window=window, phys=phys.dark[net])
            dark[net] = self.run(x, base)
            method[net] = PHYSICS_NETWORK
        terms = None if phys.terms is None else phys.terms.only(~net)  # the network's darks are pixels
        return Served(dark, phys.status, phys.reason, method, terms)

    def _network_rows(self, shard: Shard, rows: np.ndarray) -> np.ndarray:
        """Which table ``rows`` a physics-mode model runs its network for: exposures inside the
        library's, in a camera or group where it beat physics alone (:attr:`selection`)."""
        from deepdark.io.tables import frame_setpoints

        tab = shard.table.iloc[rows]
        exptime = tab["exptime"].to_numpy(float)
        if "imagetyp" in tab:
            exptime = np.where(tab["imagetyp"].to_numpy() == "BIAS", 0.0, exptime)
        lo, hi = self.exposure_range
        inside = (exptime >= lo) & (exptime <= hi)
        if self.selection is None:
            return inside
        setpoints = frame_setpoints(tab, self.model.card.get("training", {}).get("setpoints"))
        return inside & self.selection.decisions(tab["camera"].to_numpy(), setpoints, exptime)

    def _camera_verdicts(self, cameras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A strips-only network reads only the frame's own strips, so it serves any camera of its
        geometry; one it was not trained on is flagged (its dark may differ in ways never seen)."""
        from deepdark.io.frames import UNKNOWN_CAMERA

        status, reason = np.full(len(cameras), OK, dtype=object), np.full(len(cameras), "", dtype=object)
        if self.cameras:
            for i, cam in enumerate(cameras):
                if cam not in self.cameras:
                    unnamed = cam in ("", UNKNOWN_CAMERA)
                    what = "no camera name in its header (no CAMERA card)" if unnamed else f"camera {cam!r}"
                    status[i] = FLAGGED
                    reason[i] = (
                        f"{what}: not among the model's training cameras ({', '.join(self.cameras)}); predicted by"
                        " the network all the same"
                    )
        return status, reason

    def inputs(
        self, shard: Shard, rows: np.ndarray, window: bool, phys: np.ndarray | None = None
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """Model inputs of table ``rows`` of ``shard`` over the window or the whole active area,
        and (physics-mode models) the physics prediction of the same pixels in ADU (else None);
        pass ``phys`` when it is already known."""
        rows = np.asarray(rows)
        s = shard.strips(rows, window=window)
        if window:
            size = shard.geometry.window_size
        else:
            ar, ac = shard.geometry.active.shape
            if ar != ac:
                raise ValueError(
                    f"{shard.path}: active area {ar} x {ac} is not square; the model's input step "
                    "(deepdark.model.nets.model_input) resizes strips to squares only"
                )
            size = ar
        if self.physics is None:
            return model_input(s["a1"], s["a2"], s["a3"], size), None
        phys = self.physics.predict_rows(shard, rows, window=window) if phys is None else phys
        x = C.physics_input(
            s["a1"],
            s["a2"],
            s["a3"],
            size,
            phys,
            strip_scale=self.strip_scale_adu,
            physics_scale=self.physics_scale_adu,
        )
        return x, phys

    def check(self, shard: Shard) -> None:
        key = f"{shard.path}"
        if key not in self._checked:
            check_geometry(self.model.card, shard.geometry, where=f"shard {shard.path}")
            self._checked.add(key)

    @torch.inference_mode()
    def run(self, x: torch.Tensor, base_adu: np.ndarray | None = None) -> np.ndarray:
        """Model inputs (B, C, H, W) in [0, 1] -> predictions (B, H, W), float32 ADU.

        Inputs whose sides are not multiples of the network's are padded by reflection (split
        evenly between both sides) and the output cropped back. Physics-mode models need
        ``base_adu`` (B, H, W), the physics prediction: the result is base + R tanh(h).
        Runs under ``torch.inference_mode``: nothing here is ever differentiated, and the output
        leaves as numpy.
        """
        if (base_adu is None) != (self.physics is None):
            raise ValueError(
                "a physics-mode model needs the physics prediction (base_adu), a strips-only model takes none"
            )
        m = self.generator.multiple
        h, w = x.shape[-2:]
        ph, pw = (-h) % m, (-w) % m
        top, left = ph // 2, pw // 2
        out = np.empty((x.shape[0], h, w), dtype=np.float32)
        for start in range(0, x.shape[0], self.batch_size):
            xb = x[start : start + self.batch_size].to(self.device)
            if ph or pw:
                xb = F.pad(xb, (left, pw - left, top, ph - top), mode="reflect")
            with autocast(self.device):
                y = self.generator(xb)
            y = y[:, 0, top : top + h, left : left + w].float()
            if base_adu is None:
                out[start : start + len(xb)] = unit_to_adu(y.double()).cpu().numpy().astype(np.float32)
            else:
                b = torch.from_numpy(np.asarray(base_adu[start : start + len(xb)], dtype=np.float64))
                out[start : start + len(xb)] = C.compose_adu(y.cpu(), b, self.residual_range_adu).numpy()
        return out


def model_predictor(
    model_dir: str | Path | LoadedModel | ModelRunner,
    area: str = "window",
    device: str | torch.device = DEFAULT_DEVICE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    margin: float = DEFAULT_MARGIN,
) -> Callable[[Shard, np.ndarray], np.ndarray]:
    """A predictor ``(shard, sorted table rows) -> (k, rows, cols)`` ADU of a trained model.

    Parameters
    ----------
    model_dir
        A model directory, a loaded model, or a runner to share.
    area
        ``"window"``: the model window (k, S, S), for ``deepdark.evaluation.evaluate``;
        ``"active"``: the whole active area (k, AR, AC), for ``write_predictions``.
    device, batch_size
        Where the generator runs and how many channels go in one forward pass (a given
        runner keeps its own).
    margin
        A physics-mode model runs its network only where it beat physics alone on validation by
        this fraction (``deepdark.model.selection``; a given runner keeps its own).

    The predictor's ``runner`` attribute is the :class:`ModelRunner` it uses; its ``serve``
    attribute gives the same predictions with each row's verdict (:meth:`ModelRunner.serve_rows`;
    ``write_predictions`` uses it), where the predictor raises.
    """
    window = _is_window(area)
    runner = model_dir if isinstance(model_dir, ModelRunner) else ModelRunner(model_dir, device, batch_size, margin)

    def predict(shard: Shard, rows: np.ndarray) -> np.ndarray:
        return runner.predict_rows(shard, rows, window=window)

    def serve(shard: Shard, rows: np.ndarray) -> Served:
        return runner.serve_rows(shard, rows, window=window)

    predict.runner = runner
    predict.serve = serve
    return predict


def _is_window(area: str) -> bool:
    if area not in AREAS:
        raise ValueError(f"area must be one of {', '.join(AREAS)}, got {area!r}")
    return area == "window"
