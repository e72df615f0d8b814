"""Public API: DFTopK forward, threshold, hard mask, VJP and JVP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from . import _math
from ._problem import Problem, normalise_like_tau, prepare, reduce_to_tau

Array = Any
Output = Literal["probs", "logits"]

__all__ = [
    "dftopk",
    "dftopk_and_vjp",
    "dftopk_jvp",
    "dftopk_logits",
    "dftopk_vjp",
    "topk_mask",
    "topk_threshold",
]


def select(pb: Problem) -> tuple[Array, Array]:
    """``(a, b)``: k-th and (k+1)-th largest valid values per row, shape ``(..., 1)``."""
    xp = pb.xp
    x = pb.x
    if pb.valid is not None:
        x = xp.where(pb.valid, x, xp.asarray(-xp.inf, dtype=x.dtype))
    select_pair = pb.backend.select_pair
    if select_pair is None:
        from .backends.generic import select_pair
    return select_pair(xp, x, pb.k)


def forward(pb: Problem, output: Output) -> Array:
    """Forward in the normalised layout, in x's dtype (no autodiff hooks)."""
    a, b = select(pb)
    out, _ = soft_forward(pb, a, b, output, keep=False)
    return pb.xp.astype(out, pb.dtype, copy=False)


def soft_forward(
    pb: Problem, a: Array, b: Array, output: Output, *, keep: bool, out: bool = True
) -> tuple[Array | None, Any]:
    """The math after the selection: ``(out, residuals)`` in the compute dtype.

    ``out`` is ``p`` (``z`` for logits), or None when not ``out``; the
    residuals are what :func:`soft_backward` needs (None unless ``keep``) and
    never share memory with ``out``.  A backend's ``soft`` hook replaces the
    generic Array API code (:func:`topk_core._math.soft_forward`).
    """
    soft = pb.backend.soft
    if soft is not None:
        return soft.forward(pb, a, b, output, keep=keep, out=out)
    xp = pb.xp
    cdt = pb.compute_dtype
    x = xp.astype(pb.x, cdt, copy=False)
    res = _math.soft_forward(
        xp,
        x,
        xp.astype(a, cdt),
        xp.astype(b, cdt),
        pb.tau,
        pb.valid,
        output,
        keep=keep,
        eager=pb.backend.eager,
        native_sigmoid=pb.backend.sigmoid,
    )
    return (res[0] if out else None), res[1]


def soft_backward(pb: Problem, res: Any, g: Array) -> tuple[Array, Array]:
    """Closed-form VJP from :func:`soft_forward`'s residuals, normalised layout.

    ``g`` is the cotangent laid out like ``pb.x`` in the compute dtype.  Returns
    ``(grad_x, t)``: the gradient with respect to the *user's* ``x`` (the sign
    of ``largest=False`` applied), compute dtype, and the tau gradient in any
    form :func:`topk_core._problem.reduce_to_tau` accepts (elementwise, or
    already summed over tau's broadcast axes).
    """
    soft = pb.backend.soft
    if soft is not None:
        return soft.backward(pb, res, g)
    grad_x, t = _math.soft_backward(pb.xp, res, g, pb.tau, pb.valid)
    if not pb.largest:
        grad_x = -grad_x
    return grad_x, t


def _sigmoid(pb: Problem, z: Array) -> Array:
    sig = pb.backend.sigmoid
    return sig(z) if sig is not None else _math.sigmoid(pb.xp, z)


def _soft_problem(x, k, tau, axis, mask, largest, output) -> tuple[Problem, Array, Array]:
    _check_output(output)
    pb = prepare(x, k, tau, axis, mask, largest)
    a, b = select(pb)
    return pb, a, b


def _check_output(output: Any) -> None:
    if output not in ("probs", "logits"):
        raise ValueError(f"output must be 'probs' or 'logits', got {output!r}")


def _run(x, k, tau, axis, mask, largest, output: Output) -> Array:
    pb = prepare(x, k, tau, axis, mask, largest)
    apply = pb.backend.apply
    out = apply(pb, output) if apply is not None else forward(pb, output)
    return pb.restore(out)


