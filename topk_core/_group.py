"""Scale-out: one selection axis split into shards across devices or processes.

With ``group=G`` the public functions read ``x`` as *one shard* of a longer
selection axis split across the members of ``G`` (in member order); ``k`` is
global and every member gets its own slice of the global result.  The spec
needs only per-row sums and maxima across the shards, so a backend supports
groups by resolving the user's ``G`` into a :class:`Group`, a handful of
collectives on small per-row arrays:

* selection: the shared radix driver (:func:`topk_core._radix.radix_select_pair`)
  narrows on the local entries and combines each pass's per-row digit
  histogram with :meth:`Group.sum` and the final masked key maximum with
  :meth:`Group.max`, so a call communicates O(passes x bins) values per row,
  independent of the axis length;
* the VJP/JVP: ``sum(s)``, ``w . u`` and the tie counts, through the
  ``row_sum`` hook of :mod:`topk_core._math`;
* ``topk_mask``: the count above the threshold, plus :meth:`Group.exclusive_sum`
  of the per-shard tie counts (ties go to the lower *global* index first).

Backends: JAX (a mesh axis name inside ``shard_map``,
:mod:`topk_core.backends.jax_backend`) and PyTorch (a ``torch.distributed``
process group, :mod:`topk_core.backends.torch_distributed`).  Dask arrays need
no group: their chunks are the shards (:mod:`topk_core.backends.dask_backend`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

Array = Any

__all__ = ["Group", "row_sum_of", "local_row_sum"]


class Group(Protocol):
    """Collectives over the shards of one selection axis.

    Every method is called by every member with arrays of the same shape and
    dtype (per-row values, never the axis itself), and returns the same
    result on every member unless stated otherwise.
    """

    #: Shown in error messages, e.g. ``"JAX mesh axis 'd'"``.
    label: str

    def sum(self, v: Array) -> Array:
        """Elementwise sum of ``v`` over all members."""

    def max(self, v: Array) -> Array:
        """Elementwise maximum of ``v`` over all members (integers)."""

    def exclusive_sum(self, v: Array) -> Array:
        """Elementwise sum of ``v`` over the members *before* this one (0 on the first)."""

    def total(self, n_local: int) -> int | None:
        """Length of the global axis, or None where knowing it on the host costs a sync."""

    def select_pair(self, xp: Any, x: Array, k: int | Array) -> tuple[Array, Array]:
        """The :class:`topk_core.Backend` ``select_pair`` contract over the global axis."""

    #: ``apply(problem, output)``: an autodiff-aware forward (as ``Backend.apply``), or None.
    apply: Callable[..., Array] | None

    #: ``check_same_k(k)``, ``k`` a Python int or the caller's array ``k`` (not yet
    #: validated), called once per call before :meth:`total`: raise ``ValueError`` on
    #: every member unless all members passed the same ``k`` (members that each pass
    #: their own arguments, as torch.distributed ranks do); or None where one program
    #: serves every member (a JAX mesh axis: ``k`` is static).
    check_same_k: Callable[[Any], None] | None


def local_row_sum(xp: Any, v: Array) -> Array:
    """Per-row sum over the last axis, ``(..., 1)``."""
    return xp.sum(v, axis=-1, keepdims=True)


def row_sum_of(xp: Any, group: Group | None) -> Callable[[Array], Array] | None:
    """The ``row_sum`` hook of :mod:`topk_core._math` for ``group`` (None: local sums).

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core._group import row_sum_of
    >>> row_sum_of(np, None) is None
    True
    """
    if group is None:
        return None

    def row_sum(v: Array) -> Array:
        return group.sum(xp.sum(v, axis=-1, keepdims=True))

    return row_sum
