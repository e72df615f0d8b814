"""The closed-form VJP/JVP of the spec on every backend: vs the reference, finite
differences, and each other (transpose identity)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from topk_core.conformance.reference import finite_difference, ref_dftopk, ref_vjp

import topk_core as tk


def _reduce(t, shape):
    """Sum an x-shaped array down to tau's (broadcast) shape."""
    if shape == ():
        return t.sum()
    lead = t.ndim - len(shape)
    t = t.sum(axis=tuple(range(lead))) if lead else t
    axes = tuple(d for d, s in enumerate(shape) if s == 1 and t.shape[d] != 1)
    return t.sum(axis=axes, keepdims=True).reshape(shape)


CASES = {
    "plain": dict(shape=(3, 9), k=3),
    "ties": dict(shape=(4, 8), k=2, ties=True),
    "mask": dict(shape=(4, 8), k=3, mask=True),
    "per_row_k": dict(shape=(4, 7), k=np.array([0, 1, 3, 7])),
    "axis0_smallest": dict(shape=(6, 3), k=2, axis=0, largest=False),
    "per_row_tau": dict(shape=(3, 6), k=2, tau=np.array([[0.3], [1.0], [2.5]])),
}


def _case(rng, name):
    c = dict(CASES[name])
    x = rng.standard_normal(c.pop("shape"))
    if c.pop("ties", False):
        x = np.round(x)
    mask = None
    if c.pop("mask", False):
        mask = rng.random(x.shape) > 0.3
        mask[0, :] = True
        mask[1, 2:] = False
    kw = dict(k=c.get("k"), tau=c.get("tau", 0.8), axis=c.get("axis", -1), mask=mask)
    kw["largest"] = c.get("largest", True)
    return x, kw


def _call(lib, fn, x, kw, *args, **extra):
    k = kw["k"]
    k = lib.asarray(k) if isinstance(k, np.ndarray) else k
    tau = kw["tau"]
    tau = lib.asarray(tau) if isinstance(tau, np.ndarray) else tau
    mask = None if kw["mask"] is None else lib.asarray(kw["mask"])
    arrays = [lib.asarray(a) for a in args]
    return fn(
        lib.asarray(x),
        k,
        *arrays,
        tau=tau,
        axis=kw["axis"],
        mask=mask,
        largest=kw["largest"],
        **extra,
    )


@pytest.mark.parametrize("output", ["probs", "logits"])
@pytest.mark.parametrize("case", list(CASES))
def test_vjp_matches_reference(lib, rng, case, output):
    x, kw = _case(rng, case)
    g = rng.standard_normal(x.shape)
    gx, gtau = _call(lib, tk.dftopk_vjp, x, kw, g, output=output)
    ref_gx, ref_t = ref_vjp(
        x,
        kw["k"],
        g,
        tau=kw["tau"],
        axis=kw["axis"],
        mask=kw["mask"],
        largest=kw["largest"],
        output=output,
    )
    np.testing.assert_allclose(lib.to_numpy(gx), ref_gx, atol=1e-9)
    tau_shape = np.shape(kw["tau"])
    np.testing.assert_allclose(lib.to_numpy(gtau), _reduce(ref_t, tau_shape), atol=1e-9)
    assert tuple(gtau.shape) == tau_shape
    if kw["mask"] is not None:
        assert np.all(lib.to_numpy(gx)[~kw["mask"]] == 0.0)


@pytest.mark.parametrize("case", [c for c in CASES if c != "ties"])
def test_vjp_matches_finite_differences(lib, rng, case):
    """Central differences in float64 along random directions (not at ties: there the
    spec's tie weights are a choice of subgradient, checked by test_even_tie_split)."""
    x, kw = _case(rng, case)
    g = rng.standard_normal(x.shape)
    u = rng.standard_normal(x.shape)
    gx, _ = _call(lib, tk.dftopk_vjp, x, kw, g)

    def f(xx):
        return ref_dftopk(
            xx, kw["k"], tau=kw["tau"], axis=kw["axis"], mask=kw["mask"], largest=kw["largest"]
        )

    fd = np.sum(g * finite_difference(f, x, u, eps=1e-6))
    np.testing.assert_allclose(np.sum(lib.to_numpy(gx) * u), fd, rtol=1e-5, atol=1e-8)


