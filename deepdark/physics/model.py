"""The fitted physics model: effective temperature and prediction (see ``deepdark.physics``)."""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from deepdark.io.dark_terms import ChannelMaps, DarkTerms
from deepdark.io.errors import DeepdarkError, InputError
from deepdark.io.frames import UNKNOWN_CAMERA
from deepdark.io.geometry import Geometry, layout_mismatch
from deepdark.io.predictions import FLAGGED, OK, UNSERVED, Served
from deepdark.io.shards import Shard, closed_on_error, stored_geometry

from .fit import PHYSICS_SCHEMA, PIXEL_CLIP, _map_names
from .frame_state import FrameState, frame_state, with_transfer
from .law import LN2, Law
from .transfer import Transfer

log = logging.getLogger(__name__)

TEFF_MAX_SIGMA = 2.0  # C: an OB temperature less certain than this is not used at all
TEFF_MAX_OFFSET = 5.0  # C: a header temperature this far from a precise OB one is not trusted (flagged)
GLOW_SYS = 0.01  # relative uncertainty of the OB pixels' per-readout level (systematic)
AREAS = ("window", "active")  # what a predictor covers: the model window, or the whole active area
NO_OB = " (no optical black)"  # how a temperature source says the header had to be used


class PhysicsError(DeepdarkError, ValueError):
    """A request the physics model cannot serve (exposure, camera, temperature, geometry); one line."""


# -- the fitted model: effective temperature and prediction -------------------------------------


@dataclass
class ChannelModel:
    """One camera-channel's maps (float32, readout coordinates) and hot pixels."""

    maps: np.ndarray  # (K, active rows, active cols): d1, [d2,] g
    hot_index: np.ndarray  # flat indices into the active area
    hot_tau: np.ndarray  # their own doubling temperatures, C
    hot_coef: np.ndarray  # (n, K): h, [d2,] g
    ob_cols: np.ndarray  # (K, active rows, n) maps of the OB columns
    ob_cols_use: np.ndarray  # bool: OB pixels used for the temperature
    ob_rows: np.ndarray  # (K, n, active cols)
    ob_rows_use: np.ndarray
    inv_gain: float  # 1/gain (ADU of variance per ADU of signal), NaN if unknown
    noise_offset: float
    transfer: Transfer  # how far the overscan's row offsets are trusted (deepdark.physics.transfer)


@dataclass
class CameraInfo:
    camera: str
    law: Law
    dark_exptimes: tuple[float, ...]
    has_bias: bool
    separable: bool
    channels: tuple[str, ...]
    group: str
    header_sigma: float  # C: spread of the headers' temperature about the library's fitted ones


@dataclass
class Temperatures:
    """Effective temperature of each frame-channel row: value, 1-sigma (C), its source, and a
    note ("" unless the frame's header temperature was not trusted: what and why).

    A geometry without optical black takes the temperature from the header; the source says so
    ("ccdtemp (no optical black)"). A zero-second frame has no dark signal, so its temperature
    does not enter its prediction: "exposure 0", the header's value (0 without one)."""

    teff: np.ndarray
    sigma: np.ndarray
    # "ob", "ob+ccdtemp", "ccdtemp", "settemp", either with " (no optical black)", or "exposure 0"
    source: np.ndarray
    note: np.ndarray | None = None

    def __post_init__(self):
        if self.note is None:
            self.note = np.full(len(self.teff), "", dtype=object)

    @classmethod
    def unknown(cls, n: int) -> Temperatures:
        return cls(np.full(n, np.nan), np.full(n, np.inf), np.full(n, "none", dtype=object))

    def take(self, index) -> Temperatures:
        return Temperatures(self.teff[index], self.sigma[index], self.source[index], self.note[index])


@dataclass
class _Frames:
    """Whole frames of a shard as a prediction sees them (:meth:`PhysicsModel.serve_rows`)."""

    strips: dict[str, np.ndarray]
    table: pd.DataFrame  # their rows of the shard's table
    state: FrameState
    temps: Temperatures
    status: np.ndarray
    reason: np.ndarray
    where: np.ndarray  # positions of the requested rows among them


