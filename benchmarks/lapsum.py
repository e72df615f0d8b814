"""LapSum soft top-k (Struski et al., 2025), written from the paper's definition.

LapSum replaces the hard top-k indicator by a Laplace-CDF soft mask
``p_i = F((x_i - t) / alpha)`` with ``F(z) = e^z / 2`` for ``z <= 0`` and
``1 - e^{-z} / 2`` for ``z > 0``, and chooses ``t`` *exactly* so that
``sum_i p_i = k``.  ``S(t) = sum_i F((x_i - t) / alpha)`` is strictly
decreasing in ``t`` and, between two consecutive sorted scores, equals
``m - A e^{t/alpha} / 2 + B e^{-t/alpha} / 2`` (``m`` entries above ``t``,
``A = sum_{above} e^{-x_i/alpha}``, ``B = sum_{below} e^{x_i/alpha}``), so after
one sort the segment holding ``t`` is found from prefix log-sum-exps and ``t``
is the root of a quadratic.  Cost: one O(n log n) sort plus O(n) work.

Gradient (implicit function theorem on ``sum_i p_i = k``): with
``f_i = F'(z_i) / alpha = e^{-|z_i|} / (2 alpha)``,
``grad_x = f * g - f * sum(f * g) / sum(f)``, O(n) given ``t``.

This module is benchmark code: ``k`` is a Python int with ``0 < k < n`` and the
selection axis is last.  Implementations: an Array API one (NumPy, CuPy) with a
closed-form VJP, a ``torch.autograd.Function`` and a ``jax.custom_vjp`` that
both use the same closed-form gradient (cheaper than autodiff through the sort).
"""

from __future__ import annotations

from typing import Any

__all__ = ["lapsum_jax", "lapsum_threshold", "lapsum_torch", "lapsum_vjp", "lapsum"]


def _check(n: int, k: int, alpha: float) -> None:
    if not isinstance(k, int) or not 0 < k < n:
        raise ValueError(f"k must be an int with 0 < k < n = {n}, got {k!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")


def _take_last(xp: Any, v: Any, idx: Any) -> Any:
    return xp.take_along_axis(v, idx, axis=-1)


def lapsum_threshold(xp: Any, x: Any, k: int, alpha: float, logcumsumexp: Any) -> Any:
    """Exact LapSum threshold ``t`` per row, shape ``x.shape[:-1] + (1,)``.

    Parameters
    ----------
    xp : namespace
        Array API namespace of ``x``.
    x : array
        Scores, selection axis last.
    k : int
        Soft-mask sum, ``0 < k < n``.
    alpha : float
        Laplace scale (the temperature), > 0.
    logcumsumexp : callable
        ``logcumsumexp(v)`` along the last axis, from the array library.

    Returns
    -------
    array
        ``t`` such that ``sum_i F((x_i - t) / alpha) = k``.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> x = np.array([[3.0, 1.0, 2.0]])
    >>> t = lapsum_threshold(xp, x, 1, 1.0, _np_lcse)
    >>> round(float(_laplace_cdf(np, x - t).sum()), 6)
    1.0
    """
    from array_api_compat import device as device_of

    n = x.shape[-1]
    _check(n, k, alpha)
    dev = device_of(x)
    s = xp.sort(x, axis=-1, descending=True, stable=False) / alpha  # scaled, descending
    batch = tuple(s.shape[:-1])
    ninf = xp.full(batch + (1,), -xp.inf, dtype=s.dtype, device=dev)
    # LA[j] = log sum_{i<j} e^{-s_i}, j = 0..n;  LB[j] = log sum_{i>=j} e^{s_i}, j = 0..n
    la = xp.concat([ninf, logcumsumexp(-s)], axis=-1)
    lb = xp.concat([xp.flip(logcumsumexp(xp.flip(s, axis=-1)), axis=-1), ninf], axis=-1)
    # S at t = s_j: j entries above, the rest below (F = 1/2 at s_j from either side)
    j = xp.arange(n, dtype=s.dtype, device=dev)
    s_at = j - 0.5 * xp.exp(la[..., :n] + s) + 0.5 * xp.exp(lb[..., :n] - s)
    m = xp.sum(xp.astype(s_at < k, xp.int32), axis=-1, keepdims=True)  # t in [s_m, s_{m-1})
    # int64 indices where the library has them by default (torch requires it)
    idx = m if xp.asarray(0).dtype == xp.int32 else xp.astype(m, xp.int64)
    ref = _take_last(xp, s, xp.clip(idx, max=n - 1))
    a = xp.exp(_take_last(xp, la, idx) + ref)  # sum_{above} e^{-(s_i - ref)}
    b = xp.exp(_take_last(xp, lb, idx) - ref)  # sum_{below} e^{(s_i - ref)}
    d = xp.astype(m, s.dtype) - k
    disc = xp.sqrt(d * d + a * b)
    one = xp.asarray(1.0, dtype=s.dtype)
    # root of a v^2 - 2 d v - b = 0 (v = e^{t - ref}) without cancellation
    den_pos = xp.where(a > 0, a, one)
    den_neg = xp.where(disc - d > 0, disc - d, one)
    v = xp.where(d >= 0, (d + disc) / den_pos, b / den_neg)
    return (ref + xp.log(v)) * alpha


