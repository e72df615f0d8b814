"""Every bad input gets a clear TypeError/ValueError naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
from topk_core.conformance.reference import ref_dftopk

import topk_core as tk
from topk_core._problem import host_values
from topk_core._registry import get_backend, library_name


def _x(lib, shape=(2, 5)):
    return lib.asarray(np.arange(np.prod(shape), dtype=np.float64).reshape(shape))


FUNCS = [tk.dftopk, tk.dftopk_logits, tk.topk_threshold, tk.topk_mask]


@pytest.mark.parametrize("fn", FUNCS, ids=lambda f: f.__name__)
def test_k_errors(lib, fn):
    x = _x(lib)
    with pytest.raises(ValueError, match=r"k must satisfy 0 <= k <= 5.*got 6"):
        fn(x, 6)
    with pytest.raises(ValueError, match=r"got -1"):
        fn(x, -1)
    with pytest.raises(TypeError, match=r"k must be an int.*bool"):
        fn(x, True)
    with pytest.raises(TypeError, match=r"k must be an int.*float"):
        fn(x, 2.0)
    with pytest.raises(TypeError, match=r"k must be an int or an integer array.*dtype"):
        fn(x, lib.asarray(np.array([1.0, 2.0])))
    with pytest.raises(ValueError, match=r"k of shape \(3,\) does not broadcast"):
        fn(x, lib.asarray(np.array([1, 2, 3])))
    with pytest.raises(TypeError, match=r"k must be an int or an integer array of x's library"):
        fn(x, [1, 2])
    with pytest.raises(TypeError, match=r"integer array of x's library \(.*\), got str '2'"):
        fn(x, "2")


@pytest.mark.parametrize("fn", FUNCS, ids=lambda f: f.__name__)
def test_x_errors(lib, fn):
    with pytest.raises(TypeError, match=r"x must have a real floating dtype"):
        fn(lib.asarray(np.arange(5)), 2)
    with pytest.raises(TypeError, match=r"x must have a real floating dtype"):
        fn(lib.asarray(np.array([True, False])), 1)
    with pytest.raises(ValueError, match=r"at least one dimension"):
        fn(lib.asarray(np.array(1.0)), 0)
    with pytest.raises(TypeError, match=r"x must be an array.*got list"):
        fn([1.0, 2.0], 1)
    with pytest.raises(ValueError, match=r"axis 2 is out of range"):
        fn(_x(lib), 1, axis=2)
    with pytest.raises(TypeError, match=r"axis must be an int"):
        fn(_x(lib), 1, axis=1.0)
    with pytest.raises(TypeError, match=r"largest must be a bool"):
        fn(_x(lib), 1, largest=1)


@pytest.mark.parametrize("fn", [tk.dftopk, tk.dftopk_logits], ids=lambda f: f.__name__)
def test_tau_errors(lib, fn):
    x = _x(lib)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"tau must be a finite float > 0"):
            fn(x, 2, tau=bad)
    with pytest.raises(TypeError, match=r"tau must be.*bool"):
        fn(x, 2, tau=True)
    for bad in ("0.5", None, [0.5]):
        with pytest.raises(TypeError, match=r"tau must be a finite float > 0 or a positive "):
            fn(x, 2, tau=bad)
    with pytest.raises(ValueError, match=r"tau of shape .* does not broadcast"):
        fn(x, 2, tau=lib.asarray(np.ones((3, 1))))
    with pytest.raises(TypeError, match=r"tau must have a real floating dtype"):
        fn(x, 2, tau=lib.asarray(np.ones((2, 1), dtype=np.int64)))


def _raises_now_or_when_computed(lib, call, match):
    """``call()`` raises ``ValueError(match)``, or (a lazy library whose backend checks
    values when they are computed) its result does when materialised."""
    with pytest.raises(ValueError, match=match):
        out = call()
        out = out[0] if isinstance(out, tuple) else out
        # compute() itself: reading values back (lib.to_numpy) turns any failure of the
        # conversions it tries into "cannot read"
        compute = getattr(out, "compute", None)
        compute() if callable(compute) else lib.to_numpy(out)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.inf, np.nan])
def test_array_tau_values_checked_where_concrete(lib, bad):
    """Zero, negative or non-finite entries of an array tau are a ValueError wherever
    its values can be read for free (NumPy, array-api-strict, torch CPU eager, concrete
    JAX arrays), and when the result is computed for lazy libraries whose backend checks
    then (Dask); tracing, compilation and GPUs leave it unchecked."""
    x = _x(lib, (2, 4))
    tau = lib.asarray(np.array([[1.0], [bad]]))
    backend = get_backend(library_name(x))
    if host_values(backend, tau) is None and backend.check_lazily is None:
        pytest.skip(
            f"{lib.name}: its backend ({backend.name}) does not read array values (lazy, "
            f"or not known to be concrete), so tau's values are not checked"
        )
    # the bad value within the range shown (of the whole array, or of the chunk checked)
    shown = "NaN" if np.isnan(bad) else f"{bad:g}"
    match = rf"tau must be finite and > 0 everywhere, got values [^(]*{shown}"
    for fn in (tk.dftopk, tk.dftopk_logits, tk.dftopk_and_vjp):
        _raises_now_or_when_computed(lib, lambda fn=fn: fn(x, 1, tau=tau), match)
    _raises_now_or_when_computed(lib, lambda: tk.dftopk_vjp(x, 1, x, tau=tau), match)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tau_outside_the_compute_range(lib, dtype):
    """A float tau (or, where its values are concrete, a wider array tau) whose value or
    reciprocal is not a normal number of the dtype the math runs in is a ValueError: it
    rounds to 0 or inf there (NaN logits), and XLA's division by a reciprocal flushed
    2 / tau to 0 (JAX, float32, tau = 1.8e38: p = 0.5 for every finite entry).  At the
    bounds the results are the reference's, NaN-free."""
    if dtype not in lib.dtypes:
        pytest.skip(lib.no_dtype(dtype))
    lo = float(np.finfo(dtype).smallest_normal)
    hi = 1.0 / lo
    xs = np.array([[np.inf, 3e38, 1e38, 1.0, 0.0, -1.0, -3e38, -np.inf]]).astype(dtype)
    x = lib.asarray(xs, dtype)
    for bad in (hi * 2.0, lo / 2.0) + ((1e39, 1e300, 1e-50) if dtype == "float32" else ()):
        for fn in (tk.dftopk, tk.dftopk_logits, tk.dftopk_and_vjp):
            with pytest.raises(ValueError, match=rf"tau must be within .* {dtype}"):
                fn(x, 2, tau=bad)
    if dtype == "float32" and "float64" in lib.dtypes:
        tau = lib.asarray(np.array([[1e39]]), "float64")
        backend = get_backend(library_name(x))
        if host_values(backend, tau) is not None or backend.check_lazily is not None:
            _raises_now_or_when_computed(
                lib,
                lambda: tk.dftopk(x, 2, tau=tau),
                r"tau must be within .* everywhere .*, got values 1e\+39 to 1e\+39",
            )
    for tau in (lo, hi):
        for k in (2, 4):
            p = lib.to_numpy(tk.dftopk(x, k, tau=tau)).astype(np.float64)
            want = ref_dftopk(xs.astype(np.float64), k, tau=tau)
            assert not np.isnan(p).any()
            np.testing.assert_allclose(p, want, rtol=0, atol=2e-5)


