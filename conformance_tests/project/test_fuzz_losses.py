"""Seeded random configurations of the losses against a float64 reference.

``test_losses.py`` checks ``topk_bce_loss`` and ``cascade_joint_loss`` on hand-picked
cases; here a generator draws many combinations: 1-3 dimensions, float16/32/64, any
axis, scores of several kinds (normal, a few distinct values, infinities, NaN, near
the dtype's largest value, tiny, constant), scalar or per-row ``k`` (non-increasing
along a cascade of 2-3 stages), ``tau`` as a float from 1e-35 to 1e30 or per row or
per entry (one per stage or shared), masks, every reduction, fixed weights (zeros
included) or learned ``log_vars``.  Each value on NumPy and torch must match the
reference written here from the definitions in float64, NaN and infinities included
(its logits rounded to the scores' dtype, as ``dftopk_logits`` returns them: +-inf
past its range).  On NaN-free inputs torch's gradients (scores, ``tau`` arrays,
``log_vars``) must be NaN-free; on smooth float64 draws they must match central
differences.  Such draws found the end-to-end term reading a NaN as ``q = 1`` (+inf
instead of NaN) and a ``"mean"`` overflowing in its sum.  JAX runs the same code (its
rules are checked in ``test_losses.py`` and ``test_nan_autodiff.py``); it is left out
here, where each draw would compile.  ``TOPK_FUZZ_CASES`` / ``TOPK_FUZZ_SEED`` as in
``test_fuzz_hooks.py``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np
import pytest
from topk_core.conformance.reference import ref_dftopk, ref_topk_mask

from topk_core.losses import cascade_joint_loss, topk_bce_loss

CASES = int(os.environ.get("TOPK_FUZZ_CASES", "120"))
SEED = int(os.environ.get("TOPK_FUZZ_SEED", "20261207"))
TOL = {"float16": 2e-2, "float32": 2e-4, "float64": 1e-9}
BIG = {"float16": 3e4, "float32": 1e38, "float64": 1e307}
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _scores(rng: np.random.Generator, shape: tuple, dt: str) -> tuple[np.ndarray, str]:
    kind = str(
        rng.choice(
            ["randn", "few", "inf", "nan", "huge", "tiny", "const"],
            p=[0.35, 0.15, 0.15, 0.1, 0.1, 0.1, 0.05],
        )
    )
    v = rng.standard_normal(shape)
    if kind == "few":
        v = rng.integers(0, 4, shape).astype(float)
    elif kind == "inf":
        u = rng.random(shape)
        v[u < 0.07] = np.inf
        v[(u >= 0.07) & (u < 0.14)] = -np.inf
    elif kind == "nan":
        v[rng.random(shape) < 0.05] = np.nan
    elif kind == "huge":
        v = v * BIG[dt]
    elif kind == "tiny":
        v = v * 1e-6
    elif kind == "const":
        v = np.zeros(shape)
    with np.errstate(over="ignore"):
        return v.astype(dt), kind


def _tau(rng: np.random.Generator, shape: tuple, axis: int, dt: str) -> Any:
    r = rng.random()
    tdt = "float32" if dt == "float16" else dt
    if r < 0.15:
        return float(rng.choice([1e-3, 0.05, 3.0, 1e-35, 1e30]))
    if r < 0.3:
        ts = list(shape)
        ts[axis % len(shape)] = 1
        return (rng.random(ts) + 0.1).astype(tdt)
    if r < 0.4:
        return (rng.random(shape) + 0.1).astype(tdt)
    return float(rng.choice([0.1, 0.5, 1.0, 2.0]))


def _draw(rng: np.random.Generator) -> dict:
    dt = str(rng.choice(["float32", "float64", "float16", "float32", "float64"]))
    nd = int(rng.choice([1, 2, 2, 3]))
    if nd == 1:
        shape: tuple = (int(rng.choice([1, 2, 5, 40, 300])),)
    elif nd == 2:
        shape = (int(rng.integers(1, 5)), int(rng.choice([1, 2, 7, 64, 257])))
    else:
        shape = (2, int(rng.integers(1, 3)), int(rng.choice([3, 33])))
    axis = int(rng.integers(0, nd)) if nd > 1 and rng.random() < 0.3 else -1
    n = shape[axis]
    batch = tuple(s for i, s in enumerate(shape) if i != axis % nd)
    stages = int(rng.choice([1, 2, 2, 3]))  # 1: topk_bce_loss
    per_row = bool(batch) and rng.random() < 0.3
    ks: list = [rng.integers(0, n + 1, batch) if per_row else int(rng.integers(0, n + 1))]
    for _ in range(stages - 1):  # non-increasing along the cascade
        prev = ks[-1]
        ks.append(rng.integers(0, prev + 1) if per_row else int(rng.integers(0, prev + 1)))
    shared = stages > 1 and rng.random() < 0.5
    taus = [_tau(rng, shape, axis, dt)] * stages if shared else None
    taus = taus or [_tau(rng, shape, axis, dt) for _ in range(stages)]
    scores, kinds = zip(*[_scores(rng, shape, dt) for _ in range(stages)])
    relevance = (
        rng.integers(0, 5, shape) if rng.random() < 0.5 else rng.standard_normal(shape)
    ).astype(dt)
    mask = rng.random(shape) > rng.choice([0.1, 0.5, 0.95]) if rng.random() < 0.3 else None
    weights = log_vars = None
    r = rng.random()
    if stages > 1 and r < 0.3:
        weights = [float(v) for v in rng.choice([0.0, 0.5, 1.0, 2.0], stages + 1)]
    elif stages > 1 and r < 0.6:
        log_vars = rng.standard_normal(stages + 1).astype(dt)
    reductions = ["mean", "sum", "none"] if stages == 1 else ["mean", "sum"]
    return dict(
        dt=dt,
        axis=axis,
        scores=list(scores),
        kinds=kinds,
        relevance=relevance,
        ks=ks,
        taus=taus,
        shared_tau=shared,
        mask=mask,
        weights=weights,
        log_vars=log_vars,
        reduction=str(rng.choice(reductions)),
    )


# ---------------------------------------------------------------------------
# float64 reference from the definitions


def _softplus(t: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, t)


def _ref_logits(x: np.ndarray, k: Any, tau: Any, axis: int, mask: Any) -> np.ndarray:
    t = tau if isinstance(tau, float) else np.asarray(tau, np.float64)
    # the losses take dftopk_logits' values, in the scores' dtype (+-inf past its range),
    # then compute in float32 or float64
    with np.errstate(over="ignore"):
        z = ref_dftopk(np.asarray(x, np.float64), k, tau=t, axis=axis, mask=mask, output="logits")
        return z.astype(x.dtype).astype(np.float64)


def _ref_reduce(elem: np.ndarray, mask: Any, reduction: str) -> Any:
    if mask is not None:
        elem = np.where(mask, elem, 0.0)
    if reduction == "none":
        return elem
    if reduction == "sum":
        return elem.sum()
    return (elem / max(elem.size if mask is None else int(mask.sum()), 1)).sum()


def _reference(d: dict) -> tuple[Any, list]:
    """``(loss, terms)``: terms are the cascade's ``(L_0, L_1, ...)``, or ``[loss]``."""
    rel = np.asarray(d["relevance"], np.float64)
    zs = [
        _ref_logits(s, k, t, d["axis"], d["mask"])
        for s, k, t in zip(d["scores"], d["ks"], d["taus"])
    ]
    ys = [ref_topk_mask(rel, k, axis=d["axis"], mask=d["mask"]) > 0.5 for k in d["ks"]]
    red = d["reduction"]
    with np.errstate(all="ignore"):
        stage_terms = [
            _ref_reduce(np.where(y, _softplus(-z), _softplus(z)), d["mask"], red)
            for z, y in zip(zs, ys)
        ]
        if len(zs) == 1:
            return stage_terms[0], stage_terms
        log_q = sum(-_softplus(-z) for z in zs)
        joint = np.where(ys[-1], -log_q, -np.log(-np.expm1(log_q)))
        terms = [_ref_reduce(joint, d["mask"], red), *stage_terms]
        if d["log_vars"] is not None:
            s = np.asarray(d["log_vars"], np.float64)
            return sum(np.exp(-s[t]) * terms[t] + s[t] for t in range(len(terms))), terms
        w = d["weights"] or [1.0] * len(terms)
        return sum(wt * term for wt, term in zip(w, terms) if wt != 0.0), terms