def _compat(xp: Any, x: Any) -> Any:
    # the Array API wrapper gives NumPy/CuPy ``sort(descending=)``, ``concat``, ...
    import array_api_compat

    return array_api_compat.array_namespace(x)


def _laplace_cdf(xp: Any, z: Any) -> Any:
    e = 0.5 * xp.exp(-xp.abs(z))
    return xp.where(z <= 0, e, 1 - e)


def _np_lcse(v: Any) -> Any:
    import numpy as np

    return np.logaddexp.accumulate(v, axis=-1)


def _shifted_lcse(xp: Any, v: Any, wide: Any) -> Any:
    """``log(cumsum(exp(v - max))) + max``, computed in ``wide`` (float64 where available).

    A plain cumsum is 5-50x faster than the libraries' ``logcumsumexp`` here
    (NumPy ``logaddexp.accumulate`` and JAX ``cumlogsumexp`` are sequential or
    O(n log n) on CPU), and exact as long as ``exp(v - max)`` does not
    underflow: callers check :func:`_range_ok` first.
    """
    w = xp.astype(v, wide)
    top = xp.max(w, axis=-1, keepdims=True)
    c = xp.cumulative_sum(xp.exp(w - top), axis=-1)
    return xp.astype(xp.log(c) + top, v.dtype)


def _range_limit(xp: Any, wide: Any) -> float:
    # exp(-limit) stays a normal number of the wide dtype, with margin
    return 600.0 if wide == xp.float64 else 60.0


def _range_ok(xp: Any, v: Any, limit: float) -> Any:
    return xp.all(xp.max(v, axis=-1) - xp.min(v, axis=-1) <= limit)


def _xp_lcse(xp: Any) -> Any:
    """Cumulative log-sum-exp for an Array API namespace (NumPy, CuPy)."""
    acc = getattr(getattr(xp, "logaddexp", None), "accumulate", None)

    def lcse(v: Any) -> Any:
        if bool(_range_ok(xp, v, _range_limit(xp, xp.float64))):
            return _shifted_lcse(xp, v, xp.float64)
        if acc is not None:
            return acc(v, axis=-1)
        raise ValueError(
            "LapSum: a row's range exceeds 600 * alpha and this library has no "
            "logaddexp.accumulate; increase alpha"
        )

    return lcse


def lapsum(xp: Any, x: Any, k: int, alpha: float = 1.0) -> Any:
    """LapSum soft top-k mask along the last axis (NumPy / CuPy / any Array API).

    Examples
    --------
    >>> import numpy as np
    >>> p = lapsum(np, np.array([4.0, 1.0, 3.0, 2.0]), 2, 0.5)
    >>> round(float(p.sum()), 6), bool(p[0] > p[2] > p[3] > p[1])
    (2.0, True)
    """
    xp = _compat(xp, x)
    t = lapsum_threshold(xp, x, k, alpha, _xp_lcse(xp))
    return _laplace_cdf(xp, (x - t) / alpha)


def _vjp_from_t(xp: Any, x: Any, t: Any, g: Any, alpha: float) -> Any:
    f = xp.exp(-xp.abs((x - t) / alpha)) * (0.5 / alpha)
    fg = f * g
    return fg - f * (xp.sum(fg, axis=-1, keepdims=True) / xp.sum(f, axis=-1, keepdims=True))


