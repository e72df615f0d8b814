"""NumPy backend: O(n) selection with numpy's quickselect.

Measured on this project's 2-core CPU machine (float32, k = n/10, n = 1e6;
shared/measurements/selection-primitives-cpu.md): ``np.partition`` with ONE
kth runs numpy's SIMD quickselect, 6.0 ms including the max over the lower
part, while the two-kth form falls back to a non-SIMD introselect (7.0 ms,
10-11 ms at k = n/2) and ``np.sort`` takes 31.8 ms.  So: one partition at
``n - k`` gives ``a``; ``b`` is the max of everything left of it.
``np.partition`` takes a single kth for all rows, so per-row k (and masks,
which make k per-row after clipping to n_valid) go to the array-generic path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from topk_core._registry import Backend

from . import generic

__all__ = ["BACKEND", "select_pair"]


def select_pair(xp: Any, x: np.ndarray, k: Any) -> tuple[np.ndarray, np.ndarray]:
    """k-th and (k+1)-th largest along the last axis (see :class:`topk_core.Backend`)."""
    if not isinstance(k, int):
        return generic.select_pair(xp, x, k)
    n = x.shape[-1]
    shape = x.shape[:-1] + (1,)
    if k == 0:
        return np.full(shape, np.inf, dtype=x.dtype), np.max(x, axis=-1, keepdims=True)
    if k == n:
        return np.min(x, axis=-1, keepdims=True), np.full(shape, -np.inf, dtype=x.dtype)
    part = np.partition(x, n - k, axis=-1)
    a = part[..., n - k : n - k + 1].copy()
    b = np.max(part[..., : n - k], axis=-1, keepdims=True)
    return a, b


BACKEND = Backend(name="numpy", select_pair=select_pair, eager=True)