def test_cascade_stage_sizes_must_not_increase(lib):
    from topk_core.losses import cascade_joint_loss

    s = lib.asarray(np.arange(12, dtype=np.float64).reshape(2, 6))
    with pytest.raises(ValueError, match=r"k must be non-increasing.*k\[1\] = 3 > k\[0\] = 2"):
        cascade_joint_loss([s, s], s, (2, 3))
    with pytest.raises(ValueError, match=r"k\[2\] = 4 > k\[1\] = 3"):
        cascade_joint_loss([s, s, s], s, [4, 3, 4])
    k_arr = (lib.asarray(np.array([3, 2])), lib.asarray(np.array([2, 3])))
    backend = get_backend(library_name(s))
    if host_values(backend, k_arr[0]) is not None or backend.check_lazily is not None:
        # now, or (a lazy library whose backend checks values when computed) then
        match = r"k\[1\] > k\[0\] in some rows"
        _raises_now_or_when_computed(lib, lambda: cascade_joint_loss([s, s], s, k_arr), match)
        # an array after an int, an int after an array, a later pair of three stages
        k3 = lib.asarray(np.array([3, 3]))
        for ks, j in (((2, k3), 1), ((k_arr[0], 3), 1), ((4, k_arr[1], k3), 2)):
            _raises_now_or_when_computed(
                lib,
                lambda ks=ks: cascade_joint_loss([s] * len(ks), s, ks),
                rf"k\[{j}\] > k\[{j - 1}\] in some rows",
            )
        # non-increasing per row: the loss is NumPy's
        ok = cascade_joint_loss([s, s, s], s, (4, k_arr[0], lib.asarray(np.array([1, 2]))))
        sn = np.arange(12, dtype=np.float64).reshape(2, 6)
        want = cascade_joint_loss([sn, sn, sn], sn, (4, np.array([3, 2]), np.array([1, 2])))
        np.testing.assert_allclose(lib.to_numpy(ok), want, rtol=1e-6)
    cascade_joint_loss([s, s], s, (3, 3))  # equal sizes are fine