def dftopk(
    x: Array,
    k: int | Array,
    *,
    tau: float | Array = 1.0,
    axis: int = -1,
    mask: Array | None = None,
    largest: bool = True,
) -> Array:
    """Differentiable top-k membership probabilities (DFTopK).

    ``p = sigmoid((x - theta) / tau)`` with ``theta`` halfway between the k-th
    and (k+1)-th largest valid entries along ``axis``.  O(n): one selection and
    elementwise work, no sort.

    Parameters
    ----------
    x : array
        Scores, real floating dtype, at least 1-d, from any library that
        ``array_api_compat`` recognises (NumPy, CuPy, PyTorch, JAX,
        array-api-strict, ...).
    k : int or integer array
        How many entries to select.  A Python int in ``[0, n]``, or an integer
        array broadcastable to the batch shape (``x.shape`` without ``axis``)
        for a per-row k; array values are clipped to ``[0, n_valid]``.
    tau : float or array, default 1.0
        Temperature > 0.  An array broadcastable to ``x`` (keep ``axis`` with
        size 1 for a per-row temperature).
    axis : int, default -1
        Axis along which to select.
    mask : bool array, optional
        Valid entries (True).  Masked-out entries get ``p = 0`` and never
        influence the threshold.
    largest : bool, default True
        Select the k largest (True) or the k smallest (False).

    Returns
    -------
    array
        ``p`` in ``[0, 1]``, same library, device, shape and dtype as ``x``.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core import dftopk
    >>> p = dftopk(np.array([4.0, 1.0, 3.0, 2.0]), 2, tau=0.5)
    >>> np.round(p, 3)
    array([0.953, 0.047, 0.731, 0.269])
    """
    return _run(x, k, tau, axis, mask, largest, "probs")


def dftopk_logits(
    x: Array,
    k: int | Array,
    *,
    tau: float | Array = 1.0,
    axis: int = -1,
    mask: Array | None = None,
    largest: bool = True,
) -> Array:
    """DFTopK logits ``z = (x - theta) / tau`` (``dftopk`` is ``sigmoid(z)``).

    Feed these to a BCE-with-logits loss instead of ``log(dftopk(...))``.
    Masked-out entries are ``-inf``.  Parameters as in :func:`dftopk`.

    Returns
    -------
    array
        ``z``, same library, device, shape and dtype as ``x``.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core import dftopk_logits
    >>> dftopk_logits(np.array([4.0, 1.0, 3.0, 2.0]), 2, tau=0.5)
    array([ 3., -3.,  1., -1.])
    """
    return _run(x, k, tau, axis, mask, largest, "logits")


def topk_threshold(
    x: Array,
    k: int | Array,
    *,
    axis: int = -1,
    mask: Array | None = None,
    largest: bool = True,
) -> Array:
    """Threshold ``theta = a/2 + b/2`` between the k-th and (k+1)-th largest.

    For ``largest=False``, the threshold between the k-th and (k+1)-th
    smallest.  ``k = 0`` gives ``+inf`` (``-inf`` for ``largest=False``),
    ``k = n_valid`` gives ``-inf`` (``+inf``); a row with no valid entry gives 0.

    Returns
    -------
    array
        ``theta`` with ``axis`` kept (size 1), x's dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core import topk_threshold
    >>> topk_threshold(np.array([[4.0, 1.0, 3.0, 2.0]]), 2)
    array([[2.5]])
    """
    pb = prepare(x, k, None, axis, mask, largest, need_tau=False)
    xp = pb.xp
    a, b = select(pb)
    theta = _math.threshold(xp, a, b)
    if not largest:
        theta = -theta
    return pb.restore(theta)


