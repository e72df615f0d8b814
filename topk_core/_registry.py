"""Lazy backend registry.

A backend is looked up from the *type* of the input array (the top-level module
that defines it), so finding one never imports a framework the caller has not
already imported.  Built-in backends are registered as import paths and loaded
on first use.  Any other array that array-api-compat recognises (one with
``__array_namespace__``, or one of the libraries array-api-compat wraps, such
as Dask, ndonnx or pydata sparse) runs on the generic Array API backend unless
a backend was registered for its library.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import array_api_compat

__all__ = ["Backend", "get_backend", "library_name", "register_backend", "under_errstate"]

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Backend:
    """What an array library adds to the backend-neutral spec.

    Only ``select_pair`` is required; everything else has a generic default.

    Parameters
    ----------
    name : str
        Short name shown in errors, the doctor table and test ids.
    select_pair : callable, optional
        ``select_pair(xp, x, k) -> (a, b)``.  ``x`` has the selection axis
        last and masked-out entries already replaced by ``-inf``; ``k`` is a
        Python int in ``[0, n]`` or an integer array of shape ``x.shape[:-1] +
        (1,)`` with values in ``[0, n]``.  Returns the k-th and (k+1)-th largest
        values along the last axis, each of shape ``x.shape[:-1] + (1,)``, with
        the sentinels ``x_(0) = +inf`` and ``x_(n+1) = -inf``.  NaN ranks
        above ``+inf`` (as ``np.sort``/``torch.sort`` order it): with ``m``
        NaN entries in a row, ``a`` is NaN for ``1 <= k <= m`` and ``b`` is NaN
        for ``k + 1 <= m``.  ``None`` uses the generic Array API selection
        (:mod:`topk_core.backends.generic`).
    eager : bool
        True when array values may be inspected on the host without a device
        synchronisation or tracing (NumPy, array-api-strict).  Enables value
        checks (e.g. ``tau > 0`` for array ``tau``) and host-side shortcuts.
    sigmoid : callable, optional
        A native numerically stable ``sigmoid(z)``; ``None`` uses the generic
        one.
    apply : callable, optional
        ``apply(problem, output, hard=False) -> array``: an autodiff-aware implementation
        of the forward (``output`` is ``"probs"`` or ``"logits"``), used by
        frameworks whose gradients must flow through ``topk_core.dftopk``.
        ``dftopk(..., hard=True)`` calls ``apply(problem, "probs", hard=True)``:
        the forward returns the hard top-k mask
        (:func:`topk_core._math.hard_mask`) and its derivative is the soft ``p``'s.
    compute_dtype : callable, optional
        ``compute_dtype(xp, dtype) -> dtype`` for the elementwise math; the
        default computes float16/bfloat16 in float32.
    host_values : callable, optional
        ``host_values(arr) -> array or None``: for a backend that is not
        ``eager``, ``arr``'s values as an array that can be read on the host at
        no cost (a CPU tensor in eager mode, a concrete JAX array's NumPy
        view), or None where reading them would need a device synchronisation
        or break a trace or compilation.  Enables the value checks of
        ``eager`` backends wherever values are concrete.
    group : callable, optional
        ``group(g, x, axis) -> topk_core._group.Group``: resolve the public
        API's ``group=g`` (``x``'s ``axis`` is one shard of a longer axis)
        into the library's collectives, raising a ``TypeError``/``ValueError``
        for a ``g`` it cannot use; it may return None for a group of one member
        (the shard is the whole axis: the call runs as without ``group``).
        ``None``: the library has no ``group``.
    soft : object, optional
        The math after the selection, for libraries that can do it in fewer
        passes than the generic Array API code: an object with
        ``forward(problem, a, b, output, *, keep, out) -> (out, residuals)``
        and ``backward(problem, residuals, g) -> (grad_x, t)``, with the
        meaning of :func:`topk_core._api.soft_forward` and
        :func:`topk_core._api.soft_backward`.  ``None`` uses the generic
        :func:`topk_core._math.soft_forward` / :func:`topk_core._math.soft_backward`.
        A hook whose residuals hold nothing of ``problem.x`` or
        ``problem.valid`` (copies of the few values its backward needs) and
        whose backward reads no values of either sets ``owns_residuals =
        True``: :func:`topk_core.dftopk_and_vjp` then copies neither (only an
        array ``tau``); any other hook keeps ``x`` as the generic code does,
        cast to the compute dtype (``dftopk_and_vjp`` copies it only where
        that cast is not already a copy; an optional ``copy_input(problem,
        x) -> copy`` makes that copy in memory the hook manages, such as
        torch's scratch pool, released when ``problem`` dies).  An optional ``applies(problem,
        *arrays) -> bool`` (``arrays``: the cotangent, for the backward) lets
        the hook decline a call, which then runs the generic code: torch's
        runs only on plain CPU tensors with no graph to record.  Its residuals
        must then be the generic ones (:class:`topk_core._math.SoftResiduals`),
        as the forward and the backward may decide differently.  An optional
        ``tangent(problem, residuals, u, dtau) -> d_out`` makes
        :func:`topk_core.dftopk_jvp` run the hook's forward and then it
        (without one, that function runs the generic JVP): ``u`` is the
        tangent laid out like ``problem.x`` in the compute dtype, the user's
        (the sign of ``largest=False`` not applied), ``dtau`` a float, a
        tau-shaped array in the compute dtype, or None; ``d_out`` is the
        output's tangent in the compute dtype, exactly 0 at masked entries.
    select_candidates : callable, optional
        ``select_candidates(xp, x, k) -> (a, b, positions)``: ``select_pair``'s
        result plus, where the selection found them on its way (None
        otherwise), the flat C-order positions of some entries of ``x`` that
        include every entry equal to ``a`` or ``b``.  Called instead of
        ``select_pair`` when a backward will follow; the positions reach the
        ``soft`` hook as ``problem.candidates``, so that it can find the tied
        entries among them instead of comparing all of ``x``.  The third item
        is read by the backend's own ``soft`` hook only, so it may instead be
        another tie summary the selection holds: JAX's is ``(count_a,
        count_b)``, the tie counts from its last histogram (either None where
        unknown), for the tie weights' two row sums.  Its ``(a, b)``
        must be ``select_pair``'s: a copy of a backend with another
        ``select_pair`` (``dataclasses.replace``) sets this to None too.
    errstate : callable, optional
        ``errstate() -> context manager`` that every public entry point (and
        the ``vjp`` that :func:`topk_core.dftopk_and_vjp` returns) runs its
        math under, for libraries with floating-point error flags: NumPy's
        ``np.errstate(over="ignore", under="ignore")``, since a logit past the
        dtype's range and a probability that rounds to 0 or 1 are the spec's
        limits (README, Semantics), not errors to warn or raise about whatever
        the caller's ``np.seterr``.  ``None``: nothing to set.
    cond : callable, optional
        ``cond(pred, if_true, if_false) -> array``: the library's traced
        two-way branch on a scalar boolean array (``jax.lax.cond``), calling
        one of two zero-argument functions.  Lets the hard top-k mask
        (:func:`topk_core.topk_mask`, ``hard=True``) skip the ranking of ties
        in rows that need none where values cannot be read on the host
        (under ``jit``, on an accelerator).  Where they can (``eager``, or
        ``host_values`` gives them) the branch is taken on the host.
        ``None``: the general ranked mask there.
    check_lazily : callable, optional
        ``check_lazily(arr, check, *args) -> arr``: for a lazy library, ``arr``
        with ``check(values, *args)`` run on its values when they are computed
        (on each chunk: the check raises there, out of the caller's
        ``compute()``), so that value checks that cannot run now (``tau > 0``
        for an array ``tau``, non-increasing cascade ``k``) still run.  An
        array of the library in ``args`` with ``arr``'s shape passes its
        matching chunk.  ``check`` and ``args`` are picklable.
        ``None``: values that ``host_values`` cannot give are not checked.
    align : callable, optional
        ``align(arr, like) -> arr``: for a chunked library, ``arr`` (a per-row
        ``k`` or ``tau``, a mask or a cotangent, already laid out like ``like``,
        the normalised ``x``: each axis of ``like``'s size or 1) on ``like``'s
        chunks, so that outputs keep x's chunks whatever the other arguments'
        chunking.  ``None``: nothing to align.
    compact : callable, optional
        ``compact(x) -> x``: for a chunked library, the normalised ``x``
        re-chunked for the computation (Dask: without its empty chunks along
        the selection axis, which Dask's reductions and cumulative sums cannot
        take), or ``x`` itself when nothing changes.  The other arguments are
        aligned to it, and outputs go back to x's own chunks through ``align``
        (needed with ``compact``).  ``None``: ``x`` as given.
    hard_mask : callable, optional
        ``hard_mask(problem) -> array``: :func:`topk_core.topk_mask`'s values for
        a normalised problem without a ``group`` (the selection of the valid
        entries, then :func:`topk_core._math.hard_mask` from its ``a``), in x's
        dtype, computed the library's way: JAX's is one compiled program per
        shape where an eager call would dispatch a few dozen operations one by
        one.  Not differentiated (as the comparisons it is made of).  ``None``:
        ``select_pair`` and the generic mask.
    """

    name: str
    select_pair: Callable[..., tuple[Any, Any]] | None = None
    eager: bool = False
    sigmoid: Callable[[Any], Any] | None = None
    apply: Callable[..., Any] | None = None
    compute_dtype: Callable[[Any, Any], Any] | None = None
    host_values: Callable[[Any], Any] | None = None
    group: Callable[[Any, Any, int], Any] | None = None
    soft: Any = None
    select_candidates: Callable[..., tuple[Any, Any, Any]] | None = None
    errstate: Callable[[], AbstractContextManager[Any]] | None = None
    cond: Callable[[Any, Any, Any], Any] | None = None
    check_lazily: Callable[..., Any] | None = None
    align: Callable[[Any, Any], Any] | None = None
    compact: Callable[[Any], Any] | None = None
    hard_mask: Callable[[Any], Any] | None = None


# library name -> Backend, or an import path "pkg.module:attr" loaded lazily
_REGISTRY: dict[str, Backend | str] = {
    "numpy": "topk_core.backends.numpy_backend:BACKEND",
    "torch": "topk_core.backends.torch_backend:BACKEND",
    "jax": "topk_core.backends.jax_backend:BACKEND",
    "cupy": "topk_core.backends.cupy_backend:BACKEND",
    "dask": "topk_core.backends.dask_backend:BACKEND",
    "array_api_strict": "topk_core.backends.generic:STRICT_BACKEND",
}
_GENERIC = "topk_core.backends.generic:GENERIC_BACKEND"
_LOCK = threading.Lock()


def library_name(obj: Any) -> str | None:
    """Name of the array library that owns ``obj``, or None if not an array.

    Uses the type's defining module only, so no framework is imported.

    Examples
    --------
    >>> import numpy as np
    >>> library_name(np.ones(2)), library_name([1.0, 2.0])
    ('numpy', None)
    """
    module = type(obj).__module__ or ""
    root = module.split(".", 1)[0]
    # jax arrays live in jaxlib, tracers in jax._src
    if root in ("jax", "jaxlib"):
        return "jax"
    if root in _REGISTRY:
        return root
    # array-api-compat knows the arrays it wraps (dask.array, ndonnx, sparse, ...) by
    # type name, from modules already imported: it imports no framework either
    if hasattr(obj, "__array_namespace__") or array_api_compat.is_array_api_obj(obj):
        return root or None
    return None


def _builtin(spec: str) -> Backend | None:
    """The built-in backend named by ``spec``, else None.

    Static import statements, not :func:`importlib.import_module`: torch.compile
    (``fullgraph=True``) can trace an ``import`` statement but not importlib, and
    the first call of a process may well be a compiled one.
    """
    if spec == "topk_core.backends.numpy_backend:BACKEND":
        from .backends import numpy_backend

        return numpy_backend.BACKEND
    if spec == "topk_core.backends.torch_backend:BACKEND":
        from .backends import torch_backend

        return torch_backend.BACKEND
    if spec == "topk_core.backends.jax_backend:BACKEND":
        from .backends import jax_backend

        return jax_backend.BACKEND
    if spec == "topk_core.backends.cupy_backend:BACKEND":
        from .backends import cupy_backend

        return cupy_backend.BACKEND
    if spec == "topk_core.backends.dask_backend:BACKEND":
        from .backends import dask_backend

        return dask_backend.BACKEND
    if spec in (_GENERIC, "topk_core.backends.generic:STRICT_BACKEND"):
        from .backends import generic

        return generic.GENERIC_BACKEND if spec == _GENERIC else generic.STRICT_BACKEND
    return None


def _load(spec: str, library: str) -> Backend:
    """Import the backend ``"module:attr"`` registered for ``library``."""
    found = _builtin(spec)
    if found is not None:
        return found
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"the backend {spec!r} registered for {library!r} arrays "
            f"(topk_core.register_backend) cannot be imported: {exc}"
        ) from exc
    try:
        backend = getattr(module, attr)
    except AttributeError:
        raise ImportError(
            f"the backend {spec!r} registered for {library!r} arrays "
            f"(topk_core.register_backend): module {module_name!r} has no attribute {attr!r}"
        ) from None
    if not isinstance(backend, Backend):
        raise TypeError(
            f"the backend {spec!r} registered for {library!r} arrays "
            f"(topk_core.register_backend) is a {type(backend).__name__}, "
            f"not a topk_core.Backend"
        )
    return backend


def get_backend(library: str) -> Backend:
    """Return the backend registered for ``library`` (the generic one if none)."""
    entry = _REGISTRY.get(library)
    if entry is None:
        return _load(_GENERIC, library)
    if isinstance(entry, str):
        # no lock here: torch.compile cannot trace one, imports are already thread-safe,
        # and a racing duplicate load stores the same object
        entry = _load(entry, library)
        _REGISTRY[library] = entry
    return entry


def under_errstate(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` under the ``errstate`` of its first argument's backend.

    The first argument is the array (or a sequence whose first item is);
    anything else, or a backend without ``errstate``, calls ``fn`` directly,
    so traced and compiled code (torch, JAX) sees no context manager.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        first = args[0] if args else None
        if isinstance(first, (list, tuple)) and first:
            first = first[0]
        lib = library_name(first)
        make = get_backend(lib).errstate if lib is not None else None
        if make is None:
            return fn(*args, **kwargs)
        with make():
            return fn(*args, **kwargs)

    return wrapper


def register_backend(library: str, backend: Backend | str) -> None:
    """Register a backend for arrays whose type is defined in ``library``.

    Parameters
    ----------
    library : str
        Top-level module name of the array type, i.e.
        ``type(x).__module__.split(".")[0]`` (for example ``"mylib"``).
    backend : Backend or str
        A :class:`Backend`, or ``"package.module:ATTRIBUTE"`` naming one, to be
        imported on first use.

    Examples
    --------
    >>> import numpy as np
    >>> import topk_core
    >>> from topk_core import Backend
    >>> def select_pair(xp, x, k):  # sort-based, for illustration
    ...     s = xp.sort(x, axis=-1)
    ...     n = x.shape[-1]
    ...     inf = xp.full(x.shape[:-1] + (1,), xp.inf, dtype=x.dtype)
    ...     a = inf if k == 0 else s[..., n - k : n - k + 1]
    ...     b = -inf if k == n else s[..., n - k - 1 : n - k]
    ...     return a, b
    >>> topk_core.register_backend("numpy", Backend("numpy-sort", select_pair, eager=True))
    >>> topk_core.topk_mask(np.array([3.0, 1.0, 2.0]), 2)
    array([1., 0., 1.])
    >>> topk_core.register_backend("numpy", "topk_core.backends.numpy_backend:BACKEND")
    """
    if not isinstance(library, str) or not library:
        raise TypeError(f"library must be a non-empty str, got {library!r}")
    if not isinstance(backend, (Backend, str)):
        raise TypeError(
            f"backend must be a topk_core.Backend or an import path 'module:attr', "
            f"got {type(backend).__name__}"
        )
    if isinstance(backend, str):
        module_name, colon, attr = backend.partition(":")
        parts = module_name.split(".")
        if not (colon and attr.isidentifier() and all(p.isidentifier() for p in parts)):
            raise ValueError(
                f"backend must be an import path 'package.module:ATTRIBUTE' naming a "
                f"topk_core.Backend, got {backend!r}"
            )
    with _LOCK:
        _REGISTRY[library] = backend
