"""CuPy backend: CPU-checkable logic everywhere, the real thing when a GPU is present.

Without CuPy and a GPU: the module imports lazily (no cupy), the radix shims it
uses run through NumPy in their GPU mode (``compress=False``), and the fused
forward kernel body is compiled as C with the host compiler and compared with
``topk_core._math``.  With CuPy and a GPU: the public API on CuPy arrays
against the float64 reference.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys

import numpy as np
import pytest
from topk_core.backends import cupy_backend
from topk_core.backends.numpy_backend import NumpyShims
from topk_core.conformance.libs import BUILTIN_LIBS
from topk_core.conformance.reference import ref_dftopk, ref_vjp

import topk_core as tk
from topk_core import _math
from topk_core._radix import radix_select_pair

CUPY = BUILTIN_LIBS["cupy"]
_REASON = CUPY.unavailable()
needs_gpu = pytest.mark.skipif(_REASON is not None, reason=f"CuPy GPU path: {_REASON}")


def test_module_imports_without_cupy():
    code = (
        "import sys, topk_core.backends.cupy_backend as m; "
        "assert 'cupy' not in sys.modules, 'cupy imported eagerly'; "
        "assert m.BACKEND.name == 'cupy' and not m.BACKEND.eager; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_gpu_mode_shims_through_numpy():
    # the CuPy shims are NumpyShims(cupy, compress=False): same calls, run on NumPy
    rng = np.random.default_rng(11)
    gpu_like = NumpyShims(np, compress=False)
    cpu = NumpyShims(np)
    for dtype in (np.float16, np.float32, np.float64):
        x = rng.choice(np.array([-np.inf, -1.0, -0.0, 0.0, 0.5, 2.0, np.inf]), size=(3, 5, 17))
        x = x.astype(dtype)
        k = rng.integers(0, 18, size=(3, 5, 1))
        got = radix_select_pair(np, x, k, gpu_like, digit_bits=cupy_backend.DIGIT_BITS)
        want = radix_select_pair(np, x, k, cpu, digit_bits=cupy_backend.DIGIT_BITS)
        s = -np.sort(-x, axis=-1)
        ext = np.concatenate(
            [np.full(k.shape, np.inf, dtype), s, np.full(k.shape, -np.inf, dtype)], -1
        )
        np.testing.assert_array_equal(got[0], np.take_along_axis(ext, k, -1))
        np.testing.assert_array_equal(got[1], np.take_along_axis(ext, k + 1, -1))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        digits = rng.integers(0, 256, size=(4, 33)).astype(np.uint32)
        active = rng.random((4, 33)) < 0.5
        np.testing.assert_array_equal(
            gpu_like.row_histogram(digits, active, 256), cpu.row_histogram(digits, active, 256)
        )


_HARNESS = r"""
#include <math.h>
#include <stdbool.h>
typedef %(ctype)s T;
void run(long n, const T* X, const T* A, const T* B, const T* TAU, const bool* V,
         T neg_inf, T* OUT) {
    for (long i = 0; i < n; i++) {
        T x = X[i], a = A[i], b = B[i], tau = TAU[i];
        bool valid = V[i];
        T out;
        %(body)s
        OUT[i] = out;
    }
}
"""


def _compile(tmp_path, output, ctype):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to check the CuPy kernel source on the CPU")
    src = tmp_path / f"k_{output}_{ctype}.c"
    lib = tmp_path / f"k_{output}_{ctype}.so"
    src.write_text(_HARNESS % {"ctype": ctype, "body": cupy_backend.forward_body(output)})
    res = subprocess.run(
        [
            cc,
            "-O1",
            "-shared",
            "-fPIC",
            "-Werror=implicit-function-declaration",
            str(src),
            "-o",
            str(lib),
            "-lm",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    return ctypes.CDLL(str(lib))


def _run_kernel(dll, x, a, b, tau, valid, dtype):
    arrays = np.broadcast_arrays(x, a, b, tau)
    x, a, b, tau = (np.ascontiguousarray(v, dtype=dtype).ravel() for v in arrays)
    v = np.ascontiguousarray(np.broadcast_to(valid, arrays[0].shape), dtype=np.bool_).ravel()
    out = np.empty_like(x)
    ptr = ctypes.c_void_p
    scalar = ctypes.c_double if dtype == np.float64 else ctypes.c_float
    dll.run.argtypes = [ctypes.c_long, ptr, ptr, ptr, ptr, ptr, scalar, ptr]
    dll.run(
        x.size,
        x.ctypes.data,
        a.ctypes.data,
        b.ctypes.data,
        tau.ctypes.data,
        v.ctypes.data,
        scalar(-np.inf),
        out.ctypes.data,
    )
    return out.reshape(arrays[0].shape)


@pytest.mark.parametrize("output", ["logits", "probs"])
@pytest.mark.parametrize("ctype", ["double", "float"])
def test_fused_forward_kernel_source_matches_math(tmp_path, output, ctype):
    dtype = np.float64 if ctype == "double" else np.float32
    dll = _compile(tmp_path, output, ctype)
    inf, nan = np.inf, np.nan
    vals = np.array([-inf, -3.0e38, -2.0, -0.0, 0.0, 0.5, 1.0, 3.0e38, inf, nan], dtype=dtype)
    pairs = [  # (a, b) with a >= b, as the selection returns them, plus NaN
        (inf, 1.0),
        (inf, -inf),
        (inf, inf),
        (1.0, -inf),
        (-inf, -inf),
        (2.0, 1.0),
        (1.0, 1.0),
        (0.0, -0.0),
        (3.0e38, -3.0e38),
        (3.0e38, 3.0e38),
        (nan, 1.0),
        (1.0, nan),
    ]
    a = np.array([p[0] for p in pairs], dtype=dtype)[:, None]
    b = np.array([p[1] for p in pairs], dtype=dtype)[:, None]
    x = np.broadcast_to(vals, (len(pairs), vals.size))
    rng = np.random.default_rng(12)
    valid = rng.random(x.shape) < 0.8
    for tau in (1.0, 0.25, rng.uniform(0.1, 3.0, size=(len(pairs), 1)).astype(dtype)):
        with np.errstate(all="ignore"):
            want = _math.logits(np, x, a, b, tau, valid)
            if output == "probs":
                want = _math.sigmoid(np, want)
        tau_arr = np.asarray(tau, dtype=dtype)
        got = _run_kernel(dll, x, a, b, tau_arr, valid, dtype)
        rtol = 1e-12 if dtype == np.float64 else 1e-6
        np.testing.assert_allclose(got, want, rtol=rtol, atol=0)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        assert (got[~valid] == (0.0 if output == "probs" else -np.inf)).all()


def test_hard_forward_through_the_cupy_backend(monkeypatch):
    """``dftopk(cupy_x, k, hard=True)`` reaches ``apply(pb, "probs", hard=True)``: the
    CuPy backend's ``apply`` took no ``hard`` (a TypeError before 2026-12-06).  Run on
    NumPy arrays with the CuPy backend's GPU-mode shims pointed at NumPy."""
    import dataclasses

    monkeypatch.setattr(cupy_backend, "_SHIMS", [NumpyShims(np, compress=False)])
    x = np.random.default_rng(0).standard_normal((3, 50))
    x[0, :4] = 1.5  # ties at the k-th value: lower index first, as topk_mask
    want = tk.topk_mask(x, 3)
    backend = dataclasses.replace(cupy_backend.BACKEND, name="cupy-on-numpy")
    tk.register_backend("numpy", backend)
    try:
        got = tk.dftopk(x, 3, hard=True)
        got_k = tk.dftopk(x, np.array([1, 3, 5]), hard=True, mask=x > -1.0)
    finally:
        tk.register_backend("numpy", "topk_core.backends.numpy_backend:BACKEND")
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_k, tk.topk_mask(x, np.array([1, 3, 5]), mask=x > -1.0))


