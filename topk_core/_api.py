"""Public API: DFTopK forward, threshold, hard mask, VJP and JVP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import array_api_compat

from . import _math
from ._problem import Problem, host_values, normalise_like_tau, prepare, reduce_to_tau
from ._registry import under_errstate

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


def select(pb: Problem, candidates: bool = False) -> tuple[Array, Array]:
    """``(a, b)``: k-th and (k+1)-th largest valid values per row, shape ``(..., 1)``.

    ``candidates``: a backward will follow; where the backend has
    ``select_candidates``, the tie candidates it finds go to ``pb.candidates``.
    """
    xp = pb.xp
    x = _math.selection_scores(xp, pb.x, pb.valid)
    if candidates and pb.group is None and pb.backend.select_candidates is not None:
        a, b, pb.candidates = pb.backend.select_candidates(xp, x, pb.k)
        return a, b
    select_pair = pb.backend.select_pair if pb.group is None else pb.group.select_pair
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
    soft = _soft_hook(pb)
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
    soft = _soft_hook(pb, g)
    if soft is not None:
        return soft.backward(pb, res, g)
    grad_x, t = _math.soft_backward(pb.xp, res, g, pb.tau, pb.valid, row_sum=pb.row_sum)
    if not pb.largest:
        grad_x = -grad_x
    return grad_x, t


def _soft_hook(pb: Problem, *arrays: Array) -> Any:
    # a backend's fused math sums locally: a sharded axis takes the generic code's hooks
    soft = pb.backend.soft if pb.group is None else None
    applies = getattr(soft, "applies", None)
    if applies is not None and not applies(pb, *arrays):
        return None
    return soft


def hard_forward(pb: Problem) -> Array:
    """Hard top-k mask in the normalised layout, x's dtype (``topk_mask``'s values)."""
    if pb.group is None and pb.backend.hard_mask is not None:
        return pb.backend.hard_mask(pb)
    a, _ = select(pb)
    return _hard_mask(pb, pb.x, a, dtype=pb.dtype)


def _hard_mask(pb: Problem, x: Array, a: Array, dtype: Any = None) -> Array:
    # the fast path's branch: on the host where values are free to read, else the
    # library's traced cond (or none: the ranked mask); a group's counts are collectives
    cond = None
    if pb.group is None:
        free = host_values(pb.backend, x) is not None
        cond = _math.eager_cond if free else pb.backend.cond
    return _math.hard_mask(pb.xp, x, a, pb.valid, pb.k, cond=cond, group=pb.group, dtype=dtype)


def _sigmoid(pb: Problem, z: Array) -> Array:
    sig = pb.backend.sigmoid
    return sig(z) if sig is not None else _math.sigmoid(pb.xp, z)


def _soft_problem(x, k, tau, axis, mask, largest, output, group) -> tuple[Problem, Array, Array]:
    _check_output(output)
    pb = prepare(x, k, tau, axis, mask, largest, group=group)
    a, b = select(pb, candidates=True)
    return pb, a, b


def _check_output(output: Any) -> None:
    if output not in ("probs", "logits"):
        raise ValueError(f"output must be 'probs' or 'logits', got {output!r}")


def _check_hard(hard: Any, output: Any) -> None:
    if not isinstance(hard, bool):
        raise TypeError(f"hard must be a bool, got {type(hard).__name__} {hard!r}")
    if hard and output == "logits":
        raise ValueError(
            "hard=True needs output='probs': the hard forward is the 0/1 top-k mask, "
            "which replaces p; there are no hard logits"
        )


def _run(
    x, k, tau, axis, mask, largest, output: Output, group, hard: bool = False, names=None
) -> Array:
    pb = prepare(x, k, tau, axis, mask, largest, group=group, names=names)
    apply = pb.backend.apply if pb.group is None else pb.group.apply
    if hard:
        # straight-through: the mask forward, the soft p's gradient (where autodiff exists)
        out = apply(pb, output, hard=True) if apply is not None else hard_forward(pb)
    else:
        out = apply(pb, output) if apply is not None else forward(pb, output)
    return pb.restore(out)


@under_errstate
def dftopk(
    x: Array,
    k: int | Array,
    *,
    tau: float | Array = 1.0,
    axis: int = -1,
    mask: Array | None = None,
    largest: bool = True,
    group: Any = None,
    hard: bool = False,
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
    hard : bool, default False
        Straight-through: return the hard top-k mask (:func:`topk_mask`'s
        values: ``min(k, n_valid)`` ones per row, ties by lower index) while
        autodiff frameworks (PyTorch, JAX) differentiate it as the soft ``p``
        at the same ``x``, ``k``, ``tau``.  Forward and backward share one
        selection.  Without autodiff (NumPy, CuPy) use :func:`dftopk_vjp` or
        :func:`dftopk_and_vjp` with ``hard=True``.
    group : optional
        Scale-out: ``x`` is one shard of a longer selection axis split across
        ``group``, in member order; ``k`` counts over the whole axis and the
        result is this shard's slice of the global one.  A JAX mesh axis name
        (str or tuple of str, as in ``jax.lax.psum``) inside ``shard_map``, or
        a ``torch.distributed`` ProcessGroup (``torch.distributed.group.WORLD``)
        for torch tensors.  Communication per call: a few per-row histograms,
        independent of the axis length.  (Dask arrays need none: their chunks
        are the shards.)

    Returns
    -------
    array
        ``p`` in ``[0, 1]`` (the 0/1 mask for ``hard=True``), same library,
        device, shape and dtype as ``x``.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core import dftopk
    >>> p = dftopk(np.array([4.0, 1.0, 3.0, 2.0]), 2, tau=0.5)
    >>> np.round(p, 3)
    array([0.953, 0.047, 0.731, 0.269])
    >>> dftopk(np.array([4.0, 1.0, 3.0, 3.0]), 2, tau=0.5, hard=True)
    array([1., 0., 1., 0.])
    """
    _check_hard(hard, "probs")
    return _run(x, k, tau, axis, mask, largest, "probs", group, hard)


