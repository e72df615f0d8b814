"""JAX autodiff for DFTopK: ``jax.custom_jvp`` rules built on :mod:`topk_core._math`.

``topk_core.dftopk(jax_array, k)`` reaches :func:`apply` through the jax
backend's ``apply`` hook, also when ``x`` is a tracer inside ``jit``, ``vmap``
or ``grad``.  Only a JVP is defined: JAX derives reverse mode by linearising
and transposing it, so ``grad``, ``jacrev``, ``jacfwd``, ``hessian``,
``linearize`` and ``linear_transpose`` all work.  The tangent is the closed
form of :func:`topk_core._math.jvp`, linear in the tangents and built from
differentiable jnp ops, so it can itself be differentiated (second and
higher order).

Two rules:

* ``_pair`` (the selection ``(a, b)``, plus the tie counts of both read
  from its last histogram, so that the forward's tie weights need no
  reduction over ``x``; issue 11): ``da`` = mean of the tangent over the
  entries tied with ``a`` (0 for an infinite ``a``), same for ``b``; the
  integer counts have ``float0`` tangents.  Hence ``d theta = w . u``, the
  spec's weights.  Only used when the outer rule is itself differentiated
  (second order).
* ``_core`` (the whole forward ``x -> p`` or ``x -> z``): its JVP is the
  closed form of :func:`topk_core._math.jvp`, written on compact residuals
  (:func:`topk_core._math.jvp_from_code`): ``p``, one int8 tie code per
  entry and two weights per row, under ``jax.checkpoint`` so that a
  linearisation (``grad``, ``vjp``) keeps exactly those: 4.8 MiB at n = 1e6
  float32 where the tangent of ``jvp`` kept 13.4 MiB (issue 11).
  ``p (1 - p)`` and the masks are recomputed from them without an
  exponential.  First-order derivatives never differentiate the selection
  or the infinite-value branches of :func:`topk_core._math.logits`, so they
  are NaN-free for infinite inputs.

Straight-through (``dftopk(..., hard=True)``): ``output = "hard"`` makes the
primal the hard top-k mask (:func:`topk_core._math.hard_mask`, from the same
``a``) while the tangent stays that of ``"probs"``.

``k`` (a Python int) and ``output`` are static; a per-row ``k`` array and the
mask are ordinary (integer / boolean, hence non-differentiable) arguments, and
an array ``tau`` is differentiable.

Scale-out (``group=`` a mesh axis name inside ``shard_map``): the group
(:class:`topk_core.backends.jax_backend.JaxGroup`, hashable) is static too;
the selection is the group's, and every per-row sum in both rules
(``_tie_mean``, :func:`topk_core._math.jvp`'s ``row_sum``) is a ``psum``, so
JAX transposes them into the cross-shard terms of the gradient.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from topk_core.backends.jax_backend import eager_k, select_pair_counts

from topk_core import _math
from topk_core._group import row_sum_of

__all__ = [
    "apply",
    "backward_math",
    "differentiable_pair",
    "differentiable_pair_counts",
    "forward_math",
    "tangent_math",
]


def _pair_values(sel: tuple, xs: Any, k_arr: Any) -> tuple[Any, Any, Any, Any]:
    """``(a, b, count_a, count_b)`` of ``xs`` (masked entries already ``-inf``).

    ``sel = (k_static, group)``.  The int32 tie counts come from the
    selection's last histogram (``count_b`` None where it is not known there):
    the forward's tie weights then need no reduction over ``x``.
    """
    k_static, group = sel
    k = k_static if k_arr is None else k_arr
    if group is not None:
        return group.select_pair_counts(xs, k)
    return select_pair_counts(xs, k)


_pair = partial(jax.custom_jvp, nondiff_argnums=(0,))(_pair_values)


def _pair_of(sel: tuple, xs: Any, k_arr: Any) -> tuple[Any, Any, Any, Any]:
    """``_pair``, through its rule only where ``xs`` is traced: a concrete ``xs`` cannot
    be differentiated, and an eager ``custom_jvp`` call costs about 1 ms of Python
    (argument handling) around the selection's compiled program."""
    if isinstance(xs, jax.core.Tracer):
        return _pair(sel, xs, k_arr)
    return _pair_values(sel, xs, k_arr)