# ---------------------------------------------------------------------------
# the calls


def _call(d: dict, conv, lv: Any = None, taus: Any = None) -> Any:
    taus = taus if taus is not None else [conv(t) for t in d["taus"]]
    kw = dict(mask=conv(d["mask"]), reduction=d["reduction"], axis=d["axis"])
    if len(d["scores"]) == 1:
        return topk_bce_loss(d["x"][0], conv(d["relevance"]), conv(d["ks"][0]), tau=taus[0], **kw)
    tau = taus[0] if d["shared_tau"] else taus
    return cascade_joint_loss(
        d["x"],
        conv(d["relevance"]),
        [conv(k) for k in d["ks"]],
        tau=tau,
        weights=d["weights"],
        log_vars=lv,
        return_terms=True,
        **kw,
    )


def _close(got: Any, want: Any, dt: str, what: str, inf_ref_ok: bool = False) -> None:
    got = np.asarray(got.detach() if hasattr(got, "detach") else got, np.float64)
    with np.errstate(over="ignore"):
        want = np.asarray(want, np.float64).astype(dt).astype(np.float64)
    if inf_ref_ok:  # -log(-expm1(log q)) is +inf where log q rounds to 0; the loss is exact
        want = np.where(np.isinf(want) & np.isfinite(got), got, want)
    assert got.shape == want.shape, what
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN")
    np.testing.assert_array_equal(got[np.isinf(got)], want[np.isinf(got)], err_msg=what)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=f"{what}: inf")
    fin = np.isfinite(want)
    big = float(np.abs(want[fin]).max()) if fin.any() else 0.0
    tol = TOL[dt]
    np.testing.assert_allclose(
        got[fin], want[fin], rtol=tol, atol=tol * max(big, 1.0), err_msg=what
    )


