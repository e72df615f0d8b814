"""Top-k losses (topk_bce_loss, cascade_joint_loss) and their torch / JAX adapters.

Values are checked on every backend against a float64 reference written here
from the definitions (naive ``log p`` / ``log(1 - q)``, fine for moderate
logits); gradients on torch (autograd) and JAX (grad) against central finite
differences in float64; stability for extreme scores and temperatures.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from topk_core.conformance.libs import TOLERANCE
from topk_core.conformance.reference import finite_difference, ref_dftopk, ref_topk_mask

import topk_core as tk
from topk_core.losses import cascade_joint_loss, topk_bce_loss

SHAPE = (3, 8)  # one shape for most cases: JAX compiles per shape and dtype
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
needs_jax = pytest.mark.skipif(not HAS_JAX, reason="jax is not installed")


# ---------------------------------------------------------------------------
# float64 reference, from the definitions


def ref_bce(scores, relevance, k, tau=1.0, mask=None, reduction="mean", axis=-1):
    p = ref_dftopk(scores, k, tau=tau, axis=axis, mask=mask)
    y = ref_topk_mask(relevance, k, axis=axis, mask=mask)
    valid = np.ones(p.shape, bool) if mask is None else np.broadcast_to(mask, p.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        elem = np.where(y == 1, -np.log(p), -np.log1p(-p))
    elem = np.where(valid, elem, 0.0)
    return _ref_reduce(elem, valid, reduction)


def _ref_reduce(elem, valid, reduction):
    if reduction == "none":
        return elem
    if reduction == "sum":
        return elem.sum()
    return elem.sum() / max(valid.sum(), 1)


def ref_joint_terms(stages, relevance, ks, taus, mask=None, reduction="mean"):
    ps = [ref_dftopk(s, k, tau=t, mask=m) for s, k, t, m in zip(stages, ks, taus, [mask] * 9)]
    valid = np.ones(ps[0].shape, bool) if mask is None else np.broadcast_to(mask, ps[0].shape)
    y = ref_topk_mask(relevance, ks[-1], mask=mask)
    q = np.prod(ps, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        joint = np.where(valid, np.where(y == 1, -np.log(q), -np.log1p(-q)), 0.0)
    terms = [_ref_reduce(joint, valid, reduction)]
    for s, k, t in zip(stages, ks, taus):
        terms.append(ref_bce(s, relevance, k, tau=t, mask=mask, reduction=reduction))
    return terms


def _distinct(rng, shape, spread=3.0):
    """Scores with gaps >> the finite-difference step (no ties, no kinks)."""
    n = int(np.prod(shape))
    x = rng.permutation(n).astype(np.float64) / n * spread
    x = x + rng.uniform(0, 0.2 / n, size=n) - spread / 2
    return x.reshape(shape)


def _close(lib, got, expected, dtype, scale=1.0):
    got = lib.to_numpy(got).astype(np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape
    tol = TOLERANCE[dtype] * scale
    np.testing.assert_allclose(got, expected, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------
# values on every backend


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("masked", [False, True])
def test_bce_matches_reference(lib, rng, dtype, masked):
    scores = rng.standard_normal(SHAPE).astype(dtype).astype(np.float64)
    relevance = rng.standard_normal(SHAPE)
    mask = rng.uniform(size=SHAPE) > 0.3 if masked else None
    kw = {} if mask is None else {"mask": lib.asarray(mask)}
    s, r = lib.asarray(scores, dtype), lib.asarray(relevance, dtype)
    for k, tau in [(0, 1.0), (3, 0.7), (8, 2.0)]:
        for reduction in ("mean", "sum", "none"):
            out = topk_bce_loss(s, r, k, tau=tau, reduction=reduction, **kw)
            ref = ref_bce(scores, relevance, k, tau=tau, mask=mask, reduction=reduction)
            assert str(out.dtype).endswith(dtype)
            _close(lib, out, ref, dtype, scale=50.0 if reduction == "sum" else 5.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_bce_half_dtypes(lib, rng, dtype):
    if dtype not in lib.dtypes:
        pytest.skip(lib.no_dtype(dtype))
    # values exactly representable in both half types
    scores = rng.integers(-16, 16, size=SHAPE) / 8.0
    relevance = rng.standard_normal(SHAPE)
    out = topk_bce_loss(lib.asarray(scores, dtype), lib.asarray(relevance), 3, tau=0.5)
    _close(lib, out, ref_bce(scores, relevance, 3, tau=0.5), dtype, scale=2.0)


def test_bce_axis_and_per_row_k(lib, rng):
    scores = rng.standard_normal(SHAPE)
    relevance = rng.standard_normal(SHAPE)
    s, r = lib.asarray(scores), lib.asarray(relevance)
    out = topk_bce_loss(s, r, 2, axis=0, reduction="none")
    _close(lib, out, ref_bce(scores.T, relevance.T, 2, reduction="none").T, "float64")
    k = np.array([0, 4, 8])
    out = topk_bce_loss(s, r, lib.asarray(k))
    _close(lib, out, ref_bce(scores, relevance, k), "float64")


def test_bce_labels_break_ties_by_index(lib):
    # relevance ties across the top-2 boundary: labels are entries 1 and 2 of
    # each row; scores put entries 1 and 3 on top, so only the labels decide
    scores = np.tile([[0.0, 2.0, 0.0, 2.0, -1.0, -1.0, -1.0, -1.0]], (3, 1))
    relevance = np.tile([[1.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0]], (3, 1))
    out = lib.to_numpy(
        topk_bce_loss(lib.asarray(scores), lib.asarray(relevance), 2, reduction="none")
    )
    # theta = 1, z = x - 1: label 1 costs softplus(-z), label 0 softplus(z)
    sp = np.logaddexp(0, [-1.0, 1.0, -2.0])  # softplus(-1), softplus(1), softplus(-2)
    expected = [sp[0], sp[0], sp[1], sp[1]] + [sp[2]] * 4
    np.testing.assert_allclose(out, np.tile(expected, (3, 1)), rtol=1e-12)
    np.testing.assert_allclose(out, ref_bce(scores, relevance, 2, reduction="none"), rtol=1e-12)


def test_mean_over_valid_entries_and_empty_rows(lib, rng):
    scores = rng.standard_normal(SHAPE)
    relevance = rng.standard_normal(SHAPE)
    mask = np.zeros(SHAPE, bool)
    mask[0] = True
    m = lib.asarray(mask)
    s, r = lib.asarray(scores), lib.asarray(relevance)
    total = topk_bce_loss(s, r, 2, mask=m, reduction="sum")
    mean = topk_bce_loss(s, r, 2, mask=m)
    none = lib.to_numpy(topk_bce_loss(s, r, 2, mask=m, reduction="none"))
    assert np.all(none[1:] == 0.0)
    _close(lib, mean, float(lib.to_numpy(total)) / SHAPE[1], "float64")
    nothing = lib.asarray(np.zeros(SHAPE, bool))
    assert float(lib.to_numpy(topk_bce_loss(s, r, 2, mask=nothing))) == 0.0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n_stages", [2, 3])
def test_joint_matches_reference(lib, rng, dtype, n_stages):
    shape = SHAPE
    stages = [rng.standard_normal(shape).astype(dtype).astype(np.float64) for _ in range(n_stages)]
    relevance = rng.standard_normal(shape)
    mask = rng.uniform(size=shape) > 0.2
    ks = (6, 4, 2)[-n_stages:]
    taus = (1.5, 0.8, 0.5)[-n_stages:]
    args = ([lib.asarray(s, dtype) for s in stages], lib.asarray(relevance, dtype), ks)
    for reduction in ("mean", "sum"):
        ref = ref_joint_terms(stages, relevance, ks, taus, mask, reduction)
        loss, terms = cascade_joint_loss(
            *args,
            tau=taus,
            mask=lib.asarray(mask),
            reduction=reduction,
            return_terms=True,
        )
        scale = 50.0 if reduction == "sum" else 5.0
        assert len(terms) == n_stages + 1
        for got, want in zip(terms, ref):
            _close(lib, got, want, dtype, scale=scale)
        _close(lib, loss, sum(ref), dtype, scale=scale)
        # fixed weights, including a zero that drops a term
        w = [0.5, 0.0] + [2.0] * (n_stages - 1)
        out = cascade_joint_loss(
            *args, tau=taus, mask=lib.asarray(mask), reduction=reduction, weights=w
        )
        _close(lib, out, sum(a * b for a, b in zip(w, ref)), dtype, scale=scale)
        # learned uncertainty weights: sum exp(-s) L + s
        s = np.linspace(-0.5, 1.0, n_stages + 1)
        out = cascade_joint_loss(
            *args,
            tau=taus,
            mask=lib.asarray(mask),
            reduction=reduction,
            log_vars=lib.asarray(s, dtype),
        )
        want = sum(math.exp(-st) * t + st for st, t in zip(s, ref))
        _close(lib, out, want, dtype, scale=scale)


def test_joint_single_k_and_tau_shared(lib, rng):
    stages = [rng.standard_normal(SHAPE) for _ in range(2)]
    relevance = rng.standard_normal(SHAPE)
    out = cascade_joint_loss([lib.asarray(s) for s in stages], lib.asarray(relevance), 3, tau=0.9)
    ref = ref_joint_terms(stages, relevance, (3, 3), (0.9, 0.9))
    _close(lib, out, sum(ref), "float64")


def test_joint_exact_when_product_rounds_to_one(lib):
    # both stages put a negative item 80 logits above the threshold: q = 1 - 2e^-80
    # rounds to 1 in float64 (log1mexp(log q) would give inf); the loss is 80 - log 2
    s = np.full(SHAPE, -160.0)
    s[:, :2] = [0.0, 160.0]
    relevance = np.full(SHAPE, -1.0)
    relevance[:, :2] = [1.0, 0.0]  # the top-1 is entry 0
    _, terms = cascade_joint_loss(
        [lib.asarray(s), lib.asarray(s)],
        lib.asarray(relevance),
        1,
        reduction="sum",
        return_terms=True,
    )
    # entry 1: a = 160, b = 0, z = 80 in both stages; entry 0: z = -80 (positive);
    joint = float(lib.to_numpy(terms[0]))
    row = (80 - math.log(2 - math.exp(-80))) + 2 * (80 + math.log1p(math.exp(-80)))
    expected = SHAPE[0] * row  # the other negatives add ~e^-480 each
    assert math.isfinite(joint)
    assert abs(joint - expected) < 1e-9 * expected


# ---------------------------------------------------------------------------
# extreme values: finite and NaN-free


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("tau", [1e-6, 1.0, 1e6])
def test_extreme_scores_and_tau_finite(lib, dtype, tau):
    scores = np.tile([[1e30, -1e30, 3.0, 0.5, -2.0, 1e-30, 0.0, 1.0]], (3, 1))
    relevance = np.tile([[5.0, 0.0, 4.0, 1.0, 0.5, 2.0, 0.0, 0.0]], (3, 1))
    other = scores[:, ::-1].copy()
    for k in (2, 4):  # few distinct k: JAX compiles once per static k
        out = topk_bce_loss(lib.asarray(scores, dtype), lib.asarray(relevance), k, tau=tau)
        assert np.isfinite(lib.to_numpy(out)).all()
        loss = cascade_joint_loss(
            [lib.asarray(scores, dtype), lib.asarray(other, dtype)],
            lib.asarray(relevance),
            (k + 2, k),
            tau=tau,
        )
        assert np.isfinite(lib.to_numpy(loss)).all()


def _row(values, fill):
    return np.tile(list(values) + [fill] * (SHAPE[1] - len(values)), (SHAPE[0], 1))


def test_infinite_scores(lib):
    relevance = _row([5.0, 4.0, 1.0, 0.0], -1.0)
    mask_np = _row([True, True, True, False], True)
    mask = lib.asarray(mask_np)
    rel = lib.asarray(relevance)
    # infinities on the right side of the threshold: exact loss, finite
    right = _row([np.inf, 1.0, 0.0, np.inf], -2.0)  # the 4th is masked out
    out = lib.to_numpy(topk_bce_loss(lib.asarray(right), rel, 1, mask=mask, reduction="none"))
    ref = ref_bce(right, relevance, 1, mask=mask_np, reduction="none")
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    assert np.all(out[:, 0] == 0.0) and np.all(out[:, 3] == 0.0)
    pair = [lib.asarray(right), lib.asarray(_row([np.inf, -np.inf, -1.0, 0.0], -3.0))]
    for tau in (1e-6, 1e6):
        loss = lib.to_numpy(cascade_joint_loss(pair, rel, 1, tau=tau, mask=mask))
        assert np.isfinite(loss)
    # an infinite score on the wrong side: the exact loss is +inf, never NaN
    wrong = _row([0.0, 1.0, np.inf, -1.0], -2.0)
    out = lib.to_numpy(topk_bce_loss(lib.asarray(wrong), rel, 1, reduction="none"))
    assert np.all(out[:, 2] == np.inf) and not np.isnan(out).any()
    loss = cascade_joint_loss([lib.asarray(wrong)] * 2, rel, 1)
    assert lib.to_numpy(loss) == np.inf


def test_nan_propagates(lib):
    scores = _row([np.nan, 1.0, 0.0], -1.0)
    out = topk_bce_loss(lib.asarray(scores), lib.asarray(_row([1.0, 2.0, 3.0], 0.0)), 1)
    assert np.isnan(lib.to_numpy(out))


def test_nan_propagates_through_the_joint_term(lib):
    """A NaN threshold (here stage 2 keeps k = 0 and a NaN ranks first) makes that
    stage's logits NaN; the end-to-end term then came out +inf, a NaN read as q = 1."""
    stages = [_row([3.0, 2.0, 1.0], 0.0), _row([np.nan, 1.0, 0.0], -1.0)]
    rel = lib.asarray(_row([1.0, 2.0, 3.0], 0.0))
    for reduction in ("mean", "sum"):
        _, terms = cascade_joint_loss(
            [lib.asarray(s) for s in stages], rel, (1, 0), reduction=reduction, return_terms=True
        )
        joint, first, second = (float(lib.to_numpy(t)) for t in terms)
        assert math.isnan(joint) and math.isnan(second) and math.isfinite(first)
    # the NaN masked out: every term finite again
    mask = lib.asarray(_row([False], True))
    loss = cascade_joint_loss([lib.asarray(s) for s in stages], rel, (1, 0), mask=mask)
    assert np.isfinite(lib.to_numpy(loss))