def test_tau_gradient_matches_finite_differences(lib, rng):
    x = rng.standard_normal((3, 7))
    tau = np.array([[0.4], [1.3], [0.9]])
    g = rng.standard_normal(x.shape)
    _, gtau = tk.dftopk_vjp(lib.asarray(x), 3, lib.asarray(g), tau=lib.asarray(tau))
    for r in range(3):
        e = np.zeros_like(tau)
        e[r] = 1e-6
        fd = np.sum(g * (ref_dftopk(x, 3, tau=tau + e) - ref_dftopk(x, 3, tau=tau - e))) / 2e-6
        np.testing.assert_allclose(lib.to_numpy(gtau)[r, 0], fd, rtol=1e-6)


@pytest.mark.parametrize("output", ["probs", "logits"])
@pytest.mark.parametrize("case", list(CASES))
def test_jvp_vjp_transpose_identity(lib, rng, case, output):
    x, kw = _case(rng, case)
    u = rng.standard_normal(x.shape)
    v = rng.standard_normal(x.shape)
    tau_shape = np.shape(kw["tau"])
    dtau = rng.standard_normal(tau_shape) if tau_shape else 0.37
    dtau_arr = lib.asarray(dtau) if tau_shape else dtau
    out, d = _call(lib, tk.dftopk_jvp, x, kw, u, tau_tangent=dtau_arr, output=output)
    gx, gtau = _call(lib, tk.dftopk_vjp, x, kw, v, output=output)
    d = lib.to_numpy(d)
    lhs = np.sum(np.where(np.isfinite(d), v * d, 0.0))
    rhs = np.sum(lib.to_numpy(gx) * u) + np.sum(lib.to_numpy(gtau) * dtau)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-9, atol=1e-12)
    ref = ref_dftopk(
        x,
        kw["k"],
        tau=kw["tau"],
        axis=kw["axis"],
        mask=kw["mask"],
        largest=kw["largest"],
        output=output,
    )
    np.testing.assert_allclose(lib.to_numpy(out), ref, atol=1e-9)


def test_jvp_matches_finite_differences(lib, rng):
    x = rng.standard_normal((2, 10))
    u = rng.standard_normal(x.shape)
    _, d = tk.dftopk_jvp(lib.asarray(x), 4, lib.asarray(u), tau=0.6, tau_tangent=0.25)

    def f(eps):
        return ref_dftopk(x + eps * u, 4, tau=0.6 + eps * 0.25)

    fd = (f(1e-6) - f(-1e-6)) / 2e-6
    np.testing.assert_allclose(lib.to_numpy(d), fd, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 5), (0, 70001)], ids=str)
def test_empty_batch_gradients(lib, shape):
    x = lib.asarray(np.zeros(shape))
    for k in (1, lib.asarray(np.ones(shape[:-1], dtype=np.int64))):
        gx, gt = tk.dftopk_vjp(x, k, x)
        assert lib.to_numpy(gx).shape == shape
        assert float(lib.to_numpy(gt)) == 0.0
        p, dp = tk.dftopk_jvp(x, k, x, tau_tangent=1.0)
        assert lib.to_numpy(p).shape == lib.to_numpy(dp).shape == shape
        p, vjp = tk.dftopk_and_vjp(x, k, hard=True)
        assert lib.to_numpy(vjp(p)[0]).shape == shape


