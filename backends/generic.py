"""Generic Array API selection: correct on any namespace array-api-compat knows.

Used for every library without a backend of its own: array-api-strict, Dask,
ndonnx, a third-party library.  It calls only functions of the Array API
standard (``sort``, ``max``, ``where``, ``isnan``, ``arange``, slicing) and
array-api-extra's ``partition``, which is O(n) where the library has a native
partition (NumPy, CuPy, JAX, PyTorch) and a sort elsewhere.  It assumes no
``take_along_axis`` (neither Dask nor older namespaces have it): per-row ``k``
picks its value with a one-hot ``where`` and a row ``max`` (O(n)).  Nothing
reads array values on the host, so lazy libraries (Dask) stay lazy.

NaN ranks above ``+inf`` (as ``np.sort`` and ``torch.sort`` order it): the
selection runs on ``x`` with NaN replaced by ``+inf``, which leaves every rank
below the NaN entries unchanged, and the rows where the k-th (or (k+1)-th)
largest entry is a NaN (``k <= n_nan``) get NaN afterwards.
"""

from __future__ import annotations

from typing import Any

from topk_core._math import standard_function
from topk_core._registry import Backend

__all__ = ["GENERIC_BACKEND", "STRICT_BACKEND", "select_pair", "sentinel"]


def sentinel(xp: Any, x: Any, value: float) -> Any:
    """A ``(..., 1)`` array filled with ``value`` in x's dtype and device."""
    return xp.full(tuple(x.shape[:-1]) + (1,), value, dtype=x.dtype, device=_device(x))


def _device(x: Any) -> Any:
    from array_api_compat import device

    return device(x)


def _scalar_k(xp: Any, x: Any, k: int) -> tuple[Any, Any]:
    """``(a, b)`` of a NaN-free ``x`` for one ``k`` shared by every row."""
    n = x.shape[-1]
    if k == 0:
        return sentinel(xp, x, xp.inf), xp.max(x, axis=-1, keepdims=True)
    if k == n:
        return xp.min(x, axis=-1, keepdims=True), sentinel(xp, x, -xp.inf)
    import array_api_extra as xpx

    # ascending partition at n - k: the k-th largest lands there, smaller ones left of it
    part = xpx.partition(x, n - k, axis=-1, xp=xp)
    return part[..., n - k : n - k + 1], xp.max(part[..., : n - k], axis=-1, keepdims=True)


def _per_row_k(xp: Any, x: Any, k: Any) -> tuple[Any, Any]:
    """``(a, b)`` of a NaN-free ``x`` for per-row ``k`` (shape ``(..., 1)``, in [0, n])."""
    n = x.shape[-1]
    s = xp.sort(x, axis=-1, stable=False)  # ascending: the k-th largest sits at n - k
    arange = standard_function(
        xp, "arange", "a per-row k (an array k, or a mask)", "an integer k without a mask"
    )
    pos = arange(n, device=_device(x))
    k = xp.astype(k, pos.dtype)
    ninf = xp.asarray(-xp.inf, dtype=x.dtype)
    # one-hot pick along the row (no take_along_axis); max keeps the value bit-exact
    a = xp.max(xp.where(pos == n - k, s, ninf), axis=-1, keepdims=True)
    b = xp.max(xp.where(pos == n - k - 1, s, ninf), axis=-1, keepdims=True)
    a = xp.where(k == 0, xp.asarray(xp.inf, dtype=x.dtype), a)
    b = xp.where(k == n, ninf, b)
    return a, b


def select_pair(xp: Any, x: Any, k: Any) -> tuple[Any, Any]:
    """k-th and (k+1)-th largest along the last axis (see :class:`topk_core.Backend`).

    NaN counts as larger than ``+inf``.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> from topk_core.backends.generic import select_pair
    >>> x = xp.asarray([[4.0, 1.0, 3.0], [2.0, float("nan"), 0.0]])
    >>> a, b = select_pair(xp, x, 2)
    >>> [float(v) for v in a[:, 0]]
    [3.0, 2.0]
    >>> [float(v) for v in b[:, 0]]
    [1.0, 0.0]
    >>> a, b = select_pair(xp, x, xp.asarray([[0], [1]]))
    >>> [float(v) for v in a[:, 0]], [float(v) for v in b[:, 0]]
    ([inf, nan], [4.0, 2.0])
    """
    n = x.shape[-1]
    if n == 0 or 0 in x.shape[:-1]:
        # n = 0: only k = 0 is possible, both sentinels.  An empty batch has nothing to
        # select, and Dask's max fails on it even along a non-empty axis
        return sentinel(xp, x, xp.inf), sentinel(xp, x, -xp.inf)
    nan = xp.isnan(x)
    xm = xp.where(nan, xp.asarray(xp.inf, dtype=x.dtype), x)
    a, b = _scalar_k(xp, xm, k) if isinstance(k, int) else _per_row_k(xp, xm, k)
    # NaN entries are the largest: the k-th (or (k+1)-th) largest is a NaN when k <= n_nan
    n_nan = xp.sum(xp.astype(nan, xp.int32), axis=-1, keepdims=True)
    qnan = xp.asarray(xp.nan, dtype=x.dtype)
    if isinstance(k, int):
        a = a if k == 0 else xp.where(n_nan >= k, qnan, a)
        return a, xp.where(n_nan >= k + 1, qnan, b)
    k = xp.astype(k, n_nan.dtype)
    a = xp.where((k >= 1) & (n_nan >= k), qnan, a)
    return a, xp.where(n_nan >= k + 1, qnan, b)


GENERIC_BACKEND = Backend(name="generic", select_pair=select_pair)
STRICT_BACKEND = Backend(name="array_api_strict", select_pair=select_pair, eager=True)
