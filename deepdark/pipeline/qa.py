"""Quality assurance of a reprocessed night, and the archive's summary.

Per night (:func:`night_qa`), from the night's shard, its predictions and the library's median
master darks:

* DARK frames: the RMSE (ADU, model window, :mod:`deepdark.evaluation.metrics`) of the model's dark, of the
  per-temperature and all-temperature median masters, and the noise floor, per frame and channel.
  These are computed by :func:`deepdark.evaluation.evaluate.evaluate` with the predictions file as the
  ``model`` predictor, so the numbers are defined in one place; it also draws the paper's heat
  map and difference histograms. Added here: RMSE over the night against temperature and time.
* Guide (OBJECT) frames: the sky background and the noise of star-free pixels after model
  correction and after median-dark correction, on the same pixels, side by side.
* The night's quarantine (files that could not be used, and why).

Outputs in the night's QA folder: ``qa.csv`` (one row per frame-channel, for machines; with the
frame's ``frame_hash``, so that the summary counts a frame that two nights hold once; names
that are not UTF-8 with their odd bytes as ``\\xNN``),
``qa.html`` (for people, figures embedded), ``quarantine.csv`` (a copy of the night's), and the
files of ``evaluate`` (``table1.*``, ``per_image.csv``, ``histograms.csv``, ``unserved.csv`` (darks
left out of every method's RMSE: a method could not predict them), ``fig*.png``).

:func:`summarize` pools every night's ``qa.csv`` into the archive's Table 1 (squared errors
summed over all nights, never an average of RMSEs), a per-night table with the nights where the
model did worse than the median baseline flagged, and the quarantine counts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from deepdark.evaluation import plots, report
from deepdark.evaluation.evaluate import EVALUATE_FILES, NothingScored, evaluate, ordered_table
from deepdark.evaluation.metrics import PooledRMSE
from deepdark.io.atomic import atomic_path
from deepdark.io.errors import InputError
from deepdark.io.frames import FrameError, Keywords, read_frame
from deepdark.io.masters import Masters
from deepdark.io.predictions import Predictions
from deepdark.io.shards import Shard, first_few, printable, quarantine_path, read_quarantine
from deepdark.io.strips import window_of
from deepdark.io.tables import frame_setpoints, temp_label
from deepdark.pipeline.correct import active_areas, corrected_actives, median_by_partition

log = logging.getLogger(__name__)

RMSE_METHODS = ("model", "median_temp", "median_all", "floor")
GUIDE_METHODS = ("model", "median")
QA_COLUMNS = (
    "night",
    "file",
    "camera",
    "channel",
    "imagetyp",
    "exptime",
    "ccdtemp",
    "setpoint",
    "date_obs",
    "n_pixels",
    *(f"rmse_{m}" for m in RMSE_METHODS),
    "bg_raw",
    *(f"{s}_{m}" for m in GUIDE_METHODS for s in ("bg", "noise", "madstd")),
    "median_kind",
    "star_free_fraction",
    "frame_hash",
)
QA_FIGURES = ("rmse_vs_temperature.png", "guide_background.png")
CLIP_SIGMA = 3.0
CLIP_ITERS = 5
MAD_TO_STD = 1.482602218505602  # 1 / Phi^-1(3/4): a normal distribution's std over its MAD (astropy's)
STAR_GROW_PX = 2  # star-free: sigma-clipped pixels grown by this many pixels
# Masters (scaled to an exposure) the QA keeps: every channel at several exposure times of a night
# (4.1 MiB a channel of the KAF-4320: 30 masters), which a night's guide frames may cycle through.
MASTERS_KEPT_MB = 128


# -- per night -------------------------------------------------------------------------------------


def night_qa(
    shard_path: str | Path,
    predictions_path: str | Path,
    masters_path: str | Path | None,
    out_dir: str | Path,
    keywords: Keywords = Keywords(),
    cameras: Sequence[str] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """The QA of one night; writes ``qa.csv``, ``qa.html``, ``quarantine.csv`` and figures into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (*EVALUATE_FILES, *QA_FIGURES):  # nothing stale from an earlier run
        (out_dir / name).unlink(missing_ok=True)
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        shard = stack.enter_context(Shard(shard_path))
        preds = stack.enter_context(Predictions(predictions_path))
        masters = stack.enter_context(Masters(masters_path)) if masters_path else None
        _check_same_rows(shard, preds)
        if masters is not None:
            masters.check_geometry(shard.geometry)
        with atomic_path(out_dir / "quarantine.csv") as tmp:  # first: it marks the folder as a QA folder
            shutil.copyfile(quarantine_path(shard_path), tmp)
        table = shard.table
        setpoints = frame_setpoints(table, masters.setpoints if masters else None)
        qa = table[
            ["night", "file", "camera", "channel", "imagetyp", "exptime", "ccdtemp", "date_obs", "frame_hash"]
        ].copy()
        qa["setpoint"] = setpoints
        # UTF-8 text for every tool and page: a name that is not UTF-8 shows its odd bytes as \\xNN
        qa["file"] = qa["file"].map(printable)
        selected = np.ones(len(table), bool) if not cameras else table["camera"].isin(list(cameras)).to_numpy()
        absent = sorted(set(cameras or ()) - set(table["camera"]))
        if absent:
            notes.append(f"camera(s) {', '.join(absent)} selected, but none of this night's frames is of them")
            log.warning("%s: %s", shard_path, notes[-1])
        if cameras and not selected.all():
            notes.append(
                f"cameras selected: {', '.join(cameras)}; "
                f"{int((~selected).sum())} frame-channels of other cameras left out of the tables and figures"
            )
        notes += _verdict_notes(preds.table[selected])
        if not shard.geometry.has_ob:
            notes.append(
                f"geometry {shard.geometry.name!r} has no optical black: each frame's temperature is its "
                "header's (CCDTEMP, else the setpoint), not measured on the frame"
            )
        darks = (table["imagetyp"] == "DARK").to_numpy() & selected
        served = darks & (preds.table["status"] != "unserved").to_numpy() if "status" in preds.table else darks
        if served.any():
            per_image = _evaluate_darks(shard_path, preds, masters_path, out_dir, notes, cameras, progress)
            qa = _merge_dark_rmse(qa, per_image, shard.geometry)
        elif darks.any():  # every method is scored on the same darks: here on none
            notes.append(f"{int(darks.sum())} dark frame-channel(s), none predicted: no RMSE on the night's darks")
        guides = np.flatnonzero((table["imagetyp"] == "OBJECT").to_numpy() & selected)
        if guides.size:
            qa = _merge_guide_stats(qa, _guide_stats(preds, masters, table, guides, keywords, notes, progress))
        attrs = preds.attrs
        notes += _transfer_notes(attrs)
    qa = qa[selected].reindex(columns=list(QA_COLUMNS))
    _write_night_outputs(qa, shard_path, out_dir, _night_name(shard_path, table), attrs, [printable(n) for n in notes])
    return qa


