"""The DFTopK math, once, against the Array API.

Every function here works on *normalised* inputs: the selection axis is last,
``largest=False`` has already been turned into ``largest=True`` by negating
``x``, and ``a``/``b``/``tau`` broadcast against ``x``.  The public API
(:mod:`topk_core._api`) and the framework adapters both call these, so the
formulas exist in exactly one place.

Notation (per row): ``a`` = k-th largest valid value, ``b`` = (k+1)-th,
``theta = a/2 + b/2``, ``z = (x - theta) / tau``, ``p = sigmoid(z)``.

Every per-row sum over the selection axis goes through an optional
``row_sum(v) -> (..., 1)`` hook (default: ``xp.sum(v, axis=-1, keepdims=True)``),
so that an axis split into shards (:mod:`topk_core._group`) sums across them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Array = Any
RowSum = Callable[[Array], Array] | None
# (count_a, count_b) from the selection; a None one is counted from the masks
TieCounts = tuple[Array | None, Array | None] | None

__all__ = [
    "MASKED",
    "NAN",
    "TIE_A",
    "TIE_B",
    "SoftResiduals",
    "compute_dtype",
    "eager_cond",
    "hard_mask",
    "logits",
    "sigmoid",
    "sigmoid_grad",
    "soft_backward",
    "standard_function",
    "tau_coefficient",
    "soft_forward",
    "soft_tangent",
    "threshold",
    "tie_share",
    "tie_weights",
    "jvp",
    "jvp_from_code",
    "tie_code",
    "vjp",
    "vjp_from_s",
]


def _row_sum(xp: Any, v: Array, row_sum: RowSum) -> Array:
    return xp.sum(v, axis=-1, keepdims=True) if row_sum is None else row_sum(v)


def tau_coefficient(xp: Any, z: Array, x_nan: Array) -> Array:
    """``z`` as it moves with ``tau`` (``dz/dtau = -z/tau``): 0 where ``z`` is infinite
    (a limit, no ``tau`` effect) and at NaN entries of ``x`` (constants, the NaN
    rule); NaN where a NaN threshold made ``z`` NaN (that row's ``grad_tau`` is NaN).

    A zeroed coefficient, not a zeroed product: a transpose multiplies by it.
    """
    return xp.where(xp.isinf(z) | x_nan, xp.zeros_like(z), z)


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """Dtype for the elementwise math: half types are computed in float32."""
    if dtype == xp.float32 or dtype == xp.float64:
        return dtype
    return xp.float32


def threshold(xp: Any, a: Array, b: Array) -> Array:
    """``theta = a/2 + b/2``; the halved form cannot overflow where ``(a+b)/2`` does.

    ``a = -b`` gives exactly 0, also for ``a = +inf, b = -inf`` (the limit of
    ``M/2 - M/2``), without ever evaluating ``inf - inf``.
    """
    opposite = a == -b
    zero = xp.zeros_like(a)
    return xp.where(opposite, zero, a / 2) + xp.where(opposite, zero, b / 2)


def logits(
    xp: Any,
    x: Array,
    a: Array,
    b: Array,
    tau: float | Array,
    valid: Array | None,
    *,
    eager: bool = False,
) -> Array:
    """``z = (x - theta) / tau``; masked entries ``-inf``.

    Infinite entries follow the spec's limit rule: ``z = ((x-a) + (x-b)) / 2tau``
    with ``inf - inf`` taken as 0.  Where ``theta`` is finite the plain formula
    already gives that; rows with an infinite ``a`` or ``b`` (sentinels or
    genuine infinities) take their values, all 0 or +-inf, from comparisons.
    Eager backends skip that branch when no row needs it.
    """
    theta = threshold(xp, a, b)
    # None: unknown (lazy/traced backends), so the infinite-row branch always runs
    finite = bool(xp.all(xp.isfinite(theta))) if eager else None
    if not finite:
        # keep inf - inf out of the arithmetic (no NaN, no warnings)
        theta_ok = xp.isfinite(theta)
        theta = xp.where(theta_ok, theta, xp.zeros_like(theta))
    # halves first: |x/2 - theta/2| cannot overflow, so z only overflows when it truly exceeds
    # the dtype's range (x - theta can reach twice the largest float)
    z = x * 0.5 - theta * 0.5
    if isinstance(tau, float) and tau == 1.0:
        z = z * 2.0
    elif isinstance(tau, float) and tau >= 1e-37:
        z = z / (tau * 0.5)
    else:
        # an array tau (JAX makes every tau one) down to the smallest normal number: tau/2
        # would be subnormal there, which XLA on the CPU flushes to 0 (0/0 = NaN at x =
        # theta); the doubling after the division is exact and gives the same bits
        z = z / tau * 2.0
    if not finite:
        inf = xp.asarray(xp.inf, dtype=z.dtype)
        zero = xp.asarray(0.0, dtype=z.dtype)
        # rows with an infinite a or b: every z is 0 or +-inf
        z_inf = xp.where(
            x == inf,
            xp.where(b == inf, zero, inf),
            xp.where(
                x == -inf,
                xp.where(a == -inf, zero, -inf),
                xp.where(a == inf, -inf, inf),
            ),
        )
        z_inf = xp.where(
            xp.isnan(x) | xp.isnan(a) | xp.isnan(b), xp.asarray(xp.nan, dtype=z.dtype), z_inf
        )
        z = xp.where(theta_ok, z, z_inf)
    if valid is not None:
        z = xp.where(valid, z, xp.asarray(-xp.inf, dtype=z.dtype))
    return z


def sigmoid(xp: Any, z: Array) -> Array:
    """Stable logistic ``exp(min(z, 0)) / (1 + exp(-|z|))``.

    Never exponentiates a positive number and keeps relative accuracy in both
    tails.  Branch-free on purpose: a ``where`` on the sign of random scores
    costs eager NumPy more than both exponentials (branch mispredictions).
    """
    return xp.exp(xp.minimum(z, xp.zeros_like(z))) / (1 + xp.exp(-xp.abs(z)))


def sigmoid_grad(xp: Any, z: Array) -> Array:
    """``p * (1 - p)`` as ``e / (1 + e)^2`` with ``e = exp(-|z|)``: no cancellation."""
    e = xp.exp(-xp.abs(z))
    r = 1 / (1 + e)
    return e * r * r


def tie_weights(
    xp: Any,
    x: Array,
    a: Array,
    b: Array,
    valid: Array | None,
    *,
    row_sum: RowSum = None,
    counts: TieCounts = None,
) -> tuple[Array, Array, Array, Array]:
    """Entries tied with ``a`` / ``b`` and their per-row weights.

    Returns ``(eq_a, eq_b, wa, wb)``: boolean masks of the valid entries equal
    to a finite ``a`` and to a finite ``b`` (an infinite one, whose weight is 0,
    marks none), and the per-row weight each such entry carries (``1/2``
    split evenly among the ties; 0 for an infinite ``a`` or ``b``).
    The spec's ``w`` is ``eq_a * wa + eq_b * wb``.  ``counts``: ``(count_a,
    count_b)``, the number of valid entries equal to each (per row, over the
    whole group), where the selection already knows them
    (:func:`topk_core._radix.radix_select_pair` with ``counts=True``); a None
    one is counted here, with a row sum.
    """
    # an infinite a or b has weight 0: its entries are left out of the masks altogether,
    # so that no 0 * inf (an overflowed sum(s) times that weight) reaches them
    nan = xp.asarray(xp.nan, dtype=a.dtype)
    eq_a = x == xp.where(xp.isfinite(a), a, nan)
    eq_b = x == xp.where(xp.isfinite(b), b, nan)
    if valid is not None:
        eq_a = eq_a & valid
        eq_b = eq_b & valid
    dtype = a.dtype if xp.isdtype(a.dtype, "real floating") else xp.float32
    known_a, known_b = (None, None) if counts is None else counts
    ca = _tie_count(xp, eq_a, known_a, dtype, row_sum)
    cb = _tie_count(xp, eq_b, known_b, dtype, row_sum)
    return eq_a, eq_b, tie_share(xp, a, ca), tie_share(xp, b, cb)


def _tie_count(xp: Any, eq: Array, known: Array | None, dtype: Any, row_sum: RowSum) -> Array:
    if known is not None:
        return xp.astype(known, dtype)
    return _row_sum(xp, xp.astype(eq, dtype), row_sum)


def tie_share(xp: Any, v: Array, count: Array) -> Array:
    """The weight of each of ``count`` entries tied with ``v``: ``1/2`` split evenly.

    0 where ``v`` is infinite or NaN, or nothing is tied; ``count``'s dtype
    (floating).  The one definition behind :func:`tie_weights` and the
    backends' fast paths, which count the ties among a few positions.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core._math import tie_share
    >>> tie_share(np, np.array([2.0, 2.0, np.inf]), np.array([1.0, 4.0, 3.0]))
    array([0.5  , 0.125, 0.   ])
    """
    zero = xp.asarray(0.0, dtype=count.dtype)
    one = xp.asarray(1.0, dtype=count.dtype)
    return xp.where(xp.isfinite(v) & (count > 0), 0.5 / xp.maximum(count, one), zero)


def _tie_weights_for(
    xp: Any,
    x: Array,
    a: Array,
    b: Array,
    valid: Array | None,
    row_sum: RowSum,
    counts: TieCounts = None,
) -> tuple[Array, Array, Array, Array]:
    # only the keywords in use: code that wraps tie_weights with the 5-argument call keeps
    # working wherever there is no group and no counts
    kw = {k: v for k, v in (("row_sum", row_sum), ("counts", counts)) if v is not None}
    return tie_weights(xp, x, a, b, valid, **kw)


def _apply_w(xp: Any, eq_a: Array, eq_b: Array, wa: Array, wb: Array, scale: Array) -> Array:
    """``scale * w`` elementwise (``scale`` per row)."""
    zero = xp.asarray(0.0, dtype=scale.dtype)
    return xp.where(eq_a, scale * wa, zero) + xp.where(eq_b, scale * wb, zero)


def vjp(
    xp: Any,
    x: Array,
    a: Array,
    b: Array,
    z: Array,
    g: Array,
    tau: float | Array,
    valid: Array | None,
    output: str = "probs",
    *,
    row_sum: RowSum = None,
) -> tuple[Array, Array]:
    """Closed-form VJP of ``p = sigmoid(z)`` (or of ``z`` itself).

    Returns ``(grad_x, t)`` where ``t`` is the elementwise contribution to the
    gradient of ``tau``: ``grad_tau = sum(t)`` reduced to tau's shape.
    ``grad_x = s - sum(s) * w`` with ``s = g * p (1 - p) / tau`` (``g / tau``
    for logits).
    """
    res = SoftResiduals(x, a, b, z, None, output)
    return soft_backward(xp, res, g, tau, valid, row_sum=row_sum)


def vjp_from_s(
    xp: Any,
    x: Array,
    a: Array,
    b: Array,
    s: Array,
    tau: float | Array,
    valid: Array | None,
    *,
    row_sum: RowSum = None,
    counts: TieCounts = None,
) -> tuple[Array, Array]:
    """``grad_x = s - sum(s) * w`` from ``s = g * dout/dz`` (not yet divided by tau).

    Returns ``(s / tau with masked entries 0, grad_x)``.  Split out of :func:`vjp`
    so that an adapter with a cheaper ``g * p (1 - p)`` (e.g. from a saved output)
    reuses the threshold term instead of restating it.

    NaN rule: a NaN entry of ``x`` keeps its own ``s`` (NaN for probabilities)
    but is left out of ``sum(s)``, so NaN never flows into the other entries.
    """
    if not (isinstance(tau, float) and tau == 1.0):
        s = s / tau
    zero = xp.asarray(0.0, dtype=s.dtype)
    if valid is not None:
        s = xp.where(valid, s, zero)
    total = _row_sum(xp, xp.where(xp.isnan(x), zero, s), row_sum)
    eq_a, eq_b, wa, wb = _tie_weights_for(xp, x, a, b, valid, row_sum, counts)
    wa = xp.astype(wa, s.dtype)
    wb = xp.astype(wb, s.dtype)
    return s, s - _apply_w(xp, eq_a, eq_b, wa, wb, total)


def jvp(
    xp: Any,
    x: Array,
    a: Array,
    b: Array,
    z: Array,
    u: Array,
    tau: float | Array,
    tau_tangent: Array | None,
    valid: Array | None,
    output: str = "probs",
    *,
    row_sum: RowSum = None,
    pair: bool = False,
    slope: Array | None = None,
    counts: TieCounts = None,
) -> Array | tuple[Array, Array, Array]:
    """Closed-form JVP: ``dz = (u - w.u) / tau - z dtau / tau``; ``dp = p(1-p) dz``.

    NaN rule: at a NaN entry of ``x`` only its own term ``u / tau`` is kept (so
    ``dp`` is NaN there); it does not move with the threshold or ``tau``.  The
    transpose (reverse mode in JAX) then never sends NaN to the other entries.

    ``pair``: also return the tangents of ``a`` and ``b`` themselves, ``(dp, da,
    db)``: the mean of ``u`` over each one's ties (0 for an infinite one), so
    ``w.u = (da + db) / 2``; free, from the same two row sums.  ``slope``:
    ``p (1 - p)`` where the forward kept it (probabilities; none recomputed).
    ``counts``: the tie counts, where the selection found them (:func:`tie_weights`).
    """
    zero = xp.asarray(0.0, dtype=z.dtype)
    if valid is not None:
        u = xp.where(valid, u, zero)
    eq_a, eq_b, wa, wb = _tie_weights_for(xp, x, a, b, valid, row_sum, counts)
    half_a = xp.astype(wa, z.dtype) * _row_sum(xp, xp.where(eq_a, u, zero), row_sum)
    half_b = xp.astype(wb, z.dtype) * _row_sum(xp, xp.where(eq_b, u, zero), row_sum)
    dtheta = half_a + half_b
    x_nan = xp.isnan(x)
    # select between x-sized operands: a where() that broadcast the per-row dtheta itself
    # would, in a JAX shard_map, make the transpose psum an x-sized array
    dz = xp.where(x_nan, u, u - dtheta)
    if output != "probs":
        slope = None
    elif slope is None:
        slope = sigmoid_grad(xp, z)
    if slope is not None:
        dz = slope * dz
    if tau_tangent is not None:
        coef = tau_coefficient(xp, z, x_nan)
        if slope is not None:
            # p (1-p) z before dtau and 1/tau: where p (1-p) underflows to 0, z dtau / tau
            # can overflow although the tangent is 0 (0 * inf = NaN for a finite x)
            coef = slope * coef
        dz = dz - coef * tau_tangent
    if not (isinstance(tau, float) and tau == 1.0):
        dz = dz / tau
    if valid is not None:
        dz = xp.where(valid, dz, zero)
    return (dz, half_a + half_a, half_b + half_b) if pair else dz


def pair_vjp(
    xp: Any,
    x: Array,
    a: Array,
    b: Array,
    valid: Array | None,
    grad_a: Array | None,
    grad_b: Array | None,
) -> Array:
    """The transpose of :func:`jvp`'s ``pair`` tangents: ``grad_a`` (per row) spread
    evenly over ``a``'s ties, ``grad_b`` over ``b``'s, nothing for an infinite one.

    Twice the spec's per-side weights (:func:`tie_weights`); x's shape and dtype.
    A None gradient contributes nothing.
    """
    eq_a, eq_b, wa, wb = tie_weights(xp, x, a, b, valid)
    zero = xp.asarray(0.0, dtype=x.dtype)
    g = xp.zeros_like(x)
    for eq, w, ga in ((eq_a, wa, grad_a), (eq_b, wb, grad_b)):
        if ga is not None:
            g = g + xp.where(eq, xp.astype(ga, x.dtype) * (2 * xp.astype(w, x.dtype)), zero)
    return g


def selection_scores(xp: Any, x: Array, valid: Array | None) -> Array:
    """``x`` as the selection of ``a`` and ``b`` sees it: masked-out entries are ``-inf``.

    So they never rank above a valid entry, and a row with fewer than ``k + 1``
    valid entries gets ``-inf`` for the missing ranks.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core._math import selection_scores
    >>> selection_scores(np, np.array([2.0, 5.0, 1.0]), np.array([True, False, True]))
    array([  2., -inf,   1.])
    """
    if valid is None:
        return x
    return xp.where(valid, x, xp.asarray(-xp.inf, dtype=x.dtype))


def standard_function(
    xp: Any, name: str, needed_for: str, instead: str = ""
) -> Callable[..., Array]:
    """``xp.<name>``, or a ``TypeError`` saying that x's library lacks it and what needs it.

    For the Array API functions that only some paths call: a library that lacks one
    (pydata sparse has no ``arange`` or ``cumulative_sum``) gets an error that says
    which function, which library and which argument asked for it (and ``instead``,
    what works without it), not the library's ``AttributeError`` from deep inside
    the selection.

    Examples
    --------
    >>> import types
    >>> from topk_core._math import standard_function
    >>> lib = types.SimpleNamespace(__name__="mylib")
    >>> standard_function(lib, "arange", "a per-row k", "an integer k")
    Traceback (most recent call last):
    ...
    TypeError: x's array library mylib has no arange(), a function of the Array API
    standard that a per-row k needs: use an integer k, or an array of a library that has
    it (NumPy, CuPy, ...)
    """
    fn = getattr(xp, name, None)
    if fn is None:
        lib = getattr(xp, "__name__", type(xp).__name__)
        use = f"{instead}, or an array" if instead else "an array"
        raise TypeError(
            f"x's array library {lib} has no {name}(), a function of the Array API "
            f"standard that {needed_for} needs: use {use} of a library that has it "
            "(NumPy, CuPy, PyTorch, JAX, Dask, array-api-strict)"
        )
    return fn


def hard_mask(
    xp: Any,
    x: Array,
    a: Array,
    valid: Array | None,
    k: int | Array,
    *,
    cond: Any = None,
    group: Any = None,
    dtype: Any = None,
) -> Array:
    """Hard top-k indicator (bool) from the k-th largest valid value ``a``.

    Selects the valid entries above ``a``, then the valid entries equal to
    ``a`` by lower index first until ``k`` (a Python int or an integer array
    of shape ``x.shape[:-1] + (1,)``, already clipped to ``[0, n_valid]``)
    are selected: exactly ``k`` per row.  NaN ranks above ``+inf``, as in the
    backends' selection: a NaN entry counts as above a non-NaN ``a`` (except
    for ``k = 0``, whose ``a`` is the ``+inf`` sentinel) and as equal to a
    NaN ``a``.  The same ``a`` gives DFTopK's threshold, so a hard forward
    and the soft gradient share one selection.

    ``cond(pred, if_true, if_false)``, optional, calls one of two
    zero-argument functions on a scalar boolean (:func:`eager_cond`,
    ``jax.lax.cond``).  With it, when every row has exactly ``k`` valid
    entries that are ``>= a`` or NaN (no surplus ties at ``a``), those are
    the mask, and the NaN rule and the ranking of ties (a cumulative sum,
    most of the cost) are skipped.  None always takes the general path (for
    traced or lazy arrays).

    ``group`` (a :class:`topk_core._group.Group`, with ``cond=None``): ``x`` is
    one shard of the row; the count above ``a`` is summed over the shards and
    ties on earlier shards rank first (lower *global* index first).

    ``dtype``: the mask as 0/1 values of this dtype instead of bool (cast in
    each branch of ``cond``, which XLA fuses with the branch's mask).

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core._math import eager_cond, hard_mask
    >>> x = np.array([[1.0, 3.0, 3.0, 2.0], [np.nan, 0.0, 5.0, 4.0]])
    >>> a = np.array([[3.0], [5.0]])  # the 2nd largest of each row (NaN ranks first)
    >>> hard_mask(np, x, a, None, 2, cond=eager_cond, dtype=np.float64)
    array([[0., 1., 1., 0.],
           [1., 0., 1., 0.]])
    """

    def cast(m: Array) -> Array:
        return m if dtype is None else xp.astype(m, dtype)

    if cond is None or group is not None:
        return cast(_hard_mask_ranked(xp, x, a, valid, k, group))
    # every entry the general mask can select (above or at a, or NaN, which ranks above
    # everything); it selects k of them, so where there are exactly k they are the mask
    top = (x >= a) | xp.isnan(x)
    if valid is not None:
        top = top & valid
    simple = xp.all(_count(xp, top) == (k if isinstance(k, int) else xp.astype(k, xp.int32)))
    return cond(simple, lambda: cast(top), lambda: cast(_hard_mask_ranked(xp, x, a, valid, k)))


def _count(xp: Any, m: Array) -> Array:
    """True entries per row (int32, keepdims); ``dtype=`` avoids an upcast copy."""
    return xp.sum(xp.astype(m, xp.int32), axis=-1, keepdims=True, dtype=xp.int32)


def _need(xp: Any, k: int | Array, n_gt: Array) -> Array:
    return (k if isinstance(k, int) else xp.astype(k, xp.int32)) - n_gt


def _hard_mask_ranked(
    xp: Any, x: Array, a: Array, valid: Array | None, k: int | Array, group: Any = None
) -> Array:
    """:func:`hard_mask` in general: the NaN rule and ties ranked by index."""
    nan_x = xp.isnan(x)
    nan_a = xp.isnan(a)
    above_nan = nan_x & ~nan_a
    if isinstance(k, int):
        gt = (x > a) | above_nan if k > 0 else x > a
    else:
        gt = (x > a) | (above_nan & (k > 0))
    eq = (x == a) | (nan_x & nan_a)
    if valid is not None:
        gt = gt & valid
        eq = eq & valid
    # ties at a are ranked by position: the hard mask (topk_mask, hard=True) needs it
    cumulative_sum = standard_function(xp, "cumulative_sum", "the hard top-k mask")
    rank = cumulative_sum(xp.astype(eq, xp.int32), axis=-1)
    n_gt = _count(xp, gt)
    if group is not None:
        n_gt = group.sum(n_gt)
        rank = rank + group.exclusive_sum(_count(xp, eq))
    return gt | (eq & (rank <= _need(xp, k, n_gt)))


def eager_cond(pred: Array, if_true: Any, if_false: Any) -> Array:
    """``cond`` for :func:`hard_mask` on arrays whose values the host can read."""
    return if_true() if bool(pred) else if_false()


@dataclass
class SoftResiduals:
    """What the generic backward needs from the forward (normalised layout, compute dtype).

    ``z`` are the logits (masked entries ``-inf``); ``d`` is ``p (1 - p)`` for
    ``output="probs"`` (None for logits, or where the backward recomputes it
    from ``z``); ``counts`` the tie counts of ``a`` and ``b`` where the
    selection found them (as in :func:`tie_weights`; None: counted with row sums).
    """

    x: Array
    a: Array
    b: Array
    z: Array
    d: Array | None
    output: str
    counts: TieCounts = None


def soft_forward(
    xp: Any,
    x: Array,
    a: Array,
    b: Array,
    tau: float | Array,
    valid: Array | None,
    output: str,
    *,
    keep: bool,
    eager: bool = False,
    native_sigmoid: Any = None,
) -> tuple[Array, SoftResiduals | None]:
    """The forward after the selection: ``(out, residuals)`` in the compute dtype.

    ``out`` is ``p`` (or ``z`` for logits) and never aliases the residuals;
    the residuals are None unless ``keep``.
    """
    z = logits(xp, x, a, b, tau, valid, eager=eager)
    if output == "logits":
        if not keep:
            return z, None
        return xp.asarray(z, copy=True), SoftResiduals(x, a, b, z, None, output)
    if not keep:
        return (native_sigmoid(z) if native_sigmoid is not None else sigmoid(xp, z)), None
    # the backward's p (1 - p) from the forward's one exponential: none recomputed
    p, d = sigmoid_and_grad(xp, z)
    return p, SoftResiduals(x, a, b, z, d, output)


def soft_tangent(
    xp: Any,
    res: SoftResiduals,
    u: Array,
    tau: float | Array,
    dtau: Array | None,
    valid: Array | None,
    *,
    largest: bool = True,
    row_sum: RowSum = None,
) -> Array:
    """Closed-form JVP from :func:`soft_forward`'s residuals (``u``: the user's tangent).

    :func:`jvp` with the kept ``p (1 - p)``; ``largest=False`` negates ``u``
    (the selection ran on ``-x``).  ``res.z`` may have its infinities set to 0
    (torch's residuals): :func:`tau_coefficient` makes the same of them.
    """
    if not largest:
        u = -u
    return jvp(
        xp,
        res.x,
        res.a,
        res.b,
        res.z,
        u,
        tau,
        dtau,
        valid,
        res.output,
        row_sum=row_sum,
        slope=res.d,
        counts=res.counts,
    )


def sigmoid_and_grad(xp: Any, z: Array) -> tuple[Array, Array]:
    """``(p, p (1 - p))`` from one exponential ``e = exp(-|z|)``, both tails relatively exact."""
    e = xp.exp(-xp.abs(z))
    r = 1 / (1 + e)
    er = e * r
    return xp.where(z >= 0, r, er), er * r


def soft_backward(
    xp: Any,
    res: SoftResiduals,
    g: Array,
    tau: float | Array,
    valid: Array | None,
    *,
    row_sum: RowSum = None,
) -> tuple[Array, Array]:
    """Closed-form VJP from the residuals: ``(grad_x, t)`` as :func:`vjp` returns them."""
    zero = xp.asarray(0.0, dtype=res.z.dtype)
    if res.d is not None:
        s = g * res.d
    elif res.output == "probs":
        s = g * sigmoid_grad(xp, res.z)
    else:
        s = g
    s, grad_x = vjp_from_s(
        xp, res.x, res.a, res.b, s, tau, valid, row_sum=row_sum, counts=res.counts
    )
    # dz/dtau = -z/tau; infinite z (masked, or infinite x) stays infinite whatever tau is,
    # so those entries contribute 0; NaN entries of x are constants (NaN rule)
    t = xp.where(xp.isnan(res.x), zero, -s * xp.where(xp.isinf(res.z), zero, res.z))
    return grad_x, t


# tie code bits (int8, per entry): tied with a, tied with b, masked out, NaN (valid)
TIE_A, TIE_B, MASKED, NAN = 1, 2, 4, 8


def tie_code(
    xp: Any,
    x: Array,
    a: Array,
    b: Array,
    valid: Array | None,
    *,
    row_sum: RowSum = None,
    counts: TieCounts = None,
) -> tuple[Array, Array, Array]:
    """The tie weights as one int8 per entry plus two per row: ``(code, wa, wb)``.

    ``code`` has bit :data:`TIE_A` on the valid entries equal to ``a``,
    :data:`TIE_B` on those equal to ``b``, :data:`MASKED` on the masked ones
    and :data:`NAN` on the valid NaN entries; ``wa``/``wb`` as in
    :func:`tie_weights`.  A compact residual for a linearised JVP
    (:func:`jvp_from_code`): 1 byte per entry instead of ``x``.  ``counts``
    as in :func:`tie_weights`.
    """
    eq_a, eq_b, wa, wb = _tie_weights_for(xp, x, a, b, valid, row_sum, counts)
    i8 = xp.int8
    code = xp.astype(eq_a, i8) + xp.astype(eq_b, i8) * xp.asarray(TIE_B, dtype=i8)
    nan = xp.isnan(x)
    if valid is not None:
        code = code + xp.astype(~valid, i8) * xp.asarray(MASKED, dtype=i8)
        nan = nan & valid
    code = code + xp.astype(nan, i8) * xp.asarray(NAN, dtype=i8)
    return code, wa, wb


def jvp_from_code(
    xp: Any,
    code: Array,
    wa: Array,
    wb: Array,
    scale: Array,
    u: Array,
    z_coef: Array | None = None,
    dtau: Array | None = None,
    *,
    row_sum: RowSum = None,
    logits: bool = False,
) -> Array:
    """The closed-form JVP from :func:`tie_code`'s residuals, linear in ``u`` and ``dtau``.

    ``scale * (u - w.u) - (scale * z) * dtau`` on the valid entries, 0 on the
    masked ones, with ``scale = p (1 - p) / tau`` (``1 / tau`` for logits) and
    ``z_coef`` the :func:`tau_coefficient` of ``z`` (both None for a constant
    ``tau``): the same tangent as :func:`jvp`, NaN rule included (a NaN entry
    keeps only ``scale * u``, so the transpose sends nothing from it to the
    other entries or to ``tau``).  ``scale * z`` comes first: where ``p (1 - p)``
    underflows to 0, ``z * dtau`` can overflow (0 * inf = NaN for a finite x).
    With ``logits`` (``scale = 1 / tau``, never 0) it is ``scale * (u - w.u - z
    dtau)``, :func:`jvp`'s order: ``z / tau`` alone may overflow where the
    tangent (and, transposed, ``grad_tau``) is in range.
    """
    zero_u = xp.zeros_like(u)
    ok = (code & xp.asarray(MASKED, dtype=code.dtype)) == 0
    u = xp.where(ok, u, zero_u)
    on_a = (code & xp.asarray(TIE_A, dtype=code.dtype)) != 0
    on_b = (code & xp.asarray(TIE_B, dtype=code.dtype)) != 0
    dtheta = xp.astype(wa, u.dtype) * _row_sum(xp, xp.where(on_a, u, zero_u), row_sum)
    dtheta = dtheta + xp.astype(wb, u.dtype) * _row_sum(xp, xp.where(on_b, u, zero_u), row_sum)
    moved = u - dtheta  # x-sized before any select (see jvp)
    nan = (code & xp.asarray(NAN, dtype=code.dtype)) != 0
    d = xp.where(nan, u, moved)
    if z_coef is not None and dtau is not None:
        # tau's term is selected away at NaN entries, not only multiplied by a zero
        # coefficient: a transpose multiplies the cotangent by that coefficient, and a
        # loss's cotangent is NaN exactly there (grad_tau would be 0 * NaN)
        if logits:
            # z_coef is 0 at NaN entries: they keep u / tau
            return xp.where(ok, scale * (d - xp.where(nan, zero_u, z_coef * dtau)), zero_u)
        # a NaN entry's scale is NaN: it stays out of tau's term (and its transpose)
        zs = xp.where(nan, zero_u, scale * z_coef)
        return xp.where(ok, scale * d - xp.where(nan, zero_u, zs * dtau), zero_u)
    return xp.where(ok, scale * d, zero_u)
