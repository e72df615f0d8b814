"""Issue 11's fast paths give the generic code's results.

The NumPy ``soft`` hook (in-place ufunc chains, scratch pool, O(#ties)
threshold term) against the generic Array API math of ``topk_core._math``
on the same inputs; NumPy's selection paths (sampled bracket, short-row sort,
quickselect, radix redo) against a full sort; the scratch pool's ownership
rules.  Small shapes only: the whole file runs in a few seconds.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings

import numpy as np
import pytest
from topk_core.backends import numpy_backend, numpy_soft
from topk_core.backends.numpy_soft import POOL, ScratchPool

import topk_core as tk
from topk_core import register_backend
from topk_core._registry import get_backend


@pytest.fixture
def generic_numpy():
    """Run a block with the NumPy backend's ``soft`` hook switched off."""
    fast = get_backend("numpy")

    class Switch:
        def __enter__(self):
            register_backend("numpy", dataclasses.replace(fast, soft=None))

        def __exit__(self, *exc):
            register_backend("numpy", fast)

    yield Switch()
    register_backend("numpy", fast)


def _cases(rng):
    """(x, k, kwargs) covering masks, per-row k and tau, axis, largest, infinities, overflow."""
    f64 = np.float64
    yield rng.standard_normal(300), 30, {}
    yield rng.standard_normal((4, 50)), 7, {"tau": 0.3}
    yield np.round(rng.standard_normal((5, 40))), 9, {"tau": 2.0}  # ties
    yield rng.standard_normal((3, 60)), np.array([0, 5, 60]), {}
    yield rng.standard_normal((4, 30)), 6, {"mask": rng.random((4, 30)) > 0.4}
    # masked entries tied with a and b: not ties
    yield np.round(rng.standard_normal((4, 30))), 6, {"mask": rng.random((4, 30)) > 0.4}
    yield rng.standard_normal((6, 5)), 2, {"axis": 0, "largest": False, "tau": 0.7}
    yield rng.standard_normal((3, 20)), 4, {"tau": np.array([[0.3], [1.0], [2.5]])}
    yield rng.standard_normal((3, 20)), 4, {"tau": rng.random((3, 20)) + 0.2}
    yield np.array([np.inf, 1.0, 0.0, -np.inf, 2.0]), 1, {}
    yield np.array([np.inf, np.inf, 0.0, 1.0]), 1, {"tau": 0.5}
    yield np.array([-np.inf, 0.0, 1.0, -np.inf]), 3, {}
    yield np.array([[3e38, -3e38, 1.0, 2e38]], dtype=np.float32), 2, {"tau": 10.0}  # overflow
    yield rng.standard_normal(50), 10, {"tau": 1e-35}  # tiny tau: generic logits
    yield np.array([1.0, np.nan, 3.0, 2.0]), 2, {}
    yield rng.standard_normal((2, 3, 40)).astype(np.float16), 8, {"tau": 0.5}
    yield rng.standard_normal((2, 40)).astype(np.float32), np.array([0, 40]), {}
    yield rng.standard_normal(64).astype(f64) * 1e-300, 5, {}
    # long rows: the sampled selection hands its candidates to the forward's tie search
    yield np.round(rng.standard_normal(70000) * 3), 7000, {}
    ties = np.round(rng.standard_normal((3, 2051)) * 3).astype(np.float32)
    yield ties, np.array([1, 1000, 2051]), {"mask": rng.random((3, 2051)) > 0.3}
    yield np.round(rng.standard_normal((66000, 2)) * 3), 660, {"axis": 0, "largest": False}
    nan = np.round(rng.standard_normal((2, 66000)) * 3)
    nan[:, ::97] = np.nan
    yield nan, 6600, {"tau": 0.5, "mask": rng.random((2, 66000)) > 0.1}
    yield np.round(rng.standard_normal((2, 66000)) * 3).astype(np.float16), 6600, {}


def _within_z_eps(got, ref, scores, tau, dtau, output):
    """The fast and the generic float32 tangents, each against the float64 result of the
    same float32 inputs, within ``(2 + |z|) eps`` where finite: the README's bound for the
    tails (the exponential amplifies the rounding of ``z``, and NumPy's ``exp2`` chain,
    where NumPy has a SIMD ``exp2`` loop, rounds ``z log2(e)`` once more), not each other's
    rounding (at ``|z|`` = 45 they differ by about 50 float32 ulps where ``exp2`` runs)."""
    f64 = {"tau": np.float64(tau) if isinstance(tau, float) else np.asarray(tau, np.float64)}
    x64 = np.asarray(scores, np.float64)
    dt64 = np.float64(dtau) if isinstance(dtau, float) else np.asarray(dtau, np.float64)
    want = tk.dftopk_jvp(x64, 3, np.ones_like(x64), output=output, tau_tangent=dt64, **f64)[1]
    z = np.abs(tk.dftopk_logits(x64, 3, **f64))
    z = np.where(np.isinf(z), 0.0, z)  # infinite z: no tau term, nothing amplified
    fin = np.isfinite(ref)
    bound = (2 + z[fin]) * np.finfo(np.float32).eps * np.abs(want[fin]) + 1e-30
    for arr in (got, ref):
        err = np.abs(np.asarray(arr, np.float64)[fin] - want[fin])
        assert np.all(err <= bound), (output, err, want[fin], z[fin])


