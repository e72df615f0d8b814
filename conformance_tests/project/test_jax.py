"""JAX backend and adapter: radix select, custom_jvp rules, transformations.

The shared suites (test_forward, test_gradients, ...) already run the jax
backend through the ``lib`` fixture; this module covers what is specific to
JAX: the radix select against a full sort on adversarial inputs, derivatives
to second order with ``jax.test_util.check_grads``, and compositions of
``jit``/``vmap``/``grad``/``jacfwd``/``jacrev``/``hessian``/``linearize``/
``linear_transpose``.  Shapes are reused so compiled programs are shared.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from jax.test_util import check_grads  # noqa: E402
from topk_core.conformance.libs import TOLERANCE  # noqa: E402
from topk_core.conformance.reference import ref_dftopk, ref_vjp  # noqa: E402

import topk_core as tk  # noqa: E402

pytestmark = pytest.mark.skipif(
    not jax.config.read("jax_enable_x64"), reason="float64 cases need jax x64 (set in conftest)"
)

DTYPES = {
    "float16": jnp.float16,
    "bfloat16": jnp.bfloat16,
    "float32": jnp.float32,
    "float64": jnp.float64,
}
SUBNORMAL = {"float16": 6e-8, "bfloat16": 1e-39, "float32": 1e-40, "float64": 5e-320}


def _rows(dtype: str) -> np.ndarray:
    """Adversarial rows (n = 12) as float64 values exactly representable in ``dtype``."""
    s = SUBNORMAL[dtype]
    inf, nan = np.inf, np.nan
    rows = [
        [3, 1, 3, 2, 3, -1, 0, 2, 3, -4, 1, 2],  # ties
        [0.0, -0.0, 0.0, -0.0, 1, -1, -0.0, 0.0, 2, -2, 0.0, -0.0],  # signed zeros
        [inf, -inf, 1, inf, -inf, 0, -1, 5, inf, -3, 2, -inf],  # infinities
        [s, -s, 0.0, 2 * s, -2 * s, -0.0, s, 3 * s, -s, 1, -1, 0.0],  # subnormals
        [1.5] * 12,  # all equal
        [-inf] * 12,  # all masked-like
        [nan, 1, 2, nan, 0, -inf, inf, 3, -1, nan, 2, 1],  # NaN
        [1e4, -1e4, 65504, -65504, 0.5, 0.25, 7, 7, -7, 1e-3, 3, 2],  # wide range
    ]
    x = np.asarray(rows, dtype=np.float64)
    # round to the dtype (bfloat16 through jax), so the reference sees the same values
    return np.asarray(jnp.asarray(x, dtype=DTYPES[dtype]).astype(jnp.float64))


def _sorted_desc(x: np.ndarray) -> np.ndarray:
    """Descending sort with NaN first (NaN counts as the largest value)."""
    return np.sort(x, axis=-1)[..., ::-1]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_radix_select_matches_full_sort(dtype):
    from topk_core.backends.jax_backend import select_pair

    x64 = _rows(dtype)
    x = jnp.asarray(x64, dtype=DTYPES[dtype])
    n = x.shape[-1]
    s = _sorted_desc(x64)
    ext = np.concatenate([np.full((len(s), 1), np.inf), s, np.full((len(s), 1), -np.inf)], -1)
    # per-row k covering every rank: all k = 0..n over n + 1 shifted copies
    ks = (np.arange(len(s))[None, :] + np.arange(n + 1)[:, None]) % (n + 1)
    xs = jnp.broadcast_to(x, (n + 1,) + x.shape)
    a, b = jax.jit(select_pair, static_argnums=0)(jnp, xs, jnp.asarray(ks[..., None]))
    assert a.dtype == x.dtype and b.dtype == x.dtype and a.shape == (n + 1, len(s), 1)
    a = np.asarray(a.astype(jnp.float64))[..., 0]
    b = np.asarray(b.astype(jnp.float64))[..., 0]
    rows = np.arange(len(s))[None, :]
    # assert_array_equal treats NaN == NaN and -0.0 == 0.0, as the spec does
    np.testing.assert_array_equal(a, ext[rows, ks])
    np.testing.assert_array_equal(b, ext[rows, ks + 1])
    # scalar (static) k gives the same
    for k in (0, 5, n):
        a, b = select_pair(jnp, x, k)
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float64))[:, 0], ext[:, k])
        np.testing.assert_array_equal(np.asarray(b.astype(jnp.float64))[:, 0], ext[:, k + 1])


def test_default_path_has_no_sort_or_top_k():
    x = jnp.zeros((4, 64), jnp.float32)
    k = jnp.full((4,), 3)
    m = jnp.ones((4, 64), bool)

    def loss(x, k, m):
        return (tk.dftopk(x, k, mask=m, tau=0.5) ** 2).sum()

    text = str(jax.make_jaxpr(jax.value_and_grad(loss))(x, k, m))
    for prim in ("sort", "top_k", "approx_top_k", "argsort"):
        assert f" {prim}[" not in text and f"{prim}\n" not in text, prim
    assert "scatter-add" in text or "scatter_add" in text


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_forward_and_vjp_match_reference(dtype, rng):
    x64 = rng.normal(size=(3, 16))
    x64[1, 3:7] = 0.25  # ties at the boundary
    x = jnp.asarray(x64, dtype=DTYPES[dtype])
    x64 = np.asarray(x.astype(jnp.float64))
    g64 = rng.normal(size=x64.shape)
    mask = rng.random(x64.shape) > 0.25
    k = np.array([4, 5, 16])
    tau = np.array([[0.5], [1.0], [2.0]])
    jm, jk, jtau = jnp.asarray(mask), jnp.asarray(k), jnp.asarray(tau, DTYPES[dtype])
    tol = TOLERANCE[dtype]

    f = jax.jit(lambda x, tau, k, m: tk.dftopk(x, k, tau=tau, mask=m))
    p, vjp = jax.vjp(lambda x, tau: f(x, tau, jk, jm), x, jtau)
    assert p.dtype == x.dtype
    np.testing.assert_allclose(
        np.asarray(p.astype(jnp.float64)), ref_dftopk(x64, k, tau, mask=mask), atol=tol
    )
    gx, gtau = vjp(jnp.asarray(g64, dtype=DTYPES[dtype]))
    assert gx.dtype == x.dtype and gtau.dtype == jtau.dtype and gtau.shape == tau.shape
    rgx, rt = ref_vjp(x64, k, g64, tau, mask=mask)
    scale = max(1.0, np.abs(rgx).max())
    np.testing.assert_allclose(np.asarray(gx.astype(jnp.float64)), rgx, atol=4 * tol * scale)
    np.testing.assert_allclose(
        np.asarray(gtau.astype(jnp.float64)), rt.sum(-1, keepdims=True), atol=8 * tol * scale
    )
    assert np.all(np.asarray(gx)[~mask] == 0)


def test_agrees_with_numpy_backend(rng):
    x = rng.normal(size=(4, 16))
    g = rng.normal(size=x.shape)
    for kk, kw in ((3, dict(largest=False, axis=0)), (16, {})):
        pn = tk.dftopk_logits(x, kk, tau=0.7, **kw)
        pj = tk.dftopk_logits(jnp.asarray(x), kk, tau=0.7, **kw)
        np.testing.assert_allclose(np.asarray(pj), pn, atol=1e-12)
        gn, tn = tk.dftopk_vjp(x, kk, g, tau=0.7, **kw)
        gj = jax.grad(lambda x, kk=kk, kw=kw: (tk.dftopk(x, kk, tau=0.7, **kw) * g).sum())(
            jnp.asarray(x)
        )
        np.testing.assert_allclose(np.asarray(gj), gn, atol=1e-12)
        tj = jax.grad(lambda t, x, kk=kk, kw=kw: (tk.dftopk(x, kk, tau=t, **kw) * g).sum())(
            0.7, jnp.asarray(x)
        )
        np.testing.assert_allclose(float(tj), float(tn), atol=1e-12)


X = np.random.default_rng(7).normal(size=(3, 8))
MASK = np.random.default_rng(8).random((3, 8)) > 0.3
K_ROWS = np.array([1, 3, 8])
ORDER2 = dict(order=2, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


def test_check_grads_plain():
    # (logits are covered with the mask below)
    f = jax.jit(lambda x: tk.dftopk(x, 3, tau=0.7))
    check_grads(lambda x: f(jnp.asarray(x)), (jnp.asarray(X),), **ORDER2)


def test_check_grads_ties():
    # ties that survive every perturbation: x repeats entries of y, so the
    # function of y is smooth and checks the even split of the tie weights
    y = jnp.asarray([1.0, 2.0, 3.0, 0.5])
    idx = jnp.asarray([0, 1, 1, 2, 2, 3, 2, 0])
    f = jax.jit(lambda y, k: tk.dftopk(y[idx], k, tau=0.8))
    # sorted x: 3 3 3 2 2 1 1 .5; k = 3: a in a 3-way tie, b in a 2-way tie
    check_grads(lambda y: f(jnp.asarray(y), jnp.asarray(3)), (y,), **ORDER2)


def test_check_grads_mask_per_row_k_learnable_tau():
    # mask and k arrive as arguments of the jitted function (traced, per row)
    f = jax.jit(lambda x, tau, k, m: tk.dftopk(x, k, tau=tau, mask=m))
    tau = jnp.asarray([[0.5], [1.0], [2.0]])
    check_grads(
        lambda x, tau: f(jnp.asarray(x), jnp.asarray(tau), jnp.asarray(K_ROWS), jnp.asarray(MASK)),
        (jnp.asarray(X), tau),
        **ORDER2,
    )


@pytest.mark.slow
def test_check_grads_logits_per_entry_tau_axis0_smallest():
    # logits with a full per-entry tau, largest=False along axis 0 (no mask: masked
    # logits are -inf, where finite differences give NaN)
    g = jax.jit(lambda x, tau: tk.dftopk_logits(x, 1, tau=tau, axis=0, largest=False))
    check_grads(
        lambda x, t: g(jnp.asarray(x), jnp.asarray(t)),
        (jnp.asarray(X), jnp.asarray(0.5 + np.abs(X))),
        **ORDER2,
    )


def test_concrete_mask_k_tau_with_traced_x():
    # the common pattern: differentiate w.r.t. x with a fixed (concrete) mask,
    # per-row k and tau array closed over
    m, k, tau = jnp.asarray(MASK), jnp.asarray(K_ROWS), jnp.asarray([[0.5], [1.0], [2.0]])
    x = jnp.asarray(X)
    gx = jax.grad(lambda x: tk.dftopk(x, k, tau=tau, mask=m).sum())(x)
    gj = jax.jit(jax.grad(lambda x: tk.dftopk(x, k, tau=tau, mask=m).sum()))(x)
    ref, _ = ref_vjp(X, K_ROWS, np.ones_like(X), np.asarray(tau), mask=MASK)
    np.testing.assert_allclose(np.asarray(gx), ref, atol=1e-12)
    np.testing.assert_allclose(np.asarray(gj), ref, atol=1e-12)


def test_transformations_compose():
    # float32 (four radix passes instead of eight): less to compile
    x = jnp.asarray(X, jnp.float32)
    f = lambda x: tk.dftopk(x, 3, tau=0.7)  # noqa: E731
    # jacfwd == jacrev, hessian symmetric, linearize/linear_transpose == vjp
    jf, jr = jax.jacfwd(f)(x), jax.jacrev(f)(x)
    np.testing.assert_allclose(np.asarray(jf), np.asarray(jr), atol=1e-6)
    h = jax.hessian(lambda r: tk.dftopk(r, 3, tau=0.7) @ jnp.arange(8.0, dtype=jnp.float32))(x[0])
    np.testing.assert_allclose(np.asarray(h), np.asarray(h.T), atol=1e-6)
    _, lin = jax.linearize(f, x)
    u = jnp.asarray(np.random.default_rng(1).normal(size=X.shape), jnp.float32)
    (ct,) = jax.linear_transpose(lin, x)(u)
    _, vjp = jax.vjp(f, x)
    np.testing.assert_allclose(np.asarray(ct), np.asarray(vjp(u)[0]), atol=1e-6)
    # <v, J u> == <J^T v, u>
    np.testing.assert_allclose(float((lin(u) * u).sum()), float((ct * u).sum()), atol=1e-6)
    # vmap over rows with a per-row (traced) k == the batched call
    k = jnp.asarray(K_ROWS)
    pv = jax.vmap(lambda r, k: tk.dftopk(r, k, tau=0.7))(x, k)
    np.testing.assert_allclose(np.asarray(pv), np.asarray(tk.dftopk(x, k, tau=0.7)), atol=1e-6)
    # vmap of grad == batched grad; jit(grad) == grad
    gv = jax.vmap(jax.grad(lambda r: tk.dftopk(r, 3, tau=0.7)[0]))(x)
    gb = jax.grad(lambda x: tk.dftopk(x, 3, tau=0.7)[:, 0].sum())(x)
    np.testing.assert_allclose(np.asarray(gv), np.asarray(gb), atol=1e-6)
    gj = jax.jit(jax.grad(lambda x: tk.dftopk(x, 3, tau=0.7)[:, 0].sum()))(x)
    np.testing.assert_allclose(np.asarray(gj), np.asarray(gb), atol=1e-6)
    # jit with static k via static_argnums, k as a traced scalar array
    js = jax.jit(lambda x, k: tk.dftopk(x, k, tau=0.7), static_argnums=1)(x, 3)
    jt = jax.jit(lambda x, k: tk.dftopk(x, k, tau=0.7))(x, jnp.asarray(3))
    np.testing.assert_allclose(np.asarray(js), np.asarray(f(x)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(jt), np.asarray(f(x)), atol=1e-6)


def test_threshold_and_hard_mask_traceable():
    x = jnp.asarray(X)
    th = jax.jit(lambda x, k: tk.topk_threshold(x, k))(x, jnp.asarray(K_ROWS))
    s = np.sort(X, -1)[:, ::-1]
    ext = np.concatenate([np.full((3, 1), np.inf), s, np.full((3, 1), -np.inf)], -1)
    r = np.arange(3)
    want = np.where(K_ROWS == 8, -np.inf, ext[r, K_ROWS] / 2 + ext[r, K_ROWS + 1] / 2)
    np.testing.assert_array_equal(np.asarray(th)[:, 0], want)
    hm = jax.jit(lambda x, m: tk.topk_mask(x, 3, mask=m))(x, jnp.asarray(MASK))
    np.testing.assert_array_equal(np.asarray(hm).sum(-1), np.minimum(3, MASK.sum(-1)))


def test_threshold_and_closed_form_functions_differentiate_the_selection():
    """``a``, ``b`` are differentiable in ``x`` (tie means): ``jax.grad`` of
    ``topk_threshold`` has the spec's weights, and second order through
    ``dftopk_vjp``/``dftopk_jvp``/``dftopk_and_vjp`` keeps the threshold's term (it
    used to treat ``a``, ``b`` as constants: zeros, and a silently wrong Hessian)."""
    x = jnp.asarray([4.0, 1.0, 3.0, 2.0, 2.5, 3.0])  # a tie at the k-th largest (3.0)
    g = jnp.asarray([1.0, 0.2, 0.0, -0.4, 0.3, 0.5])
    v = jnp.asarray([0.0, 0.5, 1.0, 0.0, 2.0, -1.0])
    # k = 3: a = 3.0 (twice), b = 2.5: w = 1/4, 1/4 on the 3.0s, 1/2 on 2.5
    th = jax.grad(lambda x: tk.topk_threshold(x, 3)[0])(x)
    np.testing.assert_allclose(np.asarray(th), [0, 0, 0.25, 0, 0.5, 0.25])
    th = jax.grad(lambda x: tk.topk_threshold(x, jnp.asarray(3), largest=False)[0])(x)
    # the 3 smallest: a = 2.5, b = 3.0 (twice)
    np.testing.assert_allclose(np.asarray(th), [0, 0, 0.25, 0, 0.5, 0.25])
    fns = {
        "vjp": lambda x: jnp.vdot(tk.dftopk_vjp(x, 2, g, tau=0.5)[0], v),
        "jvp": lambda x: jnp.vdot(tk.dftopk_jvp(x, 2, g, tau=0.5)[1], v),
        "and_vjp": lambda x: jnp.vdot(tk.dftopk_and_vjp(x, 2, tau=0.5)[1](g)[0], v),
        "mask": lambda x: jnp.vdot(tk.dftopk_vjp(x, 4, g, mask=x < 3.5)[0], v),
    }
    xs = jnp.asarray([4.0, 1.0, 3.1, 2.0, 2.5, 2.9])  # no ties: finite differences apply
    eps = 1e-6
    for name, f in fns.items():
        got = np.asarray(jax.grad(f)(xs))
        fd = [(f(xs + eps * e) - f(xs - eps * e)) / (2 * eps) for e in np.eye(6)]
        np.testing.assert_allclose(got, np.asarray(fd), atol=1e-6, err_msg=name)


def test_hard_mask_branches_under_jit():
    """Under jit topk_mask takes a traced cond (eagerly the branch is taken on the host,
    which the conformance suite covers): batches that need no tie ranking (distinct
    values) and batches that do (surplus ties, NaN, masks, per-row k) match the reference."""
    from topk_core.conformance.reference import ref_topk_mask

    rng = np.random.default_rng(5)
    distinct = rng.permutation(60).astype(np.float32).reshape(3, 20)
    ties = np.round(rng.standard_normal((3, 20)) * 2).astype(np.float32)
    nan = ties.copy()
    nan[:, ::7] = np.nan
    mask = rng.random((3, 20)) < 0.7
    # one shape: a compile per (k an int or an array, mask or not), k traced either way
    jm = jax.jit(lambda x, k, m: tk.topk_mask(x, k, mask=m, largest=False))
    for x in (distinct, ties, nan):
        for k in (0, 4, 20, np.arange(3) * 5):
            for m in (None, mask):
                want = ref_topk_mask(x, k, mask=m, largest=False)
                kj = k if isinstance(k, int) else jnp.asarray(k)
                mj = None if m is None else jnp.asarray(m)
                np.testing.assert_array_equal(np.asarray(jm(jnp.asarray(x), kj, mj)), want)


def test_infinite_inputs_nan_free_and_nan_propagates():
    x = jnp.asarray([[np.inf, 1.0, 0.0], [np.inf, np.inf, 0.0], [-np.inf, 0.0, 1.0]])
    k = jnp.asarray([1, 1, 2])
    p = tk.dftopk(x, k)
    np.testing.assert_array_equal(np.asarray(p), [[1, 0, 0], [0.5, 0.5, 0], [0, 1, 1]])
    g = jax.grad(lambda x, k: (tk.dftopk(x, k) * jnp.arange(3.0)).sum())(x, k)
    assert np.all(np.isfinite(np.asarray(g)))
    jf = jax.jacfwd(lambda x, k: tk.dftopk(x, k))(x, k)
    assert np.all(np.isfinite(np.asarray(jf)))
    xn = jnp.asarray([[np.nan, 1.0, 0.0, 2.0]])
    assert np.isnan(np.asarray(tk.dftopk(xn, 2))[0, 0])
    assert np.isnan(np.asarray(jax.jit(lambda x: tk.dftopk(x, 2))(xn))[0, 0])


def test_dtype_and_sharding_preserved():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for dtype in DTYPES.values():
        x = jax.device_put(jnp.asarray(X, dtype=dtype), sharding)
        p = tk.dftopk(x, 3)
        assert p.dtype == dtype and p.shape == x.shape
        assert p.sharding == x.sharding
        g = jax.grad(lambda x: tk.dftopk(x, 3).astype(jnp.float32).sum())(x)
        assert g.dtype == dtype


@pytest.mark.parametrize("shape", [(0, 6), (2, 0, 6), (0, 70001)], ids=str)
def test_transformations_on_an_empty_batch(shape):
    """An empty batch made the histogram's row blocks range(0, 0, 0) (ValueError)."""
    x = jnp.zeros(shape)
    for k in (1, jnp.ones(shape[:-1], dtype=jnp.int32)):
        g = jax.grad(lambda v, k=k: jnp.sum(tk.dftopk(v, k, hard=True)))(x)
        assert g.shape == shape
        assert jax.jit(lambda v, k=k: tk.dftopk_logits(v, k))(x).shape == shape
        assert jax.jvp(lambda v, k=k: tk.dftopk(v, k), (x,), (x,))[1].shape == shape
    assert jax.vmap(lambda v: tk.dftopk(v, 1))(x).shape == shape