def test_even_tie_split(lib):
    # a = b = 2 shared by three entries: each gets weight 1/3 of sum(s)
    x = np.array([3.0, 2.0, 2.0, 2.0, 1.0])
    g = np.array([1.0, 0.0, 0.0, 0.0, 0.0])
    gx, _ = tk.dftopk_vjp(lib.asarray(x), 2, lib.asarray(g))
    gx = lib.to_numpy(gx)
    s0 = 1 / (1 + np.exp(-1)) * (1 - 1 / (1 + np.exp(-1)))
    np.testing.assert_allclose(gx, [s0, -s0 / 3, -s0 / 3, -s0 / 3, 0.0], atol=1e-12)
    assert abs(gx.sum()) < 1e-12  # shifting every score leaves p unchanged
    # a = 3 (two ties), b = 2 (one): weights 1/4, 1/4, 1/2
    x = np.array([3.0, 3.0, 2.0, 1.0])
    gx, _ = tk.dftopk_vjp(lib.asarray(x), 2, lib.asarray(np.array([0, 0, 0, 1.0])))
    gx = lib.to_numpy(gx)
    s3 = gx[3]
    np.testing.assert_allclose(gx[:3], [-s3 / 4, -s3 / 4, -s3 / 2], atol=1e-12)


def test_permutation_equivariant_under_ties(lib, rng):
    x = np.round(rng.standard_normal(12))
    g = rng.standard_normal(12)
    perm = rng.permutation(12)
    gx, _ = tk.dftopk_vjp(lib.asarray(x), 5, lib.asarray(g))
    gp, _ = tk.dftopk_vjp(lib.asarray(x[perm]), 5, lib.asarray(g[perm]))
    np.testing.assert_allclose(lib.to_numpy(gp), lib.to_numpy(gx)[perm], atol=1e-13)


def test_gradients_at_infinities_and_extremes_are_finite(lib):
    x = np.array([np.inf, 1.0, 0.0, -np.inf])
    g = np.ones(4)
    for k in (0, 1, 2, 3, 4):
        gx, gtau = tk.dftopk_vjp(lib.asarray(x), k, lib.asarray(g))
        assert np.isfinite(lib.to_numpy(gx)).all()
        assert np.isfinite(lib.to_numpy(gtau)).all()
        _, d = tk.dftopk_jvp(lib.asarray(x), k, lib.asarray(g), tau_tangent=1.0)
        assert np.isfinite(lib.to_numpy(d)).all()
    for tau in (1e-30, 1e30):
        gx, _ = tk.dftopk_vjp(
            lib.asarray(np.linspace(-1, 1, 7)), 3, lib.asarray(np.ones(7)), tau=tau
        )
        assert np.isfinite(lib.to_numpy(gx)).all()