def _close(a, b, dtype):
    tol = {np.float16: 2e-3, np.float32: 2e-6}.get(np.dtype(dtype).type, 1e-12)
    np.testing.assert_allclose(
        np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("exponential", ["exp", "exp2"])
@pytest.mark.parametrize("output", ["probs", "logits"])
def test_numpy_fast_path_matches_generic_math(rng, generic_numpy, output, exponential, monkeypatch):
    # both exponential chains, whichever one NumPy has a SIMD loop for on this CPU
    monkeypatch.setattr(numpy_soft, "exp2_is_simd", lambda dtype: exponential == "exp2")
    fwd = tk.dftopk if output == "probs" else tk.dftopk_logits
    for x, k, kw in _cases(rng):
        g = rng.standard_normal(x.shape).astype(x.dtype)
        with np.errstate(all="ignore"):
            out = fwd(x, k, **kw)
            gx, gt = tk.dftopk_vjp(x, k, g, output=output, **kw)
            out2, vjp = tk.dftopk_and_vjp(x, k, output=output, **kw)
            gx2, gt2 = vjp(g)
            with generic_numpy:
                ref = fwd(x, k, **kw)
                rgx, rgt = tk.dftopk_vjp(x, k, g, output=output, **kw)
        assert out.dtype == x.dtype and gx.dtype == x.dtype and out.shape == x.shape
        for got, want in ((out, ref), (out2, ref), (gx, rgx), (gx2, rgx), (gt, rgt), (gt2, rgt)):
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
            fin = np.isfinite(want)
            _close(np.asarray(got)[fin], np.asarray(want)[fin], x.dtype)
        if "mask" in kw:
            masked = ~kw["mask"]
            assert np.all(gx[masked] == 0)
            assert np.all(out[masked] == (0.0 if output == "probs" else -np.inf))


def _jvp_variants(rng, x, kw):
    """``(tangent, tau_tangent, hard)`` to try: none / a float / tau-shaped ``dtau``, an
    infinite tangent entry, and the straight-through primal."""
    u = rng.standard_normal(np.shape(x)).astype(np.asarray(x).dtype)
    u_inf = u.copy()
    u_inf.reshape(-1)[-1] = np.inf
    tau = kw.get("tau", 1.0)
    dtau = 0.3 if isinstance(tau, float) else (rng.random(np.shape(tau)) - 0.5).astype(tau.dtype)
    return [(u, None, False), (u, dtau, False), (u_inf, dtau, False), (u, dtau, True)]


def _same(got, want, dtype):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    fin = np.isfinite(want)
    _close(got[fin], want[fin], dtype)


@pytest.mark.parametrize("exponential", ["exp", "exp2"])
@pytest.mark.parametrize("output", ["probs", "logits"])
def test_numpy_fast_jvp_matches_generic_math(rng, generic_numpy, output, exponential, monkeypatch):
    """``dftopk_jvp`` through the hook's ``tangent`` (the forward's residuals) gives the
    generic :func:`topk_core._math.jvp`'s primal and tangent: ties, masks, NaN, infinite
    tangents, ``tau_tangent`` (a float, per row, per entry), ``largest=False``, hard."""
    monkeypatch.setattr(numpy_soft, "exp2_is_simd", lambda dtype: exponential == "exp2")
    calls = []
    tangent = numpy_soft.NumpySoft.tangent
    monkeypatch.setattr(
        numpy_soft.NumpySoft, "tangent", lambda self, *a: calls.append(1) or tangent(self, *a)
    )
    n = 0
    for x, k, kw in _cases(rng):
        for u, dtau, hard in _jvp_variants(rng, x, kw):
            if hard and output == "logits":
                continue
            args = {"output": output, "tau_tangent": dtau, "hard": hard, **kw}
            with np.errstate(all="ignore"):
                out, d = tk.dftopk_jvp(x, k, u, **args)
                with generic_numpy:
                    rout, rd = tk.dftopk_jvp(x, k, u, **args)
            n += 1
            assert out.dtype == d.dtype == x.dtype and d.shape == x.shape
            _same(out, rout, x.dtype)
            _same(d, rd, x.dtype)
            if "mask" in kw:
                assert np.all(d[~kw["mask"]] == 0)
    assert len(calls) == n


def _torch_case(torch, x, k, kw):
    """A :func:`_cases` entry as torch tensors (copies: the caller may write in place)."""

    def conv(v):
        return torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v

    return conv(x), conv(k), {n: conv(v) for n, v in kw.items()}


@pytest.fixture
def torch_soft_calls(monkeypatch):
    """Count the torch ``soft`` hook's eager kernels; ``[forward, backward, candidates]``."""
    pytest.importorskip("torch")
    from topk_core.adapters import torch_adapter

    calls = [0, 0, 0]
    fwd, bwd = torch_adapter.closed_form_forward, torch_adapter.closed_form_backward

    def forward(pb, *args, **kw):
        calls[0] += 1
        return fwd(pb, *args, **kw)

    def backward(pb, res, g):
        calls[1] += 1
        calls[2] += pb.candidates is not None
        return bwd(pb, res, g)

    monkeypatch.setattr(torch_adapter, "closed_form_forward", forward)
    monkeypatch.setattr(torch_adapter, "closed_form_backward", backward)
    return calls


@pytest.mark.parametrize("output", ["probs", "logits"])
def test_torch_closed_form_fast_path_matches_generic_math(rng, output, torch_soft_calls):
    """torch's ``soft`` hook (``dftopk_vjp``, ``dftopk_and_vjp``) gives the generic Array
    API code's results over the NumPy cases: masks, per-row k and tau, axis, largest,
    infinities, NaN, overflow, tiny tau, half precision, long rows with candidates."""
    torch = pytest.importorskip("torch")
    fast = get_backend("torch")
    generic = dataclasses.replace(fast, soft=None, select_candidates=None)
    fwd = tk.dftopk if output == "probs" else tk.dftopk_logits
    n_cases = 0
    for case in _cases(rng):
        x, k, kw = _torch_case(torch, *case)
        g = torch.from_numpy(rng.standard_normal(x.shape)).to(x.dtype)
        gx, gt = tk.dftopk_vjp(x, k, g, output=output, **kw)
        out, vjp = tk.dftopk_and_vjp(x, k, output=output, **kw)
        gx2, gt2 = vjp(g)
        out.fill_(123.0)  # the caller owns the output: the residuals are elsewhere
        gx3, _ = vjp(g)
        if output == "probs":
            hard, hvjp = tk.dftopk_and_vjp(x, k, hard=True, **kw)
            torch.testing.assert_close(hard, tk.dftopk(x, k, hard=True, **kw), rtol=0, atol=0)
            torch.testing.assert_close(hvjp(g)[0], gx, rtol=0, atol=0, equal_nan=True)
        register_backend("torch", generic)
        try:
            ref = fwd(x, k, **kw)
            rgx, rgt = tk.dftopk_vjp(x, k, g, output=output, **kw)
            rout = tk.dftopk_and_vjp(x, k, output=output, **kw)[0]
        finally:
            register_backend("torch", fast)
        n_cases += 1
        assert gx.dtype == x.dtype and out.dtype == x.dtype and gt.dtype == x.dtype
        torch.testing.assert_close(gx3, gx2, rtol=0, atol=0, equal_nan=True)
        got_out = tk.dftopk_and_vjp(x, k, output=output, **kw)[0]
        pairs = ((got_out, rout), (got_out, ref), (gx, rgx), (gx2, rgx), (gt, rgt), (gt2, rgt))
        for got, want in pairs:
            got = got.double().numpy()
            want = want.double().numpy()
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
            fin = np.isfinite(want)
            _close(got[fin], want[fin], x.numpy().dtype)
        if "mask" in kw:
            assert bool((gx[~kw["mask"]] == 0).all())
    # every case ran the hook, forward and backward; the long rows handed over candidates
    assert torch_soft_calls[0] >= 3 * n_cases and torch_soft_calls[1] >= 3 * n_cases
    assert torch_soft_calls[2] > 0


@pytest.mark.parametrize("output", ["probs", "logits"])
def test_torch_closed_form_jvp_matches_generic_math(rng, output, monkeypatch):
    """torch's ``tangent`` (``dftopk_jvp`` on eager CPU tensors) against the generic JVP
    over the same cases and tangents as NumPy's."""
    torch = pytest.importorskip("torch")
    from topk_core.adapters import torch_adapter

    calls = []
    tangent = torch_adapter.closed_form_tangent
    monkeypatch.setattr(
        torch_adapter, "closed_form_tangent", lambda *a: calls.append(1) or tangent(*a)
    )
    fast = get_backend("torch")
    generic = dataclasses.replace(fast, soft=None, select_candidates=None)
    n = 0
    for case in _cases(rng):
        x, k, kw = _torch_case(torch, *case)
        for u, dtau, hard in _jvp_variants(rng, *case[::2]):
            if hard and output == "logits":
                continue
            u = torch.from_numpy(u)
            dtau = torch.from_numpy(dtau) if isinstance(dtau, np.ndarray) else dtau
            args = {"output": output, "tau_tangent": dtau, "hard": hard, **kw}
            out, d = tk.dftopk_jvp(x, k, u, **args)
            register_backend("torch", generic)
            try:
                rout, rd = tk.dftopk_jvp(x, k, u, **args)
            finally:
                register_backend("torch", fast)
            n += 1
            assert out.dtype == d.dtype == x.dtype and d.shape == x.shape
            _same(out.double().numpy(), rout.double().numpy(), case[0].dtype)
            _same(d.double().numpy(), rd.double().numpy(), case[0].dtype)
            if "mask" in kw:
                assert bool((d[~kw["mask"]] == 0).all())
    assert len(calls) == n


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("output", ["probs", "logits"])
def test_fast_jvp_is_the_transpose_of_the_fast_vjp(rng, library, output):
    """``<v, J u> + 0 = <J^T v, u> + grad_tau dtau``: the hooks' tangent and backward are
    each other's transpose, the threshold term on ties and ``tau``'s term included."""
    x = np.round(rng.standard_normal((5, 300)) * 4)  # many ties with a and b
    mask = rng.random((5, 300)) > 0.2
    tau = rng.random((5, 1)) + 0.3
    u, v, dtau = rng.standard_normal((3, 5, 300))
    dtau = dtau[:, :1]
    args = (_on(library, x), 40)
    kw = {"tau": _on(library, tau), "mask": _on(library, mask), "output": output}
    _, d = tk.dftopk_jvp(*args, _on(library, u), tau_tangent=_on(library, dtau), **kw)
    gx, gt = tk.dftopk_vjp(*args, _on(library, v), **kw)
    lhs = np.sum(v * _host(d))
    rhs = np.sum(_host(gx) * u) + np.sum(_host(gt) * dtau)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10)
    _, d_desc = tk.dftopk_jvp(*args, _on(library, u), largest=False, **kw)
    gx_desc, _ = tk.dftopk_vjp(*args, _on(library, v), largest=False, **kw)
    np.testing.assert_allclose(np.sum(v * _host(d_desc)), np.sum(_host(gx_desc) * u), rtol=1e-10)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_fast_jvp_tau_term_where_one_factor_alone_overflows(rng, library):
    """``tau``'s term ``-z dtau / tau`` is in range where ``z / tau`` is not (logits near
    float32's largest value, ``|dtau| < tau < 1``), and ``dtau / tau`` past the range leaves
    the entries whose ``z`` is infinite (or whose ``p (1 - p)`` underflowed) at 0, not NaN:
    each hook against the float64 result of the same float32 inputs and the generic code."""
    if library == "torch":
        pytest.importorskip("torch")
    fast = get_backend(library)
    generic = dataclasses.replace(fast, soft=None, select_candidates=None)
    x = rng.uniform(-1e38, 1e38, (2, 50)).astype(np.float32)
    tau = np.array([[0.6], [0.7]], np.float32)
    dtau = np.array([[0.3], [-0.2]], np.float32)
    u = rng.standard_normal(x.shape).astype(np.float32)
    f64 = {"tau": tau.astype(np.float64), "tau_tangent": dtau.astype(np.float64)}
    want = tk.dftopk_jvp(x.astype(np.float64), 10, u.astype(np.float64), output="logits", **f64)
    z = want[0].astype(np.float32)
    assert np.isfinite(z).all() and np.abs(want[1]).max() < 3e38
    with np.errstate(over="ignore"):
        assert not np.isfinite(z / tau).all()  # what the hooks divided first
    args = (_on(library, x), 10, _on(library, u))
    kw = {"tau": _on(library, tau), "tau_tangent": _on(library, dtau), "output": "logits"}
    got = _host(tk.dftopk_jvp(*args, **kw)[1])
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want[1], rtol=2e-6, atol=1e-6 * np.abs(want[1]).max())

    # dtau / tau = 1e39: float32 overflows; a float tau and a tau-shaped array alike
    y = np.array([[np.inf, 1e-30, 0.0, -1e-30, -np.inf, 2e-30]], np.float32)
    z = np.array([[0.0, 1e-36, -1e-36, 5e-36, -5e-36, 3e-30]], np.float32)  # p(1-p) -> 0
    ones = np.ones_like(y)
    for scores, output in ((y, "logits"), (z, "probs")):
        for t, dt in ((1e-37, 100.0), (np.array([[1e-37]], np.float32), np.full((1, 1), 100.0))):
            kw = {"output": output, "tau": t, "tau_tangent": dt}
            kw.update({n: _on(library, v) for n, v in kw.items() if isinstance(v, np.ndarray)})
            args = (_on(library, scores), 3, _on(library, ones))
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no invalid-value warning either
                got = _host(tk.dftopk_jvp(*args, **kw)[1])
            register_backend(library, generic)
            try:
                ref = _host(tk.dftopk_jvp(*args, **kw)[1])
            finally:
                register_backend(library, fast)
            assert not np.isnan(got).any(), (output, got)
            np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
            _within_z_eps(got, ref, scores, t, dt, output)
        if output == "logits":
            assert got[0, 0] == got[0, 4] == 0.0  # infinite z: no tau term
        else:
            assert got[0, -1] == 0.0  # p (1 - p) underflowed to 0


