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

``k`` (a Python int) and ``output`` are static; a per-row ``k`` array and the
mask are ordinary (integer / boolean, hence non-differentiable) arguments, and
an array ``tau`` is differentiable.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from topk_core.backends.jax_backend import select_pair

from topk_core import _math

__all__ = ["apply", "backward_math", "forward_math", "tangent_math"]


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _pair(k_static: int | None, xs: Any, k_arr: Any) -> tuple[Any, Any]:
    """``(a, b)`` of ``xs`` (masked entries already ``-inf``)."""
    return select_pair(jnp, xs, k_static if k_arr is None else k_arr)


@_pair.defjvp
def _pair_jvp(k_static, primals, tangents):
    xs, k_arr = primals
    dxs = tangents[0]
    a, b = _pair(k_static, xs, k_arr)
    return (a, b), (_tie_mean(xs, a, dxs), _tie_mean(xs, b, dxs))


def _tie_mean(xs: Any, v: Any, dxs: Any) -> Any:
    """Mean of ``dxs`` over the entries equal to ``v`` (per row); 0 for infinite ``v``."""
    eq = xs == v
    count = jnp.sum(eq, axis=-1, keepdims=True, dtype=dxs.dtype)
    total = jnp.sum(jnp.where(eq, dxs, jnp.zeros_like(dxs)), axis=-1, keepdims=True)
    ok = jnp.isfinite(v) & (count > 0)
    return jnp.where(ok, total / jnp.where(ok, count, jnp.ones_like(count)), jnp.zeros_like(total))


def _compute_dtype(dtype: Any) -> Any:
    return _math.compute_dtype(jnp, dtype)


def _select(k_static: int | None, x: Any, k_arr: Any, valid: Any) -> tuple[Any, Any]:
    """``(a, b)`` of the valid entries of ``x`` (differentiable through :func:`_pair`)."""
    xs = x if valid is None else jnp.where(valid, x, jnp.asarray(-jnp.inf, dtype=x.dtype))
    return _pair(k_static, xs, k_arr)


def forward_math(output: str, x: Any, a: Any, b: Any, tau: Any, valid: Any) -> tuple[Any, Any]:
    """The forward after the selection: ``(out, residuals)``, ``out`` in x's dtype.

    The residuals are what :func:`tangent_math` needs; ``tau`` is None for 1.
    """
    cdt = _compute_dtype(x.dtype)
    xc = x.astype(cdt)
    a = a.astype(cdt)
    b = b.astype(cdt)
    t = 1.0 if tau is None else tau  # None: tau = 1, the division is skipped
    z = _math.logits(jnp, xc, a, b, t, valid)
    out = _math.sigmoid(jnp, z) if output == "probs" else z
    return out.astype(x.dtype), (xc, a, b, z, t, valid)


def tangent_math(output: str, res: Any, u: Any, dtau: Any) -> Any:
    """The closed-form JVP from :func:`forward_math`'s residuals (compute dtype).

    Linear in ``u`` (x's tangent, compute dtype) and ``dtau`` (None for 0);
    reverse mode is its transpose.
    """
    xc, a, b, z, t, valid = res
    return _math.jvp(jnp, xc, a, b, z, u, t, dtau, valid, output)


def backward_math(output: str, res: Any, g: Any) -> Any:
    """Reverse mode from the residuals: the transpose of :func:`tangent_math` in ``u``.

    What ``jax.vjp`` of :func:`topk_core.dftopk` runs after the forward (``tau``
    not differentiated); compute dtype.
    """
    u0 = jnp.zeros_like(res[0])
    _, pull = jax.vjp(lambda u: tangent_math(output, res, u, None), u0)
    return pull(g.astype(u0.dtype))[0]


def _forward(static: tuple, x: Any, tau: Any, k_arr: Any, valid: Any):
    """Primal output in x's dtype plus the residuals of :func:`forward_math`."""
    k_static, output = static
    a, b = _select(k_static, x, k_arr, valid)
    return forward_math(output, x, a, b, tau, valid)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _core(static: tuple, x: Any, tau: Any, k_arr: Any, valid: Any) -> Any:
    return _forward(static, x, tau, k_arr, valid)[0]


def _core_jvp(static, primals, tangents):
    x, tau, k_arr, valid = primals
    dx, dtau = tangents[0], tangents[1]
    out, res = _forward(static, x, tau, k_arr, valid)
    cdt = res[0].dtype
    u = jnp.zeros_like(res[0]) if isinstance(dx, SymbolicZero) else dx.astype(cdt)
    dt = None
    if tau is not None and not isinstance(dtau, SymbolicZero):
        dt = dtau.astype(cdt)
    if isinstance(dx, SymbolicZero) and dt is None:
        return out, jnp.zeros_like(out)
    d = tangent_math(static[1], res, u, dt)
    return out, d.astype(x.dtype)


_core.defjvp(_core_jvp, symbolic_zeros=True)


def apply(pb: Any, output: str) -> Any:
    """Differentiable DFTopK forward for a normalised :class:`topk_core._problem.Problem`.

    ``pb.x`` has the selection axis last (negated for ``largest=False``, with
    jnp ops, so JAX differentiates that part itself).  Works when ``pb.x``,
    ``pb.tau``, ``pb.k`` or ``pb.valid`` are tracers.  Returns ``p`` (or the
    logits for ``output="logits"``) in the normalised layout and x's dtype.

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
    return _core_jit((k_static, output), pb.x, tau, k_arr, pb.valid)


# compiled once per static signature and shape: eager calls run one program;
# under an outer transformation the jit is inlined and the custom rule applies
_core_jit = jax.jit(_core, static_argnums=0)