def _write_night_outputs(
    qa: pd.DataFrame, shard_path, out_dir: Path, night: str, attrs: dict, notes: list[str]
) -> None:
    """``qa.csv``, the night's figures and ``qa.html``."""
    with atomic_path(out_dir / "qa.csv") as tmp:
        qa.to_csv(tmp, index=False, encoding="utf-8")
    if qa["rmse_model"].notna().any():
        plots.rmse_over_night(qa, out_dir / "rmse_vs_temperature.png", night, RMSE_METHODS)
    if qa["noise_model"].notna().any():
        plots.guide_background(qa, out_dir / "guide_background.png", night, GUIDE_METHODS)
    names = (*QA_FIGURES, "fig6_heatmap.png", "fig7_histogram.png", "fig8_histogram_by_temp.png")
    figures = {name: out_dir / name for name in names if (out_dir / name).exists()}
    page = report.night_page(
        night=night,
        qa=qa,
        table1=pooled_table(qa),
        quarantine=read_quarantine(shard_path),
        figures=figures,
        provenance=attrs,
        notes=notes,
    )
    with atomic_path(out_dir / "qa.html") as tmp:
        tmp.write_text(page, encoding="utf-8")


def _night_name(shard_path, table: pd.DataFrame) -> str:
    nights = sorted(set(table["night"]) - {""})
    return nights[0] if len(nights) == 1 else Path(shard_path).name.removesuffix(".h5")


def _transfer_notes(attrs) -> list[str]:
    """What the predictions say of the library's overscan-to-image row transfer, per channel."""
    try:
        transfer = json.loads(attrs.get("transfer", "{}"))
    except (TypeError, ValueError):
        return []
    return [f"overscan row transfer of {key}: {text}" for key, text in transfer.items()]


