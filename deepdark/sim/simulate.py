"""Seeded simulator of LAMOST guide-camera raw archives: test and benchmark data, never used by the pipeline.

Physics (each channel built in readout coordinates, amplifier at local (0, 0); electrons e-, ADU):

* Dark current (e-/s) = depletion part plus a diffusion part doubling every 3.6 C (bulk diffusion
  ~ n_i^2, Janesick, *Scientific CCDs*), 10-25 % of the total at -15 C with its own broad-gradient
  map, so the map's *shape* changes with temperature. The depletion part's doubling temperature
  (7.3-8.6 C) is set per camera so that the total doubles every 6.4 C at -15 C (paper 2.1).
  Normalised to 8 e-/s mean over active pixels at -15 C: ~240 e- in a 30 s dark (paper 2.1).
* Spatial non-uniformity of the depletion part: concentric polishing rings (paper fig. 2, CMP),
  centred in *sensor* coordinates so they run continuously across the four channels, times a
  smooth gradient, times per-pixel lognormal DSNU.
* Hot pixels with their own doubling temperature; random-telegraph (RTS) pixels whose high/low
  dark-rate state is drawn per frame; amplifier glow A*exp(-r/L), electrons per *readout*
  (independent of exposure), decaying from the amplifier: the two features of real darks that a
  smooth dark-current map lacks.
* Optical black (ob_cols, ob_rows) is real, masked silicon: dark current and glow, never light.
  Prescan, invalid, amplifier, corner, overscan and the middle row are virtual: bias + readout
  noise only, plus a small pull-up transient in the prescan and previous-row residue in the
  amplifier columns (paper 2.2, regions A and C).
* Per frame: actual temperature = setpoint + jitter (control precision +-1 C, paper 2.3); header
  CCDTEMP = actual + sensor error; per-channel bias drift; a per-row offset common to the whole
  row (overscan and OB included: the overscan reveals it); Poisson shot noise; Gaussian read
  noise; cosmic rays; floor to integer ADU; saturation at 65535.

Effects the physics model does not describe (``EFFECTS``; off by default, so that an archive
simulated without them is byte-identical to one from before they existed). Each changes from frame
to frame and shows in that frame's own strips, so a learned model can follow what a per-pixel law
with a constant glow and a per-row bias cannot:

* ``"amp_glow"``: the glow of each channel's output amplifier follows the amplifier's state, which
  changes between readouts: the channel's glow is multiplied by exp(s z - s^2/2), z ~ N(0, 1) per
  frame and channel (mean factor 1), s per camera in ``AMP_GLOW_SIGMA``. Glow is charge in the
  silicon: the optical-black columns and rows next to the amplifier show the frame's factor.
* ``"pickup"``: interference in the readout chain locked to the pixel clock: every pixel read in
  column c gets a (z1 sin(2 pi c / P) + z2 cos(2 pi c / P)) ADU, the same in every row of the
  frame, so a stripe pattern along the columns whose amplitude and phase change from frame to
  frame (z1, z2 ~ N(0, 1) per frame and channel); the period P per channel in
  ``PICKUP_PERIOD_PX``, a per camera in ``PICKUP_ADU``. The optical-black rows, read above the
  same columns, show the frame's stripes.

Strength of the fixed pattern (``pattern_scale``, default 1): every deviation of the dark current
from a uniform map that stays the same from frame to frame (ring amplitude, both maps' gradients
and the diffusion map's curvature, the DSNU's log-sigma, the hot and RTS pixels' extra rates) is
multiplied by it; 0 leaves a uniform dark current whose only change is its level with the
temperature, glow aside. The same random draws are made whatever the scale, so one camera's
patterns at two scales differ only in their strength; at 1 the archive is byte-identical to one
from before the option existed, and any other scale is recorded in the header (``SIMPATT``).

A frame's draw (:class:`EffectState`) is recorded in its header (``SIMEFF``, ``SIMGLOW<ch>``,
``SIMPICK<ch>``) and enters the expected dark, so DDFLOOR stays the noise no predictor can remove.

Expected dark (``expected_dark``) = E[ADU] without light: bias + drift + row offsets + (dark at the
*actual* temperature x exptime + glow + RTS mean)/gain + prescan transient + amplifier residue
- 0.5 (the floor's mean). Shot, read noise, cosmic rays, RTS state and quantisation are the noise
no predictor can remove; DDFLOOR<ch> records its RMS (ADU) inside the model window.

Consequences worth knowing: the total doubles every 6.4 C at -15 C but the diffusion part steepens
it when warmer, so a -5 C / -25 C dark ratio is ~9-10 rather than exactly 2^(20/6.4) = 8.7. RTS amplitudes are kept
modest (1-4x the mean rate) and cosmic rays at 2 /cm^2/min so that DDFLOOR stays within a few
per cent of sqrt(read^2 + shot)/gain. Shot noise is exact (``rng.poisson``, no normal
approximation): ~0.2 s for a full 2094 x 2200 frame on one core; a full-size model is ~60 MB.

API: ``camera_model`` (cached ``CameraModel.build``, both with ``pattern_scale``),
``simulate_frame`` -> ``SimFrame``, ``expected_dark``, ``render_light``, ``frame_rng``,
``simulate_archive``; ``EFFECTS``, ``effect_params``, ``draw_effects`` -> ``EffectState``.
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from astropy.io import fits
from tqdm import tqdm

from deepdark.io.errors import InputError
from deepdark.io.frames import FLOOR_KEY, Keywords, write_raw_frame
from deepdark.io.geometry import DEFAULT_GEOMETRY, Geometry, load_geometry
from deepdark.io.units import SATURATED

F32 = np.float32
# -- dark current ----------------------------------------------------------------------------
T_REF = -15.0  # C: daily operating temperature (paper 2.1, 3.1)
DARK_RATE_REF = 8.0  # e-/s mean over active pixels at T_REF: 240 e- in 30 s (paper 2.1)
TOTAL_DOUBLING_C = 6.4  # the total dark current halves every 6.4 C near T_REF (paper 2.1, fig. 1)
DIFF_DOUBLING_C = 3.6  # diffusion ~ n_i^2 (E_g ~ 1.12 eV) doubles every ~3.6 C near -15 C
DIFF_SHARE = (0.10, 0.25)  # diffusion share of the total at T_REF: minor but shape-changing
FULL_ACTIVE = 1042  # active columns of a full channel: lengths below are full-size pixels
RING_PERIOD_PX = (100.0, 250.0)  # CMP ring spacing (paper fig. 2), scaled with the active size
RING_AMPLITUDE = (0.10, 0.20)  # +-10-20 % modulation: clearly visible after ZScale (paper fig. 2)
RING_CENTRE = (0.15, 0.85)  # centre as a fraction of the sensor: on the sensor (paper fig. 2)
DEP_GRADIENT = 0.10  # +- share of a smooth linear gradient of the depletion map
DIFF_GRADIENT = (0.3, 0.6)  # diffusion map: stronger broad gradient, different direction
DIFF_CURVATURE = 0.2  # ... and a bowl, brighter towards the sensor's edges
DSNU_SIGMA = (0.05, 0.10)  # per-pixel lognormal dark-signal non-uniformity
HOT_FRACTION = (1e-4, 3e-4)  # share of real pixels that are hot (typical for a KAF CCD)
HOT_FACTOR = (10.0, 200.0)  # hot-pixel extra rate / mean rate, log-uniform
HOT_DOUBLING_C = (5.0, 8.0)  # each hot pixel's own doubling temperature (field-enhanced)
RTS_FRACTION = (5e-5, 1e-4)  # share of real pixels with random-telegraph dark current
RTS_FACTOR = (1.0, 4.0)  # RTS high-state extra rate / mean rate, log-uniform
RTS_P_HIGH = (0.2, 0.8)  # per-pixel probability of the high state in a frame
GLOW_E = (100.0, 300.0)  # glow electrons per readout at the active corner nearest the amp
GLOW_CHANNEL_SPREAD = 0.3  # each channel's amplifier glows +-30 % of the camera's level
GLOW_LENGTH_PX = (60.0, 200.0)  # glow e-folding length, scaled with the active size ...
GLOW_MIN_LENGTH_PX = 6.0  # ... but never below 6 px, so small test geometries show it
# -- readout chain ---------------------------------------------------------------------------
GAIN = (1.3, 1.8)  # e-/ADU per channel
BIAS_ADU = (800.0, 2000.0)  # bias level per channel
READ_NOISE_E = (10.0, 15.0)  # camera read noise; channels differ by +-5 %
ROW_NOISE_ADU = (1.0, 3.0)  # sd of the per-row offset (common to the row, overscan included)
BIAS_DRIFT_ADU = 2.5  # sd of the per-channel bias change between frames
PRESCAN_PULL_ADU = (15.0, 60.0)  # prescan pull-up transient at its first column (paper 2.2 A)
PRESCAN_TAU_PX = 0.7  # ... decaying over about a pixel
AMP_RESIDUE = (0.002, 0.005)  # amplifier columns: share of the previous row's mean signal (C)
# -- frame conditions ------------------------------------------------------------------------
TEMP_JITTER_SD, TEMP_JITTER_MAX = 0.5, 1.0  # actual - setpoint: control precision +-1 C (2.3)
TEMP_SENSOR_SD = 0.5  # CCDTEMP measurement error, then rounded to 0.1 C
READOUT_S = 2.0  # readout time (1.15 Mpx per amplifier at ~1 MHz): CRs, schedule
CR_RATE = 2.0 / 60.0  # cosmic rays per cm^2 per s (sea level muons + radioactivity)
PIXEL_CM = 24e-4  # KAF-4320 pixel pitch, 24 um
CR_CHARGE_E = (1000.0, 10000.0)  # electrons per event, log-uniform (~80 e-/um in 20-60 um silicon)
CR_LENGTH_PX = (0.0, 6.0)  # projected track length, px
# -- light (guide frames) --------------------------------------------------------------------
SKY_RATE = (6.0, 14.0)  # e-/s per pixel: a few hundred e- in 30 s
SKY_GRADIENT = 0.15  # +- share of a linear sky gradient across the sensor
STARS_PER_SENSOR = 150  # mean stars on a full 2084 x 2084 sensor ...
MIN_STARS = 3  # ... but a guide frame always has a few (small geometries too)
STAR_FLUX = (100.0, 2e5)  # e-/s: faintest, brightest
STAR_SLOPE = 0.8  # N(>F) ~ F^-0.8: power-law star counts
FWHM_PX = (3.0, 5.0)  # seeing-limited PSF, Gaussian
GUIDE_EXPTIMES = (5.0, 10.0, 30.0, 60.0)
# -- effects the physics model does not describe (off by default) -----------------------------
EFFECTS = ("amp_glow", "pickup")
AMP_GLOW_SIGMA = (0.3, 0.5)  # sd of ln(glow factor) between readouts, per camera
PICKUP_ADU = (4.0, 8.0)  # sd of each quadrature of the pickup between frames, ADU, per camera
PICKUP_PERIOD_PX = (6.0, 16.0)  # columns per pickup cycle, per channel
# -- rng domains: distinct first words keep model and frame streams apart ----------------------
_MODEL_TAG, _FRAME_TAG, _EFFECT_TAG = 0x5EED_CA3E, 0x5EED_F4A3, 0x5EED_EFEC
_KIND_CODE = {"dark": 1, "bias": 2, "guide": 3}
_IMAGETYP = {"dark": "DARK", "bias": "BIAS", "guide": "OBJECT"}


def _u(rng, lohi, size=None):
    return rng.uniform(lohi[0], lohi[1], size)


def _logu(rng, lohi, size=None):
    return np.exp(rng.uniform(math.log(lohi[0]), math.log(lohi[1]), size))


def _geometry(geometry: str | Geometry) -> Geometry:
    return geometry if isinstance(geometry, Geometry) else load_geometry(geometry)


def camera_code(camera: str) -> int:
    """A stable integer for a camera id (rng entropy); crc32 does not change between runs."""
    return zlib.crc32(camera.encode())


def _sensor_coords(g: Geometry, ch) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre sensor (mosaic) coordinates of every readout pixel of ``ch``: rows (R, 1), cols (1, C).

    Active pixels land on the mosaic tile of ``g.mosaic``; optical-black pixels just outside it, at
    the sensor edge nearest the channel's amplifier, where they physically are.
    """
    (rows, cols), a = g.channel_shape, g.active
    ar, ac = a.shape
    i, j = ch.row0 // rows, ch.col0 // cols
    lr, lc = np.arange(rows) - a.r0, np.arange(cols) - a.c0
    y = i * ar + (ar - 1 - lr if ch.flip_rows else lr) + 0.5
    x = j * ac + (ac - 1 - lc if ch.flip_cols else lc) + 0.5
    return y[:, None].astype(F32), x[None, :].astype(F32)