def test_bad_input_errors():
    x = jnp.asarray(X)
    with pytest.raises(TypeError, match="k must be an int"):
        tk.dftopk(x, 2.0)
    with pytest.raises(TypeError, match="k must be an int"):
        tk.dftopk(x, jnp.asarray([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="k must satisfy"):
        tk.dftopk(x, 9)
    with pytest.raises(TypeError, match="real floating"):
        tk.dftopk(jnp.arange(8), 2)
    with pytest.raises(TypeError, match="mask must have dtype bool"):
        tk.dftopk(x, 2, mask=jnp.ones(X.shape))
    with pytest.raises(TypeError, match="numpy"):
        tk.dftopk(x, 2, mask=np.ones(X.shape, bool))
    with pytest.raises(ValueError, match="tau"):
        tk.dftopk(x, 2, tau=-1.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        jax.jit(lambda x: tk.dftopk(x, jnp.asarray([1, 2])))(x)
    with pytest.raises(TypeError, match="k must be an int"):
        jax.jit(lambda x, k: tk.dftopk(x, k))(x, 1.5)


def test_batch_in_map_steps_end_to_end():
    # a batch large enough for the CPU's lax.map steps (64 x 8200: two steps of 32 rows),
    # through the public API with a mask, per-row k, ties and a per-row tau, against the
    # float64 reference: output and gradient
    from topk_core.backends import jax_backend

    rows, n = 64, 8200
    assert jax_backend.map_steps(rows, n) == 2
    rng = np.random.default_rng(12)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x[::4, : n // 3] = np.round(x[::4, : n // 3] * 2)  # ties around most thresholds
    mask = rng.random((rows, n)) < 0.9
    k = rng.integers(0, n + 1, rows).astype(np.int32)
    tau = np.linspace(0.25, 2.0, rows, dtype=np.float32)[:, None]
    g = rng.standard_normal((rows, n)).astype(np.float32)

    def f(x):
        return tk.dftopk(x, jnp.asarray(k), tau=jnp.asarray(tau), mask=jnp.asarray(mask))

    p, pull = jax.vjp(jax.jit(f), jnp.asarray(x))
    (gx,) = pull(jnp.asarray(g))
    tol = TOLERANCE["float32"]
    want_p = ref_dftopk(x, k, tau=tau, mask=mask)
    want_gx, _ = ref_vjp(x, k, g, tau=tau, mask=mask)
    np.testing.assert_allclose(np.asarray(p, dtype=np.float64), want_p, rtol=0, atol=tol)
    np.testing.assert_allclose(np.asarray(gx, dtype=np.float64), want_gx, rtol=0, atol=tol)


def test_limits_through_the_custom_rules():
    """The limits of the README's infinities row through ``jax.jvp``/``jax.vjp`` (the
    custom rules, not ``dftopk_jvp``/``dftopk_vjp``): a ``tau`` tangent where ``p (1 - p)``
    underflows is 0 even where ``z dtau`` overflows, and an overflowed ``sum(s)`` leaves
    the entry tied with an infinite ``a`` (weight 0) its own ``s`` instead of NaN."""
    x = jnp.asarray([1e35, 0.0, -1e35], jnp.float32)
    _, d = jax.jvp(lambda t: tk.dftopk(x, 1, tau=t), (jnp.float32(1e-3),), (jnp.float32(10.0),))
    np.testing.assert_array_equal(np.asarray(d), 0.0)
    xi = jnp.asarray([np.inf, 3e38, 1e-45, 0.0, 1.0, -1.0], jnp.float32)
    _, pull = jax.vjp(lambda v: tk.dftopk_logits(v, 1, tau=1.2e-38), xi)
    gx = np.asarray(pull(jnp.ones(6, jnp.float32))[0]).astype(np.float64)
    assert gx[1] == -np.inf
    np.testing.assert_allclose(gx[[0, 2, 3, 4, 5]], float(np.float32(1) / np.float32(1.2e-38)))


def test_logits_tau_terms_where_z_over_tau_overflows(rng):
    """Logits near float32's largest value with ``tau < 1``: ``z / tau`` overflows, but
    the ``tau`` tangent ``-z dtau / tau`` (``|dtau| < tau``) and ``grad_tau = -sum(g z) /
    tau`` are in range; the custom rules get them (the float64 results of the same
    float32 inputs), as ``dftopk_jvp`` does, instead of +-inf."""
    x = rng.uniform(-1e38, 1e38, (2, 50)).astype(np.float32)
    tau = np.array([[0.6], [0.7]], np.float32)
    dtau = np.array([[0.3], [-0.2]], np.float32)
    u = rng.standard_normal(x.shape).astype(np.float32)
    g = (rng.standard_normal(x.shape) * 1e-3).astype(np.float32)
    f64 = {"tau": tau.astype(np.float64), "output": "logits"}
    z, want = tk.dftopk_jvp(x.astype(np.float64), 10, u.astype(np.float64), tau_tangent=dtau, **f64)
    _, want_tau = tk.dftopk_vjp(x.astype(np.float64), 10, g.astype(np.float64), **f64)
    assert np.isfinite(z.astype(np.float32)).all()
    with np.errstate(over="ignore"):
        assert not np.isfinite(z.astype(np.float32) / tau).all()

    def f(v, t):
        return tk.dftopk_logits(v, 10, tau=t)

    args = (jnp.asarray(x), jnp.asarray(tau))
    _, d = jax.jvp(f, args, (jnp.asarray(u), jnp.asarray(dtau)))
    big = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(d), want, rtol=2e-6, atol=1e-6 * big)
    _, pull = jax.vjp(f, *args)
    np.testing.assert_allclose(np.asarray(pull(jnp.asarray(g))[1]), want_tau, rtol=1e-5)


def test_plugin_drops_jax_programs_past_the_map_budget(monkeypatch):
    """The suite's teardown hook calls ``jax.clear_caches()`` once the process holds
    more than half of ``vm.max_map_count`` mappings (XLA's compiled programs reached
    the limit in a whole run, and the next compile segfaulted), and not before."""
    from topk_core.conformance import plugin

    if plugin._mapped_regions() is None:
        pytest.skip("no /proc/self/maps here")
    calls = []
    monkeypatch.setattr(jax, "clear_caches", lambda: calls.append(1))
    monkeypatch.setattr(plugin, "_map_budget", lambda: 10**9)
    plugin.pytest_runtest_teardown(None)
    assert calls == []
    monkeypatch.setattr(plugin, "_map_budget", lambda: 0)
    plugin.pytest_runtest_teardown(None)
    assert calls == [1]


def test_clear_caches_unmaps_compiled_programs():
    """What the hook relies on: compiled programs hold memory mappings that
    ``jax.clear_caches()`` gives back (measured: ~270 per dftopk + grad program)."""
    from topk_core.conformance import plugin

    if plugin._mapped_regions() is None:
        pytest.skip("no /proc/self/maps here")
    jax.clear_caches()
    before = plugin._mapped_regions()
    for n in range(31, 36):
        x = jnp.ones((2, n))
        jax.block_until_ready(jax.grad(lambda x: tk.dftopk(x, 2).sum())(x))
    grown = plugin._mapped_regions()
    jax.clear_caches()
    after = plugin._mapped_regions()
    assert grown - before > 100
    assert after - before < (grown - before) / 4


def test_eager_topk_mask_is_one_compiled_program():
    """An eager ``topk_mask`` runs the selection and the mask as one program (the
    backend's ``hard_mask``): the first call on a new shape compiles at most 6
    programs (4 in a fresh process, the mask's and a few small ones of the argument
    handling; 21 when the mask's operations were dispatched one by one), and the
    values are NumPy's, NaN, ties, masks, per-row k, axis and largest included."""
    compiles = []

    def listen(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    x_np = np.array([[np.nan, 2.0, 2.0, 1.0, -np.inf], [0.5, 3.0, 3.0, 3.0, 0.0]])
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        first = tk.topk_mask(jnp.asarray(x_np[:, 1:4]), 1)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert len(compiles) <= 6
    np.testing.assert_array_equal(np.asarray(first), tk.topk_mask(x_np[:, 1:4], 1))
    mask_np = np.array([[True, True, False, True, True], [True, True, True, False, True]])
    x, mask = jnp.asarray(x_np), jnp.asarray(mask_np)
    for k in (0, 1, 2, 3, np.array([2, 4])):
        for kw in ({}, {"mask": mask}, {"largest": False}):
            kw_np = {key: mask_np if key == "mask" else v for key, v in kw.items()}
            got = tk.topk_mask(x, jnp.asarray(k) if isinstance(k, np.ndarray) else k, **kw)
            assert got.dtype == x.dtype
            want = tk.topk_mask(x_np, k, **kw_np)
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"k={k} {kw}")


def test_eager_calls_compile_once_per_shape_whatever_k():
    """An int k is a traced per-row array in eager calls (as a Python tau is a traced
    scalar): a k schedule or a cascade's stages on one shape reuse one program instead of
    compiling one per k (about a second each).  Values as NumPy's for every k."""
    from topk_core.backends.jax_backend import eager_k

    compiles = []

    def listen(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    x_np, mask_np = X, MASK  # the module's shape: programs other tests compiled are reused
    x, mask = jnp.asarray(x_np), jnp.asarray(mask_np)
    calls = {
        "dftopk": lambda v, k, g, **kw: tk.dftopk(v, k, tau=0.5, **kw),
        "hard": lambda v, k, g, **kw: tk.dftopk(v, k, hard=True, **kw),
        "logits": lambda v, k, g, **kw: tk.dftopk_logits(v, k, **kw),
        "vjp": lambda v, k, g, **kw: tk.dftopk_vjp(v, k, g, **kw)[0],
        "jvp": lambda v, k, g, **kw: tk.dftopk_jvp(v, k, g, **kw)[1],
        "mask": lambda v, k, g, **kw: tk.topk_mask(v, k, **kw),
        "threshold": lambda v, k, g, **kw: tk.topk_threshold(v, k, **kw),
    }
    masks = ({}, {"mask": mask})
    for fn in calls.values():  # compile each call once, for this shape
        for kw in masks:
            jax.block_until_ready(fn(x, 1, jnp.ones_like(x), **kw))
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        got = {
            (name, k, i): np.asarray(fn(x, k, jnp.ones_like(x), **kw))
            for name, fn in calls.items()
            for k in (0, 2, 5, 8)
            for i, kw in enumerate(masks)
        }
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == []
    for (name, k, i), value in got.items():
        kw = {"mask": mask_np} if i else {}
        with np.errstate(all="ignore"):
            want = calls[name](x_np, k, np.ones_like(x_np), **kw)
        np.testing.assert_allclose(value, want, rtol=1e-12, atol=1e-15, err_msg=f"{name} k={k}")
    # under an outer trace an int k stays static (folded into the caller's program)
    assert jax.jit(lambda v: eager_k(v, 3))(x).shape == ()
    assert eager_k(x, 3).shape == (3, 1)


def test_closed_forms_run_as_a_few_compiled_programs():
    """``dftopk_vjp``, ``dftopk_and_vjp``'s ``vjp`` and ``dftopk_jvp`` on concrete arrays run
    the math after the selection as one compiled program each (the backend's ``soft``
    hook), not op by op: on a new shape each call compiles a few programs where the
    generic code, dispatched eagerly, compiled 27-46 (and ran 110-140 passes over ``x`` at
    n = 1e6 where the compiled ones take about 14).  Values as NumPy's."""
    compiles = []

    def listen(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    def vjp(v, g):
        return tk.dftopk_vjp(v, 4, g, tau=0.5, mask=v > -1.5)

    def and_vjp(v, g):
        p, pull = tk.dftopk_and_vjp(v, 4, tau=0.5, mask=v > -1.5)
        return (p, *pull(g))

    def jvp(v, g):
        return tk.dftopk_jvp(v, 4, g, tau=0.5, tau_tangent=0.25, mask=v > -1.5)

    rng = np.random.default_rng(3)
    for fn in (vjp, and_vjp, jvp):
        # one shape first, so that what every shape shares (scalar conversions) is compiled
        for n, count in ((41, False), (43 if fn is vjp else 47 if fn is and_vjp else 53, True)):
            x_np, g_np = rng.standard_normal((3, n)), rng.standard_normal((3, n))
            compiles.clear()
            jax.monitoring.register_event_duration_secs_listener(listen)
            try:
                got = [np.asarray(v) for v in fn(jnp.asarray(x_np), jnp.asarray(g_np))]
            finally:
                jax.monitoring.unregister_event_duration_listener(listen)
            if count:
                # measured 6-7: the test's own mask comparison, the valid count per row (a
                # cast and a sum) and the masked selection's where, the selection, the
                # hook's program(s)
                assert len(compiles) <= 9, (fn.__name__, len(compiles))
            with np.errstate(all="ignore"):
                want = fn(x_np, g_np)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=fn.__name__)


_CACHED_RUN = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
counts = {"hits": 0, "misses": 0}
def listen(event, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
        counts["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
        counts["misses"] += 1
jax.monitoring.register_event_listener(listen)
import topk_core as tk
x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 50)).astype(np.float32))
g = jax.jit(jax.grad(lambda t: tk.dftopk(t, 5, tau=0.5).sum()))(x)
v = tk.dftopk_vjp(x, 5, x, tau=0.5)[0]
m = tk.topk_mask(x, jnp.arange(1, 9))  # a per-row k
print(json.dumps({**counts, "values": [float(g.sum()), float(v.sum()), float(m.sum())]}))
"""


def test_programs_reload_from_jax_persistent_cache(tmp_path):
    """The README's tip: with JAX's persistent compilation cache on, a second process
    loads every program (``jit`` + ``grad``, an eager closed form, an eager ``topk_mask``)
    from the cache instead of compiling it: nothing in them differs from one process to
    the next (no object ids, no unordered state in the traced code)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", _CACHED_RUN, str(tmp_path / "cache")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["misses"] > 0  # (a program compiled twice in one process hits already)
    compiled = first["hits"] + first["misses"]
    assert second == {**first, "hits": compiled, "misses": 0}
