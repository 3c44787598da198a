"""A plain NumPy ``logsumexp`` tuned for the short axes of EM (a few experts or classes).

scipy's version carries array-API dispatch costing ~1 ms a call, and NumPy reductions along a short
contiguous axis run an inner loop of length ``C``: slicing along the axis and combining whole slices
is several times faster for ``C`` up to a few dozen.
"""

from __future__ import annotations

import numpy as np

_SLICE_LIMIT = 32


def _reduce(op, a: np.ndarray, axis: int) -> np.ndarray:
    if a.shape[axis] > _SLICE_LIMIT:
        return op.reduce(a, axis=axis)
    parts = np.moveaxis(a, axis, 0)
    out = parts[0].copy()
    for part in parts[1:]:
        op(out, part, out=out)
    return out


def logsumexp(a: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
    """``log(sum(exp(a), axis))`` computed stably; all ``-inf`` slices give ``-inf``."""
    m = np.expand_dims(_reduce(np.maximum, a, axis), axis)
    if not np.isfinite(m).all():  # an all -inf slice: any finite shift will do
        m[~np.isfinite(m)] = 0.0
    s = _reduce(np.add, np.exp(a - m), axis)
    with np.errstate(divide="ignore"):
        out = np.log(s, out=s) + np.squeeze(m, axis=axis)
    return np.expand_dims(out, axis) if keepdims else out
