"""PyTorch backend and adapter: selection, closed-form autograd, torch.func,
torch.compile, dtypes, the ``SoftTopK`` module and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from topk_core.adapters.torch_adapter import DFTopKFunction, SoftTopK  # noqa: E402
from topk_core.backends import torch_backend  # noqa: E402
from topk_core.conformance.reference import ref_dftopk, ref_vjp  # noqa: E402

import topk_core  # noqa: E402

F64 = torch.float64
SEED = 20251011


def _t(a, dtype=F64, requires_grad=False):
    t = torch.tensor(np.asarray(a), dtype=dtype)
    return t.requires_grad_(requires_grad)


def _k_tensor(k):
    return torch.tensor(np.asarray(k), dtype=torch.int64)


@pytest.fixture
def rng():
    return np.random.default_rng(SEED)


# ---------------------------------------------------------------- selection


def _both_paths(x, k):
    """select_pair on the host (sampling) path and on the graph-safe torch path."""
    host = torch_backend.select_pair(None, x, k)
    assert torch_backend.host_ok(x)
    saved = torch_backend._HOST_PATH
    try:  # the graph-safe path is what CUDA, compile and torch.func tensors take
        torch_backend._HOST_PATH = False
        native = torch_backend.select_pair(None, x, k)
    finally:
        torch_backend._HOST_PATH = saved
    return host, native


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_select_pair_matches_sort(rng, n):
    x = torch.from_numpy(rng.integers(-3, 4, size=(3, n)).astype(np.float32))  # many ties
    x[0, 0] = -math.inf
    s = torch.sort(x, dim=-1, descending=True).values
    inf = torch.full((3, 1), math.inf)
    for k in range(n + 1):
        want_a = inf if k == 0 else s[:, k - 1 : k]
        want_b = -inf if k == n else s[:, k : k + 1]
        for a, b in _both_paths(x, k):
            assert torch.equal(a, want_a) and torch.equal(b, want_b), k
    ks = _k_tensor(rng.integers(0, n + 1, size=(3, 1)))
    ext = torch.cat([inf, s, -inf], dim=-1)
    want = ext.gather(-1, ks), ext.gather(-1, ks + 1)
    for a, b in _both_paths(x, ks):
        assert torch.equal(a, want[0]) and torch.equal(b, want[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_select_pair_dtypes_and_large_k(rng, dtype):
    x = torch.from_numpy(rng.standard_normal((2, 40))).to(dtype)
    for k in (1, 5, 30, 39):  # both topk sides: k+1 <= n-k+1 and beyond
        a, b = torch_backend.select_pair(None, x, k)
        s = torch.sort(x, dim=-1, descending=True).values
        assert a.dtype == dtype and a.shape == (2, 1)
        assert torch.equal(a, s[:, k - 1 : k]) and torch.equal(b, s[:, k : k + 1])


def test_host_ok_is_false_for_traced_and_wrapped_tensors():
    x = torch.ones(3)
    assert torch_backend.host_ok(x)
    seen = []
    torch.func.vmap(lambda r: seen.append(torch_backend.host_ok(r)) or r)(torch.ones(2, 3))
    torch.func.grad(lambda r: seen.append(torch_backend.host_ok(r)) or r.sum())(x)
    assert seen == [False, False]
    assert not torch_backend.host_ok(torch.ones(3, device="meta"))


# ---------------------------------------------------------------- forward


CASES = [
    # (shape, k, axis, mask?, largest, tau kind)
    ((9,), 3, -1, False, True, "float"),
    ((4, 9), 0, -1, False, True, "float"),
    ((4, 9), 9, -1, False, True, "float"),
    ((4, 9), 4, 0, False, False, "float"),
    ((3, 5, 6), "rows", 1, False, True, "row"),
    ((3, 8), 3, -1, True, True, "full"),
    ((3, 8), "rows", -1, True, False, "row"),
]


def _case(rng, shape, k, axis, masked, tau_kind, ties=True):
    x = rng.standard_normal(shape)
    if ties:
        x = np.round(x * 2) / 2  # plenty of ties, also at the boundary
    ax = axis % len(shape)
    batch = shape[:ax] + shape[ax + 1 :]
    if k == "rows":
        k = rng.integers(0, shape[ax] + 1, size=batch)
    mask = rng.random(shape) > 0.3 if masked else None
    if tau_kind == "float":
        tau = 0.7
    else:
        tshape = list(shape)
        tshape[ax] = 1
        tau = rng.uniform(0.3, 2.0, size=tshape if tau_kind == "row" else shape)
    return x, k, mask, tau


def _torchify(x, k, mask, tau, dtype=F64, requires_grad=False):
    kt = k if isinstance(k, int) else _k_tensor(k)
    mt = None if mask is None else torch.from_numpy(mask)
    tt = tau if isinstance(tau, float) else _t(tau, dtype if dtype == F64 else torch.float32)
    return _t(x, dtype, requires_grad), kt, mt, tt


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("output", ["probs", "logits"])
def test_forward_matches_reference_and_numpy(rng, case, output):
    shape, k, axis, masked, largest, tau_kind = case
    x, k, mask, tau = _case(rng, shape, k, axis, masked, tau_kind)
    fn = topk_core.dftopk if output == "probs" else topk_core.dftopk_logits
    xt, kt, mt, tt = _torchify(x, k, mask, tau)
    got = fn(xt, kt, tau=tt, axis=axis, mask=mt, largest=largest)
    want = ref_dftopk(x, k, tau, axis, mask, largest, output)
    assert got.dtype == F64 and got.shape == xt.shape
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12, rtol=1e-12)
    k_np = k if isinstance(k, int) else np.asarray(k)
    via_np = fn(x, k_np, tau=tau, axis=axis, mask=mask, largest=largest)
    np.testing.assert_allclose(got.numpy(), via_np, atol=1e-12, rtol=1e-12)


def test_nonfinite_inputs_follow_the_spec():
    cases = [([math.inf, 1, 0], 1, [1, 0, 0]), ([math.inf, math.inf, 0], 1, [0.5, 0.5, 0])]
    cases.append(([-math.inf, 0, 1], 2, [0, 1, 1]))
    for x, k, want in cases:
        got = topk_core.dftopk(torch.tensor(x, dtype=torch.float32), k)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-7)
    x = torch.tensor([1.0, math.nan, 0.0, 3.0], requires_grad=True)
    p = topk_core.dftopk(x, 2)
    assert torch.isnan(p[1])
    p.sum().backward()  # no exception, no hang
    big = torch.tensor([3e38, -3e38, 1.0])
    assert torch.isfinite(topk_core.dftopk(big, 1)).all()


# ---------------------------------------------------------------- gradients


def _reduce(t, tau):
    t = np.asarray(t)
    if isinstance(tau, float):
        return t.sum()
    tau = np.asarray(tau)
    axes = tuple(d for d in range(t.ndim) if tau.shape[d] == 1 and t.shape[d] != 1)
    return t.sum(axis=axes, keepdims=True)


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("output", ["probs", "logits"])
def test_autograd_matches_reference_vjp(rng, case, output):
    shape, k, axis, masked, largest, tau_kind = case
    x, k, mask, tau = _case(rng, shape, k, axis, masked, tau_kind)
    g = rng.standard_normal(shape)
    xt, kt, mt, tt = _torchify(x, k, mask, tau, requires_grad=True)
    if isinstance(tt, torch.Tensor):
        tt.requires_grad_(True)
    fn = topk_core.dftopk if output == "probs" else topk_core.dftopk_logits
    out = fn(xt, kt, tau=tt, axis=axis, mask=mt, largest=largest)
    if output == "logits" and mask is not None:
        out = torch.where(mt, out, 0.0)  # -inf logits at masked entries
        g = np.where(mask, g, 0.0)
    (out * _t(g)).sum().backward()
    gx, t = ref_vjp(x, k, g, tau, axis, mask, largest, output)
    np.testing.assert_allclose(xt.grad.numpy(), gx, atol=1e-12)
    if mask is not None:
        assert np.all(xt.grad.numpy()[~mask] == 0)
    if isinstance(tt, torch.Tensor):
        np.testing.assert_allclose(tt.grad.numpy(), _reduce(t, tau), atol=1e-12)


def _gradcheck_inputs():
    """float64 cases with ties arranged so that finite differences are defined."""
    x1 = _t([[3.0, 3.0, 1.0, 0.5], [2.0, -1.0, 2.0, 0.0]], requires_grad=True)  # ties at a=b
    x2 = _t([[0.3, 3.0, 1.5, 1.5, -2.0, 0.1]], requires_grad=True)  # tie at b
    mask = torch.tensor([[True, True, False, True, True, True]])
    xr = torch.from_numpy(np.random.default_rng(SEED).standard_normal((3, 5))).requires_grad_()
    ks = _k_tensor([0, 2, 5])
    tau_row = _t([[0.5], [1.3], [0.8]], requires_grad=True)
    return [
        ("ties", lambda x: topk_core.dftopk(x, 1, tau=0.7), x1),
        ("tie_b", lambda x: topk_core.dftopk(x, 2, tau=0.9), x2),
        ("mask", lambda x: topk_core.dftopk(x, 2, mask=mask), x2),
        ("rows", lambda x: topk_core.dftopk(x, ks, tau=0.6), xr),
        ("smallest_axis0", lambda x: topk_core.dftopk(x, 2, axis=0, largest=False), xr),
        ("logits", lambda x: topk_core.dftopk_logits(x, 3, tau=0.4), xr),
        ("tau", lambda x, t: topk_core.dftopk(x, ks, tau=t), (xr, tau_row)),
        (
            "tau_mask",
            lambda x, t: topk_core.dftopk(x, 2, tau=t, mask=mask),
            (x2, _t(0.8, requires_grad=True)),
        ),
    ]


@pytest.mark.parametrize(
    "name,fn,inputs", _gradcheck_inputs(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_gradcheck_and_gradgradcheck(name, fn, inputs):
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(fn, inputs, check_fwd_over_rev=True)


def test_dispatches_to_the_closed_form_function():
    p = topk_core.dftopk(torch.randn(5, requires_grad=True), 2)
    assert "DFTopKFunction" in type(p.grad_fn).__name__


# ---------------------------------------------------------------- torch.func


def test_torch_func_transforms_match_spec(rng):
    x_np = rng.standard_normal((3, 7))
    u_np = rng.standard_normal((3, 7))
    x, u = _t(x_np), _t(u_np)
    f = lambda r: topk_core.dftopk(r, 3, tau=0.6)  # noqa: E731
    # vjp and grad against the closed form of the API
    _, pull = torch.func.vjp(f, x)
    gx_spec, _ = topk_core.dftopk_vjp(x_np, 3, u_np, tau=0.6)
    np.testing.assert_allclose(pull(u)[0].numpy(), gx_spec, atol=1e-12)
    g = torch.func.grad(lambda r: (f(r) * u).sum())(x)
    np.testing.assert_allclose(g.numpy(), gx_spec, atol=1e-12)
    # jvp against the closed form
    p, dp = torch.func.jvp(f, (x,), (u,))
    p_spec, dp_spec = topk_core.dftopk_jvp(x_np, 3, u_np, tau=0.6)
    np.testing.assert_allclose(p.numpy(), p_spec, atol=1e-12)
    np.testing.assert_allclose(dp.numpy(), dp_spec, atol=1e-12)
    # jacobians agree both ways; vmap equals a loop
    np.testing.assert_allclose(
        torch.func.jacrev(f)(x).numpy(), torch.func.jacfwd(f)(x).numpy(), atol=1e-12
    )
    vm = torch.func.vmap(f)(x[:, None]).squeeze(1)
    np.testing.assert_allclose(vm.numpy(), f(x).numpy(), atol=0)
    ks = _k_tensor([1, 0, 7])
    vk = torch.func.vmap(lambda r, kk: topk_core.dftopk(r, kk, tau=0.6))(x, ks)
    np.testing.assert_allclose(vk.numpy(), topk_core.dftopk(x, ks, tau=0.6).numpy(), atol=0)


def test_torch_func_tau_and_hessian(rng):
    x = _t(rng.standard_normal(6))
    tau = _t(0.8)
    gt = torch.func.grad(lambda t: (topk_core.dftopk(x, 2, tau=t) ** 2).sum())(tau)
    _, t_el = ref_vjp(x.numpy(), 2, 2 * ref_dftopk(x.numpy(), 2, 0.8), 0.8)
    np.testing.assert_allclose(gt.numpy(), t_el.sum(), atol=1e-12)
    _, dtau = torch.func.jvp(lambda t: topk_core.dftopk(x, 2, tau=t), (tau,), (_t(1.0),))
    _, dtau_spec = topk_core.dftopk_jvp(x.numpy(), 2, np.zeros(6), tau=0.8, tau_tangent=1.0)
    np.testing.assert_allclose(dtau.numpy(), dtau_spec, atol=1e-12)

    def loss(r):
        return (topk_core.dftopk(r, 2, tau=0.7) ** 2).sum()

    grad = torch.func.grad(loss)
    eps = 1e-6
    eye = torch.eye(6, dtype=F64)
    fd = torch.stack([(grad(x + eps * e) - grad(x - eps * e)) / (2 * eps) for e in eye])
    for hess in (
        torch.func.hessian(loss),
        torch.func.jacrev(torch.func.jacrev(loss)),
        torch.func.jacrev(torch.func.jacfwd(loss)),
    ):
        np.testing.assert_allclose(hess(x).numpy(), fd.numpy(), atol=1e-7)


def test_forward_over_forward_is_refused_not_zero(rng):
    """PyTorch runs a custom jvp with forward AD disabled: a second ``torch.func`` jvp
    level around it got 0 (``jacfwd(jacfwd(f))`` a zero Hessian, a jvp that moves only
    the inner tangent a zero ``J u``) with no error.  Now a ``NotImplementedError``
    naming what works; one jvp level (also around or inside vmap, under jacrev) stays."""
    x, u = _t(rng.standard_normal(6)), _t(rng.standard_normal(6))

    def f(v):
        return topk_core.dftopk(v, 2, tau=0.5)

    def inner(v):
        return torch.func.jvp(f, (v,), (u,))[1]

    for call in (
        lambda: torch.func.jacfwd(torch.func.jacfwd(f))(x),
        lambda: torch.func.jvp(inner, (x,), (u,)),
        lambda: torch.func.jvp(lambda t: torch.func.jvp(f, (x,), (t,))[1], (u,), (u,)),
        lambda: torch.func.jvp(lambda v: topk_core.dftopk_logits(inner(v), 1), (x,), (u,)),
    ):
        with pytest.raises(NotImplementedError, match=r"forward-over-forward.*hessian"):
            call()
    want = topk_core.dftopk_jvp(x.numpy(), 2, u.numpy(), tau=0.5)[1]
    np.testing.assert_allclose(torch.func.jvp(f, (x,), (u,))[1].numpy(), want, atol=1e-12)
    batched = torch.func.vmap(lambda v, w: torch.func.jvp(f, (v,), (w,))[1])(x[None], u[None])
    np.testing.assert_allclose(batched[0].numpy(), want, atol=1e-12)
    around = torch.func.jvp(torch.func.vmap(f), (x[None],), (u[None],))[1]
    np.testing.assert_allclose(around[0].numpy(), want, atol=1e-12)


@pytest.mark.parametrize("hard", [False, True])
def test_reverse_over_forward_second_derivatives(rng, hard):
    """Reverse mode over the custom jvp (``jacrev(jacfwd(f))``, autograd over
    ``forward_ad``) gave a wrong Hessian with no error before 2026-12-06: the jvp
    took d theta / dx both from its straight-through term and through the saved,
    differentiable ``a``/``b`` (the columns of the tied entries were off by up to
    half the Hessian's largest entry).  Ties, a mask, per-row k and a tensor tau,
    against reverse-over-reverse; and one column through plain autograd."""
    x = _t(rng.standard_normal((2, 7)))
    x[0, 4] = x[0, 1]  # a tie at a (k = 2 in row 0)
    x[1, 5] = x[1, 2]
    k = torch.tensor([2, 3])
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 0] = False
    tau = _t([[0.6], [1.3]])
    w = _t(rng.standard_normal((2, 7)))

    def f(v, t):
        return (w * topk_core.dftopk(v, k, tau=t, mask=mask, hard=hard)).sum()

    for argnums in (0, 1):
        rr = torch.func.jacrev(torch.func.jacrev(f, argnums=argnums), argnums=argnums)(x, tau)
        rf = torch.func.jacrev(torch.func.jacfwd(f, argnums=argnums), argnums=argnums)(x, tau)
        assert rr.abs().max() > 1e-3
        torch.testing.assert_close(rf, rr, rtol=0, atol=1e-12)
    import torch.autograd.forward_ad as fwad

    xr = x.clone().requires_grad_()
    u = torch.zeros_like(x)
    u[0, 1] = 1.0  # the tangent of a tied entry: d theta moves with it
    with fwad.dual_level():
        dual = fwad.make_dual(xr, u)
        tangent = fwad.unpack_dual(f(dual, tau)).tangent
    (col,) = torch.autograd.grad(tangent, xr)
    hess = torch.func.hessian(f)(x, tau)
    torch.testing.assert_close(col, (hess.reshape(14, 14) @ u.reshape(-1)).reshape(2, 7))


INF = np.inf
#: rows whose a or b is infinite with an entry equal to it: -inf padding with
#: k = n_valid (b = -inf), a selected +inf (a = +inf), and the same beside a NaN
INFINITE_AB = [
    (np.array([[2.0, 1.0, -INF, -INF, 0.5]]), 3, "b = -inf"),
    (np.array([[INF, 1.0, 0.0, -1.0]]), 1, "a = +inf"),
    (np.array([[0.5, np.nan, 1.0, 2.0, INF, -0.2]]), 2, "NaN, a = +inf"),
]


@pytest.mark.parametrize("output", ["probs", "logits"])
@pytest.mark.parametrize(("x_np", "k", "name"), INFINITE_AB, ids=[c[2] for c in INFINITE_AB])
def test_forward_mode_with_an_infinite_a_or_b(x_np, k, name, output):
    """torch.func.jvp / jacfwd / hessian on rows whose a or b is infinite.

    Such an entry weighs 0 in the threshold's derivative; the straight-through term
    that restores d theta / dx once multiplied it by its weight, 0 * inf, and made the
    tangent of the whole row NaN (forward mode only).
    """
    u_np = np.linspace(-1.0, 1.0, x_np.shape[-1])[None]
    tau = _t(np.array([[0.7]]))
    fn = topk_core.dftopk if output == "probs" else topk_core.dftopk_logits
    x, u = _t(x_np), _t(u_np)
    _, dp = torch.func.jvp(lambda r, t: fn(r, k, tau=t), (x, tau), (u, _t(np.array([[0.3]]))))
    with np.errstate(invalid="ignore"):
        _, dp_spec = topk_core.dftopk_jvp(
            x_np, k, u_np, tau=np.array([[0.7]]), tau_tangent=np.array([[0.3]]), output=output
        )
    np.testing.assert_allclose(dp.numpy(), dp_spec, atol=1e-12)  # NaN where the spec has NaN
    assert np.isfinite(dp.numpy()[~np.isnan(x_np)]).all()
    jf = torch.func.jacfwd(lambda r: fn(r, k, tau=0.7))(x)[0, :, 0].numpy()
    jr = torch.func.jacrev(lambda r: fn(r, k, tau=0.7))(x)[0, :, 0].numpy()
    # a NaN entry's own row and column: each mode has its NaN * 0 there (sigmoid'(NaN))
    keep = ~np.isnan(x_np[0])
    np.testing.assert_allclose(jf[keep][:, keep], jr[keep][:, keep], atol=1e-12)
    if output == "probs" and not np.isnan(x_np).any():
        h = torch.func.hessian(lambda r: (fn(r, k, tau=0.7) ** 2).sum())(x)
        assert np.isfinite(h.numpy()).all()


# ---------------------------------------------------------------- compile


@pytest.mark.parametrize("shape", [(0, 6), (2, 0, 6), (0, 70001)], ids=str)
def test_autograd_on_an_empty_batch(shape):
    """Per-row k of an empty batch took kk.max() of nothing (RuntimeError)."""
    x = torch.zeros(shape, dtype=F64, requires_grad=True)
    for k in (1, torch.ones(shape[:-1], dtype=torch.int64)):
        for hard in (False, True):
            topk_core.dftopk(x, k, tau=0.5, hard=hard).sum().backward()
            assert x.grad.shape == shape
        xd = x.detach()
        tangent = torch.func.jvp(lambda v, k=k: topk_core.dftopk(v, k), (xd,), (xd,))[1]
        assert tangent.shape == shape
        jac = torch.func.jacrev(lambda v, k=k: topk_core.dftopk_logits(v, k))(xd)
        assert jac.shape == shape + shape


@pytest.mark.parametrize("hard", [False, True])
def test_reverse_mode_around_vmap(rng, hard):
    """grad/jacrev/.backward() around torch.vmap raised "flat_bdims must not be None": the
    generated batching rule kept the batch dims of save_for_forward's five tensors for
    the backward's six. Per-row k and a tensor tau, against the rows' own jacrev."""
    x = _t(rng.standard_normal((3, 7)))
    u = _t(rng.standard_normal((3, 7)))
    k = torch.tensor([0, 3, 7])
    tau = _t([0.5])

    def f(row, kk):
        return topk_core.dftopk(row, kk, tau=tau, hard=hard)

    jac = torch.stack([torch.func.jacrev(f)(x[i], k[i]) for i in range(3)])
    want = torch.einsum("bij,bi->bj", jac, u)
    got = torch.func.grad(lambda v: (torch.vmap(f)(v, k) * u).sum())(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        torch.func.jacrev(lambda v: torch.vmap(f)(v, k))(x),
        torch.einsum("bij,bc->bicj", jac, torch.eye(3, dtype=F64)),
        rtol=0,
        atol=1e-12,
    )
    xr = x.clone().requires_grad_(True)
    (torch.vmap(f)(xr, k) * u).sum().backward()
    torch.testing.assert_close(xr.grad, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("hard", [False, True])
def test_forward_mode_around_vmap(rng, hard):
    """jvp/jacfwd around torch.vmap failed with a PyTorch internal assertion: the generated
    batching rule wanted a tangent for the Function's a and b, which were marked
    non-differentiable. Per-row k (ties, k = 0 and k = n) and a tensor tau."""
    x = _t(np.round(rng.standard_normal((4, 7)) * 2))
    x[3, :] = 1.0  # one row all ties
    u = _t(rng.standard_normal((4, 7)))
    k = torch.tensor([0, 3, 7, 2])
    tau = _t([0.5])

    def f(row, kk):
        return topk_core.dftopk(row, kk, tau=tau, hard=hard)

    jac = torch.stack([torch.func.jacrev(f)(x[i], k[i]) for i in range(4)])
    want = torch.einsum("bij,bj->bi", jac, u)
    _, got = torch.func.jvp(lambda v: torch.vmap(f)(v, k), (x,), (u,))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        torch.func.jacfwd(lambda v: torch.vmap(f)(v, k))(x),
        torch.einsum("bij,bc->bicj", jac, torch.eye(4, dtype=F64)),
        rtol=0,
        atol=1e-12,
    )
    # and the transforms inside vmap
    inner = torch.vmap(lambda r, kk, t: torch.func.jvp(lambda v: f(v, kk), (r,), (t,))[1])
    torch.testing.assert_close(inner(x, k, u), want, rtol=0, atol=1e-12)
    per_row = torch.vmap(torch.func.grad(lambda r, kk, g: (f(r, kk) * g).sum()))
    torch.testing.assert_close(
        per_row(x, k, u), torch.einsum("bij,bi->bj", jac, u), rtol=0, atol=1e-12
    )


def test_function_a_b_derivatives_are_tie_means(rng):
    """a and b (the k-th and (k+1)-th largest) are differentiable outputs of the Function:
    the mean of the tangent over their ties, by forward and by reverse mode, and
    nothing for an infinite value."""
    x = _t([[3.0, 1.0, 3.0, 2.0, 2.0, 2.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    u = _t(rng.standard_normal((2, 6)))
    for k, da_want, db_want in (
        (2, [(u[0, 0] + u[0, 2]) / 2, u[1, 1]], [(u[0, 3] + u[0, 4] + u[0, 5]) / 3, u[1, 2]]),
        (6, [u[0, 1], u[1, 5]], [0.0, 0.0]),  # b = -inf
    ):
        xr = x.clone().requires_grad_(True)
        _, a, b = DFTopKFunction.apply(xr, 0.5, k, None, "probs")
        ga, gb = _t([[0.7], [-1.3]]), _t([[0.2], [2.0]])
        (a * ga).sum().backward(retain_graph=True)
        grad_a = xr.grad.clone()
        xr.grad = None
        (b * gb).sum().backward()
        da = (grad_a * u).sum(-1) / ga.reshape(-1)
        db = (xr.grad * u).sum(-1) / gb.reshape(-1)
        torch.testing.assert_close(da, _t(da_want).reshape(-1), rtol=0, atol=1e-12)
        torch.testing.assert_close(db, _t(db_want).reshape(-1), rtol=0, atol=1e-12)
        _, (_, ta, tb) = torch.func.jvp(
            lambda v, k=k: DFTopKFunction.apply(v, 0.5, k, None, "probs"), (x,), (u,)
        )
        torch.testing.assert_close(ta.reshape(-1), _t(da_want).reshape(-1), rtol=0, atol=1e-12)
        torch.testing.assert_close(tb.reshape(-1), _t(db_want).reshape(-1), rtol=0, atol=1e-12)


def test_compile_fullgraph_aot_eager():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(SEED), requires_grad=True)
    mask = torch.arange(8) < 6
    topk_core.dftopk(x.detach(), 1)  # registry warm-up (see report: lock in get_backend)
    f = torch.compile(
        lambda x: topk_core.dftopk(x, 2, tau=0.5, mask=mask), fullgraph=True, backend="aot_eager"
    )
    y = f(x)
    (y**2).sum().backward()
    g = x.grad.clone()
    x.grad = None
    y0 = topk_core.dftopk(x, 2, tau=0.5, mask=mask)
    (y0**2).sum().backward()
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(g, x.grad)


def test_and_vjp_ignores_changes_autograd_would_miss_and_compiles():
    """torch's ``dftopk_and_vjp`` keeps copies: a change through ``.data`` or through a
    NumPy array sharing the memory (which no version counter sees) leaves its ``vjp``
    at the forward's inputs, and the whole call traces with ``fullgraph=True``."""
    a = np.random.default_rng(SEED).standard_normal((3, 6))
    g = torch.from_numpy(np.random.default_rng(SEED + 1).standard_normal((3, 6)))
    x = torch.from_numpy(a)
    mask = torch.ones(3, 6, dtype=torch.bool)
    want = topk_core.dftopk_vjp(x.clone(), 2, g, tau=0.7, mask=mask.clone())
    _, vjp = topk_core.dftopk_and_vjp(x, 2, tau=0.7, mask=mask)
    a += 1.0
    x.data.mul_(-1.0)
    mask.data[:, 1] = False
    for got, w in zip(vjp(g), want):
        torch.testing.assert_close(got, w, rtol=0, atol=0)

    def f(x, g):
        return topk_core.dftopk_and_vjp(x, 2, tau=0.7)[1](g)[0]

    x = torch.from_numpy(np.random.default_rng(SEED + 2).standard_normal((3, 6)))
    got = torch.compile(f, fullgraph=True, backend="eager")(x, g)
    torch.testing.assert_close(got, topk_core.dftopk_vjp(x, 2, g, tau=0.7)[0])


_COLD_COMPILE = """
import sys
import torch
import topk_core

assert "topk_core.backends.torch_backend" not in sys.modules
x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
f = torch.compile(lambda x: topk_core.dftopk(x, 2, tau=0.5), fullgraph=True, backend="aot_eager")
torch.testing.assert_close(f(x), topk_core.dftopk(x, 2, tau=0.5))
print("ok")
"""


def test_compile_fullgraph_as_the_first_call_of_a_process():
    """The registry imports the torch backend on first use: with static import
    statements torch.compile traces that (before 2026-12-06 importlib failed under
    fullgraph=True unless an eager call had loaded the backend first)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _COLD_COMPILE], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.slow
def test_compile_fullgraph_inductor_module():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(SEED), requires_grad=True)
    topk_core.dftopk(x.detach(), 1)
    layer = SoftTopK(3, tau=0.5, learnable_tau=True)
    y = torch.compile(layer, fullgraph=True)(x)
    y.sum().backward()
    ref_layer = SoftTopK(3, tau=0.5, learnable_tau=True)
    x2 = x.detach().requires_grad_()
    ref_layer(x2).sum().backward()
    torch.testing.assert_close(y, ref_layer(x2))
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.log_tau.grad, ref_layer.log_tau.grad)


# ---------------------------------------------------------------- dtypes, autocast


@pytest.mark.parametrize(
    "dtype,atol",
    [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2), (torch.float32, 2e-5), (F64, 1e-12)],
)
def test_dtype_and_device_preserved(rng, dtype, atol):
    x_np = rng.standard_normal((3, 10)).astype(np.float32)
    x = torch.from_numpy(x_np).to(dtype).requires_grad_()
    g = torch.from_numpy(rng.standard_normal((3, 10))).to(dtype)
    p = topk_core.dftopk(x, 4, tau=0.5)
    assert p.dtype == dtype and p.device == x.device
    p.backward(g)
    assert x.grad.dtype == dtype
    xr = x.detach().double().numpy()  # the rounded inputs
    np.testing.assert_allclose(p.detach().double().numpy(), ref_dftopk(xr, 4, 0.5), atol=atol)
    gx, _ = ref_vjp(xr, 4, g.double().numpy(), 0.5)
    np.testing.assert_allclose(x.grad.double().numpy(), gx, atol=4 * atol)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("hard", [False, True])
def test_half_gradient_at_small_tau(dtype, atol, hard):
    """Autograd took p (1 - p) from the half output p: 1 - p of a rounded p near 1 keeps
    a few bits and 1 / tau scales the error up (float16, tau = 0.02: 2.5e-3 of the largest
    gradient, bfloat16 2.1e-2; dftopk_vjp, which keeps the float32 p, 2.7e-4 / 2.2e-3)."""
    x = torch.linspace(-1, 1, 41, dtype=F64).to(dtype)
    g = torch.cos(torch.arange(41, dtype=F64)).to(dtype)
    tau = 0.02
    want, _ = ref_vjp(x.double().numpy(), 10, g.double().numpy(), tau)
    scale = np.abs(want).max()
    closed, _ = topk_core.dftopk_vjp(x, 10, g, tau=tau)
    graph = torch.compile(
        lambda v: topk_core.dftopk(v, 10, tau=tau, hard=hard), fullgraph=True, backend="aot_eager"
    )
    for fn, create_graph in [(topk_core.dftopk, False), (topk_core.dftopk, True), (graph, False)]:
        xa = x.clone().requires_grad_()
        out = fn(xa, 10, tau=tau, hard=hard) if fn is topk_core.dftopk else fn(xa)
        (gx,) = torch.autograd.grad(out, xa, g, create_graph=create_graph)
        assert gx.dtype == dtype
        got = gx.detach().double().numpy()
        np.testing.assert_allclose(got, closed.double().numpy(), rtol=0, atol=scale * atol / 4)
        np.testing.assert_allclose(got, want, rtol=0, atol=scale * atol)


def test_autocast_bfloat16():
    lin = torch.nn.Linear(6, 12)
    torch.manual_seed(0)
    inp = torch.randn(5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(inp)
        p = topk_core.dftopk(h, 3, tau=0.5)
    assert h.dtype == torch.bfloat16 and p.dtype == torch.bfloat16
    p.float().sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


# ---------------------------------------------------------------- SoftTopK


def test_soft_topk_module_repr_and_forward():
    layer = SoftTopK(2, tau=0.5, learnable_tau=True, axis=0, largest=False, output="logits")
    assert repr(layer) == (
        "SoftTopK(k=2, tau=0.5, learnable_tau=True, axis=0, largest=False, output='logits')"
    )
    assert [n for n, _ in layer.named_parameters()] == ["log_tau"]
    x = _t([[4.0, 1.0], [1.0, 2.0], [3.0, 0.0]])
    want = topk_core.dftopk_logits(x, 2, tau=0.5, axis=0, largest=False)
    torch.testing.assert_close(layer.double()(x), want)
    fixed = SoftTopK(1)
    assert list(fixed.parameters()) == [] and fixed.tau == 1.0
    assert "learnable_tau=False" in repr(fixed)
    hard = fixed.hard_mask(_t([1.0, 3.0, 3.0]))
    assert hard.tolist() == [0.0, 1.0, 0.0]
    # a parameter without values (meta device, e.g. before to_empty) prints the formula
    meta = SoftTopK(2, tau=0.5, learnable_tau=True).to("meta")
    assert "tau=exp(log_tau), learnable_tau=True" in repr(meta)


def test_soft_topk_learnable_tau_out_of_its_dtype_range():
    # float32 log_tau: exp(log(1e-39)) is subnormal, so every call would raise tau's
    # ValueError; the constructor says so instead (and 1e38, whose 1/tau is subnormal)
    for tau in (1e-39, 1e38):
        with pytest.raises(ValueError, match=r"learnable_tau=True: its float32 weight"):
            SoftTopK(2, tau=tau, learnable_tau=True)
    # the edges of the range are fine, and printed at their scale (not rounded to 0.0)
    small = SoftTopK(2, tau=1.2e-38, learnable_tau=True)
    assert "tau=1.2e-38," in repr(small)
    assert small(_t([3.0, 2.0, 1.0]).float()).dtype == torch.float32
    assert "tau=8.00002e+37," in repr(SoftTopK(2, tau=8e37, learnable_tau=True))
    # a fixed tau is checked at call time against x's dtype (float64 x allows 1e-39)
    fixed = SoftTopK(2, tau=1e-39)
    assert fixed(_t([3.0, 2.0, 1.0])).tolist() == [1.0, 1.0, 0.0]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        layer = SoftTopK(2, tau=1e-39, learnable_tau=True)
    finally:
        torch.set_default_dtype(old)
    assert layer.log_tau.dtype == torch.float64
    assert layer(_t([3.0, 2.0, 1.0])).tolist() == [1.0, 1.0, 0.0]


def test_soft_topk_learnable_tau_gradient_and_positivity():
    layer = SoftTopK(2, tau=0.5, learnable_tau=True).double()
    x = _t([4.0, 1.0, 3.0, 2.0])
    layer(x)[0].backward()
    _, t_el = ref_vjp(x.numpy(), 2, np.array([1.0, 0, 0, 0]), 0.5)
    # d/dlog_tau = d/dtau * tau
    # log_tau was created in float32: log(0.5) is rounded there
    np.testing.assert_allclose(layer.log_tau.grad.item(), t_el.sum() * 0.5, rtol=1e-6)
    with torch.no_grad():
        layer.log_tau -= 100.0  # a huge step still leaves tau > 0
    assert layer.tau.item() > 0


def test_soft_topk_training_loop_learns():
    gen = torch.Generator().manual_seed(SEED)
    scores = torch.nn.Linear(8, 1)
    layer = SoftTopK(3, tau=1.0, learnable_tau=True)
    feats = torch.randn(16, 10, 8, generator=gen)
    target = feats @ torch.randn(8, generator=gen)  # learnable relevance
    labels = layer.hard_mask(target)  # the true top 3 per list
    opt = torch.optim.Adam([*scores.parameters(), *layer.parameters()], lr=0.05)
    losses = []
    for _ in range(60):
        p = layer(scores(feats).squeeze(-1))
        loss = torch.nn.functional.binary_cross_entropy(p, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert layer.tau.item() != 1.0  # the temperature was trained


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="k of shape"):
        topk_core.dftopk(x, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="k must be an int or an integer array"):
        topk_core.dftopk(x, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="numpy"):
        topk_core.dftopk(x, 2, mask=np.ones((3, 5), dtype=bool))
    with pytest.raises(ValueError, match="device"):
        topk_core.dftopk(x, 2, mask=torch.ones(3, 5, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="device"):
        topk_core.dftopk(x, torch.ones(3, dtype=torch.int64, device="meta"))
    # the closed-form functions' cotangent, tangent and tau tangent too (each was
    # torch's "Tensor on device cpu is not on the expected device meta")
    on_meta = torch.ones(3, 5, device="meta")
    for call, name in (
        (lambda: topk_core.dftopk_vjp(x, 2, on_meta), "cotangent"),
        (lambda: topk_core.dftopk_and_vjp(x, 2)[1](on_meta), "cotangent"),
        (lambda: topk_core.dftopk_jvp(x, 2, on_meta), "tangent"),
        (
            lambda: topk_core.dftopk_jvp(
                x, 2, x, tau=torch.ones(3, 1), tau_tangent=torch.ones(3, 1, device="meta")
            ),
            "tau_tangent",
        ),
    ):
        with pytest.raises(ValueError, match=f"^{name} is on device meta but x is on device cpu"):
            call()
    with pytest.raises(TypeError, match="real floating"):
        topk_core.dftopk(torch.arange(5), 2)
    with pytest.raises(TypeError, match="k must be a non-negative int"):
        SoftTopK(2.0)
    with pytest.raises(ValueError, match="tau must be a finite float > 0"):
        SoftTopK(2, tau=0.0)
    with pytest.raises(ValueError, match="output must be"):
        SoftTopK(2, output="mask")
    with pytest.raises(TypeError, match="learnable_tau must be a bool"):
        SoftTopK(2, learnable_tau=1)
    with pytest.raises(TypeError, match=r"k must be a Python int or a torch\.Tensor"):
        torch_backend.select_pair(None, x, np.array([[1]] * 3))
    assert DFTopKFunction.generate_vmap_rule


def test_limits_through_autograd_and_torch_func():
    """The limits of the README's infinities row through ``torch.func.jvp`` and autograd
    (the adapter's rules): a ``tau`` tangent where ``p (1 - p)`` underflows is 0, not
    ``0 * inf``; an overflowed ``sum(s)`` leaves the entry tied with an infinite ``a``
    (weight 0) its own ``s``; a tensor ``tau`` at the smallest normal number (``tau / 2``
    subnormal) gives the generic code's logits, also under ``set_flush_denormal``."""
    x = torch.tensor([2.0, 1.0, 0.0])
    _, d = torch.func.jvp(
        lambda t: topk_core.dftopk(x, 1, tau=t), (torch.tensor(1e-20),), (torch.tensor(1.0),)
    )
    assert torch.equal(d, torch.zeros(3))
    xi = torch.tensor([math.inf, 3e38, 1e-45, 0.0, 1.0, -1.0], requires_grad=True)
    topk_core.dftopk_logits(xi, 1, tau=1.2e-38).backward(torch.ones(6))
    s = float(np.float32(1) / np.float32(1.2e-38))
    assert xi.grad[1] == -math.inf
    np.testing.assert_allclose(xi.grad[[0, 2, 3, 4, 5]].numpy(), s, rtol=1e-6)
    tiny = torch.finfo(torch.float32).tiny
    xs = torch.tensor([[1.0, 0.0, 1.0]])
    flush = torch.set_flush_denormal(True)
    try:
        z = topk_core.dftopk_logits(xs, 1, tau=torch.tensor([[tiny]]))
    finally:
        torch.set_flush_denormal(False)
    assert flush  # x86 with SSE3: the setting took
    np.testing.assert_allclose(z.numpy(), [[0.0, -1.0 / tiny, 0.0]], rtol=1e-6)
