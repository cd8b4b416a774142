"""The per-pixel fit's innermost sums, compiled (numba) (``deepdark.physics``).

Imported when first needed, not with the package: loading numba takes a fifth of a second and
compiling the kernel half a second for each kind of weights (float32, bool), which a job that
never fits a library need not pay.
Compiled in each process, not cached on disk: numba's cache can be corrupted by processes that
compile into it at once (numba issues 4807, 10128), as a cluster's jobs sharing one installation
would, and a corrupted or foreign kernel would be a silent error in every map.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True)
def normal_sums(Y, W, XT, XX, A, b) -> None:
    """Add to the packed normal matrices ``A`` (pairs, P) and right sides ``b`` (K, P), float64,
    the weighted sums of every pixel: ``A[q] += XX[q, f] * W[f]``, ``b[k] += XT[k, f] * W[f] * Y[f]``
    for the frames f = 0, 1, ... of ``Y`` (N, P) and ``W`` (N, P) (float32, or bool for weights
    of 1), with ``XT`` (K, N) the design and ``XX`` (pairs, N) its products.

    One pass over a block's values, a frame's row of pixels at a time (in the cache), and no
    interpreter lock; each pixel's sums run in frame order, whatever the pixels beside it."""
    N, P = Y.shape
    w = np.empty(P)
    wy = np.empty(P)
    for f in range(N):
        for p in range(P):
            w[p] = W[f, p]
            wy[p] = w[p] * Y[f, p]  # exact: a float32 product in float64
        for q in range(XX.shape[0]):
            c = XX[q, f]
            row = A[q]
            for p in range(P):
                row[p] += c * w[p]
        for k in range(XT.shape[0]):
            c = XT[k, f]
            row = b[k]
            for p in range(P):
                row[p] += c * wy[p]