@under_errstate
def dftopk_logits(
    x: Array,
    k: int | Array,
    *,
    tau: float | Array = 1.0,
    axis: int = -1,
    mask: Array | None = None,
    largest: bool = True,
    group: Any = None,
) -> Array:
    """DFTopK logits ``z = (x - theta) / tau`` (``dftopk`` is ``sigmoid(z)``).

    Feed these to a BCE-with-logits loss instead of ``log(dftopk(...))``.
    Masked-out entries are ``-inf``.  Parameters (``group`` too) as in :func:`dftopk`.

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
    return _run(x, k, tau, axis, mask, largest, "logits", group)


@under_errstate
def topk_threshold(
    x: Array,
    k: int | Array,
    *,
    axis: int = -1,
    mask: Array | None = None,
    largest: bool = True,
    group: Any = None,
) -> Array:
    """Threshold ``theta = a/2 + b/2`` between the k-th and (k+1)-th largest.

    For ``largest=False``, the threshold between the k-th and (k+1)-th
    smallest.  ``k = 0`` gives ``+inf`` (``-inf`` for ``largest=False``),
    ``k = n_valid`` gives ``-inf`` (``+inf``); a row with no valid entry gives 0.
    Parameters (``group`` too) as in :func:`dftopk`; with a group every shard
    gets the same (global) threshold.

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
    pb = prepare(x, k, None, axis, mask, largest, need_tau=False, group=group)
    xp = pb.xp
    a, b = select(pb)
    # half types: in float32, rounded once (a/2 in float16 loses a bit below its normal range)
    cdt = pb.compute_dtype
    theta = _math.threshold(xp, xp.astype(a, cdt, copy=False), xp.astype(b, cdt, copy=False))
    theta = xp.astype(theta, a.dtype, copy=False)
    if not largest:
        theta = -theta
    return pb.restore(theta)