def _verdict_notes(table: pd.DataFrame, listed: int = 10) -> list[str]:
    """A line for the frames the predictions could not serve (their model columns stay empty)
    and one for those they flagged, naming the first ``listed`` of each."""
    if "status" not in table:  # predictions written before verdicts: every frame served
        return []
    notes = []
    for status, meaning in (
        ("unserved", "no dark predicted: the model is not scored on them"),
        ("flagged", "predicted, but flagged as implausible"),
    ):
        files = table.loc[table["status"] == status, "file"].unique()
        if len(files):
            names = first_few((Path(f).name for f in files), listed)
            notes.append(f"{len(files)} frame(s) {status} ({meaning}): {names}")
    return notes


def _check_same_rows(shard: Shard, preds: Predictions) -> None:
    a, b = shard.table, preds.table
    same = len(a) == len(b) and all(
        (a[c].to_numpy() == b[c].to_numpy()).all() for c in ("file", "channel", "file_hash")
    )
    if not same:
        raise InputError(f"{preds.path} was not predicted from {shard.path} (its rows differ): predict again")


def _evaluate_darks(
    shard_path, preds: Predictions, masters_path, out_dir: Path, notes: list[str], cameras, progress: bool
) -> pd.DataFrame:
    """``evaluate`` on the night's darks (of ``cameras``, None: all), the predictions file as the
    ``model``; its per-image table. Darks the masters do not cover are left out (named in
    ``notes``); where they cover none of the darks the model predicted, the model is scored alone."""

    def model(shard: Shard, rows: np.ndarray) -> np.ndarray:
        return window_of(preds.dark(rows), shard.geometry)

    unserved = out_dir / "unserved.csv"
    try:
        evaluate([shard_path], masters_path, out_dir, {"model": model}, progress=progress, cameras=cameras)
    except NothingScored:
        if masters_path is None:
            raise
        # the masters cover none of the darks the model predicted: the model is scored alone
        alone = _unmastered_notes(_read_evaluated(unserved), masters_path, "the baselines are not scored")
        notes += alone or [
            f"no dark the model predicted has a median master dark in {Path(masters_path).name}: "
            "the baselines are not scored"
        ]
        unserved.unlink()
        evaluate([shard_path], None, out_dir, {"model": model}, progress=progress, cameras=cameras)
    else:
        if unserved.exists():
            left_out = "left out of every method's RMSE (unserved.csv)"
            notes += _unmastered_notes(_read_evaluated(unserved), masters_path, left_out)
    return _read_evaluated(out_dir / "per_image.csv")


def _read_evaluated(path: Path) -> pd.DataFrame:
    return pd.read_csv(
        path, dtype={"file": str, "night": str, "camera": str, "channel": str}, keep_default_na=False, na_values=[""]
    )


def _unmastered_notes(unserved: pd.DataFrame, masters_path, outcome: str, listed: int = 10) -> list[str]:
    """A line for the darks a median baseline had no master for (a camera or setpoint the library
    lacks), naming the first ``listed`` cameras and setpoints, and what became of them: ``outcome``."""
    lacking = unserved[unserved["unserved_by"].str.contains("median_")]
    if lacking.empty:
        return []
    groups = [
        f"camera {camera} at {'no setpoint' if pd.isna(setpoint) else f'{setpoint:g} C'}"
        for camera, setpoint in lacking.groupby(["camera", "setpoint"], dropna=False).groups
    ]
    where = first_few(groups, listed)
    return [
        f"{len(lacking)} dark frame-channel(s) without a median master dark in {Path(masters_path).name} "
        f"({where}): {outcome}"
    ]


def _merge_dark_rmse(qa: pd.DataFrame, per_image: pd.DataFrame, geometry) -> pd.DataFrame:
    cols = {m: f"rmse_{m}" for m in RMSE_METHODS if m in per_image}
    part = per_image[["file", "channel", *cols]].rename(columns=cols)
    part["file"] = part["file"].map(printable)  # as in the QA table
    part["n_pixels"] = int(np.prod(geometry.window_shape))  # the scored area: the window, else all
    return qa.merge(part, on=["file", "channel"], how="left")


