"""NumPy backend: O(n) selection with numpy's quickselect or the shared radix driver.

Scalar k, no mask: measured on this project's 2-core CPU machine (float32,
k = n/10, n = 1e6; shared/measurements/selection-primitives-cpu.md),
``np.partition`` with ONE kth runs numpy's SIMD quickselect, 6.0 ms including
the max over the lower part, while the two-kth form falls back to a non-SIMD
introselect (7.0 ms, 10-11 ms at k = n/2) and ``np.sort`` takes 31.8 ms.  So:
one partition at ``n - k`` gives ``a``; ``b`` is the max of everything left of it.

Per-row k (and masks, which make k per-row after clipping to n_valid):
``np.partition`` takes a single kth for all rows, so these run the shared
radix-select driver (:mod:`topk_core._radix`) with NumPy shims: a ``view``
bitcast and a per-row histogram from one ``np.bincount`` over
``row * nbins + digit`` (no Python loop over rows).

Measured here (float32 normal data, random per-row k; min of 5 runs, run side by
side in one process on the shared, noisy 2-core machine, ms):

==============  =========  ============  ==============  ==========  ===========
shape           partition  np.sort+take  generic (sort)  radix 8bit  radix 11bit
                (scalar k)                (before)
==============  =========  ============  ==============  ==========  ===========
1 x 1e6         9.9        78.9          187.5           38.6        35.9
256 x 4096      9.1        28.8          122.8           52.9        63.5
1024 x 4096     62.0       127.4         534.4           262.2       303.0
==============  =========  ============  ==============  ==========  ===========

So the driver is 2-5x faster than the generic sort-based fallback used before
in every regime, and beats even a bare ``np.sort`` + ``take_along_axis`` on
long rows; on short rows (n = 4096) a bare ``np.sort`` is about 2x faster than
the driver (NumPy's SIMD sort is fast on 16 KiB rows, while each radix pass
pays several full-array NumPy calls).  The driver is used anyway so that per-row
k and masks run the one shared, O(n) code path that every CI run tests.
11-bit digits (3 passes over 32-bit keys) win on long rows, 8-bit digits on
short ones, where 2048 bins per row cost more than the pass they save.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from topk_core._radix import float_to_keys, keys_to_float, radix_select_pair
from topk_core._registry import Backend

__all__ = ["BACKEND", "SHIMS", "NumpyShims", "select_pair", "digit_bits_for"]


def _view(a: np.ndarray, dtype: Any) -> np.ndarray:
    # same item size, so any strides work
    return a.view(dtype)


class NumpyShims:
    """Radix shims for NumPy (and, with ``mod=cupy``, for CuPy: same calls).

    Parameters
    ----------
    mod : module
        ``numpy``, or a module with the same ``view``/``bincount``/``arange`` API.
    compress : bool, default True
        Count only the active entries by boolean indexing (fast on the CPU once
        few are active), or send the inactive ones to a spare bin that is then
        dropped (no data-dependent output size: no device synchronisation on a GPU).
    """

    def __init__(self, mod: Any = np, *, compress: bool = True) -> None:
        self.mod = mod
        self.compress = compress

    def to_keys(self, x: Any) -> Any:
        return float_to_keys(self.mod, x, _view)

    def from_keys(self, keys: Any, dtype: Any) -> Any:
        return keys_to_float(self.mod, keys, dtype, _view)

    def row_histogram(self, digits: Any, active: Any, nbins: int) -> Any:
        """Per-row counts: one bincount over ``row * nbins + digit`` of the active entries."""
        m = self.mod
        lead = tuple(digits.shape[:-1])
        n = digits.shape[-1]
        rows = 1
        for s in lead:
            rows *= s
        # bincount wants indices castable to intp: uint32 is, uint64 is not
        wide = rows * nbins >= 2**32
        flat = digits.reshape(rows, n).astype(m.intp if wide else m.uint32, copy=False)
        if rows > 1:
            offsets = m.arange(0, rows * nbins, nbins, dtype=flat.dtype)
            flat = flat + offsets[:, None]
        act = active.reshape(rows, n)
        if self.compress:
            # compress, then count: after the first pass few entries are still active
            counts = m.bincount(flat[act], minlength=rows * nbins)
        else:
            spare = m.asarray(rows * nbins, dtype=flat.dtype)
            counts = m.bincount(m.where(act, flat, spare).ravel(), minlength=rows * nbins + 1)
            counts = counts[: rows * nbins]
        return counts.reshape(lead + (nbins,))


SHIMS = NumpyShims(np)


def digit_bits_for(n: int) -> int:
    """Digit width for rows of length ``n`` (measured, see the module docstring)."""
    return 11 if n >= 2**16 else 8


def select_pair(xp: Any, x: np.ndarray, k: Any) -> tuple[np.ndarray, np.ndarray]:
    """k-th and (k+1)-th largest along the last axis (see :class:`topk_core.Backend`).

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core.backends.numpy_backend import select_pair
    >>> x = np.array([[4.0, 1.0, 3.0], [2.0, 5.0, 0.0]])
    >>> select_pair(np, x, 1)
    (array([[4.],
           [5.]]), array([[3.],
           [2.]]))
    >>> a, b = select_pair(np, x, np.array([[0], [3]]))
    >>> a.ravel(), b.ravel()
    (array([inf,  0.]), array([  4., -inf]))
    """
    n = x.shape[-1]
    if not isinstance(k, int):
        return radix_select_pair(xp, x, k, SHIMS, digit_bits=digit_bits_for(n))
    shape = x.shape[:-1] + (1,)
    if k == 0:
        # initial=-inf: an empty axis (n = 0) has b = -inf, not an error
        b = np.max(x, axis=-1, keepdims=True, initial=-np.inf)
        return np.full(shape, np.inf, dtype=x.dtype), b
    if k == n:
        # the smallest; NaN ranks above +inf, so it is NaN only for an all-NaN row
        a = np.fmin.reduce(x, axis=-1, keepdims=True)
        return a, np.full(shape, -np.inf, dtype=x.dtype)
    part = np.partition(x, n - k, axis=-1)
    a = part[..., n - k : n - k + 1].copy()
    b = np.max(part[..., : n - k], axis=-1, keepdims=True)
    return a, b


BACKEND = Backend(name="numpy", select_pair=select_pair, eager=True)