@_pair.defjvp
def _pair_jvp(sel, primals, tangents):
    xs, k_arr = primals
    dxs = tangents[0]
    a, b, ca, cb = _pair(sel, xs, k_arr)
    group = sel[1]
    da = _tie_mean(xs, a, dxs, group)
    db = _tie_mean(xs, b, dxs, group)
    return (a, b, ca, cb), (da, db, _int_zero(ca), None if cb is None else _int_zero(cb))


def differentiable_pair(x: Any, k: Any, group: Any = None) -> tuple[Any, Any]:
    """``(a, b)`` of ``x`` (masked entries already ``-inf``), differentiable in ``x``.

    The selection through the ``_pair`` rule: ``da`` is the mean of the tangent
    over the entries tied with ``a`` (0 for an infinite ``a``), likewise ``db``,
    so ``jax.grad`` of ``topk_threshold`` puts the spec's weights ``w`` on the
    tied entries, and differentiating ``dftopk_vjp``/``dftopk_jvp`` in ``x``
    (second order) keeps the threshold's term.  What the jax backend's
    ``select_pair`` (and a ``JaxGroup``'s) hands the public API.
    """
    a, b, _ = differentiable_pair_counts(x, k, group)
    return a, b


def differentiable_pair_counts(x: Any, k: Any, group: Any = None) -> tuple[Any, Any, Any]:
    """:func:`differentiable_pair` plus the tie counts ``(count_a, count_b)`` its last
    histogram holds (``count_b`` None with narrow digits), for the closed forms' tie
    weights (:class:`topk_core.backends.jax_backend.JaxSoft`): no row sums over ``x``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from topk_core.adapters.jax_adapter import differentiable_pair_counts
    >>> a, b, (ca, cb) = differentiable_pair_counts(jnp.array([[4.0, 3.0, 3.0, 1.0]]), 1)
    >>> float(a[0, 0]), float(b[0, 0]), int(ca[0, 0])
    (4.0, 3.0, 1)
    """
    k_static, k_arr = (k, None) if isinstance(k, int) else (None, k)
    a, b, ca, cb = _pair_of((k_static, group), x, k_arr)
    return a, b, (ca, cb)


def _int_zero(c: Any) -> Any:
    """The (symbolic) tangent of an integer output: zeros of ``float0``.

    Typed from ``c`` itself, so it also carries the mesh axes ``c`` varies over
    inside ``shard_map`` (rows sharded over another axis than ``group``'s): a
    NumPy ``float0`` array would not, and JAX rejects the rule's output then.
    """
    return jnp.zeros_like(c, dtype=jax.dtypes.float0)


def _tie_mean(xs: Any, v: Any, dxs: Any, group: Any = None) -> Any:
    """Mean of ``dxs`` over the entries equal to ``v`` (per row); 0 for infinite ``v``."""
    eq = xs == v
    count = jnp.sum(eq, axis=-1, keepdims=True, dtype=dxs.dtype)
    total = jnp.sum(jnp.where(eq, dxs, jnp.zeros_like(dxs)), axis=-1, keepdims=True)
    if group is not None:
        count = group.sum(count)
        total = group.sum(total)
    ok = jnp.isfinite(v) & (count > 0)
    return jnp.where(ok, total / jnp.where(ok, count, jnp.ones_like(count)), jnp.zeros_like(total))


def _compute_dtype(dtype: Any) -> Any:
    return _math.compute_dtype(jnp, dtype)


def _select(sel: tuple, x: Any, k_arr: Any, valid: Any) -> tuple[Any, Any, Any]:
    """``(a, b, counts)`` of the valid entries of ``x`` (``a``, ``b`` differentiable).

    ``counts``: the tie counts for :func:`topk_core._math.tie_code`.  Masked
    entries are ``-inf`` in the selection, so a count can include them only
    for an infinite value, which gets no weight.
    """
    a, b, ca, cb = _pair(sel, _math.selection_scores(jnp, x, valid), k_arr)
    return a, b, (ca, cb)


