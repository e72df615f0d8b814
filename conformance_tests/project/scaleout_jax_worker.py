"""Checks of ``group=`` on JAX, run in a subprocess with 8 simulated CPU devices.

``python conformance_tests/project/scaleout_jax_worker.py`` (the parent sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8``) runs every check in
:data:`CASES` and prints one JSON line ``{name: {"ok": bool, "detail": str}}``
after the marker :data:`MARKER`.  Each check compares the sharded result
(``shard_map`` over the selection axis, ``group=``) with the single-device one
on the same data.  Importing this module imports no framework.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable

MARKER = "SCALEOUT-JAX-RESULTS "
DEVICES = 8

CASES = [
    "forward",
    "threshold",
    "axis0_largest_false",
    "mask_per_row_k",
    "ties_across_shards",
    "hard_straight_through",
    "infinities_nan",
    "grad_outer",
    "grad_inside_shard_map",
    "closed_form_vjp_jvp",
    "second_order",
    "vmap_batch_axis",
    "tuple_axis_names",
    "dtypes",
    "batch_sharded_without_group",
    "hlo_collectives_independent_of_n",
    "size_one_axis",
    "errors",
]


def _setup():
    import jax
    from jax.sharding import PartitionSpec as P

    global SX
    SX = P(None, "d")
    jax.config.update("jax_enable_x64", True)
    if jax.device_count() != DEVICES:
        raise RuntimeError(f"expected {DEVICES} devices, got {jax.device_count()}")


def _close(got, want, atol, what):
    import numpy as np

    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {got.shape} != {want.shape}")
    same_nan = np.array_equal(np.isnan(got), np.isnan(want))
    fin = np.isfinite(want)
    same_inf = np.array_equal(got[~fin & ~np.isnan(want)], want[~fin & ~np.isnan(want)])
    err = float(np.max(np.abs(got[fin] - want[fin]) / np.maximum(1, np.abs(want[fin])), initial=0))
    if not (same_nan and same_inf and err <= atol):
        raise AssertionError(
            f"{what}: max rel error {err:.3g} (tol {atol}), nan/inf equal: {same_nan}/{same_inf}"
        )
    return err


class _Mesh:
    """A mesh and a helper that runs ``fn`` under ``jit(shard_map(...))``."""

    def __init__(self, shape=(DEVICES,), names=("d",)):
        import jax

        self.mesh = jax.make_mesh(shape, names)

    def run(self, fn, args, in_specs, out_specs, jit=True):
        import jax
        from jax.sharding import NamedSharding

        args = [jax.device_put(a, NamedSharding(self.mesh, s)) for a, s in zip(args, in_specs)]
        f = jax.shard_map(fn, mesh=self.mesh, in_specs=tuple(in_specs), out_specs=out_specs)
        return (jax.jit(f) if jit else f)(*args)

    def put(self, a, spec):
        import jax
        from jax.sharding import NamedSharding

        return jax.device_put(a, NamedSharding(self.mesh, spec))


def _data(shape, seed=0, dtype="float32"):
    import jax.numpy as jnp
    import numpy as np

    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _compare(m, body, args, in_specs, out_specs, tol, group="d"):
    """``body(group, *args)`` (a tuple of outputs) sharded vs ``body(None, *args)`` on one device.

    One compiled program each, whatever the number of outputs.  ``tol`` is one
    tolerance or one per output.
    """
    import jax

    want = jax.jit(lambda *a: body(None, *a))(*args)
    got = m.run(lambda *a: body(group, *a), args, in_specs, tuple(out_specs))
    tols = tol if isinstance(tol, (tuple, list)) else [tol] * len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if g.dtype != w.dtype:
            raise AssertionError(f"output {i}: dtype {g.dtype}, single device {w.dtype}")
    errs = [_close(g, w, t, f"output {i}") for i, (g, w, t) in enumerate(zip(got, want, tols))]
    return f"{len(errs)} outputs, max err {max(errs):.2g}"


SX = None  # P(None, "d"), set in _setup


# ---------------------------------------------------------------- checks


def check_forward():
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import topk_core as tk

    # one row per k (a per-row k covers many ranks in one selection), plus a static k
    k_rows = jnp.asarray([0, 1, 5, 100, 295, 296])

    def body(g, x, k):
        return (
            tk.dftopk(x, k, tau=0.3, group=g),
            tk.dftopk_logits(x, k, tau=0.3, group=g),
            tk.dftopk(x, 100, tau=0.3, group=g),
            tk.dftopk_logits(x, 296, group=g),
        )

    m = _Mesh()
    x = _data((6, 8 * 37))
    summary = _compare(m, body, [x, k_rows], [SX, P()], [SX] * 4, 1e-6)
    # without jit: shard_map alone
    got = m.run(lambda x: tk.dftopk(x, 7, group="d"), [x], [SX], SX, jit=False)
    _close(got, tk.dftopk(x, 7), 1e-6, "eager shard_map")
    return summary + " (+ an eager shard_map)"


def check_threshold():
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import topk_core as tk

    k_rows = jnp.asarray([0, 3, 120, 200])

    def body(g, x, k):
        return (
            tk.topk_threshold(x, k, group=g),
            tk.topk_threshold(x, k, largest=False, group=g),
            tk.topk_threshold(x, 3, group=g),
        )

    # out_specs P(): shard_map checks that every shard holds the same value
    x = _data((4, 8 * 25), seed=1)
    summary = _compare(_Mesh(), body, [x, k_rows], [SX, P()], [P()] * 3, 0)
    return summary + ", replicated"


def check_axis0_largest_false():
    from jax.sharding import PartitionSpec as P

    import topk_core as tk

    def body(g, x):
        out = []
        for k in (33, 159):
            out.append(tk.dftopk(x, k, axis=0, largest=False, tau=0.5, group=g))
            out.append(tk.topk_mask(x, k, axis=0, largest=False, group=g))
        return tuple(out)

    s0 = P("d", None)
    summary = _compare(_Mesh(), body, [_data((8 * 20, 3), seed=2)], [s0], [s0] * 4, 1e-6)
    return summary


def check_mask_per_row_k():
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import topk_core as tk

    rng = np.random.default_rng(3)
    x = _data((5, 8 * 16), seed=3)
    mask = jnp.asarray(rng.random((5, 128)) > 0.4).at[4].set(False)  # row 4: nothing valid
    k = jnp.asarray([0, 10, 40, 128, 3])  # 128 > n_valid: clipped

    def body(g, x, mk, k):
        return (
            tk.dftopk(x, k, mask=mk, tau=0.2, group=g),
            tk.dftopk_logits(x, k, mask=mk, tau=0.2, group=g),
            tk.topk_threshold(x, k, mask=mk, group=g),
            tk.topk_mask(x, k, mask=mk, group=g),
            # scalar k with a mask: clipped per row to the global valid count
            tk.dftopk(x, 60, mask=mk, group=g),
        )

    summary = _compare(
        _Mesh(), body, [x, mask, k], [SX, SX, P()], [SX, SX, P(), SX, SX], [1e-6, 1e-6, 0, 0, 1e-6]
    )
    return summary


def check_ties_across_shards():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import topk_core as tk

    rng = np.random.default_rng(4)
    # 4 distinct values over 8 shards of 12: every tie group spans every shard
    x = jnp.asarray(rng.integers(0, 4, (6, 96)).astype(np.float32))
    mask = jnp.asarray(rng.random((6, 96)) > 0.25)
    w = _data((6, 96), seed=5)
    k_rows = jnp.asarray([1, 13, 24, 48, 60, 95])

    def body(g, x, mk, w, k):
        out = [
            tk.topk_mask(x, k, largest=lg, mask=m, group=g)
            for lg in (True, False)
            for m in (None, mk)
        ]
        out.append(tk.topk_mask(x, 40, group=g))
        # gradients with ties: the tie weights split across shards
        out.append(jax.grad(lambda x: jnp.sum(w * tk.dftopk(x, k, tau=0.7, group=g)))(x))
        out.append(tk.dftopk_vjp(x, 48, w, mask=mk, group=g)[0])
        return tuple(out)

    args = [x, mask, w, k_rows]
    summary = _compare(_Mesh(), body, args, [SX] * 3 + [P()], [SX] * 7, [0] * 5 + [2e-5] * 2)
    return summary + ": 5 topk_mask (6 ranks each), 2 gradients"


def check_hard_straight_through():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import topk_core as tk

    rng = np.random.default_rng(14)
    # tie groups spanning every shard: the hard mask keeps the lower global index first
    x = jnp.asarray(rng.integers(0, 5, (4, 96)).astype(np.float32))
    mask = jnp.asarray(rng.random((4, 96)) > 0.2)
    w = _data((4, 96), seed=15)
    k_rows = jnp.asarray([3, 20, 47, 90])

    def body(g, x, mk, w, k):
        return (
            tk.dftopk(x, k, tau=0.6, mask=mk, group=g, hard=True),
            tk.dftopk(x, 30, largest=False, group=g, hard=True),
            # straight-through: the hard forward's gradient is the soft p's
            jax.grad(lambda x: jnp.sum(w * tk.dftopk(x, k, tau=0.6, group=g, hard=True)))(x),
            jax.grad(lambda x: jnp.sum(w * tk.dftopk(x, k, tau=0.6, group=g)))(x),
        )

    args = [x, mask, w, k_rows]
    summary = _compare(_Mesh(), body, args, [SX] * 3 + [P()], [SX] * 4, [0, 0, 2e-5, 2e-5])
    return summary + ": 2 hard masks with cross-shard ties, hard and soft gradients"


def check_infinities_nan():
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import topk_core as tk

    inf = np.inf
    x = np.zeros((5, 16), np.float32)
    x[0, [0, 9]] = inf  # two +inf on two shards
    x[1, 3] = inf
    x[1, 12] = -inf
    x[2, :] = -inf
    x[2, [2, 15]] = [1.0, 2.0]
    x[3, 7] = np.nan  # propagates
    x[4] = np.arange(16)[::-1]
    ks = (0, 1, 2, 16)
    # every pattern with every k, one row each: one selection covers them all
    xt = jnp.asarray(np.tile(x, (len(ks), 1)))
    k_rows = jnp.asarray(np.repeat(ks, len(x)))

    def body(g, x, k):
        return (
            tk.dftopk(x, k, tau=0.5, group=g),
            tk.dftopk_logits(x, k, group=g),
            tk.topk_mask(x, k, group=g),
            tk.dftopk(x, 1, group=g),
        )

    summary = _compare(_Mesh(), body, [xt, k_rows], [SX, P()], [SX] * 4, 1e-6)
    p = tk.dftopk(jnp.asarray(x), 1)
    if not bool(jnp.all(jnp.isnan(p[3]))) or float(p[0, 0]) != 0.5:
        raise AssertionError(f"reference semantics: {p}")
    return summary


def check_grad_outer():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import topk_core as tk

    m = _Mesh()
    x = _data((3, 8 * 30), seed=6)
    w = _data((3, 240), seed=7)
    mask = jnp.asarray(np.random.default_rng(8).random((3, 240)) > 0.3)
    tau = jnp.asarray([[0.2], [0.5], [1.5]])
    cases = [(k, fn) for k in (1, 50, 239) for fn in (tk.dftopk, tk.dftopk_logits)]

    def terms(g, x, t, mk, w):
        return sum(jnp.sum(w * fn(x, k, tau=t, mask=mk, group=g)) for k, fn in cases)

    def single(x, t):
        return terms(None, x, t, mask, w)

    def sharded(x, t):
        f = jax.shard_map(
            lambda x, t, mk, w: jnp.reshape(terms("d", x, t, mk, w), (1, 1)),
            mesh=m.mesh,
            in_specs=(SX, P(), SX, SX),
            out_specs=SX,
        )
        return jnp.sum(f(x, t, m.put(mask, SX), m.put(w, SX)))

    want = jax.jit(jax.grad(single, argnums=(0, 1)))(x, tau)
    got = jax.jit(jax.grad(sharded, argnums=(0, 1)))(m.put(x, SX), m.put(tau, P()))
    _close(got[0], want[0], 2e-5, "grad x")
    _close(got[1], want[1], 2e-5, "grad per-row tau")
    return "grad x and per-row tau (replicated), probs and logits, mask, 3 k"


def check_grad_inside_shard_map():
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import topk_core as tk

    def body(g, x, w, t):
        return jax.grad(lambda x, t: jnp.sum(w * tk.dftopk(x, 17, tau=t, group=g)), argnums=(0, 1))(
            x, t
        )

    args = [_data((2, 8 * 20), seed=9), _data((2, 160), seed=10), jnp.asarray(0.4)]
    summary = _compare(_Mesh(), body, args, [SX, SX, P()], [SX, P()], 2e-5)
    return summary + ": grad x and a replicated tau"


def check_closed_form_vjp_jvp():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import topk_core as tk

    x = _data((3, 8 * 24), seed=11)
    w = _data((3, 192), seed=12)
    u = _data((3, 192), seed=13)
    mask = jnp.asarray(np.random.default_rng(14).random((3, 192)) > 0.2)
    tau_row = jnp.asarray([[0.3], [1.0], [2.0]])
    tau_full = jnp.abs(_data((3, 192), seed=15)) + 0.1
    k_rows = jnp.asarray([5, 96, 191])

    def body(g, x, w, u, mk, k_rows, tau_row, tau_full):
        out = []
        # float tau; a per-row tau (replicated: its gradient is the whole axis's); a tau
        # with the full axis (sharded like x: each shard gets its slice of the gradient)
        for t, tt, output, k in (
            (0.6, None, "probs", k_rows),
            (tau_row, tau_row * 0 + 0.25, "logits", 5),
            (tau_full, tau_full * 0 - 0.5, "probs", 96),
        ):
            kw = dict(tau=t, mask=mk, output=output, group=g)
            # grad_tau is this shard's share: psum it for a tau shared by the shards
            share = jax.lax.psum if g is not None and t is not tau_full else lambda v, _: v
            gx, gt = tk.dftopk_vjp(x, k, w, **kw)
            out += [gx, share(gt, g)]
            out += tk.dftopk_jvp(x, k, u, tau_tangent=tt, **kw)
            p, vjp = tk.dftopk_and_vjp(x, k, **kw)
            gx, gt = vjp(w)
            out += [p, gx, share(gt, g)]
        return tuple(out)

    specs = [[SX, gs, SX, SX, SX, SX, gs] for gs in (P(), P(), SX)]
    args = [x, w, u, mask, k_rows, tau_row, tau_full]
    summary = _compare(
        _Mesh(), body, args, [SX] * 4 + [P(), P(), SX], [s for group in specs for s in group], 2e-5
    )
    return summary + ": float / per-row / full tau; vjp, jvp, and_vjp"


def check_second_order():
    import jax
    import jax.numpy as jnp

    import topk_core as tk

    m = _Mesh()
    x = _data((2, 8 * 12), seed=16)
    w = _data((2, 96), seed=17)
    v = _data((2, 96), seed=18)

    def single(x):
        return jnp.sum(w * tk.dftopk(x, 30, tau=0.5) ** 2)

    def sharded(x):
        f = jax.shard_map(
            lambda x, w: w * tk.dftopk(x, 30, tau=0.5, group="d") ** 2,
            mesh=m.mesh,
            in_specs=(SX, SX),
            out_specs=SX,
        )
        return jnp.sum(f(x, m.put(w, SX)))

    want = jax.jit(lambda x, v: jax.jvp(jax.grad(single), (x,), (v,))[1])(x, v)
    got = jax.jit(lambda x, v: jax.jvp(jax.grad(sharded), (x,), (v,))[1])(
        m.put(x, SX), m.put(v, SX)
    )
    _close(got, want, 2e-5, "hessian-vector product")
    return "forward-over-reverse"


def check_vmap_batch_axis():
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import topk_core as tk

    x = _data((4, 8 * 16), seed=19)
    k_rows = jnp.asarray([1, 20, 64, 127])

    def body(g, x, k):
        return (
            jax.vmap(lambda r: tk.dftopk(r, 20, tau=0.3, group=g))(x),
            jax.vmap(lambda r, kr: tk.dftopk(r, kr, tau=0.3, group=g))(x, k),
            jax.vmap(lambda r, kr: tk.topk_mask(jnp.round(r), kr, group=g))(x, k),
        )

    summary = _compare(_Mesh(), body, [x, k_rows], [SX, P()], [SX] * 3, [1e-6, 1e-6, 0])
    return summary


def check_tuple_axis_names():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import topk_core as tk

    m = _Mesh((4, 2), ("a", "b"))
    spec = P(None, ("a", "b"))
    x = jnp.asarray(np.random.default_rng(20).integers(0, 6, (3, 64)).astype(np.float32))
    w = _data((3, 64), seed=21)

    def body(g, x, w):
        out = []
        for k in (5, 31):
            out.append(tk.topk_mask(x, k, group=g))
            out.append(tk.dftopk(x, k, group=g))
            out.append(jax.grad(lambda x, k=k: jnp.sum(w * tk.dftopk(x, k, group=g)))(x))
        return tuple(out)

    summary = _compare(m, body, [x, w], [spec, spec], [spec] * 6, [0, 1e-6, 2e-5] * 2, ("a", "b"))
    # selection axis sharded over "b" only, rows over "a": 4 groups of 2 shards
    ab = P("a", "b")

    def body2(g, x):
        return (tk.dftopk(x, 9, group=g), tk.topk_mask(jnp.round(x), 9, group=g))

    summary2 = _compare(m, body2, [_data((8, 40), seed=22)], [ab], [ab, ab], [1e-6, 0], "b")

    # second order there: the tie counts' zero tangents vary over "a" like the rows
    # (a float0 NumPy zero did not: JAX rejected the selection's JVP rule)
    def hvp(g, x, v):
        f = lambda x: jnp.sum(v * tk.dftopk(x, 9, tau=0.5, group=g) ** 2)  # noqa: E731
        return (jax.jvp(jax.grad(f), (x,), (v,))[1],)

    summary3 = _compare(
        m, hvp, [_data((8, 40), seed=23), _data((8, 40), seed=24)], [ab] * 2, [ab], 2e-4, "b"
    )
    return f"{summary}; axis over b only: {summary2}; its hvp: {summary3}"


def check_dtypes():
    import jax.numpy as jnp
    import numpy as np

    import topk_core as tk

    base = np.random.default_rng(23).standard_normal((2, 8 * 10))
    base[0, :10] = base[0, 40:50]  # ties across shards
    dtypes = ("float64", "float16", "bfloat16")
    xs = [jnp.asarray(base).astype(dt) for dt in dtypes]

    def body(g, *xs):
        return tuple(
            f for x in xs for f in (tk.dftopk(x, 41, tau=0.4, group=g), tk.topk_mask(x, 3, group=g))
        )

    _compare(_Mesh(), body, xs, [SX] * 3, [SX] * 6, [1e-12, 0, 1e-3, 0, 8e-3, 0])
    return ", ".join(dtypes) + ": output dtypes equal x's"


def check_batch_sharded_without_group():
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    import topk_core as tk

    x = _data((16, 300), seed=24)
    w = _data((16, 300), seed=25)
    k = jnp.arange(16) * 19
    mask = x > -1.0

    def f(x, k, mk):
        return (
            tk.dftopk(x, 30, tau=0.5),
            tk.dftopk(x, k, mask=mk),
            jax.grad(lambda x: jnp.sum(w * tk.dftopk(x, 30, tau=0.5)))(x),
        )

    want = jax.jit(f)(x, k, mask)
    specs = []
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        m = _Mesh()
        m.mesh = jax.make_mesh((DEVICES,), ("d",), axis_types=(axis_type,))
        s0 = P("d", None)
        got = jax.jit(f)(m.put(x, s0), m.put(k, P("d")), m.put(mask, s0))
        for g, wv, t in zip(got, want, (1e-6, 1e-6, 2e-5)):
            _close(g, wv, t, f"{axis_type}")
            if g.sharding.spec[0] != "d":
                raise AssertionError(f"{axis_type}: output sharding {g.sharding}")
        specs.append(f"{axis_type}: {got[2].sharding.spec}")
    return "; ".join(specs)


def _collectives_of(fn, x, m, spec):
    import jax

    # the repository root (benchmarks/ is not installed), two folders above project/
    here = os.path.abspath(__file__)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(here))))
    from benchmarks.scaleout import collectives

    f = jax.jit(jax.shard_map(fn, mesh=m.mesh, in_specs=(spec,), out_specs=spec))
    return collectives(f.lower(m.put(x, spec)).compile().as_text())


def check_hlo_collectives_independent_of_n():
    import jax
    import jax.numpy as jnp

    import topk_core as tk

    m = _Mesh()
    rows = 4

    def grad_masked(x):
        k = jnp.full((rows,), 77)

        def loss(x):
            return jnp.sum(tk.dftopk(x, k, mask=x > -1, group="d") ** 2)

        return jax.grad(loss)(x)

    lines = []
    for name, fn in (
        ("forward", lambda x: tk.dftopk(x, 100, group="d")),
        ("grad, mask, per-row k", grad_masked),
        ("topk_mask", lambda x: tk.topk_mask(x, 100, group="d")),
    ):
        seen = []
        for n in (2**12, 2**16):
            c = _collectives_of(fn, jnp.zeros((rows, n), jnp.float32), m, SX)
            if not c:
                raise AssertionError(f"{name}: no collective at n={n}")
            seen.append(sorted((x.op, x.arrays) for x in c))
            for col in c:
                # the largest operands are the per-row histograms (256 bins of 8-bit digits)
                for _dt, shape in col.arrays:
                    if math.prod(shape) > rows * 256:
                        raise AssertionError(f"{name}: collective {col} at n={n}")
        if seen[0] != seen[1]:
            raise AssertionError(f"{name}: collectives differ: {seen[0]} vs {seen[1]}")
        lines.append(f"{name}: {len(c)} collectives, {sum(x.nbytes for x in c)} B")
    return "; ".join(lines)


def check_size_one_axis():
    """A mesh axis of size 1 as the group: the single-device selection, results typed
    as the group's (replicated thresholds), same values and gradients."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import topk_core as tk

    m = _Mesh((DEVICES, 1), ("d", "m"))
    spec = P("d", "m")
    n = 2**16  # long rows: 16-bit digits on the single-device path
    x = _data((DEVICES, n), seed=30)
    x = x.at[:, :5].set(jnp.inf).at[0, 7:11].set(x[0, 100])  # infinities and ties
    w = _data((DEVICES, n), seed=31)
    k_rows = jnp.arange(1, DEVICES + 1) * 997

    def body(g, x, w, k):
        return (
            tk.dftopk(x, k, group=g),
            tk.topk_mask(x, 1234, group=g),
            tk.dftopk(x, 1234, hard=True, group=g),
            jax.grad(lambda x: jnp.sum(w * tk.dftopk(x, k, tau=0.3, group=g)))(x),
            jax.grad(lambda x: jnp.sum(w * tk.dftopk(x, k, mask=w > -1, group=g)))(x),
            tk.topk_threshold(x, k, group=g),
        )

    summary = _compare(
        m,
        body,
        [x, w, k_rows],
        [spec, spec, P("d")],
        [spec] * 5 + [P("d")],  # the thresholds: the same on the one member of "m"
        [1e-6, 0, 0, 2e-5, 2e-5, 0],
        "m",
    )

    # second order through the shortcut
    def hvp(g, x, w):
        f = lambda x: jnp.sum(w * tk.dftopk(x, 50, tau=0.5, group=g) ** 2)  # noqa: E731
        return (jax.jvp(jax.grad(f), (x,), (w,))[1],)

    small = _data((DEVICES, 64), seed=32)
    summary2 = _compare(
        m, hvp, [small, _data((DEVICES, 64), seed=33)], [spec] * 2, [spec], 2e-4, "m"
    )

    def scatters(fn):
        f = jax.jit(jax.shard_map(fn, mesh=m.mesh, in_specs=(spec,), out_specs=spec))
        return f.lower(m.put(x, spec)).compile().as_text().count(" scatter(")

    alone = jax.jit(lambda r: tk.dftopk(r, 1234)).lower(x[:1]).compile().as_text()
    got, want = scatters(lambda r: tk.dftopk(r, 1234, group="m")), alone.count(" scatter(")
    if got != want:
        raise AssertionError(f"group of one: {got} scatters, the single-device program {want}")
    return f"{summary}; second order: {summary2}; {got} scatters as alone"


