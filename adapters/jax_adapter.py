"""JAX autodiff for DFTopK: ``jax.custom_jvp`` rules built on :mod:`topk_core._math`.

``topk_core.dftopk(jax_array, k)`` reaches :func:`apply` through the jax
backend's ``apply`` hook, also when ``x`` is a tracer inside ``jit``, ``vmap``
or ``grad``.  Only a JVP is defined: JAX derives reverse mode by linearising
and transposing it, so ``grad``, ``jacrev``, ``jacfwd``, ``hessian``,
``linearize`` and ``linear_transpose`` all work.  The tangent is
:func:`topk_core._math.jvp`, linear in the tangents and built from
differentiable jnp ops, so it can itself be differentiated (second and
higher order).

Two rules:

* ``_pair`` (the selection ``(a, b)``): ``da`` = mean of the tangent over
  the entries tied with ``a`` (0 for an infinite ``a``), same for ``b``.
  Hence ``d theta = w . u``, the spec's weights.  Only used when the outer
  rule is itself differentiated (second order).
* ``_core`` (the whole forward ``x -> p`` or ``x -> z``): its JVP is the
  closed form of :func:`topk_core._math.jvp`.  First-order derivatives never
  differentiate the selection or the infinite-value branches of
  :func:`topk_core._math.logits`, so they are NaN-free for infinite inputs.

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
from topk_core.backends.jax_backend import select_pair

from topk_core import _math
from topk_core._group import row_sum_of

__all__ = ["apply"]


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _pair(sel: tuple, xs: Any, k_arr: Any) -> tuple[Any, Any]:
    """``(a, b)`` of ``xs`` (masked entries already ``-inf``); ``sel = (k_static, group)``."""
    k_static, group = sel
    k = k_static if k_arr is None else k_arr
    if group is not None:
        return group.select_pair(jnp, xs, k)
    return select_pair(jnp, xs, k)


@_pair.defjvp
def _pair_jvp(sel, primals, tangents):
    xs, k_arr = primals
    dxs = tangents[0]
    a, b = _pair(sel, xs, k_arr)
    group = sel[1]
    return (a, b), (_tie_mean(xs, a, dxs, group), _tie_mean(xs, b, dxs, group))


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


def _forward(static: tuple, x: Any, tau: Any, k_arr: Any, valid: Any):
    """Primal output in x's dtype plus ``(xc, a, b, z, tau)`` in the compute dtype."""
    k_static, output, group = static
    cdt = _compute_dtype(x.dtype)
    xs = x if valid is None else jnp.where(valid, x, jnp.asarray(-jnp.inf, dtype=x.dtype))
    a, b = _pair((k_static, group), xs, k_arr)
    xc = x.astype(cdt)
    a = a.astype(cdt)
    b = b.astype(cdt)
    t = 1.0 if tau is None else tau  # None: tau = 1, the division is skipped
    z = _math.logits(jnp, xc, a, b, t, valid)
    if output == "hard":
        # z is still needed by the JVP rule; a primal-only jit drops it
        k = k_static if k_arr is None else k_arr
        out = _math.hard_mask(jnp, xc, a, valid, k, cond=jax.lax.cond, group=group)
    else:
        out = _math.sigmoid(jnp, z) if output == "probs" else z
    return out.astype(x.dtype), (xc, a, b, z, t)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _core(static: tuple, x: Any, tau: Any, k_arr: Any, valid: Any) -> Any:
    return _forward(static, x, tau, k_arr, valid)[0]


def _core_jvp(static, primals, tangents):
    x, tau, k_arr, valid = primals
    dx, dtau = tangents[0], tangents[1]
    out, (xc, a, b, z, t) = _forward(static, x, tau, k_arr, valid)
    kind = static[1]
    if kind == "hard":
        kind = "probs"
        out = out + _straight_through_zero(z).astype(out.dtype)
    cdt = xc.dtype
    u = jnp.zeros_like(xc) if isinstance(dx, SymbolicZero) else dx.astype(cdt)
    dt = None
    if tau is not None and not isinstance(dtau, SymbolicZero):
        dt = dtau.astype(cdt)
    if isinstance(dx, SymbolicZero) and dt is None:
        return out, jnp.zeros_like(out)
    d = _math.jvp(jnp, xc, a, b, z, u, t, dt, valid, kind, row_sum=row_sum_of(jnp, static[2]))
    return out, d.astype(x.dtype)


def _straight_through_zero(z: Any) -> Any:
    """Exactly 0 with the derivative of ``p = sigmoid(z)``.

    Added to the hard primal inside the JVP rule, so that a transformation
    differentiating that primal again (e.g. ``grad`` of an inner ``jvp``'s
    output) also sees the soft ``p``; 0 where ``p`` is NaN, to keep the mask.
    """
    p = _math.sigmoid(jnp, z)
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
    k = pb.k
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
