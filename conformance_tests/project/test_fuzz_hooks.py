"""Seeded random configurations: each ``soft`` hook against the generic code.

``test_fast_paths.py`` checks the NumPy and torch hooks on hand-picked cases; here a
generator draws many combinations of them: 1-3 dimensions, rows of 1 to 70001
entries, float16/32/64 (and bfloat16 on torch), any axis, scores of several kinds
(normal, a few distinct values, NaN and infinities, near the dtype's largest value,
tiny, sorted, constant), scalar or per-row ``k`` from 0 to n, ``largest``, ``tau`` as
a float from 1e-35 to 1e30 or per row or per entry, masks, and non-contiguous
layouts.  Every public call (``dftopk``, ``dftopk_logits``, ``dftopk_vjp``,
``dftopk_and_vjp``, ``dftopk_jvp`` with a ``tau`` tangent, ``hard=True``) must give
what the generic code (``soft=None``) gives: the same NaN and infinities, the same
values within the dtype's tolerance.  Such a draw found the JVP's ``tau`` term
overflowing in ``z / tau`` where the tangent was in range.

One documented difference is allowed: near the dtype's largest value (or with
``tau = 1e-35``) the logits' ``grad_tau`` sum ``-sum(s z)`` may overflow, and the
generic code returns what its sum gives (NaN or an infinity) where NumPy sums again
wider (README, Semantics, "infinities").  ``TOPK_FUZZ_CASES`` sets the number of
draws per backend (default 120: a few seconds), ``TOPK_FUZZ_SEED`` the seed (fixed by
default, so CI draws the same cases every run).  JAX's hook (the generic math compiled
into one program per call) compiles per shape, and so does the generic code it is
compared with, op by op (about 8-11 s a draw here): it gets a fortieth of the draws, on
three shapes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import pytest

import topk_core as tk
from topk_core import register_backend
from topk_core._registry import get_backend

CASES = int(os.environ.get("TOPK_FUZZ_CASES", "120"))
SEED = int(os.environ.get("TOPK_FUZZ_SEED", "20261207"))
TOL = {"float16": 3e-3, "bfloat16": 8e-3, "float32": 3e-6, "float64": 1e-12}
BIG = {"float16": 3e4, "float32": 1e38, "float64": 1e307}


@dataclasses.dataclass
class Draw:
    x: np.ndarray
    k: Any
    kw: dict
    overflow_prone: bool  # scores near the dtype's largest value, or a tiny tau


def _draw(rng: np.random.Generator, few_shapes: bool = False) -> Draw:
    dt = str(rng.choice(["float32", "float64", "float16", "float32"]))
    nd = int(rng.choice([1, 2, 2, 3]))
    long_row = rng.random() < 0.25
    if few_shapes:
        shape = {1: (2051,), 2: (3, 257), 3: (2, 3, 33)}[nd]
    elif nd == 1:
        shape: tuple = (int(rng.choice([1, 2, 5, 40, 300, 2051, 70001 if long_row else 999])),)
    elif nd == 2:
        n = int(rng.choice([1, 2, 7, 64, 257, 2051, 66003 if long_row else 513]))
        shape = (int(rng.integers(1, 6)), n)
    else:
        shape = (int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.choice([3, 33, 300])))
    axis = int(rng.integers(0, nd)) if nd > 1 and rng.random() < 0.3 else -1
    kind = str(rng.choice(["randn", "few", "naninf", "huge", "tiny", "sorted", "const"]))
    v = rng.standard_normal(shape)
    if kind == "few":
        v = rng.integers(0, 4, shape).astype(float)  # ties at a and b
    elif kind == "naninf":
        u = rng.random(shape)
        v[u < 0.05] = np.nan
        v[(u >= 0.05) & (u < 0.1)] = np.inf
        v[(u >= 0.1) & (u < 0.15)] = -np.inf
    elif kind == "huge":
        v = v * BIG[dt]
    elif kind == "tiny":
        v = v * 1e-6
    elif kind == "sorted":
        v = np.sort(v, axis=-1)
    elif kind == "const":
        v = np.zeros(shape)
    with np.errstate(over="ignore"):
        x = v.astype(dt)
    n = shape[axis]
    lead = tuple(s for i, s in enumerate(shape) if i != axis % nd)
    k: Any = int(rng.integers(0, n + 1))
    if lead and rng.random() < 0.3:
        k = rng.integers(0, n + 1, lead)
    kw: dict = {"axis": axis}
    if rng.random() < 0.3:
        kw["largest"] = False
    tau_dt = dt if dt != "float16" else "float32"
    r = rng.random()
    if r < 0.15:
        kw["tau"] = float(rng.choice([1e-3, 0.05, 3.0, 1e-35, 1e30]))
    elif r < 0.25:
        row = list(shape)
        row[axis % nd] = 1
        kw["tau"] = (rng.random(row) + 0.1).astype(tau_dt)
    elif r < 0.3:
        kw["tau"] = (rng.random(shape) + 0.1).astype(tau_dt)
    elif r < 0.6:
        kw["tau"] = float(rng.choice([0.1, 0.5, 2.0]))
    if rng.random() < 0.3:
        kw["mask"] = rng.random(shape) > rng.choice([0.1, 0.5, 0.95])
    prone = kind == "huge" or (isinstance(kw.get("tau"), float) and kw["tau"] == 1e-35)
    return Draw(x, k, kw, prone)


def _odd_layout(a: Any, rng: np.random.Generator) -> Any:
    """The same values in a non-contiguous view: F order, a strided slice, reversed strides."""
    if not isinstance(a, np.ndarray) or a.ndim == 0:
        return a
    c = rng.integers(0, 3)
    if c == 0:
        return np.asfortranarray(a)
    if c == 1:
        return np.repeat(a, 2, axis=-1)[..., ::2]
    return np.flip(np.flip(a, -1).copy(), -1)


def _to_torch(a: Any, bf16: bool = False) -> Any:
    import torch

    if not isinstance(a, np.ndarray):
        return a
    if min(a.strides, default=0) < 0:
        # torch has no negative strides: such a view arrives as a flipped copy
        t = torch.from_numpy(np.flip(a, -1).copy()).flip(-1)
    else:
        t = torch.from_numpy(a)
    return t.to(torch.bfloat16) if bf16 and t.is_floating_point() and a.ndim else t


def _to_jax(a: Any) -> Any:
    import jax.numpy as jnp

    return jnp.asarray(a) if isinstance(a, np.ndarray) else a


def _host(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a.astype(np.float64)
    if hasattr(a, "detach"):
        return a.detach().double().numpy()
    return np.asarray(a, dtype=np.float64)


def _calls(x, k, g, u, dtau, kw) -> dict[str, Any]:
    """Every public call's outputs on one draw (or the error type, which must agree)."""
    out: dict[str, Any] = {}
    for output in ("probs", "logits"):
        fwd = tk.dftopk if output == "probs" else tk.dftopk_logits
        try:
            out[output] = (fwd(x, k, **kw),)
            out[output + " vjp"] = tk.dftopk_vjp(x, k, g, output=output, **kw)
            p, vjp = tk.dftopk_and_vjp(x, k, output=output, **kw)
            out[output + " and_vjp"] = (p, *vjp(g))
            out[output + " jvp"] = tk.dftopk_jvp(x, k, u, tau_tangent=dtau, output=output, **kw)
        except (TypeError, ValueError) as e:  # e.g. a tau whose reciprocal is not normal
            out[output] = type(e).__name__
    try:
        out["hard vjp"] = tk.dftopk_vjp(x, k, g, hard=True, **kw)
        out["hard jvp"] = tk.dftopk_jvp(x, k, u, tau_tangent=dtau, hard=True, **kw)
    except (TypeError, ValueError) as e:
        out["hard"] = type(e).__name__
    return out