def lapsum_vjp(xp: Any, x: Any, k: int, g: Any, alpha: float = 1.0) -> Any:
    """Closed-form VJP of :func:`lapsum` (recomputes ``t``, like ``dftopk_vjp``).

    Examples
    --------
    >>> import numpy as np
    >>> gx = lapsum_vjp(np, np.array([4.0, 1.0, 3.0, 2.0]), 2, np.ones(4))
    >>> bool(np.allclose(gx, 0.0))  # the mask always sums to k
    True
    """
    xp = _compat(xp, x)
    t = lapsum_threshold(xp, x, k, alpha, _xp_lcse(xp))
    return _vjp_from_t(xp, x, t, g, alpha)


def lapsum_torch(x: Any, k: int, alpha: float = 1.0) -> Any:
    """LapSum on torch tensors with the closed-form gradient (autograd.Function).

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([4.0, 1.0, 3.0, 2.0], requires_grad=True)
    >>> lapsum_torch(x, 2).sum().backward()
    >>> bool(torch.allclose(x.grad, torch.zeros(4), atol=1e-6))
    True
    """
    import torch

    fn = _torch_function()
    _check(x.shape[-1], k, alpha)
    return fn.apply(x, k, float(alpha)) if torch.is_grad_enabled() else fn.forward(x, k, alpha)


_TORCH_FN: Any = None


def _torch_function() -> Any:
    global _TORCH_FN
    if _TORCH_FN is not None:
        return _TORCH_FN
    import array_api_compat.torch as xp
    import torch

    def _torch_lcse(v):
        if bool(_range_ok(xp, v, _range_limit(xp, xp.float64))):  # host sync: benchmark code
            return _shifted_lcse(xp, v, xp.float64)
        return torch.logcumsumexp(v, dim=-1)

    class LapSum(torch.autograd.Function):
        @staticmethod
        def forward(x, k, alpha):
            with torch.no_grad():
                t = lapsum_threshold(xp, x, k, alpha, _torch_lcse)
                return _laplace_cdf(xp, (x - t) / alpha), t

        @staticmethod
        def setup_context(ctx, inputs, output):
            x, _, alpha = inputs
            _, t = output
            ctx.save_for_backward(x, t)
            ctx.alpha = alpha
            ctx.mark_non_differentiable(t)

        @staticmethod
        def backward(ctx, g, _gt):
            x, t = ctx.saved_tensors
            return _vjp_from_t(xp, x, t, g, ctx.alpha), None, None

    class _Wrapper:
        @staticmethod
        def apply(x, k, alpha):
            return LapSum.apply(x, k, alpha)[0]

        @staticmethod
        def forward(x, k, alpha):
            return LapSum.forward(x, k, alpha)[0]

    _TORCH_FN = _Wrapper
    return _TORCH_FN


def lapsum_jax(x: Any, k: int, alpha: float = 1.0) -> Any:
    """LapSum on JAX arrays with the closed-form gradient (``jax.custom_vjp``).

    ``k`` and ``alpha`` are static; wrap the caller in ``jax.jit``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> g = jax.grad(lambda x: lapsum_jax(x, 2).sum())(jnp.array([4.0, 1.0, 3.0, 2.0]))
    >>> bool(jnp.allclose(g, 0.0, atol=1e-6))
    True
    """
    _check(x.shape[-1], k, alpha)
    return _jax_function()(x, k, float(alpha))


_JAX_FN: Any = None


def _jax_function() -> Any:
    global _JAX_FN
    if _JAX_FN is not None:
        return _JAX_FN
    from functools import partial

    import jax
    import jax.numpy as jnp

    def lcse(v):
        wide = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        # run-time branch: the fast shifted cumsum unless a row's range would underflow it
        return jax.lax.cond(
            _range_ok(jnp, v, _range_limit(jnp, wide)),
            lambda u: _shifted_lcse(jnp, u, wide),
            lambda u: jax.lax.cumlogsumexp(u, axis=u.ndim - 1),
            v,
        )

    def thr(x, k, alpha):
        return lapsum_threshold(jnp, x, k, alpha, lcse)

    @partial(jax.custom_vjp, nondiff_argnums=(1, 2))
    def f(x, k, alpha):
        return _laplace_cdf(jnp, (x - thr(x, k, alpha)) / alpha)

    def fwd(x, k, alpha):
        t = thr(x, k, alpha)
        return _laplace_cdf(jnp, (x - t) / alpha), (x, t)

    def bwd(k, alpha, res, g):
        x, t = res
        return (_vjp_from_t(jnp, x, t, g, alpha),)

    f.defvjp(fwd, bwd)
    _JAX_FN = f
    return f