def test_torch_closed_form_jvp_defers_for_graphs_and_func(rng):
    """A tangent that requires grad records a graph through the generic code, on copies
    of the pooled residuals (the graph outlives them); a ``torch.func`` tangent (vmap)
    runs the generic code too; both give the eager kernels' values."""
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((4, 300)))
    u = torch.from_numpy(rng.standard_normal((4, 300)))
    v = torch.from_numpy(rng.standard_normal((4, 300)))
    _, want = tk.dftopk_jvp(x, 30, u, tau=0.5)
    ur = u.clone().requires_grad_()
    POOL.clear()
    _, d = tk.dftopk_jvp(x, 30, ur, tau=0.5)
    assert d.requires_grad
    torch.testing.assert_close(d.detach(), want, rtol=1e-12, atol=1e-12)
    for _ in range(3):  # the residuals' buffers went back to the pool: overwrite them
        tk.dftopk_vjp(x * 3.0, 30, u, tau=0.5)
    (got,) = torch.autograd.grad((d * v).sum(), ur)
    # the JVP is linear in u: its own VJP along v is the VJP of dftopk along v
    torch.testing.assert_close(got, tk.dftopk_vjp(x, 30, v, tau=0.5)[0], rtol=1e-10, atol=1e-12)
    us = torch.stack([u, v])
    batched = torch.func.vmap(lambda ui: tk.dftopk_jvp(x, 30, ui, tau=0.5)[1])(us)
    torch.testing.assert_close(batched[0], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(batched[1], tk.dftopk_jvp(x, 30, v, tau=0.5)[1])


def test_torch_closed_form_defers_to_the_generic_code_for_graphs(rng, torch_soft_calls):
    """Where a graph is recorded (grad mode, an input that requires grad) or values
    cannot be read on the host (``torch.func``), the generic, differentiable code runs:
    the closed-form VJP stays differentiable and gives the eager kernels' values."""
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((3, 40)))
    g = torch.from_numpy(rng.standard_normal((3, 40)))
    want, want_tau = tk.dftopk_vjp(x, 6, g, tau=0.5)
    assert torch_soft_calls[:2] == [1, 1]
    xr = x.clone().requires_grad_()
    got, got_tau = tk.dftopk_vjp(xr, 6, g, tau=0.5)
    # the forward defers at once, the backward from inside the hook
    assert got.requires_grad and torch_soft_calls[:2] == [1, 2]
    torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_tau.detach(), want_tau, rtol=1e-12, atol=1e-12)
    (hvp,) = torch.autograd.grad((got * g).sum(), xr)  # second order through the VJP
    assert hvp.shape == x.shape and bool(torch.isfinite(hvp).all())
    # a cotangent that requires grad: the backward defers (from inside the hook, on
    # copies of the pooled residuals), the forward did not
    gr = g.clone().requires_grad_()
    _, vjp = tk.dftopk_and_vjp(x, 6, tau=0.5)
    got = vjp(gr)[0]
    assert got.requires_grad and torch_soft_calls[:2] == [2, 3]
    torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)
    batched = torch.func.vmap(lambda xi, gi: tk.dftopk_vjp(xi, 6, gi, tau=0.5)[0])(x, g)
    assert torch_soft_calls[:2] == [2, 3]
    torch.testing.assert_close(batched, want, rtol=1e-12, atol=1e-12)


