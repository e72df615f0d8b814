"""Checks of ``group=`` on torch.distributed: 4 gloo processes on 127.0.0.1.

``python conformance_tests/project/scaleout_torch_worker.py`` spawns :data:`WORLD`
ranks (``torch.multiprocessing``, start method ``spawn``), each runs every
check in :data:`CASES` on its shard (unequal shard lengths) and compares with
the single-process result on the whole axis; the launcher prints one JSON
line ``{name: {"ok": bool, "detail": str}}`` after :data:`MARKER` (a check
passes when it passes on every rank).  Every wait is bounded: the process
group's timeout, and the launcher kills the ranks after :data:`DEADLINE_S`.
Importing this module imports no framework.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import tempfile
import time
import traceback

MARKER = "SCALEOUT-TORCH-RESULTS "
WORLD = 4
DEADLINE_S = 240
PG_TIMEOUT_S = 30

CASES = [
    "forward_threshold",
    "mask_per_row_k",
    "ties_topk_mask",
    "hard_straight_through",
    "autograd_backward",
    "closed_form_vjp_jvp",
    "forward_mode_ad",
    "double_backward",
    "dtypes",
    "infinities_nan",
    "empty_shard",
    "communication_independent_of_n",
    "errors",
    "torch_compile",
    "torch_func_transforms",
    "group_of_one",
]

# shard boundaries of a length-100 axis: unequal on purpose
CUTS = [0, 13, 40, 41, 100]


def _cuts(n):
    return [c * n // 100 for c in CUTS]


class Ctx:
    def __init__(self, rank):
        import torch.distributed as dist

        self.rank = rank
        self.group = dist.group.WORLD

    def shard(self, t, axis=-1, cuts=None):
        n = t.shape[axis]
        c = cuts or _cuts(n)
        return t.narrow(axis, c[self.rank], c[self.rank + 1] - c[self.rank]).clone()


_MISMATCHES: list[str] = []


def _close(got, want, tol, what):
    """Compare; a mismatch is recorded, not raised, so that every rank keeps making the
    same collective calls (an early raise on one rank would desynchronise the others)."""
    try:
        return _compare(got, want, tol, what)
    except AssertionError as exc:
        _MISMATCHES.append(str(exc))
        return float("inf")


def _compare(got, want, tol, what):
    import torch

    got = got.detach().to(torch.float64)
    want = want.detach().to(torch.float64)
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    if not torch.equal(got.isnan(), want.isnan()):
        raise AssertionError(f"{what}: NaN positions differ")
    fin = want.isfinite()
    if not torch.equal(got[~fin & ~want.isnan()], want[~fin & ~want.isnan()]):
        raise AssertionError(f"{what}: infinities differ")
    err = ((got[fin] - want[fin]).abs() / want[fin].abs().clamp(min=1)).max() if fin.any() else 0
    err = float(err)
    if err > tol:
        raise AssertionError(f"{what}: max rel error {err:.3g} > {tol}")
    return err


def _data(shape, seed, dtype=None):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype or torch.float32)


# ---------------------------------------------------------------- checks


def check_forward_threshold(c):
    import topk_core as tk

    x = _data((3, 100), 0)
    xs = c.shard(x)
    n = 0
    for k in (0, 1, 50, 99, 100):
        for largest in (True, False):
            for fn in (tk.dftopk, tk.dftopk_logits):
                got = fn(xs, k, tau=0.3, largest=largest, group=c.group)
                _close(got, c.shard(fn(x, k, tau=0.3, largest=largest)), 1e-6, fn.__name__)
            got = tk.topk_threshold(xs, k, largest=largest, group=c.group)
            _close(got, tk.topk_threshold(x, k, largest=largest), 0, "threshold")
            n += 3
    # selection along axis 0
    x0 = _data((100, 4), 1)
    got = tk.dftopk(c.shard(x0, 0), 17, axis=0, group=c.group)
    _close(got, c.shard(tk.dftopk(x0, 17, axis=0), 0), 1e-6, "axis=0")
    return f"{n + 1} comparisons"


def check_mask_per_row_k(c):
    import torch

    import topk_core as tk

    x = _data((4, 100), 2)
    mask = _data((4, 100), 3) > -0.5
    mask[3] = False  # nothing valid
    k = torch.tensor([0, 10, 100, 5])  # 100 > n_valid: clipped
    xs, ms = c.shard(x), c.shard(mask)
    for fn in (tk.dftopk, tk.dftopk_logits):
        _close(fn(xs, k, mask=ms, group=c.group), c.shard(fn(x, k, mask=mask)), 1e-6, "per-row k")
        _close(fn(xs, 60, mask=ms, group=c.group), c.shard(fn(x, 60, mask=mask)), 1e-6, "scalar")
    _close(
        tk.topk_threshold(xs, k, mask=ms, group=c.group), tk.topk_threshold(x, k, mask=mask), 0, "t"
    )
    got = tk.topk_mask(xs, k, mask=ms, group=c.group)
    _close(got, c.shard(tk.topk_mask(x, k, mask=mask)), 0, "topk_mask")
    return "ok"


def check_ties_topk_mask(c):
    import torch

    import topk_core as tk

    x = torch.randint(0, 4, (3, 100), generator=torch.Generator().manual_seed(4)).float()
    mask = _data((3, 100), 5) > -1
    xs, ms = c.shard(x), c.shard(mask)
    n = 0
    for k in (1, 13, 40, 64, 99):
        for largest in (True, False):
            for m, mfull in ((None, None), (ms, mask)):
                got = tk.topk_mask(xs, k, mask=m, largest=largest, group=c.group)
                want = c.shard(tk.topk_mask(x, k, mask=mfull, largest=largest))
                _close(got, want, 0, f"topk_mask k={k}")
                n += 1
    return f"{n} masks, ties across every shard boundary"


def check_hard_straight_through(c):
    import torch

    import topk_core as tk

    # tie groups across every shard boundary: the hard mask keeps the lower global index
    x = torch.randint(0, 5, (3, 100), generator=torch.Generator().manual_seed(14)).float()
    w = _data((3, 100), 15)
    mask = _data((3, 100), 16) > -1
    n = 0
    for k in (1, 40, 99):
        xs = c.shard(x).requires_grad_(True)
        out = tk.dftopk(xs, k, tau=0.6, mask=c.shard(mask), group=c.group, hard=True)
        (out * c.shard(w)).sum().backward()
        xf = x.clone().requires_grad_(True)
        want = tk.dftopk(xf, k, tau=0.6, mask=mask, hard=True)
        (want * w).sum().backward()
        _close(out.detach(), c.shard(want.detach()), 0, f"hard forward k={k}")
        _close(xs.grad, c.shard(xf.grad), 2e-5, f"hard (soft) gradient k={k}")
        n += 1
    return f"{n} hard masks with cross-shard ties, their straight-through gradients"


def check_autograd_backward(c):
    import torch
    import torch.distributed as dist

    import topk_core as tk

    x = _data((3, 100), 6)
    x[0, :50] = torch.round(x[0, :50])  # ties in the gradient's weights
    w = _data((3, 100), 7)
    mask = _data((3, 100), 8) > -1
    tau = torch.tensor([[0.2], [0.5], [1.5]])
    for fn in (tk.dftopk, tk.dftopk_logits):
        for k in (1, 30, 99):
            xs = c.shard(x).requires_grad_(True)
            ts = tau.clone().requires_grad_(True)
            out = fn(xs, k, tau=ts, mask=c.shard(mask), group=c.group)
            (out * c.shard(w)).sum().backward()
            xf = x.clone().requires_grad_(True)
            tf = tau.clone().requires_grad_(True)
            (fn(xf, k, tau=tf, mask=mask) * w).sum().backward()
            _close(xs.grad, c.shard(xf.grad), 2e-5, f"{fn.__name__} grad x k={k}")
            # tau's gradient is this rank's share: they add up to the whole
            gt = ts.grad.clone()
            dist.all_reduce(gt, group=c.group)
            _close(gt, tf.grad, 2e-5, f"{fn.__name__} grad tau k={k}")
    # float tau
    xs = c.shard(x).requires_grad_(True)
    (tk.dftopk(xs, 40, tau=0.7, group=c.group) * c.shard(w)).sum().backward()
    xf = x.clone().requires_grad_(True)
    (tk.dftopk(xf, 40, tau=0.7) * w).sum().backward()
    _close(xs.grad, c.shard(xf.grad), 2e-5, "float tau")
    return "grad x; the ranks' shares of a shared per-row tau add up to its gradient"


def check_closed_form_vjp_jvp(c):
    import torch
    import torch.distributed as dist

    import topk_core as tk

    x = _data((3, 100), 9)
    w = _data((3, 100), 10)
    u = _data((3, 100), 11)
    mask = _data((3, 100), 12) > -1
    tau_row = torch.tensor([[0.3], [1.0], [2.0]])
    tau_full = _data((3, 100), 13).abs() + 0.1
    n = 0
    for tau, tau_s, sharded in (
        (0.6, 0.6, False),
        (tau_row, tau_row, False),
        (tau_full, None, True),
    ):
        if sharded:
            tau_s = c.shard(tau_full)
        for output in ("probs", "logits"):
            for k in (5, 70):
                kw = dict(mask=mask, output=output, tau=tau)
                kws = dict(mask=c.shard(mask), output=output, tau=tau_s, group=c.group)
                gx, gt = tk.dftopk_vjp(c.shard(x), k, c.shard(w), **kws)
                wx, wt = tk.dftopk_vjp(x, k, w, **kw)
                _close(gx, c.shard(wx), 2e-5, "vjp x")
                if not sharded and isinstance(tau, torch.Tensor):
                    dist.all_reduce(gt, group=c.group)  # shares of a shared tau
                elif not sharded:
                    gt = gt.reshape(1)
                    dist.all_reduce(gt, group=c.group)
                    gt = gt[0]
                _close(gt, c.shard(wt) if sharded else wt, 2e-5, "vjp tau")
                tt = None if isinstance(tau, float) else tau * 0 + 0.25
                tts = None if tt is None else (c.shard(tt) if sharded else tt)
                p, dp = tk.dftopk_jvp(c.shard(x), k, c.shard(u), tau_tangent=tts, **kws)
                wp, wdp = tk.dftopk_jvp(x, k, u, tau_tangent=tt, **kw)
                _close(p, c.shard(wp), 1e-6, "jvp out")
                _close(dp, c.shard(wdp), 2e-5, "jvp tangent")
                out, vjp = tk.dftopk_and_vjp(c.shard(x), k, **kws)
                wout, wvjp = tk.dftopk_and_vjp(x, k, **kw)
                _close(out, c.shard(wout), 1e-6, "and_vjp out")
                _close(vjp(c.shard(w))[0], c.shard(wvjp(w)[0]), 2e-5, "and_vjp x")
                n += 7
    return f"{n} comparisons: float / per-row / full (sharded) tau"


def check_forward_mode_ad(c):
    import torch
    import torch.autograd.forward_ad as fwad

    import topk_core as tk

    x = _data((2, 100), 14)
    u = _data((2, 100), 15)
    with fwad.dual_level():
        p = tk.dftopk(fwad.make_dual(c.shard(x), c.shard(u)), 25, tau=0.4, group=c.group)
        got = fwad.unpack_dual(p).tangent
    _, want = tk.dftopk_jvp(x, 25, u, tau=0.4)
    _close(got, c.shard(want), 2e-5, "forward AD")
    # reverse over forward: the gradient of sum(w * tangent), which needs d theta / dx
    # inside the jvp (ties across ranks, a mask, per-row tau), against one process
    x = _data((3, 100), 21, torch.float64)
    x[0, :50] = torch.round(x[0, :50])
    u, w = _data((3, 100), 22, torch.float64), _data((3, 100), 23, torch.float64)
    mask = _data((3, 100), 24) > -1
    tau = torch.tensor([[0.3], [0.8], [1.5]], dtype=torch.float64)
    for k in (1, 30):
        xs = c.shard(x).requires_grad_(True)
        with fwad.dual_level():
            p = tk.dftopk(
                fwad.make_dual(xs, c.shard(u)), k, tau=tau, mask=c.shard(mask), group=c.group
            )
            t = fwad.unpack_dual(p).tangent
        (got,) = torch.autograd.grad((t * c.shard(w)).sum(), xs)
        xf = x.clone().requires_grad_(True)
        with fwad.dual_level():
            tf = fwad.unpack_dual(tk.dftopk(fwad.make_dual(xf, u), k, tau=tau, mask=mask)).tangent
        (want,) = torch.autograd.grad((tf * w).sum(), xf)
        _close(got, c.shard(want), 1e-10, f"reverse over forward k={k}")
    return "tangents and reverse over forward match"


def check_double_backward(c):
    import torch
    import torch.distributed as dist

    import topk_core as tk

    x = _data((3, 100), 16, torch.float64)
    x[0, :50] = torch.round(x[0, :50])  # ties: w splits over entries on several ranks
    w = _data((3, 100), 17, torch.float64)
    v = _data((3, 100), 18, torch.float64)
    mask = _data((3, 100), 19) > -1
    tau = torch.tensor([[0.3], [0.8], [1.5]], dtype=torch.float64)
    vt = torch.tensor([[0.5], [-1.0], [2.0]], dtype=torch.float64)
    n = 0
    for fn, hard in ((tk.dftopk, False), (tk.dftopk_logits, False), (tk.dftopk, True)):
        kw = {"hard": True} if hard else {}
        for k in (1, 30, 99):
            # Hessian-vector product of sum(w * f(x, tau)) along (v, vt), on every rank
            xs = c.shard(x).requires_grad_(True)
            ts = tau.clone().requires_grad_(True)
            out = fn(xs, k, tau=ts, mask=c.shard(mask), group=c.group, **kw)
            gx, gt = torch.autograd.grad((out * c.shard(w)).sum(), (xs, ts), create_graph=True)
            # gt is this rank's share of tau's gradient: the shares add up to the whole
            hx, ht = torch.autograd.grad((gx * c.shard(v)).sum() + (gt * vt).sum(), (xs, ts))
            dist.all_reduce(ht, group=c.group)
            xf = x.clone().requires_grad_(True)
            tf = tau.clone().requires_grad_(True)
            outf = fn(xf, k, tau=tf, mask=mask, **kw)
            gxf, gtf = torch.autograd.grad((outf * w).sum(), (xf, tf), create_graph=True)
            hxf, htf = torch.autograd.grad((gxf * v).sum() + (gtf * vt).sum(), (xf, tf))
            what = f"{fn.__name__}{' hard' if hard else ''} k={k}"
            _close(gx, c.shard(gxf), 1e-12, f"first order {what}")
            _close(hx, c.shard(hxf), 1e-10, f"Hessian-vector product in x, {what}")
            _close(ht, htf, 1e-10, f"Hessian-vector product in tau, {what}")
            n += 1
    # forward over reverse (torch.func.jvp of torch.func.grad), the same product in x
    ms, ws = c.shard(mask), c.shard(w)
    for k in (1, 30):
        _, hv = torch.func.jvp(
            torch.func.grad(
                lambda t, k=k: (tk.dftopk(t, k, tau=tau, mask=ms, group=c.group) * ws).sum()
            ),
            (c.shard(x),),
            (c.shard(v),),
        )
        xf = x.clone().requires_grad_(True)
        (gxf,) = torch.autograd.grad(
            (tk.dftopk(xf, k, tau=tau, mask=mask) * w).sum(), xf, create_graph=True
        )
        (hxf,) = torch.autograd.grad((gxf * v).sum(), xf)
        _close(hv, c.shard(hxf), 1e-10, f"forward-over-reverse product k={k}")
        n += 1
    # float tau, float32
    x32 = _data((2, 100), 20)
    xs = c.shard(x32).requires_grad_(True)
    (gx,) = torch.autograd.grad(
        tk.dftopk(xs, 25, tau=0.5, group=c.group).pow(2).sum(), xs, create_graph=True
    )
    (hx,) = torch.autograd.grad(gx.sum(), xs)
    xf = x32.clone().requires_grad_(True)
    (gxf,) = torch.autograd.grad(tk.dftopk(xf, 25, tau=0.5).pow(2).sum(), xf, create_graph=True)
    (hxf,) = torch.autograd.grad(gxf.sum(), xf)
    _close(hx, c.shard(hxf), 1e-4, "float32, float tau")
    return (
        f"{n + 1} Hessian-vector products (ties across ranks, mask, per-row tau; reverse over "
        f"reverse and forward over reverse) match"
    )


def check_dtypes(c):
    import torch

    import topk_core as tk

    base = _data((2, 100), 16, torch.float64)
    base[0, :20] = base[0, 50:70]  # ties across shards
    for dt, tol in ((torch.float64, 1e-12), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
        x = base.to(dt)
        got = tk.dftopk(c.shard(x), 41, tau=0.4, group=c.group)
        if got.dtype != dt:
            _MISMATCHES.append(f"{dt}: output dtype {got.dtype}")
        _close(got, c.shard(tk.dftopk(x, 41, tau=0.4)), tol, str(dt))
        _close(tk.topk_mask(c.shard(x), 3, group=c.group), c.shard(tk.topk_mask(x, 3)), 0, "mask")
    return "float64, float16, bfloat16"


def check_infinities_nan(c):
    import math

    import topk_core as tk

    x = _data((5, 100), 17)
    x[0, [0, 50]] = math.inf  # two +inf on two shards
    x[1, 3] = math.inf
    x[1, 70] = -math.inf
    x[2, :] = -math.inf
    x[2, [2, 95]] = 1.0
    x[3, 45] = math.nan
    xs = c.shard(x)
    for k in (0, 1, 2, 100):
        for fn in (tk.dftopk, tk.dftopk_logits, tk.topk_mask):
            _close(fn(xs, k, group=c.group), c.shard(fn(x, k)), 1e-6, f"{fn.__name__} k={k}")
    return "ok"


def check_empty_shard(c):
    import topk_core as tk

    # rank 1 holds no entry at all; it still takes part in every collective
    cuts = [0, 30, 30, 64, 100]
    x = _data((2, 100), 18)
    w = _data((2, 100), 19)
    xs = c.shard(x, cuts=cuts).requires_grad_(True)
    p = tk.dftopk(xs, 33, group=c.group)
    (p * c.shard(w, cuts=cuts)).sum().backward()
    xf = x.clone().requires_grad_(True)
    (tk.dftopk(xf, 33) * w).sum().backward()
    _close(p, c.shard(tk.dftopk(x, 33), cuts=cuts), 1e-6, "forward")
    _close(xs.grad, c.shard(xf.grad, cuts=cuts), 2e-5, "grad")
    got = tk.topk_mask(c.shard(x, cuts=cuts), 50, group=c.group)
    _close(got, c.shard(tk.topk_mask(x, 50), cuts=cuts), 0, "topk_mask")
    return f"shard length {xs.shape[-1]}"


def check_communication_independent_of_n(c):
    import torch
    import torch.distributed as dist

    import topk_core as tk

    sizes = []
    real = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}

    def recording(name):
        def call(tensor, *args, **kwargs):
            t = tensor[0] if isinstance(tensor, list) else tensor
            sizes.append((name, t.dtype, t.numel()))
            return real[name](tensor, *args, **kwargs)

        return call

    seen = []
    try:
        for name in real:
            setattr(dist, name, recording(name))
        for n in (400, 40000):
            sizes.clear()
            x = c.shard(_data((4, n), 20)).requires_grad_(True)
            p = tk.dftopk(x, torch.full((4,), n // 3), tau=0.5, group=c.group)
            p.sum().backward()
            tk.topk_mask(x.detach(), n // 3, group=c.group)
            seen.append(list(sizes))
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    if seen[0] != seen[1]:
        raise AssertionError(f"communication differs with n: {seen[0]} vs {seen[1]}")
    largest = max(s[2] for s in seen[0])
    if largest > 4 * 256:
        raise AssertionError(f"a collective of {largest} elements")
    return f"{len(seen[0])} collectives per forward+backward+mask, largest {largest} elements"


def check_errors(c):
    import functools

    import numpy as np
    import torch

    import topk_core as tk

    def expect(exc, text, fn):
        try:
            fn()
        except exc as e:
            if text not in str(e):
                _MISMATCHES.append(f"{exc.__name__} without {text!r}: {e}")
            return
        _MISMATCHES.append(f"no {exc.__name__} ({text!r})")

    x = c.shard(_data((2, 100), 21))
    expect(TypeError, "numpy", lambda: tk.dftopk(np.ones((2, 8)), 3, group=c.group))
    expect(TypeError, "ProcessGroup", lambda: tk.dftopk(x, 3, group="d"))
    # the global length is 100: 101 fails on every rank, 100 is fine everywhere
    expect(ValueError, "100", lambda: tk.dftopk(x, 101, group=c.group))
    tk.dftopk(x, 100, group=c.group)
    # one rank passes another dtype: every rank gets the error, none hangs
    xd = x.double() if c.rank == 1 else x
    expect(ValueError, "different dtypes", lambda: tk.dftopk(xd, 3, group=c.group))
    xb = torch.cat([x, x]) if c.rank == 2 else x
    expect(ValueError, "batch shapes", lambda: tk.dftopk(xb, 3, group=c.group))
    # one rank passes another k (also one past the global length): every rank gets the
    # same error; it was a silently wrong answer (topk_mask gave 9 ones for k = 3 or 4)
    k_rows = torch.full((2,), 3)  # an int k on rank 0, a per-row array elsewhere
    for k_rank in (3 + c.rank, 101 if c.rank == 0 else 3, 3 if c.rank == 0 else k_rows):
        for fn in (tk.dftopk, tk.topk_mask):
            call = functools.partial(fn, x, k_rank, group=c.group)
            expect(ValueError, "passed different values", call)
    # per-row k arrays: compared by shape and values (they were not compared before, and
    # the ranks silently looked for different ranks of one global row)
    k_diff = torch.tensor([3, 4 if c.rank == 1 else 5])
    k_shape = torch.tensor([[3], [5]]) if c.rank == 2 else torch.tensor([3, 5])
    for k_rank in (k_diff, k_shape):
        for fn in (tk.dftopk, tk.topk_mask):
            call = functools.partial(fn, x, k_rank, group=c.group)
            expect(ValueError, "per-row k arrays of different shapes or values", call)
    # the same values in another integer dtype on one rank: one k, no error
    k_same = torch.tensor([3, 5], dtype=torch.int32 if c.rank == 1 else torch.int64)
    got = tk.topk_mask(x, k_same, group=c.group)
    want = tk.topk_mask(x, torch.tensor([3, 5]), group=c.group)
    if not torch.equal(got, want):
        _MISMATCHES.append("per-row k in another integer dtype on one rank")
    return "ok"


# ---------------------------------------------------------------- launcher


def check_torch_compile(c):
    import torch

    import topk_core as tk

    x = _data((3, 100), 21)
    x[1, :60] = torch.round(x[1, :60])  # ties across shards
    w = _data((3, 100), 22)
    xf = x.clone().requires_grad_(True)
    (tk.dftopk(xf, 30, tau=0.4) * w).sum().backward()

    def loss(xs, ws):
        return (tk.dftopk(xs, 30, tau=0.4, group=c.group) * ws).sum()

    # dynamo + AOT autograd without inductor's code generation (minutes per rank here)
    for backend in ("eager", "aot_eager"):
        torch._dynamo.reset()
        compiled = torch.compile(loss, backend=backend)
        xs = c.shard(x).requires_grad_(True)
        value = compiled(xs, c.shard(w))
        value.backward()
        _close(value.detach().reshape(1), loss(c.shard(x), c.shard(w)).reshape(1), 1e-5, "value")
        _close(xs.grad, c.shard(xf.grad), 2e-5, f"torch.compile(backend={backend!r}) grad")
    gx = torch.func.grad(loss)(c.shard(x), c.shard(w))
    _close(gx, c.shard(xf.grad), 2e-5, "torch.func.grad")
    return "torch.compile (eager, aot_eager backends) and torch.func.grad with group="


def check_torch_func_transforms(c):
    import torch
    import torch.distributed as dist

    import topk_core as tk

    g = c.group
    vmap = torch.func.vmap
    x = _data((3, 2, 100), 23, torch.float64)
    x[0, 0, :40] = torch.round(x[0, 0, :40])  # ties across shards
    w = _data((3, 2, 100), 24, torch.float64)
    mask = _data((3, 2, 100), 25) > -1
    k = torch.tensor([[1, 30], [0, 99], [100, 50]])
    tau = torch.tensor([0.3, 0.8, 1.5], dtype=torch.float64).reshape(3, 1, 1)
    xs, ws, ms = c.shard(x), c.shard(w), c.shard(mask)
    # vmap over a leading axis (unequal shards): x, per-row k, mask and tau all mapped
    for fn in (tk.dftopk, tk.dftopk_logits, tk.topk_mask):
        got = vmap(lambda r, kk, mm, fn=fn: fn(r, kk, mask=mm, group=g))(xs, k, ms)
        _close(got, c.shard(fn(x, k, mask=mask)), 1e-12, f"vmap {fn.__name__}")
    # mapped over axis 2 of 4: x, k and the mask each with the mapped axis not first
    x4, m4 = _data((2, 3, 2, 100), 26, torch.float64), _data((2, 3, 2, 100), 27) > -1
    k4 = torch.arange(12).reshape(2, 3, 2) * 8
    f4 = vmap(lambda r, kk, mm: tk.dftopk(r, kk, mask=mm, group=g), in_dims=2, out_dims=2)
    got = f4(c.shard(x4), k4, c.shard(m4))
    _close(got, c.shard(tk.dftopk(x4, k4, mask=m4)), 1e-12, "vmap over axis 2")
    got = vmap(lambda r, kk: tk.topk_threshold(r, kk, group=g))(xs, k)
    _close(got, tk.topk_threshold(x, k), 0, "vmap topk_threshold")
    got = vmap(lambda r, t: tk.dftopk(r, 30, tau=t, hard=True, group=g))(xs, tau)
    _close(got, c.shard(tk.dftopk(x, 30, tau=tau, hard=True)), 0, "vmap hard=True")
    # an unmapped per-row tau tensor: the value and tau's gradient (this rank's share)
    tr = torch.tensor([[0.5], [1.2]], dtype=torch.float64, requires_grad=True)
    got = vmap(lambda r: tk.dftopk(r, 30, tau=tr, group=g))(xs)
    (gt,) = torch.autograd.grad((got * ws).sum(), tr)
    dist.all_reduce(gt, group=g)
    tf = tr.detach().clone().requires_grad_(True)
    ref = tk.dftopk(x, 30, tau=tf)
    (gtf,) = torch.autograd.grad((ref * w).sum(), tf)
    _close(got, c.shard(ref), 1e-12, "vmap, unmapped tau tensor")
    _close(gt, gtf, 1e-10, "vmap, unmapped tau tensor: its gradient")
    got = vmap(lambda t: tk.dftopk(xs[0], 30, tau=t, group=g))(tau)  # only tau mapped
    _close(got, c.shard(tk.dftopk(x[0].expand(3, 2, 100), 30, tau=tau)), 1e-12, "vmap tau")
    got = vmap(lambda r, v: tk.dftopk_vjp(r, k[0], v, tau=0.4, group=g)[0])(xs, ws)
    _close(got, c.shard(tk.dftopk_vjp(x, k[0], w, tau=0.4)[0]), 1e-12, "vmap dftopk_vjp")
    got = vmap(lambda r, v: tk.dftopk_jvp(r, 30, v, tau=0.4, group=g)[1])(xs, ws)
    _close(got, c.shard(tk.dftopk_jvp(x, 30, w, tau=0.4)[1]), 1e-12, "vmap dftopk_jvp")
    # per-example gradients: vmap of grad, the gradient of every rank's loss summed
    xf = x.clone().requires_grad_(True)
    (tk.dftopk(xf, 30, tau=tau) * w).sum().backward()
    per = vmap(torch.func.grad(lambda r, v, t: (tk.dftopk(r, 30, tau=t, group=g) * v).sum()))
    _close(per(xs, ws, tau), c.shard(xf.grad), 1e-12, "vmap of grad")
    # forward mode around vmap: every rank's tangent moves every shard
    f = vmap(lambda r, t: tk.dftopk(r, 30, tau=t, group=g))
    _, got = torch.func.jvp(lambda v: f(v, tau), (xs,), (ws,))
    _, want = torch.func.jvp(lambda v: tk.dftopk(v, 30, tau=tau), (x,), (w,))
    _close(got, c.shard(want), 1e-12, "jvp of vmap")

    # Jacobians and Hessians map over this rank's outputs or inputs: equal shards.  Every
    # rank maps at once, so rank r's jacrev row i is the gradient of the sum of every
    # rank's output i (sum over r' of J[r' m + i, r m + j]), and a jacfwd column j moves
    # entry j of every shard (sum over r' of J[r m + i, r' m + j])
    cuts, m = [0, 25, 50, 75, 100], 25
    x1, w1 = x[0, 0], w[0, 0]
    s1 = c.shard(x1, cuts=cuts)
    r = c.rank

    def blocks(mat, rows_of_rank):
        parts = [mat[q * m : (q + 1) * m, r * m : (r + 1) * m] for q in range(4)]
        if not rows_of_rank:
            return sum(parts)
        return sum(mat[r * m : (r + 1) * m, q * m : (q + 1) * m] for q in range(4))

    for fn in (tk.dftopk, tk.dftopk_logits):
        jac = torch.func.jacrev(lambda t, fn=fn: fn(t, 30, tau=0.4))(x1)
        f = lambda t, fn=fn: fn(t, 30, tau=0.4, group=g)  # noqa: E731
        _close(torch.func.jacrev(f)(s1), blocks(jac, False), 1e-12, f"jacrev {fn.__name__}")
        _close(torch.func.jacfwd(f)(s1), blocks(jac, True), 1e-12, f"jacfwd {fn.__name__}")
    hess = torch.func.hessian(lambda t: (tk.dftopk(t, 30, tau=0.4) * w1).sum())(x1)
    loss = lambda t: (tk.dftopk(t, 30, tau=0.4, group=g) * c.shard(w1, cuts=cuts)).sum()  # noqa: E731
    _close(torch.func.hessian(loss)(s1), blocks(hess, True), 1e-12, "hessian")
    # forward over forward: refused on every rank (after the same collectives), as without
    # a group, instead of a zero second derivative
    try:
        torch.func.jacfwd(torch.func.jacfwd(lambda t: tk.dftopk(t, 30, tau=0.4, group=g)))(s1)
    except NotImplementedError as e:
        if "forward-over-forward" not in str(e):
            _MISMATCHES.append(f"jacfwd(jacfwd(f)) with group=: {e}")
    else:
        _MISMATCHES.append("jacfwd(jacfwd(f)) with group= did not raise")
    # unequal shards: the ranks would map over different sizes; every rank raises
    try:
        torch.func.jacrev(lambda t: tk.dftopk(t, 30, group=g))(c.shard(x1))
    except ValueError as e:
        if "different batch sizes" not in str(e):
            _MISMATCHES.append(f"jacrev on unequal shards: {e}")
    else:
        _MISMATCHES.append("jacrev on unequal shards did not raise")
    return "vmap (all public functions), vmap of grad, jacrev, jacfwd, hessian; no jacfwd(jacfwd)"


def check_group_of_one(c):
    """Each rank alone in a group: the call runs as without ``group`` (no collective),
    same values and gradients (the group's driver and generic math were 5-13x slower)."""
    import torch
    import torch.distributed as dist

    import topk_core as tk

    # new_group is collective: every rank creates every one-rank group, in order
    alone = [dist.new_group([r]) for r in range(WORLD)][c.rank]
    calls = []
    real = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}
    x = _data((3, 50), 40 + c.rank).requires_grad_(True)
    w = _data((3, 50), 50)
    k_rows = torch.tensor([1, 25, 50])
    try:
        for name in real:
            setattr(dist, name, lambda *a, _n=name, **kw: calls.append(_n) or real[_n](*a, **kw))
        outs = []
        for group in (alone, None):
            p = tk.dftopk(x, k_rows, tau=0.3, group=group)
            (g,) = torch.autograd.grad((w * p).sum(), x)
            gx, gt = tk.dftopk_vjp(x.detach(), 7, w, tau=torch.tensor(0.5), group=group)
            outs.append(
                (p, g, gx, gt, tk.topk_mask(x.detach(), 7, group=group), tk.topk_threshold(x, 7))
            )
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    for i, (got, want) in enumerate(zip(*outs)):
        _close(got, want, 0, f"output {i}")
    if calls:
        _MISMATCHES.append(f"a group of one made collectives: {calls}")
    return f"{len(outs[0])} outputs as without group, no collective"


