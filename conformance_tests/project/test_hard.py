"""Straight-through hard top-k: ``dftopk(..., hard=True)`` and the ``hard=`` VJP/JVP.

The forward is :func:`topk_core.topk_mask` exactly (values, tie rule, dtype,
``min(k, n_valid)`` ones, masks, per-row k); every derivative is the soft
``p``'s at the same ``x``, ``k``, ``tau``.  Framework-specific checks
(autograd, torch.func, torch.compile, jit/vmap/grad) follow the
library-parametrized ones.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from topk_core.conformance.plugin import tol
from topk_core.conformance.reference import ref_topk_mask, ref_vjp

import topk_core as tk


def _tied_scores(rng, shape):
    # few distinct values: many ties at the k-th value
    return rng.integers(-3, 4, size=shape).astype(np.float64)


CASES = [
    # (shape, axis, k, use_mask, largest)
    ((7,), -1, 3, False, True),
    ((5, 9), -1, 4, True, True),
    ((5, 9), -1, "per-row", True, False),
    ((4, 6, 3), 1, 2, False, False),
    ((3, 8), 0, 1, True, True),
    ((6, 10), -1, "per-row", False, True),
]


# JAX compiles every shape/dtype/static k anew (about 1-3 s each on 2 shared cores): it runs
# a covering subset (a mask with a scalar k, per-row k with largest=False, a middle axis)
# in one half and one full dtype
JAX_CASES = (CASES[1], CASES[2], CASES[3])
JAX_DTYPES = ("bfloat16", "float64")


def _dtypes(lib, case=None):
    if lib.name != "jax":
        return lib.dtypes
    if case is not None and case not in JAX_CASES:
        pytest.skip("JAX is compile-bound here: it runs the cases in JAX_CASES")
    return JAX_DTYPES


def _case(rng, shape, axis, k, use_mask):
    x = _tied_scores(rng, shape)
    mask = rng.random(shape) > 0.3 if use_mask else None
    n = shape[axis]
    if k == "per-row":
        batch = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
        k = rng.integers(0, n + 1, size=batch)
    return x, k, mask


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_hard_forward_is_topk_mask(lib, rng, case):
    shape, axis, k, use_mask, largest = case
    x, k, mask = _case(rng, shape, axis, k, use_mask)
    for dtype in _dtypes(lib, case):
        xa = lib.asarray(x, dtype)
        ka = k if isinstance(k, int) else lib.asarray(k)
        ma = None if mask is None else lib.asarray(mask)
        kw = dict(axis=axis, mask=ma, largest=largest)
        hard = tk.dftopk(xa, ka, tau=0.3, hard=True, **kw)
        assert hard.dtype == xa.dtype
        assert tuple(hard.shape) == tuple(xa.shape)
        h = lib.to_numpy(hard)
        np.testing.assert_array_equal(h, lib.to_numpy(tk.topk_mask(xa, ka, **kw)))
        np.testing.assert_array_equal(h, ref_topk_mask(x, k, axis=axis, mask=mask, largest=largest))
        valid = np.ones(shape, bool) if mask is None else mask
        n_valid = valid.sum(axis)
        np.testing.assert_array_equal(h.sum(axis), np.minimum(k, n_valid))
        assert not np.any(h[~valid])


def _check_rows(lib, x, cases):
    """``cases``: ``{k: expected mask}``; scalar k (not on JAX: a compile per k) and all
    the k at once as a per-row k over a stacked batch."""
    ks = list(cases)
    for dtype in _dtypes(lib)[-1:] if lib.name == "jax" else lib.dtypes:
        xa = lib.asarray(x, dtype)
        for fn in (lambda x, k: tk.dftopk(x, k, hard=True), tk.topk_mask):
            if lib.name != "jax":
                for k, want in cases.items():
                    np.testing.assert_array_equal(lib.to_numpy(fn(xa, k)), np.array(want, float))
            xs = lib.asarray(np.stack([x] * len(ks)), dtype)
            k_rows = lib.asarray(np.repeat(np.array(ks)[:, None], x.shape[0], axis=1))
            want = np.array([cases[k] for k in ks], dtype=float)
            np.testing.assert_array_equal(lib.to_numpy(fn(xs, k_rows)), want)


def test_hard_k_edges_and_infinities(lib):
    x = np.array([[np.inf, 1.0, 0.0, -np.inf], [np.inf, np.inf, 0.0, 0.0]])
    cases = {
        0: [[0, 0, 0, 0], [0, 0, 0, 0]],
        1: [[1, 0, 0, 0], [1, 0, 0, 0]],
        3: [[1, 1, 1, 0], [1, 1, 1, 0]],
        4: [[1, 1, 1, 1], [1, 1, 1, 1]],
    }
    _check_rows(lib, x, cases)


def test_hard_nan_ranks_above_inf(lib):
    """NaN ranks above +inf: selected first, lower index first, exactly min(k, n) ones."""
    nan, inf = np.nan, np.inf
    x = np.array([[1.0, nan, inf, nan, 2.0], [nan, 0.0, nan, nan, 3.0]])
    cases = {
        0: [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0]],
        1: [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0]],
        2: [[0, 1, 0, 1, 0], [1, 0, 1, 0, 0]],
        3: [[0, 1, 1, 1, 0], [1, 0, 1, 1, 0]],
        4: [[0, 1, 1, 1, 1], [1, 0, 1, 1, 1]],
    }
    _check_rows(lib, x, cases)


def _ref_mask_nan_top(x, k, valid):
    """Rows of ``x`` (2-d): top-k by (NaN first, value descending, index ascending)."""
    out = np.zeros(x.shape)
    for r in range(x.shape[0]):
        idx = [i for i in range(x.shape[1]) if valid[r, i]]
        idx.sort(key=lambda i: (not np.isnan(x[r, i]), -np.nan_to_num(x[r, i], nan=0.0), i))
        out[r, idx[: k[r]]] = 1.0
    return out


def test_hard_mask_fast_and_ranked_paths_agree(rng):
    """``_math.hard_mask`` with an eager ``cond`` (which skips the tie ranking when it
    can) and without one agree with a NaN-aware reference on mixed rows."""
    from topk_core import _math
    from topk_core._api import select
    from topk_core._problem import prepare

    for trial in range(60):
        rows, n = 4, int(rng.integers(1, 12))
        kind = trial % 4
        if kind == 0:  # continuous: the fast path
            x = rng.standard_normal((rows, n))
        elif kind == 1:  # surplus ties
            x = rng.integers(-2, 3, size=(rows, n)).astype(float)
        else:  # ties, infinities and NaN
            x = rng.choice([np.nan, np.inf, -np.inf, 0.0, 1.0, -1.0, 0.5], size=(rows, n))
        valid = rng.random((rows, n)) > 0.25 if kind >= 2 else np.ones((rows, n), bool)
        k = rng.integers(0, n + 1, size=rows)
        want = _ref_mask_nan_top(x, np.minimum(k, valid.sum(1)), valid)
        mask = None if kind < 2 else valid
        for kk in (k, int(k.min())):
            pb = prepare(x, kk, None, -1, mask, True, need_tau=False)
            a, _ = select(pb)
            fast = _math.hard_mask(np, pb.x, a, pb.valid, pb.k, cond=_math.eager_cond)
            ranked = _math.hard_mask(np, pb.x, a, pb.valid, pb.k)
            np.testing.assert_array_equal(fast, ranked)
            kr = np.minimum(np.broadcast_to(kk, rows), valid.sum(1))
            np.testing.assert_array_equal(fast, _ref_mask_nan_top(x, kr, valid))
        np.testing.assert_array_equal(tk.dftopk(x, k, mask=mask, hard=True), want)
    # NaN outside the counted entries can balance a surplus of ties: still the NaN rule
    nan = np.nan
    for x, k, want in [
        ([nan, 1.0, 1.0], 2, [1, 1, 0]),
        ([1.0, nan, 1.0, 0.0], 2, [1, 1, 0, 0]),
        ([nan, nan, 2.0, 2.0], 3, [1, 1, 1, 0]),
    ]:
        x = np.array([x])
        np.testing.assert_array_equal(tk.dftopk(x, k, hard=True), [want])
        np.testing.assert_array_equal(tk.topk_mask(x, k), [want])


def test_hard_mask_skips_the_ranking_exactly_where_no_row_has_surplus_ties():
    """The ranking is skipped when every row has exactly ``k`` valid entries at or
    above ``a`` or NaN (the only entries the ranked mask can pick): NaN rows
    included; surplus ties, a NaN beside ``k = 0``, or a masked-out tie still rank.
    Under ``jax.jit`` (``lax.cond``) the same masks."""
    from topk_core import _math
    from topk_core._api import select
    from topk_core._problem import prepare

    nan, inf = np.nan, np.inf
    cases = [  # (rows, k, mask, skipped)
        ([[1.0, 3.0, 3.0, 2.0]], 2, None, True),
        ([[1.0, 3.0, 3.0, 2.0]], 1, None, False),  # two entries at a = 3, one wanted
        ([[nan, 3.0, 1.0, 2.0]], 2, None, True),  # NaN ranks above 3
        ([[nan, nan, 1.0, 2.0]], 2, None, True),  # a is NaN: the two NaN
        ([[nan, nan, 1.0, 2.0]], 1, None, False),  # a is NaN, one of two wanted
        ([[nan, 1.0, 2.0]], 0, None, False),  # k = 0: a = +inf, NaN would count
        ([[inf, 1.0, 2.0]], 0, None, False),
        ([[1.0, 2.0, 5.0]], 0, None, True),
        ([[3.0, 3.0, 1.0]], 1, [[False, True, True]], True),  # the tie is masked out
        ([[-inf, -inf, 1.0], [4.0, 2.0, 2.0]], np.array([3, 2]), None, False),
        ([[-inf, -inf, 1.0], [4.0, 2.0, 2.0]], np.array([3, 3]), None, True),
    ]
    for rows, k, mask, skipped in cases:
        x = np.array(rows)
        valid = None if mask is None else np.array(mask)
        pb = prepare(x, k, None, -1, valid, True, need_tau=False)
        a, _ = select(pb)
        taken = []

        def cond(pred, if_true, if_false, taken=taken):
            taken.append(bool(pred))
            return if_true() if pred else if_false()

        fast = _math.hard_mask(np, pb.x, a, pb.valid, pb.k, cond=cond)
        assert taken == [skipped], (rows, k)
        np.testing.assert_array_equal(fast, _math.hard_mask(np, pb.x, a, pb.valid, pb.k))
        kr = np.minimum(np.broadcast_to(np.asarray(k).reshape(-1), len(rows)), pb.x.shape[-1])
        full = np.ones(x.shape, bool) if valid is None else valid
        np.testing.assert_array_equal(fast, _ref_mask_nan_top(x, np.minimum(kr, full.sum(1)), full))
        if importlib.util.find_spec("jax") is not None:
            import jax
            import jax.numpy as jnp

            def jitted(x, a, valid, k):
                return _math.hard_mask(jnp, x, a, valid, k, cond=jax.lax.cond, dtype=x.dtype)

            kj = pb.k if isinstance(pb.k, int) else jnp.asarray(pb.k)
            vj = None if pb.valid is None else jnp.asarray(pb.valid)
            got = jax.jit(jitted, static_argnums=3 if isinstance(pb.k, int) else ())(
                jnp.asarray(pb.x), jnp.asarray(a), vj, kj
            )
            np.testing.assert_array_equal(np.asarray(got), fast.astype(np.float64))


# ---------------------------------------------------------------------------
# NumPy-style derivatives: dftopk_vjp / dftopk_and_vjp / dftopk_jvp with hard=True


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_hard_vjp_and_jvp_are_the_soft_ones(lib, rng, case):
    shape, axis, k, use_mask, largest = case
    x, k, mask = _case(rng, shape, axis, k, use_mask)
    x = x + 0.1 * rng.standard_normal(shape)  # some ties broken, a few kept below
    x[..., :2] = 0.5
    g = rng.standard_normal(shape)
    u = rng.standard_normal(shape)
    tau = np.exp(
        rng.standard_normal(shape[: axis % len(shape)] + (1,) * (len(shape) - axis % len(shape)))
    )
    for dtype in _dtypes(lib, case):
        if dtype in ("float16", "bfloat16"):
            continue
        xa = lib.asarray(x, dtype)
        ka = k if isinstance(k, int) else lib.asarray(k)
        ma = None if mask is None else lib.asarray(mask)
        ta = lib.asarray(tau, dtype)
        kw = dict(tau=ta, axis=axis, mask=ma, largest=largest)
        ga, ua = lib.asarray(g, dtype), lib.asarray(u, dtype)
        want_mask = lib.to_numpy(tk.topk_mask(xa, ka, axis=axis, mask=ma, largest=largest))

        soft_gx, soft_gt = tk.dftopk_vjp(xa, ka, ga, **kw)
        gx, gt = tk.dftopk_vjp(xa, ka, ga, hard=True, **kw)
        np.testing.assert_array_equal(lib.to_numpy(gx), lib.to_numpy(soft_gx))
        np.testing.assert_array_equal(lib.to_numpy(gt), lib.to_numpy(soft_gt))
        ref_gx, ref_t = ref_vjp(x, k, g, tau, axis, mask, largest)
        np.testing.assert_allclose(lib.to_numpy(gx), ref_gx, atol=tol(dtype), rtol=0)
        summed = tuple(i for i, s in enumerate(tau.shape) if s == 1 and shape[i] != 1)
        ref_gt = np.sum(ref_t, axis=summed, keepdims=True)
        np.testing.assert_allclose(
            lib.to_numpy(gt), ref_gt, atol=tol(dtype) * max(1, np.abs(ref_gt).max()), rtol=0
        )

        out, vjp = tk.dftopk_and_vjp(xa, ka, hard=True, **kw)
        assert out.dtype == xa.dtype
        np.testing.assert_array_equal(lib.to_numpy(out), want_mask)
        gx2, gt2 = vjp(ga)
        np.testing.assert_array_equal(lib.to_numpy(gx2), lib.to_numpy(soft_gx))
        np.testing.assert_array_equal(lib.to_numpy(gt2), lib.to_numpy(soft_gt))

        out, d = tk.dftopk_jvp(xa, ka, ua, hard=True, **kw)
        _, soft_d = tk.dftopk_jvp(xa, ka, ua, **kw)
        np.testing.assert_array_equal(lib.to_numpy(out), want_mask)
        np.testing.assert_array_equal(lib.to_numpy(d), lib.to_numpy(soft_d))


def test_hard_argument_errors():
    x = np.array([3.0, 1.0, 2.0])
    g = np.ones(3)
    for bad in (1, 0, "yes", None, np.bool_(True)):
        with pytest.raises(TypeError, match="hard must be a bool"):
            tk.dftopk(x, 1, hard=bad)
        with pytest.raises(TypeError, match="hard must be a bool"):
            tk.dftopk_vjp(x, 1, g, hard=bad)
    for call in (
        lambda: tk.dftopk_vjp(x, 1, g, output="logits", hard=True),
        lambda: tk.dftopk_and_vjp(x, 1, output="logits", hard=True),
        lambda: tk.dftopk_jvp(x, 1, g, output="logits", hard=True),
    ):
        with pytest.raises(ValueError, match="hard=True needs output='probs'"):
            call()
    with pytest.raises(TypeError, match="hard"):
        tk.dftopk_logits(x, 1, hard=True)  # no hard logits: not offered
    # the usual argument checks still run on the hard path
    with pytest.raises(ValueError, match="tau"):
        tk.dftopk(x, 1, tau=-1.0, hard=True)
    with pytest.raises(ValueError, match="k must satisfy"):
        tk.dftopk(x, 4, hard=True)
    with pytest.raises(ValueError, match="output must be"):
        tk.dftopk_vjp(x, 1, g, output="nope", hard=True)


# ---------------------------------------------------------------------------
# PyTorch: autograd, double backward, torch.func, torch.compile, SoftTopK

TORCH_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _torch_case(torch, rng, case, dtype, tau_tensor):
    shape, axis, k, use_mask, largest = case
    x, k, mask = _case(rng, shape, axis, k, use_mask)
    x = x + 0.25 * rng.integers(0, 2, size=shape)  # keep some ties at the k-th value
    tdt = getattr(torch, dtype)
    xt = torch.tensor(x, dtype=torch.float64).to(tdt)
    kt = k if isinstance(k, int) else torch.as_tensor(k)
    mt = None if mask is None else torch.as_tensor(mask)
    if tau_tensor:
        tau = torch.full(shape[: axis % len(shape)] + (1,), 0.7, dtype=tdt)
        tau = tau.reshape(tau.shape + (1,) * (len(shape) - tau.ndim))
    else:
        tau = 0.7
    return xt, kt, tau, dict(axis=axis, mask=mt, largest=largest), k, mask


@pytest.mark.parametrize("tau_tensor", [False, True], ids=["tau-float", "tau-tensor"])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_torch_hard_autograd_is_the_soft_gradient(rng, case, tau_tensor):
    torch = pytest.importorskip("torch")
    for dtype in TORCH_DTYPES:
        xt, kt, tau, kw, k, mask = _torch_case(torch, rng, case, dtype, tau_tensor)
        g = torch.randn(xt.shape, generator=torch.Generator().manual_seed(3), dtype=xt.dtype)
        grads = []
        for hard in (True, False):
            xi = xt.clone().requires_grad_()
            ti = tau.clone().requires_grad_() if tau_tensor else tau
            out = tk.dftopk(xi, kt, tau=ti, hard=hard, **kw)
            assert out.dtype == xt.dtype
            if hard:
                torch.testing.assert_close(out, tk.topk_mask(xt, kt, **kw), atol=0, rtol=0)
            (out * g).sum().backward()
            grads.append((xi.grad, ti.grad if tau_tensor else None))
        (hx, ht), (sx, st) = grads
        atol = tol(dtype)
        torch.testing.assert_close(hx, sx, atol=atol, rtol=0)
        if tau_tensor:
            torch.testing.assert_close(ht, st, atol=atol * max(1.0, st.abs().max()), rtol=0)
        if dtype == "float64":
            tau_np = tau.numpy() if tau_tensor else tau
            gx, _ = tk.dftopk_vjp(
                xt.numpy(), k, g.numpy(), tau=tau_np, hard=True, **{**kw, "mask": mask}
            )
            np.testing.assert_allclose(hx.numpy(), gx, atol=1e-12, rtol=0)


def test_torch_hard_double_backward_is_the_soft_one(rng):
    torch = pytest.importorskip("torch")
    x = torch.tensor(rng.standard_normal((3, 9)))
    x[:, :2] = 0.3  # a tie at the threshold in some rows
    g = torch.tensor(rng.standard_normal((3, 9)))
    v = torch.tensor(rng.standard_normal((3, 9)))
    mask = torch.tensor(rng.random((3, 9)) > 0.2)
    tau = torch.tensor([[0.5], [1.0], [2.0]], dtype=torch.float64)
    results = []
    for hard in (True, False):
        xi = x.clone().requires_grad_()
        ti = tau.clone().requires_grad_()
        out = tk.dftopk(xi, 4, tau=ti, mask=mask, hard=hard)
        gx, gt = torch.autograd.grad((out * g).sum(), (xi, ti), create_graph=True)
        results.append(torch.autograd.grad((gx * v).sum() + gt.sum(), (xi, ti)))
    for h, s in zip(*results):
        torch.testing.assert_close(h, s, atol=1e-12, rtol=0)


def test_torch_func_hard_transforms(rng):
    torch = pytest.importorskip("torch")
    x_np = rng.standard_normal((3, 7))
    u_np = rng.standard_normal((3, 7))
    x, u = torch.tensor(x_np), torch.tensor(u_np)

    def f(hard):
        return lambda r: tk.dftopk(r, 3, tau=0.6, hard=hard)

    want_mask = tk.topk_mask(x, 3)
    out, pull = torch.func.vjp(f(True), x)
    torch.testing.assert_close(out, want_mask, atol=0, rtol=0)
    gx_spec, _ = tk.dftopk_vjp(x_np, 3, u_np, tau=0.6, hard=True)
    np.testing.assert_allclose(pull(u)[0].numpy(), gx_spec, atol=1e-12)
    g = torch.func.grad(lambda r: (f(True)(r) * u).sum())(x)
    np.testing.assert_allclose(g.numpy(), gx_spec, atol=1e-12)
    p, dp = torch.func.jvp(f(True), (x,), (u,))
    m_spec, dp_spec = tk.dftopk_jvp(x_np, 3, u_np, tau=0.6, hard=True)
    np.testing.assert_array_equal(p.numpy(), m_spec)
    np.testing.assert_allclose(dp.numpy(), dp_spec, atol=1e-12)
    jac_soft = torch.func.jacrev(f(False))(x)
    for jac in (torch.func.jacrev(f(True)), torch.func.jacfwd(f(True))):
        torch.testing.assert_close(jac(x), jac_soft, atol=1e-12, rtol=0)
    ks = torch.tensor([1, 0, 7])
    vk = torch.func.vmap(lambda r, kk: tk.dftopk(r, kk, tau=0.6, hard=True))(x, ks)
    torch.testing.assert_close(vk, tk.topk_mask(x, ks), atol=0, rtol=0)
    c = torch.tensor(rng.standard_normal((3, 7)))
    hess = [torch.func.hessian(lambda r, h=h: (f(h)(r) * c).sum())(x) for h in (True, False)]
    torch.testing.assert_close(hess[0], hess[1], atol=1e-12, rtol=0)


def test_torch_compile_hard_fullgraph_aot_eager():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(20251011)
    x = torch.randn(4, 8, generator=gen).round(decimals=1).requires_grad_()
    mask = torch.arange(8) < 6
    k = torch.tensor([0, 2, 3, 6])
    tk.dftopk(x.detach(), 1)  # registry warm-up, as in test_torch
    f = torch.compile(
        lambda x: tk.dftopk(x, k, tau=0.5, mask=mask, hard=True),
        fullgraph=True,
        backend="aot_eager",
    )
    g = torch.randn(4, 8, generator=gen)
    y = f(x)
    (y * g).sum().backward()
    gc = x.grad.clone()
    x.grad = None
    y0 = tk.dftopk(x, k, tau=0.5, mask=mask, hard=True)
    (y0 * g).sum().backward()
    torch.testing.assert_close(y, tk.topk_mask(x.detach(), k, mask=mask), atol=0, rtol=0)
    torch.testing.assert_close(y, y0, atol=0, rtol=0)
    torch.testing.assert_close(gc, x.grad)


def test_torch_soft_topk_module_hard():
    torch = pytest.importorskip("torch")
    from topk_core.adapters.torch_adapter import SoftTopK

    layer = SoftTopK(2, tau=0.5, learnable_tau=True, hard=True)
    assert repr(layer).endswith("output='probs', hard=True)")
    assert "hard" not in repr(SoftTopK(2))
    x = torch.tensor([[4.0, 1.0, 3.0, 3.0], [0.0, 1.0, 2.0, 3.0]], requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 1]]), atol=0, rtol=0)
    (y[:, 0] - y[:, 3]).sum().backward()
    soft = SoftTopK(2, tau=0.5, learnable_tau=True)
    x2 = x.detach().clone().requires_grad_()
    p = soft(x2)
    (p[:, 0] - p[:, 3]).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.log_tau.grad, soft.log_tau.grad)
    # a per-call k and a mask reach the hard forward too
    m = torch.tensor([[True, True, False, True], [True, True, True, True]])
    torch.testing.assert_close(
        layer(x, mask=m, k=torch.tensor([3, 1])), torch.tensor([[1.0, 1, 0, 1], [0, 0, 0, 1]])
    )
    with pytest.raises(ValueError, match="hard=True needs output='probs'"):
        SoftTopK(2, output="logits", hard=True)
    with pytest.raises(TypeError, match="hard must be a bool"):
        SoftTopK(2, hard=1)


@pytest.mark.slow
def test_torch_compile_hard_fullgraph_inductor_module():
    torch = pytest.importorskip("torch")
    from topk_core.adapters.torch_adapter import SoftTopK

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(20251011), requires_grad=True)
    tk.dftopk(x.detach(), 1)
    layer = SoftTopK(3, tau=0.5, learnable_tau=True, hard=True)
    y = torch.compile(layer, fullgraph=True)(x)
    y.sum().backward()
    ref_layer = SoftTopK(3, tau=0.5, learnable_tau=True, hard=True)
    x2 = x.detach().requires_grad_()
    ref_layer(x2).sum().backward()
    torch.testing.assert_close(y, tk.topk_mask(x.detach(), 3), atol=0, rtol=0)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.log_tau.grad, ref_layer.log_tau.grad)


# ---------------------------------------------------------------------------
# JAX: jit, vmap, grad, jacobians, hessian, nested jvp


def test_jax_hard_transforms_are_the_soft_ones(rng):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    if not jax.config.read("jax_enable_x64"):
        pytest.skip("jax x64 mode is off (the suite enables it in conftest)")
    x_np = rng.integers(-3, 4, size=(4, 9)) + 0.25 * rng.integers(0, 2, size=(4, 9))
    c_np, u_np = rng.standard_normal((2, 4, 9))
    y_np = rng.standard_normal((4, 9))  # no ties: for the finite-difference Hessian
    mask_np = rng.random((4, 9)) > 0.2
    k_np = np.array([0, 2, 4, 9])
    tau_np = np.array([[0.5], [1.0], [2.0], [0.7]])
    mask = jnp.asarray(mask_np)
    c, u = jnp.asarray(c_np), jnp.asarray(u_np)

    def f(x, tau, k):
        return tk.dftopk(x, k, tau=tau, mask=mask, hard=True)

    def loss(x, tau, k):
        return jnp.sum(c * f(x, tau, k))

    @jax.jit  # one program: JAX compile time dominates this test
    def everything(x, tau, k, y):
        out_j, d = jax.jvp(lambda r: f(r, tau, k), (x,), (u,))
        return dict(
            out=f(x, tau, k),
            grad=jax.grad(loss, argnums=(0, 1))(x, tau, k),
            jvp=(out_j, d),
            # differentiating the primal of an inner jvp again still sees p
            nested=jax.grad(lambda r: jnp.sum(c * jax.jvp(lambda q: f(q, tau, k), (r,), (u,))[0]))(
                x
            ),
            rows=jax.vmap(lambda r, kk: tk.dftopk(r, kk, hard=True))(x, k),
            rows_grad=jax.vmap(
                jax.grad(lambda r, kk, cc: jnp.sum(cc * tk.dftopk(r, kk, hard=True)))
            )(x, k, c),
            hess=jax.hessian(lambda r: jnp.sum(c * tk.dftopk(r, 3, tau=0.5, hard=True)))(y),
        )

    r = everything(jnp.asarray(x_np), jnp.asarray(tau_np), jnp.asarray(k_np), jnp.asarray(y_np))
    want = tk.topk_mask(x_np, k_np, mask=mask_np)
    kw = dict(tau=tau_np, mask=mask_np, hard=True)
    gx, gt = tk.dftopk_vjp(x_np, k_np, c_np, **kw)
    for got in (r["out"], r["jvp"][0]):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(r["grad"][0], gx, atol=1e-12)
    np.testing.assert_allclose(r["grad"][1], gt, atol=1e-12)
    np.testing.assert_allclose(r["nested"], gx, atol=1e-12)
    np.testing.assert_allclose(r["jvp"][1], tk.dftopk_jvp(x_np, k_np, u_np, **kw)[1], atol=1e-12)
    np.testing.assert_array_equal(r["rows"], tk.topk_mask(x_np, k_np))
    np.testing.assert_allclose(r["rows_grad"], tk.dftopk_vjp(x_np, k_np, c_np)[0], atol=1e-12)
    # the Hessian of the soft loss, by central differences of the closed-form gradient
    eps = 1e-6
    grad = lambda v: tk.dftopk_vjp(v, 3, c_np, tau=0.5, hard=True)[0]  # noqa: E731
    eye = np.eye(y_np.size).reshape((-1, *y_np.shape))
    fd = np.stack([(grad(y_np + eps * e) - grad(y_np - eps * e)) / (2 * eps) for e in eye])
    np.testing.assert_allclose(
        np.moveaxis(np.asarray(r["hess"]).reshape(4, 9, -1), -1, 0), fd, atol=1e-7
    )