class PhysicsModel:
    """A fitted physics model (``fit_physics``): effective temperatures and predicted darks."""

    def __init__(self, path: str | Path, cache_channels: int = 16):
        self.path = Path(path)
        try:
            self.f = h5py.File(self.path, "r")
        except OSError as exc:
            raise InputError(f"{self.path}: not a deepdark physics model ({exc})") from None
        with closed_on_error(self.f):
            self._read_header()
        self._channels: OrderedDict = OrderedDict()
        self._cache_size = cache_channels
        self._temperature_ranges: dict[str, tuple[float, float]] = {}
        self._transfers: dict[tuple[str, str], Transfer] = {}

    def _read_header(self) -> None:
        """The model's geometry, fit options and cameras (:class:`CameraInfo`), checked."""
        try:
            version = int(self.f.attrs["schema_version"])
            self.f["cameras"]
        except (OSError, KeyError) as exc:
            raise InputError(f"{self.path}: not a deepdark physics model ({exc})") from None
        if version != PHYSICS_SCHEMA:
            raise InputError(f"{self.path}: physics schema {version}, this deepdark reads {PHYSICS_SCHEMA}")
        self.geometry: Geometry = stored_geometry(self.f, self.path)
        self.params = json.loads(self.f.attrs["params"])
        self.cameras: dict[str, CameraInfo] = {}
        for key, grp in self.f["cameras"].items():
            a = grp.attrs
            law = Law(float(a["T0"]), float(a["tau1"]), float(a["tau2"]))
            self.cameras[str(a["camera"])] = CameraInfo(
                str(a["camera"]),
                law,
                tuple(float(x) for x in a["dark_exptimes"]),
                bool(a["has_bias"]),
                bool(a["separable"]),
                tuple(json.loads(a["channels"])),
                f"cameras/{key}",
                float(a["header_sigma"]),
            )

    @classmethod
    def load(cls, path: str | Path) -> PhysicsModel:
        return cls(path)

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    # -- lookups --------------------------------------------------------------------------------
    def camera(self, camera: str) -> CameraInfo:
        if camera not in self.cameras:
            what = (
                "a frame with no camera name in its header (no CAMERA card)"
                if camera in ("", UNKNOWN_CAMERA)
                else f"camera {camera!r}"
            )
            raise PhysicsError(
                f"{self.path.name}: no physics model for {what} (library cameras: {', '.join(sorted(self.cameras))})"
            )
        return self.cameras[camera]

    def channel(self, camera: str, channel: str) -> ChannelModel:
        key = (camera, channel)
        if key not in self._channels:
            info = self.camera(camera)
            if channel not in info.channels:
                raise PhysicsError(f"{self.path.name}: camera {camera} has no channel {channel!r}")
            cg = self.f[f"{info.group}/channel_{info.channels.index(channel)}"]
            names = _map_names(info.law.K)
            maps = np.stack([cg[n][()] for n in names])
            ob = _ob_maps(cg, names, maps.shape[1:])
            self._channels[key] = ChannelModel(
                maps=maps,
                hot_index=cg["hot_index"][()],
                hot_tau=cg["hot_tau"][()].astype(np.float64),
                hot_coef=cg["hot_coef"][()].astype(np.float64),
                **ob,
                inv_gain=float(cg.attrs["inv_gain"]),
                noise_offset=float(cg.attrs["noise_offset"]),
                transfer=self.transfer(camera, channel),
            )
            while len(self._channels) > self._cache_size:
                self._channels.popitem(last=False)
        self._channels.move_to_end(key)
        return self._channels[key]

    def transfer(self, camera: str, channel: str) -> Transfer:
        """How much of the overscan's per-row offset the library saw in the active rows of
        ``camera``'s ``channel`` (:mod:`deepdark.physics.transfer`), and whether the frame state
        uses it; "not measured" for models fitted before it was."""
        key = (camera, channel)
        if key not in self._transfers:
            info = self.camera(camera)
            if channel not in info.channels:
                raise PhysicsError(f"{self.path.name}: camera {camera} has no channel {channel!r}")
            a = self.f[f"{info.group}/channel_{info.channels.index(channel)}"].attrs
            self._transfers[key] = (
                Transfer(
                    float(a["transfer"]),
                    float(a["transfer_sigma"]),
                    float(a["transfer_residual_var"]),
                    bool(a["transfer_used"]),
                    int(a["transfer_frames"]),
                    float(a["transfer_gain"]),
                )
                if "transfer" in a
                else Transfer.unmeasured()
            )
        return self._transfers[key]

    def library_frames(self, camera: str) -> pd.DataFrame:
        """The library's frame-channels with their fitted temperature and noise (diagnostics)."""
        grp = self.f[f"{self.camera(camera).group}/frames"]
        return pd.DataFrame(
            {
                c: [v.decode() if isinstance(v, bytes) else v for v in grp[c][()]]
                if grp[c].dtype == object
                else grp[c][()]
                for c in grp
            }
        )

    def check_exposure(self, camera: str, exptime: float) -> None:
        """Raise :class:`PhysicsError` unless the library can predict ``exptime`` for ``camera``."""
        info = self.camera(camera)
        if not np.isfinite(exptime) or exptime < 0:
            raise PhysicsError(f"exposure time {exptime} s: not a valid exposure")
        if not info.dark_exptimes:
            if exptime > 0:
                raise PhysicsError(
                    f"camera {camera}: library has only bias frames (exposure 0): cannot predict a {exptime:g} s dark"
                )
            return
        longest = max(info.dark_exptimes)
        if not info.separable:
            only = info.dark_exptimes[0]
            if not math.isclose(exptime, only, rel_tol=1e-3, abs_tol=1e-3):
                raise PhysicsError(
                    f"camera {camera}: library has only {only:g} s darks: cannot predict {exptime:g} s without"
                    f" bias frames or a second exposure time (what scales with exposure cannot be told from"
                    f" what comes with each readout)"
                )
            return
        limit = self.params["max_extrapolation"] * longest
        if exptime > limit + 1e-9:
            raise PhysicsError(
                f"camera {camera}: {exptime:g} s is beyond {self.params['max_extrapolation']:g}x the longest library"
                f" exposure ({longest:g} s): the library cannot support it"
            )

    def temperature_range(self, camera: str) -> tuple[float, float]:
        """The coldest and warmest effective temperature (C) of the library's darks of ``camera``:
        where the law was measured."""
        if camera not in self._temperature_ranges:
            frames = self.library_frames(camera)
            teff = frames.loc[frames["exptime"] > 0, "teff"].to_numpy(float)
            self._temperature_ranges[camera] = (float(teff.min()), float(teff.max()))
        return self._temperature_ranges[camera]

    def temperature_margin(self, camera: str) -> float:
        """How far (C) beyond its library's temperatures the model predicts for ``camera``.

        As far as the dark current of the law's slow component changes by ``max_extrapolation``,
        the factor by which the model extrapolates exposure times: beyond, the two-component
        law is a guess (its fast component, and the per-pixel shape of the map, diverge first).
        """
        return self.camera(camera).law.tau1 * math.log2(self.params["max_extrapolation"])

    def check_temperature(self, camera: str, teff: float, exptime: float) -> None:
        """Raise :class:`PhysicsError` when a frame at ``teff`` C is further outside the library's
        temperatures than :meth:`temperature_margin`; the message says by how much."""
        if exptime <= 0:  # a bias has no dark current: its temperature does not enter the prediction
            return
        lo, hi = self.temperature_range(camera)
        margin = self.temperature_margin(camera)
        if teff < lo - margin:
            outside, where = lo - teff, f"below the library's coldest {lo:.1f} C"
        elif teff > hi + margin:
            outside, where = teff - hi, f"above the library's warmest {hi:.1f} C"
        else:
            return
        raise PhysicsError(
            f"camera {camera}: effective temperature {teff:.1f} C is {outside:.1f} C {where}; the model extrapolates"
            f" at most {margin:.1f} C beyond its library (a {self.params['max_extrapolation']:g}x change of the"
            " dark current)"
        )

    def check_geometry(self, g: Geometry) -> None:
        """A :class:`PhysicsError` naming the file when the model was not fitted on data of geometry ``g``."""
        why = layout_mismatch(self.geometry, g, window=True)
        if why:
            raise PhysicsError(f"{self.path}: fitted on {why}")

    # -- frame state and temperature ----------------------------------------------------------------
    def state(self, strips: dict[str, np.ndarray], table: pd.DataFrame | None = None) -> FrameState:
        """:func:`frame_state` with the options the model was fitted with; with the strips' table
        rows, each row's bias made as the library decided for its camera and channel (by the
        transfer coefficient where the library measured one that differs from 1, see
        :mod:`deepdark.physics.transfer`; ``bias_source`` says which)."""
        p = self.params
        state = frame_state(strips, p["overscan_skip"], p["shrink"], p["smooth_rows"])
        if table is None:
            return state
        coefficient, residual_var = np.full(len(table), np.nan), np.zeros(len(table))
        for i, (camera, channel) in enumerate(zip(table["camera"], table["channel"])):
            try:
                tr = self.transfer(camera, channel)
            except PhysicsError:  # no model for it: the frame is not served, its state does not matter
                continue
            if tr.used:
                coefficient[i], residual_var[i] = tr.coefficient, tr.residual_var
        return with_transfer(state, coefficient, residual_var)

    def temperatures(
        self,
        state: FrameState,
        table: pd.DataFrame,
        max_sigma: float = TEFF_MAX_SIGMA,
        max_offset: float = TEFF_MAX_OFFSET,
    ) -> Temperatures:
        """Effective temperature of every row of ``table`` (one per frame: all rows of a file share
        it, estimated from the OB pixels of all of its rows present), with the header fallback.

        A header temperature more than ``max_offset`` from a precise OB estimate (a sensor that
        reads 0.0 on a cold frame) is not used: the OB estimate alone is, and the rows' ``note``
        names both. Raises :class:`PhysicsError` for a frame without any temperature."""
        table = table.reset_index(drop=True)
        temps = Temperatures.unknown(len(table))
        for _, rows in table.groupby("file", sort=False).indices.items():
            T, s, src, note = self._frame_temperature(state, table, rows, max_sigma, max_offset)
            temps.teff[rows], temps.sigma[rows], temps.source[rows], temps.note[rows] = T, s, src, note
        return temps

    def _frame_temperature(
        self, state: FrameState, table: pd.DataFrame, rows, max_sigma: float, max_offset: float
    ) -> tuple[float, float, str, str]:
        """(T, sigma, source, note) of the frame of table ``rows``: see :meth:`temperatures`."""
        r0 = table.iloc[rows[0]]
        header, hsrc = _header_temperature(r0)
        exptime = float(r0["exptime"]) if r0["imagetyp"] != "BIAS" else 0.0
        if exptime <= 0:
            return (header if np.isfinite(header) else 0.0), 0.0, "exposure 0", ""
        info = self.camera(r0["camera"])
        if not self.geometry.has_ob:  # nothing to measure it on: the header's, and the source says so
            if not np.isfinite(header):
                raise PhysicsError(f"{r0['file']}: no temperature (no optical black, no CCDTEMP or SETTEMP)")
            return header, info.header_sigma, hsrc + NO_OB, ""
        T, s = self._ob_temperature(state, table, rows, info, exptime, header if np.isfinite(header) else info.law.T0)
        precise = np.isfinite(T) and s <= max_sigma
        if precise and np.isfinite(header) and abs(T - header) > max_offset:
            # The GLS started at the header; its cosmic-ray cut was made far from the answer.
            T, s = self._ob_temperature(state, table, rows, info, exptime, T)
            note = (
                f"header {hsrc.upper()} {header:.2f} C disagrees with the optical-black estimate {T:.2f} C by"
                f" {abs(T - header):.1f} C (more than the {max_offset:g} C the physics model trusts): predicted at"
                " the optical-black estimate"
            )
            return T, s, "ob", note
        if precise:
            hs = info.header_sigma
            if not (np.isfinite(header) and np.isfinite(hs) and hs > 0):
                return T, s, "ob", ""
            w_ob, w_h = 1.0 / s**2, 1.0 / hs**2
            src = "ob" if w_h < 0.1 * w_ob else "ob+" + hsrc
            return (w_ob * T + w_h * header) / (w_ob + w_h), 1.0 / math.sqrt(w_ob + w_h), src, ""
        if np.isfinite(T) and np.isfinite(header) and abs(T - header) > max_offset:
            log.warning(
                "%s: imprecise OB temperature %.2f C (+-%.1f C) is %.1f C from the header's %.2f C: using the header",
                r0["file"],
                T,
                s,
                T - header,
                header,
            )
        if np.isfinite(header):
            return header, info.header_sigma, hsrc, ""
        if np.isfinite(T):
            return T, s, "ob", ""
        raise PhysicsError(f"{r0['file']}: no temperature (OB signal too weak, no CCDTEMP or SETTEMP)")

    def _ob_temperature(
        self, state: FrameState, table, rows, info: CameraInfo, t: float, T_start: float, clip: float = PIXEL_CLIP
    ) -> tuple[float, float]:
        """Generalised least squares for T on the OB pixels of ``rows`` (one frame's channels).

        OB pixels of one row share the error of that row's bias (OB columns: the overscan estimate's
        error; OB rows: the whole unknown row offset): each row is a group with a shared variance,
        inverted with Sherman-Morrison."""
        law = info.law
        groups = []  # (y (G, n), maps (K, G, n), use (G, n), pixel var scalar, group var (G,), inv_gain)
        for i in rows:
            ch = self.channel(info.camera, table.iloc[i]["channel"])
            rv = float(state.read_var[i]) + (ch.noise_offset if np.isfinite(ch.noise_offset) else 0.0)
            ig = ch.inv_gain if np.isfinite(ch.inv_gain) else 0.0
            groups.append((state.ob_cols[i].astype(np.float64), ch.ob_cols, ch.ob_cols_use, rv, state.bias_var[i], ig))
            level_var = float(np.mean(state.bias_var[i])) / state.bias.shape[1]
            groups.append(
                (
                    state.ob_rows[i].astype(np.float64),
                    ch.ob_rows,
                    ch.ob_rows_use,
                    rv,
                    np.full(state.ob_rows.shape[1], float(state.row_var[i]) + level_var),
                    ig,
                )
            )
        T = float(T_start)
        keep = [u.copy() for (_, _, u, _, _, _) in groups]
        den = 0.0
        for it in range(12):
            num = den = 0.0
            glow = dark = slope = 0.0
            f = law.factors(T)
            taus = [law.tau1] + ([law.tau2] if law.components == 2 else [])
            for gi, (y, maps, _, rv, gvar, ig) in enumerate(groups):
                model = maps[-1] + sum(t * fi * maps[k] for k, fi in enumerate(f))
                jac = sum(t * fi * maps[k] * (LN2 / taus[k]) for k, fi in enumerate(f))
                v = rv + ig * np.maximum(model, 0)
                r = y - model
                if it == 4:  # cut cosmic rays once the estimate has settled
                    keep[gi] &= np.abs(r) <= clip * np.sqrt(v + gvar[:, None])
                w = np.where(keep[gi], 1.0 / v, 0.0)
                sw, swj, swr = w.sum(1), (w * jac).sum(1), (w * r).sum(1)
                shrink = gvar / (1.0 + gvar * sw)
                num += float((w * jac * r).sum() - np.sum(shrink * swj * swr))
                den += float((w * jac * jac).sum() - np.sum(shrink * swj * swj))
                glow += float((w * maps[-1]).sum())
                dark += float((w * (model - maps[-1])).sum())
                slope += float((w * jac).sum())
            if not den > 0:
                return float("nan"), float("inf")
            step = float(np.clip(num / den, -3.0, 3.0))
            T += step
            if abs(step) < 1e-4 and it >= 5:
                break
        # systematic: the per-readout (glow) level of the OB pixels is known to GLOW_SYS of itself
        sys = GLOW_SYS * abs(glow) / max(abs(slope), 1e-300)
        return T, math.sqrt(1.0 / den + sys**2)

    # -- prediction ---------------------------------------------------------------------------------
    def dark_terms(self, table: pd.DataFrame, temps: Temperatures, state: FrameState) -> DarkTerms:
        """The terms each row's dark is summed from (:mod:`deepdark.io.dark_terms`): its channel's
        maps, the weights of its temperature and exposure time, its hot pixels' signal and its row
        bias (``table`` indexed from 0, ``temps`` and ``state`` row for row)."""
        key = np.empty(len(table), dtype=object)
        scales, hot, bias, maps = [], [], [], {}
        for i, r in table.iterrows():
            camera, channel, T = r["camera"], r["channel"], float(temps.teff[i])
            t = 0.0 if r["imagetyp"] == "BIAS" else float(r["exptime"])
            law = self.camera(camera).law
            self.check_exposure(camera, t)
            ch = self.channel(camera, channel)
            f = law.factors(T)
            scales.append(np.array([np.float32(t * fk) for fk in f], dtype=np.float32))
            hot.append(_hot_signal(law, ch, T, t, f).astype(np.float32))
            bias.append(np.asarray(state.bias[i]).astype(np.float32))
            key[i] = (camera, channel)
            maps[key[i]] = ChannelMaps(ch.maps, ch.hot_index)
        return DarkTerms(key, scales, hot, bias, maps)

    def verdicts(self, state: FrameState, table: pd.DataFrame) -> tuple[Temperatures, np.ndarray, np.ndarray]:
        """Every row's temperature and verdict, frame by frame: (temperatures, status, reason).

        A frame is ``"unserved"`` when the model cannot predict it (no model for its camera or a
        channel, an exposure the library cannot support, no temperature, a temperature further
        outside the library than :meth:`temperature_margin`), ``"flagged"`` when its header
        temperature was not trusted (the reason names both temperatures), else ``"ok"``."""
        table = table.reset_index(drop=True)
        n = len(table)
        temps = Temperatures.unknown(n)
        status, reason = np.full(n, OK, dtype=object), np.full(n, "", dtype=object)
        for _, rows in table.groupby("file", sort=False).indices.items():
            r0 = table.iloc[rows[0]]
            exptime = 0.0 if r0["imagetyp"] == "BIAS" else float(r0["exptime"])
            try:
                for i in rows:
                    self.check_exposure(table.iloc[i]["camera"], exptime)
                    self.channel(table.iloc[i]["camera"], table.iloc[i]["channel"])
                _check_overscan(state, table, rows)
                T, s, src, note = self._frame_temperature(state, table, rows, TEFF_MAX_SIGMA, TEFF_MAX_OFFSET)
                self.check_temperature(r0["camera"], T, exptime)
            except PhysicsError as exc:
                status[rows], reason[rows] = UNSERVED, str(exc)
                continue
            temps.teff[rows], temps.sigma[rows], temps.source[rows], temps.note[rows] = T, s, src, note
            if note:
                status[rows], reason[rows] = FLAGGED, note
        return temps, status, reason

    def predict(
        self,
        strips: dict[str, np.ndarray],
        table: pd.DataFrame,
        window: bool = False,
        temps: Temperatures | None = None,
        state: FrameState | None = None,
    ) -> np.ndarray:
        """Predicted darks (ADU, float32) of k frame-channels from their whole strips and table rows:
        (k, active rows, active cols), or the model window when ``window``.

        The effective temperature of a frame uses the OB pixels of all of its rows given here; pass
        ``temps`` to reuse temperatures estimated from more channels.
        Without ``temps``, a frame the model cannot serve (:meth:`verdicts`) raises
        :class:`PhysicsError`."""
        table = table.reset_index(drop=True)
        state = self.state(strips, table) if state is None else state
        if temps is None:
            temps, status, reason = self.verdicts(state, table)
            if (status == UNSERVED).any():
                raise PhysicsError(reason[np.flatnonzero(status == UNSERVED)[0]])
        if table.empty:
            return np.zeros((0, *self.geometry.active.shape), np.float32)
        return self._darks(self.dark_terms(table, temps, state), window)

    def _darks(self, terms: DarkTerms, window: bool) -> np.ndarray:
        """The darks of ``terms`` (k, active rows, active cols), or their model window."""
        rows, cols = self.geometry.window_in_active if window else (slice(None), slice(None))
        shape = self.geometry.window_shape if window else self.geometry.active.shape
        out = np.empty((len(terms), *shape), np.float32)
        whole = np.empty(self.geometry.active.shape, np.float32) if window else None
        for i in range(len(terms)):
            dark = terms.dark(i, out=whole if window else out[i])
            if window:
                out[i] = dark[rows, cols]
        return out

    def serve_rows(self, shard: Shard, rows, window: bool = False) -> Served:
        """Predicted darks of table rows ``rows`` of ``shard`` (whole active area, or the window)
        with each row's verdict (:meth:`verdicts`); an unserved row's dark is NaN.

        Every frame's temperature comes from the OB pixels of all of its channels in the shard."""
        frames = self._frames_of(shard, rows)
        state, sub, where = frames.state, frames.table, frames.where
        shape = self.geometry.window_shape if window else self.geometry.active.shape
        served = frames.status[where] != UNSERVED
        dark, terms = None, None
        if served.any():
            pick = where[served]
            picked_state = FrameState(*(getattr(state, k)[pick] for k in FrameState.__dataclass_fields__))
            picked = sub.iloc[pick].reset_index(drop=True)
            terms = self.dark_terms(picked, frames.temps.take(pick), picked_state)
            dark = self._darks(terms, window)
        if not served.all():  # NaN where unserved (a served night is not copied into a NaN array)
            nan = np.full((len(where), *shape), np.nan, dtype=np.float32)
            if dark is not None:
                nan[served] = dark
            dark = nan
        status, reason = frames.status[where], frames.reason[where]
        if window or terms is None:  # terms are of the whole active area
            return Served(dark, status, reason)
        return Served(dark, status, reason, terms=terms.spread(served))

    def frame_report(self, shard: Shard, rows) -> pd.DataFrame:
        """What the prediction of each of table rows ``rows`` of ``shard`` rests on, for a reader
        to report: ``status`` and ``reason`` (:meth:`verdicts`), the effective temperature
        ``teff`` (C), its 1-sigma ``teff_sigma`` and ``temperature_source`` (the header's, marked
        "(no optical black)", on a geometry without optical black), and ``bias_source``: how the
        row bias was made (the overscan shrunk per frame, or by the library's transfer
        coefficient)."""
        frames = self._frames_of(shard, rows)
        w = frames.where
        return pd.DataFrame(
            dict(
                file=frames.table["file"].to_numpy()[w],
                channel=frames.table["channel"].to_numpy()[w],
                status=frames.status[w],
                reason=frames.reason[w],
                teff=frames.temps.teff[w],
                teff_sigma=frames.temps.sigma[w],
                temperature_source=frames.temps.source[w],
                bias_source=frames.state.bias_source[w],
            )
        )

    def _frames_of(self, shard: Shard, rows) -> _Frames:
        """The strips, state and verdicts of every row of the frames of table ``rows``."""
        self.check_geometry(shard.geometry)
        rows = np.asarray(rows)
        tab = shard.table
        files = pd.unique(tab["file"].to_numpy()[rows])
        all_rows = np.flatnonzero(tab["file"].isin(files).to_numpy())
        strips = shard.strips(all_rows)
        sub = tab.iloc[all_rows].reset_index(drop=True)
        state = self.state(strips, sub)
        temps, status, reason = self.verdicts(state, sub)
        return _Frames(strips, sub, state, temps, status, reason, np.searchsorted(all_rows, rows))

    def predict_rows(self, shard: Shard, rows, window: bool = False) -> np.ndarray:
        """Predicted darks of table rows ``rows`` of ``shard`` (whole active area, or the window);
        :class:`PhysicsError` when the model cannot serve one of them (:meth:`serve_rows`)."""
        served = self.serve_rows(shard, rows, window)
        reason = served.unserved_reason()
        if reason is not None:
            raise PhysicsError(reason)
        return served.dark