def check_errors():
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import topk_core as tk

    m = _Mesh()
    x = _data((2, 64), seed=26)

    def expect(exc, text, fn):
        try:
            fn()
        except exc as e:
            if text not in str(e):
                raise AssertionError(f"{exc.__name__} without {text!r}: {e}") from None
            return str(e)
        raise AssertionError(f"no {exc.__name__} ({text!r})")

    msgs = [
        expect(ValueError, "shard_map", lambda: tk.dftopk(x, 3, group="d")),
        expect(TypeError, "mesh axis name", lambda: tk.dftopk(x, 3, group=7)),
        expect(
            ValueError,
            "64",
            lambda: m.run(lambda x: tk.dftopk(x, 65, group="d"), [x], [P(None, "d")], P(None, "d")),
        ),
        expect(TypeError, "dask", lambda: tk.dftopk(np.ones((2, 8)), 3, group="d")),
    ]
    # k above the local length but within the global one is fine
    got = m.run(lambda x: tk.dftopk(x, 64, group="d"), [x], [P(None, "d")], P(None, "d"))
    _close(got, tk.dftopk(x, 64), 1e-6, "k = global n")
    _ = jnp
    return " | ".join(s[:60] for s in msgs)


def main() -> int:
    _setup()
    checks: dict[str, Callable[[], str]] = {name: globals()["check_" + name] for name in CASES}
    only = set(sys.argv[1:])
    out = {}
    for name, fn in checks.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception:
            detail, ok = traceback.format_exc(limit=6), False
        out[name] = {"ok": ok, "detail": detail, "seconds": round(time.perf_counter() - t0, 1)}
    print(MARKER + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
