"""PyTorch backend: O(n) selection of the k-th and (k+1)-th largest values.

Selection choices, measured on this project's shared 2-core CPU machine (torch
2.13.0 CPU build, float32, k = n/10; min over 25-40 interleaved rounds, the
machine was loaded by other jobs so medians are noisy):

==========================================  ============  ==============
method                                       n = 1e6       B=1024, n=4096
==========================================  ============  ==============
``torch.kthvalue`` twice (official DFTopK)    26 - 38 ms     141 - 176 ms
``kthvalue`` + masked max for ``b``           13 - 15 ms     114 - 168 ms
``topk(k+1, sorted=False)`` + min/2nd-min     11 - 15 ms      62 -  76 ms
``torch.sort``                               114 - 250 ms    218 - 570 ms
``np.partition`` (one kth) + max, zero-copy   10 ms           43 ms
``np.sort``                                   70 ms          100 ms
==========================================  ============  ==============

So, for a Python-int ``k``:

* plain CPU tensors in eager mode (no ``torch.compile`` tracing, no
  ``torch.func`` wrapper, a dtype NumPy has) use NumPy's SIMD quickselect on a
  zero-copy view (:mod:`topk_core.backends.numpy_backend`): no device exists to
  synchronise with, and it is 1.5-2x faster than any torch CPU primitive;
* everything else (CUDA, tracing, functorch transforms, bfloat16) uses
  ``torch.topk(m, sorted=False)`` on the smaller side (``m = k+1`` largest or
  ``n-k+1`` smallest) and reads ``a``/``b`` off those ``m`` values with
  elementwise ops.  On CPU that beats ``kthvalue`` (which is not parallel over
  rows); on CUDA both are radix selects and ``topk`` also has a multi-block
  path for a single long row, where ``kthvalue`` uses one block per row.  The
  CUDA choice follows from that and is NOT measured here (no GPU available).

A per-row ``k`` tensor (also what a mask produces, since k is clipped to each
row's valid count) cannot use ``topk`` without reading ``max(k)`` on the host,
so it sorts (``np.sort`` on the host path, ``torch.sort`` otherwise) and
gathers; that is O(n log n) but never loops over rows in Python.
"""

from __future__ import annotations

from typing import Any

import torch

from topk_core._registry import Backend

__all__ = ["BACKEND", "host_ok", "select_pair"]

_INF = float("inf")
# dtypes for which NumPy has the same type (bfloat16 has none)
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)

try:  # NumPy is optional for topk-core; without it the torch-only path is used
    import numpy as _np

    from . import numpy_backend as _numpy_backend
except ImportError:  # pragma: no cover - numpy is installed wherever the tests run
    _np = None
    _numpy_backend = None


def host_ok(x: torch.Tensor) -> bool:
    """True when ``x``'s values may be read on the host at no cost.

    That is: a plain CPU tensor in eager mode.  Not while ``torch.compile``
    traces (reading values would break the graph), not for functorch-wrapped
    (``vmap``/``grad``) or fake/subclass tensors, never for CUDA (a sync).
    """
    if x.device.type != "cpu" or type(x) is not torch.Tensor:
        return False
    if torch.compiler.is_compiling():
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(x)