@dataclass
class CameraModel:
    """The fixed physics of one camera; per-channel arrays are (n_channels, rows, cols) float32."""

    camera: str
    seed: int
    geometry: Geometry
    gain: np.ndarray  # e-/ADU per channel
    read_noise_e: np.ndarray  # e- per channel
    bias: np.ndarray  # ADU per channel
    row_noise_adu: float
    diffusion_share: float

    @property
    def dep_doubling(self) -> float:
        """Depletion doubling temperature that makes the *total* rate double every 6.4 C at T_REF:
        d ln(rate)/dT is the share-weighted mean of the parts' slopes."""
        s = self.diffusion_share
        return (1 - s) / (1 / TOTAL_DOUBLING_C - s / DIFF_DOUBLING_C)

    dep: np.ndarray  # depletion dark rate at T_REF, e-/s (0 on virtual pixels)
    diff: np.ndarray  # diffusion dark rate at T_REF, e-/s (0 on virtual pixels)
    glow: np.ndarray  # e- per readout (0 on virtual pixels)
    real: np.ndarray  # bool: optical black + active
    prescan: np.ndarray  # (n_channels, prescan cols) ADU transient
    residue: np.ndarray  # per channel share of the previous row's signal in amplifier columns
    hot_idx: np.ndarray  # flat indices into (n_channels, rows, cols)
    hot_rate: np.ndarray  # extra e-/s at T_REF
    hot_doubling: np.ndarray  # C
    rts_idx: np.ndarray
    rts_rate: np.ndarray  # extra e-/s at T_REF in the high state
    rts_p: np.ndarray  # probability of the high state
    params: dict = field(default_factory=dict)  # the drawn scalars, for reports
    pattern_scale: float = 1.0  # strength of the fixed pattern (1: as drawn)

    @classmethod
    def build(
        cls, camera: str, seed: int = 0, geometry: str | Geometry = DEFAULT_GEOMETRY, pattern_scale: float = 1.0
    ) -> CameraModel:
        """Draw a camera's physics from ``seed`` and its id: the same pair gives the same camera.

        ``pattern_scale`` multiplies the strength of its fixed dark-current pattern (module
        docstring); the random draws do not depend on it."""
        g = _geometry(geometry)
        k = _check_pattern_scale(pattern_scale)
        rng = np.random.default_rng(np.random.SeedSequence([_MODEL_TAG, seed, camera_code(camera)]))
        n, (R, C) = len(g.channels), g.channel_shape
        reg, act = g.regions, g.active
        p = _scale_pattern(_draw_params(rng, g), k)
        real = np.zeros((n, R, C), bool)
        for name in ("ob_cols", "ob_rows", "active"):
            real[(slice(None),) + reg[name].slices] = True
        dep, diff = _dark_current_maps(g, p, rng, real)
        amp_r = np.hypot(np.arange(R, dtype=F32)[:, None], np.arange(C, dtype=F32)[None, :])
        corner_r = math.hypot(act.r0, act.c0)  # glow_e is the level at the active corner nearest the amp
        glow = (p["glow_e"][:, None, None] * np.exp(-(amp_r - corner_r) / p["glow_length"])).astype(F32)
        glow[~real] = 0
        # hot and RTS pixels: disjoint random real pixels
        real_flat = np.flatnonzero(real)
        n_hot = max(1, round(p["hot_fraction"] * real_flat.size))
        n_rts = max(1, round(p["rts_fraction"] * real_flat.size))
        picked = real_flat[rng.choice(real_flat.size, n_hot + n_rts, replace=False)]
        prescan_cols = np.arange(reg["prescan"].shape[1])
        return cls(
            camera=camera,
            seed=seed,
            geometry=g,
            gain=p["gain"],
            read_noise_e=p["read_noise_e"],
            bias=p["bias"],
            row_noise_adu=p["row_noise_adu"],
            diffusion_share=p["diffusion_share"],
            dep=dep,
            diff=diff,
            glow=glow,
            real=real,
            prescan=(-p["prescan_pull"][:, None] * np.exp(-prescan_cols / PRESCAN_TAU_PX)).astype(F32),
            residue=p["residue"],
            hot_idx=picked[:n_hot],
            hot_rate=_logu(rng, HOT_FACTOR, n_hot) * DARK_RATE_REF * k,
            hot_doubling=_u(rng, HOT_DOUBLING_C, n_hot),
            rts_idx=picked[n_hot:],
            rts_rate=_logu(rng, RTS_FACTOR, n_rts) * DARK_RATE_REF * k,
            rts_p=_u(rng, RTS_P_HIGH, n_rts),
            params=p,
            pattern_scale=k,
        )

    def dark_rate(self, temperature: float) -> np.ndarray:
        """Dark current (e-/s) at ``temperature``, hot pixels included, RTS excluded."""
        dt = temperature - T_REF
        rate = self.dep * F32(2 ** (dt / self.dep_doubling)) + self.diff * F32(2 ** (dt / DIFF_DOUBLING_C))
        rate.reshape(-1)[self.hot_idx] += (self.hot_rate * 2 ** (dt / self.hot_doubling)).astype(F32)
        return rate

    def mean_electrons(self, temperature: float, exptime: float, rts_high: np.ndarray | None = None) -> np.ndarray:
        """Mean dark electrons of one readout: dark x exptime + glow + RTS (its mean, or the given states)."""
        e = self.dark_rate(temperature) * F32(exptime) + self.glow
        rts = self.rts_p if rts_high is None else rts_high.astype(float)
        e.reshape(-1)[self.rts_idx] += (
            rts * self.rts_rate * 2 ** ((temperature - T_REF) / self.dep_doubling) * exptime
        ).astype(F32)
        return e


