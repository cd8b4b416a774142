"""The ``baseline`` step: the median master darks of a dark library (the paper's traditional
method, 3.2), what the model is compared with and what ``correct`` uses for ``median_*``.

The computation and the file belong to :mod:`deepdark.io.masters`, next to the reader, so that
the evaluation (below this layer) computes its medians with the same code.
"""

from __future__ import annotations

from deepdark.io.masters import write_masters

# The step is the writer itself: one signature and one set of defaults for the command line,
# the workflow and the Python API.
build_masters = write_masters
