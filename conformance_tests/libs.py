"""The array libraries the conformance suite runs against.

Each entry knows how to move NumPy test data into the library and back, which
floating dtypes it has, and why it might be unavailable here (then its cases
skip with that reason).  Importing this module imports no framework.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TOLERANCE = {
    # max abs error of p (in [0, 1]) and of gradients vs the float64 reference
    "float64": 1e-9,
    "float32": 2e-5,
    "float16": 2e-3,
    "bfloat16": 1.6e-2,
}


@dataclass(frozen=True)
class ArrayLib:
    """One array library under test."""

    name: str
    module: str
    dtypes: tuple[str, ...]
    _from_numpy: Callable[[Any, np.ndarray, str], Any]
    _to_numpy: Callable[[Any], np.ndarray]
    _unavailable: Callable[[], str | None] = field(default=lambda: None)

    def unavailable(self) -> str | None:
        """Why this library can't be tested here, or None."""
        if importlib.util.find_spec(self.module.split(".")[0]) is None:
            return f"{self.module} is not installed"
        return self._unavailable()

    @property
    def mod(self) -> Any:
        return importlib.import_module(self.module)

    def asarray(self, a: Any, dtype: str = "float64") -> Any:
        a = np.asarray(a)
        if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
            return self._from_numpy(self.mod, a, str(a.dtype))
        return self._from_numpy(self.mod, a, dtype)

    def to_numpy(self, a: Any) -> np.ndarray:
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
    if dtype in ("bool", "int8", "int16", "int32", "int64", "uint8"):
        return mod.from_numpy(np.array(a, dtype=dtype))
    return mod.from_numpy(np.array(a, dtype=dtype))


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