def _draw_params(rng: np.random.Generator, g: Geometry) -> dict:
    """A camera's scalar physics (per channel where channels differ), each drawn from its range."""
    n = len(g.channels)
    scale = g.active.shape[1] / FULL_ACTIVE  # lengths shrink with the active area in test geometries
    H, W = g.mosaic_shape
    return dict(
        gain=_u(rng, GAIN, n),
        read_noise_e=_u(rng, READ_NOISE_E) * _u(rng, (0.95, 1.05), n),
        bias=_u(rng, BIAS_ADU, n),
        row_noise_adu=float(_u(rng, ROW_NOISE_ADU)),
        diffusion_share=float(_u(rng, DIFF_SHARE)),
        ring_centre=(float(_u(rng, RING_CENTRE) * H), float(_u(rng, RING_CENTRE) * W)),
        ring_period=float(_u(rng, RING_PERIOD_PX) * scale),
        ring_amplitude=float(_u(rng, RING_AMPLITUDE)),
        ring_phase=rng.uniform(0, 2 * np.pi, 2),
        dep_gradient=rng.uniform(-DEP_GRADIENT, DEP_GRADIENT, 2),
        diff_gradient=float(_u(rng, DIFF_GRADIENT)),
        diff_angle=float(rng.uniform(0, 2 * np.pi)),
        dsnu_sigma=float(_u(rng, DSNU_SIGMA)),
        glow_e=_u(rng, GLOW_E) * _u(rng, (1 - GLOW_CHANNEL_SPREAD, 1 + GLOW_CHANNEL_SPREAD), n),
        glow_length=max(GLOW_MIN_LENGTH_PX, float(_u(rng, GLOW_LENGTH_PX) * scale)),
        prescan_pull=_u(rng, PRESCAN_PULL_ADU, n),
        residue=_u(rng, AMP_RESIDUE, n),
        hot_fraction=float(_u(rng, HOT_FRACTION)),
        rts_fraction=float(_u(rng, RTS_FRACTION)),
    )


