"""The ``baseline`` step: the median master darks of a dark library (the paper's traditional
method, 3.2), what the model is compared with and what ``correct`` uses for ``median_*``.

The computation and the file belong to :mod:`deepdark.io.masters`, next to the reader, so that
the evaluation (below this layer) computes its medians with the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from deepdark.io.masters import write_masters


def build_masters(
    shards: Sequence[str | Path],
    out: str | Path,
    memory_mb: float = 512,
    progress: bool = True,
    scratch: str | Path | None = None,
) -> Path:
    """Median master darks of the DARK frames in ``shards``, written atomically to ``out``, with
    the record of the frames that went in (:attr:`deepdark.io.masters.Masters.frames`).

    Parameters
    ----------
    shards
        The library's shards.
    out
        The master-dark file (HDF5), read with :class:`deepdark.io.masters.Masters`.
    memory_mb
        Memory budget of the streamed medians.
    progress
        Draw a progress bar (on a terminal).
    scratch
        Folder of the scratch file of a library too large for ``memory_mb`` (default: the
        folder of ``out``); read once, it costs the library's active areas uncompressed.
    """
    return write_masters(shards, out, memory_mb=memory_mb, progress=progress, scratch=scratch)
