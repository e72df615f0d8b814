"""Hypothesis properties of the spec (NumPy backend + reference)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from topk_core.conformance.reference import ref_dftopk, ref_topk_mask, ref_vjp

import topk_core as tk

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=64)
values = st.one_of(finite, st.sampled_from([0.0, -0.0, 1.0, np.inf, -np.inf]))


@st.composite
def problems(draw):
    n = draw(st.integers(1, 12))
    rows = draw(st.integers(1, 4))
    x = draw(hnp.arrays(np.float64, (rows, n), elements=values))
    mask = draw(st.none() | hnp.arrays(np.bool_, (rows, n)))
    per_row = draw(st.booleans())
    if per_row:
        k = draw(hnp.arrays(np.int64, (rows,), elements=st.integers(0, n)))
    else:
        k = draw(st.integers(0, n))
    tau = draw(st.sampled_from([1e-3, 0.5, 1.0, 7.0]))
    largest = draw(st.booleans())
    return x, k, mask, tau, largest


@SETTINGS
@given(problems())
def test_forward_matches_reference(prob):
    x, k, mask, tau, largest = prob
    p = tk.dftopk(x, k, tau=tau, mask=mask, largest=largest)
    ref = ref_dftopk(x, k, tau=tau, mask=mask, largest=largest)
    np.testing.assert_allclose(p, ref, atol=1e-12)
    assert not np.isnan(p).any()  # finite or infinite, never NaN without NaN input
    assert ((p >= 0) & (p <= 1)).all()


@SETTINGS
@given(problems())
def test_hard_mask_counts_and_reference(prob):
    x, k, mask, _, largest = prob
    m = tk.topk_mask(x, k, mask=mask, largest=largest)
    np.testing.assert_array_equal(m, ref_topk_mask(x, k, mask=mask, largest=largest))
    n_valid = x.shape[1] if mask is None else mask.sum(-1)
    np.testing.assert_array_equal(m.sum(-1), np.minimum(np.broadcast_to(k, m.shape[:1]), n_valid))


@SETTINGS
@given(problems(), st.integers(0, 2**32 - 1))
def test_vjp_matches_reference(prob, seed):
    x, k, mask, tau, largest = prob
    g = np.random.default_rng(seed).standard_normal(x.shape)
    gx, _ = tk.dftopk_vjp(x, k, g, tau=tau, mask=mask, largest=largest)
    ref, _ = ref_vjp(x, k, g, tau=tau, mask=mask, largest=largest)
    np.testing.assert_allclose(gx, ref, atol=1e-9)
    assert np.isfinite(gx).all()


@SETTINGS
@given(problems(), st.integers(0, 2**32 - 1))
def test_permutation_equivariance(prob, seed):
    x, k, mask, tau, largest = prob
    rng = np.random.default_rng(seed)
    perm = rng.permutation(x.shape[1])
    g = rng.standard_normal(x.shape)
    mp = None if mask is None else mask[:, perm]
    p = tk.dftopk(x, k, tau=tau, mask=mask, largest=largest)
    pp = tk.dftopk(x[:, perm], k, tau=tau, mask=mp, largest=largest)
    np.testing.assert_array_equal(pp, p[:, perm])
    gx, _ = tk.dftopk_vjp(x, k, g, tau=tau, mask=mask, largest=largest)
    gp, _ = tk.dftopk_vjp(x[:, perm], k, g[:, perm], tau=tau, mask=mp, largest=largest)
    np.testing.assert_allclose(gp, gx[:, perm], atol=1e-12)


@SETTINGS
@given(
    hnp.arrays(
        np.float32,
        (3, 9),
        elements=st.floats(-3.0000000054977558e38, 3.0000000054977558e38, width=32),
    ),
    st.integers(0, 9),
)
def test_float32_extremes_no_overflow_nan(x, k):
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow is fine
        p = tk.dftopk(x, k)
        th = tk.topk_threshold(x, k)
    assert not np.isnan(p).any()
    assert p.dtype == np.float32
    assert not np.isnan(th).any()


@st.composite
def nan_problems(draw):
    x, k, mask, tau, largest = draw(problems())
    nan = draw(hnp.arrays(np.bool_, x.shape))
    return np.where(nan, np.nan, x), k, mask, tau, largest


@SETTINGS
@given(nan_problems(), st.sampled_from(["probs", "logits"]), st.integers(0, 2**32 - 1))
def test_nan_rule_matches_reference(prob, output, seed):
    """NaN scores anywhere (masked or not, at the threshold or not): forward, mask
    and VJP agree with the reference, and masked entries keep p = 0 / gradient 0."""
    x, k, mask, tau, largest = prob
    g = np.random.default_rng(seed).standard_normal(x.shape)
    fn = tk.dftopk if output == "probs" else tk.dftopk_logits
    with np.errstate(invalid="ignore"):
        p = fn(x, k, tau=tau, mask=mask, largest=largest)
        gx, _ = tk.dftopk_vjp(x, k, g, tau=tau, mask=mask, largest=largest, output=output)
        _, d = tk.dftopk_jvp(x, k, g, tau=tau, mask=mask, largest=largest, output=output)
        m = tk.topk_mask(x, k, mask=mask, largest=largest)
        ref = ref_dftopk(x, k, tau=tau, mask=mask, largest=largest, output=output)
        ref_gx, _ = ref_vjp(x, k, g, tau=tau, mask=mask, largest=largest, output=output)
    np.testing.assert_allclose(p, ref, atol=1e-12)
    np.testing.assert_allclose(gx, ref_gx, atol=1e-9)
    np.testing.assert_array_equal(m, ref_topk_mask(x, k, mask=mask, largest=largest))
    if mask is not None:
        assert (gx[~mask] == 0).all() and (d[~mask] == 0).all()