def _check_pattern_scale(pattern_scale) -> float:
    """``pattern_scale`` as a float >= 0 (InputError otherwise)."""
    k = float(pattern_scale)
    if not k >= 0 or math.isinf(k):
        raise InputError(f"pattern_scale must be a finite number >= 0, got {pattern_scale!r}")
    return k


def _scale_pattern(p: dict, k: float) -> dict:
    """The drawn parameters with the fixed pattern's strengths multiplied by ``k`` (the hot and RTS
    rates are scaled where they are drawn). Multiplying by 1.0 is exact: the default camera's
    arrays are bit for bit those drawn."""
    p["ring_amplitude"] *= k
    p["dep_gradient"] = p["dep_gradient"] * k
    p["diff_gradient"] *= k
    p["dsnu_sigma"] *= k
    p["diff_curvature"] = DIFF_CURVATURE * k
    return p


def _dark_current_maps(
    g: Geometry, p: dict, rng: np.random.Generator, real: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Dark current (e-/s, (n, R, C)) at T_REF: the depletion part (rings across the sensor, a
    gradient, lognormal DSNU) and the diffusion part (a broad gradient), together DARK_RATE_REF on
    average over the active pixels; 0 on the virtual pixels."""
    n, (R, C) = len(g.channels), g.channel_shape
    H, W = g.mosaic_shape
    dep, diff = np.empty((n, R, C), F32), np.empty((n, R, C), F32)
    cy, cx = p["ring_centre"]
    for i, ch in enumerate(g.channels):
        y, x = _sensor_coords(g, ch)
        yn, xn = 2 * y / H - 1, 2 * x / W - 1  # -1..1 across the sensor
        ring = 2 * np.pi * np.hypot(y - cy, x - cx) / p["ring_period"]
        a = p["ring_amplitude"]
        dep[i] = 1 + a * (0.8 * np.sin(ring + p["ring_phase"][0]) + 0.2 * np.sin(2 * ring + p["ring_phase"][1]))
        dep[i] *= 1 + p["dep_gradient"][0] * yn + p["dep_gradient"][1] * xn
        th = p["diff_angle"]
        diff[i] = 1 + p["diff_gradient"] * (np.cos(th) * xn + np.sin(th) * yn) + p["diff_curvature"] * (xn**2 + yn**2)
    s = p["dsnu_sigma"]
    dep *= np.exp(rng.standard_normal((n, R, C), dtype=F32) * F32(s) - F32(s * s / 2))
    actv = (slice(None),) + g.active.slices
    dep *= F32(DARK_RATE_REF * (1 - p["diffusion_share"]) / dep[actv].mean(dtype=np.float64))
    diff *= F32(DARK_RATE_REF * p["diffusion_share"] / diff[actv].mean(dtype=np.float64))
    dep[~real], diff[~real] = 0, 0
    return dep, diff


_MODELS: OrderedDict = OrderedDict()
_MODEL_CACHE_SIZE = 2  # a full-size model is ~100 MB; archives loop cameras outermost


def camera_model(
    camera: str, seed: int = 0, geometry: str | Geometry = DEFAULT_GEOMETRY, pattern_scale: float = 1.0
) -> CameraModel:
    """The (cached) :class:`CameraModel` of ``camera`` for ``seed``, ``geometry`` and ``pattern_scale``."""
    g = _geometry(geometry)
    key = (camera, seed, g.name, g.source, _check_pattern_scale(pattern_scale))
    if key not in _MODELS:
        _MODELS[key] = CameraModel.build(camera, seed, g, key[-1])
        while len(_MODELS) > _MODEL_CACHE_SIZE:
            _MODELS.popitem(last=False)
    _MODELS.move_to_end(key)
    return _MODELS[key]


@dataclass(frozen=True)
class EffectParams:
    """A camera's fixed parameters of the effects (``EFFECTS``), drawn from its own rng stream."""

    glow_sigma: float  # sd of ln(glow factor) between readouts
    pickup_adu: float  # sd of each quadrature of the pickup between frames, ADU
    pickup_pattern: np.ndarray  # (n_channels, 2, cols) float32: sin and cos of 2 pi c / P per channel


@dataclass(frozen=True)
class EffectState:
    """One frame's draw of the enabled effects (neutral values for those not enabled)."""

    names: tuple[str, ...]
    glow_factor: np.ndarray  # (n_channels,): the channel's glow is multiplied by this
    pickup_adu: np.ndarray  # (n_channels, 2): the pickup's sine and cosine amplitudes, ADU

    def pickup(self, params: EffectParams) -> np.ndarray:
        """The frame's pickup, ADU, (n_channels, cols) float32: added to every row."""
        return np.einsum("nk,nkc->nc", self.pickup_adu, params.pickup_pattern).astype(F32)


def check_effects(effects) -> tuple[str, ...]:
    """``effects`` as a tuple of known names (in ``EFFECTS`` order); ValueError naming an unknown one."""
    names = (effects,) if isinstance(effects, str) else tuple(effects or ())
    unknown = sorted(set(names) - set(EFFECTS))
    if unknown:
        raise InputError(f"unknown simulator effect(s) {unknown}; valid: {', '.join(EFFECTS)}")
    return tuple(e for e in EFFECTS if e in names)


def effect_params(m: CameraModel) -> EffectParams:
    """The effects' parameters of camera ``m``: a function of its seed and id only, drawn from a
    stream of their own so that the camera's other physics does not change."""
    rng = np.random.default_rng(np.random.SeedSequence([_EFFECT_TAG, m.seed, camera_code(m.camera)]))
    n, cols = len(m.geometry.channels), m.geometry.channel_shape[1]
    period = _u(rng, PICKUP_PERIOD_PX, n)
    angle = 2 * np.pi * np.arange(cols)[None, :] / period[:, None]
    return EffectParams(
        glow_sigma=float(_u(rng, AMP_GLOW_SIGMA)),
        pickup_adu=float(_u(rng, PICKUP_ADU)),
        pickup_pattern=np.stack([np.sin(angle), np.cos(angle)], axis=1).astype(F32),
    )


def draw_effects(m: CameraModel, rng: np.random.Generator, effects) -> EffectState | None:
    """One frame's state of ``effects`` (None when there are none: nothing is drawn from ``rng``)."""
    names = check_effects(effects)
    if not names:
        return None
    p, n = effect_params(m), len(m.geometry.channels)
    glow, pickup = np.ones(n), np.zeros((n, 2))
    if "amp_glow" in names:
        s = p.glow_sigma
        glow = np.exp(s * rng.standard_normal(n) - s * s / 2)
    if "pickup" in names:
        pickup = p.pickup_adu * rng.standard_normal((n, 2))
    return EffectState(names, glow, pickup)


def _to_adu(m: CameraModel, e: np.ndarray, bias_offsets, row_offsets, pickup=None) -> np.ndarray:
    """Electrons (n, R, C) -> ADU (float32, in place): gain, bias, drift, row offsets, strip
    effects and ``pickup`` ((n, C) ADU added to every row, or None)."""
    reg = m.geometry.regions
    act, amp, pre = m.geometry.active, reg["amplifier"], reg["prescan"]
    row_signal = e[:, :, act.c0 : act.c1].mean(axis=2) / m.gain[:, None]  # ADU, before the offsets
    e *= (1 / m.gain).astype(F32)[:, None, None]
    level = m.bias + (0 if bias_offsets is None else bias_offsets)
    e += (level[:, None] + (0 if row_offsets is None else row_offsets)).astype(F32)[:, :, None]
    e[:, :, pre.c0 : pre.c1] += m.prescan[:, None, :]
    e[:, 1:, amp.c0 : amp.c1] += (m.residue[:, None] * row_signal[:, :-1]).astype(F32)[:, :, None]
    if pickup is not None:
        e += pickup[:, None, :]
    return e


def _mean_electrons(m: CameraModel, temperature, exptime, rts_high, state: EffectState | None) -> np.ndarray:
    """Mean dark electrons of a readout, the glow scaled by the frame's amplifier state."""
    e = m.mean_electrons(temperature, exptime, rts_high)
    if state is not None and "amp_glow" in state.names:
        e += m.glow * (state.glow_factor - 1).astype(F32)[:, None, None]
    return e


def expected_dark(
    model: CameraModel,
    temperature: float,
    exptime: float,
    bias_offsets: np.ndarray | None = None,
    row_offsets: np.ndarray | None = None,
    effects: EffectState | None = None,
) -> np.ndarray:
    """Noise-free expected dark frame, E[ADU] (float32, (n_channels, rows, cols), readout coordinates).

    ``temperature`` is the *actual* sensor temperature; ``bias_offsets`` (n,) and ``row_offsets``
    (n, rows), the frame's drift and row noise, default to zero; ``effects``, the frame's draw of
    the effects (:func:`draw_effects`), to none. Includes the -0.5 ADU mean of the floor
    quantisation; capped at saturation.
    """
    pickup = None if effects is None or "pickup" not in effects.names else effects.pickup(effect_params(model))
    e = _mean_electrons(model, temperature, exptime, None, effects)
    adu = _to_adu(model, e, bias_offsets, row_offsets, pickup)
    adu -= F32(0.5)
    return np.minimum(adu, F32(SATURATED), out=adu)


def _add_cosmic_rays(m: CameraModel, rng: np.random.Generator, e: np.ndarray, seconds: float) -> int:
    """Short straight tracks of thousands of e- on real pixels (virtual pixels collect nothing)."""
    n, R, C = e.shape
    r0, r1, c0, c1 = 0, m.geometry.active.r1, m.geometry.regions["ob_cols"].c0, m.geometry.active.c1
    k = rng.poisson(CR_RATE * PIXEL_CM**2 * n * (r1 - r0) * (c1 - c0) * seconds)
    for _ in range(k):
        ch, y, x = rng.integers(n), rng.uniform(r0, r1), rng.uniform(c0, c1)
        length, angle, q = _u(rng, CR_LENGTH_PX), rng.uniform(0, 2 * np.pi), _logu(rng, CR_CHARGE_E)
        steps = np.linspace(0, length, int(math.ceil(length)) + 1)
        ys = np.clip((y + steps * math.sin(angle)).astype(int), 0, R - 1)
        xs = np.clip((x + steps * math.cos(angle)).astype(int), 0, C - 1)
        keep = m.real[ch, ys, xs]
        np.add.at(e[ch], (ys[keep], xs[keep]), F32(q / steps.size))
    return int(k)


def render_light(m: CameraModel, rng: np.random.Generator, exptime: float) -> np.ndarray:
    """Sky + Gaussian stars (e-) on the active areas only: (n_channels, active rows, active cols)."""
    g = m.geometry
    H, W = g.mosaic_shape
    yn, xn = (np.arange(H, dtype=F32)[:, None] + 0.5) * 2 / H - 1, (np.arange(W, dtype=F32)[None, :] + 0.5) * 2 / W - 1
    th = rng.uniform(0, 2 * np.pi)
    img = F32(_u(rng, SKY_RATE) * exptime) * (1 + F32(SKY_GRADIENT) * (F32(math.cos(th)) * xn + F32(math.sin(th)) * yn))
    n_stars = max(MIN_STARS, rng.poisson(STARS_PER_SENSOR * H * W / (2 * FULL_ACTIVE) ** 2))
    sigma = _u(rng, FWHM_PX) / (2 * math.sqrt(2 * math.log(2)))
    ys, xs = rng.uniform(0, H, n_stars), rng.uniform(0, W, n_stars)
    flux = np.minimum(STAR_FLUX[0] * (1 - rng.random(n_stars)) ** (-1 / STAR_SLOPE), STAR_FLUX[1]) * exptime
    rad = int(math.ceil(6 * sigma))
    for y, x, f in zip(ys, xs, flux):
        r = np.arange(max(0, int(y) - rad), min(H, int(y) + rad + 1))
        c = np.arange(max(0, int(x) - rad), min(W, int(x) + rad + 1))
        gy, gx = np.exp(-0.5 * ((r + 0.5 - y) / sigma) ** 2), np.exp(-0.5 * ((c + 0.5 - x) / sigma) ** 2)
        img[r[0] : r[-1] + 1, c[0] : c[-1] + 1] += (f / (2 * np.pi * sigma**2) * np.outer(gy, gx)).astype(F32)
    return np.stack([g.to_frame_orientation(img[g.mosaic_slices(ch)], ch) for ch in g.channels])


@dataclass
class SimFrame:
    data: np.ndarray  # uint16, geometry.frame_shape
    header: fits.Header
    expected: np.ndarray  # expected dark, E[ADU] without light, (n_channels, rows, cols) readout coords
    temperature: float  # actual sensor temperature, C
    bias_offsets: np.ndarray  # ADU per channel
    row_offsets: np.ndarray  # ADU, (n_channels, rows)
    floor: dict  # channel -> RMS(observed - expected) in the window, ADU (dark/bias only)
    n_cosmics: int


def simulate_frame(
    model: CameraModel,
    rng: np.random.Generator,
    imagetyp: str = "DARK",
    setpoint: float = T_REF,
    exptime: float = 30.0,
    date_obs: str = "2024-01-01T11:00:00.000",
    keywords: Keywords = Keywords(),
    effects=(),
) -> SimFrame:
    """One raw frame of ``model``'s camera; ``imagetyp`` DARK, BIAS (exptime 0) or OBJECT (sky and stars).

    ``effects``: names of ``EFFECTS`` to add (default none: the frame is the same as without the
    parameter)."""
    m, g = model, model.geometry
    imagetyp = imagetyp.upper()
    exptime = 0.0 if imagetyp == "BIAS" else float(exptime)
    n, R = len(g.channels), g.channel_shape[0]
    temp = setpoint + float(np.clip(rng.normal(0, TEMP_JITTER_SD), -TEMP_JITTER_MAX, TEMP_JITTER_MAX))
    ccdtemp = round(temp + rng.normal(0, TEMP_SENSOR_SD), 1)
    drift = rng.normal(0, BIAS_DRIFT_ADU, n)
    rows = rng.normal(0, m.row_noise_adu, (n, R))
    rts_high = rng.random(m.rts_idx.size) < m.rts_p
    state = draw_effects(m, rng, effects)  # draws nothing without effects: the same frame as before
    pickup = None if state is None or "pickup" not in state.names else state.pickup(effect_params(m))
    mean = _mean_electrons(m, temp, exptime, rts_high, state)
    if imagetyp == "OBJECT":
        mean[(slice(None),) + g.active.slices] += render_light(m, rng, exptime)
    e = rng.poisson(mean).astype(F32)
    del mean
    n_cr = _add_cosmic_rays(m, rng, e, exptime + READOUT_S)
    e += rng.standard_normal(e.shape, dtype=F32) * m.read_noise_e.astype(F32)[:, None, None]
    obs = np.floor(_to_adu(m, e, drift, rows, pickup))
    np.clip(obs, 0, SATURATED, out=obs)
    expected = expected_dark(m, temp, exptime, drift, rows, state)
    data = np.empty(g.frame_shape, np.uint16)
    for i, ch in enumerate(g.channels):
        g.readout(data, ch)[...] = obs[i]
    kw = keywords
    hdr = fits.Header()
    hdr[kw.imagetyp] = (imagetyp, "simulated")
    hdr[kw.exptime] = (exptime, "s")
    hdr[kw.ccdtemp] = (ccdtemp, "measured sensor temperature, C")
    hdr[kw.settemp] = (float(setpoint), "cooling setpoint, C")
    hdr[kw.date_obs] = (date_obs, "start of exposure, UTC")
    hdr[kw.camera] = (m.camera, "guide camera")
    hdr["SIMTEMP"] = (temp, "actual sensor temperature, C (simulation)")
    hdr["SIMCAM"] = (m.camera, "simulated camera model")
    hdr["SIMSEED"] = (m.seed, "simulation seed")
    hdr["SIMGEOM"] = (g.name, "geometry")
    if m.pattern_scale != 1.0:  # only then: a default archive keeps its bytes
        hdr["SIMPATT"] = (m.pattern_scale, "strength of the fixed dark pattern (1: default)")
    if state is not None:
        _effect_cards(hdr, g, state)
    floor = {}
    if imagetyp in ("DARK", "BIAS"):
        w = g.window.slices
        for i, ch in enumerate(g.channels):
            d = obs[i][w].astype(np.float64) - expected[i][w]
            floor[ch.name] = float(np.sqrt(np.mean(d * d)))
            hdr[FLOOR_KEY.format(ch.name)] = (round(floor[ch.name], 4), "ADU rms, frame - expected dark, window")
    return SimFrame(data, hdr, expected, temp, drift, rows, floor, n_cr)


def _effect_cards(hdr: fits.Header, g: Geometry, state: EffectState) -> None:
    """The frame's draw of the effects, in its header (only for frames simulated with effects)."""
    hdr["SIMEFF"] = (",".join(state.names), "simulated effects the physics model lacks")
    for i, ch in enumerate(g.channels):
        if "amp_glow" in state.names:
            hdr[f"SIMGLOW{ch.name}"] = (round(float(state.glow_factor[i]), 5), f"glow factor, channel {ch.name}")
        if "pickup" in state.names:
            amplitude = float(np.hypot(*state.pickup_adu[i]))
            hdr[f"SIMPICK{ch.name}"] = (round(amplitude, 4), f"pickup amplitude ADU, channel {ch.name}")


def frame_rng(seed: int, camera: str, night: str, kind: str, index: int) -> np.random.Generator:
    """The rng of one archive frame: a function of its identity only, not of the loop order."""
    return np.random.default_rng(
        np.random.SeedSequence([_FRAME_TAG, seed, camera_code(camera), int(night), _KIND_CODE[kind], index])
    )


def _night_plan(temperatures, darks_per_temp, dark_exptimes, bias_per_night, guide_per_night):
    """[(kind, setpoint, exptime or None, seconds after 10:00 UTC)], in time order, for one night."""
    plan, t = [], 0.0
    for k, temp in enumerate(temperatures):  # dusk calibrations; each new setpoint needs settling
        t += 0.0 if k == 0 else 900.0
        for exp in dark_exptimes:
            for _ in range(darks_per_temp):
                plan.append(("dark", float(temp), float(exp), t))
                t += exp + READOUT_S + 3.0
    for _ in range(bias_per_night):
        plan.append(("bias", T_REF, 0.0, t))
        t += READOUT_S + 3.0
    start, span = max(3 * 3600.0, t + 60.0), 8 * 3600.0  # guiding from 21:00 local (13:00 UTC)
    for j in range(guide_per_night):
        plan.append(("guide", T_REF, None, start + j * span / max(guide_per_night, 1)))
    return plan


def simulate_archive(
    out: str | Path,
    geometry: str | Geometry = DEFAULT_GEOMETRY,
    nights: int = 2,
    seed: int = 0,
    cameras=("GS1",),
    temperatures=(-5, -10, -15, -25),
    darks_per_temp: int = 3,
    dark_exptimes=(30.0,),
    bias_per_night: int = 0,
    guide_per_night: int = 2,
    guide_exptimes=GUIDE_EXPTIMES,
    first_night: str = "20240101",
    night_step_days: int = 1,
    compress: bool = False,
    progress: bool = True,
    effects=(),
    pattern_scale: float = 1.0,
) -> list[Path]:
    """Write ``out/YYYYMMDD/{camera}_{dark|bias|guide}_{NNNN}.fits[.gz]``; same arguments, same bytes.

    ``effects``: names of ``EFFECTS`` added to every frame (default none). ``pattern_scale``:
    strength of every camera's fixed dark-current pattern (rings, gradients, DSNU, hot and RTS
    pixels; 1, the default, as drawn; 0: none); each frame's temperature, bias drift and row
    offsets are those drawn at 1."""
    out, g = Path(out), _geometry(geometry)
    effects = check_effects(effects)
    pattern_scale = _check_pattern_scale(pattern_scale)
    day0 = datetime.strptime(first_night, "%Y%m%d").replace(tzinfo=timezone.utc)
    night_days = [day0 + timedelta(days=k * night_step_days) for k in range(nights)]
    plan = _night_plan(temperatures, darks_per_temp, dark_exptimes, bias_per_night, guide_per_night)
    suffix = ".fits.gz" if compress else ".fits"
    paths = []
    total = len(cameras) * nights * len(plan)
    with tqdm(total=total, desc="simulate", unit="frame", disable=None if progress else True) as bar:
        for camera in cameras:  # cameras outermost: each model is built once
            model = camera_model(camera, seed, g, pattern_scale)
            for day in night_days:
                night, counters = day.strftime("%Y%m%d"), dict.fromkeys(_KIND_CODE, 0)
                for kind, setpoint, exptime, t in plan:
                    counters[kind] += 1
                    rng = frame_rng(seed, camera, night, kind, counters[kind])
                    if exptime is None:
                        exptime = float(rng.choice(np.asarray(guide_exptimes, float)))
                    date_obs = (day + timedelta(hours=10, seconds=t)).replace(tzinfo=None)
                    frame = simulate_frame(
                        model,
                        rng,
                        _IMAGETYP[kind],
                        setpoint,
                        exptime,
                        date_obs.isoformat(timespec="milliseconds"),
                        effects=effects,
                    )
                    path = out / night / f"{camera}_{kind}_{counters[kind]:04d}{suffix}"
                    write_raw_frame(path, frame.data, frame.header)
                    paths.append(path)
                    bar.update()
    return paths
