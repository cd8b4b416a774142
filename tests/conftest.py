"""Shared fixtures: small archives on the `mini` geometry, written without the simulator so that
reader tests do not depend on its physics."""

from __future__ import annotations

import numpy as np
import pytest

from deepdark.io.frames import write_raw_frame
from deepdark.io.geometry import load_geometry


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a shared machine OpenMP threads that
    spin-wait on busy cores make every step many times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def mini():
    return load_geometry("mini")


def header(
    imagetyp="DARK", exptime=30.0, ccdtemp=-15.2, settemp=-15.0, camera="GS1", date="2024-01-01T13:00:00", **extra
):
    h = {
        "IMAGETYP": imagetyp,
        "EXPTIME": exptime,
        "CCDTEMP": ccdtemp,
        "SETTEMP": settemp,
        "DATE-OBS": date,
        "CAMERA": camera,
    }
    h.update(extra)
    return {k: v for k, v in h.items() if v is not None}


def random_frame(geometry, seed, level=1000):
    rng = np.random.default_rng(seed)
    return rng.integers(level - 200, level + 200, size=geometry.frame_shape, dtype=np.uint16)


@pytest.fixture
def write_night(tmp_path, mini):
    """write_night(night, n_dark, n_guide, settemp) -> folder with random-pixel frames."""

    def make(night="20240101", n_dark=3, n_guide=1, settemp=-15.0, seed=0, camera="GS1", level=1000):
        folder = tmp_path / "archive" / night
        for i in range(n_dark + n_guide):
            kind = "DARK" if i < n_dark else "OBJECT"
            write_raw_frame(
                folder / f"{camera}_{kind.lower()}_{i:04d}.fits",
                random_frame(mini, seed * 1000 + i, level),
                header(kind, settemp=settemp, ccdtemp=settemp + 0.3, camera=camera),
            )
        return folder

    return make
