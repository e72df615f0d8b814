"""Validation and normalisation of the public API's arguments.

``prepare`` turns user arguments into a :class:`Problem`: the selection axis
moved last, ``largest=False`` turned into negation, ``k`` clipped per row, the
mask broadcast, ``tau`` laid out like ``x``.  Every bad input is rejected here
with a ``TypeError``/``ValueError`` that names the argument, what was given and
what is allowed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import array_api_compat

from . import _math
from ._group import row_sum_of
from ._registry import Backend, get_backend, library_name

Array = Any

__all__ = ["Problem", "host_values", "prepare", "normalise_like_tau", "reduce_to_tau"]

# Names: what the error messages call x, k and tau.  A caller with its own argument
# names (the losses: "scores", "stage_scores[1]", "k[1]") passes them explicitly, read
# only when raising: a context variable would be simpler but torch.compile cannot
# trace one, and the checks run inside compiled graphs.
Names = Mapping[str, str] | None


def _poss(name: str) -> str:
    """``"x's"``, ``"scores'"``: the possessive of an argument name."""
    return name + ("'" if name.endswith("s") else "'s")


def _nm(name: str, names: Names = None) -> str:
    """The name error messages use for the argument ``name``."""
    return name if names is None else names.get(name, name)


@dataclass
class Problem:
    """A validated, normalised call.

    Attributes
    ----------
    xp : namespace
        Array API namespace of ``x``.
    backend : Backend
        The backend chosen from x's library.
    x : array
        Input with the selection axis last, negated when ``largest=False``.
    k : int or array
        A Python int (same for every row, and at most every row's ``n_valid``)
        or an integer array of shape ``x.shape[:-1] + (1,)`` clipped to
        ``[0, n_valid]`` per row.
    tau : float or array
        Python float, or an array in the compute dtype broadcasting against
        ``x`` (axis last).
    valid : array or None
        Boolean array of ``x``'s shape (axis last), or None for no mask.
    axis : int
        The original selection axis, normalised to be non-negative.
    largest : bool
        The original ``largest`` flag.
    tau_shape : tuple or None
        Shape of the user's array ``tau`` (None for a float).
    device : object
        x's device.
    group : topk_core._group.Group or None
        The shards' collectives when the selection axis of ``x`` is one shard
        of a longer axis (the public API's ``group=``); None otherwise.
    candidates : array, tuple or None
        Set by the selection where the backend's ``select_candidates`` found
        them: flat positions of ``x`` holding every entry tied with ``a`` or
        ``b``, or the tie counts of both (JAX; see :class:`topk_core.Backend`);
        None otherwise.
    layout : array or None
        The normalised ``x`` as the user chunked it, where the backend's
        ``compact`` re-chunked ``x`` for the computation: :meth:`restore` puts
        outputs back on its chunks.  None otherwise.
    """

    xp: Any
    backend: Backend
    x: Array
    k: int | Array
    tau: float | Array
    valid: Array | None
    axis: int
    largest: bool
    tau_shape: tuple[int, ...] | None
    device: Any
    group: Any = None
    candidates: Any = None
    layout: Any = None

    @property
    def dtype(self) -> Any:
        return self.x.dtype

    @property
    def row_sum(self) -> Any:
        """The ``row_sum`` hook of :mod:`topk_core._math` (None: local sums)."""
        return row_sum_of(self.xp, self.group)

    @property
    def compute_dtype(self) -> Any:
        return _compute_dtype(self.backend, self.xp, self.x.dtype)

    def restore(self, y: Array) -> Array:
        """Move the last axis back to the user's axis (on x's own chunks)."""
        if self.layout is not None:
            y = self.backend.align(y, self.layout)
        if self.axis == y.ndim - 1:
            return y
        return self.xp.moveaxis(y, -1, self.axis)

    def in_layout(self, y: Array, name: str) -> Array:
        """Validate an x-shaped array argument (cotangent/tangent) and lay it out like x."""
        _check_same_library(y, name, self)
        _check_device(self.xp, y, name, self.device)
        xp = self.xp
        if not is_real_floating(xp, y.dtype):
            raise TypeError(f"{name} must have a real floating dtype, got {y.dtype}")
        shape = _x_shape(self)
        _check_known_shape(y, name)
        if tuple(y.shape) != shape:
            raise ValueError(f"{name} must have x's shape {shape}, got {tuple(y.shape)}")
        if self.axis != y.ndim - 1:
            y = xp.moveaxis(y, self.axis, -1)
        if self.backend.align is not None:
            y = self.backend.align(y, self.x)
        return xp.astype(y, self.compute_dtype, copy=False)


def _compute_dtype(backend: Backend, xp: Any, dtype: Any) -> Any:
    """The dtype the math runs in for x of ``dtype``: the backend's rule, else the spec's."""
    if backend.compute_dtype is not None:
        return backend.compute_dtype(xp, dtype)
    return _math.compute_dtype(xp, dtype)


def _x_shape(pb: Problem) -> tuple[int, ...]:
    shape = list(pb.x.shape)
    shape.insert(pb.axis, shape.pop())
    return tuple(shape)


def _lib_label(obj: Any) -> str:
    lib = library_name(obj)
    return f"a {lib} array" if lib else f"a {type(obj).__name__}"


def _check_same_library(obj: Any, name: str, pb_or_lib: Problem | str, names: Names = None) -> None:
    lib = pb_or_lib if isinstance(pb_or_lib, str) else library_name(pb_or_lib.x)
    other = library_name(obj)
    if other is None:
        raise TypeError(
            f"{name} must be an array of the same library as {_nm('x', names)} ({lib}), "
            f"got {_lib_label(obj)}"
        )
    if other != lib:
        raise TypeError(
            f"{_nm('x', names)} is a {lib} array but {name} is a {other} array; "
            f"all array arguments must come from one library"
        )


def _check_device(xp: Any, obj: Any, name: str, device: Any, names: Names = None) -> None:
    other = array_api_compat.device(obj)
    # jax tracers report no device; concrete arrays beside them do
    if other is None or device is None:
        return
    if other != device:
        raise ValueError(f"{name} is on device {other} but {_nm('x', names)} is on device {device}")


def _is_int(k: Any) -> bool:
    return isinstance(k, numbers.Integral) and not _is_bool(k)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool) or type(v).__name__ in ("bool_", "bool")


def _normalise_axis(axis: Any, ndim: int, names: Names = None) -> int:
    if _is_bool(axis) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {type(axis).__name__} {axis!r}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis {axis} is out of range for {_nm('x', names)} with {ndim} dimensions"
        )
    return axis % ndim


def _broadcastable(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    for s, t in zip(reversed(shape), reversed(target)):
        if s != 1 and s != t:
            return False
    return True


def check_x(x: Any, names: Names = None) -> tuple[Any, str]:
    """Validate ``x``; return its namespace and library name.

    ``names``: what the messages call ``x`` (``{"x": "scores"}``), as in :func:`prepare`.
    """
    lib = library_name(x)
    if lib is None:
        raise TypeError(
            f"{_nm('x', names)} must be an array of a library with Array API support (NumPy, CuPy, "
            f"PyTorch, JAX, ...), got {type(x).__name__}"
        )
    try:
        xp = array_api_compat.array_namespace(x)
    except TypeError as exc:
        raise TypeError(
            f"{_nm('x', names)}: no Array API namespace for {type(x).__name__}: {exc}"
        ) from None
    floating = is_real_floating(xp, x.dtype)
    if not floating:
        hint = ""
        if floating is None:
            hint = f" (an extension dtype {library_name(x)} does not know: cast x, e.g. to float32)"
        raise TypeError(
            f"{_nm('x', names)} must have a real floating dtype (float16, bfloat16, "
            f"float32, float64), got {x.dtype}{hint}"
        )
    if x.ndim == 0:
        raise ValueError(f"{_nm('x', names)} must have at least one dimension, got a 0-d array")
    _check_known_shape(x, _nm("x", names))
    return xp, lib


def is_real_floating(xp: Any, dtype: Any) -> bool | None:
    """``xp.isdtype(dtype, "real floating")``; None (falsy) for a dtype ``xp`` does not know.

    NumPy's ``isdtype`` raises a ``TypeError`` for extension dtypes such as
    ml_dtypes' ``bfloat16``: the caller's error then names the argument instead.
    """
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except TypeError:
        return None


def _check_known_shape(arr: Array, name: str) -> None:
    if any(s is None or (isinstance(s, float) and math.isnan(s)) for s in arr.shape):
        raise ValueError(
            f"{name} must have a known shape, got {tuple(arr.shape)} (a dask array after "
            f"boolean indexing: call .compute_chunk_sizes() on it first)"
        )


def prepare(
    x: Any,
    k: Any,
    tau: Any,
    axis: Any,
    mask: Any,
    largest: Any,
    *,
    need_tau: bool = True,
    group: Any = None,
    names: Names = None,
) -> Problem:
    """Validate and normalise the arguments shared by every public function.

    ``names``: what the error messages call ``x``, ``k`` and ``tau``, for callers
    with their own argument names (the losses: ``{"x": "scores", "k": "k[1]"}``).
    """
    xp, lib = check_x(x, names)
    ndim = x.ndim
    axis = _normalise_axis(axis, ndim, names)
    if not isinstance(largest, bool):
        raise TypeError(f"largest must be a bool, got {type(largest).__name__} {largest!r}")
    device = array_api_compat.device(x)
    backend = get_backend(lib)
    shape = tuple(x.shape)
    n = shape[axis]
    batch = shape[:axis] + shape[axis + 1 :]
    grp = _resolve_group(backend, group, x, lib, axis)
    same_k = getattr(grp, "check_same_k", None)
    if same_k is not None:
        # before anything can raise on some members only (k's range check would)
        same_k(int(k) if _is_int(k) else k)
    # the global axis length (None: not known on the host without a device sync)
    n_all = n if grp is None else grp.total(n)

    # mask
    valid = None
    if mask is not None:
        _check_same_library(mask, "mask", lib, names)
        if mask.dtype != xp.bool:
            raise TypeError(f"mask must have dtype bool, got {mask.dtype}")
        if not _broadcastable(tuple(mask.shape), shape):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to "
                f"{_poss(_nm('x', names))} shape {shape}"
            )
        _check_device(xp, mask, "mask", device, names)
        valid = xp.broadcast_to(mask, shape)
        if axis != ndim - 1:
            valid = xp.moveaxis(valid, axis, -1)

    # k
    kn, xn_ = _nm("k", names), _nm("x", names)
    if _is_bool(k):
        raise TypeError(f"{kn} must be an int or an integer array, got bool {k!r}")
    if _is_int(k):
        k = int(k)
        if grp is not None and not (0 <= k and (n_all is None or k <= n_all)):
            raise ValueError(
                f"{kn} must satisfy 0 <= k <= {n_all if n_all is not None else 'n'} (the global "
                f"length of axis {axis}: its shards summed over {grp.label}), got {k}"
            )
        if grp is None and not 0 <= k <= n:
            raise ValueError(f"{kn} must satisfy 0 <= k <= {n} (the size of axis {axis}), got {k}")
        k_out: int | Array = k
    elif isinstance(k, numbers.Number) or library_name(k) is None:
        raise TypeError(
            f"{kn} must be an int or an integer array of {_poss(xn_)} library ({lib}), got "
            f"{type(k).__name__} {k!r:.40}"
        )
    else:
        _check_same_library(k, kn, lib, names)
        if not xp.isdtype(k.dtype, "integral"):
            raise TypeError(
                f"{kn} must be an int or an integer array, got an array of dtype {k.dtype}"
            )
        if not _broadcastable(tuple(k.shape), batch):
            raise ValueError(
                f"{kn} of shape {tuple(k.shape)} does not broadcast to the batch shape "
                f"{batch} ({_poss(xn_)} shape without axis {axis})"
            )
        _check_device(xp, k, kn, device, names)
        k_out = xp.reshape(xp.broadcast_to(k, batch), batch + (1,))

    xn = x if axis == ndim - 1 else xp.moveaxis(x, axis, -1)
    if not largest:
        xn = -xn
    layout = None
    if backend.compact is not None:
        compact = backend.compact(xn)
        if compact is not xn:
            layout, xn = xn, compact
            if valid is not None:
                valid = backend.align(valid, xn)

    if valid is not None or not isinstance(k_out, int) or n_all is None:
        count_t = xp.int32 if n_all is not None and n_all < 2**31 else xp.int64
        if valid is not None:
            n_valid = xp.sum(xp.astype(valid, count_t), axis=-1, keepdims=True)
            if grp is not None:
                n_valid = grp.sum(n_valid)
        elif n_all is None:
            # a scalar k that the host cannot check against the global length: clip it
            # on the device, like an array k
            n_valid = grp.sum(xp.full(batch + (1,), n, dtype=count_t, device=device))
        else:
            n_valid = n_all
        if isinstance(k_out, int):
            # with masked entries set to -inf, a scalar k that no row's clipping changes
            # selects exactly as without a mask: keep it scalar for the backend's fast
            # path (the check reads values, so only where that is free)
            keep = backend.eager and bool(xp.all(n_valid >= k_out))
            k_arr = None if keep else xp.full(batch + (1,), k_out, dtype=count_t, device=device)
        else:
            k_arr = _widen_k(xp, k_out, count_t, n_all, device)
        if k_arr is not None:
            k_out = xp.minimum(
                xp.maximum(k_arr, xp.zeros_like(k_arr)),
                xp.astype(xp.asarray(n_valid, device=device), k_arr.dtype),
            )

    if backend.align is not None:
        # a chunked library: per-row and x-shaped arguments on x's chunks (outputs keep them)
        if not isinstance(k_out, int):
            k_out = backend.align(k_out, xn)
        if valid is not None:
            valid = backend.align(valid, xn)
    pb = Problem(xp, backend, xn, k_out, 1.0, valid, axis, largest, None, device, grp)
    pb.layout = layout
    if need_tau:
        pb.tau, pb.tau_shape = _prepare_tau(pb, tau, lib, shape, names)
        if pb.tau_shape is not None and backend.align is not None:
            pb.tau = backend.align(pb.tau, xn)
    return pb


def host_values(backend: Backend, arr: Any) -> Any | None:
    """``arr`` (or a host copy of it) when its values can be read at no cost, else None.

    Eager backends (NumPy, array-api-strict): always.  Others through their
    ``host_values`` hook: torch CPU tensors in eager mode, concrete JAX arrays on
    the CPU; never under tracing or compilation, on a GPU, or for lazy libraries
    (Dask), where reading would compute, synchronise or break the trace.
    """
    if backend.eager:
        return arr
    if backend.host_values is None:
        return None
    return backend.host_values(arr)


def _tau_bounds(values: Any) -> tuple[float, float]:
    """``(min, max)`` of an array tau's values in two reductions (NaN where one is NaN);
    ``(1, 1)`` for an empty array, which has nothing to check."""
    vxp = array_api_compat.array_namespace(values)
    if math.prod(values.shape) == 0:
        return 1.0, 1.0
    return float(vxp.min(values)), float(vxp.max(values))


def _widen_k(xp: Any, k: Array, count_t: Any, n_all: int | None, device: Any) -> Array:
    """An integer ``k`` array in ``count_t``, the type the row counts are clipped in.

    A narrower ``k`` (int8, uint8, ...) is widened: clipping in its own type would
    wrap the row counts (int8 ``k = 100`` over 300 entries selected 44).  A wider
    or unsigned one is first clipped to what ``count_t`` holds, so that the cast
    cannot wrap either; the clip to ``[0, n_valid]`` follows.
    """
    if k.dtype == count_t:
        return k
    if array_api_compat.is_torch_namespace(xp) and k.dtype == xp.uint32:
        k = xp.astype(k, xp.int64)  # torch has no minimum/maximum for uint32; int64 holds it
    ki, ci = xp.iinfo(k.dtype), xp.iinfo(count_t)
    if ki.max > ci.max:
        top = ci.max if n_all is None else min(ci.max, n_all)
        k = xp.minimum(k, xp.asarray(top, dtype=k.dtype, device=device))
    if ki.min < ci.min:
        k = xp.maximum(k, xp.asarray(0, dtype=k.dtype, device=device))
    return xp.astype(k, count_t)


def _resolve_group(backend: Backend, group: Any, x: Any, lib: str, axis: int) -> Any:
    """The backend's collectives for ``group=`` (None without a group)."""
    if group is None:
        return None
    if backend.group is None:
        raise TypeError(
            f"group={group!r} cannot be used with {_lib_label(x)} (backend {backend.name!r} "
            f"has no collectives). group= takes a JAX mesh axis name (inside shard_map, "
            f"with JAX arrays) or a torch.distributed ProcessGroup (with torch tensors); "
            f"to split NumPy data across chunks or machines, pass a dask.array instead "
            f"(its chunks are the shards, no group needed)"
        )
    return backend.group(group, x, axis)


def _prepare_tau(pb: Problem, tau: Any, lib: str, shape: tuple[int, ...], names: Names = None):
    xp = pb.xp
    tn = _nm("tau", names)
    if _is_bool(tau):
        raise TypeError(f"{tn} must be a positive float or a positive array, got bool {tau!r}")
    if isinstance(tau, numbers.Real):
        tau = float(tau)
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"{tn} must be a finite float > 0, got {tau!r}")
        lo, hi = _tau_range(pb.xp, pb.compute_dtype)
        if not lo <= tau <= hi:
            text = _range_text(pb.compute_dtype, pb.x.dtype, lo, hi, names)
            raise ValueError(f"{text}, got {tau!r}")
        return tau, None
    if isinstance(tau, numbers.Number) or library_name(tau) is None:
        raise TypeError(
            f"{tn} must be a finite float > 0 or a positive floating array of "
            f"{_poss(_nm('x', names))} library ({lib}), got {type(tau).__name__} {tau!r:.40}"
        )
    _check_same_library(tau, tn, lib, names)
    if not is_real_floating(xp, tau.dtype):
        raise TypeError(f"{tn} must have a real floating dtype, got {tau.dtype}")
    tau_shape = tuple(tau.shape)
    if not _broadcastable(tau_shape, shape):
        raise ValueError(
            f"{tn} of shape {tau_shape} does not broadcast to {_poss(_nm('x', names))} shape "
            f"{shape} (keep the axis, with size 1, for a per-row temperature)"
        )
    _check_device(xp, tau, tn, pb.device, names)
    lo, hi = _tau_range(pb.xp, pb.compute_dtype)
    text = _range_text(pb.compute_dtype, pb.x.dtype, lo, hi, names)
    values = host_values(pb.backend, tau)
    if values is not None:
        check_tau_values(values, lo, hi, text, tn)
    elif pb.backend.check_lazily is not None:
        # a lazy library: the same check, raised when tau's values are computed
        tau = pb.backend.check_lazily(tau, check_tau_values, lo, hi, text, tn)
    return normalise_like_tau(pb, tau, tau_shape, pb.compute_dtype), tau_shape


