"""The science outputs do not change when the code is made faster: the physics fit's maps, a
night's predicted darks, the master darks and the corrected frames of a fixed simulated `mini`
archive, against figures recorded in ``tests/data/reference/science.json``.

The reference was written by this module (``python -m tests.pipeline.test_science_unchanged``)
and is to be rewritten only by a change that means to alter the science, saying so. Figures are
sums and sampled pixels compared at rtol 1e-6: tight enough to catch any change of method,
loose enough for the last-bit differences of BLAS builds and thread counts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.io import fits

from deepdark.io.geometry import load_geometry
from deepdark.io.predictions import Predictions, write_predictions
from deepdark.physics import PhysicsModel, fit_physics, physics_predictor
from deepdark.pipeline.baseline import build_masters
from deepdark.pipeline.correct import correct_night
from deepdark.pipeline.extract import extract
from deepdark.sim.simulate import simulate_archive

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference" / "science.json"
MINI = load_geometry("mini")
SAMPLES = 16  # pixels sampled per image, at fixed positions


def _summary(image: np.ndarray) -> list[float]:
    """Sum, sum of squares and SAMPLES fixed pixels of an image (float64)."""
    flat = np.asarray(image, np.float64).ravel()
    picks = np.linspace(0, flat.size - 1, SAMPLES).astype(int)
    return [float(np.nansum(flat)), float(np.nansum(flat**2)), *map(float, flat[picks])]


def science(root: Path) -> dict[str, list[float]]:
    """Every science output of a fixed archive, summarised: {name: figures}."""
    common = dict(geometry="mini", seed=3, temperatures=(-5, -15), progress=False)
    simulate_archive(root / "lib", nights=2, darks_per_temp=2, dark_exptimes=(10.0, 30.0), guide_per_night=0, **common)
    simulate_archive(root / "night", nights=1, darks_per_temp=1, guide_per_night=2, first_night="20240301", **common)
    lib = [
        extract([n], root / f"lib_{n.name}.h5", MINI, progress=False).shard for n in sorted((root / "lib").iterdir())
    ]
    night_dir = next((root / "night").iterdir())
    shard = extract([night_dir], root / "night.h5", MINI, progress=False).shard
    fit_physics(lib, root / "physics.h5", progress=False)
    build_masters(lib, root / "masters.h5", progress=False)
    write_predictions(
        shard,
        root / "pred.h5",
        physics_predictor(root / "physics.h5", area="active"),
        {"method": "physics"},
        progress=False,
    )
    # uncompressed: RICE_1's quantisation would turn a last-bit difference into a whole step
    correct_night(root / "pred.h5", root / "corrected", progress=False, compression="none")
    out = {}
    with PhysicsModel(root / "physics.h5") as m:
        for ch in MINI.channel_names():
            for k, image in enumerate(m.channel("GS1", ch).maps):
                out[f"physics/{ch}/map{k}"] = _summary(image)
    with Predictions(root / "pred.h5") as p:
        for i in range(len(p.table)):
            out[f"predictions/{p.table['file'].iloc[i].rsplit('/', 1)[-1]}/{p.table['channel'].iloc[i]}"] = _summary(
                p.dark(np.array([i]))[0]
            )
    with h5py.File(root / "masters.h5", "r") as f:
        f.visititems(
            lambda name, obj: (
                out.update({f"masters/{name}": _summary(obj[()])})
                if getattr(obj, "ndim", 0) == 3 and obj.dtype.kind == "f"
                else None
            )
        )
    for path in sorted((root / "corrected").glob("*.fits")):
        with fits.open(path) as hdul:
            out[f"corrected/{path.name}"] = _summary(next(h.data for h in hdul if h.data is not None))
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return science(tmp_path_factory.mktemp("science"))


def test_science_outputs_equal_the_reference(made):
    reference = json.loads(REFERENCE.read_text())
    assert sorted(made) == sorted(reference)
    assert any(k.startswith(p) for p in ("physics/", "predictions/", "masters/", "corrected/") for k in made)
    for name, figures in reference.items():
        np.testing.assert_allclose(made[name], figures, rtol=1e-6, atol=1e-6, err_msg=name)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE.write_text(json.dumps(science(Path(tmp)), indent=1, sort_keys=True) + "\n")
    print(REFERENCE, file=sys.stderr)
