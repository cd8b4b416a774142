"""Write-then-rename: no partial file is ever left where a finished one belongs."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | Path):
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    The temporary name starts with a dot and ends in ``.partial`` so that neither Snakemake nor a
    glob for ``*.fits``/``*.h5`` mistakes it for a result; on any error it is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.partial")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # data on disk before the name says it is finished
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