def _agree(got: Any, want: Any, dt: str, what: str, prone: bool) -> None:
    got, want = _host(got), _host(want)
    assert got.shape == want.shape, what
    tau_grad = what.endswith(("vjp[1]", "and_vjp[2]"))
    if prone and what in ("logits vjp[1]", "logits and_vjp[2]"):
        # the documented overflow of the logits' grad_tau sum: NaN or an infinity on
        # either side, depending on the order each one sums in
        either = ~(np.isfinite(got) & np.isfinite(want))
        got, want = np.where(either, 0.0, got), np.where(either, 0.0, want)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=what)
    np.testing.assert_array_equal(got == np.inf, want == np.inf, err_msg=what)
    np.testing.assert_array_equal(got == -np.inf, want == -np.inf, err_msg=what)
    fin = np.isfinite(want)
    g, w = got[fin], want[fin]
    if not w.size:
        return
    tol = TOL[dt]
    # grad_tau: one sum over a whole row or array of terms that cancel; NumPy's hook takes
    # a float32 BLAS dot, the generic code a pairwise sum (1.3313 vs 1.3316 on 5 x 66003,
    # the float64 sum 1.3316, sum(|s z|) 4e4)
    rtol = min(300 * tol, 0.05) if tau_grad else 4 * tol
    # a tied entry's s - sum(s) / 2 cancels: its error scales with the array's largest value
    atol = 16 * tol * np.abs(w).max()
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=what)