def test_forward_body_rejects_unknown_output():
    with pytest.raises(ValueError, match="output"):
        cupy_backend.forward_body("prob")


# ------------------------------------------------------------ needs a GPU


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUPY.dtypes)
def test_cupy_forward_and_vjp_against_reference(dtype):
    from .libs import TOLERANCE

    rng = np.random.default_rng(13)
    x = np.round(rng.normal(size=(4, 6, 37)), 1)  # ties
    mask = rng.random(x.shape) < 0.8
    k = rng.integers(0, 38, size=(4, 6))
    g = rng.normal(size=x.shape)
    tol = TOLERANCE[dtype] * 5
    cx = CUPY.asarray(x, dtype)
    for kk, m in ((5, None), (k, None), (5, mask), (k, mask)):
        ck = kk if isinstance(kk, int) else CUPY.asarray(kk)
        cm = None if m is None else CUPY.asarray(m)
        xd = x.astype(dtype).astype(np.float64)
        p = CUPY.to_numpy(tk.dftopk(cx, ck, tau=0.5, mask=cm))
        assert p.dtype == np.dtype(dtype)
        np.testing.assert_allclose(p, ref_dftopk(xd, kk, tau=0.5, mask=m), atol=tol)
        if dtype == "float64":
            gx, _ = tk.dftopk_vjp(cx, ck, CUPY.asarray(g, dtype), tau=0.5, mask=cm)
            want, _ = ref_vjp(xd, kk, g, tau=0.5, mask=m)
            np.testing.assert_allclose(CUPY.to_numpy(gx), want, atol=1e-9)


@needs_gpu
@pytest.mark.gpu
def test_cupy_selection_matches_sort_large():
    import array_api_compat
    import cupy

    rng = np.random.default_rng(14)
    x = rng.normal(size=(3, 100_000)).astype(np.float32)
    k = rng.integers(0, 100_001, size=(3, 1))
    cx = cupy.asarray(x)
    a, b = cupy_backend.select_pair(array_api_compat.array_namespace(cx), cx, cupy.asarray(k))
    s = -np.sort(-x, axis=-1)
    ext = np.concatenate(
        [np.full((3, 1), np.inf, np.float32), s, np.full((3, 1), -np.inf, np.float32)], -1
    )
    np.testing.assert_array_equal(a.get(), np.take_along_axis(ext, k, -1))
    np.testing.assert_array_equal(b.get(), np.take_along_axis(ext, k + 1, -1))