@under_errstate
def topk_mask(
    x: Array,
    k: int | Array,
    *,
    axis: int = -1,
    mask: Array | None = None,
    largest: bool = True,
    group: Any = None,
) -> Array:
    """Hard top-k indicator: exactly ``min(k, n_valid)`` ones per row.

    Ties at the k-th value are broken by lower index first, so the result is
    deterministic on every backend.  NaN ranks above ``+inf``.  Not
    differentiable; use it for labels (or ``dftopk(..., hard=True)`` for a
    straight-through forward).
    Parameters (``group`` too) as in :func:`dftopk`; with a group, "lower
    index" is the global one: earlier members' shards come first.

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
    return _mask(x, k, axis, mask, largest, group)


def _mask(x, k, axis, mask, largest, group, names=None) -> Array:
    pb = prepare(x, k, None, axis, mask, largest, need_tau=False, group=group, names=names)
    return pb.restore(hard_forward(pb))


def named_logits(x: Array, k: Any, tau: Any, axis: int, mask: Any, names: Any) -> Array:
    """:func:`dftopk_logits` whose errors call ``x``/``k``/``tau`` by ``names``.

    For callers with their own argument names (the losses: ``{"x": "scores"}``).
    """
    return _run(x, k, tau, axis, mask, True, "logits", None, names=names)


def named_topk_mask(x: Array, k: Any, axis: int, mask: Any, names: Any) -> Array:
    """:func:`topk_mask` whose errors call ``x``/``k`` by ``names``."""
    return _mask(x, k, axis, mask, True, None, names)


def _tangent_inputs(pb: Problem) -> tuple[Array, Array, Array, Array]:
    """``(x, a, b, z)`` in the compute dtype, for the generic JVP."""
    xp = pb.xp
    cdt = pb.compute_dtype
    a, b = select(pb)
    a = xp.astype(a, cdt)
    b = xp.astype(b, cdt)
    xc = xp.astype(pb.x, cdt, copy=False)
    z = _math.logits(xp, xc, a, b, pb.tau, pb.valid, eager=pb.backend.eager)
    return xc, a, b, z


@under_errstate
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
    group: Any = None,
    hard: bool = False,
) -> tuple[Array, Array]:
    """Closed-form vector-Jacobian product of :func:`dftopk` (O(n), no autodiff).

    ``grad_x = s - sum(s) * w`` with ``s = g p (1 - p) / tau`` and ``w`` the
    threshold's weights: 1/2 on the entries equal to the k-th largest value and
    1/2 on those equal to the (k+1)-th, each split evenly among ties.

    Parameters
    ----------
    x, k, tau, axis, mask, largest, group
        As in :func:`dftopk`.
    cotangent : array
        ``g``, the gradient of a scalar loss with respect to the output; x's shape,
        any real floating dtype (the math runs in x's compute dtype, so a float64
        ``g`` for float32 ``x`` is rounded to float32).
    output : {"probs", "logits"}, default "probs"
        Differentiate :func:`dftopk` or :func:`dftopk_logits`.
    hard : bool, default False
        The VJP of ``dftopk(..., hard=True)``: the same gradient, that of the
        soft ``p`` (straight-through).  Only with ``output="probs"``.

    Returns
    -------
    grad_x : array
        x's shape and dtype; exactly 0 at masked-out entries.
    grad_tau : array
        Gradient with respect to ``tau``, reduced to tau's shape (0-d for a float).
        With a group: this shard's contribution (sum it over the group, e.g.
        with ``psum``/``all_reduce``, for a ``tau`` shared by the shards).

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core import dftopk_vjp
    >>> gx, gtau = dftopk_vjp(np.array([4.0, 1.0, 3.0, 2.0]), 2, np.array([1.0, 0, 0, 0]))
    >>> np.round(gx, 4)
    array([ 0.1491,  0.    , -0.0746, -0.0746])
    """
    _check_hard(hard, output)
    pb, a, b = _soft_problem(x, k, tau, axis, mask, largest, output, group)
    g = pb.in_layout(cotangent, "cotangent")
    _, res = soft_forward(pb, a, b, output, keep=True, out=False)
    return _vjp(pb, res, g, tau)


def _vjp(pb: Problem, res: Any, g: Array, tau: Any) -> tuple[Array, Array]:
    xp = pb.xp
    grad_x, t = soft_backward(pb, res, g)
    grad_x = pb.restore(xp.astype(grad_x, pb.dtype, copy=False))
    tau_dtype = pb.dtype if pb.tau_shape is None else tau.dtype
    return grad_x, reduce_to_tau(pb, t, tau_dtype)


@under_errstate
def dftopk_and_vjp(
    x: Array,
    k: int | Array,
    *,
    tau: float | Array = 1.0,
    axis: int = -1,
    mask: Array | None = None,
    largest: bool = True,
    output: Output = "probs",
    group: Any = None,
    hard: bool = False,
) -> tuple[Array, Callable[[Array], tuple[Array, Array]]]:
    """Forward and a VJP function sharing one selection (like ``jax.vjp``).

    For libraries without autodiff (NumPy, CuPy): ``dftopk`` followed by
    ``dftopk_vjp`` selects twice; this selects once and keeps what the
    backward needs: the per-row ``a``/``b``, the logits and ``p (1 - p)`` (or
    ``p``), and ``x`` itself or the few values of it that the backward reads.

    Parameters
    ----------
    x, k, tau, axis, mask, largest, group
        As in :func:`dftopk`.
    output : {"probs", "logits"}, default "probs"
        Return (and differentiate) :func:`dftopk` or :func:`dftopk_logits`.
    hard : bool, default False
        Straight-through: return the hard top-k mask (as ``dftopk(...,
        hard=True)``) from the same selection; ``vjp`` stays the soft ``p``'s.
        Only with ``output="probs"``.

    Returns
    -------
    out : array
        ``p`` (or ``z``, or the mask), as :func:`dftopk` (or :func:`dftopk_logits`)
        returns it.
    vjp : callable
        ``vjp(cotangent) -> (grad_x, grad_tau)``, as :func:`dftopk_vjp` returns them,
        at the ``x``, mask and ``tau`` of this call, whatever happens to them
        later where the library's arrays can change in place: NumPy keeps the
        few values of ``x`` it needs (and a copy of an array ``tau``), other
        libraries keep copies (JAX arrays cannot change; Dask's ``copy`` is a
        new array object over the same graph, which ``x[...] = v`` on the
        caller's array leaves alone).

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core import dftopk_and_vjp
    >>> p, vjp = dftopk_and_vjp(np.array([4.0, 1.0, 3.0, 2.0]), 2)
    >>> grad_x, grad_tau = vjp(np.array([1.0, 0, 0, 0]))
    >>> np.round(grad_x, 4)
    array([ 0.1491,  0.    , -0.0746, -0.0746])
    >>> m, vjp = dftopk_and_vjp(np.array([4.0, 1.0, 3.0, 2.0]), 2, hard=True)
    >>> m
    array([1., 0., 1., 0.])
    >>> np.round(vjp(np.array([1.0, 0, 0, 0]))[0], 4)
    array([ 0.1491,  0.    , -0.0746, -0.0746])
    """
    _check_hard(hard, output)
    pb, a, b = _soft_problem(x, k, tau, axis, mask, largest, output, group)
    _keep_inputs(pb)
    # straight-through: the hard mask from the same selection, the soft residuals
    out, res = soft_forward(pb, a, b, output, keep=True, out=not hard)
    if hard:
        out = _hard_mask(pb, pb.x, a)
    out = pb.restore(pb.xp.astype(out, pb.dtype, copy=False))

    @under_errstate
    def vjp(cotangent: Array) -> tuple[Array, Array]:
        return _vjp(pb, res, pb.in_layout(cotangent, "cotangent"), tau)

    return out, vjp


def _keep_inputs(pb: Problem) -> None:
    """Make the residuals immune to in-place changes of the caller's arrays.

    A ``vjp`` that runs later must see this call's ``x``, mask and ``tau``,
    which the residuals may reference (``pb.x`` can be a view of the caller's
    ``x``): an in-place change in between (``x += 1``) silently changed the
    gradient.  JAX arrays cannot change in place: nothing to do.  Dask arrays
    can (``x[...] = v`` rebinds the object to a new graph, so residuals that
    reference the caller's object would follow it); their copies below are new
    objects over the same graph (one copy task for a single-chunk array).  A
    ``soft`` hook that owns its residuals (NumPy's) needs only an array
    ``tau`` copied; otherwise ``x`` and the mask are copied too (one pass over
    ``x``), except ``x`` where the forward keeps it cast to a wider compute
    dtype (float16, bfloat16), as the generic code and every hook without
    ``owns_residuals`` do: that cast is already a copy.  Copies,
    not torch's version counters: those miss changes through ``.data`` or
    memory shared with NumPy, and checking them breaks
    ``torch.compile(fullgraph=True)``.
    """
    if array_api_compat.is_jax_array(pb.x):
        return
    xp = pb.xp
    hook = _soft_hook(pb)
    if not getattr(hook, "owns_residuals", False):
        # (casting x here instead would change pb.dtype, which is read off x: the output's)
        if pb.x.dtype == pb.compute_dtype:
            # a hook may keep the copy in memory it manages (torch: its scratch pool)
            copy = getattr(hook, "copy_input", None)
            pb.x = copy(pb, pb.x) if copy is not None else xp.asarray(pb.x, copy=True)
        if pb.valid is not None:
            pb.valid = xp.asarray(pb.valid, copy=True)
    if not isinstance(pb.tau, float):
        pb.tau = xp.asarray(pb.tau, copy=True)


@under_errstate
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
    group: Any = None,
    hard: bool = False,
) -> tuple[Array, Array]:
    """Closed-form Jacobian-vector product of :func:`dftopk` (O(n), no autodiff).

    Parameters
    ----------
    x, k, tau, axis, mask, largest, group
        As in :func:`dftopk`.
    tangent : array
        ``u``, the perturbation of ``x``; x's shape, any real floating dtype
        (rounded to x's compute dtype, as ``cotangent`` in :func:`dftopk_vjp`).
    tau_tangent : float or array, optional
        Perturbation of ``tau`` (tau's shape).  None means 0.
    output : {"probs", "logits"}, default "probs"
        Differentiate :func:`dftopk` or :func:`dftopk_logits`.
    hard : bool, default False
        Straight-through: the primal is the hard top-k mask, the tangent the
        soft ``p``'s.  Only with ``output="probs"``.

    Returns
    -------
    out : array
        The primal output (``p``, ``z`` for logits, the mask for ``hard=True``).
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
    _check_hard(hard, output)
    _check_output(output)
    pb = prepare(x, k, tau, axis, mask, largest, group=group)
    xp = pb.xp
    u = pb.in_layout(tangent, "tangent")
    dtau = None
    if tau_tangent is not None:
        dtau = _tau_tangent(pb, tau_tangent)
    tangent = getattr(_soft_hook(pb), "tangent", None)
    if tangent is not None:
        # the backend's fused forward keeps p (1 - p) and the ties; its tangent reuses them
        # (u laid out like pb.x, the user's: largest's sign is the hook's to apply)
        a, b = select(pb, candidates=True)
        out, res = soft_forward(pb, a, b, output, keep=True, out=not hard)
        d = tangent(pb, res, u, dtau)
        if hard:
            out = _hard_mask(pb, pb.x, a)
    else:
        xc, a, b, z = _tangent_inputs(pb)
        if not largest:
            u = -u
        d = _math.jvp(xp, xc, a, b, z, u, pb.tau, dtau, pb.valid, output, row_sum=pb.row_sum)
        out = _primal(pb, xc, a, z, output, hard)
    return (
        pb.restore(xp.astype(out, pb.dtype, copy=False)),
        pb.restore(xp.astype(d, pb.dtype, copy=False)),
    )


def _primal(pb: Problem, xc: Array, a: Array, z: Array, output: Output, hard: bool) -> Array:
    """The forward value next to a tangent: ``z``, ``p``, or the hard mask (same ``a``)."""
    if hard:
        return _hard_mask(pb, xc, a)
    return z if output == "logits" else _sigmoid(pb, z)


def _tau_tangent(pb: Problem, tau_tangent: Any) -> Any:
    import numbers

    from ._problem import (
        _check_device,
        _check_known_shape,
        _check_same_library,
        _is_bool,
        _lib_label,
        is_real_floating,
        library_name,
    )

    if isinstance(tau_tangent, numbers.Real) and not _is_bool(tau_tangent):
        return float(tau_tangent)
    if _is_bool(tau_tangent) or library_name(tau_tangent) is None:
        # a float works: say so, rather than "must be an array" for 1j or "0.5"
        got = "bool" if _is_bool(tau_tangent) else _lib_label(tau_tangent)
        raise TypeError(
            f"tau_tangent must be a real number or an array of x's library "
            f"({library_name(pb.x)}) with tau's shape, got {got}"
        )
    _check_same_library(tau_tangent, "tau_tangent", pb)
    _check_device(pb.xp, tau_tangent, "tau_tangent", pb.device)
    expected = pb.tau_shape if pb.tau_shape is not None else ()
    _check_known_shape(tau_tangent, "tau_tangent")
    if tuple(tau_tangent.shape) != expected:
        raise ValueError(
            f"tau_tangent must have tau's shape {expected}, got {tuple(tau_tangent.shape)}"
        )
    if not is_real_floating(pb.xp, tau_tangent.dtype):
        raise TypeError(f"tau_tangent must have a real floating dtype, got {tau_tangent.dtype}")
    return normalise_like_tau(pb, tau_tangent, expected, pb.compute_dtype)
