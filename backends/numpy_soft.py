"""NumPy's math after the selection: in-place ufunc chains over reused scratch buffers.

The :class:`topk_core.Backend` ``soft`` hook of the NumPy backend.  Same
results as the generic Array API code (:func:`topk_core._math.soft_forward`,
:func:`topk_core._math.soft_backward`) in a handful of passes over ``x``:

forward (``p``): ``nz = (theta - x) / tau`` (1-2 passes), ``e = exp(nz) =
exp(-z)`` (the one exponential; where NumPy has a SIMD ``exp2`` loop for the
dtype, ``nz`` carries a factor ``log2(e)`` and ``e = exp2(nz)``: 0.21 ms
against 0.44 ms for ``exp`` on 1e6 float32 with AVX-512, see
:func:`exp2_is_simd`), ``p = 1 / (1 + e)`` (2 passes), and,
when the backward will run, ``d = sign * e p p / tau = sign * p (1 - p) / tau``
(2-3 passes) and the entries tied with ``a`` and ``b`` (two comparisons while
``x`` is still in cache, then a count and an ``argmax`` scan per tied entry,
cheaper than ``flatnonzero`` for the usual two; after the sampled selection
only among the candidates it gathered, ``problem.candidates``: O(#candidates)
instead of the two comparisons, 2-3 back-to-back passes at 1e6; one process
A/B on a Zen 5, ``dftopk_and_vjp`` + VJP: median 3.58 -> 3.35 ms at 1e6,
20.8 -> 19.4 ms at 4 x 2**20).  The backward never
exponentiates: ``s = g d`` (1 pass), one row sum (``einsum``'s),
one dot product for ``grad_tau``; the threshold term ``- sum(s) w`` touches
only the tied entries (O(#ties), nothing on rows without ties).  The JVP
(``dftopk_jvp``) is its transpose from the same forward: ``d (u - w.u)``
(2 passes), ``w.u`` summed per row over the tied entries alone.

Measured on this project's 2-core machine (float32, n = 1e6; a pass, one
``x * 2``, took 0.085 ms): ``exp`` alone costs 5.2 passes, a ufunc writing
into an existing buffer 0.5-1.2, and a fresh 4 MB output up to 10 passes more
than the same ufunc into a reused buffer (page faults: with several fresh
4 MB arrays alive, glibc returns the memory to the OS between calls).  So
every intermediate lives in a scratch buffer from :data:`POOL` and only the
arrays handed to the caller (``p``, ``grad_x``) are fresh.
``scipy.special.expit`` (where installed) measured 3.5 ms against 0.45 ms
for ``np.exp`` on the same array, so the one-exponential chain is used.

Threads: NumPy's ufuncs use one, and the exponential is compute-bound, so the
sigmoid chain (``e``, ``p`` and ``d``) runs in parts on up to
:func:`get_num_threads` threads for arrays of at least ``2 * 2**17``
entries (:func:`set_num_threads`, ``TOPK_CORE_NUMPY_THREADS``); every entry
sees the same ufuncs on the same values, so the results are those of one
thread, bit for bit.

Semantics kept (README "Semantics" table): the plain ``x - theta`` runs with
overflow trapped and falls back to the halves-first
:func:`topk_core._math.logits` when it overflows; rows with an infinite ``a``
or ``b`` take their logits from :func:`topk_core._math.logits`;
``1 / (1 + exp(-z))`` has relative accuracy in both tails except where
``p`` is subnormal, like the generic stable sigmoid.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from topk_core import _math

__all__ = ["POOL", "NumpySoft", "ScratchPool", "get_num_threads", "set_num_threads"]


class ScratchPool:
    """Reusable NumPy buffers: thread-safe, bounded, never handed to the caller.

    Parameters
    ----------
    max_bytes : int
        Most bytes kept between calls (all buffers together).
    max_each : int
        Larger buffers are never kept.

    Examples
    --------
    >>> import numpy as np
    >>> pool = ScratchPool(max_bytes=1 << 20, max_each=1 << 20)
    >>> a = pool.take((4, 8), np.float32)
    >>> pool.give(a)
    >>> b = pool.take((32,), np.float32)  # the same memory, another shape
    >>> bool(np.shares_memory(a, b)), pool.held_bytes
    (True, 0)
    """

    def __init__(self, max_bytes: int = 96 << 20, max_each: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self.max_each = max_each
        self._free: dict[tuple[str, int], list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self.held_bytes = 0

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised C-contiguous array (from the pool when one fits)."""
        dt = np.dtype(dtype)
        size = math.prod(shape)
        key = (dt.str, size)
        with self._lock:
            free = self._free.get(key)
            flat = free.pop() if free else None
            if flat is not None:
                self.held_bytes -= flat.nbytes
        if flat is None:
            flat = np.empty(size, dtype=dt)
        return flat.reshape(shape)

    def give(self, *arrays: np.ndarray | None) -> None:
        """Return arrays obtained from :meth:`take` (nothing else may still use them)."""
        for arr in arrays:
            if arr is None or arr.nbytes > self.max_each:
                continue
            flat = arr.reshape(-1)
            key = (flat.dtype.str, flat.size)
            with self._lock:
                if self.held_bytes + flat.nbytes > self.max_bytes:
                    continue
                self._free.setdefault(key, []).append(flat)
                self.held_bytes += flat.nbytes

    def clear(self) -> None:
        """Drop every kept buffer."""
        with self._lock:
            self._free.clear()
            self.held_bytes = 0