def test_mean_in_range_where_the_sum_overflows(lib):
    """float32 losses near 1e38 per entry: their sum passes float32's largest value, their
    mean does not (it came out +inf)."""
    scores = lib.asarray(np.tile([1e38, -1e38], (SHAPE[0], SHAPE[1] // 2)), "float32")
    rel = lib.asarray(np.tile([0.0, 1.0], (SHAPE[0], SHAPE[1] // 2)))  # every entry wrong
    mean = float(lib.to_numpy(topk_bce_loss(scores, rel, SHAPE[1] // 2)))
    np.testing.assert_allclose(mean, 1e38, rtol=1e-6)
    assert float(lib.to_numpy(topk_bce_loss(scores, rel, SHAPE[1] // 2, reduction="sum"))) == np.inf
    joint = cascade_joint_loss([scores, scores], rel, SHAPE[1] // 2, return_terms=True)[1][1]
    np.testing.assert_allclose(float(lib.to_numpy(joint)), 1e38, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.floats(min_value=-1e300, max_value=1e300, allow_nan=False),
        min_size=2,
        max_size=8,
    ),
    st.integers(min_value=0, max_value=8),
    st.sampled_from([1e-6, 0.3, 1.0, 1e6]),
)
def test_property_finite_nonnegative(values, k, tau):
    scores = np.array([values])
    k = min(k, scores.shape[1])
    relevance = np.arange(scores.shape[1], dtype=np.float64)[None, ::-1].copy()
    none = topk_bce_loss(scores, relevance, k, tau=tau, reduction="none")
    assert np.isfinite(none).all() and (none >= 0).all()
    assert np.isclose(none.sum(), topk_bce_loss(scores, relevance, k, tau=tau, reduction="sum"))
    joint = cascade_joint_loss([scores, scores[:, ::-1].copy()], relevance, k, tau=tau)
    assert np.isfinite(joint) and joint >= 0


# ---------------------------------------------------------------------------
# errors


def test_errors(lib, rng):
    s = lib.asarray(rng.standard_normal((2, 5)))
    r = lib.asarray(rng.standard_normal((2, 5)))
    with pytest.raises(ValueError, match="relevance must have the shape"):
        topk_bce_loss(s, lib.asarray(rng.standard_normal((2, 4))), 2)
    with pytest.raises(TypeError, match="relevance must have a real floating"):
        topk_bce_loss(s, lib.asarray(np.ones((2, 5), dtype=np.int64)), 2)
    with pytest.raises(ValueError, match="reduction"):
        topk_bce_loss(s, r, 2, reduction="avg")
    with pytest.raises(ValueError, match="k must satisfy"):
        topk_bce_loss(s, r, 6)
    with pytest.raises(TypeError, match="k must be an int"):
        topk_bce_loss(s, r, 2.0)
    with pytest.raises(ValueError, match="tau"):
        topk_bce_loss(s, r, 2, tau=0.0)
    with pytest.raises(TypeError, match="scores must have a real floating"):
        topk_bce_loss(lib.asarray(np.ones((2, 5), dtype=np.int64)), r, 2)
    with pytest.raises(ValueError, match="at least two stages"):
        cascade_joint_loss([], r, 2)
    with pytest.raises(ValueError, match="at least two stages, got 1"):
        cascade_joint_loss([s], r, 2)
    with pytest.raises(TypeError, match="list or tuple"):
        cascade_joint_loss(s, r, 2)
    with pytest.raises(ValueError, match=r"stage_scores\[1\] has shape"):
        cascade_joint_loss([s, lib.asarray(rng.standard_normal((2, 4)))], r, 2)
    with pytest.raises(ValueError, match="one entry per stage"):
        cascade_joint_loss([s, s], r, (3, 2, 1))
    with pytest.raises(ValueError, match="one entry per stage"):
        cascade_joint_loss([s, s], r, 2, tau=(1.0,))
    with pytest.raises(ValueError, match=r"k\[0\] must satisfy"):
        cascade_joint_loss([s, s], r, (6, 2))
    with pytest.raises(ValueError, match="weights must have 3 entries"):
        cascade_joint_loss([s, s], r, 2, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        cascade_joint_loss([s, s], r, 2, weights=[1.0, -1.0, 1.0])
    with pytest.raises(TypeError, match="weights must be a sequence"):
        cascade_joint_loss([s, s], r, 2, weights=1.0)
    with pytest.raises(ValueError, match="not both"):
        cascade_joint_loss([s, s], r, 2, weights=[1.0] * 3, log_vars=lib.asarray(np.zeros(3)))
    with pytest.raises(ValueError, match=r"log_vars must have shape \(3,\)"):
        cascade_joint_loss([s, s], r, 2, log_vars=lib.asarray(np.zeros(2)))
    with pytest.raises(TypeError, match="log_vars"):
        cascade_joint_loss([s, s], r, 2, log_vars=np.zeros(3) if lib.name != "numpy" else [0.0])
    with pytest.raises(ValueError, match="reduction"):
        cascade_joint_loss([s, s], r, 2, reduction="none")
    if "float32" in lib.dtypes and lib.name != "array_api_strict":
        with pytest.raises(TypeError, match="dtype"):
            cascade_joint_loss([s, lib.asarray(rng.standard_normal((2, 5)), "float32")], r, 2)


def test_errors_name_the_loss_arguments(lib, rng):
    """Errors raised by the checks the losses share with dftopk call the arrays by the
    losses' own names (before 2026-12-06 they said ``x`` and, for a per-stage ``k`` or
    ``tau``, not which stage), and a mask of the wrong shape is rejected by name in the
    cascade loss too (it was a backend broadcasting error)."""
    s = lib.asarray(rng.standard_normal((2, 5)))
    r = lib.asarray(rng.standard_normal((2, 5)))
    k_rows = lib.asarray(np.array([1, 2, 3]), "int64")
    with pytest.raises(ValueError, match=r"axis 3 is out of range for scores with"):
        topk_bce_loss(s, r, 2, axis=3)
    with pytest.raises(ValueError, match=r"does not broadcast to scores' shape \(2, 5\)"):
        topk_bce_loss(s, r, 2, mask=lib.asarray(np.ones((3, 5), bool)))
    with pytest.raises(ValueError, match=r"^k of shape \(3,\) .*\(scores' shape without"):
        topk_bce_loss(s, r, k_rows)
    with pytest.raises(TypeError, match=r"^stage_scores\[0\] must have a real floating"):
        cascade_joint_loss([lib.asarray(np.ones((2, 5), dtype=np.int64)), s], r, 2)
    with pytest.raises(ValueError, match=r"^k\[1\] must satisfy 0 <= k <= 5 .*got 9"):
        cascade_joint_loss([s, s], r, (3, 9))
    with pytest.raises(ValueError, match=r"^k must satisfy 0 <= k <= 5 .*got 9"):
        cascade_joint_loss([s, s], r, 9)  # one k for every stage
    with pytest.raises(ValueError, match=r"^k\[0\] of shape \(3,\).*stage_scores\[0\]'s sha"):
        cascade_joint_loss([s, s], r, [k_rows, 1])
    with pytest.raises(ValueError, match=r"^tau\[1\] must be a finite float > 0, got -1.0"):
        cascade_joint_loss([s, s], r, 2, tau=[1.0, -1.0])
    with pytest.raises(ValueError, match=r"^axis 5 is out of range for stage_scores\[0\]"):
        cascade_joint_loss([s, s], r, 2, axis=5)
    with pytest.raises(ValueError, match=r"^mask of shape \(3, 5\) does not broadcast to stag"):
        cascade_joint_loss([s, s], r, 2, mask=lib.asarray(np.ones((3, 5), bool)))
    if lib.name == "numpy":  # values read now (a lazy library checks them when computed)
        bad = np.array([[1.0], [-2.0]])
        with pytest.raises(ValueError, match=r"^tau\[1\] must be finite and > 0 everywhere"):
            cascade_joint_loss([s, s], r, 2, tau=[1.0, bad])
    # the names apply inside the losses only
    with pytest.raises(ValueError, match=r"^k must satisfy .* got 9"):
        tk.dftopk(s, 9)
    with pytest.raises(ValueError, match=r"axis 3 is out of range for x with"):
        tk.dftopk(s, 2, axis=3)


def test_mixed_libraries_rejected(lib, rng):
    if lib.name == "numpy":
        pytest.skip("needs a second library")
    s = lib.asarray(rng.standard_normal((2, 5)))
    with pytest.raises(TypeError, match=r"^scores is a \w+ array but relevance is a numpy"):
        topk_bce_loss(s, rng.standard_normal((2, 5)), 2)
    with pytest.raises(TypeError, match=r"^relevance must be an array of the same library as scor"):
        topk_bce_loss(s, rng.standard_normal((2, 5)).tolist(), 2)
    with pytest.raises(TypeError, match=r"^stage_scores\[0\] is a \w+ array but stage_scores\[1\]"):
        cascade_joint_loss([s, rng.standard_normal((2, 5))], s, 2)
    with pytest.raises(TypeError, match=r"^stage_scores\[0\] is a \w+ array but relevance is"):
        cascade_joint_loss([s, s], rng.standard_normal((2, 5)), 2)


# ---------------------------------------------------------------------------
# gradients: torch autograd and jax.grad vs finite differences (float64)


def _fd_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        u = np.zeros_like(x)
        u[i] = 1.0
        g[i] = finite_difference(f, x, u, eps)
    return g


@needs_torch
def test_torch_gradients_match_finite_differences(rng):
    import torch

    s1, s2 = _distinct(rng, (2, 7)), _distinct(rng, (2, 7))
    relevance = rng.standard_normal((2, 7))
    mask = np.array([[True] * 7, [True, True, False, True, True, True, False]])
    m = torch.from_numpy(mask)
    r = torch.from_numpy(relevance)

    def bce(x):
        return topk_bce_loss(torch.from_numpy(x), r, 3, tau=0.7, mask=m).item()

    x = torch.from_numpy(s1.copy()).requires_grad_()
    topk_bce_loss(x, r, 3, tau=0.7, mask=m).backward()
    np.testing.assert_allclose(x.grad.numpy(), _fd_grad(bce, s1), atol=1e-7)
    assert np.all(x.grad.numpy()[~mask] == 0.0)

    log_vars = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)

    def joint(a, b):
        return cascade_joint_loss([a, b], r, (4, 2), tau=(1.3, 0.6), mask=m, log_vars=log_vars)

    a = torch.from_numpy(s1.copy()).requires_grad_()
    b = torch.from_numpy(s2.copy()).requires_grad_()
    joint(a, b).backward()
    fa = _fd_grad(lambda v: joint(torch.from_numpy(v), torch.from_numpy(s2)).item(), s1)
    fb = _fd_grad(lambda v: joint(torch.from_numpy(s1), torch.from_numpy(v)).item(), s2)
    np.testing.assert_allclose(a.grad.numpy(), fa, atol=1e-7)
    np.testing.assert_allclose(b.grad.numpy(), fb, atol=1e-7)

    # learned weights and per-row temperature: torch.autograd.gradcheck
    tau = torch.tensor([[0.8], [1.4]], dtype=torch.float64, requires_grad=True)
    lv = log_vars.clone().requires_grad_()
    a = torch.from_numpy(s1.copy()).requires_grad_()

    def f(a, lv, tau):
        return cascade_joint_loss([a, torch.from_numpy(s2)], r, (4, 2), tau=tau, log_vars=lv)

    assert torch.autograd.gradcheck(f, (a, lv, tau), eps=1e-6, atol=1e-7)


@needs_jax
def test_jax_gradients_match_finite_differences(rng):
    import jax
    import jax.numpy as jnp

    s1, s2 = _distinct(rng, (2, 7)), _distinct(rng, (2, 7))
    relevance = jnp.asarray(rng.standard_normal((2, 7)))
    mask_np = np.array([[True] * 7, [True, True, False, True, True, True, False]])
    mask = jnp.asarray(mask_np)
    log_vars = jnp.asarray([0.3, -0.2, 0.1])

    # the core functions under jit: every array an argument (traced)
    @jax.jit
    def joint(a, b, lv, r, m):
        bce = topk_bce_loss(a, r, 3, tau=0.7, mask=m)
        cascade = cascade_joint_loss([a, b], r, (4, 2), tau=(1.3, 0.6), mask=m, log_vars=lv)
        return bce + cascade

    a, b = jnp.asarray(s1), jnp.asarray(s2)
    ga, gb, glv = jax.grad(joint, argnums=(0, 1, 2))(a, b, log_vars, relevance, mask)
    fa = _fd_grad(lambda v: float(joint(jnp.asarray(v), b, log_vars, relevance, mask)), s1)
    fb = _fd_grad(lambda v: float(joint(a, jnp.asarray(v), log_vars, relevance, mask)), s2)
    lv_np = np.asarray(log_vars)
    flv = _fd_grad(lambda v: float(joint(a, b, jnp.asarray(v), relevance, mask)), lv_np)
    np.testing.assert_allclose(np.asarray(ga), fa, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gb), fb, atol=1e-7)
    np.testing.assert_allclose(np.asarray(glv), flv, atol=1e-7)
    assert np.all(np.asarray(ga)[~mask_np] == 0.0)
    assert np.all(np.asarray(gb)[~mask_np] == 0.0)


# scores exactly at the threshold (z = 0): all equal (a model at initialisation) and
# integer ties at the k-th value
TIED = np.array([[0.0, -0.0, 0.0, 0.0, -0.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0, 2.0]])
TIED_REL = np.array([[3.0, 1.0, 2.0, 0.0, 1.0, 5.0], [0.5, 2.0, 1.0, 3.0, 0.0, 1.0]])


def _bce_closed_form(x, relevance, k, tau):
    """Gradient of the mean BCE: dL/dz = (sigmoid(z) - y) / n through the logits' VJP."""
    z = ref_dftopk(x, k, tau, output="logits")
    y = ref_topk_mask(relevance, k)
    return tk.dftopk_vjp(x, k, (1 / (1 + np.exp(-z)) - y) / x.size, tau=tau, output="logits")[0]


@needs_torch
@needs_jax
def test_gradients_at_scores_on_the_threshold():
    """softplus'(0) is 1/2: JAX's loss gradient was 0 there (its |t|' = 1 at 0), all 0 for
    all-equal scores; torch and JAX now match the closed form, and each other for the
    cascade loss."""
    import jax
    import jax.numpy as jnp
    import torch

    for k in (2, 3):
        want = _bce_closed_form(TIED, TIED_REL, k, 0.5)
        assert np.abs(want).max() > 0.01
        xt = torch.tensor(TIED, requires_grad=True)
        topk_bce_loss(xt, torch.tensor(TIED_REL), k, tau=0.5).backward()
        gj = jax.grad(lambda v, k=k: topk_bce_loss(v, jnp.asarray(TIED_REL), k, tau=0.5))(
            jnp.asarray(TIED)
        )
        np.testing.assert_allclose(xt.grad.numpy(), want, atol=1e-12)
        np.testing.assert_allclose(np.asarray(gj), want, atol=1e-12)

    x2 = np.zeros_like(TIED)
    xt, xt2 = torch.tensor(TIED, requires_grad=True), torch.tensor(x2, requires_grad=True)
    cascade_joint_loss([xt, xt2], torch.tensor(TIED_REL), (3, 2)).backward()
    gj, gj2 = jax.grad(
        lambda a, b: cascade_joint_loss([a, b], jnp.asarray(TIED_REL), (3, 2)), argnums=(0, 1)
    )(jnp.asarray(TIED), jnp.asarray(x2))
    assert np.abs(xt2.grad.numpy()).max() > 0.01
    np.testing.assert_allclose(np.asarray(gj), xt.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(np.asarray(gj2), xt2.grad.numpy(), atol=1e-12)


def _no_nan_grads_cases():
    big = np.array([[1e30, -1e30, 3.0, 0.5, -2.0, 1e-30]])
    inf = np.array([[np.inf, 2.0, -np.inf, 0.5, 1.0, -1.0]])
    return [(big, tau) for tau in (1e-6, 1.0, 1e6)] + [(inf, tau) for tau in (1e-6, 1.0, 1e6)]


@needs_torch
@pytest.mark.parametrize("case", range(6))
def test_torch_gradients_nan_free_at_extremes(case):
    import torch

    scores, tau = _no_nan_grads_cases()[case]
    relevance = torch.tensor([[5.0, 4.0, 0.0, 1.0, 3.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, True, False]])
    for dtype in (torch.float32, torch.float64):
        a = torch.tensor(scores, dtype=dtype, requires_grad=True)
        b = torch.tensor(scores[:, ::-1].copy(), dtype=dtype, requires_grad=True)
        lv = torch.zeros(3, dtype=dtype, requires_grad=True)
        loss = topk_bce_loss(a, relevance.to(dtype), 2, tau=tau, mask=mask)
        loss = loss + cascade_joint_loss(
            [a, b], relevance.to(dtype), (3, 2), tau=tau, mask=mask, log_vars=lv
        )
        loss.backward()
        for t in (a, b, lv):
            assert not torch.isnan(t.grad).any(), (t.grad, tau)
        assert a.grad[0, 5] == 0.0  # masked


@pytest.mark.slow  # several jit compilations: ~10 s on a loaded 2-core machine
@needs_jax
def test_jax_gradients_nan_free_at_extremes():
    import jax
    import jax.numpy as jnp
    from topk_core.adapters import jax_losses

    relevance = np.array([[5.0, 4.0, 0.0, 1.0, 3.0, 2.0]])
    mask = np.array([[True, True, True, True, True, False]])
    for dtype in (jnp.float32, jnp.float64):

        def loss(a, b, lv, tau, dtype=dtype):
            rel = relevance.astype(dtype)
            out = jax_losses.topk_bce_loss(a, rel, 2, tau=tau, mask=mask)
            return out + jax_losses.cascade_joint_loss(
                [a, b], rel, (3, 2), tau=tau, mask=mask, log_vars=lv
            )

        # tau as an array argument: one compilation for all cases
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        for scores, tau in _no_nan_grads_cases():
            grads = grad(
                jnp.asarray(scores, dtype),
                jnp.asarray(scores[:, ::-1].copy(), dtype),
                jnp.zeros(3, dtype),
                jnp.asarray(tau, dtype),
            )
            for g in grads:
                assert not np.isnan(np.asarray(g)).any(), (scores, tau, grads)
            assert float(grads[0][0, 5]) == 0.0


# ---------------------------------------------------------------------------
# adapters


@needs_torch
def test_torch_modules(rng):
    import torch
    from topk_core.adapters.torch_losses import CascadeJointLoss, TopKBCELoss

    s1 = torch.from_numpy(rng.standard_normal((3, 8)))
    s2 = torch.from_numpy(rng.standard_normal((3, 8)))
    r = torch.from_numpy(rng.standard_normal((3, 8)))
    m = torch.from_numpy(rng.uniform(size=(3, 8)) > 0.2)

    bce = TopKBCELoss(k=3, tau=0.5, reduction="sum")
    assert torch.equal(bce(s1, r, m), topk_bce_loss(s1, r, 3, tau=0.5, mask=m, reduction="sum"))
    k_rows = torch.tensor([1, 2, 3])
    assert torch.equal(bce(s1, r, k=k_rows), topk_bce_loss(s1, r, k_rows, tau=0.5, reduction="sum"))
    assert "k=3" in repr(bce)

    crit = CascadeJointLoss(k=(5, 2), tau=(1.0, 0.5), init_log_var=0.25).double()
    assert [n for n, _ in crit.named_parameters()] == ["log_vars"]
    lv = torch.full((3,), 0.25, dtype=torch.float64)
    want = cascade_joint_loss([s1, s2], r, (5, 2), tau=(1.0, 0.5), mask=m, log_vars=lv)
    torch.testing.assert_close(crit([s1, s2], r, m), want)
    _, terms = crit([s1, s2], r, m, return_terms=True)
    assert len(terms) == 3
    torch.testing.assert_close(crit.term_weights(), torch.exp(-lv))

    # one optimiser step on stage scores and log_vars lowers the loss
    a = s1.clone().requires_grad_()
    b = s2.clone().requires_grad_()
    opt = torch.optim.SGD([a, b, *crit.parameters()], lr=0.05)
    before = crit([a, b], r, m)
    before.backward()
    assert crit.log_vars.grad is not None and torch.isfinite(crit.log_vars.grad).all()
    opt.step()
    assert crit([a, b], r, m).item() < before.item()

    fixed = CascadeJointLoss(k=2, n_stages=2, learn_weights=False, weights=(1.0, 0.5, 0.5))
    assert list(fixed.parameters()) == []
    torch.testing.assert_close(
        fixed([s1, s2], r), cascade_joint_loss([s1, s2], r, 2, weights=(1.0, 0.5, 0.5))
    )
    with pytest.raises(ValueError, match="n_stages"):
        CascadeJointLoss(k=2, n_stages=1)
    with pytest.raises(ValueError, match="k has 3 entries"):
        CascadeJointLoss(k=(3, 2, 1))
    with pytest.raises(ValueError, match="learn_weights=False"):
        CascadeJointLoss(k=2, weights=(1.0, 1.0, 1.0))
    with pytest.raises(TypeError, match="k must be an int"):
        TopKBCELoss(k=2.5)
    with pytest.raises(ValueError, match="expected 2 stage"):
        crit([s1, s2, s1], r)
    # a stacked tensor was split into its rows, one "stage" each (a shape error at best)
    with pytest.raises(TypeError, match="stage_scores must be a list or tuple of 2 score tensors"):
        crit(torch.stack([s1[0], s2[0]]), r[0])
    # the loss's own checks run at construction too (they waited for the first call before)
    with pytest.raises(ValueError, match=r"reduction must be one of .*'avg'"):
        TopKBCELoss(k=2, reduction="avg")
    with pytest.raises(ValueError, match=r"tau must be a finite float > 0, got 0\.0"):
        TopKBCELoss(k=2, tau=0.0)
    with pytest.raises(TypeError, match="axis must be an int"):
        TopKBCELoss(k=2, axis=1.0)
    with pytest.raises(ValueError, match=r"non-increasing.*k\[1\] = 3 > k\[0\] = 2"):
        CascadeJointLoss(k=(2, 3))
    with pytest.raises(ValueError, match="tau has 1 entries"):
        CascadeJointLoss(k=(3, 2), tau=[1.0])
    with pytest.raises(ValueError, match=r"tau must be a finite float > 0, got -1.0"):
        CascadeJointLoss(k=(3, 2), tau=(1.0, -1.0))
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum'\)"):
        CascadeJointLoss(k=(3, 2), reduction="none")


@pytest.mark.slow  # several jit compilations: ~20-60 s on a loaded 2-core machine
@needs_jax
def test_jax_adapter(rng):
    import jax
    import jax.numpy as jnp
    from topk_core.adapters import jax_losses

    s1 = rng.standard_normal((3, 8))
    s2 = rng.standard_normal((3, 8))
    r = rng.standard_normal((3, 8))
    m = rng.uniform(size=(3, 8)) > 0.2
    j1, j2 = jnp.asarray(s1), jnp.asarray(s2)

    # numpy data (relevance, mask) next to jax arrays
    got = jax_losses.topk_bce_loss(j1, r, 3, tau=0.5, mask=m)
    assert float(got) == pytest.approx(ref_bce(s1, r, 3, tau=0.5, mask=m), rel=1e-9)

    # grad w.r.t. scores and log_vars with concrete mask / relevance; outer jit
    lv = jax_losses.init_log_vars(2, 0.1, jnp.float64)

    def loss(params):
        return jax_losses.cascade_joint_loss(
            params["stages"], r, (5, 2), mask=m, log_vars=params["lv"]
        )

    params = {"stages": [j1, j2], "lv": lv}
    value, g1 = jax.value_and_grad(loss)(params)
    ref = ref_joint_terms([s1, s2], r, (5, 2), (1.0, 1.0), m)
    assert float(value) == pytest.approx(sum(math.exp(-0.1) * t + 0.1 for t in ref), rel=1e-9)
    # d/ds_t [exp(-s_t) L_t + s_t] = 1 - exp(-s_t) L_t
    np.testing.assert_allclose(g1["lv"], [1 - math.exp(-0.1) * t for t in ref], rtol=1e-9)
    g2 = jax.jit(jax.grad(loss))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-15)

    per_row = jax.vmap(lambda x, y: jax_losses.topk_bce_loss(x, y, 3))(j1, jnp.asarray(r))
    want = [ref_bce(s1[i : i + 1], r[i : i + 1], 3) for i in range(3)]
    np.testing.assert_allclose(np.asarray(per_row), want, rtol=1e-9)

    # fixed weights as a list (made static)
    out = jax_losses.cascade_joint_loss([j1, j2], r, 2, weights=[1.0, 0.5, 0.5])
    ref = ref_joint_terms([s1, s2], r, (2, 2), (1.0, 1.0))
    assert float(out) == pytest.approx(ref[0] + 0.5 * ref[1] + 0.5 * ref[2], rel=1e-9)

    with pytest.raises(ValueError, match="at least two stages"):
        jax_losses.cascade_joint_loss([j1], r, 2)
    with pytest.raises(TypeError, match="list or tuple"):
        jax_losses.cascade_joint_loss(j1, r, 2)
    with pytest.raises(ValueError, match="n_stages"):
        jax_losses.init_log_vars(1)


def test_jax_wrappers_check_concrete_k_and_tau():
    """The JAX wrappers run the losses under ``jit``, where array values are traced: the
    checks the core runs on concrete arrays (non-increasing cascade ``k``, ``tau > 0`` in
    its range) run before that (before 2026-12-06 the wrappers returned a number)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from topk_core.adapters import jax_losses

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6)), jnp.float32)
    r = x[::-1]
    up = r"k must be non-increasing along the cascade.*k\[1\] > k\[0\] in some rows"
    for ks in (
        (jnp.array([3, 2]), jnp.array([2, 3])),
        (np.array([3, 2]), np.array([2, 3])),
        (2, jnp.array([2, 3])),
        (jnp.array([3, 2]), 3),
    ):
        with pytest.raises(ValueError, match=up):
            jax_losses.cascade_joint_loss([x, x], r, ks)
    bad_tau = jnp.array([[0.5], [-1.0]])
    with pytest.raises(ValueError, match=r"tau must be finite and > 0 everywhere"):
        jax_losses.topk_bce_loss(x, r, 2, tau=bad_tau)
    with pytest.raises(ValueError, match=r"^tau\[1\] must be finite and > 0 everywhere"):
        jax_losses.cascade_joint_loss([x, x], r, (3, 2), tau=[0.5, np.array([[1.0], [0.0]])])
    with pytest.raises(ValueError, match=r"tau must be within"):
        jax_losses.topk_bce_loss(x, r, 2, tau=np.array([[1e-39], [1.0]], np.float32))
    # scores that are no array: the loss's own error, before the tau check reads them
    with pytest.raises(TypeError, match=r"^scores must be an array of a library"):
        jax_losses.topk_bce_loss(np.asarray(x).tolist(), r, 2, tau=jnp.array([[0.5], [2.0]]))
    # traced values stay unchecked (as in the core), valid ones pass
    ok = (jnp.array([3, 3]), jnp.array([2, 3]))
    want = float(jax_losses.cascade_joint_loss([x, x], r, ok))
    traced = jax.jit(lambda k0: jax_losses.cascade_joint_loss([x, x], r, (k0, ok[1])))
    assert float(traced(ok[0])) == pytest.approx(want)
    assert jax.grad(lambda s: jax_losses.topk_bce_loss(s, r, 2, tau=jnp.array([[0.5], [2.0]])))(
        x
    ).shape == (2, 6)