def topk_mask(
    x: Array,
    k: int | Array,
    *,
    axis: int = -1,
    mask: Array | None = None,
    largest: bool = True,
) -> Array:
    """Hard top-k indicator: exactly ``min(k, n_valid)`` ones per row.

    Ties at the k-th value are broken by lower index first, so the result is
    deterministic on every backend.  Not differentiable; use it for labels.

    Returns
    -------
    array
        0/1 values in x's dtype and shape.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core import topk_mask
    >>> topk_mask(np.array([1.0, 3.0, 3.0, 2.0]), 1)
    array([0., 1., 0., 0.])
    """
    pb = prepare(x, k, None, axis, mask, largest, need_tau=False)
    xp = pb.xp
    a, _ = select(pb)
    xn = pb.x
    gt = xn > a
    eq = xn == a
    if pb.valid is not None:
        gt = gt & pb.valid
        eq = eq & pb.valid
    n_gt = xp.sum(xp.astype(gt, xp.int32), axis=-1, keepdims=True)
    rank = xp.cumulative_sum(xp.astype(eq, xp.int32), axis=-1)
    k = pb.k
    need = (k if isinstance(k, int) else xp.astype(k, xp.int32)) - n_gt
    sel = gt | (eq & (rank <= need))
    return pb.restore(xp.astype(sel, pb.dtype))


def _tangent_problem(x, k, tau, axis, mask, largest, output) -> tuple[Problem, Array, Array, Array]:
    _check_output(output)
    pb = prepare(x, k, tau, axis, mask, largest)
    xp = pb.xp
    cdt = pb.compute_dtype
    a, b = select(pb)
    a = xp.astype(a, cdt)
    b = xp.astype(b, cdt)
    xc = xp.astype(pb.x, cdt, copy=False)
    z = _math.logits(xp, xc, a, b, pb.tau, pb.valid, eager=pb.backend.eager)
    return pb, xc, a, b, z


def dftopk_vjp(
    x: Array,
    k: int | Array,
    cotangent: Array,
    *,
    tau: float | Array = 1.0,
    axis: int = -1,
    mask: Array | None = None,
    largest: bool = True,
    output: Output = "probs",
) -> tuple[Array, Array]:
    """Closed-form vector-Jacobian product of :func:`dftopk` (O(n), no autodiff).

    ``grad_x = s - sum(s) * w`` with ``s = g p (1 - p) / tau`` and ``w`` the
    threshold's weights: 1/2 on the entries equal to the k-th largest value and
    1/2 on those equal to the (k+1)-th, each split evenly among ties.

    Parameters
    ----------
    x, k, tau, axis, mask, largest
        As in :func:`dftopk`.
    cotangent : array
        ``g``, the gradient of a scalar loss with respect to the output; x's shape.
    output : {"probs", "logits"}, default "probs"
        Differentiate :func:`dftopk` or :func:`dftopk_logits`.

    Returns
    -------
    grad_x : array
        x's shape and dtype; exactly 0 at masked-out entries.
    grad_tau : array
        Gradient with respect to ``tau``, reduced to tau's shape (0-d for a float).

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core import dftopk_vjp
    >>> gx, gtau = dftopk_vjp(np.array([4.0, 1.0, 3.0, 2.0]), 2, np.array([1.0, 0, 0, 0]))
    >>> np.round(gx, 4)
    array([ 0.1491,  0.    , -0.0746, -0.0746])
    """
    pb, a, b = _soft_problem(x, k, tau, axis, mask, largest, output)
    g = pb.in_layout(cotangent, "cotangent")
    _, res = soft_forward(pb, a, b, output, keep=True, out=False)
    return _vjp(pb, res, g, tau)


def _vjp(pb: Problem, res: Any, g: Array, tau: Any) -> tuple[Array, Array]:
    xp = pb.xp
    grad_x, t = soft_backward(pb, res, g)
    grad_x = pb.restore(xp.astype(grad_x, pb.dtype, copy=False))
    tau_dtype = pb.dtype if pb.tau_shape is None else tau.dtype
    return grad_x, reduce_to_tau(pb, t, tau_dtype)