def test_torch_closed_form_graph_outlives_the_pooled_residuals(rng):
    """A cotangent that requires grad makes the ``vjp`` record a graph, which saves
    ``p (1 - p)``; the residuals' pooled buffers go back when the ``vjp`` dies and the
    next call reuses them, so the graph must hold its own copy."""
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((4, 300)))
    g = torch.from_numpy(rng.standard_normal((4, 300))).requires_grad_()
    u = torch.from_numpy(rng.standard_normal((4, 300)))
    POOL.clear()
    _, vjp = tk.dftopk_and_vjp(x, 30, tau=0.5)
    gx = vjp(g)[0]
    del vjp  # the residuals' buffers go back to the pool
    for _ in range(3):  # ... and are taken again, and overwritten
        tk.dftopk_vjp(x * 3.0, 30, u, tau=0.5)
    (got,) = torch.autograd.grad((gx * u).sum(), g)
    # the VJP is linear in g: its own VJP along u is the JVP of dftopk along u
    want = tk.dftopk_jvp(x, 30, u, tau=0.5)[1]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["c", "transposed"])
def test_sampled_selection_candidates_hold_every_tie(rng, layout):
    # the forward's tie search among the handed-over candidates finds what comparing
    # all of x finds: ties with a and b, masked entries left out, NaN rows included
    x = np.round(rng.standard_normal((4, 66000)) * 2).astype(np.float32)
    x[1, ::500] = np.nan  # 132 NaN: the k-th largest is a number for k > 132
    if layout == "transposed":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, -1, 0)), 0, -1)
    mask = np.broadcast_to(rng.random(66000) > 0.2, x.shape)
    for k in (1000, 6600, 33000, np.array([[0], [300], [40000], [66000]])):
        for v in (None, mask):
            # as the API selects: masked entries are -inf there
            xm = x if v is None else np.where(v, x, -np.inf)
            a, b, pos = numpy_backend.select_candidates(np, xm, k)
            assert pos is not None
            ra, rb = numpy_backend.select_pair(np, xm, k)
            np.testing.assert_array_equal(a, ra)
            np.testing.assert_array_equal(b, rb)
            want = numpy_soft._tie_positions(x, a, b, v)
            got = numpy_soft._tie_positions(x, a, b, v, pos)
            assert want.size >= 8  # rounded values: many ties per row
            np.testing.assert_array_equal(got, want)