def _check_overscan(state: FrameState, table: pd.DataFrame, rows) -> None:
    """A :class:`PhysicsError` when the overscan of a channel of the frame (table ``rows``) has
    rows with no measurement of their bias (saturated or empty): its dark would carry that
    level (a saturated overscan made darks of 60,000 ADU), so the frame is not served."""
    blind = {table.iloc[i]["channel"]: int(n) for i, n in zip(rows, state.blind_rows[rows]) if n}
    if blind:
        which = ", ".join(f"{ch} ({n} of {state.bias.shape[1]} rows)" for ch, n in blind.items())
        raise PhysicsError(
            f"{table.iloc[rows[0]]['file']}: overscan saturated or empty in channel(s) {which}: no row bias"
        )


def _hot_signal(law: Law, ch: ChannelModel, T: float, exptime: float, f) -> np.ndarray:
    """The dark signal (ADU, float64) of each hot pixel of ``ch``, by its own doubling temperature."""
    c = ch.hot_coef
    if not len(c):
        return np.zeros(0)
    hot = exptime * c[:, 0] * np.exp2((T - law.T0) / ch.hot_tau) + c[:, -1]
    if law.components == 2:
        hot += exptime * c[:, 1] * f[1]
    return hot


def _ob_maps(cg, names: list[str], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """The channel's optical-black maps and masks; without pixels for a geometry without OB."""
    if "ob" not in cg:
        R, C = shape
        K = len(names)
        return dict(
            ob_cols=np.zeros((K, R, 0), np.float32),
            ob_cols_use=np.zeros((R, 0), bool),
            ob_rows=np.zeros((K, 0, C), np.float32),
            ob_rows_use=np.zeros((0, C), bool),
        )
    return dict(
        ob_cols=np.stack([cg[f"ob/cols/{n}"][()] for n in names]),
        ob_cols_use=cg["ob/cols/use"][()],
        ob_rows=np.stack([cg[f"ob/rows/{n}"][()] for n in names]),
        ob_rows_use=cg["ob/rows/use"][()],
    )


def _header_temperature(row) -> tuple[float, str]:
    for key in ("ccdtemp", "settemp"):
        v = row.get(key, np.nan)
        if v is not None and np.isfinite(v):
            return float(v), key
    return float("nan"), "none"


def physics_predictor(path: str | Path, area: str = "window") -> Callable[[Shard, np.ndarray], np.ndarray]:
    """A predictor ``(shard, sorted table rows) -> (k, rows, cols)`` ADU of a fitted physics model.

    Parameters
    ----------
    path
        The physics model (``fit_physics``).
    area
        ``"window"``: the model window (k, S, S), for ``deepdark.evaluation.evaluate``;
        ``"active"``: the whole active area (k, AR, AC), for
        ``deepdark.io.predictions.write_predictions``.

    The predictor's ``model`` attribute is the open :class:`PhysicsModel`; its ``serve``
    attribute gives the same predictions with each row's verdict (:meth:`PhysicsModel.serve_rows`;
    ``write_predictions`` uses it), where the predictor raises :class:`PhysicsError`.
    """
    if area not in AREAS:
        raise ValueError(f"area must be one of {', '.join(AREAS)}, got {area!r}")
    model = PhysicsModel.load(path)

    def predict(shard: Shard, rows: np.ndarray) -> np.ndarray:
        return model.predict_rows(shard, rows, window=area == "window")

    def serve(shard: Shard, rows: np.ndarray) -> Served:
        return model.serve_rows(shard, rows, window=area == "window")

    predict.model = model
    predict.serve = serve
    return predict
