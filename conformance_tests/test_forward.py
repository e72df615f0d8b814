"""Forward semantics of the foundation spec on every backend, vs the float64 reference."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from topk_core.conformance.libs import TOLERANCE
from topk_core.conformance.reference import ref_dftopk, ref_threshold, ref_topk_mask

import topk_core as tk


def _check(lib, out, expected, dtype, *, scale=1.0):
    got = lib.to_numpy(out).astype(np.float64)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=TOLERANCE[dtype] * scale, rtol=0)


def _data(rng, shape, dtype, *, ties=False):
    x = rng.standard_normal(shape)
    if ties:
        x = np.round(x * 2) / 2  # many exact ties, incl. at the boundary
    # round to the tested dtype so the reference sees the same values
    if dtype == "bfloat16":
        x = x.astype(np.float32)
        x = (x.view(np.uint32) & 0xFFFF0000).view(np.float32)
    return x.astype(np.float64 if dtype == "bfloat16" else dtype).astype(np.float64)


@pytest.mark.parametrize("output", ["probs", "logits"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_forward_matches_reference(lib, rng, dtype, output):
    if dtype not in lib.dtypes:
        pytest.skip(lib.no_dtype(dtype))
    x = _data(rng, (3, 17), dtype)
    for k in (0, 1, 5, 16, 17):
        fn = tk.dftopk if output == "probs" else tk.dftopk_logits
        out = fn(lib.asarray(x, dtype), k, tau=0.7)
        ref = ref_dftopk(x, k, tau=0.7, output=output)
        scale = 1.0 if output == "probs" else 20.0  # logits are O(|x|/tau)
        if output == "logits":
            ref = np.where(np.isinf(ref), ref, ref)
        _check(lib, out, ref, dtype, scale=scale)


@pytest.mark.parametrize("axis", [0, 1, -1, -3])
def test_axis_and_nd_batches(lib, rng, axis):
    x = _data(rng, (4, 6, 5), "float64")
    out = tk.dftopk(lib.asarray(x), 2, tau=0.5, axis=axis)
    _check(lib, out, ref_dftopk(x, 2, tau=0.5, axis=axis), "float64")
    th = tk.topk_threshold(lib.asarray(x), 2, axis=axis)
    _check(lib, th, ref_threshold(x, 2, axis=axis), "float64")


def test_per_row_k_and_masks(lib, rng):
    x = _data(rng, (5, 9), "float64", ties=True)
    k = np.array([0, 1, 4, 8, 9])
    mask = rng.random((5, 9)) > 0.35
    mask[1] = False  # a row with no valid entry
    mask[2, :2] = True
    mask[2, 2:] = False  # fewer than k+1 valid entries
    kk = lib.asarray(k)
    mm = lib.asarray(mask)
    for largest in (True, False):
        out = tk.dftopk(lib.asarray(x), kk, tau=0.3, mask=mm, largest=largest)
        _check(lib, out, ref_dftopk(x, k, tau=0.3, mask=mask, largest=largest), "float64")
        got = lib.to_numpy(out)
        assert np.all(got[~mask] == 0.0)  # masked: exactly 0
        lg = tk.dftopk_logits(lib.asarray(x), kk, mask=mm, largest=largest)
        assert np.all(lib.to_numpy(lg)[~mask] == -np.inf)
        hard = tk.topk_mask(lib.asarray(x), kk, mask=mm, largest=largest)
        ref_hard = ref_topk_mask(x, k, mask=mask, largest=largest)
        np.testing.assert_array_equal(lib.to_numpy(hard), ref_hard)
    # scalar k with a mask is clipped to each row's n_valid
    out = tk.dftopk(lib.asarray(x), 7, mask=mm)
    _check(lib, out, ref_dftopk(x, 7, mask=mask), "float64")


def test_masked_values_never_influence(lib, rng):
    x = _data(rng, (2, 8), "float64")
    mask = np.array([[True] * 5 + [False] * 3] * 2)
    y = x.copy()
    y[:, 5:] = [1e30, -1e30, np.nan]
    a = lib.to_numpy(tk.dftopk(lib.asarray(x), 2, mask=lib.asarray(mask)))
    b = lib.to_numpy(tk.dftopk(lib.asarray(y), 2, mask=lib.asarray(mask)))
    np.testing.assert_array_equal(a, b)


def test_per_row_k_broadcasts(lib, rng):
    x = _data(rng, (3, 4, 6), "float64")
    k = np.array([[1], [2], [5]])  # broadcasts to batch shape (3, 4)
    out = tk.dftopk(lib.asarray(x), lib.asarray(k))
    _check(lib, out, ref_dftopk(x, np.broadcast_to(k, (3, 4))), "float64")
    # out-of-range per-row values are clipped, not an error
    out = tk.dftopk(lib.asarray(x[0]), lib.asarray(np.array([-3, 0, 2, 99])))
    _check(lib, out, ref_dftopk(x[0], np.array([0, 0, 2, 6])), "float64")


def test_largest_false_equals_negation(lib, rng):
    x = _data(rng, (3, 11), "float64", ties=True)
    a = tk.dftopk(lib.asarray(x), 4, largest=False, tau=0.2)
    b = tk.dftopk(lib.asarray(-x), 4, tau=0.2)
    np.testing.assert_array_equal(lib.to_numpy(a), lib.to_numpy(b))


def test_ties_at_boundary(lib):
    x = np.array([3.0, 2.0, 2.0, 2.0, 1.0])
    p = lib.to_numpy(tk.dftopk(lib.asarray(x), 2))
    # a = b = 2: theta = 2, the three tied entries get exactly 1/2
    np.testing.assert_allclose(p, [1 / (1 + np.exp(-1)), 0.5, 0.5, 0.5, 1 / (1 + np.exp(1))])
    hard = lib.to_numpy(tk.topk_mask(lib.asarray(x), 2))
    np.testing.assert_array_equal(hard, [1, 1, 0, 0, 0])  # lower index wins the tie


@pytest.mark.parametrize(
    ("x", "k", "expected"),
    [
        ([np.inf, 1.0, 0.0], 1, [1.0, 0.0, 0.0]),
        ([np.inf, np.inf, 0.0], 1, [0.5, 0.5, 0.0]),
        ([-np.inf, 0.0, 1.0], 2, [0.0, 1.0, 1.0]),
        ([np.inf, -np.inf], 1, [1.0, 0.0]),
        ([-np.inf, -np.inf, 5.0], 2, [0.5, 0.5, 1.0]),
    ],
)
def test_infinities_are_limits(lib, x, k, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow/invalid warnings either
        p = lib.to_numpy(tk.dftopk(lib.asarray(np.array(x)), k))
    np.testing.assert_allclose(p, expected, atol=1e-7)
    np.testing.assert_allclose(p, ref_dftopk(np.array(x), k), atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_k_zero_and_n_finite_never_nan(lib, rng, dtype):
    x = _data(rng, (4, 7), dtype)
    for k in (0, 7):
        p = lib.to_numpy(tk.dftopk(lib.asarray(x, dtype), k, tau=1e-3))
        assert not np.isnan(p).any()
        np.testing.assert_array_equal(p, np.full_like(p, 0.0 if k == 0 else 1.0))
    th = lib.to_numpy(tk.topk_threshold(lib.asarray(x, dtype), 0))
    assert np.all(th == np.inf)


NAN = np.nan
#: rows with NaN: below, at and above the boundary, beside +inf, and a row without
NAN_ROWS = np.array(
    [
        [0.3, NAN, 1.0, -0.5, 2.0],
        [NAN, 1.0, NAN, np.inf, 0.0],
        [NAN, NAN, NAN, NAN, NAN],
        [1.0, 4.0, 3.0, 2.0, 5.0],
    ]
)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("largest", [True, False])
def test_nan_ranks_first(lib, k, largest):
    """NaN ranks above +inf (below -inf for largest=False); topk_mask has exactly k ones."""
    x = NAN_ROWS
    xl = lib.asarray(x)
    kw = {"largest": largest}
    with np.errstate(invalid="ignore"):
        p = lib.to_numpy(tk.dftopk(xl, k, tau=0.5, **kw))
        z = lib.to_numpy(tk.dftopk_logits(xl, k, tau=0.5, **kw))
        th = lib.to_numpy(tk.topk_threshold(xl, k, **kw))
        m = lib.to_numpy(tk.topk_mask(xl, k, **kw))
    np.testing.assert_allclose(p, ref_dftopk(x, k, tau=0.5, **kw), atol=1e-12)
    np.testing.assert_allclose(z, ref_dftopk(x, k, tau=0.5, output="logits", **kw), atol=1e-12)
    np.testing.assert_allclose(th, ref_threshold(x, k, **kw), atol=1e-12)
    np.testing.assert_array_equal(m, ref_topk_mask(x, k, **kw))
    np.testing.assert_array_equal(m.sum(-1), np.full(4, k))
    assert np.isnan(p[np.isnan(x)]).all()  # a NaN score never turns into a number
    np.testing.assert_allclose(p[3], ref_dftopk(x[3], k, tau=0.5, **kw), atol=1e-12)


def test_nan_example_from_the_readme(lib):
    """x = [0.3, nan, 1.0, -0.5, 2.0], k = 2: the NaN and 2.0 are the top 2."""
    x = lib.asarray(NAN_ROWS[:1])
    with np.errstate(invalid="ignore"):
        m = lib.to_numpy(tk.topk_mask(x, 2))
        th = lib.to_numpy(tk.topk_threshold(x, 2))
        p = lib.to_numpy(tk.dftopk(x, 2))
    np.testing.assert_array_equal(m, [[0, 1, 0, 0, 1]])
    np.testing.assert_array_equal(th, [[1.5]])  # a = 2.0, b = 1.0
    expected = 1 / (1 + np.exp(-(NAN_ROWS[0] - 1.5)))
    np.testing.assert_allclose(p, expected[None], atol=1e-12)


def test_nan_with_mask_and_per_row_k(lib):
    """Masked NaN entries are ignored; per-row k follows the same rule."""
    x = NAN_ROWS
    mask = np.ones(x.shape, dtype=bool)
    mask[0, 1] = False  # the NaN of row 0 is masked out
    mask[1, 0] = False
    k = np.array([2, 1, 3, 4])
    with np.errstate(invalid="ignore"):
        p = lib.to_numpy(tk.dftopk(lib.asarray(x), lib.asarray(k), mask=lib.asarray(mask)))
        m = lib.to_numpy(tk.topk_mask(lib.asarray(x), lib.asarray(k), mask=lib.asarray(mask)))
    np.testing.assert_allclose(p, ref_dftopk(x, k, mask=mask), atol=1e-12)
    np.testing.assert_array_equal(m, ref_topk_mask(x, k, mask=mask))
    np.testing.assert_array_equal(m.sum(-1), np.minimum(k, mask.sum(-1)))
    assert not np.isnan(p[0]).any()  # row 0's only NaN is masked


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_threshold_is_rounded_once(lib, dtype):
    """``theta`` of half-precision scores is ``a/2 + b/2`` rounded once to x's dtype.

    With subnormal ``a`` and ``b`` the halves are not representable in the half type:
    ``a = 37 u``, ``b = 26 u`` (``u`` its smallest subnormal) give ``31.5 u``, which
    rounds to even, ``32 u``; halving in the half type first would give ``18 u + 13 u``.
    """
    if dtype not in lib.dtypes:
        pytest.skip(lib.no_dtype(dtype))
    u = 2.0**-24 if dtype == "float16" else 2.0**-133
    if dtype == "bfloat16":
        # bfloat16's subnormals are float32's: a library that flushes those (XLA on the
        # CPU) computes 0 for every entry here, which says nothing about the rounding
        tiny = lib.asarray(np.array([2.0**-130]), "float32")
        if lib.to_numpy(tiny / 2)[0] == 0:
            pytest.skip(f"{lib.name} flushes float32 subnormals to zero")
    x = np.array([[37 * u, 26 * u, 3 * u, 0.0, -5 * u]])
    for largest, sign in ((True, 1.0), (False, -1.0)):
        th = lib.to_numpy(tk.topk_threshold(lib.asarray(sign * x, dtype), 1, largest=largest))
        np.testing.assert_array_equal(th.astype(np.float64), [[sign * 32 * u]])


@pytest.mark.parametrize("frac", [0.02, 0.5])
def test_nan_in_long_rows(lib, frac):
    """NaN ranks first in rows long enough for a backend's fast selection paths.

    Rows of 70001 (past the sampled brackets' and radix passes' size thresholds) with
    NaN at the ranks a sample would bracket, with and without a NaN-free row beside
    them; k below, at and above each row's NaN count, scalar and per row.  The expected
    threshold comes from ``np.sort`` (NaN sorts last ascending, so first descending).
    """
    if "float32" not in lib.dtypes:
        pytest.skip("no float32")
    rng = np.random.default_rng(20261204)
    n = 70001
    x = rng.standard_normal((3, n)).astype(np.float32)
    x[:2][rng.random((2, n)) < frac] = np.nan
    desc = np.sort(x, axis=-1)[:, ::-1].astype(np.float64)
    ext = np.concatenate([np.full((3, 1), np.inf), desc, np.full((3, 1), -np.inf)], -1)
    n_nan = int(np.isnan(x[0]).sum())
    for rows in (3, 2):  # 2: only NaN rows (every row's bracket may miss)
        xr = x[:rows]
        xl = lib.asarray(xr, "float32")
        for kk in (n_nan + 1, np.array([n_nan, 5, n // 10])[:rows]):
            kr = np.broadcast_to(kk, (rows,))
            a, b = ext[np.arange(rows), kr], ext[np.arange(rows), kr + 1]
            with np.errstate(invalid="ignore"):
                want = (a / 2 + b / 2).astype(np.float32)[:, None]
                kl = kk if isinstance(kk, int) else lib.asarray(kk)
                th = lib.to_numpy(tk.topk_threshold(xl, kl))
                m = lib.to_numpy(tk.topk_mask(xl, kl))
                p = lib.to_numpy(tk.dftopk(xl, kl))
            np.testing.assert_array_equal(th, want, err_msg=f"k={kk}")
            np.testing.assert_array_equal(m.sum(-1), kr)
            nan = np.isnan(xr)
            assert (m[nan] == 1).sum() == np.minimum(kr, nan.sum(-1)).sum()  # NaN first
            assert np.isnan(p[nan]).all() and (rows == 2 or not np.isnan(p[2]).any())


def test_huge_float32_values_do_not_overflow(lib):
    if "float32" not in lib.dtypes:
        pytest.skip("no float32")
    x = np.array([3e38, 3e38, 2.9e38, -3e38], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        th = lib.to_numpy(tk.topk_threshold(lib.asarray(x, "float32"), 1))
        p = lib.to_numpy(tk.dftopk(lib.asarray(x, "float32"), 1, tau=1e30))
    assert th[0] == np.float32(3e38)  # a = b = 3e38; (a + b)/2 would be inf
    np.testing.assert_allclose(p[:2], [0.5, 0.5], atol=1e-6)
    assert np.isfinite(p).all()


@pytest.mark.parametrize("tau", [1e-30, 1e-6, 1e6, 1e30])
def test_tiny_and_huge_tau(lib, rng, tau):
    x = _data(rng, (2, 9), "float64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = tk.dftopk(lib.asarray(x), 3, tau=tau)
    _check(lib, p, ref_dftopk(x, 3, tau=tau), "float64")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("as_array", [False, True], ids=["float_tau", "array_tau"])
def test_smallest_allowed_tau(lib, dtype, as_array):
    """``tau`` down to the smallest normal number (the lower end of its range): ``tau / 2``
    is subnormal there, which XLA on the CPU flushes to 0 (JAX's logits were ``0 / 0``
    = NaN at ``x = theta`` before 2026-12-06)."""
    if dtype not in lib.dtypes:
        pytest.skip(lib.no_dtype(dtype))
    tiny = float(np.finfo(dtype).tiny)
    x = np.array([[1.0, 0.0, 1.0]])  # a = b = 1: theta = 1, z = [0, -1/tau, 0]
    for tau in (tiny, 1.5 * tiny, 3 * tiny):
        t = lib.asarray(np.full((1, 1), tau), dtype) if as_array else tau
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            p = lib.to_numpy(tk.dftopk(lib.asarray(x, dtype), 1, tau=t))
            z = lib.to_numpy(tk.dftopk_logits(lib.asarray(x, dtype), 1, tau=t))
        np.testing.assert_array_equal(p, [[0.5, 0.0, 0.5]])
        np.testing.assert_allclose(z, [[0.0, -1.0 / tau, 0.0]], rtol=1e-6)


def test_sigmoid_tails_keep_relative_accuracy(lib):
    x = np.array([0.0, -60.0, -650.0, 60.0])
    p = lib.to_numpy(tk.dftopk(lib.asarray(x), 1))  # theta = 30; exp(-680) is normal
    ref = ref_dftopk(x, 1)
    np.testing.assert_allclose(p, ref, rtol=1e-12)
    assert p[2] > 0


def test_per_row_tau(lib, rng):
    x = _data(rng, (3, 6), "float64")
    tau = np.array([[0.1], [1.0], [10.0]])
    out = tk.dftopk(lib.asarray(x), 2, tau=lib.asarray(tau))
    _check(lib, out, ref_dftopk(x, 2, tau=tau), "float64")
    out = tk.dftopk(lib.asarray(x.T), 2, tau=lib.asarray(tau.T), axis=0)
    _check(lib, out, ref_dftopk(x.T, 2, tau=tau.T, axis=0), "float64")


def test_topk_mask_exact_count(lib, rng):
    x = _data(rng, (6, 10), "float64", ties=True)
    for k in range(11):
        m = lib.to_numpy(tk.topk_mask(lib.asarray(x), k))
        assert m.dtype == np.float64
        np.testing.assert_array_equal(m.sum(-1), np.full(6, k))
        np.testing.assert_array_equal(m, ref_topk_mask(x, k))


def test_empty_selection_axis(lib):
    x = np.zeros((3, 0))
    p = tk.dftopk(lib.asarray(x), 0)
    assert lib.to_numpy(p).shape == (3, 0)
    # a per-row k (clipped to 0) too: NumPy's short-row sort path raised IndexError
    xx = lib.asarray(x)
    for k in (lib.asarray(np.zeros(3, dtype=np.int64)), lib.asarray(np.array(2))):
        for out in (tk.dftopk(xx, k), tk.dftopk_logits(xx, k), tk.topk_mask(xx, k)):
            assert lib.to_numpy(out).shape == (3, 0)
        assert lib.to_numpy(tk.dftopk_vjp(xx, k, xx)[0]).shape == (3, 0)
        np.testing.assert_array_equal(lib.to_numpy(tk.topk_threshold(xx, k)), np.zeros((3, 1)))


@pytest.mark.parametrize("kdtype", ["int8", "uint8", "int16", "uint16", "int32", "uint32"])
def test_narrow_integer_k(lib, kdtype):
    """A k array of any integer dtype selects as an int64 one: the clipping to the row
    counts used to run in k's own dtype, where 300 wraps (int8 k = 100 selected 44)."""
    x = np.arange(600.0).reshape(2, 300)
    info = np.iinfo(kdtype)
    k = np.array([min(100, info.max), info.max])  # the dtype's largest is clipped to n
    want = np.minimum(k, 300)
    got = tk.topk_mask(lib.asarray(x), lib.asarray(k.astype(kdtype)))
    np.testing.assert_array_equal(lib.to_numpy(got), ref_topk_mask(x, want))
    out = tk.dftopk(lib.asarray(x), lib.asarray(k.astype(kdtype)), tau=2.0)
    _check(lib, out, ref_dftopk(x, want, tau=2.0), "float64")


