"""The classical ``physics`` dark predictor: a per-pixel dark model of the library plus each
frame's own state.

A frame's predicted dark, per channel in readout coordinates, is

    dark(x) = bias(row of x)  +  t * (d1(x) 2^((T-T0)/tau1) + d2(x) 2^((T-T0)/tau2))  +  g(x)

* ``bias(row)``: the frame's own per-row bias from its overscan (:func:`row_bias`): a clipped mean
  of the overscan row after skipping its first ``overscan_skip`` columns (charge residue and
  settling in real cameras), then shrunk towards the frame's mean bias by the empirical-Bayes
  factor row_var / (row_var + estimate_var), both variances measured on the frame itself. A
  clipped mean, not a median: overscan pixels are integers with a read noise of a few ADU, and
  the median of 42 integers is both quantised and 1.57x noisier than the mean. How far the
  overscan's row offsets are trusted is the library's to say (``transfer``): where its frames show
  that they reach the active rows only partly, or not at all, the row bias is the frame's level
  plus the library's transfer coefficient times the overscan row offset instead (one level per
  frame when the coefficient is 0); ``FrameState.bias_source`` says which rule made each row.
* ``T``: the frame's effective temperature from its optical-black pixels minus its overscan (the
  masked-minus-virtual method of Kepler and TESS, :meth:`PhysicsModel.temperatures`): T is the
  value at which the library's per-pixel model of the OB pixels best matches them (generalised
  least squares over all channels of the frame; OB rows have no overscan row of their own, so
  their unknown row offsets enter as noise shared along the row, of the frame's row variance).
  It beats CCDTEMP (+-1 C control, a 1 C error is an 11 % dark error) because the OB level is
  measured on thousands of pixels of this very frame. Its uncertainty (statistical, plus a
  ``GLOW_SYS`` = 1 % systematic on the OB pixels' per-readout level) is combined with the
  header's (CCDTEMP, else SETTEMP; its scatter is measured on the library) by inverse variance:
  the OB estimate rules whenever the dark signal is well above the glow, the header takes over
  as the OB signal fades (bias frames, short cold exposures, where T hardly matters for the
  prediction). A precise OB estimate off the header by more than ``TEFF_MAX_OFFSET`` means the
  header is wrong: the frame is predicted at the OB estimate alone and flagged, with both values
  in the reason, so that the correction is right and the disagreement is seen. A geometry
  without optical black takes the header's temperature, and its source says so
  (:meth:`PhysicsModel.frame_report`); a zero-second frame needs none.
* ``d1, d2``: two dark-current components with doubling temperatures tau1 > tau2 that are global
  per camera (depletion-like and diffusion-like; the map's *shape* changes with temperature,
  which a per-pixel log-linear law cannot follow), ``g``: what comes with every readout
  (amplifier glow), independent of the exposure ``t``. Hot pixels, which have their own doubling
  temperature, get a third law: t * (h 2^((T-T0)/tau_h) + d2 2^(..tau2)) + g with tau_h per pixel.

Fitting a library (:func:`fit_physics`), per camera:

1. *Frame state* of every DARK/BIAS frame-channel (per-row bias, OB signals), clipped block
   means of its bias-subtracted active area and clipped means of its active rows. After the law
   (2), the *overscan transfer* per channel (:func:`measure_transfer`); where the library uses it,
   its frames' row bias is remade with it and the law fitted again.
2. *The law* (:func:`fit_law`): tau1, tau2 and every library frame's temperature, from clipped
   block means of all channels (a frame has one temperature): the active area's 10^6 pixels give
   each frame's temperature relative to the others of its (setpoint, exposure) group to a few
   hundredths of a degree; only the groups' absolute temperatures must come from the headers
   (0.5/sqrt(n) C), so they are fitted jointly with tau1, tau2 under a prior of that size. (A
   library without bias frames cannot fully tell an offset between its 10 s and 30 s frames from
   a per-readout term shaped like the dark map; the prior keeps that ambiguity at the size of the
   headers' error, and predictions stay consistent because OB maps and active maps share it.)
   With fewer than three setpoints the law has one component (tau fitted with two setpoints,
   the paper's 6.4 C with one).
3. *Per-pixel maps*, streamed in blocks of rows (bounded memory; pixels are independent, so the
   result does not depend on the block size): per-pixel weighted least squares over all frames
   with the design shared across pixels. Pass A (unweighted, clipped) measures every frame's
   noise variance, and from it the channel's inverse gain (variance vs signal, a photon transfer
   curve of the library); pass B weights every frame-pixel by 1/(its variance) and clips
   outliers (cosmic rays) beyond ``clip`` times the pixel's own robust residual scale. A
   per-pixel scale keeps random-telegraph pixels, whose states spread widely, unclipped, so their
   fitted dark is their *mean*, as it must be; group medians would pick one state.
4. *Smooth prior* (``smooth_px`` > 0): glow and the fast (diffusion) component are smooth on the
   pixel scale physically (light from the amplifier; carriers that diffuse tens of um), while the
   slow component carries the per-pixel DSNU and the polishing rings. Where a pixel's fitted
   (d2, g) agree with their spatial smooth (a chi-square test with the pixel's own covariance,
   false-alarm rate ``irregular_p``), they are replaced by the smooth and d1 is re-fitted given them (from
   the stored normal equations): two noisy parameters per pixel fewer, which is what brings the
   prediction close to the noise floor with a library of tens of frames. Pixels that disagree
   (near a sharp glow peak, hot pixels, defects) keep their own full fit: the data decide, per
   camera, how much the prior is used.

A library of bias frames only (zero-second readouts, BIAS or DARK with EXPTIME = 0) has no dark
current to fit: its law has no component, its maps the per-pixel readout pattern ``g`` alone,
and it predicts bias frames (the per-row bias plus ``g``) and nothing else.

Exposure times: scaling with ``t`` and arriving with each readout are told apart only by
darks of two exposure times, or darks plus bias frames (``separable``). A separable library
predicts any exposure from 0 to ``max_extrapolation`` (2) x its longest (the law is linear in t,
the intercept g is measured); a library of one exposure time only predicts that exposure, and
any other raises :class:`PhysicsError` ("library has only 30 s darks: cannot predict 10 s ...").
Temperatures outside the library's range extrapolate the two-component law up to a margin: the
slow doubling temperature times log2(``max_extrapolation``), the same factor in dark current that
exposures may be extrapolated by. A frame beyond it is not served (``predict`` lists it with the
distance in its reason and predicts the rest of the night).

Storage: one HDF5 file (float32 maps per camera and channel, the per-camera law as attributes,
the library's frame table), written atomically. Read back with :meth:`PhysicsModel.load`.

Predictors: :func:`physics_predictor` (``area="window"``: the model window, for
``deepdark.evaluation.evaluate``; ``area="active"``: the whole active area, for
``deepdark.io.predictions``), and :meth:`PhysicsModel.predict` /
:meth:`PhysicsModel.predict_rows` (strips and table rows in, the prediction out: the
conditioning input of a learned generator).

This package exports its public API; the fitting constants and helpers are in its modules
(``fit``, ``frame_state``, ``law``, ``model``, ``pixelfit``, ``transfer``).
"""

from __future__ import annotations

from .fit import fit_physics
from .frame_state import FrameState, frame_state, row_bias
from .law import Law, fit_law
from .merge import merge_physics
from .model import PhysicsError, PhysicsModel, physics_predictor
from .transfer import Transfer, measure_transfer

__all__ = [
    "FrameState",
    "Law",
    "PhysicsError",
    "PhysicsModel",
    "Transfer",
    "fit_law",
    "fit_physics",
    "frame_state",
    "measure_transfer",
    "merge_physics",
    "physics_predictor",
    "row_bias",
]