def _merge_guide_stats(qa: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    stats = stats.assign(file=stats["file"].map(printable))  # as in the QA table
    return qa.merge(stats, on=["file", "channel"], how="left")


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)-pixel square, separably, in place on slices (no scipy, no copies
    of rolled arrays): a pixel is set when any pixel within ``r`` rows and ``r`` columns is."""
    out = mask.copy()
    for axis in (0, 1):
        src = out.copy()
        for s in range(1, min(r, out.shape[axis] - 1) + 1):
            ahead, behind = [slice(None)] * 2, [slice(None)] * 2
            ahead[axis], behind[axis] = slice(s, None), slice(None, -s)
            out[tuple(ahead)] |= src[tuple(behind)]
            out[tuple(behind)] |= src[tuple(ahead)]
    return out


def _median_of_sorted(s: np.ndarray, dtype) -> np.floating:
    """``np.median`` of the values of sorted ``s`` taken as ``dtype``, to the bit: the middle
    value, or the ``np.mean`` (in ``dtype``) of the two middle ones; NaN when ``s`` is empty."""
    n = s.size
    if n == 0:
        return dtype(np.nan)
    k = n // 2
    return dtype(s[k]) if n % 2 else np.mean(np.asarray(s[k - 1 : k + 1], dtype=dtype))


def _split(s: np.ndarray, m) -> int:
    """How many values of sorted ``s`` are below ``m`` (a scalar of ``s``'s or a wider float
    type), without converting ``s`` to ``m``'s type: with ``c`` = ``m`` rounded to ``s``'s type,
    they are those below ``c``, and ``c``'s own when ``c < m`` (no value of ``s``'s type lies
    between the two)."""
    c = s.dtype.type(m)
    return int(np.searchsorted(s, c, "right" if c < m else "left"))


def _kth_deviations(s: np.ndarray, m, k: int) -> tuple:
    """The k-th and (k+1)-th smallest (0-based) of ``|s - m|`` over sorted ``s``, each computed
    as numpy computes ``np.abs(s - m)`` (in the type of ``s - m``; ``None`` past the end).

    Below ``m`` the deviations grow towards the start of ``s``, above it towards the end: two
    sorted runs, whose k-th smallest a binary search over how many come from the first finds in
    O(log n) deviations, not n."""
    j = _split(s, m)
    below, above = j, s.size - j

    def low(i):  # i-th smallest deviation below m
        return m - s[j - 1 - i]

    def high(i):  # i-th smallest deviation at or above m
        return s[j + i] - m

    lo, hi = max(0, k + 1 - above), min(k + 1, below)
    while lo < hi:  # the least i (deviations taken from below) with low(i) >= high(k - i)
        i = (lo + hi) // 2
        if low(i) < high(k - i):
            lo = i + 1
        else:
            hi = i
    i, j_ = lo, k + 1 - lo
    kth = max(([low(i - 1)] if i else []) + ([high(j_ - 1)] if j_ else []))
    after = ([low(i)] if i < below else []) + ([high(j_)] if j_ < above else [])
    return kth, (min(after) if after else None)


def _mad_of_sorted(s: np.ndarray, m) -> np.floating:
    """``np.median(np.abs(s - m))`` of sorted ``s``, to the bit (the two middle deviations'
    ``np.mean`` in the type of ``s - m`` when there is an even number)."""
    n = s.size
    if n == 0:
        return type(m)(np.nan)
    kth, after = _kth_deviations(s, m, (n - 1) // 2)
    return kth if n % 2 else np.mean(np.array([kth, after]))


def clip_bounds(img: np.ndarray, sigma: float = CLIP_SIGMA, maxiters: int = CLIP_ITERS) -> tuple:
    """The final bounds of astropy's ``sigma_clip(img, sigma, maxiters, stdfunc="mad_std")``
    (centre: median; width: ``sigma`` MAD standard deviations; iterated on what survives, at
    most ``maxiters`` times or until nothing more is cut; non-finite values never count), to the
    bit, from one sort of the image.

    Every iteration keeps the values of an interval, so what survives is a run of the sorted
    values: each median and MAD is read off the run (:func:`_median_of_sorted`,
    :func:`_mad_of_sorted`) in the image's own float type, as astropy computes them.

    Parameters
    ----------
    img
        A float image (float32 in the QA).
    sigma, maxiters
        As astropy's ``sigma_clip``.

    Returns
    -------
    (lower, upper)
        Values below ``lower`` or above ``upper`` are clipped; NaN when no value is finite.
    """
    return _clipped_interval(img, sigma, maxiters)[:2]


def _clipped_interval(img: np.ndarray, sigma: float, maxiters: int) -> tuple:
    """:func:`clip_bounds`, and how many values of ``img`` are finite."""
    s = np.sort(img, axis=None)  # NaN sorts last, +-inf just inside it
    dtype = s.dtype.type
    # The infinities in the image's own type: a Python or float64 scalar would have numpy compare
    # in float64, converting all of ``s`` for each search.
    lo = int(np.searchsorted(s, dtype(-np.inf), "right"))
    hi = int(np.searchsorted(s, dtype(np.inf), "left"))
    finite = hi - lo
    lower = upper = dtype(np.nan)
    for _ in range(maxiters):
        run = s[lo:hi]
        centre = _median_of_sorted(run, dtype)
        width = _mad_of_sorted(run, centre) * MAD_TO_STD
        lower, upper = centre - width * sigma, centre + width * sigma
        if run.size == 0:
            break
        new_lo = max(lo, int(np.searchsorted(s, lower, "left")))
        new_hi = min(hi, int(np.searchsorted(s, upper, "right")))
        if (new_lo, new_hi) == (lo, hi):
            break
        lo, hi = new_lo, new_hi
    return lower, upper, finite


def clipped(img: np.ndarray, sigma: float = CLIP_SIGMA, maxiters: int = CLIP_ITERS) -> np.ndarray:
    """The mask of astropy's ``sigma_clip(img, sigma, maxiters, stdfunc="mad_std")``: True where a
    value is outside the final bounds (:func:`clip_bounds`) or not finite."""
    lower, upper, finite = _clipped_interval(img, sigma, maxiters)
    with np.errstate(invalid="ignore"):
        out = (img < lower) | (img > upper)
    if finite < img.size:  # the sort counted them: no pass over a finite image to find none
        out |= ~np.isfinite(img)
    return out


def robust_stats(values: np.ndarray) -> tuple[float, float, float]:
    """``(median, std, mad_std)`` of ``values`` (1-D, finite) in float64, equal to the bit to
    ``np.median``, ``np.std`` and astropy's ``mad_std`` of ``values.astype(np.float64)``: the
    median and the MAD by selection (float32 values: :func:`_mad_by_selection`), else from one
    sort of the values (:func:`_mad_of_sorted`)."""
    return _robust_stats_owned(np.array(values, copy=True))


def _robust_stats_owned(values: np.ndarray) -> tuple[float, float, float]:
    """:func:`robust_stats` of ``values``, which it reorders in place (a copy the caller no longer
    needs, such as the star-free pixels picked out of an image: no second copy to reorder)."""
    if values.size == 0:
        return (np.nan,) * 3
    # float64 sums of the float32 values: numpy sums in the same blocks as for a float64 copy;
    # taken first, in the pixels' own order
    std = float(np.std(values, dtype=np.float64))
    if values.dtype == np.float32:
        centre = median_by_partition(values, np.float64, in_place=True)
        mad = _mad_by_selection(values, centre)
        if mad is not None:
            return float(centre), std, float(mad * MAD_TO_STD)
    values.sort()
    centre = _median_of_sorted(values, np.float64)
    mad = _mad_of_sorted(values, centre)
    return float(centre), std, float(mad * MAD_TO_STD)


def _mad_by_selection(values: np.ndarray, m: np.float64) -> np.floating | None:
    """``np.median(np.abs(values.astype(np.float64) - m))`` of finite float32 ``values``, to the
    bit, without a float64 copy or a sort; None where the bound below does not hold (the caller
    then sorts).

    The float32 deviations ``|values - float32(m)|`` differ from the float64 ones by at most
    ``eps`` = ``|m - float32(m)|`` plus a float32 rounding of a deviation near the MAD (bounded
    with room). One partition gives their middle one(s) ``D1`` (``D2``): the float64 middle
    deviations lie within ``eps`` of them, so every value whose float32 deviation is below
    ``D1 - 2 eps`` has a smaller float64 deviation than they, every value above ``D2 + 2 eps`` a
    larger one, and the middle ones are found among the few values in between, in float64 as
    numpy computes them. Checked, not assumed: the middle ones must lie ``eps`` inside the band."""
    n = values.size
    k = (n - 1) // 2  # the lower middle deviation (the middle one of an odd count)
    m32 = np.float32(m)
    dev32 = np.abs(values - m32)
    dev32.partition(k)
    d1 = float(dev32[k])
    d2 = float(dev32[k + 1 :].min()) if n % 2 == 0 else d1
    if not (np.isfinite(d1) and np.isfinite(d2)):
        return None
    eps = (abs(float(m) - float(m32)) + d2 * 2.0**-22) * (1 + 2.0**-10) + 1e-300
    # the band's edges in float32, rounded outwards: the comparisons below stay in float32
    lo = np.nextafter(np.float32(d1 - 2 * eps), np.float32(-np.inf))
    hi = np.nextafter(np.float32(d2 + 2 * eps), np.float32(np.inf))
    dev32 = np.abs(values - m32)  # again, in the order of ``values``
    below = int(np.count_nonzero(dev32 < lo))
    band = np.sort(np.abs(values[(dev32 >= lo) & (dev32 <= hi)].astype(np.float64) - m))
    i, need = k - below, 1 if n % 2 else 2
    if i < 0 or i + need > band.size:
        return None
    middle = band[i : i + need]
    if not (float(lo) + eps <= middle[0] and middle[-1] <= float(hi) - eps):
        return None
    return middle[0] if n % 2 else np.mean(middle)


def background_stats(images: dict[str, np.ndarray], grow: int = STAR_GROW_PX) -> tuple[dict, float]:
    """Background (median) and noise (std and MAD std) of the star-free pixels, the same pixels for
    every image of ``images``: a pixel is left out if sigma clipping (3 sigma about the median,
    MAD standard deviations, up to 5 iterations, as astropy's ``sigma_clip`` with
    ``stdfunc="mad_std"``: :func:`clipped`) rejects it in any image, grown by ``grow`` pixels.
    Every pixel is used; the numbers are astropy's and numpy's to the bit (:func:`clip_bounds`,
    :func:`robust_stats`), from one sort of each image (the clipping) and two partitions of its
    star-free pixels (their median and MAD) instead of some thirty medians.
    Returns ``({name: (bg, std, mad_std)}, star-free fraction)``."""
    rejected = np.zeros(next(iter(images.values())).shape, bool)
    for img in images.values():
        rejected |= clipped(img)
    free = ~_grow(rejected, grow)
    out = {name: _robust_stats_owned(img[free]) for name, img in images.items()}
    # the fraction as free.mean() gives it (an exact count over the size), without a float copy
    return out, (float(np.count_nonzero(free) / free.size) if free.size else float("nan"))


def median_of_counts(a: np.ndarray) -> float:
    """``np.median`` of an unsigned 8- or 16-bit integer array, to the bit, from one partition
    about the upper middle (numpy's SIMD selection of small integers: a raw frame's pixels in a
    seventh of the time of a histogram, a quarter of numpy's median); the lower middle, for an
    even count, is the largest value below it. Other types by numpy."""
    if a.dtype not in (np.uint8, np.uint16) or a.size == 0:
        return float(np.median(a))
    return float(median_by_partition(a, np.float64))


def _masters_kept(g) -> int:
    """How many float32 masters the QA of a night keeps: MASTERS_KEPT_MB of them, and at least
    two per channel (a per-temperature and an all-temperature one)."""
    rows, cols = g.active.shape
    return max(2 * len(g.channels), int(MASTERS_KEPT_MB * 2**20 // (4 * rows * cols)))


class _MedianMasters:
    """The median master of each guide frame-channel (float32, active area), the per-temperature
    one where the library has it, else the all-temperature one (``kind`` says which; None when
    neither exists). A night's guide frames share a few exposure times and setpoints, and a
    master scaled to an exposure costs passes over the whole channel: the last ``size`` are kept.
    """

    def __init__(self, masters: Masters, size: int):
        self.masters, self.size = masters, size
        self._kept: OrderedDict[tuple, np.ndarray | None] = OrderedDict()

    def _lookup(self, *key) -> np.ndarray | None:
        if key not in self._kept:
            master = self.masters.lookup(*key)
            self._kept[key] = None if master is None else master.astype(np.float32)
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)
        self._kept.move_to_end(key)
        return self._kept[key]

    def of(self, camera: str, channel: str, exptime: float, setpoint: float) -> tuple[str, np.ndarray | None]:
        for kind in ("temp", "all"):
            master = self._lookup(kind, camera, channel, float(exptime), float(setpoint))
            if master is not None:
                return f"median_{kind}", master
        return "", None


def _guide_stats(
    preds: Predictions,
    masters: Masters | None,
    table: pd.DataFrame,
    rows: np.ndarray,
    keywords: Keywords,
    notes: list[str],
    progress: bool,
) -> pd.DataFrame:
    """The background statistics of every channel of the guide frames of table ``rows``."""
    out = []
    files = list(dict.fromkeys(table["file"].iloc[rows]))
    rows_of = table.groupby("file", sort=False).indices  # once: a search per frame grows with the night
    setpoints = frame_setpoints(table, masters.setpoints if masters is not None else None)
    medians = _MedianMasters(masters, _masters_kept(preds.geometry)) if masters is not None else None
    for f in tqdm(files, desc="guide frames", unit="frame", disable=None if progress else True):
        frows = np.sort(rows_of[f])
        if "status" in preds.table and (preds.table["status"].iloc[frows] == "unserved").any():
            continue  # no dark to measure it with; named in the night's notes
        out += _guide_frame_stats(f, frows, preds, medians, table, setpoints, keywords, notes)
    cols = [
        "file",
        "channel",
        "bg_raw",
        "star_free_fraction",
        "median_kind",
        *(f"{s}_{m}" for m in GUIDE_METHODS for s in ("bg", "noise", "madstd")),
    ]
    return pd.DataFrame(out).reindex(columns=cols)


def _guide_frame_stats(
    f: str,
    frows: np.ndarray,
    preds: Predictions,
    medians: _MedianMasters | None,
    table: pd.DataFrame,
    setpoints: np.ndarray,
    keywords: Keywords,
    notes: list[str],
) -> list[dict]:
    """One record per channel of guide frame ``f`` (table rows ``frows``): its raw background and
    :func:`background_stats` after model and median-dark correction; none when it cannot be read."""
    g = preds.geometry
    t = table.iloc[frows]
    try:
        raw = read_frame(f, g, keywords)
        if set(t["file_hash"]) != {raw.hash}:
            raise FrameError(f, "file changed since extraction")
    except FrameError as exc:
        notes.append(f"guide frame not measured: {exc}")
        return []
    channels = list(t["channel"])
    model = corrected_actives(raw, g, channels, preds.dark(frows))
    actives = active_areas(raw.data, g)
    out = []
    for c, camera, exptime, setpoint in zip(channels, t["camera"], t["exptime"], setpoints[frows]):
        images = {"model": model[c]}
        kind, master = medians.of(camera, c, exptime, setpoint) if medians is not None else ("", None)
        if master is not None:
            images["median"] = np.subtract(actives[c], master, dtype=np.float32)  # no float32 copy of the counts
        stats, free = background_stats(images)
        rec = dict(file=f, channel=c, bg_raw=median_of_counts(actives[c]), star_free_fraction=free, median_kind=kind)
        for name, (bg, sd, mad) in stats.items():
            rec.update({f"bg_{name}": bg, f"noise_{name}": sd, f"madstd_{name}": mad})
        out.append(rec)
    return out


# -- pooling ---------------------------------------------------------------------------------------


def pooled_table(qa: pd.DataFrame) -> dict:
    """Table 1 of the DARK rows of ``qa`` (one night or many): RMSE pooled over every pixel,
    from each row's squared error (rmse^2 x n_pixels), total and per setpoint."""
    pooled = PooledRMSE()
    darks = qa[qa["imagetyp"] == "DARK"]
    for rec in darks.itertuples(index=False):
        groups = ("total", temp_label(float(rec.setpoint)))
        n = int(rec.n_pixels) if np.isfinite(rec.n_pixels) else 0
        for m in RMSE_METHODS:
            v = getattr(rec, f"rmse_{m}")
            if n and np.isfinite(v):
                pooled.add_squared(m, groups, float(v) ** 2 * n, n)
    return ordered_table(pooled.table())


# -- figures ---------------------------------------------------------------------------------------


# -- the archive ----------------------------------------------------------------------------------
