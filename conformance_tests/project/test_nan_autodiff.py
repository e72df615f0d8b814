"""The NaN rule through each framework's own autodiff (torch autograd, jax.grad).

A loss that drops the NaN outputs (``where(isnan(p), 0, p)``) gets finite
gradients everywhere but at the NaN scores themselves, equal to the closed-form
VJP; grad_tau stays finite.  The closed forms are checked on every library in
``test_gradients.py::test_nan_entries_are_constants_for_gradients``.
"""

from __future__ import annotations

import numpy as np
import pytest

import topk_core as tk

X = np.array([[0.3, np.nan, 1.0, -0.5, 2.0, 0.7], [1.0, 2.0, np.nan, 4.0, 0.5, -1.0]])
G = np.array([[0.5, 1.0, -1.0, 2.0, 0.25, -0.3], [1.5, -0.5, 2.0, 0.1, -1.2, 0.8]])
TAU = np.array([[0.6], [1.4]])


def _expected(output: str):
    g = np.where(np.isnan(X), 0.0, G)  # the cotangent a NaN-dropping loss sends back
    with np.errstate(invalid="ignore"):
        return tk.dftopk_vjp(X, 2, g, tau=TAU, output=output)


@pytest.mark.parametrize("output", ["probs", "logits"])
def test_torch_autograd_follows_the_nan_rule(output):
    torch = pytest.importorskip("torch")
    x = torch.tensor(X, requires_grad=True)
    tau = torch.tensor(TAU, requires_grad=True)
    fn = tk.dftopk if output == "probs" else tk.dftopk_logits
    out = fn(x, 2, tau=tau)
    loss = (torch.where(out.isnan(), 0.0, out) * torch.tensor(G)).sum()
    loss.backward()
    gx, gtau = _expected(output)
    ok = ~np.isnan(X)
    np.testing.assert_allclose(x.grad.numpy()[ok], gx[ok], atol=1e-12)
    assert np.isfinite(x.grad.numpy()[ok]).all()
    np.testing.assert_allclose(tau.grad.numpy(), gtau, atol=1e-12)
    assert np.isfinite(tau.grad.numpy()).all()


@pytest.mark.parametrize("output", ["probs", "logits"])
def test_jax_grad_follows_the_nan_rule(output):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    fn = tk.dftopk if output == "probs" else tk.dftopk_logits

    def loss(x, tau):
        out = fn(x, 2, tau=tau)
        return jnp.sum(jnp.where(jnp.isnan(out), 0.0, out) * jnp.asarray(G))

    gx_j, gtau_j = jax.grad(loss, argnums=(0, 1))(jnp.asarray(X), jnp.asarray(TAU))
    gx, gtau = _expected(output)
    ok = ~np.isnan(X)
    np.testing.assert_allclose(np.asarray(gx_j)[ok], gx[ok], atol=1e-12)
    assert np.isfinite(np.asarray(gx_j)[ok]).all()
    np.testing.assert_allclose(np.asarray(gtau_j), gtau, atol=1e-12)
    assert np.isfinite(np.asarray(gtau_j)).all()


# rows whose threshold is NaN (k <= the NaN count): p and the logits are NaN throughout and
# grad_tau is NaN (README, "NaN, gradients"); a per-row, a per-entry and a scalar tau
X_NAN_THETA = np.array([[np.nan, 2.0, -2.0, 0.5], [1.0, np.nan, np.nan, 3.0]])
TAUS = [np.array([[0.5], [2.0]]), np.array([[0.5, 1.0, 2.0, 0.7], [1.5, 0.2, 1.0, 3.0]]), 0.5]


def _closed_form(output, tau):
    with np.errstate(invalid="ignore"):
        return tk.dftopk_vjp(X_NAN_THETA, 2, G[:, :4], tau=tau, output=output)