def forward_math(
    output: str,
    x: Any,
    a: Any,
    b: Any,
    tau: Any,
    valid: Any,
    *,
    keep_z: bool = False,
    k: Any = None,
    group: Any = None,
    counts: Any = None,
) -> tuple[Any, Any]:
    """The forward after the selection: ``(out, residuals)``, ``out`` in x's dtype.

    The residuals are what :func:`tangent_math` needs and all that a
    linearisation keeps: ``p`` (the output itself for float32/float64), one
    int8 tie code per entry and two weights per row
    (:func:`topk_core._math.tie_code`), plus ``z`` as it moves with ``tau``
    (:func:`topk_core._math.tau_coefficient`) only when ``keep_z`` (a
    differentiated ``tau``).  ``tau`` is None for 1.  For
    ``output="hard"`` (needs ``k``) ``out`` is the hard top-k mask from the same
    ``a`` and the residuals are ``"probs"``'s.  ``group``: the shards'
    collectives (tie counts summed over them).  ``counts``: ``(count_a,
    count_b)`` from the selection (:func:`_select`), either None to count it
    here with a row sum.
    """
    cdt = _compute_dtype(x.dtype)
    xc = x.astype(cdt)
    a = a.astype(cdt)
    b = b.astype(cdt)
    t = 1.0 if tau is None else tau  # None: tau = 1, the division is skipped
    z = _math.logits(jnp, xc, a, b, t, valid)
    code, wa, wb = _math.tie_code(
        jnp, xc, a, b, valid, row_sum=row_sum_of(jnp, group), counts=counts
    )
    zf = _math.tau_coefficient(jnp, z, jnp.isnan(xc)) if keep_z else None
    if output == "logits":
        return z.astype(x.dtype), (None, code, wa, wb, t, zf)
    # XLA's logistic is 1 / (1 + exp(-z)): one exponential, both tails relatively exact
    p = jax.nn.sigmoid(z)
    res = (p, code, wa, wb, t, zf)
    if output == "hard":
        mask = _math.hard_mask(jnp, xc, a, valid, k, cond=jax.lax.cond, group=group, dtype=x.dtype)
        return mask, res
    return p.astype(x.dtype), res


def _tangent(output: str, group: Any, res: Any, u: Any, dtau: Any) -> Any:
    p, code, wa, wb, t, zf = res
    scale = p * (1 - p) if output != "logits" else jnp.ones((), dtype=u.dtype)
    if not (isinstance(t, float) and t == 1.0):
        scale = scale / t
    row_sum = row_sum_of(jnp, group)
    return _math.jvp_from_code(
        jnp, code, wa, wb, scale, u, zf, dtau, row_sum=row_sum, logits=output == "logits"
    )


# checkpointed: a linearisation keeps the residuals themselves (p, the int8 code),
# not the boolean masks and p (1 - p) derived from them, which are recomputed
# (no exponential) when transposing
_tangent_remat = jax.checkpoint(_tangent, static_argnums=(0, 1))


def tangent_math(output: str, res: Any, u: Any, dtau: Any, group: Any = None) -> Any:
    """The closed-form JVP from :func:`forward_math`'s residuals (compute dtype).

    Linear in ``u`` (x's tangent, compute dtype) and ``dtau`` (None for 0):
    :func:`topk_core._math.jvp_from_code`, the same tangent as
    :func:`topk_core._math.jvp`; reverse mode is its transpose.  ``"hard"``
    has ``"probs"``'s tangent.
    """
    return _tangent_remat(output, group, res, u, dtau)