def _check_values(d: dict, got: Any, want: Any, want_terms: list, lib: str) -> None:
    dt = d["dt"]
    if len(d["scores"]) == 1:
        _close(got, want, dt, f"{lib} loss")
        return
    loss, terms = got
    for t, (g, w) in enumerate(zip(terms, want_terms)):
        _close(g, w, dt, f"{lib} term {t}", inf_ref_ok=t == 0)
    if all(np.isfinite(np.asarray(w, np.float64)).all() for w in want_terms):
        _close(loss, want, dt, f"{lib} loss")


def _has_nan(d: dict) -> bool:
    return any(np.isnan(s).any() for s in d["scores"]) or np.isnan(d["relevance"]).any()


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_losses_match_the_float64_reference_on_random_draws(library):
    if library == "torch" and not HAS_TORCH:
        pytest.skip("torch is not installed")
    rng = np.random.default_rng([SEED, 2])
    failures = []
    for i in range(CASES):
        d = _draw(rng)
        want, want_terms = _reference(d)
        try:
            if library == "numpy":
                d["x"] = d["scores"]
                got = _call(d, lambda v: v, d["log_vars"])
                _check_values(d, got, want, want_terms, library)
            else:
                _torch_case(d, want, want_terms, i)
        except AssertionError as exc:
            desc = {k: v for k, v in d.items() if k in ("dt", "axis", "kinds", "reduction")}
            failures.append(f"draw {i} {desc}: {str(exc)[:300]}")
    assert not failures, f"{len(failures)} of {CASES} draws:\n" + "\n".join(failures[:5])


def _torch_case(d: dict, want: Any, want_terms: list, i: int) -> None:
    import torch

    def conv(v: Any) -> Any:
        return torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v

    d["x"] = [conv(s).requires_grad_() for s in d["scores"]]
    taus = [t if isinstance(t, float) else conv(t).requires_grad_() for t in d["taus"]]
    lv = None if d["log_vars"] is None else conv(d["log_vars"]).requires_grad_()
    got = _call(d, conv, lv, taus)
    _check_values(d, got, want, want_terms, "torch")
    loss = got if len(d["scores"]) == 1 else got[0]
    cot = np.random.default_rng([SEED, 3, i]).standard_normal(tuple(loss.shape))
    cot_t = torch.from_numpy(np.asarray(cot, dtype=d["dt"]))
    params = [
        *d["x"],
        *(t for t in taus if not isinstance(t, float)),
        *([lv] if lv is not None else []),
    ]
    if not loss.requires_grad:  # every weight 0: a constant
        return
    grads = torch.autograd.grad(loss, params, cot_t, allow_unused=True)
    if not _has_nan(d):
        for g in grads:
            assert g is None or not torch.isnan(g).any(), "NaN gradient for NaN-free inputs"
    smooth = d["dt"] == "float64" and set(d["kinds"]) == {"randn"} and len(d["scores"]) == 1
    tau = d["taus"][0]
    if smooth and isinstance(tau, float) and 0.05 <= tau <= 3:
        # central differences of the reference along a random direction
        u = np.random.default_rng([SEED, 4, i]).standard_normal(d["scores"][0].shape)
        x0 = d["scores"][0]
        vals = []
        for sgn in (1, -1):
            d["scores"][0] = x0 + sgn * 1e-6 * u
            vals.append(np.sum(_reference(d)[0] * cot))
        d["scores"][0] = x0
        fd = (vals[0] - vals[1]) / 2e-6
        an = float(np.sum(grads[0].numpy() * u))
        assert abs(fd - an) <= 1e-5 * max(1.0, abs(fd)), f"finite differences {fd} vs {an}"