def test_public_vjp_calls_hand_the_candidates_to_the_forward(rng, monkeypatch):
    seen = []
    search = numpy_soft._tie_positions

    def spy(x, a, b, valid, candidates=None):
        seen.append(candidates is not None)
        return search(x, a, b, valid, candidates)

    monkeypatch.setattr(numpy_soft, "_tie_positions", spy)
    x = rng.standard_normal((2, 70000)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    tk.dftopk_and_vjp(x, 7000)[1](g)
    tk.dftopk_vjp(x, np.array([10, 20000]), g, mask=x > -3)
    tk.dftopk_vjp(x[:, :300], 30, g[:, :300])  # short rows: no sampled selection
    assert seen == [True, True, False]


def test_no_candidates_where_a_bracket_was_redone(rng, monkeypatch):
    x = rng.standard_normal((3, 70000)).astype(np.float32)
    assert numpy_backend.select_candidates(np, x, 7000)[2] is not None
    monkeypatch.setattr(numpy_backend, "_BRACKET_SD", 0.0)  # some brackets miss
    a, b, pos = numpy_backend.select_candidates(np, x, 7000)
    ra, rb = _reference_pair(x, 7000)
    np.testing.assert_array_equal(a, ra)
    np.testing.assert_array_equal(b, rb)
    assert pos is None
    assert numpy_backend.select_candidates(np, x[:, :100], 10)[2] is None  # not sampled


def test_exp2_only_where_numpy_has_a_simd_loop_for_it():
    introspect = pytest.importorskip("numpy.lib.introspect")  # NumPy >= 2.0
    for dtype in (np.float32, np.float64):
        char = np.dtype(dtype).char
        loops = introspect.opt_func_info(func_name="^exp2$", signature=np.dtype(dtype).name)
        current = loops["exp2"][char + char]["current"]
        assert numpy_soft.exp2_is_simd(np.dtype(dtype)) is (not current.startswith("baseline"))


def test_and_vjp_residuals_do_not_alias_the_output(rng):
    x = rng.standard_normal((3, 50))
    g = rng.standard_normal(x.shape)
    for output in ("probs", "logits"):
        want = tk.dftopk_vjp(x, 5, g, tau=0.4, output=output)
        out, vjp = tk.dftopk_and_vjp(x, 5, tau=0.4, output=output)
        out[...] = 123.0  # the caller owns the output
        got = vjp(g)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        gx_again = vjp(g)[0]  # a second call reads the same residuals
        np.testing.assert_array_equal(gx_again, want[0])
        assert not np.shares_memory(gx_again, got[0])


@pytest.mark.parametrize("output", ["probs", "logits"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_and_vjp_residuals_keep_no_reference_to_x_or_the_mask(rng, output, dtype):
    """The NumPy residuals copy what the backward reads of ``x``: the tied values
    and, in rows whose threshold is NaN, the NaN positions (elsewhere a NaN entry is
    found from its own NaN logit).  So neither ``x`` nor the mask is copied whole,
    and overwriting both before the ``vjp`` changes nothing.  Rows: ties at ``a`` and
    ``b``; a NaN entry with a finite threshold; a NaN threshold (k <= its NaN count);
    infinite ``a`` (limit rule); a masked NaN."""
    nan, inf = np.nan, np.inf
    x0 = rng.standard_normal((6, 9)).astype(dtype)
    x0[0, [1, 4, 6]] = 2.0
    x0[0, [0, 7]] = 1.0
    x0[1, 3] = nan
    x0[2, [2, 5]] = nan
    x0[3, [0, 8]] = inf
    x0[4, [1]] = nan
    m0 = np.ones(x0.shape, dtype=bool)
    m0[4, 1] = m0[5, 0] = False
    g = rng.standard_normal(x0.shape)
    kw = {"tau": 0.3, "output": output, "mask": m0}
    with np.errstate(invalid="ignore"):
        want = tk.dftopk_vjp(x0, 2, g.astype(dtype), **kw)
    x, m = x0.copy(), m0.copy()
    _, vjp = tk.dftopk_and_vjp(x, 2, **{**kw, "mask": m})
    x[...] = rng.standard_normal(x.shape)
    m[...] = ~m0
    with np.errstate(invalid="ignore"):
        got = vjp(g.astype(dtype))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert np.isnan(want[0][2]).any() == (output == "probs")  # the NaN-threshold row ran


def test_scratch_pool_bounds_and_reuse():
    pool = ScratchPool(max_bytes=1000, max_each=600)
    a = pool.take((10, 10), np.float32)  # 400 bytes
    big = pool.take((200,), np.float32)  # 800 bytes: never kept
    pool.give(a, big)
    assert pool.held_bytes == 400
    b = pool.take((100,), np.float32)
    assert np.shares_memory(a, b) and pool.held_bytes == 0
    pool.give(b)
    c = pool.take((100,), np.float64)  # another dtype: fresh
    assert not np.shares_memory(b, c)
    pool.clear()
    assert pool.held_bytes == 0


def _on(library, arr):
    """``arr`` as an array of ``library`` (numpy or torch; torch skipped where missing)."""
    if library == "numpy":
        return arr
    return pytest.importorskip("torch").from_numpy(arr)


def _host(arr):
    """A NumPy view of a NumPy array or a CPU tensor."""
    return arr if isinstance(arr, np.ndarray) else arr.numpy()


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("output", ["probs", "logits"])
def test_pool_buffers_come_back_when_the_vjp_dies(rng, library, output):
    """NumPy's residuals, and torch's closed-form ones (``torch.from_numpy`` views),
    live in the scratch pool until the ``vjp`` dies; the output is never pooled."""
    x = _on(library, rng.standard_normal((4, 1000)))
    g = _on(library, rng.standard_normal((4, 1000)))
    POOL.clear()
    out, vjp = tk.dftopk_and_vjp(x, 10, output=output)
    want = vjp(g)
    held = POOL.held_bytes
    del vjp
    assert POOL.held_bytes > held  # residuals (z and p(1-p)) returned to the pool
    assert POOL.held_bytes <= POOL.max_bytes
    # the next call takes those buffers: the first call's output and gradient keep theirs
    out_copy, gx_copy = _host(out).copy(), _host(want[0]).copy()
    _, vjp = tk.dftopk_and_vjp(-x, 10, output=output)
    vjp(g)
    np.testing.assert_array_equal(_host(out), out_copy)
    np.testing.assert_array_equal(_host(want[0]), gx_copy)


@pytest.mark.parametrize("output", ["probs", "logits"])
def test_torch_and_vjp_keeps_its_copy_of_x_in_the_pool(rng, output):
    """torch's ``dftopk_and_vjp`` copies ``x`` (the residuals read it, and the caller may
    change it in place) into the scratch pool, not a fresh tensor, and the copy goes
    back when the ``vjp`` dies: with ``z`` (and ``p (1 - p)``), 2 (3) buffers of x's size."""
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((4, 1000)))
    g = torch.from_numpy(rng.standard_normal((4, 1000)))
    POOL.clear()
    _, vjp = tk.dftopk_and_vjp(x, 10, output=output)
    want = vjp(g)
    x.add_(1.0)  # the copy, not x, is what the vjp reads
    np.testing.assert_array_equal(vjp(g)[0].numpy(), want[0].numpy())
    held = POOL.held_bytes
    del vjp
    assert POOL.held_bytes - held == (3 if output == "probs" else 2) * x.numel() * 8


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_threads_share_the_pool_safely(rng, library):
    xs = [_on(library, rng.standard_normal((8, 2000))) for _ in range(4)]
    gs = [_on(library, rng.standard_normal((8, 2000))) for _ in range(4)]
    want = [tk.dftopk_vjp(x, 100, g, tau=0.5)[0] for x, g in zip(xs, gs)]
    got: dict[int, list] = {i: [] for i in range(4)}

    def work(i):
        for _ in range(20):
            got[i].append(tk.dftopk_vjp(xs[i], 100, gs[i], tau=0.5)[0])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(4):
        assert len(got[i]) == 20
        for r in got[i]:
            np.testing.assert_array_equal(_host(r), _host(want[i]))


def _reference_pair(x, k):
    n = x.shape[-1]
    s = np.sort(x, axis=-1)  # NaN last: the largest
    kk = np.broadcast_to(np.asarray(k), x.shape[:-1] + (1,))
    a = np.where(kk == 0, np.inf, np.take_along_axis(s, np.clip(n - kk, 0, n - 1), -1))
    b = np.where(kk == n, -np.inf, np.take_along_axis(s, np.clip(n - kk - 1, 0, n - 1), -1))
    return a, b


@pytest.mark.parametrize(
    "shape",
    [(70000,), (2, 66000), (4, 66003), (5, 3000), (3, 2051), (3, 2048), (6, 300), (9, 17)]
    + [(1, 1024), (4, 1500), (2, 2047)],
)
@pytest.mark.parametrize("layout", ["c", "transposed"])
def test_numpy_selection_paths_match_a_sort(rng, shape, layout):
    n = shape[-1]
    for trial in range(6):
        x = rng.standard_normal(shape).astype(np.float32)
        if layout == "transposed":  # rows not C-contiguous: the sampled path's other gather
            x = np.ascontiguousarray(np.moveaxis(x, -1, 0))
            x = np.moveaxis(x, 0, -1)
        if trial == 1:
            x = np.round(x * 2)  # heavy ties
        if trial == 2:
            x[..., ::7] = np.nan
        if trial == 3:
            x[..., ::3] = -np.inf
        if trial == 4:
            x = np.sort(x, axis=-1)  # sorted rows: the sample is stratified, still exact
        # scalar k = n with NaN: np.min's NaN (the NaN rule is issue 13's)
        ks = [1, n // 10, n // 2, n - 1, 0] + ([] if trial == 2 else [n])
        for k in ks:
            a, b = numpy_backend.select_pair(np, x, k)
            ra, rb = _reference_pair(x, k)
            np.testing.assert_array_equal(a, ra)
            np.testing.assert_array_equal(b, rb)
        kr = rng.integers(0, n + 1, size=shape[:-1] + (1,))
        a, b = numpy_backend.select_pair(np, x, kr)
        ra, rb = _reference_pair(x, kr)
        np.testing.assert_array_equal(a, ra)
        np.testing.assert_array_equal(b, rb)


@pytest.mark.parametrize("n", [8, 16, 2040, 2048, 4080, 4104, 70000])
def test_numpy_row_count_matches_count_nonzero(rng, n):
    # 64-bit words summed 255 at a time: below, at and past a group, with a rest
    mask = rng.random((5, n)) < 0.9
    mask[1] = True  # every byte lane at its most
    mask[2] = False
    want = np.count_nonzero(mask, axis=-1).reshape(5, 1)
    np.testing.assert_array_equal(numpy_backend._row_count(mask), want)
    np.testing.assert_array_equal(numpy_backend._row_count(mask[3:4]), want[3:4])


def test_partition_pair_places_both_ranks(rng):
    # either kth first (the one that leaves the shorter side), ties, one or more rows
    for rows, size in ((1, 1), (1, 2), (3, 7), (2, 50), (4, 1001)):
        v = np.round(rng.standard_normal((rows, size)) * 3).astype(np.float32)
        want = np.sort(v, axis=-1)
        last = size - 1
        pairs = {(0, 0), (0, last), (last, last), (last // 2, last // 2), (0, last // 3)}
        pairs |= {(last // 2, last), (1 % size, last), (last // 3, 2 * last // 3)}
        pairs |= {tuple(sorted(map(int, rng.integers(0, size, 2)))) for _ in range(20)}
        for i, j in pairs:
            got = v.copy()
            numpy_backend._partition_pair(got, i, j)
            np.testing.assert_array_equal(got[:, i], want[:, i])
            np.testing.assert_array_equal(got[:, j], want[:, j])
            np.testing.assert_array_equal(np.sort(got, axis=-1), want)  # a permutation


@pytest.mark.parametrize("k", [1, 700, 7000, 35000, 63000, 69999])
def test_scalar_k_bracket_matches_the_sorted_sample(rng, k):
    # a wrong bracket would only slow the selection down (its misses are redone
    # exactly), so the scalar-k path is checked against the per-row path's full sort
    x = np.round(rng.standard_normal((3, 70000)) * 50).astype(np.float32)
    kk = np.full((3, 1), k, dtype=np.int64)
    kl, kh = np.maximum(kk, 1), np.minimum(kk + 1, x.shape[1])
    lo, hi = numpy_backend._bracket(x, kl, kh, k)
    want_lo, want_hi = numpy_backend._bracket(x, kl, kh, None)
    np.testing.assert_array_equal(lo, want_lo)
    np.testing.assert_array_equal(hi, want_hi)
    assert bool((lo < hi).all())


def test_sampled_bracket_misses_are_redone_exactly(rng, monkeypatch):
    x = rng.standard_normal((4, 70000)).astype(np.float32)
    for sd in (-50.0, 0.0):  # every bracket misses / many brackets miss
        monkeypatch.setattr(numpy_backend, "_BRACKET_SD", sd)
        for k in (1, 7000, 69999, np.array([[0], [5], [35000], [70000]])):
            a, b = numpy_backend.select_pair(np, x, k)
            ra, rb = _reference_pair(x, k)
            np.testing.assert_array_equal(a, ra)
            np.testing.assert_array_equal(b, rb)


@pytest.mark.parametrize(
    "module",
    [
        "topk_core.backends.numpy_backend",
        "topk_core.backends.numpy_soft",
        "topk_core._radix",
        "topk_core.backends.jax_backend",
        "topk_core.adapters.jax_adapter",
        "topk_core.backends.torch_backend",
    ],
)
def test_docstring_examples_run(module):
    import doctest
    import importlib

    need = {"jax_backend": "jax", "jax_adapter": "jax", "torch_backend": "torch"}
    pytest.importorskip(need.get(module.rsplit(".", 1)[1], "numpy"))
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    result = doctest.testmod(importlib.import_module(module), optionflags=flags)
    assert result.attempted > 0 and result.failed == 0


def test_torch_per_row_k_topk_path_matches_a_sort(rng):
    torch = pytest.importorskip("torch")
    from topk_core.backends import torch_backend

    for trial in range(24):
        shape = [(50, 37), (9, 256), (4, 1000), (1, 12)][trial % 4]
        x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        if trial % 3 == 1:
            x = torch.round(x * 2)  # ties
        if trial % 5 == 2:
            x[..., ::4] = float("nan")
        n = shape[-1]
        lo, hi = [(0, n + 1), (0, n // 3), (n // 2, n + 1), (n // 4, n // 4 + 1)][trial % 4]
        k = torch.from_numpy(rng.integers(lo, hi, size=shape[:-1] + (1,)))
        got = torch_backend._select_rowk_topk(x, k)
        want = torch_backend._select_sorted(x, k)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, equal_nan=True, rtol=0, atol=0)


def test_torch_eager_backward_matches_graph_safe_path(rng):
    torch = pytest.importorskip("torch")
    from topk_core.adapters import torch_adapter

    cases = [
        ((4, 50), 5, 0.3, None),
        ((3, 40), 4, 1.0, rng.random((3, 40)) > 0.3),
        ((2, 30), 30, 0.7, None),  # k = n: b = -inf, generic logits
        ((5, 20), 3, 2.0, None),
    ]
    for shape, k, tau, mask in cases:
        x = torch.from_numpy(np.round(rng.standard_normal(shape) * 2))  # with ties
        g = torch.from_numpy(rng.standard_normal(shape))
        valid = None if mask is None else torch.from_numpy(mask)
        xm = x if valid is None else torch.where(valid, x, -np.inf)
        a, b = torch_adapter.select_pair(None, xm, k)
        out = torch_adapter.forward_math(x, a, b, tau, valid, "probs")
        with torch.no_grad():
            fast = torch_adapter.backward_math("probs", x, a, b, out, g, tau, valid, False)[0]
        with torch.enable_grad():  # grad mode: the graph-safe path
            slow = torch_adapter.backward_math("probs", x, a, b, out, g, tau, valid, False)[0]
        torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 70000), (3, 4096)])  # 16-bit and 11-bit digits
def test_jax_wide_digit_selection_matches_a_sort(rng, shape):
    jax = pytest.importorskip("jax")
    from topk_core.backends import jax_backend

    n = shape[-1]
    assert jax_backend.digit_bits_for(shape[0], n) == (16 if n > 65536 else 11)
    for trial in range(3):
        x = rng.standard_normal(shape).astype(np.float32)
        if trial == 1:
            x = np.round(x * 2)
        if trial == 2:
            x[..., ::7] = np.nan
        # per-row k arrays are traced (one compilation); one static k
        for k in (
            n // 10,
            rng.integers(0, n + 1, size=shape[:-1] + (1,)),
            np.full(shape[:-1] + (1,), n - 1),
        ):
            kk = k if isinstance(k, int) else jax.numpy.asarray(k)
            a, b = jax_backend.select_pair(jax.numpy, jax.numpy.asarray(x), kk)
            ra, rb = _reference_pair(x, k)
            np.testing.assert_array_equal(np.asarray(a), ra)
            np.testing.assert_array_equal(np.asarray(b), rb)


def test_jax_residuals_are_p_and_one_byte_per_entry(rng):
    jax = pytest.importorskip("jax")
    x = jax.numpy.asarray(rng.standard_normal((4, 25000)).astype(np.float32))
    _, pull = jax.vjp(jax.jit(lambda v: tk.dftopk(v, 2500, tau=0.5)), x)
    saved = sum(int(leaf.nbytes) for leaf in jax.tree_util.tree_leaves(pull))
    # p (4 bytes), the int8 tie code (1 byte) and a few values per row; the input is not kept
    assert saved <= 5 * x.size + 4096, saved


def _backward_with_and_without(x, a, b, g, valid, cand):
    """The torch eager backward (tau 0.5) with the tie candidates and with full comparisons."""
    import torch
    from topk_core.adapters import torch_adapter

    out = torch_adapter.forward_math(x, a, b, 0.5, valid, "probs")
    with torch.no_grad():
        got = torch_adapter.backward_math(
            "probs", x, a, b, out, g, 0.5, valid, False, candidates=cand
        )[0]
        want = torch_adapter.backward_math("probs", x, a, b, out, g, 0.5, valid, False)[0]
    return got, want


def test_torch_sampled_selection_candidates_hold_every_tie(rng):
    torch = pytest.importorskip("torch")
    from topk_core.backends import torch_backend

    for shape, k in (((70000,), 7000), ((2, 66000), np.array([5, 33000]))):
        x = torch.from_numpy(np.round(rng.standard_normal(shape) * 40).astype(np.float32))
        g = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        valid = torch.from_numpy(rng.random(shape) > 0.2)
        kk = k if isinstance(k, int) else torch.from_numpy(k).reshape(-1, 1)
        if not isinstance(k, int):  # per-row k clipped to the valid count, as prepare does
            kk = torch.minimum(kk, valid.sum(-1, keepdim=True))
        xm = torch.where(valid, x, -np.inf)
        a, b, cand = torch_backend.select_pair_and_candidates(xm, kk)
        assert cand is not None and cand.numel() < x.numel() // 10
        ra, rb = torch_backend._select_sorted(xm, torch.full(shape[:-1] + (1,), 0) + kk)
        assert torch.equal(a, ra) and torch.equal(b, rb)
        got, want = _backward_with_and_without(x, a, b, g, valid, cand)
        assert torch.equal(got, want)


def test_torch_short_row_candidates_hold_every_tie(rng, monkeypatch):
    torch = pytest.importorskip("torch")
    from topk_core.adapters import torch_adapter
    from topk_core.backends import torch_backend

    # rows of integers (ties everywhere), of floats (ties in a few rows) and with NaN and
    # infinities; k on the largest side and on the smallest side
    shape = (64, 300)
    ints = np.round(rng.standard_normal(shape) * 30).astype(np.float32)
    floats = rng.standard_normal(shape).astype(np.float32)
    floats[:3, :40] = floats[:3, :1]  # a tie block in three rows only
    odd = floats.copy()
    odd[5, :7] = np.nan
    odd[6, :20] = np.inf
    odd[7, 100:] = -np.inf
    seen = {"clear": 0, "spill": 0, "none": 0, "masks": 0}
    for data in (ints, floats, odd):
        for k in (2, 30, 150, 220, 298):
            valid = torch.from_numpy(rng.random(shape) > 0.1)
            x = torch.from_numpy(data)
            g = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
            xm = torch.where(valid, x, -np.inf)
            a, b, cand = torch_backend.select_pair_and_candidates(xm, k)
            ra, rb = torch_backend._select_sorted(xm, torch.full((shape[0], 1), k))
            same = {"rtol": 0, "atol": 0, "equal_nan": True}
            torch.testing.assert_close(a, ra, **same)
            torch.testing.assert_close(b, rb, **same)
            if cand is None:
                seen["none"] += 1
                continue
            seen["spill" if cand.numel() >= shape[1] else "clear"] += 1
            seen["masks"] += cand.numel() > torch_adapter._HOST_TIES
            got, want = _backward_with_and_without(x, a, b, g, valid, cand)
            torch.testing.assert_close(got, want, **same)
            # every tie weighed on the host, after a compaction: the same bits
            with monkeypatch.context() as m:
                m.setattr(torch_adapter, "_HOST_TIES", 10**9)
                host, _ = _backward_with_and_without(x, a, b, g, valid, cand)
            torch.testing.assert_close(got, host, **same)
    # every branch ran: no ties beyond the selection, a few tied rows spilled, too many;
    # candidates weighed through masks (more than _HOST_TIES of them)
    assert min(seen.values()) > 0, seen


def test_torch_tie_weights_on_host_match_the_tensor_branch(rng, monkeypatch):
    torch = pytest.importorskip("torch")
    from topk_core.adapters import torch_adapter

    for dtype in (np.float32, np.float64):
        x = torch.from_numpy(np.round(rng.standard_normal((6, 40)) * 3).astype(dtype))
        x[0, :3] = np.inf  # an infinite a weighs nothing
        x[1, :] = np.nan  # NaN a and b
        g = torch.from_numpy(rng.standard_normal((6, 40)).astype(dtype))
        valid = torch.from_numpy(rng.random((6, 40)) > 0.2)
        for k in (1, 5, 20):
            xm = torch.where(valid, x, -np.inf)
            a, b = torch_adapter.select_pair(None, xm, k)
            out = torch_adapter.forward_math(x, a, b, 0.5, valid, "probs")
            grads = []
            for host in (256, 0):
                monkeypatch.setattr(torch_adapter, "_HOST_TIES", host)
                with torch.no_grad():
                    grads.append(
                        torch_adapter.backward_math("probs", x, a, b, out, g, 0.5, valid, False)[0]
                    )
            torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0, equal_nan=True)


def test_pass_budget_phases_and_report(tmp_path, rng):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: a checkout
    from benchmarks import ops, passes, report

    driver = ops.get_driver("numpy")
    x, g = driver.make_input(
        rng.standard_normal(4096).astype(np.float32), rng.standard_normal(4096), "float32", "cpu"
    )
    unit = driver.build("elementwise", "sel", x, g, 400, 1.0).run
    total = driver.build("ours", "fwd+bwd", x, g, 400, 1.0).run
    entry = passes.measure(
        unit, driver.phases(x, g, 400, 1.0), total, rounds=5, budget_s=1.0, warmup=1
    )
    p = entry["passes"]
    assert entry["rounds"] == 5 and entry["unit_s"] > 0
    assert set(p) >= {"select", "fwd_math", "bwd_math", "math", "total", "other"}
    assert p["math"] == pytest.approx(p["fwd_math"] + p["bwd_math"])
    assert all(p[k] > 0 for k in ("select", "fwd_math", "bwd_math", "total"))
    row = dict(backend="numpy", dtype="float32", batch=None, n=4096, kfrac=0.1, k=400, status="ok")
    payload = {
        "machine": {"cpu": "test", "cores": 1, "os": "", "python": "", "topk_core": ""},
        "config": {
            "command": "x",
            "warmup": 1,
            "repeats": 1,
            "operators_all": list(ops.OPERATORS),
            "pass_rounds": 5,
            "pass_budget_s": 1.0,
        },
        "results": [
            dict(row, op="ours", mode="fwd+bwd", median_s=entry["total_s"], min_s=entry["total_s"])
        ],
        "passes": [dict(row, **entry)],
        "slopes": {},
    }
    payload["ratios"] = report.ratios(payload["results"])
    report.write_markdown(tmp_path / "results.md", payload, None)
    md = (tmp_path / "results.md").read_text()
    assert "## Pass budget" in md and "## README table" in md
    assert "| numpy | 4096 | passes, math after the selection |" in md
    assert report.write_passes_plot(tmp_path / "passes.png", payload) in (True, False)