def check_tau_values(values: Any, lo: float, hi: float, range_text: str, name: str = "tau") -> None:
    """Raise ``ValueError`` unless every value of an array tau is finite, > 0 and in
    ``[lo, hi]`` (:func:`_tau_range`); ``values`` readable on the host.  ``name``:
    what the message calls tau.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core._problem import check_tau_values
    >>> check_tau_values(np.array([0.5, 2.0]), 1e-38, 1e38, "")
    >>> check_tau_values(np.array([0.5, -2.0]), 1e-38, 1e38, "")
    Traceback (most recent call last):
    ...
    ValueError: tau must be finite and > 0 everywhere, got values -2 to 0.5 (...)
    """
    vmin, vmax = _tau_bounds(values)
    # NaN fails both comparisons
    if not (vmin > 0 and vmax < math.inf):
        got = "NaN" if math.isnan(vmin) or math.isnan(vmax) else f"{vmin:g} to {vmax:g}"
        raise ValueError(
            f"{name} must be finite and > 0 everywhere, got values {got} "
            "(an array tau is checked wherever its values are concrete: NumPy, torch CPU "
            "tensors in eager mode, concrete JAX arrays; a dask array when it is computed)"
        )
    if not lo <= vmin <= vmax <= hi:
        raise ValueError(
            f"{range_text} everywhere (tau is cast to it), got values {vmin:g} to {vmax:g}"
        )