def _compare(library: str, draw: Draw, rng: np.random.Generator, bf16: bool = False) -> None:
    fast = get_backend(library)
    generic = dataclasses.replace(fast, soft=None, select_candidates=None)
    x = _odd_layout(draw.x, rng)
    kw = {n: _odd_layout(v, rng) for n, v in draw.kw.items()}
    g = _odd_layout(rng.standard_normal(x.shape).astype(x.dtype), rng)
    u = _odd_layout(rng.standard_normal(x.shape).astype(x.dtype), rng)
    tau = kw.get("tau", 1.0)
    dtau = 0.3 if isinstance(tau, float) else (rng.random(np.shape(tau)) - 0.5).astype(tau.dtype)
    k = draw.k
    dt = str(x.dtype)
    if library == "torch":
        x, g, u = (_to_torch(a, bf16) for a in (x, g, u))
        k, dtau = _to_torch(k), _to_torch(dtau)
        kw = {n: _to_torch(v) for n, v in kw.items()}
        dt = "bfloat16" if bf16 else dt
    elif library == "jax":
        x, g, u, k, dtau = (_to_jax(a) for a in (x, g, u, k, dtau))
        kw = {n: _to_jax(v) for n, v in kw.items()}
    with np.errstate(all="ignore"):
        got = _calls(x, k, g, u, dtau, kw)
        register_backend(library, generic)
        try:
            want = _calls(x, k, g, u, dtau, kw)
        finally:
            register_backend(library, fast)
    assert got.keys() == want.keys()
    for name, values in want.items():
        if isinstance(values, str):
            assert got[name] == values, name
            continue
        for i, (a, b) in enumerate(zip(got[name], values, strict=True)):
            _agree(a, b, dt, f"{name}[{i}]", draw.overflow_prone)


@pytest.mark.parametrize("library", ["numpy", "torch", "torch-bfloat16", "jax"])
def test_soft_hooks_match_the_generic_code_on_random_draws(library):
    if library.startswith(("torch", "jax")):
        pytest.importorskip(library.split("-")[0])
    bf16 = library == "torch-bfloat16"
    lib = library.split("-")[0]
    rng = np.random.default_rng([SEED, len(library)])
    # JAX compiles per shape (its hook's programs and, op by op, the generic code's):
    # fewer draws, on a few shapes (TOPK_FUZZ_CASES still scales them)
    cases = max(1, CASES // 40) if lib == "jax" else CASES
    failures = []
    for i in range(cases):
        draw = _draw(rng, few_shapes=lib == "jax")
        if bf16 and draw.x.dtype != np.float32:
            continue
        try:
            _compare(lib, draw, rng, bf16)
        except AssertionError as e:
            kw = {n: (v if np.ndim(v) == 0 else f"array{np.shape(v)}") for n, v in draw.kw.items()}
            failures.append(f"draw {i}: {draw.x.shape} {draw.x.dtype} k={draw.k!r:.20} {kw}: {e}")
    assert not failures, "\n".join(f[:600] for f in failures[:5])
