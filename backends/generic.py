"""Generic Array API selection: correct on any conforming namespace.

O(n log n) (a sort), used for libraries without a native backend, e.g.
array-api-strict or a third-party library.  No namespace available here has
the proposed ``top_k`` function, so the sort is the only standard primitive.
"""

from __future__ import annotations

from typing import Any

from topk_core._registry import Backend

__all__ = ["GENERIC_BACKEND", "STRICT_BACKEND", "select_pair", "sentinel"]


def sentinel(xp: Any, x: Any, value: float) -> Any:
    """A ``(..., 1)`` array filled with ``value`` in x's dtype and device."""
    return xp.full(tuple(x.shape[:-1]) + (1,), value, dtype=x.dtype, device=_device(x))


def _device(x: Any) -> Any:
    from array_api_compat import device

    return device(x)


def select_pair(xp: Any, x: Any, k: Any) -> tuple[Any, Any]:
    """k-th and (k+1)-th largest along the last axis, via a full sort."""
    n = x.shape[-1]
    s = xp.sort(x, axis=-1, descending=True, stable=False)  # ties need no order
    if isinstance(k, int):
        a = sentinel(xp, x, xp.inf) if k == 0 else s[..., k - 1 : k]
        b = sentinel(xp, x, -xp.inf) if k == n else s[..., k : k + 1]
        return a, b
    # per-row k: pad with the sentinels so that position k is x_(k), k+1 is x_(k+1)
    ext = xp.concat([sentinel(xp, x, xp.inf), s, sentinel(xp, x, -xp.inf)], axis=-1)
    k = xp.astype(k, xp.int64)  # torch.take_along_dim wants int64
    a = xp.take_along_axis(ext, k, axis=-1)
    b = xp.take_along_axis(ext, k + 1, axis=-1)
    return a, b


GENERIC_BACKEND = Backend(name="generic", select_pair=select_pair)
STRICT_BACKEND = Backend(name="array_api_strict", select_pair=select_pair, eager=True)
