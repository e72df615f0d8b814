"""Project checks of the public API's errors and registry that are not about one
third-party library (NumPy/torch/JAX specifics, mixing libraries, the registry)."""

from __future__ import annotations

import numpy as np
import pytest
from topk_core.conformance.reference import ref_vjp

import topk_core as tk
from topk_core._registry import get_backend


def _strict_x():
    s = pytest.importorskip("array_api_strict")
    return s.asarray(np.ones((2, 5)))


def test_complex_x_rejected():
    with pytest.raises(TypeError, match=r"x must have a real floating dtype.*complex"):
        tk.dftopk(np.ones(3, dtype=np.complex128), 1)


def test_numpy_extension_dtypes_get_the_project_error():
    """ml_dtypes' bfloat16 is not a dtype NumPy's ``isdtype`` knows (it raised its own
    TypeError); x, a cotangent, tau and losses' arrays name themselves instead."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf = np.ones((2, 5), dtype=ml_dtypes.bfloat16)
    x = np.ones((2, 5))
    with pytest.raises(TypeError, match=r"x must have a real floating dtype .* got bfloat16 \(an"):
        tk.dftopk(bf, 2)
    with pytest.raises(TypeError, match=r"cotangent must have a real floating dtype"):
        tk.dftopk_vjp(x, 2, bf)
    with pytest.raises(TypeError, match=r"tau must have a real floating dtype"):
        tk.dftopk(x, 2, tau=np.ones((2, 1), dtype=ml_dtypes.bfloat16))
    with pytest.raises(TypeError, match=r"relevance must have a real floating dtype"):
        tk.topk_bce_loss(x, bf, 2)


def test_mixed_libraries_for_k_and_tau():
    s = pytest.importorskip("array_api_strict")
    x = np.ones((2, 5))
    with pytest.raises(TypeError, match=r"x is a numpy array but k is a array_api_strict array"):
        tk.dftopk(x, s.asarray([1, 2]))
    with pytest.raises(TypeError, match=r"x is a numpy array but tau is a array_api_strict array"):
        tk.dftopk(x, 1, tau=s.asarray([[1.0], [1.0]]))


def test_array_tau_checked_on_torch_cpu_and_concrete_jax():
    """The cases a new user tripped over: torch CPU and concrete JAX arrays."""
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    x = np.ones((2, 4))
    for mod in (torch.tensor, jax.numpy.asarray, lambda a: torch.nn.Parameter(torch.tensor(a))):
        with pytest.raises(ValueError, match=r"tau must be finite and > 0"):
            tk.dftopk(mod(x), 1, tau=mod(np.array([[1.0], [0.0]])))
    # traced: not read (that would break the trace), no error
    f = jax.jit(lambda x, t: tk.dftopk(x, 1, tau=t))
    assert f(jax.numpy.asarray(x), jax.numpy.asarray(np.array([[1.0], [-1.0]]))).shape == (2, 4)


def test_register_backend_errors():
    with pytest.raises(TypeError, match=r"library must be a non-empty str"):
        tk.register_backend("", "m:a")
    with pytest.raises(TypeError, match=r"backend must be a topk_core.Backend"):
        tk.register_backend("mylib", 3)


def test_register_backend_import_paths():
    """A lazily registered backend that cannot be loaded is an error naming the path
    and the library (before 2026-12-06 a missing module silently fell back to the
    generic backend, which also skips the eager value checks, and a missing or wrong
    attribute gave a bare AttributeError on first use); a malformed path is refused
    at registration."""
    for bad in ("mylib_topk.backend", "mylib_topk.backend:", ":BACKEND", "a b:BACKEND", "m:1x"):
        with pytest.raises(ValueError, match=r"backend must be an import path 'package.module"):
            tk.register_backend("array_api_strict", bad)
    x = _strict_x()
    restore = "topk_core.backends.generic:STRICT_BACKEND"
    cases = [
        ("topk_core.backends.genericc:STRICT_BACKEND", ImportError, "cannot be imported"),
        ("topk_core.backends.generic:NO_SUCH", ImportError, "has no attribute 'NO_SUCH'"),
        ("topk_core.backends.generic:select_pair", TypeError, "is a function, not a topk_core"),
    ]
    try:
        for spec, exc, text in cases:
            tk.register_backend("array_api_strict", spec)
            with pytest.raises(
                exc, match=rf"backend '{spec}' registered for 'array_api_strict'.*{text}"
            ):
                tk.dftopk(x, 2)
    finally:
        tk.register_backend("array_api_strict", restore)
    assert get_backend("array_api_strict").name == "array_api_strict"


def test_jax_grad_with_concrete_mask_and_k():
    """Traced x (no device) beside concrete mask/k arrays (a device) is fine."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x = jnp.asarray(np.linspace(-1.0, 1.0, 6))
    mask = jnp.asarray(np.array([True, True, False, True, True, True]))
    k = jnp.asarray(np.array(2))
    g = jax.grad(lambda v: tk.dftopk(v, k, mask=mask).sum())(x)
    ref, _ = ref_vjp(np.linspace(-1.0, 1.0, 6), 2, np.ones(6), mask=np.asarray(mask))
    np.testing.assert_allclose(np.asarray(g), ref, atol=1e-9)


_CALLS_NEEDING = {
    "per-row k": ("arange", lambda s, x: tk.dftopk(x, s.asarray([1, 2]))),
    # a mask that leaves a row fewer valid entries than k: that row's k is clipped
    "mask": (
        "arange",
        lambda s, x: tk.dftopk(x, 2, mask=s.asarray([[True] * 3, [True] + [False] * 2])),
    ),
    "topk_mask": ("cumulative_sum", lambda s, x: tk.topk_mask(x, 2)),
    "hard=True": ("cumulative_sum", lambda s, x: tk.dftopk(x, 2, hard=True)),
}


@pytest.mark.parametrize("case", sorted(_CALLS_NEEDING))
def test_library_without_a_standard_function(monkeypatch, case):
    """A namespace without a function only some paths call (pydata sparse has neither
    ``arange`` nor ``cumulative_sum``) gets the project's TypeError naming the library,
    the function and what needs it, not the namespace's AttributeError."""
    s = pytest.importorskip("array_api_strict")
    name, call = _CALLS_NEEDING[case]
    # ties at the k-th largest: the eager hard mask's fast path ranks nothing without them
    x = s.asarray([[2.0, 2.0, 2.0], [0.0, 5.0, 4.0]])
    call(s, x)  # the same call runs where the namespace has the function
    monkeypatch.delattr(s, name)
    with pytest.raises(TypeError, match=rf"library array_api_strict has no {name}\(\), a function"):
        call(s, x)