def _tau_range(xp: Any, cdt: Any) -> tuple[float, float]:
    """Where ``tau`` and ``1 / tau`` are both normal numbers of the compute dtype.

    ``z = (x - theta) / tau`` runs in that dtype: a tau past its range rounds to 0 or
    inf (``0 / 0``, ``inf / inf``: NaN logits), and XLA divides by multiplying with the
    reciprocal, which flushes to 0 below the smallest normal number (JAX on the CPU gave
    ``p = 0.5`` for every finite entry and NaN at infinite ones from tau = 1.8e38 on).
    """
    lo = float(xp.finfo(cdt).smallest_normal)
    return lo, 1.0 / lo


def _range_text(cdt: Any, x_dtype: Any, lo: float, hi: float, names: Names = None) -> str:
    return (
        f"{_nm('tau', names)} must be within {lo:.4g} <= tau <= {hi:.4g} (tau and 1/tau normal "
        f"numbers of {_dtype_name(cdt)}, the dtype the math runs in for {_nm('x', names)} of dtype "
        f"{_dtype_name(x_dtype)})"
    )


def check_tau_now(x: Any, tau: Any, names: Names = None) -> None:
    """Check an array ``tau``'s values for the scores ``x`` now, as :func:`prepare` does,
    where they can be read at no cost (:func:`host_values`); nothing otherwise.

    For wrappers that trace every array argument afterwards (the JAX losses run
    under ``jit``, where the values can no longer be read).  ``x`` may be traced.
    """
    lib = library_name(tau)
    if lib is None or isinstance(tau, numbers.Number):
        return
    values = host_values(get_backend(lib), tau)
    if values is None:
        return
    xp, lib_x = check_x(x, names)  # a bad x gets x's own error, not a namespace lookup's
    cdt = _compute_dtype(get_backend(lib_x), xp, x.dtype)
    lo, hi = _tau_range(xp, cdt)
    check_tau_values(values, lo, hi, _range_text(cdt, x.dtype, lo, hi, names), _nm("tau", names))


