"""Differential check of the fast paths: every backend against one vectorised reference.

The conformance reference (``topk_core.conformance.reference``) loops in Python and suits
small rows; the backends' fast paths (sampled brackets, radix passes, per-row sorts, their
tie hand-overs) start at rows of 1025-65536.  Here a float64 reference written from the spec
with ``np.lexsort`` (valid first, NaN first, then descending; stable, so ties go to the lower
index) gives ``a``, ``b``, the mask and the closed-form VJP for long rows with ties, NaN,
infinities, masks and per-row k, and each backend's public calls (NumPy's
``dftopk_and_vjp``, torch autograd, ``jax.vjp``) must agree.  Such a fuzz found the torch
sampled path's NaN crash and the torch forward-mode NaN of infinite thresholds.
"""

from __future__ import annotations

import numpy as np
import pytest

import topk_core as tk

SEED = 20261204
#: (shape, kind) pairs: every kind on a row long enough for a sampled bracket or radix pass
LAYOUT = [
    ((1, 70001), "randn"),
    ((2, 66003), "nan and inf"),
    ((4, 2051), "few values"),
    ((7, 1500), "sorted"),
    ((130, 2048), "mostly nan"),
    ((1, 70001), "mostly nan"),
    ((2, 66003), "few values"),
    ((4, 2051), "nan and inf"),
    ((7, 1500), "randn"),
    ((130, 2048), "sorted"),
]


def _scores(rng, shape, kind):
    if kind == "randn":
        v = rng.standard_normal(shape)
    elif kind == "few values":
        v = rng.integers(0, 5, shape).astype(float)  # ties everywhere, at a and b too
    elif kind == "sorted":
        v = np.sort(rng.standard_normal(shape), axis=-1)
    else:
        nan = 0.3 if kind == "mostly nan" else 0.02  # 30%: NaN at the sampled ranks
        v = rng.standard_normal(shape)
        u = rng.random(shape)
        v[u < nan] = np.nan
        v[(u >= nan) & (u < nan + 0.02)] = np.inf
        v[(u >= nan + 0.02) & (u < nan + 0.04)] = -np.inf
    return v.astype(np.float32)


def _cases():
    rng = np.random.default_rng(SEED)
    cases = []
    for i, (shape, kind) in enumerate(LAYOUT):
        rows, n = shape
        if kind == "mostly nan":  # k within the NaN ranks and just past them
            k = n // 10 if i % 2 else rng.integers(0, n // 3, rows)
        elif i % 3 == 0:
            k = rng.integers(0, n + 1, rows)
        else:
            k = int(rng.choice([1, n // 10, n // 2, n - 1]))
        mask = rng.random(shape) < 0.6 if i % 4 == 1 else None
        largest = i % 5 != 3
        cases.append((_scores(rng, shape, kind), k, mask, largest, rng.standard_normal(shape)))
    return cases


CASES = _cases()


def _reference(x, k, mask, largest, g, tau):
    """(p, grad_x, topk mask) in float64 from the spec, rows last."""
    rows = x.astype(np.float64) * (1.0 if largest else -1.0)
    r, n = rows.shape
    valid = np.ones(rows.shape, bool) if mask is None else mask
    nan = np.isnan(rows)
    order = np.lexsort((np.where(nan, 0.0, -rows), ~nan, ~valid), axis=-1)
    srt = np.take_along_axis(rows, order, -1)
    kk = np.clip(np.broadcast_to(k, (r,)), 0, valid.sum(-1))
    at = np.arange(r)
    a = np.where(kk >= 1, srt[at, np.clip(kk - 1, 0, n - 1)], np.inf)[:, None]
    b = np.where(kk < valid.sum(-1), srt[at, np.clip(kk, 0, n - 1)], -np.inf)[:, None]
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(n), (r, n)), -1)
    top = (rank < kk[:, None]).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        theta = np.where(a == -b, 0.0, a / 2 + b / 2)
        z = (rows - theta) / tau  # compared only where theta is finite
        p = np.where(valid, 1 / (1 + np.exp(-z)), 0.0)
        s = np.where(valid, g * p * (1 - p) / tau, 0.0)
        w = np.zeros(rows.shape)
        for v in (a, b):
            hit = valid & (rows == v) & np.isfinite(v)
            w += np.where(hit, 0.5 / np.maximum(hit.sum(-1, keepdims=True), 1), 0.0)
        gx = s - np.where(nan, 0.0, s).sum(-1, keepdims=True) * w
        gx = np.where(valid, gx, 0.0) * (1.0 if largest else -1.0)
    return p, gx, top, np.isfinite(theta)


def _numpy(x, k, mask, largest, g, tau):
    p, vjp = tk.dftopk_and_vjp(x, k, tau=tau, mask=mask, largest=largest)
    return p, vjp(g.astype(np.float32))[0], tk.topk_mask(x, k, mask=mask, largest=largest)


def _torch(x, k, mask, largest, g, tau):
    torch = pytest.importorskip("torch")
    xt = torch.from_numpy(x).requires_grad_()
    kt = torch.from_numpy(k) if isinstance(k, np.ndarray) else k
    mt = None if mask is None else torch.from_numpy(mask)
    p = tk.dftopk(xt, kt, tau=tau, mask=mt, largest=largest)
    p.backward(torch.from_numpy(g.astype(np.float32)))
    m = tk.topk_mask(xt.detach(), kt, mask=mt, largest=largest)
    return p.detach().numpy(), xt.grad.numpy(), m.numpy()


def _jax(x, k, mask, largest, g, tau):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    kj = jnp.asarray(k) if isinstance(k, np.ndarray) else k
    mj = None if mask is None else jnp.asarray(mask)
    p, pull = jax.vjp(lambda v: tk.dftopk(v, kj, tau=tau, mask=mj, largest=largest), x)
    m = tk.topk_mask(jnp.asarray(x), kj, mask=mj, largest=largest)
    return np.asarray(p), np.asarray(pull(jnp.asarray(g, jnp.float32))[0]), np.asarray(m)


@pytest.mark.parametrize("run", [_numpy, _torch, _jax], ids=["numpy", "torch", "jax"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fast_paths_agree_with_the_sort_reference(run, case):
    x, k, mask, largest, g = CASES[case]
    tau = 0.5
    p_ref, gx_ref, top_ref, finite = _reference(x, k, mask, largest, g, tau)
    with np.errstate(invalid="ignore"):
        p, gx, top = run(x, k, mask, largest, g, tau)
    np.testing.assert_array_equal(np.asarray(top, np.float64), top_ref)
    ok = finite & np.isfinite(p_ref)  # a NaN threshold makes its row NaN (spec)
    np.testing.assert_allclose(np.asarray(p, np.float64)[ok], p_ref[ok], atol=2e-6, rtol=0)
    assert np.isnan(np.asarray(p)[finite & np.isnan(p_ref)]).all()  # the NaN scores
    scale = np.abs(np.where(np.isfinite(gx_ref), gx_ref, 0.0)).sum(-1, keepdims=True) + 1e-12
    err = np.abs(np.asarray(gx, np.float64) - gx_ref) / scale
    ok = finite & np.isfinite(gx_ref)
    assert err[ok].max(initial=0.0) < 1e-5
    if mask is not None:
        assert (np.asarray(gx)[~mask] == 0).all() and (np.asarray(p)[~mask] == 0).all()