def _sentinel(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full(x.shape[:-1] + (1,), value, dtype=x.dtype, device=x.device)


def _extreme_and_next(v: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the values ``v`` (last axis), the smallest and the 2nd smallest
    (``largest=True``) or the largest and the 2nd largest, counting repeats."""
    if largest:
        e = v.amin(-1, keepdim=True)
        beyond = v > e
        fill = _INF
    else:
        e = v.amax(-1, keepdim=True)
        beyond = v < e
        fill = -_INF
    nxt = torch.where(beyond, v, fill)
    nxt = nxt.amin(-1, keepdim=True) if largest else nxt.amax(-1, keepdim=True)
    # a repeated extreme is its own runner-up
    repeated = (~beyond).sum(-1, keepdim=True) >= 2
    return e, torch.where(repeated, e, nxt)


def _select_scalar_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    if k == 0:
        return _sentinel(x, _INF), x.amax(-1, keepdim=True)
    if k == n:
        return x.amin(-1, keepdim=True), _sentinel(x, -_INF)
    if k + 1 <= n - k + 1:
        # the k+1 largest: b is their minimum, a the runner-up
        v = torch.topk(x, k + 1, dim=-1, largest=True, sorted=False).values
        b, a = _extreme_and_next(v, largest=True)
    else:
        # the n-k+1 smallest: a (the (n-k+1)-th smallest) is their maximum
        v = torch.topk(x, n - k + 1, dim=-1, largest=False, sorted=False).values
        a, b = _extreme_and_next(v, largest=False)
    return a, b


def _gather_sorted(s: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` from rows ``s`` sorted ascending and per-row ``k`` in [0, n]."""
    n = s.shape[-1]
    k = k.to(torch.int64)
    # the k-th largest sits at ascending index n - k
    ia = (n - k).clamp(0, n - 1)
    ib = (n - k - 1).clamp(0, n - 1)
    a = torch.take_along_dim(s, ia, dim=-1)
    b = torch.take_along_dim(s, ib, dim=-1)
    a = torch.where(k == 0, _INF, a)
    b = torch.where(k == n, -_INF, b)
    return a.to(s.dtype), b.to(s.dtype)


def select_pair(xp: Any, x: torch.Tensor, k: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """k-th and (k+1)-th largest along the last axis (see :class:`topk_core.Backend`).

    Parameters
    ----------
    xp : namespace
        The array namespace (unused; kept for the backend contract).
    x : torch.Tensor
        Scores with the selection axis last; masked entries already ``-inf``.
    k : int or torch.Tensor
        A Python int in ``[0, n]`` or an integer tensor of shape
        ``x.shape[:-1] + (1,)`` with values in ``[0, n]``.

    Returns
    -------
    a, b : torch.Tensor
        Shape ``x.shape[:-1] + (1,)``, x's dtype and device; ``a = +inf`` for
        ``k = 0`` and ``b = -inf`` for ``k = n``.

    Examples
    --------
    >>> import torch
    >>> from topk_core.backends.torch_backend import select_pair
    >>> select_pair(None, torch.tensor([[1.0, 4.0, 3.0, 2.0]]), 2)
    (tensor([[3.]]), tensor([[2.]]))
    >>> select_pair(None, torch.tensor([[1.0, 4.0], [5.0, 6.0]]), torch.tensor([[0], [2]]))
    (tensor([[inf],
            [5.]]), tensor([[4.],
            [-inf]]))
    """
    if x.shape[-1] == 0:
        shape_inf = _sentinel(x, _INF)
        return shape_inf, -shape_inf
    fast = _numpy_backend is not None and x.dtype in _NUMPY_DTYPES and host_ok(x)
    if isinstance(k, int):
        if fast and 0 < k < x.shape[-1]:
            a, b = _numpy_backend.select_pair(_np, x.detach().numpy(), k)
            return torch.from_numpy(a), torch.from_numpy(b)
        return _select_scalar_k(x, k)
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"k must be a Python int or a torch.Tensor, got {type(k).__name__}")
    if fast and type(k) is torch.Tensor:
        s = torch.from_numpy(_np.sort(x.detach().numpy(), axis=-1))
    else:
        s = torch.sort(x, dim=-1).values
    return _gather_sorted(s, k)


def _sigmoid(z: torch.Tensor) -> torch.Tensor:
    # torch.sigmoid is stable (no overflow) and keeps tail accuracy
    return torch.sigmoid(z)


def _apply(pb: Any, output: str) -> Any:
    # the autograd hook lives in the adapter; imported lazily to keep this module light
    from topk_core.adapters.torch_adapter import apply_problem

    return apply_problem(pb, output)


BACKEND = Backend(name="torch", select_pair=select_pair, sigmoid=_sigmoid, apply=_apply)
