"""The array libraries the conformance suite runs against, and its tolerances.

Each :class:`ArrayLib` knows how to move NumPy test data into its library and
back, which floating dtypes it has, and why it might be unavailable here (then
its cases skip with that reason).  Importing this module imports no framework.

Built-in libraries are listed in :data:`BUILTIN_LIBS`.  Any other library that
exposes the Array API (directly, like array-api-strict, or through
array-api-compat, like NumPy/CuPy/PyTorch/JAX) is wrapped by
:func:`third_party_lib`; that is what ``pytest --array-module=NAME`` runs.

Tolerances
----------
:data:`TOLERANCE` is the documented per-dtype bound every check uses for the
maximum absolute error of ``p`` (which lies in [0, 1]) and of gradients of
O(1) size, against the float64 reference or against the NumPy float64 result
on the same (dtype-rounded) inputs:

============  ===========  ==================================================
dtype         tolerance    why
============  ===========  ==================================================
float64       1e-9         ~1e6 ulps: room for summation order, nothing else
float32       2e-5         ~170 ulps of 1.0 (eps 1.19e-7)
float16       2e-3         ~2 ulps of 1.0 (eps 9.8e-4); math runs in float32
bfloat16      1.6e-2       ~2 ulps of 1.0 (eps 7.8e-3); math runs in float32
============  ===========  ==================================================

Quantities that are not O(1) (logits, thresholds, ``grad_tau`` which sums a
row) are compared relative to ``max(1, |reference|)`` with the same numbers.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BUILTIN_LIBS",
    "FLOAT_DTYPES",
    "TOLERANCE",
    "ArrayLib",
    "available_libs",
    "third_party_lib",
    "tolerance",
]

TOLERANCE = {
    # max abs error of p (in [0, 1]) and of gradients vs the float64 reference
    "float64": 1e-9,
    "float32": 2e-5,
    "float16": 2e-3,
    "bfloat16": 1.6e-2,
}

#: floating dtypes the suite knows, most precise last
FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")


def tolerance(dtype: str) -> float:
    """The documented tolerance for ``dtype`` (a name such as ``"float32"``).

    Examples
    --------
    >>> tolerance("float32")
    2e-05
    """
    try:
        return TOLERANCE[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(TOLERANCE)}, got {dtype!r}") from None


@dataclass(frozen=True)
class ArrayLib:
    """One array library under test.

    Attributes
    ----------
    name : str
        Test id and report row (the library's module name for third-party ones).
    module : str
        Module imported by :attr:`mod`.
    dtypes : tuple of str
        Floating dtypes the library has (names as in :data:`TOLERANCE`).
    third_party : bool
        True when built by :func:`third_party_lib` (``--array-module``).
    """

    name: str
    module: str
    dtypes: tuple[str, ...]
    _from_numpy: Callable[[Any, np.ndarray, str], Any]
    _to_numpy: Callable[[Any], np.ndarray]
    _unavailable: Callable[[], str | None] = field(default=lambda: None)
    third_party: bool = False

    def unavailable(self) -> str | None:
        """Why this library can't be tested here, or None."""
        if importlib.util.find_spec(self.module.split(".")[0]) is None:
            return f"{self.module} is not installed"
        return self._unavailable()

    @property
    def mod(self) -> Any:
        return importlib.import_module(self.module)

    def asarray(self, a: Any, dtype: str = "float64") -> Any:
        """NumPy data -> this library; bool/int data keep their dtype, floats get ``dtype``."""
        a = np.asarray(a)
        if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
            return self._from_numpy(self.mod, a, str(a.dtype))
        return self._from_numpy(self.mod, a, dtype)

    def no_dtype(self, dtype: str) -> str:
        """Skip reason for a floating dtype the library does not offer."""
        if self.third_party:
            return f"{self.name}'s Array API namespace has no {dtype}"
        return f"{self.name} has no {dtype}"

    def to_numpy(self, a: Any) -> np.ndarray:
        """This library's array -> NumPy (bfloat16 comes back as float32)."""
        return self._to_numpy(a)


def _np_from(mod: Any, a: np.ndarray, dtype: str) -> Any:
    return np.asarray(a, dtype=dtype)


def _strict_from(mod: Any, a: np.ndarray, dtype: str) -> Any:
    return mod.asarray(np.asarray(a, dtype=dtype))


def _strict_to(a: Any) -> np.ndarray:
    import array_api_strict as s

    # the strict namespace only exposes data through the buffer protocol / dlpack
    return np.asarray(np.from_dlpack(s.asarray(a, copy=True)))


def _torch_from(mod: Any, a: np.ndarray, dtype: str) -> Any:
    if dtype == "bfloat16":
        return mod.from_numpy(np.asarray(a, dtype=np.float32)).to(mod.bfloat16)
    return mod.from_numpy(np.array(a, dtype=dtype))


def _torch_cuda_from(mod: Any, a: np.ndarray, dtype: str) -> Any:
    return _torch_from(mod, a, dtype).to("cuda")


def _torch_cuda_unavailable() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return None


def _torch_to(a: Any) -> np.ndarray:
    import torch

    a = a.detach().cpu()
    if a.dtype == torch.bfloat16:
        a = a.float()
    return a.numpy()


def _jax_from(mod: Any, a: np.ndarray, dtype: str) -> Any:
    if dtype == "bfloat16":
        return mod.asarray(np.asarray(a, dtype=np.float32), dtype=mod.bfloat16)
    return mod.asarray(np.asarray(a, dtype=dtype))


def _jax_to(a: Any) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.name == "bfloat16" else a


def _cupy_from(mod: Any, a: np.ndarray, dtype: str) -> Any:
    return mod.asarray(np.asarray(a, dtype=dtype))


def _cupy_to(a: Any) -> np.ndarray:
    return a.get()


def _jax_unavailable() -> str | None:
    import jax

    if not jax.config.read("jax_enable_x64"):
        return "jax x64 mode is off (the suite enables it in conftest)"
    return None


def _cupy_unavailable() -> str | None:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA GPU visible to CuPy"
    except Exception as exc:
        return f"CuPy cannot use a GPU here ({type(exc).__name__}: {exc})"
    return None


BUILTIN_LIBS: dict[str, ArrayLib] = {
    "numpy": ArrayLib("numpy", "numpy", ("float16", "float32", "float64"), _np_from, np.asarray),
    "array_api_strict": ArrayLib(
        "array_api_strict", "array_api_strict", ("float32", "float64"), _strict_from, _strict_to
    ),
    "torch": ArrayLib(
        "torch", "torch", ("float16", "bfloat16", "float32", "float64"), _torch_from, _torch_to
    ),
    # the same checks on CUDA tensors: skipped where torch sees no GPU
    "torch_cuda": ArrayLib(
        "torch_cuda",
        "torch",
        ("float16", "bfloat16", "float32", "float64"),
        _torch_cuda_from,
        _torch_to,
        _torch_cuda_unavailable,
    ),
    "jax": ArrayLib(
        "jax",
        "jax.numpy",
        ("float16", "bfloat16", "float32", "float64"),
        _jax_from,
        _jax_to,
        _jax_unavailable,
    ),
    "cupy": ArrayLib(
        "cupy", "cupy", ("float16", "float32", "float64"), _cupy_from, _cupy_to, _cupy_unavailable
    ),
}


def available_libs() -> list[ArrayLib]:
    return [lib for lib in BUILTIN_LIBS.values() if lib.unavailable() is None]


# --------------------------------------------------------------------------- third party


def _namespace(mod: Any) -> Any:
    """The Array API namespace of ``mod``'s arrays (``mod`` itself if it is one)."""
    import array_api_compat

    try:
        probe = mod.asarray(np.zeros(2, dtype=np.float64))
    except Exception as exc:
        raise TypeError(
            f"--array-module: {mod.__name__}.asarray(numpy_array) failed "
            f"({type(exc).__name__}: {exc}); the module must create arrays from NumPy data"
        ) from None
    try:
        return array_api_compat.array_namespace(probe)
    except TypeError:
        raise TypeError(
            f"--array-module: arrays of {mod.__name__} ({type(probe).__module__}."
            f"{type(probe).__name__}) have no Array API namespace (no __array_namespace__ "
            f"and not supported by array-api-compat)"
        ) from None


def _probe_dtypes(xp: Any) -> tuple[str, ...]:
    """Floating dtypes that exist in ``xp`` and survive a round trip from NumPy data."""
    names = set()
    info = getattr(xp, "__array_namespace_info__", None)
    if info is not None:
        try:
            names.update(str(n) for n in info().dtypes(kind="real floating"))
        except Exception:  # an incomplete info object: fall back to attributes
            pass
    names.update(n for n in FLOAT_DTYPES if getattr(xp, n, None) is not None)
    found = []
    for name in FLOAT_DTYPES:
        if name not in names:
            continue
        try:
            arr = _to_lib(xp, np.array([0.5, -1.0]), name)
            ok = arr.dtype == getattr(xp, name)
        except Exception:
            ok = False
        if ok:
            found.append(name)
    return tuple(found)


def _to_lib(xp: Any, a: np.ndarray, dtype: str) -> Any:
    if dtype == "bfloat16":  # NumPy has no bfloat16: go through float32
        return xp.astype(_to_lib(xp, a, "float32"), xp.bfloat16)
    a = np.asarray(a, dtype=dtype)
    import array_api_compat

    if array_api_compat.is_dask_namespace(xp) and a.ndim:
        # several chunks along every axis, the selection axis included: the suite
        # must not only see single-chunk arrays
        import dask.array as da

        return da.from_array(a, chunks=tuple(max(1, -(-s // 3)) for s in a.shape))
    return xp.asarray(a)


def _exporters() -> list[tuple[str, Callable[[Any], Any]]]:
    """Ways to read an array back into NumPy, tried in order."""
    return [
        ("np.from_dlpack", np.from_dlpack),
        # arrays on an accelerator
        ("np.from_dlpack(device='cpu')", lambda v: np.from_dlpack(v, device="cpu", copy=True)),
        ("np.asarray", np.asarray),
        # libraries without DLPack export or __array__: ndonnx, pydata sparse
        ("unwrap_numpy()", lambda v: v.unwrap_numpy()),
        ("todense()", lambda v: v.todense()),
    ]


def _from_lib(xp: Any, a: Any, library: str = "the library") -> np.ndarray:
    """``a`` as a NumPy array, validated: numeric, of ``a``'s shape.

    A conversion that "succeeds" with something else (``np.asarray`` wraps an
    object it cannot read in a 0-d object array) is not a result: it is skipped,
    and if nothing works the error names the library and what each attempt gave.
    """
    if getattr(xp, "bfloat16", None) is not None and a.dtype == xp.bfloat16:
        a = xp.astype(a, xp.float32)
    shape = tuple(a.shape)
    tried = []
    for name, convert in _exporters():
        try:
            # copy: the result must not alias the library's buffer
            out = np.array(convert(a), copy=True)
        except Exception as exc:
            # the message says why (a failed lazy compute, a missing device, ...)
            why = " ".join(str(exc).split())
            why = why if len(why) <= 200 else why[:197] + "..."
            tried.append(f"{name}: {type(exc).__name__}" + (f": {why}" if why else ""))
            continue
        if out.dtype.kind not in "biuf" or out.shape != shape:
            tried.append(f"{name}: gave a {out.ndim}-d {out.dtype} array of shape {out.shape}")
            continue
        return out
    raise TypeError(
        f"cannot read a {library} array ({type(a).__module__}.{type(a).__name__}, shape "
        f"{shape}) back into NumPy: {'; '.join(tried)}"
    )


def third_party_lib(module_name: str) -> ArrayLib:
    """Wrap any importable Array API library as an :class:`ArrayLib`.

    Data goes in with ``xp.asarray(numpy_array)`` (``xp`` is the library's
    namespace, found through ``array_api_compat.array_namespace`` on a probe
    array) and comes back with ``np.from_dlpack`` or ``np.asarray``.  The
    floating dtypes are probed from the namespace.

    Parameters
    ----------
    module_name : str
        Importable module with an ``asarray`` function, e.g. ``"array_api_strict"``.

    Examples
    --------
    >>> lib = third_party_lib("array_api_strict")
    >>> lib.dtypes
    ('float32', 'float64')
    >>> lib.to_numpy(lib.asarray([1.0, 2.0], "float32"))
    array([1., 2.], dtype=float32)
    """
    if not isinstance(module_name, str) or not module_name:
        raise TypeError(f"module_name must be a non-empty str, got {module_name!r}")
    try:
        mod = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--array-module: cannot import {module_name!r} ({exc})") from None
    xp = _namespace(mod)
    dtypes = _probe_dtypes(xp)
    if not dtypes:
        raise ValueError(f"--array-module: {module_name} has no usable floating dtype")
    return ArrayLib(
        name=module_name,
        module=module_name,
        dtypes=dtypes,
        _from_numpy=lambda _mod, a, dtype: _to_lib(xp, a, dtype),
        _to_numpy=lambda a: _from_lib(xp, a, module_name),
        third_party=True,
    )