def dftopk_and_vjp(
    x: Array,
    k: int | Array,
    *,
    tau: float | Array = 1.0,
    axis: int = -1,
    mask: Array | None = None,
    largest: bool = True,
    output: Output = "probs",
) -> tuple[Array, Callable[[Array], tuple[Array, Array]]]:
    """Forward and a VJP function sharing one selection (like ``jax.vjp``).

    For libraries without autodiff (NumPy, CuPy): ``dftopk`` followed by
    ``dftopk_vjp`` selects twice; this selects once and keeps ``x``, the
    per-row ``a``/``b`` and the logits for the backward pass.

    Parameters
    ----------
    x, k, tau, axis, mask, largest
        As in :func:`dftopk`.
    output : {"probs", "logits"}, default "probs"
        Return (and differentiate) :func:`dftopk` or :func:`dftopk_logits`.

    Returns
    -------
    out : array
        ``p`` (or ``z``), as :func:`dftopk` (or :func:`dftopk_logits`) returns it.
    vjp : callable
        ``vjp(cotangent) -> (grad_x, grad_tau)``, as :func:`dftopk_vjp` returns them.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core import dftopk_and_vjp
    >>> p, vjp = dftopk_and_vjp(np.array([4.0, 1.0, 3.0, 2.0]), 2)
    >>> grad_x, grad_tau = vjp(np.array([1.0, 0, 0, 0]))
    >>> np.round(grad_x, 4)
    array([ 0.1491,  0.    , -0.0746, -0.0746])
    """
    pb, a, b = _soft_problem(x, k, tau, axis, mask, largest, output)
    out, res = soft_forward(pb, a, b, output, keep=True)
    out = pb.restore(pb.xp.astype(out, pb.dtype, copy=False))

    def vjp(cotangent: Array) -> tuple[Array, Array]:
        return _vjp(pb, res, pb.in_layout(cotangent, "cotangent"), tau)

    return out, vjp


def dftopk_jvp(
    x: Array,
    k: int | Array,
    tangent: Array,
    *,
    tau: float | Array = 1.0,
    tau_tangent: float | Array | None = None,
    axis: int = -1,
    mask: Array | None = None,
    largest: bool = True,
    output: Output = "probs",
) -> tuple[Array, Array]:
    """Closed-form Jacobian-vector product of :func:`dftopk` (O(n), no autodiff).

    Parameters
    ----------
    x, k, tau, axis, mask, largest
        As in :func:`dftopk`.
    tangent : array
        ``u``, the perturbation of ``x``; x's shape.
    tau_tangent : float or array, optional
        Perturbation of ``tau`` (tau's shape).  None means 0.
    output : {"probs", "logits"}, default "probs"
        Differentiate :func:`dftopk` or :func:`dftopk_logits`.

    Returns
    -------
    out : array
        The primal output (``p``, or ``z`` for logits).
    d_out : array
        Its directional derivative, x's shape and dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core import dftopk_jvp
    >>> p, dp = dftopk_jvp(np.array([4.0, 1.0, 3.0, 2.0]), 2, np.array([1.0, 0, 0, 0]))
    >>> np.round(dp, 4)
    array([0.1491, 0.    , 0.    , 0.    ])
    """
    pb, xc, a, b, z = _tangent_problem(x, k, tau, axis, mask, largest, output)
    xp = pb.xp
    u = pb.in_layout(tangent, "tangent")
    if not largest:
        u = -u
    dtau = None
    if tau_tangent is not None:
        dtau = _tau_tangent(pb, tau_tangent)
    d = _math.jvp(xp, xc, a, b, z, u, pb.tau, dtau, pb.valid, output)
    out = z if output == "logits" else _sigmoid(pb, z)
    return (
        pb.restore(xp.astype(out, pb.dtype)),
        pb.restore(xp.astype(d, pb.dtype)),
    )


def _tau_tangent(pb: Problem, tau_tangent: Any) -> Any:
    import numbers

    from ._problem import _check_same_library, _is_bool

    if _is_bool(tau_tangent):
        raise TypeError("tau_tangent must be a float or an array of tau's shape, got bool")
    if isinstance(tau_tangent, numbers.Real):
        return float(tau_tangent)
    _check_same_library(tau_tangent, "tau_tangent", pb)
    expected = pb.tau_shape if pb.tau_shape is not None else ()
    if tuple(tau_tangent.shape) != expected:
        raise ValueError(
            f"tau_tangent must have tau's shape {expected}, got {tuple(tau_tangent.shape)}"
        )
    if not pb.xp.isdtype(tau_tangent.dtype, "real floating"):
        raise TypeError(f"tau_tangent must have a real floating dtype, got {tau_tangent.dtype}")
    return normalise_like_tau(pb, tau_tangent, expected, pb.compute_dtype)