def test_tau_tangent_where_the_slope_underflows(lib):
    """Finite ``x`` whose ``z`` is finite but ``z dtau / tau`` past the dtype's range, where
    ``p (1 - p)`` has underflowed to 0: the tangent is 0, as the VJP's ``grad_tau`` is, not
    ``0 * inf`` = NaN (every backend's JVP before 2026-12-06)."""
    cases = [
        ("float32", [2.0, 1.0, 0.0], 1e-20, 1.0),
        ("float32", [1e35, 0.0, -1e35], 1e-3, 10.0),
        ("float64", [2.0, 1.0, 0.0], 1e-160, 1.0),
    ]
    for dtype, x, tau, dtau in cases:
        if dtype not in lib.dtypes:
            continue
        xs = lib.asarray(np.array(x), dtype)
        zero = lib.asarray(np.zeros(3), dtype)
        one = lib.asarray(np.ones(3), dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, d = tk.dftopk_jvp(xs, 1, zero, tau=tau, tau_tangent=dtau)
            _, d_x = tk.dftopk_jvp(xs, 1, one, tau=tau, tau_tangent=dtau)
            _, gtau = tk.dftopk_vjp(xs, 1, one, tau=tau)
        np.testing.assert_array_equal(lib.to_numpy(d), 0.0)
        np.testing.assert_array_equal(lib.to_numpy(d_x), 0.0)
        assert float(lib.to_numpy(gtau)) == 0.0


def test_overflowed_gradient_sum(lib):
    """A row whose ``sum(s)`` passes float32's range (``g / tau`` near the largest value):
    ``-inf`` at the finite entry tied with ``b`` (README, infinities), and the entry tied
    with an infinite ``a`` (weight 0) keeps its own ``s`` instead of ``inf * 0`` = NaN."""
    if "float32" not in lib.dtypes:
        pytest.skip(lib.no_dtype("float32"))
    x = np.array([np.inf, 3e38, 1e-45, 0.0, 1.0, -1.0])
    g = np.ones(6)
    tau = 1.2e-38
    s = float(np.float32(1.0) / np.float32(tau))
    gx, _ = tk.dftopk_vjp(
        lib.asarray(x, "float32"), 1, lib.asarray(g, "float32"), tau=tau, output="logits"
    )
    got = lib.to_numpy(gx).astype(np.float64)
    assert got[1] == -np.inf
    np.testing.assert_allclose(got[[0, 2, 3, 4, 5]], s, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_low_precision_gradients(lib, rng, dtype):
    if dtype not in lib.dtypes:
        pytest.skip(lib.no_dtype(dtype))
    x = rng.standard_normal((2, 16)).astype(dtype).astype(np.float64)
    g = rng.standard_normal(x.shape).astype(dtype).astype(np.float64)
    gx, _ = tk.dftopk_vjp(lib.asarray(x, dtype), 4, lib.asarray(g, dtype))
    assert lib.to_numpy(gx).dtype == np.dtype(dtype)
    ref_gx, _ = ref_vjp(x, 4, g)
    tol = {"float16": 3e-3, "float32": 2e-6}[dtype]
    np.testing.assert_allclose(lib.to_numpy(gx).astype(np.float64), ref_gx, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_vjp_relatively_exact_in_both_tails(lib, dtype):
    """``p (1 - p)`` comes from ``exp(-z)``, not from ``p``: near ``p = 1`` a rounded ``p``
    leaves ``1 - p`` with an absolute error of eps/2 (float32: 0.2% of a gradient at
    ``p = 1 - 3e-5``, 100% at ``1 - 6e-8``); here every entry's gradient, down to
    ``e^-60``, is relatively exact on both sides of the threshold."""
    if dtype not in lib.dtypes:
        pytest.skip(lib.no_dtype(dtype))
    x = np.linspace(-30.0, 30.0, 121).astype(dtype).astype(np.float64)
    g = np.ones_like(x)
    for largest in (True, False):
        gx, _ = tk.dftopk_vjp(
            lib.asarray(x, dtype), 60, lib.asarray(g, dtype), tau=0.5, largest=largest
        )
        ref_gx, _ = ref_vjp(x, 60, g, tau=0.5, largest=largest)
        assert np.abs(ref_gx).min() < 1e-25  # both tails reach e^-60
        rtol = {"float32": 1e-4, "float64": 1e-11}[dtype]
        np.testing.assert_allclose(lib.to_numpy(gx).astype(np.float64), ref_gx, rtol=rtol)


@pytest.mark.parametrize("output", ["probs", "logits"])
@pytest.mark.parametrize("case", ["mask", "per_row_tau", "axis0_smallest"])
def test_dftopk_and_vjp_equals_separate_calls(lib, rng, case, output):
    x, kw = _case(rng, case)
    g = rng.standard_normal(x.shape)
    out, vjp = _call(lib, tk.dftopk_and_vjp, x, kw, output=output)
    fn = tk.dftopk if output == "probs" else tk.dftopk_logits
    # autodiff backends run the forward through their own hook: equal up to rounding
    np.testing.assert_allclose(lib.to_numpy(out), lib.to_numpy(_call(lib, fn, x, kw)), rtol=1e-12)
    gx, gtau = vjp(lib.asarray(g))
    ref_gx, ref_gtau = _call(lib, tk.dftopk_vjp, x, kw, g, output=output)
    # the same math, not always the same program: a compiling library (JAX) fuses the
    # backward that reads the kept p (1 - p) and the one that computes it differently,
    # so the row sums may round apart in the last bit (float64 here)
    for got, ref in ((gx, ref_gx), (gtau, ref_gtau)):
        got, ref = lib.to_numpy(got), lib.to_numpy(ref)
        np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-15 * np.abs(ref).max())
    with pytest.raises(ValueError, match="cotangent must have x's shape"):
        vjp(lib.asarray(np.ones(3)))


@pytest.mark.parametrize("output", ["probs", "logits"])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("changed", ["x", "mask", "tau"])
@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_dftopk_and_vjp_ignores_later_in_place_changes(lib, output, largest, changed, dtype):
    """The returned ``vjp`` is the gradient at the forward's ``x``, mask and ``tau``:
    changing one of them in place afterwards (where the library allows it) changes
    nothing.  It used to read them again (NumPy ``x += 1``: the tie weights moved to
    other entries; torch: a changed mask changed the gradient).  float16: the residuals
    hold ``x`` cast to float32, not a copy of ``x`` (one copy, not two)."""
    if dtype not in lib.dtypes:
        pytest.skip(lib.no_dtype(dtype))
    x0 = np.array([[4.0, 1.0, 3.0, 2.0, 3.0], [0.5, -1.0, 2.0, 2.0, 0.0]])
    t0 = np.array([[0.5], [2.0]])
    m0 = np.array([[True, True, True, True, True], [True, False, True, True, True]])
    g = lib.asarray(np.array([[1.0, 0.0, 0.2, -0.3, 0.0], [0.0, 1.0, 0.5, 0.0, -2.0]]), dtype)
    kw = {"output": output, "largest": largest}
    want = tk.dftopk_vjp(
        lib.asarray(x0, dtype), 2, g, tau=lib.asarray(t0, dtype), mask=lib.asarray(m0), **kw
    )
    args = {"x": lib.asarray(x0, dtype), "tau": lib.asarray(t0, dtype), "mask": lib.asarray(m0)}
    _, vjp = tk.dftopk_and_vjp(args["x"], 2, tau=args["tau"], mask=args["mask"], **kw)
    new = {"x": x0[:, ::-1] + 1.0, "tau": t0 * 10.0, "mask": ~m0}[changed]
    try:
        args[changed][...] = lib.asarray(new, dtype)
    except (TypeError, ValueError, NotImplementedError, AttributeError):
        pytest.skip(f"{lib.name} arrays cannot change in place")
    got = vjp(g)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(lib.to_numpy(a), lib.to_numpy(b))


@pytest.mark.parametrize("output", ["probs", "logits"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_nan_entries_are_constants_for_gradients(lib, rng, k, output):
    """NaN rule for gradients: a NaN entry keeps its own term (NaN for probabilities,
    g / tau for logits) and is a constant for the rest of its row: it never sends NaN
    to the other entries or to grad_tau.  For probabilities that is what the same row
    with the NaN replaced by +inf gives (same ranks; p = 1 there, no effect on the
    others).  In a row whose threshold is NaN (k <= its NaN count) grad_tau is NaN, and
    so is every gradient of p (logits keep the closed form's finite terms)."""
    nan = np.nan
    x = np.array([[0.3, nan, 1.0, -0.5, 2.0, 0.7], [1.0, 2.0, nan, nan, 0.5, -1.0]])
    x_inf = np.where(np.isnan(x), np.inf, x)
    tau = np.array([[0.7], [1.3]])
    g = rng.standard_normal(x.shape)
    u = rng.standard_normal(x.shape)
    dtau = rng.standard_normal(tau.shape)
    is_nan = np.isnan(x)
    row_nan = is_nan.sum(-1) >= k  # the k-th largest is a NaN: the threshold is NaN

    def run(xx):
        args = (lib.asarray(xx), k)
        kw = {"tau": lib.asarray(tau), "output": output}
        with np.errstate(invalid="ignore"):
            gx, gt = tk.dftopk_vjp(*args, lib.asarray(g), **kw)
            _, d = tk.dftopk_jvp(*args, lib.asarray(u), tau_tangent=lib.asarray(dtau), **kw)
        return lib.to_numpy(gx), lib.to_numpy(gt), lib.to_numpy(d)

    gx, gt, d = run(x)
    gx_inf, gt_inf, d_inf = run(x_inf)
    ref_gx, ref_t = ref_vjp(x, k, g, tau=tau, output=output)
    np.testing.assert_allclose(gx, ref_gx, atol=1e-12)
    np.testing.assert_allclose(gt[:, 0], np.sum(ref_t, axis=-1), atol=1e-12)
    ok = ~row_nan
    keep = ~is_nan & ok[:, None]
    np.testing.assert_allclose(d[keep], d_inf[keep], atol=1e-12)
    if output == "probs":
        np.testing.assert_allclose(gx[keep], gx_inf[keep], atol=1e-12)
        np.testing.assert_allclose(gt[ok], gt_inf[ok], atol=1e-12)
    assert np.isfinite(gx[keep]).all() and np.isfinite(gt[ok]).all()
    assert np.isfinite(d[keep]).all()
    own = is_nan & ok[:, None]
    if output == "probs":
        assert np.isnan(gx[own]).all() and np.isnan(d[own]).all()
    else:
        np.testing.assert_allclose(gx[own], (g / tau * np.ones_like(x))[own], atol=1e-12)
    assert np.isnan(gt[row_nan]).all()
    assert np.isnan(d[row_nan][~is_nan[row_nan]]).all()  # through the tau tangent
    if output == "probs":
        assert np.isnan(gx[row_nan]).all()


@pytest.mark.parametrize("output", ["probs", "logits"])
def test_masked_entries_stay_zero_in_a_nan_threshold_row(lib, output):
    """Masked entries have gradient exactly 0 even in a row whose threshold is NaN,
    where the row sum is NaN (probabilities) and ``NaN * 0`` would otherwise reach them."""
    x = np.array([[0.3, np.nan, 1.0, -0.5, 2.0, 0.7], [1.0, 2.0, np.nan, 4.0, 0.5, -1.0]])
    mask = np.array([[1, 1, 1, 0, 1, 0], [1, 0, 1, 1, 1, 1]], dtype=bool)
    tau = np.array([[0.5], [2.0]])
    g = np.linspace(-1.0, 2.0, x.size).reshape(x.shape)
    k = np.array([1, 1])  # both rows: the k-th largest valid entry is their NaN
    args = (lib.asarray(x), lib.asarray(k))
    kw = {"tau": lib.asarray(tau), "mask": lib.asarray(mask), "output": output}
    with np.errstate(invalid="ignore"):
        gx, gt = tk.dftopk_vjp(*args, lib.asarray(g), **kw)
        _, d = tk.dftopk_jvp(*args, lib.asarray(g), tau_tangent=lib.asarray(tau), **kw)
    gx, gt, d = lib.to_numpy(gx), lib.to_numpy(gt), lib.to_numpy(d)
    ref_gx, _ = ref_vjp(x, k, g, tau=tau, mask=mask, output=output)
    np.testing.assert_allclose(gx, ref_gx, atol=1e-12)
    np.testing.assert_array_equal(gx[~mask], 0.0)
    np.testing.assert_array_equal(d[~mask], 0.0)
    assert np.isnan(gt).all()
    if output == "probs":
        assert np.isnan(gx[mask]).all() and np.isnan(d[mask]).all()