POOL = ScratchPool()


#: environment variable read for the default of :func:`get_num_threads`
THREADS_ENV = "TOPK_CORE_NUMPY_THREADS"
#: most threads by default (only 2 cores were ever measured; see :func:`set_num_threads`)
_DEFAULT_MAX_THREADS = 4
#: fewest entries per thread: below it a thread's start-up costs more than its share
_MIN_PER_THREAD = 1 << 17


class _Threads:
    """The elementwise math's helper threads: a lazily started pool and its size."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count: int | None = None  # None: not yet read from THREADS_ENV / the CPUs
        self.executor: ThreadPoolExecutor | None = None
        self.slots: threading.Semaphore | None = None

    def forget(self) -> None:
        # after a fork the child has none of the parent's threads: start afresh
        self.lock = threading.Lock()
        self.executor = None
        self.slots = None


_THREADS = _Threads()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_THREADS.forget)


def _check_count(n: Any, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    return n


def _default_threads() -> int:
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = -1
        if n < 1:
            raise ValueError(
                f"the environment variable {THREADS_ENV} must be an integer >= 1, got {env!r}"
            )
        return n
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _DEFAULT_MAX_THREADS))


def get_num_threads() -> int:
    """Threads the NumPy backend's elementwise math may use (the calling one included).

    The default is the environment variable ``TOPK_CORE_NUMPY_THREADS`` where
    it is set, else the CPUs this process may run on, at most 4.

    Examples
    --------
    >>> from topk_core.backends.numpy_soft import get_num_threads
    >>> get_num_threads() >= 1
    True
    """
    with _THREADS.lock:
        if _THREADS.count is None:
            _THREADS.count = _default_threads()
        return _THREADS.count


def set_num_threads(n: int | None) -> None:
    """Let the NumPy backend's elementwise math use ``n`` threads (``None``: the default).

    NumPy's ufuncs run on one thread, and the forward's exponential is
    compute-bound (1.3-3 ns per float32 entry on an AVX2 CPU, ten or more
    times one ``x * 2``).  So the forward's sigmoid chain (the exponential,
    ``p`` and the ``p (1 - p) / tau`` the backward keeps) is cut into up to
    ``n`` parts of at least ``2**17`` entries each (along the first axis, or
    along the selection axis for fewer rows than parts) that run at once: the
    calling thread takes one part, helper threads the others.  Every entry
    goes through the same ufuncs on the same values whatever ``n``, so the
    results are bit for bit the same.  The selection, the reductions and the
    backward stay on the calling thread.  ``n = 1`` keeps everything there (no
    helper thread is started); so does a part that finds the helpers busy
    (several of the caller's own threads calling at once): it runs on its
    caller rather than waiting.

    Parameters
    ----------
    n : int or None
        ``>= 1``; ``None`` goes back to :func:`get_num_threads`'s default.

    Examples
    --------
    >>> from topk_core.backends.numpy_soft import get_num_threads, set_num_threads
    >>> set_num_threads(1)
    >>> get_num_threads()
    1
    >>> set_num_threads(None)
    """
    count = None if n is None else _check_count(n, "n")
    with _THREADS.lock:
        old = _THREADS.executor
        _THREADS.count = count
        _THREADS.executor = None
        _THREADS.slots = None
    if old is not None:
        old.shutdown(wait=False)


def _helpers() -> tuple[ThreadPoolExecutor, threading.Semaphore]:
    """The helper threads (one fewer than :func:`get_num_threads`), started on first use."""
    want = max(get_num_threads() - 1, 1)  # >= 1 even if set to 1 since the parts were cut
    with _THREADS.lock:
        if _THREADS.executor is None:
            _THREADS.executor = ThreadPoolExecutor(want, thread_name_prefix="topk_core-numpy")
            _THREADS.slots = threading.Semaphore(want)
        return _THREADS.executor, _THREADS.slots  # type: ignore[return-value]


Part = tuple[int, slice] | None


def _parts(shape: tuple[int, ...]) -> list[Part]:
    """How to cut an array of ``shape``: ``[None]`` (whole), or ``(axis, slice)`` each."""
    size = math.prod(shape)
    count = min(get_num_threads(), size // _MIN_PER_THREAD)
    if count <= 1:
        return [None]
    axis = 0 if len(shape) > 1 and shape[0] >= count else len(shape) - 1
    length = shape[axis]
    count = min(count, length)
    if count <= 1:
        return [None]
    bounds = [length * i // count for i in range(count + 1)]
    return [(axis, slice(lo, hi)) for lo, hi in itertools.pairwise(bounds)]


def _cut(arr: Any, part: Part) -> Any:
    """``arr``'s piece of ``part``; size-1 axes (broadcast: per-row tau) and scalars whole."""
    if part is None or not isinstance(arr, np.ndarray) or arr.ndim == 0:
        return arr
    axis, sl = part
    if arr.shape[axis] == 1:
        return arr
    return arr[(slice(None),) * axis + (sl,)]


def _in_parts(fn: Any, shape: tuple[int, ...], arrays: tuple, *args: Any) -> None:
    """``fn(*pieces, *args)`` over the parts of ``shape`` (:func:`_parts`), at once.

    ``arrays`` are laid out like ``shape`` (size-1 axes broadcast); each part
    runs under the caller's floating-point error state.  Returns once every
    part is done, raising the first error any part raised.
    """
    parts = _parts(shape)
    if len(parts) == 1:
        fn(*arrays, *args)
        return
    err = np.geterr()

    def run(part: Part) -> None:
        with np.errstate(**err):
            fn(*(_cut(a, part) for a in arrays), *args)

    executor, slots = _helpers()
    pending: list[Future] = []
    errors: list[BaseException] = []

    def run_here(part: Part) -> None:
        try:
            run(part)
        except BaseException as exc:
            errors.append(exc)  # raised once every part is done

    try:
        for part in parts[1:]:
            future = None
            if slots.acquire(blocking=False):
                try:
                    future = executor.submit(run, part)
                except RuntimeError:  # shut down meanwhile by set_num_threads
                    slots.release()
            if future is None:  # the helpers are busy with another caller's parts
                run_here(part)
            else:
                future.add_done_callback(lambda _f: slots.release())
                pending.append(future)
        run_here(parts[0])
    finally:
        # every part done before anything is raised: none may still write into the buffers
        for future in pending:
            exc = future.exception()
            if exc is not None:
                errors.append(exc)
    if errors:
        raise errors[0]


@dataclass(eq=False)
class _Residuals:
    """What :meth:`NumpySoft.backward` needs; pooled buffers go back when this dies."""

    ties: np.ndarray  # flat positions of the valid entries tied with a or b
    tie_values: np.ndarray  # x there, x's dtype (which of a, b each tie equals)
    nan_rows: tuple[np.ndarray, np.ndarray] | None  # see _nan_rows
    a: np.ndarray
    b: np.ndarray
    r: np.ndarray  # -z (probs) or z (logits); masked entries 0
    d: np.ndarray | None  # sign * p (1 - p) / tau (probs)
    scale: Any  # sign / tau (logits)
    r_sign: float  # grad_tau = r_sign * sum(s * r)
    invalid: np.ndarray | None
    pooled: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.pooled:
            weakref.finalize(self, POOL.give, *self.pooled)
            self.pooled = []


def _row_sum(v: np.ndarray) -> np.ndarray:
    """Per-row sum over the selection axis (the one reduction of ``s``; axis kept).

    ``einsum``'s SIMD sum: 0.7 passes on 1e6 float32 where ``np.sum`` took 1.8
    (its pairwise loop); a BLAS product with ones took 0.35 alone but woke
    OpenBLAS' threads, which then slowed the rest of the backward 2-3x.  It
    accumulates in SIMD lanes: on standard normal float32 rows (1e6, 1024 x
    4096, 8192 x 256) its error against a float64 sum was at most 4e-8 of
    ``sum(|v|)`` (np.sum's: 1e-8), far inside the gradients' tolerances.
    """
    if v.dtype not in (np.float32, np.float64):
        return np.sum(v, axis=-1, keepdims=True)
    return np.einsum("...i->...", v)[..., None]


def _row_dot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-row ``sum(u * v)`` over the selection axis, axis kept."""
    return np.einsum("...i,...i->...", u, v)[..., None]


def _tie_counts(rows: np.ndarray, n_rows: int) -> np.ndarray:
    """Per-row number of ties from their row numbers (O(#ties)), float, ``(n_rows,)``."""
    return np.bincount(rows, minlength=n_rows).astype(np.float64)


def _is_one(tau: Any) -> bool:
    return isinstance(tau, float) and tau == 1.0


class NumpySoft:
    """The ``soft`` hook: forward and backward of the DFTopK math on NumPy arrays.

    Its residuals keep no reference to ``x`` or the mask: the values of the
    tied entries and, in the rare rows whose threshold is NaN, their NaN
    positions are copied, so the caller may change ``x`` and the mask in place
    before the backward (:func:`topk_core.dftopk_and_vjp`) at no cost.
    """

    owns_residuals = True

    def forward(
        self, pb: Any, a: np.ndarray, b: np.ndarray, output: str, *, keep: bool, out: bool = True
    ) -> tuple[np.ndarray | None, _Residuals | None]:
        """See :func:`topk_core._api.soft_forward`."""
        cdt = np.dtype(pb.compute_dtype)
        x = pb.x
        shape = x.shape
        half = x.dtype != cdt
        xc = x
        pooled: list[np.ndarray] = []
        temp: list[np.ndarray] = []
        if half:
            xc = POOL.take(shape, cdt)
            np.copyto(xc, x)
            temp.append(xc)
        ac = a.astype(cdt, copy=False)
        bc = b.astype(cdt, copy=False)
        tau = pb.tau
        probs = output == "probs"
        sign = 1.0 if pb.largest else -1.0
        # r = -z for p (the exponential wants -z), z for logits
        # the logits output itself needs a fresh array; otherwise r is scratch
        if not probs and out and not keep and not half:
            r = np.empty(shape, dtype=cdt)
        else:
            r = POOL.take(shape, cdt)
            (pooled if keep else temp).append(r)
        # probabilities: r = -z, e = exp(r); or r = -z log2(e), e = exp2(r) where NumPy has
        # a SIMD exp2 loop for the dtype (twice as fast as exp there; scalar elsewhere)
        two = probs and exp2_is_simd(cdt)
        _logits_into(r, xc, ac, bc, tau, negate=probs, log2e=two)
        ties = _tie_positions(x, a, b, pb.valid, pb.candidates) if keep else None
        invalid = None
        if pb.valid is not None:
            invalid = np.logical_not(pb.valid)
            np.copyto(r, np.inf if probs else -np.inf, where=invalid)
        result = None
        d = None
        if not probs:
            if out:
                result = r.astype(pb.dtype, copy=True) if keep or half else r
        else:
            p_fresh = out and not half
            p = np.empty(shape, dtype=cdt) if p_fresh else POOL.take(shape, cdt)
            if not p_fresh:
                temp.append(p)
            e = p
            if keep:
                d = POOL.take(shape, cdt)
                pooled.append(d)
                e = d
            # the exponential is compute-bound: the chain runs in parts on several threads
            _in_parts(_sigmoid_into, shape, (r, e, p, d, tau), sign, two)
            if out:
                result = p if p_fresh else p.astype(pb.dtype)
        res = None
        if keep:
            if invalid is not None:
                np.copyto(r, 0.0, where=invalid)  # grad_tau: masked entries contribute 0
            scale = None
            if not probs:
                scale = sign / tau if isinstance(tau, float) else None
            res = _Residuals(
                ties=ties,
                tie_values=_at(x, ties),
                nan_rows=_nan_rows(x, a, b, pb.valid),
                a=a,
                b=b,
                r=r,
                d=d,
                scale=scale,
                # grad_tau = -sum(s z): r is -z (times log2(e) with exp2) for p, z for logits
                r_sign=(sign / (_LOG2E if two else 1.0)) if probs else -sign,
                invalid=invalid,
                pooled=pooled,
            )
        POOL.give(*temp)
        return result, res

    def backward(self, pb: Any, res: _Residuals, g: np.ndarray) -> tuple[np.ndarray, Any]:
        """See :func:`topk_core._api.soft_backward`."""
        tau = pb.tau
        # C-contiguous whatever g's layout: the ties are corrected through a flat view
        s = np.empty(g.shape, dtype=res.r.dtype)
        if res.d is not None:
            np.multiply(g, res.d, out=s)
        elif res.scale is not None:
            np.multiply(g, res.scale, out=s)
        else:
            np.divide(g, tau, out=s)
            if not pb.largest:
                np.negative(s, out=s)
        if res.invalid is not None:
            np.copyto(s, 0.0, where=res.invalid)
        total = _row_sum(s)
        nan_x = _nan_entries(res, total)
        if nan_x is not None:
            # NaN rule: a NaN entry keeps its own term but stays out of sum(s) and grad_tau
            total = _row_sum(np.where(nan_x, 0.0, s))
        t = _tau_grad(pb, s, res, nan_x)
        _subtract_ties(s, res, total)
        return s, t

    def tangent(self, pb: Any, res: _Residuals, u: np.ndarray, dtau: Any) -> np.ndarray:
        """See ``Backend.soft``'s ``tangent`` (:class:`topk_core.Backend`).

        The transpose of :meth:`backward`: ``d (u - w.u)`` with the kept
        ``d = sign p (1 - p) / tau`` (``sign / tau`` for logits), ``w.u`` per
        row from the tied entries alone (O(#ties)), plus ``tau``'s term
        ``r_sign d r dtau`` (``-p (1 - p) z dtau / tau``): 2 passes, 3 more
        with ``dtau``, 1 with a mask; logits read ``r`` once more for NaN
        entries (the NaN rule: those keep their own ``u / tau``).
        """
        out = np.empty(u.shape, dtype=res.r.dtype)
        dtheta = _tie_dot(res, u)
        if dtheta is None:
            np.copyto(out, u)
        else:
            np.subtract(u, dtheta, out=out)
        nan_x = None
        if res.d is not None:
            # p: a NaN entry's own d is NaN, so its tangent is NaN whatever w.u is
            np.multiply(out, res.d, out=out)
        else:
            nan_x = _nan_entries(res, None)
            if nan_x is not None and dtheta is not None:
                np.copyto(out, u, where=nan_x)  # NaN rule: it does not move with theta
            if res.scale is not None:
                np.multiply(out, res.scale, out=out)
            else:
                np.divide(out, pb.tau, out=out)
                if not pb.largest:
                    np.negative(out, out=out)
        if dtau is not None:
            out += _tau_term(pb, res, nan_x, dtau)
        if res.invalid is not None:
            np.copyto(out, 0.0, where=res.invalid)
        return out


def _tie_hits(
    res: _Residuals, rows: np.ndarray, n_rows: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For ``a``, then ``b``: ``(hit, r, w)``, which tied entries equal it, their rows,
    and the per-row weight each carries (:func:`topk_core._math.tie_share`)."""
    out = []
    for v in (res.a.reshape(-1), res.b.reshape(-1)):
        hit = res.tie_values == v[rows]
        r = rows[hit]
        out.append((hit, r, _math.tie_share(np, v, _tie_counts(r, n_rows))))
    return out


def _tie_dot(res: _Residuals, u: np.ndarray) -> np.ndarray | None:
    """Per-row ``w.u`` (axis kept, ``u``'s compute dtype), or None where nothing is tied.

    The transpose of :func:`_subtract_ties`: each tied entry's ``u`` weighed
    as it is there, summed per row in float64 (O(#ties)).
    """
    pos = res.ties
    if pos.size == 0:
        return None
    n = u.shape[-1]
    n_rows = u.size // n
    rows = pos // n
    uv = _at(u, pos).astype(np.float64)
    dtheta = np.zeros(n_rows)
    for hit, r, w in _tie_hits(res, rows, n_rows):
        sums = np.bincount(r, weights=uv[hit], minlength=n_rows)
        # an infinite a or b weighs 0, whatever its ties' tangents (0 * inf)
        with np.errstate(invalid="ignore"):
            dtheta += np.where(w == 0, 0.0, w * sums)
    return dtheta.astype(res.r.dtype).reshape(u.shape[:-1] + (1,))


def _tau_term(pb: Any, res: _Residuals, nan_x: np.ndarray | None, dtau: Any) -> np.ndarray:
    """``-p (1 - p) z dtau / tau`` (``-z dtau / tau`` for logits), 0 at infinite ``z``.

    The transpose of :func:`_tau_grad`.  An infinite ``z`` (an infinite
    ``x``, or ``z`` past the dtype) moves nowhere with ``tau``: for ``p`` its
    ``d`` is 0 there, and ``0 * inf`` is caught by the invalid flag; for
    logits those entries (and NaN entries of ``x``: constants) are zeroed.
    """
    r = res.r
    if res.d is not None:
        q = np.empty_like(r)
        try:
            with np.errstate(invalid="raise"):
                np.multiply(res.d, r, out=q)
        except FloatingPointError:
            with np.errstate(invalid="ignore"):
                np.multiply(res.d, r, out=q)
            np.copyto(q, 0.0, where=np.isinf(r))
        coef = res.r_sign
    else:
        q = np.where(np.isinf(r), 0.0, r).astype(r.dtype, copy=False)
        if nan_x is not None:
            q[nan_x] = 0.0
        # -z dtau / tau, whatever the sign (logits' r is z, unsigned), with dtau / tau
        # formed first (tau-shaped, small): z / tau alone may overflow where the
        # tangent is in range (z near the dtype's largest value, |dtau| < tau < 1)
        c = np.asarray(dtau / pb.tau, dtype=q.dtype)  # a float tau: c in float64 first
        if bool(np.isfinite(c).all()):
            return np.multiply(q, -c, out=q)
        # dtau / tau itself past the range (or a non-finite dtau): the generic order
        np.multiply(q, -dtau, out=q)
        return np.divide(q, pb.tau, out=q)
    np.multiply(q, dtau * coef, out=q)  # dtau: a float or tau-shaped (small)
    return q


_LOG2E = 1.0 / math.log(2.0)


@functools.cache
def exp2_is_simd(dtype: Any) -> bool:
    """Whether NumPy's ``exp2`` runs a SIMD loop for ``dtype`` on this CPU.

    From NumPy's own dispatch record (``numpy.lib.introspect.opt_func_info``,
    NumPy >= 2.0), not a timing.  Measured, float32 at n = 1e6: on an AVX-512
    CPU (Zen 4) ``exp2`` has one (0.21 ms against 0.44 ms for ``exp``); on an
    AVX2-only one (Zen 3) only ``exp`` has one, and ``exp2`` runs the scalar
    baseline loop (on the forward's values: median 3.1 ms against 2.5 ms,
    interleaved).  False where the record cannot be read.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core.backends.numpy_soft import exp2_is_simd
    >>> exp2_is_simd(np.dtype(np.float32)) in (True, False)
    True
    """
    dt = np.dtype(dtype)
    try:
        from numpy.lib.introspect import opt_func_info

        loops = opt_func_info(func_name="^exp2$", signature=dt.name)
        current = loops["exp2"][dt.char * 2]["current"]
    except Exception:  # NumPy < 2.0, or a layout of the record not known here
        return False
    return not str(current).startswith("baseline")


def _logits_into(
    r: np.ndarray,
    x: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    tau: Any,
    *,
    negate: bool,
    log2e: bool = False,
) -> None:
    """``r = z`` (or ``-z``; times ``log2(e)`` with ``log2e``) without the mask.

    By the plain formula where it is exact: ``x - theta`` first (no cancellation
    beyond its own rounding), then one scaling pass by ``1 / tau`` (and
    ``log2(e)``).
    """
    theta = _math.threshold(np, a, b)
    finite = np.isfinite(theta)
    all_finite = bool(finite.all())
    if not all_finite:
        theta = np.where(finite, theta, np.zeros_like(theta))
    plain = not isinstance(tau, float) or 1e-30 < tau < 1e30
    unit = _LOG2E if log2e else 1.0
    if plain:
        try:
            with np.errstate(over="raise"):
                if negate:
                    np.subtract(theta, x, out=r)
                else:
                    np.subtract(x, theta, out=r)
                if isinstance(tau, float):
                    if tau != 1.0 or log2e:
                        np.multiply(r, unit / tau, out=r)
                else:
                    np.divide(r, tau, out=r)
                    if log2e:
                        np.multiply(r, unit, out=r)
        except FloatingPointError:
            plain = False  # |x - theta| or z beyond the dtype's range somewhere
    if not plain:
        z = _math.logits(np, x, a, b, tau, None, eager=True)
        with np.errstate(over="ignore"):  # |z| log2(e) past the range: exp2 gives the limit
            np.multiply(z, -unit if negate else unit, out=r)
        return
    if all_finite:
        return
    # rows with an infinite a or b: their logits (0 or +-inf) by the spec's limit rule
    if x.ndim == 1:
        rows: Any = ...
    else:
        rows = np.nonzero(~finite[..., 0])
    t = tau
    if not isinstance(tau, float):
        t = np.broadcast_to(tau, x.shape[:-1] + tau.shape[-1:])[rows]
    z = _math.logits(np, x[rows], a[rows], b[rows], t, None, eager=True)
    with np.errstate(over="ignore", invalid="ignore"):  # z is 0 or +-inf in these rows
        r[rows] = z * (-unit if negate else unit)


def _sigmoid_into(
    r: np.ndarray,
    e: np.ndarray,
    p: np.ndarray,
    d: np.ndarray | None,
    tau: Any,
    sign: float,
    two: bool,
) -> None:
    """``p = 1 / (1 + e)``, ``e = exp(r)`` (``exp2`` with ``two``) and, with ``d``
    (then ``e`` itself), ``d = sign p (1 - p) / tau``; ``e`` past the range is ``inf``."""
    with np.errstate(over="ignore"):
        (np.exp2 if two else np.exp)(r, out=e)
    np.add(e, 1.0, out=p)
    np.divide(1.0, p, out=p)
    if d is not None:
        _sigmoid_grad_into(d, p)
        _scale_into(d, tau, sign)


def _sigmoid_grad_into(d: np.ndarray, p: np.ndarray) -> None:
    """``d = e p p`` in place (``d`` holds ``e = exp(-z)``): ``p (1 - p)``, both tails exact.

    ``e p`` is ``1 - p`` without cancellation; where ``e`` overflowed (``p = 0``)
    it is ``inf * 0``, caught by the invalid flag and set to ``1 - p = 1``.
    """
    try:
        with np.errstate(invalid="raise"):
            np.multiply(d, p, out=d)
    except FloatingPointError:
        np.copyto(d, 1.0, where=p == 0)
    np.multiply(d, p, out=d)


def _scale_into(d: np.ndarray, tau: Any, sign: float) -> None:
    """``d *= sign / tau`` (skipped for ``tau = 1``, ``sign = 1``)."""
    if isinstance(tau, float):
        if tau != 1.0 or sign != 1.0:
            np.divide(d, sign * tau, out=d)
        return
    np.divide(d, tau, out=d)
    if sign != 1.0:
        np.negative(d, out=d)


def _nan_rows(
    x: np.ndarray, a: np.ndarray, b: np.ndarray, valid: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(rows, is_nan)`` for the rows whose ``a`` or ``b`` is NaN, else None (the common case).

    Elsewhere a logit is NaN exactly at a valid NaN entry of ``x`` (finite
    ``theta``, or the limit rule's comparisons for an infinite one), so the
    backward finds them in its own ``r``.  In these rows every logit is NaN:
    the valid NaN entries of ``x`` are copied here (flat row numbers, and a
    bool row each), one read of the few rows and only when there are any.
    """
    bad = np.isnan(a) | np.isnan(b)
    if not bool(bad.any()):
        return None
    pick = bad[..., 0]  # boolean row indexing copies those rows only, whatever x's layout
    is_nan = np.isnan(x[pick])
    if valid is not None:
        is_nan &= np.broadcast_to(valid, x.shape)[pick]
    return np.flatnonzero(bad), is_nan


def _nan_entries(res: _Residuals, total: np.ndarray) -> np.ndarray | None:
    """The valid NaN entries of ``x``, or None when there are none (the common case).

    Checked only where a NaN can hide: for ``p`` a NaN entry makes its ``s`` and
    so ``total`` NaN (free to see); for logits ``s`` stays finite and ``r = z``
    is NaN exactly there (one read of ``r``).  Read off ``r`` (0 at masked
    entries), with the rows of a NaN threshold from :func:`_nan_rows`.
    """
    r = res.r
    if res.d is not None:
        suspect = not bool(np.isfinite(total).all())
    else:
        with np.errstate(invalid="ignore"):  # +inf and -inf together also land here
            suspect = bool(np.isnan(np.sum(r)))
    if not suspect:
        return None
    nan_x = np.isnan(r)
    if res.nan_rows is not None:
        rows, is_nan = res.nan_rows
        nan_x.reshape(-1, r.shape[-1])[rows] = is_nan
    return nan_x if bool(nan_x.any()) else None


def _tau_grad(pb: Any, s: np.ndarray, res: _Residuals, nan_x: np.ndarray | None) -> Any:
    """``-sum(s z)`` over finite ``z`` and non-NaN ``x``, in a form ``reduce_to_tau`` accepts.

    Infinite ``z`` contributes 0; a NaN ``z`` of a non-NaN ``x`` (its row's
    threshold is NaN) makes that row's gradient NaN, as in the generic math.
    """
    r = res.r
    if nan_x is not None:
        s = np.where(nan_x, 0.0, s)
        r = np.where(nan_x, 0.0, r)
    if pb.tau_shape is None:
        total = np.vdot(s, r)
        if not np.isfinite(total):
            total = np.vdot(*_finite_terms(s, r))
        return np.asarray(res.r_sign * total, dtype=s.dtype)
    tau = pb.tau
    lead = s.shape[:-1]
    if tuple(tau.shape) == lead + (1,):
        t = _row_dot(s, r)
        if bool(np.isfinite(t).all()):
            return res.r_sign * t
    s64, r64 = _finite_terms(s, r)
    return res.r_sign * (s64 * r64)


def _finite_terms(s: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``s`` and ``r`` (0 where ``r`` is infinite) in a wider dtype, for a non-finite sum.

    An infinite ``z`` (infinite ``x``, or ``z`` beyond the dtype) meets ``s = 0``
    there, or stays out by the spec's rule; and a float32 sum of finite terms
    near float32's largest value can overflow on its way (``inf - inf = NaN``)
    when the total is in range.  Summed wider (float32 in float64, float64 in
    ``np.longdouble``: a wider exponent on x86 and most 64-bit Linux), the
    result is cast back.
    """
    wide = np.float64 if s.dtype == np.float32 else np.longdouble
    return s.astype(wide), np.where(np.isinf(r), 0.0, r).astype(wide)


def _true_positions(flags: np.ndarray, few: int = 64) -> np.ndarray:
    """``np.flatnonzero(flags)`` for a flat bool array, fast when few are True.

    A SIMD count, then one ``argmax`` scan per True entry (each resumes where
    the last stopped: one read of ``flags`` in all): about a third of
    ``flatnonzero``'s time when only the ties of ``a`` and ``b`` are set.
    """
    count = int(np.count_nonzero(flags))
    if count > few:
        return np.flatnonzero(flags)
    out = np.empty(count, dtype=np.intp)
    start = 0
    for i in range(count):
        start += int(flags[start:].argmax())
        out[i] = start
        start += 1
    return out


def _tie_positions(
    x: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    valid: np.ndarray | None,
    candidates: np.ndarray | None = None,
) -> np.ndarray:
    """Flat positions of the valid entries tied with ``a`` or ``b`` (two comparisons).

    No valid entry lies strictly between ``b`` and ``a``, so the entries tied
    with either are exactly the valid ones with ``b <= x <= a``: two
    comparisons and one flat scan find them (the N-d ``nonzero`` builds
    index tuples entry by entry: 6 ms for 8192 x 256 against 0.3 ms flat).
    The forward runs this right after reading ``x`` (still in cache): in the
    backward, after ``g``, ``d``, ``s`` and ``r`` had been read, the same
    comparisons cost twice as much.  With ``candidates`` (flat positions
    holding every tie, from the sampled selection) the same test runs on
    those entries only: O(#candidates), about 2% of a row of 1e6.
    """
    # a NaN a (the row's k-th largest is a NaN) bounds nothing: b's ties are still found
    top = np.where(np.isnan(a), np.inf, a)
    if candidates is not None:
        return _ties_among(x, top, b, valid, candidates)
    band = POOL.take(x.shape, np.bool_)
    above = POOL.take(x.shape, np.bool_)
    try:
        np.less_equal(x, top, out=band)
        np.greater_equal(x, b, out=above)
        np.logical_and(band, above, out=band)
        if valid is not None:
            np.logical_and(band, valid, out=band)
        return _true_positions(band.reshape(-1))
    finally:
        POOL.give(band, above)


def _ties_among(
    x: np.ndarray,
    top: np.ndarray,
    b: np.ndarray,
    valid: np.ndarray | None,
    pos: np.ndarray,
) -> np.ndarray:
    """:func:`_tie_positions` restricted to the flat positions ``pos`` (ascending)."""
    rows = pos // x.shape[-1] if x.ndim > 1 else 0
    xv = _at(x, pos)
    keep = (xv <= top.reshape(-1)[rows]) & (xv >= b.reshape(-1)[rows])
    if valid is not None:
        keep &= _at(valid, pos)
    return pos[keep]


def _at(arr: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """``arr``'s entries at flat C-order positions ``pos``, without copying ``arr``."""
    if arr.flags.c_contiguous:
        return arr.reshape(-1)[pos]
    return arr[np.unravel_index(pos, arr.shape)]


def _subtract_ties(s: np.ndarray, res: _Residuals, total: np.ndarray) -> None:
    """``s -= total * w`` at the tied entries ``res.ties`` (O(#ties)).

    Which of ``a``/``b`` each tied entry equals is read off the few found.
    ``s`` is C-contiguous (fresh).
    """
    pos = res.ties
    if pos.size == 0:
        return
    n = s.shape[-1]
    n_rows = s.size // n if n else 0
    rows = pos // n
    flat_s = s.reshape(-1)
    flat_total = total.reshape(-1)
    for hit, r, w in _tie_hits(res, rows, n_rows):
        # an overflowed total (|sum(s)| past the dtype's range) times the 0 weight of an
        # infinite a or b: 0, with no invalid-value warning
        with np.errstate(invalid="ignore"):
            coef = np.where(w == 0, 0.0, flat_total * w).astype(s.dtype, copy=False)
        flat_s[pos[hit]] -= coef[r]
