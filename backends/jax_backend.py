"""JAX backend: exact O(n) radix select in pure ``jax.numpy``/``lax``.

The digit narrowing is the project's shared, traceable driver
(:func:`topk_core._radix.radix_select_pair`); this module only supplies the
JAX shims: order-preserving keys via ``lax.bitcast_convert_type`` and a
per-row histogram via one scatter-add.  No ``top_k``/``sort`` anywhere: on
CPU both lower to a single-threaded ``std::partial_sort`` call.  Everything
is static-shape jnp code with no Python branching on values, so it runs
under ``jit``, ``vmap`` and ``grad`` (the selection itself is piecewise
constant; gradients come from :mod:`topk_core.adapters.jax_adapter`).

Digit width, measured on this project's 2-core CPU (shared, load 4-9, so
+-30 %; ``jit``-compiled ``radix_select_pair``, float32, k = n/10, ms
median/min over 7 calls, same run; ``lax.top_k(x, k+1)`` for scale):

==============================  ===========  =============  ============
digit width / histogram         n = 1e6      1024 x 4096    64 x 16384
==============================  ===========  =============  ============
1 bit, compare-and-sum (32 p.)  154 / 135    530 / 432      71 / 66
2 bits, compare-and-sum         120 / 73     888 / 658      165 / 91
4 bits, scatter-add             56 / 35      222 / 209      100 / 93
**8 bits, scatter-add (4 p.)**  **10 / 7.8** **92 / 85**    **12 / 9.0**
8 bits, ``segment_sum``         12 / 6.9     101 / 88       33 / 8.6
11 bits, scatter-add            6.9 / 6.5    328 / 291      10 / 6.8
16 bits, scatter-add            14 / 9.9     6812 / 4577    612 / 508
``lax.top_k(x, k + 1)``         198 / 182    283 / 233      109 / 80
==============================  ===========  =============  ============

The driver's 1-bit passes carry an ``active`` mask and take two reductions
each, so the compare-count advantage seen in a bare binary search
(shared/measurements/selection-primitives-cpu.md) does not survive.

Issue 11 (same machine, load 4-6; min ms of 15 calls, ``jit``): the bin that
holds the wanted rank is now found in two levels (blocks of bins, then the
bins of one block: :func:`topk_core._radix._locate_blocks`) instead of a prefix sum
over every bin, which made wide digits cheap: one scatter-add pass costs
~1.1 ms per million entries here (~10 passes of ``x * 2``), so fewer, wider
passes win where the counters stay small:

=================  =====  ======  ======
shape              8 bit  11 bit  16 bit
=================  =====  ======  ======
n = 1e6            6.2    5.6     **4.2**
1024 x 4096        57     **45**  330
8192 x 256         **41** 97      2190
=================  =====  ======  ======

So :func:`digit_bits_for`: 16 bits for a few long rows (at most 2**21
counters), 11 bits while rows * 2048 counters stay within 2**21, else 8.
Later issue 11 work (same machine, idle; min ms of 20-40 calls, ``jit``, n = 1e6): a
scatter that drops inactive entries (their index points past the counters) costs
~0.46 ms where adding zeros for them cost ~0.83 ms, and with 16-bit digits the
(k+1)-th largest is narrowed in the second pass alongside the k-th
(``track_b``: 2**17 counters) instead of by a final masked maximum over every
key (~0.45 ms): the selection went from ~2.4 to ~1.3-1.6 ms.  For batches
``track_b`` measured the same (1024 x 4096, 11 bits) or 1.5x slower (8192 x 256,
8 bits: twice the counters to clear and scan), so it is used with 16-bit digits
only.  Batched scatters are 3-4x slower per entry than one long row's here
(~13 ms for the first 8-bit pass over 1024 x 4096, 4-5 ms for the same indices
in one process and 13 ms in another: store-forwarding conflicts on the few hot
bins of normal data and the allocation's placement both seem to matter);
splitting the counters into 2-16 interleaved copies did not help.
Later still (issue 11; idle machine, min of 30-60 interleaved calls, ``jit``):

* **independent scatters.**  XLA's CPU runtime can run independent scatters on
  different threads: one long row is histogrammed as two halves with their own
  counters (summed), batches as up to :data:`MAX_BLOCKS` blocks of rows with
  disjoint counters.  A bare 16-bit histogram of 1e6 entries: 0.73 ms in one
  scatter, 0.45 ms in two halves, 0.56 / 0.77 ms in four / eight (each part
  clears and sums its own 65536 counters).  The whole selection, same process
  A/B: 1e6 1.29 -> 1.18 ms; 1024 x 4096 31.9 -> 30.2 ms with 4 blocks (25.4 ms
  with 32, but compiling went from 0.6 to 2.1 s); 64 x 16384 3.0 -> 2.4 ms;
  8192 x 256 unchanged within noise.  But inside the whole selection the two
  halves of a long row overlap only in some calls: a profile of 30 calls at
  1e6 found them on two threads in 4 (each half ~0.3 ms), and over 150
  interleaved calls the halves gave the best call (1.0-1.1 vs 1.3 ms in one
  scatter) but the same median (1.7-2.0 ms).  XLA's thunk executor runs a
  thunk inline and offloads ready ones to another worker only when more than
  a few are ready at once (``kSplitThreshold``, 8 in the XLA source read);
  otherwise overlap comes only from a partitioned fusion finishing on another
  thread.  Batches, min of 30
  interleaved selections: one block per pass instead of several was slower
  (8192 x 256: 15.3 vs 13.0 ms), and so were counters from distinct zero
  arrays or scatters chained into one buffer, which avoid the counters'
  copies and the concatenation (8192 x 256: 14.1-15.4 vs 12.5-13.1 ms;
  1024 x 4096: 12.7-13.9 vs 11.7 ms).  A profile of the batched selection shows
  where its time goes: first touches of n-sized temporaries (the keys and the
  scatter's all-ones updates, 16 MB each at 1024 x 4096, ~6 ms each), i.e.
  page faults of freshly mapped memory, not the counting itself.
* **batches in lax.map steps** (:func:`map_steps`): a batch's selection runs over
  blocks of about :data:`MAP_ENTRIES` entries.  In one program its temporaries
  (keys, indices, the scatters' all-ones updates, counters) took 52-58 MiB, and
  every call page-faulted all of them afresh (13,000-15,000 minor faults per
  call: glibc maps allocations that large anew each time); in steps they take
  4-7 MiB and are reused.  Selection 1024 x 4096: 28-32 -> 12 ms, 8192 x 256:
  29-31 -> 13-15 ms (steps of 2^17-2^20 entries all measured 12-20 ms;
  ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` on the one-program version got
  17.6 / 19.7 ms, the same effect from outside).  One long row has no such
  temporaries (4 MiB at 1e6) and is not split.  Only where JAX's default backend
  is the CPU: on an accelerator the steps would serialise the batch for a problem
  it does not have (unmeasured, no GPU here).
* **tie counts for free** (:func:`select_pair_counts`): the last pass's bin of
  ``a`` (and of ``b`` with ``track_b``) holds exactly the entries equal to it,
  so the forward's tie weights need no reduction over ``x``: the two
  count reductions cost 0.31-0.46 ms at 1e6 (about two passes of ``x * 2``);
  forward math after the selection 0.99 -> 0.49 ms.
* **one block's bins by a gather** (:meth:`JaxShims.block_bins`): the driver
  used to pick the bins of the block that holds the rank with a one-hot sum
  over every bin (Array API only), a read of the whole histogram per rank and
  pass, and the 16-bit second pass copied its two halves apart first.  Same
  process A/B, min (p10) of 300-400 interleaved calls, load 1.3-1.7: 65536
  entries fwd+bwd 0.39 (0.47) -> 0.32 (0.42) ms, selection 0.28 (0.32) -> 0.23
  (0.28) ms: the fixed cost per call; 1e6 within noise (1.85 (2.46) -> 1.93
  (2.36) ms); 8192 x 256 20.0 (23.9) -> 17.5 (23.6) ms; 1024 x 4096 19.8 (26.4)
  -> 19.6 (24.7) ms.

* **16-bit scatter indices** (:func:`_flat_histogram`): where every index a
  scatter can take (its drop slot included) fits in 16 bits, the indices are
  ``uint16``, through ``lax.scatter_add`` (``.at[].add`` widens them to int32).
  That is the first pass of one long row (``active`` None: no mask, so no
  drop slot, 65536 counters) and batch blocks of at most 65536 counters.  Same
  process, interleaved compiled calls, min of 80-100 (2026-12-07, idle): a bare
  16-bit histogram of 1e6 entries 0.67-0.73 -> 0.51-0.52 ms; the selection at
  1e6 1.35-1.45 -> 1.08-1.10 ms; forward + backward at 1e6 1.96 -> 1.64 ms,
  1024 x 4096 20.1 -> 19.0 ms, 8192 x 256 unchanged (15.4 / 15.7 ms).  The
  second pass of a long row (2**17 counters plus a drop slot) stays int32: its
  candidates alone cannot be told apart in 16 bits, and adding zeros for the
  others instead of dropping them measured no faster (0.56 vs 0.55 ms).

The closed forms (:class:`JaxSoft`, issue 11; 2026-12-07, shared Zen 3 under
neighbours' load, min of 25 interleaved eager calls, float32, k = n/10): with the
generic math dispatched op by op, ``dftopk_vjp`` / ``dftopk_and_vjp`` + its ``vjp`` /
``dftopk_jvp`` took 22 / 30 / 21 ms at 1e6, 186 / 164 / 177 ms at 1024 x 4096 and
87 / 90 / 72 ms at 8192 x 256; compiled, 6.6 / 7.8 / 7.2, 60 / 80 / 82 and 41 / 50 /
49 ms.  The backward program alone at 1e6: 1.61 -> 1.31 ms (min of 200) with the
selection's tie counts instead of two row sums (each sum reads a materialised
comparison: this XLA's CPU reductions do not fuse their producers).

Multi-threshold counting passes (several compare-and-sum reductions over
one read) compile to far slower loops on XLA's CPU backend (3 thresholds:
4x one), and a compaction (``nonzero``/``cumsum``: 6.5-8 ms per million) costs
more than the passes it would save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from topk_core import _math
from topk_core._radix import float_to_keys, keys_to_float, radix_select_pair
from topk_core._registry import Backend

__all__ = [
    "BACKEND",
    "DIGIT_BITS",
    "SHIMS",
    "JaxGroup",
    "JaxSoft",
    "JaxShims",
    "digit_bits_for",
    "eager_k",
    "resolve_group",
    "select_pair",
    "select_pair_counts",
]

DIGIT_BITS = 8  # the default width (batches of many rows)


def digit_bits_for(rows: int, n: int) -> int:
    """Digit width for ``rows`` rows of ``n`` entries (measured, module docstring).

    Examples
    --------
    >>> from topk_core.backends.jax_backend import digit_bits_for
    >>> digit_bits_for(1, 10**6), digit_bits_for(1024, 4096), digit_bits_for(8192, 256)
    (16, 11, 8)
    """
    if n >= 1 << 16 and rows << 16 <= 1 << 21:
        return 16
    if n >= 2048 and rows << 11 <= 1 << 21:
        return 11
    return DIGIT_BITS


def _bitcast(a: Any, dtype: Any) -> Any:
    return lax.bitcast_convert_type(a, dtype)


class JaxShims:
    """Radix shims for JAX: bitcast keys and a scatter-add row histogram."""

    def to_keys(self, x: Any) -> Any:
        return float_to_keys(jnp, x, _bitcast)

    def from_keys(self, keys: Any, dtype: Any) -> Any:
        return keys_to_float(jnp, keys, dtype, _bitcast)

    def block_bins(self, blocks: Any, rows: Any) -> Any:
        """Row ``rows`` (``(..., 1)``) of ``blocks`` ``(..., n_blocks, width)``: a gather.

        Instead of the driver's one-hot sum, which reads every bin (module docstring).
        """
        idx = jnp.expand_dims(rows.astype(jnp.int32), -1)
        return jnp.take_along_axis(blocks, idx, axis=-2)[..., 0, :]

    def row_histogram(self, digits: Any, active: Any, nbins: int) -> Any:
        """Per-row counts of active entries per digit: a few independent scatter-adds.

        Row ``r``'s bins live at ``r * nbins + digit`` of a flat counter array,
        so a block of rows is one XLA scatter (no vmap, no loop).  Batches are
        cut into blocks of about :data:`CHUNK_ENTRIES` entries, one long row
        into two halves with their own counters (summed): XLA's CPU runtime
        can run independent scatters on different threads, though inside the
        selection it does so only in some calls (module docstring).
        """
        lead = tuple(digits.shape[:-1])
        n = digits.shape[-1]
        if _explicitly_sharded(digits):
            if active is None:
                active = jnp.ones_like(digits, dtype=bool)  # keeps digits' sharding
            return _vmapped_histogram(digits, active, nbins)
        rows = math.prod(lead)
        d2 = jnp.reshape(digits, (rows, n))
        a2 = None if active is None else jnp.reshape(active, (rows, n))

        def part(r: slice, c: slice) -> Any:
            return _flat_histogram(d2[r, c], None if a2 is None else a2[r, c], nbins)

        if rows == 1 and n >= 2 * CHUNK_ENTRIES:
            half = n // 2
            counts = part(slice(None), slice(None, half)) + part(slice(None), slice(half, None))
        else:
            blocks = _row_blocks(rows, n)
            parts = [part(slice(lo, hi), slice(None)) for lo, hi in blocks]
            counts = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
        return jnp.reshape(counts, lead + (nbins,))


CHUNK_ENTRIES = 1 << 17  # entries per scatter for batches (measured, module docstring)
MAX_BLOCKS = 4  # scatters per pass: compile time grows with them (module docstring)


def _row_blocks(rows: int, n: int) -> list[tuple[int, int]]:
    """Row ranges of about :data:`CHUNK_ENTRIES` entries each (at most :data:`MAX_BLOCKS`).

    Examples
    --------
    >>> from topk_core.backends.jax_backend import _row_blocks
    >>> len(_row_blocks(1024, 4096)), _row_blocks(3, 10), _row_blocks(0, 10)
    (4, [(0, 3)], [(0, 0)])
    """
    if rows == 0:  # an empty batch: one empty scatter keeps the (0, nbins) shape
        return [(0, 0)]
    parts = max(1, min(rows, MAX_BLOCKS, -(-rows * n // CHUNK_ENTRIES)))
    step = -(-rows // parts)
    return [(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


def _flat_histogram(digits: Any, active: Any, nbins: int) -> Any:
    """Counts ``(rows, nbins)`` of ``(rows, n)`` digits: one flat scatter-add.

    ``active`` None: every entry counts.
    """
    rows, n = digits.shape
    # the largest index: the last counter, or the slot past it that drops an entry
    top = rows * nbins - (1 if active is None else 0)
    if top <= 0xFFFF:
        # 16-bit indices: the scatter loop reads half the bytes (module docstring)
        idx_t = jnp.uint16
    elif (top >= 2**31 - 1 or n >= 2**31 - 1) and jax.config.read("jax_enable_x64"):
        idx_t = jnp.int64
    else:
        idx_t = jnp.int32
    idx = digits.astype(idx_t)
    if rows > 1:
        idx = idx + jnp.arange(rows, dtype=idx_t)[:, None] * jnp.asarray(nbins, dtype=idx_t)
    if active is not None:
        # inactive entries point past the end and are dropped: cheaper than adding
        # zeros for them (a later pass keeps few entries; 1e6: 0.46 vs 0.83 ms here)
        idx = jnp.where(active, idx, jnp.asarray(top, dtype=idx_t))
    flat = jnp.reshape(idx, (-1, 1))
    # lax's scatter, not ``.at[].add``, which widens the indices to int32
    counts = lax.scatter_add(
        jnp.zeros(rows * nbins, dtype=jnp.int32),
        flat,
        jnp.ones(flat.shape[:1], dtype=jnp.int32),
        _SCATTER_1D,
        indices_are_sorted=False,
        unique_indices=False,
        mode=lax.GatherScatterMode.FILL_OR_DROP,
    )
    return jnp.reshape(counts, (rows, nbins))


# one index per update, each naming one counter
_SCATTER_1D = lax.ScatterDimensionNumbers(
    update_window_dims=(), inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
)


def _explicitly_sharded(a: Any) -> bool:
    """True when ``a``'s type carries a sharding (JAX's explicit mesh axes)."""
    try:
        spec = jax.typeof(a).sharding.spec
    except Exception:  # no typed sharding in this context or JAX version: the flat path
        return False
    return any(s is not None for s in spec)


def _vmapped_histogram(digits: Any, active: Any, nbins: int) -> Any:
    """One scatter per row, batched by vmap: slower than the flat scatter (1e6: 24 vs
    8 ms, 1024 x 4096: 119 vs 86 ms here), but its row axis keeps an explicit
    sharding, which the flat counter array cannot (``P("d", None)`` under
    ``jax.make_mesh``'s default explicit axes)."""
    lead = tuple(digits.shape[:-1])
    n = digits.shape[-1]
    d2 = jnp.reshape(digits, (-1, n)).astype(jnp.int32)
    a2 = jnp.reshape(active, (-1, n)).astype(jnp.int32)

    def one(d: Any, a: Any) -> Any:
        return jnp.zeros(nbins, dtype=jnp.int32).at[d].add(a)

    return jnp.reshape(jax.vmap(one)(d2, a2), lead + (nbins,))


SHIMS = JaxShims()


def select_pair(xp: Any, x: Any, k: Any) -> tuple[Any, Any]:
    """k-th and (k+1)-th largest along the last axis (see :class:`topk_core.Backend`).

    Exact, O(n): ``32 / digit_bits_for(...)`` histogram passes for float32
    (two 16-bit passes for one long row, four 8-bit ones for many short rows;
    float16/float64 scale accordingly), then one masked max for the (k+1)-th
    value, except with 16-bit digits, where the (k+1)-th is narrowed in the
    second pass alongside the k-th.
    Traceable: ``k`` may be a Python int or a (traced) integer array.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from topk_core.backends.jax_backend import select_pair
    >>> a, b = select_pair(jnp, jnp.array([[4.0, 1.0, 3.0, 2.0]]), 2)
    >>> float(a[0, 0]), float(b[0, 0])
    (3.0, 2.0)
    """
    del xp  # always jax.numpy here; the argument is the Backend contract
    k = eager_k(x, k)
    if isinstance(k, int):
        return _select_static_k(x, k)
    return _select_array_k(x, k)


def select_pair_counts(x: Any, k: Any) -> tuple[Any, Any, Any, Any]:
    """:func:`select_pair` plus the tie counts of ``a`` and ``b`` from its histograms.

    ``(a, b, count_a, count_b)``: int32 counts of the entries equal to ``a`` and
    to ``b`` (``-0.0 == 0.0``; meaningless where the value is infinite or NaN),
    read from the last histogram pass instead of two more reductions over
    ``x`` (what the DFTopK forward's tie weights need).  ``count_b`` is None
    where ``b`` comes from a key maximum (digits narrower than 16 bits).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from topk_core.backends.jax_backend import select_pair_counts
    >>> a, b, ca, cb = select_pair_counts(jnp.array([[4.0, 3.0, 3.0, 2.0]]), 1)
    >>> float(a[0, 0]), float(b[0, 0]), int(ca[0, 0]), cb
    (4.0, 3.0, 1, None)
    """
    k = eager_k(x, k)
    if isinstance(k, int):
        return _counts_static_k(x, k)
    return _counts_array_k(x, k)


def eager_k(x: Any, k: Any) -> Any:
    """An int ``k`` as a per-row int array where the call is eager (``x`` concrete).

    An eager call runs one compiled program per shape whatever ``k`` is, as a
    Python ``tau`` is traced: a ``k`` schedule, a cascade's stages or a sweep over
    ``k`` would otherwise compile a program for each value (about a second each
    on a CPU).  Under an outer ``jit``/``grad``/``vmap`` (``x`` a tracer) an int
    ``k`` stays static and is folded into the caller's program.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from topk_core.backends.jax_backend import eager_k
    >>> eager_k(jnp.zeros((2, 5)), 3).tolist()
    [[3], [3]]
    """
    if not isinstance(k, int) or isinstance(x, jax.core.Tracer):
        return k
    # a NumPy argument: a jnp.full would be one more eager dispatch (0.2 ms a call)
    count_t = np.int32 if x.shape[-1] < 2**31 else np.int64
    return np.full(tuple(x.shape[:-1]) + (1,), k, dtype=count_t)


def _radix(x: Any, k: Any, counts: bool = False) -> tuple[Any, ...]:
    lead = tuple(x.shape[:-1])
    n = x.shape[-1]
    rows = math.prod(lead)
    steps = map_steps(rows, n)
    # the steps fix the CPU runtime's per-call page faults; on an accelerator they
    # would only serialise the batch (not measured: no GPU here), so one program there
    if steps == 1 or _explicitly_sharded(x) or jax.default_backend() != "cpu":
        return _radix_rows(x, k, counts)
    # a batch in steps of `per` rows (lax.map), so that each step's temporaries stay
    # small enough to be reused between calls instead of freshly mapped (module docstring)
    per = rows // steps
    main = per * steps
    x2 = jnp.reshape(x, (rows, n))
    k2 = k if isinstance(k, int) else jnp.reshape(k, (rows, 1))

    def step(args: Any) -> tuple[Any, ...]:
        xb, kb = args
        return _radix_rows(xb, k if kb is None else kb, counts)

    kb = None if isinstance(k, int) else jnp.reshape(k2[:main], (steps, per, 1))
    # a None result (b's count with narrow digits) is an empty pytree: it stays None
    outs = lax.map(step, (jnp.reshape(x2[:main], (steps, per, n)), kb))
    outs = jax.tree.map(lambda o: jnp.reshape(o, (main, 1)), outs)
    if main < rows:  # the last rows % steps rows in one more call
        tail = _radix_rows(x2[main:], k if isinstance(k, int) else k2[main:], counts)
        outs = jax.tree.map(lambda o, t: jnp.concatenate([o, t], axis=0), outs, tail)
    return jax.tree.map(lambda o: jnp.reshape(o, lead + (1,)), outs)


def _radix_rows(x: Any, k: Any, counts: bool) -> tuple[Any, ...]:
    bits = digit_bits_for(math.prod(x.shape[:-1]), x.shape[-1])
    # few long rows: b's digits ride along in the second pass (2**17 counters a row)
    # instead of a last read of every key for the masked maximum
    return radix_select_pair(jnp, x, k, SHIMS, digit_bits=bits, track_b=bits == 16, counts=counts)


MAP_ENTRIES = 1 << 18  # entries per lax.map step of a batch (measured, module docstring)


def map_steps(rows: int, n: int) -> int:
    """How many ``lax.map`` steps a batch's selection takes: about :data:`MAP_ENTRIES` each.

    Examples
    --------
    >>> from topk_core.backends.jax_backend import map_steps
    >>> map_steps(1, 10**6), map_steps(1024, 4096), map_steps(8192, 256), map_steps(3, 1000)
    (1, 16, 8, 1)
    """
    if rows < 2:
        return 1
    return max(1, min(rows, (rows * n) // MAP_ENTRIES))


def _radix_counts(x: Any, k: Any) -> tuple[Any, ...]:
    return _radix(x, k, counts=True)


# One compiled program per shape instead of dozens of op-by-op dispatches when
# called eagerly; inside an outer jit/vmap/grad these are simply inlined.
_select_static_k = jax.jit(_radix, static_argnums=1)
_select_array_k = jax.jit(_radix)
_counts_static_k = jax.jit(_radix_counts, static_argnums=1)
_counts_array_k = jax.jit(_radix_counts)


def _mask_program(x: Any, k: Any, valid: Any) -> Any:
    a, _ = _radix(_math.selection_scores(jnp, x, valid), k)
    return _math.hard_mask(jnp, x, a, valid, k, cond=jax.lax.cond, dtype=x.dtype)


_mask_static_k = jax.jit(_mask_program, static_argnums=1)
_mask_array_k = jax.jit(_mask_program)


def hard_mask(pb: Any) -> Any:
    """``Backend.hard_mask``: :func:`topk_core.topk_mask` as one compiled program.

    The selection and the mask (:func:`topk_core._math.hard_mask` with
    ``lax.cond``) of a normalised problem, compiled once per shape whatever
    ``k`` (:func:`eager_k`); an eager call dispatched them op by op before
    (8 x 256 float32 scores on this project's 2-core machine: 1.4-1.8 ms a
    call that way, 0.3 ms now).  Under an outer ``jit``/``vmap``/``grad`` the
    program is inlined.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import topk_core
    >>> topk_core.topk_mask(jnp.array([[1.0, 3.0, 3.0, 2.0]]), 2).tolist()
    [[0.0, 1.0, 1.0, 0.0]]
    """
    k = eager_k(pb.x, pb.k)
    if isinstance(k, int):
        return _mask_static_k(pb.x, k, pb.valid)
    return _mask_array_k(pb.x, k, pb.valid)


def _apply(pb: Any, output: str, hard: bool = False) -> Any:
    # imported lazily: the adapter imports this module for select_pair
    from topk_core.adapters.jax_adapter import apply

    return apply(pb, output, hard=hard)


@dataclass(frozen=True)
class _SoftResiduals:
    """What :class:`JaxSoft`'s backward and tangent read: the normalised ``x``, ``a``,
    ``b``, the forward's ``p (1 - p)`` (None: recomputed in their program, where the
    forward computed no ``p``, or for logits) and the selection's tie counts.  The
    logits are recomputed there from ``x`` (no exponential): keeping them would write
    and read one more array."""

    x: Any
    a: Any
    b: Any
    d: Any
    counts: Any
    output: str


# a pytree (the arrays are leaves, output static): the residuals enter the programs whole
jax.tree_util.register_dataclass(
    _SoftResiduals, data_fields=["x", "a", "b", "d", "counts"], meta_fields=["output"]
)


class JaxSoft:
    """``Backend.soft`` for JAX: the generic math after the selection, compiled.

    Run eagerly, :func:`topk_core._math.soft_forward` / ``soft_backward`` /
    ``soft_tangent`` are dozens of op-by-op dispatches, each a pass over ``x``
    with nothing fused: ``dftopk_vjp`` at n = 1e6 cost ~110-140 passes of
    ``x * 2`` and ~3 s of first-call compiles per shape (issue 11).  Here each
    runs as one ``jax.jit`` program per shape, on the same ``_math`` code; under
    an outer ``jit``/``grad``/``vmap`` the programs are inlined, so derivatives of
    the closed forms (second order) are those of that code, as before.  A forward
    that returns no output (``dftopk_vjp``) computes nothing: its backward's
    program runs the whole math in one read of ``x``.  The tie weights take their
    counts from the selection's last histogram (``problem.candidates``, from
    :func:`_public_select_counts`) instead of two row sums over ``x``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import topk_core
    >>> x = jnp.array([4.0, 1.0, 3.0, 2.0])
    >>> gx, gtau = topk_core.dftopk_vjp(x, 2, jnp.array([1.0, 0.0, 0.0, 0.0]))
    >>> [round(float(v), 4) for v in gx]
    [0.1491, 0.0, -0.0746, -0.0746]
    """

    def forward(
        self, pb: Any, a: Any, b: Any, output: str, *, keep: bool, out: bool
    ) -> tuple[Any, Any]:
        """See ``Backend.soft`` (:class:`topk_core.Backend`)."""
        if keep and not out:
            return None, _SoftResiduals(pb.x, a, b, None, pb.candidates, output)
        y, d = _soft_forward_jit((output, keep), pb.x, a, b, _tau_arg(pb, pb.tau), pb.valid)
        return y, (_SoftResiduals(pb.x, a, b, d, pb.candidates, output) if keep else None)

    def backward(self, pb: Any, res: _SoftResiduals, g: Any) -> tuple[Any, Any]:
        """See ``Backend.soft``: ``grad_x`` (``largest``'s sign applied) and the tau
        gradient already summed over tau's broadcast axes, in the same program."""
        static = (pb.largest, _tau_axes(pb))
        return _soft_backward_jit(static, res, _tau_arg(pb, pb.tau), pb.valid, g)

    def tangent(self, pb: Any, res: _SoftResiduals, u: Any, dtau: Any) -> Any:
        """See ``Backend.soft``'s ``tangent``."""
        dt = None if dtau is None else _tau_arg(pb, dtau)
        return _soft_tangent_jit(pb.largest, res, _tau_arg(pb, pb.tau), pb.valid, u, dt)


def _tau_arg(pb: Any, v: Any) -> Any:
    # a float as a traced argument (NumPy, no dispatch): a tau schedule must not recompile
    return np.asarray(v, dtype=pb.compute_dtype) if isinstance(v, float) else v


def _tau_axes(pb: Any) -> tuple[int, ...] | None:
    """The axes the tau gradient is summed over: all (None) for a float ``tau``."""
    if isinstance(pb.tau, float):
        return None
    ts, xs = tuple(pb.tau.shape), tuple(pb.x.shape)
    return tuple(i for i in range(len(xs)) if ts[i] == 1 and xs[i] != 1)


def _soft_inputs(x: Any, a: Any, b: Any, tau: Any, valid: Any) -> tuple[Any, Any, Any, Any]:
    cdt = _math.compute_dtype(jnp, x.dtype)
    x, a, b = x.astype(cdt), a.astype(cdt), b.astype(cdt)
    return x, a, b, _math.logits(jnp, x, a, b, tau, valid)


def _soft_forward(static: tuple, x: Any, a: Any, b: Any, tau: Any, valid: Any) -> tuple[Any, Any]:
    output, keep = static
    x, a, b, z = _soft_inputs(x, a, b, tau, valid)
    if output == "logits":
        return z, None
    if not keep:
        return jax.nn.sigmoid(z), None
    return _math.sigmoid_and_grad(jnp, z)


def _residuals(res: _SoftResiduals, tau: Any, valid: Any) -> Any:
    """The generic residuals, with the logits recomputed (and ``p (1 - p)`` where the
    forward computed no ``p``: the one exponential of ``dftopk_vjp``)."""
    x, a, b, z = _soft_inputs(res.x, res.a, res.b, tau, valid)
    d = res.d
    if res.output == "probs" and d is None:
        d = _math.sigmoid_and_grad(jnp, z)[1]
    return _math.SoftResiduals(x, a, b, z, d, res.output, res.counts)


def _soft_backward(static: tuple, res: Any, tau: Any, valid: Any, g: Any) -> tuple[Any, Any]:
    largest, tau_axes = static
    grad_x, t = _math.soft_backward(jnp, _residuals(res, tau, valid), g, tau, valid)
    t = jnp.sum(t) if tau_axes is None else jnp.sum(t, axis=tau_axes, keepdims=True)
    return (grad_x if largest else -grad_x), t


def _soft_tangent(largest: bool, res: Any, tau: Any, valid: Any, u: Any, dtau: Any) -> Any:
    return _math.soft_tangent(
        jnp, _residuals(res, tau, valid), u, tau, dtau, valid, largest=largest
    )


_soft_forward_jit = jax.jit(_soft_forward, static_argnums=0)
_soft_backward_jit = jax.jit(_soft_backward, static_argnums=0)
_soft_tangent_jit = jax.jit(_soft_tangent, static_argnums=0)


def host_values(a: Any) -> Any:
    """NumPy view of a concrete JAX array on the CPU; None for tracers and accelerators.

    Through NumPy, not ``jnp``: inside ``jit`` a ``jnp`` op on a concrete array
    would be staged, and its result could not be read.
    """
    if isinstance(a, jax.core.Tracer) or not isinstance(a, jax.Array):
        return None
    try:
        if any(d.platform != "cpu" for d in a.devices()):
            return None
    except Exception:  # e.g. a deleted or not yet materialised array
        return None
    return np.asarray(a)


@dataclass(frozen=True)
class JaxGroup:
    """Collectives over a named mesh axis (:class:`topk_core._group.Group`).

    Hashable, so the JAX adapter keeps it static.  Shard order is the axis
    index (``lax.axis_index``), which is the order ``shard_map`` lays the
    shards out along the global array (for a tuple of names, the first
    varies slowest).

    Parameters
    ----------
    axis_name : str or tuple of str
        As in ``jax.lax.psum``.
    size : int
        Number of shards along it.
    """

    axis_name: str | tuple[str, ...]
    size: int

    @property
    def label(self) -> str:
        return f"JAX mesh axis {self.axis_name!r} ({self.size} shards)"

    def sum(self, v: Any) -> Any:
        return lax.psum(v, self.axis_name)

    def max(self, v: Any) -> Any:
        return lax.pmax(v, self.axis_name)

    def exclusive_sum(self, v: Any) -> Any:
        every = lax.all_gather(v, self.axis_name)  # (size, *v.shape): small, per row
        before = jnp.arange(self.size) < lax.axis_index(self.axis_name)
        before = jnp.reshape(before, (self.size,) + (1,) * v.ndim)
        return jnp.sum(jnp.where(before, every, jnp.zeros_like(every)), axis=0)

    def total(self, n_local: int) -> int:
        return n_local * self.size

    def select_pair(self, xp: Any, x: Any, k: Any) -> tuple[Any, Any]:
        """The group's ``(a, b)``, differentiable in ``x`` like the backend's (the adapter's
        ``_pair`` rule, whose tie means sum over the group)."""
        from topk_core.adapters.jax_adapter import differentiable_pair

        del xp
        return differentiable_pair(x, k, self)

    def select_pair_counts(self, x: Any, k: Any) -> tuple[Any, Any, Any, Any]:
        """:meth:`select_pair` plus the global tie counts (:func:`select_pair_counts`)."""
        if self.size == 1:
            return self._whole_axis(select_pair_counts(x, k))
        return radix_select_pair(jnp, x, k, SHIMS, digit_bits=DIGIT_BITS, group=self, counts=True)

    def _whole_axis(self, out: tuple[Any, ...]) -> Any:
        """One shard holds the whole axis: the single-device selection's results, typed
        as the group's (the same on every member of the axis: a ``psum`` over one)."""
        # the group's own driver takes 8-bit digits (4 passes) for small collectives;
        # alone, the single-device path (16-bit digits for long rows) is 2-3x faster
        return tuple(None if v is None else self.sum(v) for v in out)

    def apply(self, pb: Any, output: str, hard: bool = False) -> Any:
        return _apply(pb, output, hard=hard)


def resolve_group(group: Any, x: Any, axis: int = -1) -> JaxGroup:
    """The ``group=`` of the public API for JAX arrays: a bound mesh axis name.

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from topk_core.backends.jax_backend import resolve_group
    >>> sizes = jax.vmap(lambda r: resolve_group("i", r).size * r, axis_name="i")(jnp.ones(3))
    >>> [float(s) for s in sizes]
    [3.0, 3.0, 3.0]
    >>> resolve_group("d", jnp.ones(3))
    Traceback (most recent call last):
    ...
    ValueError: group='d' is not a bound axis name here: ...
    """
    del x, axis  # shard_map shards are alike: same dtype, same length
    ok = isinstance(group, str) or (
        isinstance(group, tuple) and group and all(isinstance(g, str) for g in group)
    )
    if not ok:
        raise TypeError(
            f"group for JAX arrays must be a mesh axis name (str) or a tuple of them, as in "
            f"jax.lax.psum; got {type(group).__name__} {group!r}"
        )
    try:
        size = lax.axis_size(group)
    except NameError:
        raise ValueError(
            f"group={group!r} is not a bound axis name here: call the function inside "
            f"jax.shard_map over a mesh with that axis (or under jax.vmap/pmap with "
            f"axis_name={group!r})"
        ) from None
    return JaxGroup(group, int(size))


def _public_select_counts(xp: Any, x: Any, k: Any) -> tuple[Any, Any, Any]:
    """:func:`_public_select_pair` plus the tie counts from its last histogram: the
    ``candidates`` that :class:`JaxSoft` reads (see ``Backend.select_candidates``), so
    that the closed forms' tie weights need no two row sums over ``x``."""
    from topk_core.adapters.jax_adapter import differentiable_pair_counts

    del xp
    return differentiable_pair_counts(x, k)


def _public_select_pair(xp: Any, x: Any, k: Any) -> tuple[Any, Any]:
    """:func:`select_pair`, differentiable in ``x`` (the adapter's ``_pair`` rule): the
    public API's ``topk_threshold`` and closed-form functions select through it, so
    ``jax.grad`` of them does not treat ``a``, ``b`` as constants."""
    from topk_core.adapters.jax_adapter import differentiable_pair

    del xp
    return differentiable_pair(x, k)


BACKEND = Backend(
    name="jax",
    select_pair=_public_select_pair,
    eager=False,
    sigmoid=jax.nn.sigmoid,
    apply=_apply,
    host_values=host_values,
    cond=jax.lax.cond,
    group=resolve_group,
    soft=JaxSoft(),
    select_candidates=_public_select_counts,
    hard_mask=hard_mask,
)