def _rank_main(rank, port, out_dir, only):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    results = {}
    stopped = ""
    try:
        c = Ctx(rank)
        for name in CASES:
            if only and name not in only:
                continue
            if stopped:
                results[name] = {"ok": False, "detail": f"not run: {stopped}", "seconds": 0.0}
                continue
            t0 = time.perf_counter()
            _MISMATCHES.clear()
            try:
                detail, ok = globals()["check_" + name](c), not _MISMATCHES
                if _MISMATCHES:
                    detail = "mismatches: " + "; ".join(_MISMATCHES[:5])
            except AssertionError:  # raised at the end of a check, after its collectives
                detail, ok = traceback.format_exc(limit=6), False
            except Exception:
                detail, ok = traceback.format_exc(limit=6), False
                # the other ranks may now wait in a collective this rank skipped
                stopped = f"rank {rank} stopped after an exception in {name}"
            results[name] = {"ok": ok, "detail": detail, "seconds": time.perf_counter() - t0}
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    import torch.multiprocessing as mp

    only = sys.argv[1:]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _rank_main,
            args=(_free_port(), out_dir, only),
            nprocs=WORLD,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + DEADLINE_S
        failure = None
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    failure = f"ranks still running after {DEADLINE_S} s"
                    break
        except Exception as exc:  # a rank died
            failure = f"{type(exc).__name__}: {exc}"
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(10)
        merged = {}
        for rank in range(WORLD):
            path = os.path.join(out_dir, f"rank{rank}.json")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                for name, r in json.load(f).items():
                    m = merged.setdefault(name, {"ok": True, "detail": "", "seconds": 0.0})
                    m["seconds"] = round(max(m["seconds"], r["seconds"]), 1)
                    if not r["ok"]:
                        prior = m["detail"] if not m["ok"] else ""
                        m["ok"], m["detail"] = False, f"{prior}rank {rank}: {r['detail']}\n"
                    elif m["ok"]:
                        m["detail"] = r["detail"]
        if failure:
            merged["_launcher"] = {"ok": False, "detail": failure}
    print(MARKER + json.dumps(merged), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