@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 5), (0, 70001)], ids=str)
def test_empty_batch(lib, shape):
    """No rows to select in: every function returns its empty result (rows of 70001 take
    the long-row selection paths)."""
    x = lib.asarray(np.zeros(shape))
    mask = lib.asarray(np.ones(shape, dtype=bool))
    tau = lib.asarray(np.ones(shape[:-1] + (1,)))
    for k in (1, lib.asarray(np.ones(shape[:-1], dtype=np.int64))):
        for out in (
            tk.dftopk(x, k),
            tk.dftopk(x, k, tau=tau, mask=mask, largest=False),
            tk.dftopk(x, k, hard=True),
            tk.dftopk_logits(x, k, mask=mask),
            tk.topk_mask(x, k),
        ):
            assert lib.to_numpy(out).shape == shape
        assert lib.to_numpy(tk.topk_threshold(x, k)).shape == shape[:-1] + (1,)


def test_scalar_k_with_mask_at_the_smallest_row(lib, rng):
    """k equal to the smallest row's valid count: that row selects all its entries."""
    x = _data(rng, (3, 6), "float64", ties=True)
    mask = np.ones((3, 6), dtype=bool)
    mask[1, :2] = False
    mask[2, 3:] = False
    for k in (0, 1, 3):
        for largest in (True, False):
            out = tk.dftopk(lib.asarray(x), k, mask=lib.asarray(mask), largest=largest)
            _check(lib, out, ref_dftopk(x, k, mask=mask, largest=largest), "float64")
            hard = tk.topk_mask(lib.asarray(x), k, mask=lib.asarray(mask), largest=largest)
            np.testing.assert_array_equal(
                lib.to_numpy(hard), ref_topk_mask(x, k, mask=mask, largest=largest)
            )
