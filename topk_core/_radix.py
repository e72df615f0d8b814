"""One radix-select driver for ``(a, b)``, shared by every array library.

The driver finds, per row, the k-th largest entry by MSB-first digit narrowing
over order-preserving unsigned integer keys, then the (k+1)-th largest from it
with one masked max (or, with ``track_b``, narrows the (k+1)-th in the same
passes, histogramming both ranks' candidates).  It uses only Array API
operations on ``xp`` plus three tiny per-library shims (bitcast to keys and
back, per-row histogram), so the same code runs eagerly (NumPy, CuPy) and under
tracing (JAX): the only Python loop is static, over the digit passes; nothing
branches on array values, reads values on the host or mutates in place.
O(n * key_bits / digit_bits) work.

Key mapping (``float_to_keys``): with ``mag`` the bits without the sign,
``key = S - mag`` for negative non-zero non-NaN ``x``, else ``key = S + mag``,
``S = 2**(bits-1)``.  ``-0.0`` and ``+0.0`` both map to ``S``; every NaN maps
above ``+inf``; ``-inf`` is the smallest non-NaN key.  So NaN sorts as the
largest value, like a descending ``sort`` that puts NaN first.  Libraries
without usable unsigned integers (PyTorch) use the same keys shifted down by
``S`` into the signed type of the same width (``float_to_signed_keys``:
``-mag`` / ``+mag``); the driver reads the sign from the key dtype.

Scale-out: with ``group`` (a :class:`topk_core._group.Group`) ``x`` is one
shard of a longer axis.  Each pass histograms the local entries and sums the
histograms over the group; the final key maximum (without ``track_b``) is a
group maximum.  Every
shard then narrows with the same global digit, so all of them end with the
same ``(a, b)``; the communication is ``passes x 2**digit_bits`` counts per
row plus one key per row, whatever the axis length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

Array = Any

__all__ = [
    "RadixShims",
    "GenericShims",
    "float_to_keys",
    "keys_to_float",
    "float_to_signed_keys",
    "signed_keys_to_float",
    "comparison_histogram",
    "radix_select_pair",
    "check_digit_bits",
    "digit_widths",
    "locate_bin",
    "pass_digits",
    "pass_histogram",
]

MAX_DIGIT_BITS = 16
_FLAT_BITS = 6  # digits up to this wide: one block of all the bins (a short prefix sum)


class RadixShims(Protocol):
    """What the driver needs from an array library besides the Array API."""

    def to_keys(self, x: Array) -> Array:
        """Float ``(..., n)`` -> unsigned keys of the same width, order-preserving.

        ``-0.0`` and ``+0.0`` map to the same key; NaN maps above ``+inf``.
        Signed keys (:func:`float_to_signed_keys`) work too.
        """

    def from_keys(self, keys: Array, dtype: Any) -> Array:
        """Inverse of :meth:`to_keys` for canonical values (``+0.0`` for zero)."""

    def row_histogram(self, digits: Array, active: Array, nbins: int) -> Array:
        """Per-row counts of the active entries per digit.

        ``digits`` ``(..., n)`` unsigned ints in ``[0, nbins)``, ``active``
        bool ``(..., n)``, or None when every entry counts (the driver's first
        pass: no mask to apply); returns integer counts ``(..., nbins)``.
        """

    # Optional (looked up with getattr, so not part of the protocol's signature):
    # ``block_bins(blocks, rows) -> (..., width)``, row ``rows`` (integer ``(..., 1)``)
    # of ``blocks`` ``(..., n_blocks, width)``: a gather.  Without it the driver
    # picks that row with a one-hot sum, which reads every block.
    # ``locate(hist, remaining, width) -> (digit, gt, count)``: :func:`locate_bin`'s
    # result for one histogram of ``2**width`` bins per row, computed in the
    # library's own way (Dask: one NumPy task per row chunk instead of a few dozen
    # graph layers); used where the driver narrows one rank per pass.
    # ``prefix_histogram(keys, prefix, shift, width, first) -> (..., 2**width)``:
    # :func:`pass_histogram`'s result, computed in the library's own way (Dask: one
    # NumPy task per chunk, where the driver's digits and candidate mask are four
    # full-size graph layers a pass); used where the driver narrows one rank per pass.


def _int_dtype(xp: Any, bits: int) -> Any:
    try:
        return {16: xp.int16, 32: xp.int32, 64: xp.int64}[bits]
    except KeyError:
        raise TypeError(f"no signed key type for {bits}-bit floats") from None


def _uint_dtype(xp: Any, bits: int) -> Any:
    try:
        return {16: xp.uint16, 32: xp.uint32, 64: xp.uint64}[bits]
    except KeyError:
        raise TypeError(f"no unsigned key type for {bits}-bit floats") from None


def float_to_keys(xp: Any, x: Array, bitcast: Callable[[Array, Any], Array]) -> Array:
    """Order-preserving unsigned keys of ``x``, given a library's ``bitcast(x, dtype)``.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core._radix import float_to_keys
    >>> x = np.array([-np.inf, -1.0, -0.0, 0.0, 1.0, np.inf, np.nan], dtype=np.float16)
    >>> k = float_to_keys(np, x, lambda a, dt: a.view(dt))
    >>> bool(np.all(k[1:-1] >= k[:-2])), bool(k[2] == k[3]), bool(k[-1] > k[-2])
    (True, True, True)
    """
    bits = xp.finfo(x.dtype).bits
    udt = _uint_dtype(xp, bits)
    raw = bitcast(x, udt)
    sign = xp.asarray(1 << (bits - 1), dtype=udt)
    mag = raw & xp.asarray((1 << (bits - 1)) - 1, dtype=udt)
    inf_mag = bitcast(xp.asarray(xp.inf, dtype=x.dtype), udt)
    one = xp.asarray(1, dtype=udt)
    # negative = sign bit set (raw > mag) and 0 < mag <= inf's: -0.0 joins +0.0,
    # NaN of either sign lands above +inf.  Integer tests only: a float ``x < 0``
    # misreads negative subnormals where denormals are flushed (XLA on CPU).
    # (mag - 1) wraps to the largest key for mag = 0; no overflow below: mag < sign.
    neg = (raw > mag) & ((mag - one) < inf_mag)
    return xp.where(neg, sign - mag, sign + mag)


def keys_to_float(
    xp: Any, keys: Array, dtype: Any, bitcast: Callable[[Array, Any], Array]
) -> Array:
    """Inverse of :func:`float_to_keys` (zero comes back as ``+0.0``).

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core._radix import float_to_keys, keys_to_float
    >>> view = lambda a, dt: a.view(dt)
    >>> x = np.array([-np.inf, -2.5, 0.0, 3.0, np.inf])
    >>> keys_to_float(np, float_to_keys(np, x, view), np.float64, view)
    array([-inf, -2.5,  0. ,  3. ,  inf])
    """
    bits = xp.iinfo(keys.dtype).bits
    sign = xp.asarray(1 << (bits - 1), dtype=keys.dtype)
    pos = keys >= sign
    # both branches are evaluated; unsigned wrap-around in the unused one is harmless
    raw = xp.where(pos, keys - sign, (sign - keys) | sign)
    return bitcast(raw, dtype)


def float_to_signed_keys(xp: Any, x: Array, bitcast: Callable[[Array, Any], Array]) -> Array:
    """:func:`float_to_keys` minus ``2**(bits-1)``, in the signed integer type of x's width.

    ``-mag`` for negative non-zero non-NaN ``x``, ``+mag`` otherwise: order-preserving
    under signed comparison, ``-0.0`` and ``+0.0`` both 0, NaN above ``+inf``, and the
    type's minimum never used (the driver's "nothing below" marker).

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core._radix import float_to_signed_keys
    >>> x = np.array([-np.inf, -1.0, -0.0, 0.0, 1.0, np.inf, np.nan], dtype=np.float16)
    >>> k = float_to_signed_keys(np, x, lambda a, dt: a.view(dt))
    >>> k.dtype, bool(np.all(k[1:-1] >= k[:-2])), int(k[2]), int(k[3]), bool(k[-1] > k[-2])
    (dtype('int16'), True, 0, 0, True)
    """
    bits = xp.finfo(x.dtype).bits
    sdt = _int_dtype(xp, bits)
    raw = bitcast(x, sdt)
    mag = raw & xp.asarray((1 << (bits - 1)) - 1, dtype=sdt)
    inf_mag = bitcast(xp.asarray(xp.inf, dtype=x.dtype), sdt)
    zero = xp.asarray(0, dtype=sdt)
    # negative sign bit and 0 < mag <= inf's: -0.0 joins +0.0, NaN of either sign
    # lands above +inf (integer tests only, as in float_to_keys)
    neg = (raw < zero) & (mag > zero) & (mag <= inf_mag)
    return xp.where(neg, -mag, mag)


def signed_keys_to_float(
    xp: Any, keys: Array, dtype: Any, bitcast: Callable[[Array, Any], Array]
) -> Array:
    """Inverse of :func:`float_to_signed_keys` (zero comes back as ``+0.0``).

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core._radix import float_to_signed_keys, signed_keys_to_float
    >>> view = lambda a, dt: a.view(dt)
    >>> x = np.array([-np.inf, -2.5, 0.0, 3.0, np.inf], dtype=np.float32)
    >>> signed_keys_to_float(np, float_to_signed_keys(np, x, view), np.float32, view)
    array([-inf, -2.5,  0. ,  3. ,  inf], dtype=float32)
    """
    sign = xp.asarray(xp.iinfo(keys.dtype).min, dtype=keys.dtype)
    neg = keys < xp.asarray(0, dtype=keys.dtype)
    # -keys cannot overflow: keys > the type's minimum
    raw = xp.where(neg, (-keys) | sign, keys)
    return bitcast(raw, dtype)


def comparison_histogram(xp: Any, digits: Array, active: Array, nbins: int) -> Array:
    """Per-row histogram from comparisons and sums (Array API only).

    O(nbins * n): meant for ``digit_bits`` of 1 or 2, where it is two or four
    reductions per pass; libraries with a scatter-add should use that instead.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core._radix import comparison_histogram
    >>> d = np.array([[0, 1, 1, 0]], dtype=np.uint32)
    >>> comparison_histogram(np, d, np.array([[True, True, True, False]]), 2)
    array([[1, 2]])
    """
    n = digits.shape[-1]
    idx = xp.int32 if n < 2**31 - 1 else xp.int64
    act = None if active is None else xp.astype(active, idx)
    if act is None:
        total = xp.full(digits.shape[:-1] + (1,), n, dtype=idx)
    else:
        total = xp.sum(act, axis=-1, keepdims=True)
    counts = []
    for j in range(1, nbins):
        hit = xp.astype(digits == xp.asarray(j, dtype=digits.dtype), idx)
        counts.append(xp.sum(hit if act is None else hit * act, axis=-1, keepdims=True))
    # bin 0 = active entries not counted elsewhere: one reduction fewer
    first = total
    for c in counts:
        first = first - c
    return xp.concat([first, *counts], axis=-1)


class GenericShims:
    """Shims from a ``bitcast(x, dtype)`` function plus Array API comparisons.

    ``row_histogram`` is :func:`comparison_histogram`, so pair these shims with
    ``digit_bits=1`` (or 2).  A library passes its own bitcast, e.g. NumPy's
    ``lambda a, dt: a.view(dt)`` or JAX's ``jax.lax.bitcast_convert_type``.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core._radix import GenericShims, radix_select_pair
    >>> shims = GenericShims(np, lambda a, dt: a.view(dt))
    >>> radix_select_pair(np, np.array([[3.0, 1.0, 2.0]]), 2, shims, digit_bits=1)
    (array([[2.]]), array([[1.]]))
    """

    def __init__(self, xp: Any, bitcast: Callable[[Array, Any], Array]) -> None:
        self.xp = xp
        self.bitcast = bitcast

    def to_keys(self, x: Array) -> Array:
        return float_to_keys(self.xp, x, self.bitcast)

    def from_keys(self, keys: Array, dtype: Any) -> Array:
        return keys_to_float(self.xp, keys, dtype, self.bitcast)

    def row_histogram(self, digits: Array, active: Array, nbins: int) -> Array:
        return comparison_histogram(self.xp, digits, active, nbins)


def check_digit_bits(digit_bits: Any) -> int:
    """Validate ``digit_bits``: an int in ``[1, 16]``."""
    if isinstance(digit_bits, bool) or not isinstance(digit_bits, int):
        raise TypeError(f"digit_bits must be an int in [1, {MAX_DIGIT_BITS}], got {digit_bits!r}")
    if not 1 <= digit_bits <= MAX_DIGIT_BITS:
        raise ValueError(f"digit_bits must be in [1, {MAX_DIGIT_BITS}], got {digit_bits}")
    return digit_bits


def digit_widths(key_bits: int, digit_bits: int) -> list[int]:
    """Widths of the digit passes, most significant first (the last may be narrower).

    Examples
    --------
    >>> from topk_core._radix import digit_widths
    >>> digit_widths(32, 8), digit_widths(16, 11)
    ([8, 8, 8, 8], [11, 5])
    """
    widths = [digit_bits] * (key_bits // digit_bits)
    if key_bits % digit_bits:
        widths.append(key_bits % digit_bits)
    return widths


def pass_digits(xp: Any, keys: Array, shift: int, width: int, flip: bool) -> Array:
    """Bits ``[shift, shift + width)`` of ``keys``: one pass's digits.

    ``flip``: the top digit of signed keys, its sign bit flipped so that the
    digits keep the keys' order.
    """
    nbins = 1 << width
    digits = (keys >> shift) & xp.asarray(nbins - 1, dtype=keys.dtype)
    if flip:
        digits = digits ^ xp.asarray(nbins >> 1, dtype=keys.dtype)
    return digits


def pass_histogram(
    xp: Any,
    keys: Array,
    prefix: Array,
    shift: int,
    width: int,
    first: bool,
    row_histogram: Callable[[Array, Array, int], Array],
) -> Array:
    """One narrowing pass's per-row histogram, from the keys and the prefix alone.

    The candidates of a pass are the keys whose bits above ``shift + width``
    equal ``prefix``'s (the digits fixed by the earlier passes; every key in
    the ``first`` pass); the histogram counts their digits at ``shift``
    (``row_histogram`` is a :class:`RadixShims`' method).  The same counts as
    the driver's own pass, which carries the candidate mask from pass to pass
    instead: this form needs no full-size state between passes, which is what
    a ``prefix_histogram`` shim (Dask) runs on each chunk.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core._radix import pass_histogram
    >>> from topk_core.backends.numpy_backend import SHIMS
    >>> keys = np.array([[0x12, 0x13, 0x21, 0x1F]], dtype=np.uint8)
    >>> prefix = np.array([[0x10]], dtype=np.uint8)  # candidates: high digit 1
    >>> pass_histogram(np, keys, prefix, 0, 4, False, SHIMS.row_histogram)[0, :4]
    array([0, 0, 1, 1])
    """
    signed = xp.iinfo(keys.dtype).min < 0
    digits = pass_digits(xp, keys, shift, width, signed and first)
    if first:
        return row_histogram(digits, None, 1 << width)
    # arithmetic shifts of signed keys and prefix alike: the same top bits compare equal
    top = shift + width
    return row_histogram(digits, (keys >> top) == (prefix >> top), 1 << width)


def _find_bin(xp: Any, hist: Array, remaining: Array) -> tuple[Array, Array, Array]:
    """In one flat histogram: the bin holding the ``remaining``-th largest active entry.

    Returns ``(digit, gt, count)``: the bin, the active entries in higher bins,
    and the entries in the bin itself.
    """
    # cum[j] = active entries with digit >= j: non-increasing in j
    cum = xp.flip(xp.cumulative_sum(xp.flip(hist, axis=-1), axis=-1), axis=-1)
    ok = cum >= remaining  # True exactly for j <= the wanted digit
    one = xp.ones_like(remaining)
    digit = xp.sum(xp.astype(ok, remaining.dtype), axis=-1, keepdims=True) - one
    gt = xp.sum(xp.where(ok, xp.zeros_like(hist), hist), axis=-1, keepdims=True)
    big = xp.full_like(cum, xp.iinfo(cum.dtype).max)
    count = xp.min(xp.where(ok, cum, big), axis=-1, keepdims=True) - gt
    return digit, gt, count


def _blocks(xp: Any, hist: Array, w: int) -> tuple[Array, Array]:
    """``hist`` as blocks of bins: ``(blocks, block_sums)``.

    Blocks of ``2**(w - w // 2)`` bins for wide digits; up to :data:`_FLAT_BITS`
    bits one block of all ``2**w`` bins (its prefix sum is cheap).  ``hist``
    may hold several histograms of ``2**w`` bins side by side (the ``track_b``
    passes); the blocks of the ``j``-th start at ``j * n_blocks``.
    """
    lead = tuple(hist.shape[:-1])
    width = 1 << (w if w <= _FLAT_BITS else w - w // 2)
    blocks = xp.reshape(hist, lead + (hist.shape[-1] // width, width))
    return blocks, xp.sum(blocks, axis=-1)


def _locate_blocks(
    xp: Any,
    blocks: Array,
    sums: Array,
    remaining: Array,
    offset: Any,
    take: Callable[[Array, Array], Array] | None,
) -> tuple[Array, Array, Array]:
    """:func:`_find_bin` in two levels: the block first (``sums``), then its bins.

    A prefix sum over every bin costs a scan of the whole histogram (slow on
    XLA's CPU backend: 0.5 ms for 65536 bins); blocks of bins first, then the
    bins of the one block that holds the rank, scan ``2 * 2**(w/2)`` values.
    ``sums`` are the block sums of one histogram whose blocks start at row
    ``offset`` (an int or a ``(..., 1)`` array) of ``blocks``.  ``take(blocks,
    rows)`` returns the bins of row ``rows`` (``(..., 1)``) of ``blocks``: a
    library's gather (``RadixShims.block_bins``); without it, a one-hot sum over
    every block (Array API only, but a read of the whole histogram).
    """
    lead = tuple(blocks.shape[:-2])
    width = blocks.shape[-1]
    block, above, _ = _find_bin(xp, sums, remaining)
    row = block + offset
    if take is not None:
        inner = take(blocks, row)
    else:
        ids = xp.arange(blocks.shape[-2], dtype=block.dtype)
        ids = xp.reshape(ids, (1,) * len(lead) + (blocks.shape[-2], 1))
        hit = ids == xp.reshape(row, lead + (1, 1))
        inner = xp.sum(xp.where(hit, blocks, xp.zeros_like(blocks)), axis=-2)
    digit, gt, count = _find_bin(xp, inner, remaining - above)
    return block * width + digit, above + gt, count


def locate_bin(
    xp: Any, hist: Array, remaining: Array, width: int, take: Any = None
) -> tuple[Array, Array, Array]:
    """The bin of the ``remaining``-th largest counted entry, per row of ``hist``.

    ``hist`` ``(..., 2**width)`` counts per digit (bin ``j``: digit ``j``),
    ``remaining`` ``(..., 1)`` a rank in ``[1, sum(hist)]``, both of one integer
    dtype; ``take``: a library's ``RadixShims.block_bins`` (None: the one-hot
    sum).  Returns ``(digit, gt, count)``, each ``(..., 1)``: the bin, the
    entries in higher bins, and the entries in the bin.  What the driver runs
    after each pass's histogram (or a shim's ``locate``, with the same result).

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core._radix import locate_bin
    >>> hist = np.array([[3, 0, 2, 1]])  # 1 entry with digit 3, 2 with digit 2, ...
    >>> [int(v[0, 0]) for v in locate_bin(np, hist, np.array([[2]]), 2)]
    [2, 1, 2]
    """
    blocks, sums = _blocks(xp, hist, width)
    return _locate_blocks(xp, blocks, sums, remaining, 0, take)


def radix_select_pair(
    xp: Any,
    x: Array,
    k: int | Array,
    shims: RadixShims,
    *,
    digit_bits: int = 8,
    group: Any = None,
    track_b: bool = False,
    counts: bool = False,
) -> tuple[Array, ...]:
    """k-th and (k+1)-th largest along the last axis by radix select.

    The :class:`topk_core.Backend` ``select_pair`` contract: ``x`` has the
    selection axis last with masked-out entries already ``-inf``; ``k`` is a
    Python int in ``[0, n]`` or an integer array of shape ``x.shape[:-1] +
    (1,)`` with values in ``[0, n]``.  Returns ``(a, b)``, each
    ``x.shape[:-1] + (1,)`` in x's dtype, with ``a = +inf`` for ``k = 0`` and
    ``b = -inf`` for ``k = n``.  NaN counts as larger than ``+inf``.  A zero
    ``a`` comes back as ``+0.0`` (``-0.0 == 0.0``, so nothing downstream differs).

    Parameters
    ----------
    xp : namespace
        Array API namespace of ``x``.
    x : array
        Floating ``(..., n)`` (16-, 32- or 64-bit).
    k : int or integer array
        Rank(s) to select, per row for an array.
    shims : RadixShims
        Bitcast and per-row histogram for x's library.
    digit_bits : int, default 8
        Bits per narrowing pass, in ``[1, 16]``; a pass histograms
        ``2**digit_bits`` bins per row.
    group : topk_core._group.Group, optional
        ``x`` is one shard of a longer axis split across ``group`` (``k`` and
        the result are global); its ``sum``/``max`` combine the per-pass
        histograms and the final key maximum.  None: ``x`` is the whole axis.
    track_b : bool, default False
        Narrow the (k+1)-th largest's digits alongside the k-th's, in the same
        passes (after the first, each pass histograms both sets of candidates
        into ``2 * 2**digit_bits`` bins), instead of one masked key maximum
        after the last pass.  The same ``(a, b)``; it pays where a full read
        of the keys costs more than doubling the later histograms (JAX on
        one long row: :mod:`topk_core.backends.jax_backend`).
    counts : bool, default False
        Also return how many entries equal ``a`` and ``b`` (their tie counts,
        summed over ``group``), read from the last pass's histogram: no extra
        pass over ``x``.  Keys are compared, so ``-0.0`` and ``+0.0`` count as
        one value, like ``==``; the counts are meaningless where the value is
        infinite or NaN (the spec gives those no weight).  ``b``'s count is
        known only with ``track_b`` (else it is None): without it ``b`` comes
        from a key maximum, which does not count.

    Returns
    -------
    a, b : arrays
        k-th and (k+1)-th largest values, ``(..., 1)``.
    count_a, count_b : integer arrays or None
        Only with ``counts``: the entries equal to ``a`` and to ``b``, ``(..., 1)``.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core._radix import radix_select_pair
    >>> from topk_core.backends.numpy_backend import SHIMS
    >>> x = np.array([[4.0, 1.0, 3.0, 3.0], [0.0, -1.0, 2.0, 5.0]])
    >>> a, b = radix_select_pair(np, x, np.array([[2], [4]]), SHIMS)
    >>> a.ravel(), b.ravel()
    (array([ 3., -1.]), array([  3., -inf]))
    """
    check_digit_bits(digit_bits)
    n = x.shape[-1]
    lead = tuple(x.shape[:-1])
    if (n == 0 or 0 in lead) and group is None:
        # n = 0: only k = 0 is possible, both sentinels; an empty batch: nothing to
        # select (and dask's min/max fail on it, even along a non-empty axis)
        from array_api_compat import device

        pair = (
            xp.full(lead + (1,), xp.inf, dtype=x.dtype, device=device(x)),
            xp.full(lead + (1,), -xp.inf, dtype=x.dtype, device=device(x)),
        )
        if not counts:
            return pair
        none = xp.zeros(lead + (1,), dtype=xp.int32, device=device(x))
        return pair + (none, none)
    n_bound = n if group is None else group.total(n)
    idx = xp.int32 if n_bound is not None and n_bound < 2**31 - 1 else xp.int64
    if group is None:
        first = x[..., :1]  # keeps x's device and sharding
    else:
        # not from x: the per-row results must not depend on the shard (JAX's shard_map
        # then knows they are replicated), and an empty shard still takes part
        from array_api_compat import device

        first = xp.zeros(lead + (1,), dtype=x.dtype, device=device(x))
    if isinstance(k, int):
        kk = xp.zeros_like(first, dtype=idx) + k
    else:
        kk = xp.astype(k, idx)
    zero_i = xp.zeros_like(kk)
    one_i = xp.ones_like(kk)
    keys = shims.to_keys(x)
    take = getattr(shims, "block_bins", None)  # optional: a gather of one block's bins
    locate = getattr(shims, "locate", None)  # optional: locate_bin in the library's way
    # optional: each pass's histogram from the keys and the prefix, no mask carried
    prefix_hist = None if track_b else getattr(shims, "prefix_histogram", None)
    key_bits = xp.iinfo(keys.dtype).bits
    # signed keys are the unsigned ones minus 2**(key_bits-1): the same order, the
    # top digit's sign bit flipped, and the type's minimum as "no key"
    lowest = xp.iinfo(keys.dtype).min
    signed = lowest < 0
    # rank of the wanted key among all entries, counted from the top; k = 0
    # searches for the maximum, which is b there
    remaining = xp.maximum(kk, one_i)
    above = zero_i  # entries whose key is above the prefix fixed so far
    prefix = xp.zeros_like(kk, dtype=keys.dtype)
    active = None  # the first pass sees every entry: no mask to build or apply
    # a signed key type cannot hold a digit as wide as itself
    widths = digit_widths(key_bits, min(digit_bits, key_bits - 1) if signed else digit_bits)
    shift = key_bits
    n_equal = one_i
    if track_b:
        # the (k+1)-th's rank, prefix and candidates; they stay equal to the k-th's
        # until a pass puts the two ranks in different bins
        rem_b = kk + one_i
        prefix_b = prefix
        active_b = active
        same = xp.ones_like(kk, dtype=xp.bool)
        b_none = kk < zero_i  # replaced after the first pass, which sees every entry
    for p, w in enumerate(widths):
        shift -= w
        nbins = 1 << w
        if prefix_hist is None:
            digits = pass_digits(xp, keys, shift, w, signed and p == 0)
        if track_b and p:
            # b's candidates in the upper half: disjoint from a's once the prefixes differ,
            # the same set (all in the lower half) while they agree; digit + nbins fits the
            # key type for every width after the first
            both = xp.where(active, digits, digits + xp.asarray(nbins, dtype=keys.dtype))
            hist2 = xp.astype(shims.row_histogram(both, active | active_b, 2 * nbins), idx)
            if group is not None:
                hist2 = group.sum(hist2)
            # both halves' blocks at once; b reads the upper half's only once apart
            blocks, sums2 = _blocks(xp, hist2, w)
            nb = sums2.shape[-1] // 2
            sums = sums2[..., :nb]
            sums_b = xp.where(same, sums, sums2[..., nb:])
            off_b = xp.where(same, zero_i, zero_i + nb)
            digit, gt, in_bin = _locate_blocks(xp, blocks, sums, remaining, 0, take)
            digit_b, gt_b, n_equal_b = _locate_blocks(xp, blocks, sums_b, rem_b, off_b, take)
        else:
            if prefix_hist is not None:
                hist = xp.astype(prefix_hist(keys, prefix, shift, w, p == 0), idx)
            else:
                hist = xp.astype(shims.row_histogram(digits, active, nbins), idx)
            if group is not None:
                hist = group.sum(hist)
            if locate is not None and not track_b:
                digit, gt, in_bin = locate(hist, remaining, w)
            else:
                blocks, sums = _blocks(xp, hist, w)
                digit, gt, in_bin = _locate_blocks(xp, blocks, sums, remaining, 0, take)
            if track_b:
                total = xp.sum(sums, axis=-1, keepdims=True)
                b_none = kk >= total  # k = n: no (k+1)-th entry
                rem_b = xp.minimum(rem_b, xp.maximum(total, one_i))
                digit_b, gt_b, n_equal_b = _locate_blocks(xp, blocks, sums, rem_b, 0, take)
        remaining = remaining - gt
        above = above + gt
        prefix = _put_digit(xp, prefix, digit, p, shift, nbins, signed)
        if track_b:
            rem_b = rem_b - gt_b
            d_b = xp.astype(digit_b, keys.dtype)
            prefix_b = _put_digit(xp, prefix_b, digit_b, p, shift, nbins, signed)
        if p + 1 == len(widths):
            n_equal = in_bin  # entries equal to the k-th key
        elif prefix_hist is None:
            if track_b:
                in_b = digits == d_b
                active_b = in_b if active_b is None else active_b & in_b
                same = prefix == prefix_b
            d = xp.astype(digit, keys.dtype)
            active = digits == d if active is None else active & (digits == d)
    top = shims.from_keys(prefix, x.dtype)
    inf = xp.full_like(top, xp.inf)
    k_zero = kk == zero_i
    if track_b:
        b = xp.where(b_none, xp.full_like(top, -xp.inf), shims.from_keys(prefix_b, x.dtype))
        a = xp.where(k_zero, inf, top)
        # the last pass's bins hold single keys: their counts are the ties
        return (a, b, n_equal, n_equal_b) if counts else (a, b)
    # (k+1)-th largest: tied with the k-th, else the largest entry below it.  The max runs
    # over the integer keys: XLA on CPU flushes subnormals in a float max
    tied = above + n_equal >= kk + one_i
    # the lowest key never encodes a value (it would need mag == sign): "nothing below"
    if n:
        below_key = xp.max(
            xp.where(keys < prefix, keys, xp.full_like(keys, lowest)), axis=-1, keepdims=True
        )
    else:
        below_key = xp.full_like(prefix, lowest)
    if group is not None:
        below_key = group.max(below_key)
    below = xp.where(
        below_key == xp.full_like(below_key, lowest),
        xp.full_like(top, -xp.inf),
        shims.from_keys(below_key, x.dtype),
    )
    b = xp.where(tied, top, below)
    a = xp.where(k_zero, inf, top)
    b = xp.where(k_zero, top, b)
    # a's bin in the last pass holds one key: its count is a's ties (for k = 0, the
    # maximum's, which is b); b's is only known when it is a's key
    return (a, b, n_equal, None) if counts else (a, b)


def _put_digit(
    xp: Any, prefix: Array, digit: Array, p: int, shift: int, nbins: int, signed: bool
) -> Array:
    """``prefix`` with pass ``p``'s ``digit`` written at bit ``shift``."""
    if signed and p == 0:
        # the top digit's bit pattern with its sign flipped, as (digit - nbins/2) * 2**shift
        # in two steps: 2**shift alone overflows the type when shift = key_bits - 1
        prefix = xp.astype(digit - (nbins >> 1), prefix.dtype)
        if shift:
            prefix = prefix * xp.asarray(1 << (shift - 1), dtype=prefix.dtype)
            prefix = prefix * xp.asarray(2, dtype=prefix.dtype)
        return prefix
    return prefix | (xp.astype(digit, prefix.dtype) << shift)