def _dtype_name(dtype: Any) -> str:
    # a dtype (.name), a scalar type such as np.float32 (__name__), or torch.float32
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    return str(name).rsplit(".", 1)[-1]


def normalise_like_tau(pb: Problem, t: Array, tau_shape: tuple[int, ...], dtype: Any) -> Array:
    """Lay an array of tau's shape out like x (axis last, full rank)."""
    xp = pb.xp
    ndim = pb.x.ndim
    t = xp.reshape(t, (1,) * (ndim - len(tau_shape)) + tau_shape)
    if pb.axis != ndim - 1:
        t = xp.moveaxis(t, pb.axis, -1)
    return xp.astype(t, dtype, copy=False)


def reduce_to_tau(pb: Problem, t: Array, out_dtype: Any) -> Array:
    """Sum the elementwise tau-gradient ``t`` (x's layout) down to tau's shape."""
    xp = pb.xp
    if pb.tau_shape is None:
        return xp.astype(xp.sum(t), out_dtype)
    ts = tuple(pb.tau.shape)  # laid out like x
    axes = tuple(d for d in range(t.ndim) if ts[d] == 1 and t.shape[d] != 1)
    if axes:
        t = xp.sum(t, axis=axes, keepdims=True)
    if pb.axis != t.ndim - 1:
        t = xp.moveaxis(t, -1, pb.axis)
    return xp.astype(xp.reshape(t, pb.tau_shape), out_dtype)
