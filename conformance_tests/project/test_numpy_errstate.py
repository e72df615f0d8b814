"""NumPy's floating-point flags: the spec's limits are not errors.

A logit past the dtype's range (huge ``|x - theta|`` or tiny ``tau``), a
probability that rounds to 0 or 1 and a float16 logit that overflows on the
way out are the README's limits (Semantics, infinities), so no public entry
point warns or raises about them, whatever the caller's ``np.seterr``; and the
caller's settings are what they were afterwards.
"""

from __future__ import annotations

import warnings
from functools import partial

import numpy as np
import pytest
from topk_core.conformance.reference import ref_dftopk, ref_vjp

import topk_core as tk


def _inputs():
    rng = np.random.default_rng(0)
    for dtype, big in [(np.float16, 6e4), (np.float32, 3e38), (np.float64, 1.7e308)]:
        for n in (5, 3000):  # a short row and one that takes the sampled selection
            x = rng.standard_normal((3, n))
            x[0, :2] = [big, -big]
            x[1, :3] = [np.inf, -np.inf, big / 2]  # +inf and -inf logits in one row
            x[2, :2] = [-np.inf, -np.inf]
            yield x.astype(dtype)


def _and_vjp(x, k, g, **kw):
    return tk.dftopk_and_vjp(x, k, **kw)[1](g)


def _calls(x):
    g = np.linspace(-1.0, 1.0, x.size).reshape(x.shape).astype(x.dtype)
    rel = (x > 0).astype(x.dtype)
    tdt = np.float32 if x.dtype == np.float16 else x.dtype
    for tau in (1.0, 1e-3, np.array([[1e-3], [5.0], [0.5]], dtype=tdt)):
        for mask in (None, np.arange(x.shape[1]) % 3 != 0):
            kw = {"tau": tau, "mask": mask}
            yield partial(tk.dftopk, x, 2, **kw)
            yield partial(tk.dftopk_logits, x, 2, **kw)
            for output in ("probs", "logits"):
                for fn in (tk.dftopk_vjp, _and_vjp, tk.dftopk_jvp):
                    yield partial(fn, x, 2, g, output=output, **kw)
            yield partial(tk.dftopk_vjp, x, 2, g, hard=True, **kw)
            yield partial(tk.topk_bce_loss, x, rel, 2, **kw)
            yield partial(tk.cascade_joint_loss, [x, x], rel, [3, 2], **kw)
    yield partial(tk.topk_threshold, x, 2)
    yield partial(tk.topk_mask, x, 2)


def _same(u, v):
    if isinstance(u, tuple):
        for a, b in zip(u, v, strict=True):
            _same(a, b)
        return
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("x", list(_inputs()), ids=lambda x: f"{x.dtype}-{x.shape[1]}")
def test_limits_neither_warn_nor_raise(x):
    before = np.geterr()
    for call in _calls(x):
        expected = call()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with np.errstate(all="raise"):
                got = call()
                assert np.geterr() == {k: "raise" for k in before}
        _same(got, expected)
    assert np.geterr() == before


def test_overflowing_logits_are_the_reference_limits():
    """The values computed under the library's own flags: ``z = +-inf`` where
    ``|x - theta| / tau`` passes float32's range, the float64 reference's
    probabilities, and gradients that match it."""
    x = np.array([[3e38, -3e38, 1.0, 2.0, 0.5]], dtype=np.float32)
    g = np.array([[0.5, -1.0, 2.0, 1.0, -0.25]], dtype=np.float32)
    with np.errstate(all="raise"):
        z = tk.dftopk_logits(x, 2, tau=1e-3)
        p = tk.dftopk(x, 2, tau=1e-3)
        gx, _ = tk.dftopk_vjp(x, 2, g, tau=1e-3)
    assert z[0, 0] == np.inf and z[0, 1] == -np.inf
    np.testing.assert_allclose(p, ref_dftopk(x, 2, tau=1e-3), atol=1e-6)
    ref_gx, _ = ref_vjp(x, 2, g, tau=1e-3)
    np.testing.assert_allclose(gx, ref_gx, atol=1e-3)


@pytest.mark.parametrize("tau_shape", [None, (1, 1), (1, 3000)])
def test_grad_tau_of_huge_finite_logits_is_finite(tau_shape):
    """Finite ``x`` never gives NaN: ``grad_tau`` of the logits is in float32's range
    here, but a float32 sum of its terms overflows on the way (``inf - inf``)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3000))
    x[0, :2] = [3e38, 1.5e38]
    x = x.astype(np.float32)
    g = np.linspace(-1.0, 1.0, x.size).reshape(x.shape).astype(np.float32)
    tau = 5.0 if tau_shape is None else np.full(tau_shape, 5.0, dtype=np.float32)
    with np.errstate(all="raise"):
        _, gt = tk.dftopk_vjp(x, 2, g, tau=tau, output="logits")
    _, ref_t = ref_vjp(x, 2, g, tau=tau, output="logits")
    ref = ref_t.sum() if tau_shape != (1, 3000) else ref_t
    assert np.isfinite(gt).all()
    np.testing.assert_allclose(np.reshape(gt, np.shape(ref)), ref, rtol=1e-4)


def test_overflowed_gradient_sum_and_tau_tangent_neither_warn_nor_raise():
    """Two more limits (README, infinities): a row whose ``sum(s)`` passes float32's range
    (``-inf`` at ``b``'s tie; the weight 0 of an infinite ``a`` times it was an invalid
    ``inf * 0``), and a ``tau`` tangent where ``p (1 - p)`` underflows (``0 * inf``)."""
    x = np.array([np.inf, 3e38, 1e-45, 0.0, 1.0, -1.0], dtype=np.float32)
    g = np.ones_like(x)
    xf = np.array([1e35, 0.0, -1e35], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            for k in (0, 1):
                gx, _ = tk.dftopk_vjp(x[k:], 1 - k, g[k:], tau=1.2e-38, output="logits")
                assert gx[1 - k] == -np.inf and not np.isnan(gx).any()
            _, d = tk.dftopk_jvp(xf, 1, np.zeros_like(xf), tau=1e-3, tau_tangent=10.0)
    np.testing.assert_array_equal(d, 0.0)


@pytest.mark.parametrize("n", [3, 300, 3000])
@pytest.mark.parametrize("per_row", [False, True])
def test_float16_nan_neither_warns_nor_raises(n, per_row):
    """NumPy's float16 sort hands NaN back as the signalling pattern 0x7c01, whose next
    arithmetic set the invalid flag (a warning; under ``seterr(all='raise')`` a
    FloatingPointError) on the short-row sort path; the README promises no exception."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, n)).astype(np.float16)
    x[0, :1] = np.nan  # k > m: a finite threshold
    x[1, :3] = np.nan  # k <= m: a NaN threshold
    k = np.array([2, 2]) if per_row else 2
    g = np.ones_like(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            theta = tk.topk_threshold(x, k)
            p = tk.dftopk(x, k)
            tk.dftopk_vjp(x, k, g)
    assert np.isfinite(theta[0, 0]) and np.isnan(theta[1, 0])
    assert np.isnan(p[1]).all() and np.isnan(p[0, 0]) and np.isfinite(p[0, 1:]).all()