@pytest.mark.parametrize("fn", FUNCS, ids=lambda f: f.__name__)
def test_mask_errors(lib, fn):
    x = _x(lib)
    with pytest.raises(TypeError, match=r"mask must have dtype bool"):
        fn(x, 1, mask=lib.asarray(np.ones((2, 5))))
    with pytest.raises(ValueError, match=r"mask of shape .* does not broadcast"):
        fn(x, 1, mask=lib.asarray(np.ones((3, 5), dtype=bool)))
    with pytest.raises(TypeError, match=r"mask must be an array of the same library"):
        fn(x, 1, mask=[[True] * 5] * 2)


def test_mixed_libraries_name_both(lib):
    if library_name(_x(lib)) == "numpy":  # also array_api_compat.numpy: numpy arrays
        other = np.ones(5, dtype=bool)
        x = _strict_x()
        expected = "x is a array_api_strict array but mask is a numpy array"
    else:
        x = _x(lib)
        other = np.ones((2, 5), dtype=bool)
        expected = f"x is a {library_name(x)} array but mask is a numpy array"
    with pytest.raises(TypeError, match=expected):
        tk.dftopk(x, 1, mask=other)


def _strict_x():
    s = pytest.importorskip("array_api_strict")
    return s.asarray(np.ones((2, 5)))


def test_vjp_jvp_argument_errors(lib):
    x = _x(lib)
    with pytest.raises(ValueError, match=r"cotangent must have x's shape \(2, 5\)"):
        tk.dftopk_vjp(x, 2, lib.asarray(np.ones((5, 2))))
    with pytest.raises(TypeError, match=r"cotangent must have a real floating dtype"):
        tk.dftopk_vjp(x, 2, lib.asarray(np.ones((2, 5), dtype=np.int64)))
    with pytest.raises(ValueError, match=r"output must be 'probs' or 'logits'"):
        tk.dftopk_vjp(x, 2, x, output="p")
    with pytest.raises(ValueError, match=r"tangent must have x's shape"):
        tk.dftopk_jvp(x, 2, lib.asarray(np.ones(5)))
    with pytest.raises(ValueError, match=r"tau_tangent must have tau's shape \(\)"):
        tk.dftopk_jvp(x, 2, x, tau_tangent=lib.asarray(np.ones(2)))
    # a float works: the message says so, for a bool, a complex, a str or a list
    bads = (True, np.bool_(True), 1j, "0.5", [0.5])
    for bad, got in zip(bads, ("bool", "bool", "a complex", "a str", "a list")):
        with pytest.raises(
            TypeError,
            match=rf"tau_tangent must be a real number or an array of x's library .* got {got}",
        ):
            tk.dftopk_jvp(x, 2, x, tau_tangent=bad)
