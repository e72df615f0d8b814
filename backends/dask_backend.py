"""Dask backend: DFTopK on dask arrays whose selection axis spans many chunks.

The chunks along the selection axis are the shards.  The selection is the
project's shared radix driver (:func:`topk_core._radix.radix_select_pair`),
run lazily on the dask array with these shims:

* keys: NumPy's order-preserving key mapping, applied per chunk
  (``map_blocks``, so a pass never moves values between tasks);
* per-row histogram of a pass: one NumPy task per chunk finds the pass's
  candidates from the chunk's keys and the prefix fixed so far and counts
  their digits (the driver's own :func:`topk_core._radix.pass_histogram`
  with NumPy's ``bincount``), then a tree reduction (``sum`` with
  ``split_every``) of those small per-chunk histograms.  So no full-size
  array (digits, candidate mask) passes from one pass to the next;
* the bin that holds the wanted rank: the driver's own
  :func:`topk_core._radix.locate_bin` run by NumPy on each row chunk's
  histogram (one task, where its Array API calls were some 30 graph layers).

Every per-row value of the driver (the histograms, the chosen digits, the
final key maximum) is ``rows x bins`` small; every full-size array is
elementwise and keeps the input's chunks.  So there is no rechunk to one chunk
and no sort, each task holds O(chunk) memory, everything stays lazy until the
caller computes, and the result (like the VJP's) is a dask array chunked like
``x``.  The elementwise math and the VJP/JVP sums are the shared
:mod:`topk_core._math` run through array-api-compat's dask namespace (its
reductions are tree reductions too).  Works with any dask scheduler: the block
functions are module-level, so they pickle to worker processes.

Digits: 11 bits (3 passes for float32) when the widest chunk along the axis
has at least 2**16 entries, else 8 bits (4 passes): the NumPy backend's
measured choice (:func:`topk_core.backends.numpy_backend.digit_bits_for`),
applied per chunk because that is where the histograms are built.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
from topk_core.backends.numpy_backend import NumpyShims, digit_bits_for

from topk_core._radix import (
    float_to_keys,
    keys_to_float,
    locate_bin,
    pass_histogram,
    radix_select_pair,
)
from topk_core._registry import Backend

__all__ = ["BACKEND", "SPLIT_EVERY", "DaskShims", "check_lazily", "select_pair"]

#: fan-in of the tree reduction of per-chunk histograms
SPLIT_EVERY = 8

_NP = NumpyShims(np)


def _view(a: np.ndarray, dtype: Any) -> np.ndarray:
    return a.view(dtype)


def _keys_block(x: np.ndarray) -> np.ndarray:
    return float_to_keys(np, x, _view)


def _floats_block(keys: np.ndarray, dtype: Any) -> np.ndarray:
    return keys_to_float(np, keys, dtype, _view)


def _locate_block(hist: np.ndarray, remaining: np.ndarray, *, width: int) -> np.ndarray:
    # the driver's own locate_bin, in NumPy on one row chunk; (digit, gt, count) side by side
    return np.concatenate(locate_bin(np, hist, remaining, width, _NP.block_bins), axis=-1)


def _histogram_block(
    digits: np.ndarray, active: np.ndarray | None = None, *, nbins: int
) -> np.ndarray:
    # (..., n_chunk) -> (..., 1, nbins): the chunk's own axis position becomes size 1
    return _NP.row_histogram(digits, active, nbins)[..., None, :]


def _row_index(a: Any) -> str:
    # blockwise index letters of the leading (row) axes; "y"/"z" stay free for the last
    return "abcdefghijklmnopqrstuvwx"[: a.ndim - 1]


def _prefix_histogram_block(
    keys: np.ndarray, prefix: np.ndarray, *, shift: int, width: int, first: bool
) -> np.ndarray:
    # the driver's own pass_histogram on one chunk; prefix comes without its size-1 axis
    hist = pass_histogram(np, keys, prefix[..., None], shift, width, first, _NP.row_histogram)
    return hist[..., None, :]


class DaskShims:
    """Radix shims for dask arrays: per-chunk NumPy work, tree-reduced histograms."""

    def to_keys(self, x: Any) -> Any:
        udt = {16: np.uint16, 32: np.uint32, 64: np.uint64}[np.finfo(x.dtype).bits]
        return x.map_blocks(_keys_block, dtype=udt)

    def from_keys(self, keys: Any, dtype: Any) -> Any:
        return keys.map_blocks(_floats_block, dtype, dtype=dtype)

    def row_histogram(self, digits: Any, active: Any, nbins: int) -> Any:
        """Per-row counts ``(..., nbins)``: a histogram per chunk, summed as a tree."""
        nblocks = len(digits.chunks[-1])
        # per-row values (the prefix) may come back chunked otherwise; align to the data
        # (None: every entry counts, the driver's first pass)
        arrays = (digits,) if active is None else (digits, active.rechunk(digits.chunks))
        per_chunk = da.map_blocks(
            _histogram_block,
            *arrays,
            nbins=nbins,
            new_axis=digits.ndim,
            chunks=tuple(digits.chunks[:-1]) + ((1,) * nblocks, (nbins,)),
            dtype=np.int64,
        )
        return per_chunk.sum(axis=-2, split_every=SPLIT_EVERY)

    def prefix_histogram(self, keys: Any, prefix: Any, shift: int, width: int, first: bool) -> Any:
        """:func:`topk_core._radix.pass_histogram` per chunk, summed as a tree.

        Each task takes its chunk's keys and its rows' prefix and builds the
        digits and the candidate mask itself, so a pass adds no full-size
        array to the graph (the driver's digits and mask are four such
        layers a pass, and the mask chains every pass to the one before).
        """
        nbins = 1 << width
        lead = _row_index(keys)
        # the per-row prefix on the keys' row chunks, without its size-1 axis
        prefix = prefix[..., 0].rechunk(keys.chunks[:-1])
        per_chunk = da.blockwise(
            _prefix_histogram_block,
            lead + "yz",
            keys,
            lead + "y",
            prefix,
            lead,
            shift=shift,
            width=width,
            first=first,
            new_axes={"z": nbins},
            adjust_chunks={"y": 1},
            dtype=np.int64,
        )
        return per_chunk.sum(axis=-2, split_every=SPLIT_EVERY)

    def locate(self, hist: Any, remaining: Any, width: int) -> tuple[Any, Any, Any]:
        """:func:`topk_core._radix.locate_bin` as one NumPy task per row chunk.

        Its two-level search written in Array API calls on dask arrays is some
        30 graph layers a pass (the graph of one ``dftopk`` had 477); each row
        chunk's histogram is small, so NumPy runs the same function on it.
        """
        lead = _row_index(remaining)
        hist = hist.rechunk(remaining.chunks[:-1] + (-1,))
        out = da.blockwise(
            _locate_block,
            lead + "z",
            hist,
            lead + "y",
            remaining,
            lead + "z",
            width=width,
            dtype=remaining.dtype,
            adjust_chunks={"z": 3},
            concatenate=True,
        )
        return out[..., 0:1], out[..., 1:2], out[..., 2:3]


SHIMS = DaskShims()


def select_pair(xp: Any, x: Any, k: Any) -> tuple[Any, Any]:
    """k-th and (k+1)-th largest along the last axis (see :class:`topk_core.Backend`), lazily.

    Examples
    --------
    >>> import dask.array as da
    >>> import array_api_compat
    >>> from topk_core.backends.dask_backend import select_pair
    >>> x = da.from_array([[4.0, 1.0, 3.0, 2.0, 0.0, 5.0]], chunks=2)
    >>> a, b = select_pair(array_api_compat.array_namespace(x), x, 2)
    >>> a.compute(), b.compute()
    (array([[4.]]), array([[3.]]))
    """
    widest = max(x.chunks[-1], default=0)
    return radix_select_pair(xp, x, k, SHIMS, digit_bits=digit_bits_for(widest))


def _checked_block(block: np.ndarray, check: Any, *args: Any) -> np.ndarray:
    check(block, *args)
    return block


def check_lazily(arr: Any, check: Any, *args: Any) -> Any:
    """``arr`` with ``check(chunk, *args)`` run on every chunk when it is computed.

    A Dask array in ``args`` with ``arr``'s shape passes its matching chunk
    (it is rechunked like ``arr``); other arguments pass as they are.

    The check raises out of the caller's ``compute()``; nothing is computed here.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> from topk_core.backends.dask_backend import check_lazily
    >>> def positive(v):
    ...     if not (v > 0).all():
    ...         raise ValueError("not positive")
    >>> t = check_lazily(da.from_array(np.array([1.0, -1.0]), chunks=1), positive)
    >>> t.compute()
    Traceback (most recent call last):
    ...
    ValueError: not positive
    """
    # array arguments (as large as arr) pass their matching chunk: give them arr's chunks
    args = tuple(
        a.rechunk(arr.chunks) if isinstance(a, da.Array) and a.shape == arr.shape else a
        for a in args
    )
    return arr.map_blocks(_checked_block, check, *args, dtype=arr.dtype)


def align(arr: Any, like: Any) -> Any:
    """``arr`` on ``like``'s chunks along every axis of ``like``'s size (a size-1 axis
    stays one chunk): a per-row ``k`` or ``tau``, a mask or a cotangent chunked
    differently would re-chunk the outputs to the finer of the two chunkings.

    Examples
    --------
    >>> import dask.array as da
    >>> from topk_core.backends.dask_backend import align
    >>> x = da.zeros((4, 6), chunks=(4, 3))
    >>> align(da.ones((4, 1), chunks=(2, 1)), x).chunks
    ((4,), (1,))
    """
    if not isinstance(arr, da.Array) or arr.ndim != like.ndim:
        return arr
    chunks = tuple(
        c if n == m else a for a, c, n, m in zip(arr.chunks, like.chunks, arr.shape, like.shape)
    )
    return arr if chunks == arr.chunks else arr.rechunk(chunks)


def compact(x: Any) -> Any:
    """``x`` without empty chunks along the last axis, else ``x`` itself.

    Empty chunks come from boolean indexing followed by ``compute_chunk_sizes()``;
    Dask's keepdims reductions (``max``) and ``cumsum`` fail on empty blocks, and
    a row's entries are the same without them.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> from topk_core.backends.dask_backend import compact
    >>> x = da.from_array(np.ones((2, 4)), chunks=((2,), (2, 0, 2)))
    >>> y = compact(x)
    >>> y.chunks, compact(y) is y
    (((2,), (2, 2)), True)
    """
    last = tuple(c for c in x.chunks[-1] if c)
    if len(last) == len(x.chunks[-1]) or not last:
        return x
    return x.rechunk(x.chunks[:-1] + (last,))


def _no_group(group: Any, x: Any, axis: int) -> Any:
    raise TypeError(
        f"group={group!r} is not used with dask arrays: their chunks along the axis are "
        f"already the shards (the selection tree-reduces per-chunk histograms); "
        f"drop group="
    )


BACKEND = Backend(
    name="dask",
    select_pair=select_pair,
    eager=False,
    group=_no_group,
    check_lazily=check_lazily,
    align=align,
    compact=compact,
)