@pytest.mark.parametrize(
    ("output", "tau_i"), [("logits", 0), ("logits", 1), ("logits", 2), ("probs", 1)]
)
def test_nan_threshold_rows_in_torch_and_jax_autodiff(output, tau_i):
    """grad_tau of the logits came back 0 from torch autograd and jax.vjp (they zeroed
    every non-finite z) where the closed form, the reference and the README say NaN."""
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    from topk_core.conformance.reference import ref_vjp

    tau = TAUS[tau_i]
    fn = tk.dftopk if output == "probs" else tk.dftopk_logits
    gx, gtau = _closed_form(output, tau)
    _, t = ref_vjp(X_NAN_THETA, 2, G[:, :4], tau=np.broadcast_to(tau, (2, 4)), output=output)
    want = t.sum() if np.ndim(tau) == 0 else t.sum(-1, keepdims=True) if tau.shape[-1] == 1 else t
    np.testing.assert_array_equal(np.isnan(gtau), np.isnan(want))
    assert np.isnan(gtau).any()

    x = torch.tensor(X_NAN_THETA, requires_grad=True)
    tt = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    gx_t, gtau_t = torch.autograd.grad(fn(x, 2, tau=tt), (x, tt), torch.tensor(G[:, :4]))
    jnp = jax.numpy
    _, pull = jax.vjp(lambda v, s: fn(v, 2, tau=s), jnp.asarray(X_NAN_THETA), jnp.asarray(tau))
    gx_j, gtau_j = (np.asarray(v) for v in pull(jnp.asarray(G[:, :4])))
    for got_x, got_tau in ((gx_t.numpy(), gtau_t.numpy()), (gx_j, gtau_j)):
        np.testing.assert_allclose(got_x, gx, atol=1e-12)  # NaN where the closed form is
        np.testing.assert_allclose(got_tau, gtau, atol=1e-12)


@pytest.mark.parametrize("tau_i", [0, 1])
@pytest.mark.parametrize("output", ["probs", "logits"])
def test_nan_cotangent_at_nan_entries_stays_out_of_grad_tau(output, tau_i):
    """A loss that keeps the NaN outputs (BCE, ``sum(p)``) sends a NaN cotangent back to
    exactly the NaN entries.  They keep their own NaN term, nothing more: grad_tau and the
    other entries' grad_x are those of the NaN-dropping loss.  jax.vjp gave a NaN grad_tau
    (its rule multiplied that cotangent by a zero coefficient, 0 * NaN)."""
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    tau = (TAU, np.array([[0.6, 1.0, 0.8, 2.0, 0.5, 1.2], [1.4, 0.3, 1.0, 0.9, 2.5, 0.7]]))[tau_i]
    fn = tk.dftopk if output == "probs" else tk.dftopk_logits
    g_nan = np.where(np.isnan(X), np.nan, G)
    with np.errstate(invalid="ignore"):
        gx, gtau = tk.dftopk_vjp(X, 2, np.where(np.isnan(X), 0.0, G), tau=tau, output=output)
    ok = ~np.isnan(X)
    assert np.isfinite(gtau).all() and np.isfinite(gx[ok]).all()

    x = torch.tensor(X, requires_grad=True)
    tt = torch.tensor(tau, requires_grad=True)
    got = [(v.numpy() for v in torch.autograd.grad(fn(x, 2, tau=tt), (x, tt), torch.tensor(g_nan)))]
    _, pull = jax.vjp(lambda v, s: fn(v, 2, tau=s), jnp.asarray(X), jnp.asarray(tau))
    got.append(np.asarray(v) for v in pull(jnp.asarray(g_nan)))
    with np.errstate(invalid="ignore"):
        got.append(tk.dftopk_vjp(X, 2, g_nan, tau=tau, output=output))
    for got_x, got_tau in got:
        np.testing.assert_allclose(got_tau, gtau, rtol=1e-12)
        np.testing.assert_allclose(got_x[ok], gx[ok], rtol=1e-12, atol=1e-15)
        assert np.isnan(got_x[~ok]).all()  # each NaN entry keeps its own (NaN) term