def backward_math(output: str, res: Any, g: Any, group: Any = None) -> Any:
    """Reverse mode from the residuals: the transpose of :func:`tangent_math` in ``u``.

    What ``jax.vjp`` of :func:`topk_core.dftopk` runs after the forward (``tau``
    not differentiated); compute dtype.
    """
    u0 = jnp.zeros(g.shape, dtype=res[0].dtype if res[0] is not None else g.dtype)
    _, pull = jax.vjp(lambda u: tangent_math(output, res, u, None, group), u0)
    return pull(g.astype(u0.dtype))[0]


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _core(static: tuple, x: Any, tau: Any, k_arr: Any, valid: Any) -> Any:
    k_static, output, group = static
    a, b, counts = _select((k_static, group), x, k_arr, valid)
    k = k_static if k_arr is None else k_arr
    return forward_math(output, x, a, b, tau, valid, k=k, group=group, counts=counts)[0]


def _core_jvp(static, primals, tangents):
    x, tau, k_arr, valid = primals
    dx, dtau = tangents[0], tangents[1]
    k_static, output, group = static
    cdt = _compute_dtype(x.dtype)
    dt = None
    if tau is not None and not isinstance(dtau, SymbolicZero):
        dt = dtau.astype(cdt)
    a, b, counts = _select((k_static, group), x, k_arr, valid)
    k = k_static if k_arr is None else k_arr
    out, res = forward_math(
        output, x, a, b, tau, valid, keep_z=dt is not None, k=k, group=group, counts=counts
    )
    if output == "hard":
        # a transformation that differentiates this primal again sees the soft p
        out = out + _straight_through_zero(res[0]).astype(out.dtype)
    if isinstance(dx, SymbolicZero) and dt is None:
        return out, jnp.zeros_like(out)
    u = jnp.zeros(x.shape, dtype=cdt) if isinstance(dx, SymbolicZero) else dx.astype(cdt)
    d = tangent_math(output, res, u, dt, group)
    return out, d.astype(x.dtype)


def _straight_through_zero(p: Any) -> Any:
    """Exactly 0 with the derivative of the soft ``p``.

    Added to the hard primal inside the JVP rule, so that a transformation
    differentiating that primal again (e.g. ``grad`` of an inner ``jvp``'s
    output) also sees the soft ``p``; 0 where ``p`` is NaN, to keep the mask.
    """
    delta = p - jax.lax.stop_gradient(p)
    return jnp.where(jnp.isnan(delta), jnp.zeros_like(delta), delta)


_core.defjvp(_core_jvp, symbolic_zeros=True)


def apply(pb: Any, output: str, hard: bool = False) -> Any:
    """Differentiable DFTopK forward for a normalised :class:`topk_core._problem.Problem`.

    ``pb.x`` has the selection axis last (negated for ``largest=False``, with
    jnp ops, so JAX differentiates that part itself).  Works when ``pb.x``,
    ``pb.tau``, ``pb.k`` or ``pb.valid`` are tracers.  Returns ``p`` (or the
    logits for ``output="logits"``; for ``hard=True`` the hard top-k mask,
    differentiated as ``p``) in the normalised layout and x's dtype.

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import topk_core
    >>> x = jnp.array([4.0, 1.0, 3.0, 2.0])
    >>> g = jax.grad(lambda x: topk_core.dftopk(x, 2, tau=0.5)[0])(x)
    >>> [round(float(v), 4) for v in g]
    [0.0904, 0.0, -0.0452, -0.0452]
    """
    k = eager_k(pb.x, pb.k)
    k_static, k_arr = (k, None) if isinstance(k, int) else (None, k)
    tau = pb.tau
    if isinstance(tau, float):
        # a traced scalar, not a static one: a tau schedule must not recompile
        tau = None if tau == 1.0 else jnp.asarray(tau, dtype=_compute_dtype(pb.x.dtype))
    kind = "hard" if hard else output
    return _core_jit((k_static, kind, pb.group), pb.x, tau, k_arr, pb.valid)


# compiled once per static signature and shape: eager calls run one program;
# under an outer transformation the jit is inlined and the custom rule applies
_core_jit = jax.jit(_core, static_argnums=0)
