"""PyTorch adapter: closed-form autograd for DFTopK and the ``SoftTopK`` module.

``topk_core.dftopk(t, k)`` on a torch tensor reaches :class:`DFTopKFunction`
through the torch backend's ``apply`` hook, so ordinary autograd,
``torch.func`` (``grad``, ``vjp``, ``jvp``, ``jacrev``, ``jacfwd``, ``vmap``),
double backward and ``torch.compile(fullgraph=True)`` all see the spec's O(n)
closed-form derivatives instead of differentiating through the selection.

The formulas come from :mod:`topk_core._math` (called with the array-api-compat
torch namespace), so they exist once in the project.  For backward the
function saves its inputs ``x`` (and a tensor ``tau``, the mask), its output
``p`` and the per-row ``a``, ``b``: no tensor beyond those the graph holds
anyway, apart from one value per row.  The backward takes ``p (1 - p)`` from
``p`` (no exponential is recomputed) and recomputes ``z`` (two kernels) only
for a ``tau`` gradient.  Eager CPU calls run the lean kernels of
:func:`forward_math` / :func:`backward_math` (issue 11); CUDA,
``torch.compile`` and ``torch.func`` the graph-safe generic code, which
inductor fuses into one C++ kernel per direction plus the ``topk``.  The
same eager kernels serve :func:`topk_core.dftopk_vjp` and
:func:`topk_core.dftopk_and_vjp` through the torch backend's ``soft`` hook
(:func:`closed_form_forward` / :func:`closed_form_backward`).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import array_api_compat
import numpy as np
import torch
from torch import nn

from .. import _math
from .._layer_args import check_layer_args, check_learnable_tau
from ..backends import torch_backend as _backend
from ..backends.numpy_soft import POOL
from ..backends.torch_backend import host_ok, select_pair

__all__ = [
    "DFTopKFunction",
    "SoftTopK",
    "apply_problem",
    "backward_math",
    "closed_form_backward",
    "closed_form_forward",
    "forward_math",
]

_XP = array_api_compat.array_namespace(torch.empty(0))


def _logits(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    tau: float | torch.Tensor,
    valid: torch.Tensor | None,
    *,
    differentiable: bool,
    row_sum: Any = None,
) -> torch.Tensor:
    """``z`` from the saved ``x, a, b`` (compute dtype).

    ``a`` and ``b`` are constants here.  When the result must itself be
    differentiable (double backward, forward-over-reverse), a zero-valued
    straight-through term ``theta_lin - theta_lin.detach()`` with
    ``theta_lin = sum(w * x)`` restores d theta / dx = w, the derivative of the
    selected threshold (the selection is piecewise linear in x).  ``row_sum``:
    a group's per-row sum (:func:`topk_core._group.row_sum_of`; autograd-aware
    for tensors that require grad), where ``x`` is one shard of the row.
    """
    z = _math.logits(_XP, x, a, b, tau, valid, eager=host_ok(x))
    if differentiable:
        eq_a, eq_b, wa, wb = _math._tie_weights_for(_XP, x, a, b, valid, row_sum)
        # w * x, summed per row; the entries of an infinite a or b weigh 0, and 0 * inf
        # would make the whole row's z NaN: only finite entries enter (one kernel; its
        # derivative is 1 on the finite entries, 0 elsewhere)
        xw = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        theta = _math._apply_w(_XP, eq_a, eq_b, wa.to(x.dtype), wb.to(x.dtype), xw)
        theta = _math._row_sum(_XP, theta, row_sum)
        shift = theta - theta.detach()
        if not (isinstance(tau, float) and tau == 1.0):
            shift = shift / tau
        z = z - shift
    return z


def _is_one(tau: Any) -> bool:
    return isinstance(tau, float) and tau == 1.0


def _logits_eager(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    tau: float | torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``z`` without the mask in one or two kernels, or None where the generic code must run.

    :func:`topk_core._math.logits` takes a dozen kernels (its infinite-row
    branch, the halves); here, when every row's ``theta`` is finite (read on
    the host: eager CPU only): ``x - theta`` for ``tau = 1`` (it overflows
    only where ``z`` does) and ``(x/2 - theta/2) / (tau/2)`` otherwise, the
    same halves-first rounding as the generic code in two kernels.  ``out``:
    a contiguous tensor of x's shape and dtype to write ``z`` into.
    """
    theta = _math.threshold(_XP, a, b)
    if not bool(torch.isfinite(theta).all()):
        return None
    if _is_one(tau):
        return torch.sub(x, theta, out=out)
    if isinstance(tau, float) and tau < 1e-37:
        return None  # the generic code's tiny-tau rounding
    if not isinstance(tau, float) and bool((tau < 2 * torch.finfo(tau.dtype).tiny).any()):
        return None  # tau/2 would be subnormal (rounded, or 0 under set_flush_denormal)
    return torch.add(theta * -0.5, x, alpha=0.5, out=out).div_(tau * 0.5)


def _row_sum(v: torch.Tensor) -> torch.Tensor:
    """Per-row sum over the selection axis (the VJP's ``sum(s)``), axis kept."""
    return v.sum(-1, keepdim=True)


def _subtract_ties(
    s: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    valid: torch.Tensor | None,
    total: torch.Tensor,
    candidates: torch.Tensor | None = None,
) -> None:
    """``s -= total * w`` in place at the entries tied with ``a`` or ``b`` (eager CPU).

    No valid entry lies strictly between ``b`` and ``a``: two comparisons and
    one ``nonzero`` find the tied entries, and the correction touches only
    those (O(#ties); nothing on rows without ties beyond the comparisons).
    With ``candidates`` (flat positions known to hold every tie: the selection
    hands over its entries in ``[b, a]``, or a whole row where ties may lie
    beyond what it selected) the comparisons re-check those alone (full
    comparisons and ``nonzero`` cost 12 passes on 1024 x 4096); more than
    :data:`_HOST_TIES` of them are weighed as they are, through masks
    (:func:`_subtract_tied`: no ``nonzero``, and ``index_select`` gathers; this
    step 0.93 -> 0.59 ms on 8192 x 256, 0.34 -> 0.21 ms on 1024 x 4096 here,
    same bits).
    Up to :data:`_HOST_TIES` tied entries are weighed with Python floats; more,
    with tensor ops; both in float64, rounded once, so they agree exactly.
    """
    found = _tied_entries(x, a, b, valid, candidates, total.numel())
    if found is None:
        return
    pos, xv, rows, vm, compact = found
    low = b.reshape(-1)
    if compact and pos.numel() <= _HOST_TIES:
        # the usual two ties per row: a dozen tiny kernels cost more than the list work
        at, coef = _tie_coefs_host(pos, xv, rows, a.reshape(-1), low, total.reshape(-1))
        if at:
            _flat_sub_(s, torch.tensor(at), torch.tensor(coef, dtype=s.dtype))
        return
    _subtract_tied(s, pos, xv, rows, a, low, total, vm)


def _tied_entries(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    valid: torch.Tensor | None,
    candidates: torch.Tensor | None,
    n_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, bool] | None:
    """Where :func:`_subtract_ties` and :func:`_tie_dot` look: ``(pos, xv, rows, vm, compact)``.

    Flat positions ``pos`` holding every valid entry tied with ``a`` or ``b``,
    ``x`` there, their rows (None for one row), and either exactly the tied
    entries (``compact``, ``vm`` None) or many candidates as they are, ``vm``
    their validity (None without a mask): those are weighed through masks.
    None where nothing is tied.
    """
    n = x.shape[-1]
    low = b.reshape(-1)
    if candidates is not None and candidates.numel() > _HOST_TIES:
        # many candidates (a batch: about two a row): weigh them all through masks, no
        # compaction; only entries equal to a or b get a nonzero coefficient
        rows = candidates // n if n_rows > 1 else None
        vm = _flat_take(valid, candidates) if valid is not None else None
        return candidates, _flat_take(x, candidates), rows, vm, False
    # a NaN a (the row's k-th largest is a NaN) bounds nothing: b's ties are still found
    top = torch.where(torch.isnan(a), math.inf, a)
    if candidates is not None:
        rows = candidates // n if n_rows > 1 else None
        xv = _flat_take(x, candidates)
        band = (xv <= _at(top.reshape(-1), rows)) & (xv >= _at(low, rows))
        if valid is not None:
            band &= _flat_take(valid, candidates)
        keep = band.nonzero().reshape(-1)
        pos = candidates[keep]
        xv = xv[keep]
        rows = rows[keep] if rows is not None else None
    else:
        band = (x <= top) & (x >= b)
        if valid is not None:
            band &= valid
        pos = torch.nonzero(band.reshape(-1)).reshape(-1)
        rows = pos // n if n_rows > 1 else None
        xv = _flat_take(x, pos)
    if pos.numel() == 0:
        return None
    return pos, xv, rows, None, True


def _tie_dot(
    u: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    valid: torch.Tensor | None,
    candidates: torch.Tensor | None,
) -> torch.Tensor | None:
    """Per-row ``w.u`` (axis kept, ``u``'s dtype), or None where nothing is tied.

    The transpose of :func:`_subtract_ties`: the tied entries' ``u`` weighed
    and summed per row in float64 (O(#ties), or O(#candidates)).
    """
    n = x.shape[-1]
    n_rows = x.numel() // n if n else 0
    found = _tied_entries(x, a, b, valid, candidates, n_rows) if n_rows else None
    if found is None:
        return None
    pos, xv, rows, vm, _ = found
    f64 = torch.float64
    uv = _flat_take(u, pos).to(f64)
    zero = torch.zeros((), dtype=f64)
    dtheta = torch.zeros(n_rows, dtype=f64)
    for hit, w in _tie_hits(xv, rows, a, b, vm, n_rows):
        hu = torch.where(hit, uv, zero)
        if rows is None:
            sums = hu.sum().reshape(1)
        else:
            sums = torch.bincount(rows, weights=hu, minlength=n_rows)
        # an infinite a or b weighs 0, whatever its ties' tangents (0 * inf)
        dtheta += torch.where(w == 0, zero, w * sums)
    return dtheta.to(u.dtype).reshape(x.shape[:-1] + (1,))


def _subtract_tied(
    s: torch.Tensor,
    pos: torch.Tensor,
    xv: torch.Tensor,
    rows: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    total: torch.Tensor,
    valid: torch.Tensor | None,
) -> None:
    """``s[pos] -= total * w`` for the entries at ``pos`` (values ``xv``, rows ``rows``).

    Every position is weighed through masks (entries equal to neither ``a`` nor
    ``b``, or not ``valid``, subtract an exact 0), so nothing is compacted.
    Coefficients in float64, rounded once: the same values as
    :func:`_tie_coefs_host`, subtracted in the same order (``a``'s, then ``b``'s).
    """
    flat_total = total.reshape(-1).to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    for hit, w in _tie_hits(xv, rows, a, b, valid, total.numel()):
        # where, not a product: a non-finite total must not reach the entries left alone
        coef = torch.where(hit, _at(flat_total * w, rows), zero).to(s.dtype)
        _flat_sub_(s, pos, coef)


def _tie_hits(
    xv: torch.Tensor,
    rows: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    valid: torch.Tensor | None,
    n_rows: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For ``a``, then ``b``: ``(hit, w)``, which of the entries ``xv`` equal it (and are
    ``valid``) and the per-row float64 weight each carries (:func:`topk_core._math.tie_share`)."""
    out = []
    for v in (a.reshape(-1), b.reshape(-1)):
        hit = xv == _at(v, rows)
        if valid is not None:
            hit &= valid
        h = hit.to(torch.float64)
        if rows is None:
            count = h.sum().reshape(1)
        else:
            count = torch.bincount(rows, weights=h, minlength=n_rows)
        out.append((hit, _math.tie_share(_XP, v, count)))
    return out


# at most this many tied entries are weighed on the host (Python floats)
_HOST_TIES = 256


def _tie_coefs_host(
    pos: torch.Tensor,
    xv: torch.Tensor,
    rows: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    total: torch.Tensor,
) -> tuple[list[int], list[float]]:
    """Positions and ``total * w`` of the tied entries, from a few host values.

    ``w`` is :func:`topk_core._math.tie_share` in Python floats (1/2 split
    evenly among a row's entries equal to ``a``, and to ``b``; an infinite or
    NaN ``a``/``b`` weighs nothing): float64 arithmetic, as the tensor branch
    of :func:`_subtract_ties`, which calls it (tested bit-equal).
    """
    ps = pos.tolist()
    xs = xv.tolist()
    rs = rows.tolist() if rows is not None else [0] * len(ps)
    tv = total.tolist()
    at: list[int] = []
    coef: list[float] = []
    for vals in (a.tolist(), b.tolist()):
        hits: dict[int, list[int]] = {}
        for p, xval, r in zip(ps, xs, rs):
            if xval == vals[r]:
                hits.setdefault(r, []).append(p)
        for r, where in hits.items():
            if math.isfinite(vals[r]):
                at += where
                coef += [tv[r] * (0.5 / len(where))] * len(where)
    return at, coef


def _at(v: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``v[rows]``, or ``v`` itself (one value, broadcast) when there is one row."""
    # index_select: half the cost of advanced indexing for these 1-D gathers
    return v if rows is None else v.index_select(0, rows)


def _flat_take(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``t.reshape(-1)[pos]`` without copying a non-contiguous ``t``."""
    if t.is_contiguous():
        return t.view(-1).index_select(0, pos)
    return t[torch.unravel_index(pos, t.shape)]


def _flat_sub_(s: torch.Tensor, pos: torch.Tensor, v: torch.Tensor) -> None:
    """``s.reshape(-1)[pos] -= v`` in place, repeated positions accumulating."""
    if s.is_contiguous():
        s.view(-1).index_add_(0, pos, v, alpha=-1)
    else:
        s.index_put_(torch.unravel_index(pos, s.shape), -v, accumulate=True)


def _tau_grad(
    s: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    tau: torch.Tensor,
    valid: torch.Tensor | None,
    row_sum: Any = None,
) -> torch.Tensor:
    """``grad_tau = -sum(s z)``, infinite ``z`` left out (recomputed: no exponential).

    This shard's share where ``row_sum`` is a group's (see :func:`_logits`).
    """
    z = _logits(x, a, b, tau, valid, differentiable=torch.is_grad_enabled(), row_sum=row_sum)
    # infinite z contributes 0; NaN entries of x are constants (NaN rule); a NaN
    # threshold's NaN z stays: that row's grad_tau is NaN, as in the closed form
    t = torch.where(torch.isnan(x), 0.0, -s * torch.where(torch.isinf(z), 0.0, z))
    return t.sum_to_size(tau.shape).to(tau.dtype)


def forward_math(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    tau: float | torch.Tensor,
    valid: torch.Tensor | None,
    output: str,
    *,
    compute: bool = False,
) -> torch.Tensor:
    """The forward after the selection: ``p`` (or ``z``) in x's dtype, from ``a``, ``b``.

    ``compute``: in the compute dtype instead (float32 for half precision).
    Eager CPU: ``z`` in one or two kernels (:func:`_logits_eager`), the mask
    in one ``where``, ``sigmoid`` in place.  Elsewhere (CUDA, ``torch.compile``,
    ``torch.func``) the generic, graph-safe :func:`topk_core._math.logits`.
    """
    cdt = _math.compute_dtype(_XP, x.dtype)
    xc = x.to(cdt)
    a = a.to(cdt)
    b = b.to(cdt)
    z = _logits_eager(xc, a, b, tau) if host_ok(x) else None
    if z is None:
        z = _math.logits(_XP, xc, a, b, tau, valid, eager=host_ok(x))
        out = torch.sigmoid(z) if output == "probs" else z
    else:
        if valid is not None:
            z = torch.where(valid, z, -math.inf)
        out = z.sigmoid_() if output == "probs" else z
    return out if compute else out.to(x.dtype)


def graph_vjp(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    s: torch.Tensor,
    tau: float | torch.Tensor,
    valid: torch.Tensor | None,
    tau_grad: bool,
    row_sum: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(grad_x, grad_tau or None)`` from ``s = g dout/dz`` as differentiable ops.

    :func:`topk_core._math.vjp_from_s` and :func:`_tau_grad`, nothing done in
    place or on the host, so autograd can differentiate it again (double
    backward).  ``row_sum``: a group's per-row sum (see :func:`_logits`), for
    one shard of the rows.  Compute dtype in and out.
    """
    s, grad_x = _math.vjp_from_s(_XP, x, a, b, s, tau, valid, row_sum=row_sum)
    grad_tau = _tau_grad(s, x, a, b, tau, valid, row_sum=row_sum) if tau_grad else None
    return grad_x, grad_tau


def backward_math(
    kind: str,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    g: torch.Tensor,
    tau: float | torch.Tensor,
    valid: torch.Tensor | None,
    tau_grad: bool,
    candidates: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backward from what the forward saved: ``(grad_x, grad_tau or None)``, x's dtype.

    ``candidates`` (optional): flat positions that hold every entry tied with
    ``a`` or ``b`` (:func:`topk_core.backends.torch_backend.select_pair_and_candidates`);
    the ties are then looked for among them only.

    ``s = g p (1 - p) / tau`` comes from ``out`` in one kernel
    (``aten.sigmoid_backward``): the saved output ``p`` for float32/float64,
    so no exponential is recomputed; for half precision and behind a hard
    forward the caller recomputes ``p`` in float32 (:func:`_soft_output`).
    ``z`` is recomputed (two kernels) only for a ``tau`` gradient.  Eager CPU without a
    graph: division and mask in place, one row sum, the threshold term on the
    tied entries only (:func:`_subtract_ties`).  Otherwise (double backward,
    CUDA, ``torch.compile``, ``torch.func``) the graph-safe
    :func:`topk_core._math.vjp_from_s`, differentiable to any order: ``w`` is
    locally constant and ``p`` carries its own graph through this Function.
    """
    cdt = _math.compute_dtype(_XP, x.dtype)
    xc = x.to(cdt)
    a = a.to(cdt)
    b = b.to(cdt)
    g = g.to(cdt)
    probs = kind == "probs"
    s = torch.ops.aten.sigmoid_backward(g, out.to(cdt)) if probs else g
    if torch.is_grad_enabled() or not (host_ok(x) and host_ok(s)):
        grad_x, grad_tau = graph_vjp(xc, a, b, s, tau, valid, tau_grad)
        return grad_x.to(x.dtype), grad_tau
    fresh = probs  # s may be written in place
    if not _is_one(tau):
        s = s.div_(tau) if fresh else s / tau
        fresh = True
    if valid is not None:
        s = torch.where(valid, s, 0.0)
        fresh = True
    if not fresh:
        s = s.clone()
    grad_tau = _tau_grad(s, xc, a, b, tau, valid) if tau_grad else None
    total = _row_sum(s)
    # NaN rule: a NaN entry keeps its own term but stays out of sum(s).  For p its s is
    # NaN, so the sum shows it at no cost; for logits x is read once
    if (not bool(torch.isfinite(total).all())) if probs else bool(torch.isnan(xc).any()):
        total = _row_sum(torch.where(torch.isnan(xc), 0.0, s))
    _subtract_ties(s, xc, a, b, valid, total, candidates)
    return s.to(x.dtype), grad_tau


def closed_form_forward(
    pb: Any, a: torch.Tensor, b: torch.Tensor, output: str, *, keep: bool, out: bool = True
) -> tuple[torch.Tensor | None, Any]:
    """The torch ``soft`` hook's forward (eager CPU): see :func:`topk_core._api.soft_forward`.

    For :func:`topk_core.dftopk_vjp` and :func:`topk_core.dftopk_and_vjp`
    (``dftopk`` itself runs :class:`DFTopKFunction`).  The residuals are the
    generic :class:`topk_core._math.SoftResiduals`, so either backward reads
    them: ``z`` (its infinities set to 0, which is what ``grad_tau`` makes of
    them, and masked entries 0) and ``d = p (1 - p)`` as ``sigmoid(z)
    sigmoid(-z)``, relatively exact in both tails.  Two ``sigmoid`` kernels,
    not one exponential: torch's ``exp`` alone (0.41-0.56 ms at 1e6 float32
    here) costs more than its ``sigmoid`` (0.23-0.25 ms).

    Everything but the output lives in the NumPy backend's scratch pool
    (:data:`topk_core.backends.numpy_soft.POOL`, through ``torch.from_numpy``)
    and goes back to it when the residuals die: a fresh 16 MB tensor costs
    5-6 ms on this machine where one pass over it costs 0.4-0.7 ms (page
    faults: glibc returns the freed memory to the OS between calls).
    """
    cdt = pb.compute_dtype
    x = pb.x
    if not keep:
        return forward_math(x, a, b, pb.tau, pb.valid, output, compute=True), None
    a = a.to(cdt)
    b = b.to(cdt)
    held: list = []  # the residuals' pooled buffers
    temp: list = []
    xc = x if x.dtype == cdt else _scratch(x.shape, cdt, held).copy_(x)
    probs = output == "probs"
    fresh = out and not probs  # the logits output itself: never pooled
    zbuf = None if fresh else _scratch(x.shape, cdt, held)
    z = _logits_eager(xc, a, b, pb.tau, out=zbuf)
    if z is None:
        z = _math.logits(_XP, xc, a, b, pb.tau, None, eager=True)
        z = z if zbuf is None else zbuf.copy_(z)
    if pb.valid is not None:
        z.masked_fill_(pb.valid.logical_not(), -math.inf)
    result = d = None
    if probs:
        p = torch.sigmoid(z) if out else torch.sigmoid(z, out=_scratch(x.shape, cdt, temp))
        d = torch.neg(z, out=_scratch(x.shape, cdt, held)).sigmoid_().mul_(p)
        zr = torch.nan_to_num_(z, nan=math.nan, posinf=0.0, neginf=0.0)
        result = p if out else None
    else:
        result = z if out else None
        zr = _scratch(x.shape, cdt, held) if fresh else z
        torch.nan_to_num(z, nan=math.nan, posinf=0.0, neginf=0.0, out=zr)
    res = _math.SoftResiduals(xc, a, b, zr, d, output)
    weakref.finalize(res, POOL.give, *held)
    POOL.give(*temp)
    return result, res


def closed_form_input_copy(pb: Any, x: torch.Tensor) -> torch.Tensor:
    """``x`` copied for :func:`topk_core.dftopk_and_vjp`'s residuals, in the scratch pool.

    The buffer goes back to the pool when ``pb`` (held by the ``vjp``, as the
    residuals are) dies: a fresh copy page-faults (5-6 ms for 16 MB here, one
    pass over it 0.4-0.7 ms).  Only for ``x`` in its own compute dtype (float32
    or float64: a half ``x`` is kept as its float32 cast, already a copy).
    """
    held: list = []
    copy = _scratch(x.shape, x.dtype, held).copy_(x)
    weakref.finalize(pb, POOL.give, *held)
    return copy


def _scratch(shape: Any, dtype: torch.dtype, held: list) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor from the NumPy backend's scratch pool.

    Its NumPy buffer is appended to ``held``, for ``POOL.give`` once nothing
    references the tensor any more.
    """
    buf = POOL.take(tuple(shape), _NP_DTYPES[dtype])
    held.append(buf)
    return torch.from_numpy(buf)


def closed_form_backward(pb: Any, res: Any, g: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The torch ``soft`` hook's backward (eager CPU): see :func:`topk_core._api.soft_backward`.

    ``s = g d / tau`` (1-2 kernels), the mask, one row sum, one row dot with
    ``z`` for ``grad_tau``, and the threshold term on the tied entries only
    (:func:`_subtract_ties`, among ``pb.candidates`` where the selection
    handed them over).  When the row sums are not finite (a NaN entry, a NaN
    threshold, a non-finite ``g``) the generic
    :func:`topk_core._math.soft_backward` runs instead: the NaN rule is its, at
    no cost to the finite case (an infinite ``x`` is finite here: its ``d``
    and its ``z`` residual are 0).  So does a
    backward that records a graph (grad mode, with ``g``, ``x`` or ``tau``
    requiring grad: the VJP is differentiable), on copies of the residuals:
    the graph may outlive them, and their buffers go back to the pool.
    """
    tau = pb.tau
    sign = 1.0 if pb.largest else -1.0
    ts = (g, pb.x) + ((tau,) if isinstance(tau, torch.Tensor) else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        own = _own_residuals(pb, res)
        grad_x, t = _math.soft_backward(_XP, own, g, tau, pb.valid)
        return (grad_x if pb.largest else -grad_x), t
    if res.d is not None:
        s = _div_signed_(torch.mul(g, res.d), tau, sign)
    elif isinstance(tau, float):
        s = torch.div(g, sign * tau)
    else:
        s = torch.div(g, tau)
        if sign != 1.0:
            s.neg_()
    if pb.valid is not None:
        s.masked_fill_(pb.valid.logical_not(), 0.0)
    total = _row_sum(s)
    # grad_tau = -sum(s z) with s unsigned: -sign times the signed s's
    temp: list = []
    sz = torch.mul(s, res.z, out=_scratch(s.shape, s.dtype, temp))
    rows = _row_sum(sz)
    if not (bool(torch.isfinite(total).all()) and bool(torch.isfinite(rows).all())):
        POOL.give(*temp)
        grad_x, t = _math.soft_backward(_XP, res, g, tau, pb.valid)
        return (grad_x if pb.largest else -grad_x), t
    if pb.tau_shape is None or tau.shape[-1] == 1:
        t = rows.mul_(-sign)  # already summed along the axis tau does not vary on
    else:
        t = sz.mul(-sign)
    del sz
    POOL.give(*temp)
    _subtract_ties(s, res.x, res.a, res.b, pb.valid, total, pb.candidates)
    return s, t


def _div_signed_(t: torch.Tensor, tau: Any, sign: float) -> torch.Tensor:
    """``t /= sign * tau`` in place (nothing for ``sign * tau == 1``); returns ``t``."""
    if isinstance(tau, float):
        if sign * tau != 1.0:
            t.div_(sign * tau)
        return t
    t.div_(tau)
    return t.neg_() if sign != 1.0 else t


def _own_residuals(pb: Any, res: Any) -> Any:
    """Copies of the residuals for a graph, which may outlive their pooled buffers.

    An ``x`` that requires grad is the graph's own input (never pooled): kept.
    """
    return _math.SoftResiduals(
        res.x if res.x.requires_grad else res.x.clone(),
        res.a,
        res.b,
        res.z.clone(),
        None if res.d is None else res.d.clone(),
        res.output,
    )


def closed_form_tangent(pb: Any, res: Any, u: torch.Tensor, dtau: Any) -> torch.Tensor:
    """The torch ``soft`` hook's tangent (eager CPU): see :class:`topk_core.Backend`.

    The transpose of :func:`closed_form_backward`: ``d (u - w.u) / tau`` with
    the kept ``d = p (1 - p)`` (1 for logits), ``w.u`` per row from the tied
    entries alone (:func:`_tie_dot`), ``tau``'s term ``-d z dtau / tau`` from
    the ``z`` residual (its infinities already 0), and the mask: 2-3 kernels,
    2 more with ``dtau``.  For logits a NaN entry keeps its own ``u / tau``
    (the NaN rule; one ``isnan`` scan of ``x``).  A tangent that records a
    graph (grad mode, ``u`` or ``dtau`` requiring grad) or that is not a
    plain CPU tensor (``torch.func``) runs the generic
    :func:`topk_core._math.soft_tangent` instead, on copies of the residuals.
    """
    tau = pb.tau
    sign = 1.0 if pb.largest else -1.0
    ts = [t for t in (u, dtau) if isinstance(t, torch.Tensor)]
    graph = torch.is_grad_enabled() and any(t.requires_grad for t in ts)
    if graph or not all(host_ok(t) for t in ts):
        own = _own_residuals(pb, res)
        return _math.soft_tangent(_XP, own, u, tau, dtau, pb.valid, largest=pb.largest)
    dtheta = _tie_dot(u, res.x, res.a, res.b, pb.valid, pb.candidates)
    out = torch.sub(u, dtheta) if dtheta is not None else None
    nan_x = None
    if res.d is not None:
        # p: a NaN entry's own d is NaN, so its tangent is NaN whatever w.u is
        out = torch.mul(u, res.d) if out is None else out.mul_(res.d)
    else:
        nan_x = torch.isnan(res.x)
        nan_x = nan_x if bool(nan_x.any()) else None
        if out is None:
            out = u.clone(memory_format=torch.contiguous_format)
        elif nan_x is not None:
            out = torch.where(nan_x, u, out)  # NaN rule: it does not move with theta
    _div_signed_(out, tau, sign)
    if dtau is not None:
        # d z, 0 where z is infinite (its residual) and, for logits, at NaN entries
        q = res.z if res.d is None else torch.mul(res.d, res.z)
        if nan_x is not None:
            q = torch.where(nan_x, 0.0, q)
        c = dtau / tau
        if isinstance(c, torch.Tensor):
            finite = bool(torch.isfinite(c.to(out.dtype)).all())
        else:
            finite = abs(c) <= torch.finfo(out.dtype).max
        if not finite:
            # dtau / tau past the range (or a non-finite dtau): z dtau first, as the
            # generic math does, so that a 0 (p (1 - p) underflowed, an infinite z) stays 0
            out.sub_(torch.mul(q, dtau).div_(tau))
        elif isinstance(c, torch.Tensor):
            out.addcmul_(q, c, value=-1)
        else:
            out.add_(q, alpha=-c)
    if pb.valid is not None:
        out.masked_fill_(pb.valid.logical_not(), 0.0)
    return out


_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _select(xm: torch.Tensor, k: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """``(a, b, tie candidates or None)``; ``select_pair`` is looked up here so a swap takes."""
    if select_pair is _backend.select_pair:
        return _backend.select_pair_and_candidates(xm, k)
    a, b = select_pair(_XP, xm, k)
    return a, b, None


def _soft_output(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    tau: float | torch.Tensor,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """The soft ``p`` for the backward, in the compute dtype, from the saved ``x, a, b``.

    Behind a hard (straight-through) forward, and for half precision: the
    half output keeps 8-11 bits of ``p``, so ``1 - p`` near ``p = 1`` keeps
    only a few (``p = 0.998`` in float16: 12% off), an error that ``1 / tau``
    scales up in ``p (1 - p) / tau``; JAX and the closed-form VJP keep the
    float32 ``p`` too.  No new selection.  Under double backward it
    carries d theta / dx (see :func:`_logits`), so the derivatives of every
    order are the soft ones; otherwise :func:`forward_math`'s few eager kernels.
    """
    cdt = _math.compute_dtype(_XP, x.dtype)
    if torch.is_grad_enabled():
        z = _logits(x.to(cdt), a.to(cdt), b.to(cdt), tau, valid, differentiable=True)
        return torch.sigmoid(z)
    return forward_math(x, a, b, tau, valid, "probs", compute=True)


def _unpack(ctx):
    x, tau_t, valid, a, b = ctx.saved_tensors[:5]
    tau = tau_t if tau_t is not None else ctx.tau_float
    cdt = _math.compute_dtype(_XP, x.dtype)
    return x, x.to(cdt), tau, valid, a.to(cdt), b.to(cdt)


class _DFTopKNoJvp(torch.autograd.Function):
    """DFTopK forward and closed-form backward (no ``jvp``: Dynamo cannot trace one).

    Used under ``torch.compile``; see :class:`DFTopKFunction` for the arguments.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, tau, k, valid, output):
        a, b, cand = _select(_math.selection_scores(_XP, x, valid), k)
        # outputs, not views into the selection's buffers: forward AD wants a view
        # output's tangent laid out like it (one value per row to copy)
        a = a.clone() if a._base is not None else a
        b = b.clone() if b._base is not None else b
        if cand is not None:
            # flat positions holding every tie (sampled selection): handed to
            # setup_context on ``a``, so that the Function's outputs stay (out, a, b)
            a._topk_core_candidates = cand
        if output == "hard":
            # straight-through: the mask from this a; the backward recomputes p from x, a, b
            cond = _math.eager_cond if host_ok(x) else None
            return _math.hard_mask(_XP, x, a, valid, k, cond=cond).to(x.dtype), a, b
        return forward_math(x, a, b, tau, valid, output), a, b

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output, differentiable_ab=False)

    @staticmethod
    def backward(ctx, grad_out, grad_a, grad_b):
        x, tau_t, valid, a, b, out = ctx.saved_tensors
        # constants here, also under double backward: the math carries d theta / dx itself
        a, b = a.detach(), b.detach()
        tau = tau_t if tau_t is not None else ctx.tau_float
        tau_grad = tau_t is not None and ctx.needs_input_grad[1]
        grad_x = grad_tau = None
        if grad_out is not None:  # None: only a or b was used (DFTopKFunction)
            half = x.dtype != _math.compute_dtype(_XP, x.dtype)
            if ctx.hard or (ctx.kind == "probs" and half):
                out = _soft_output(x, a, b, tau, valid)
            grad_x, grad_tau = backward_math(
                ctx.kind, x, a, b, out, grad_out, tau, valid, tau_grad, candidates=ctx.candidates
            )
        if grad_a is not None or grad_b is not None:
            cdt = _math.compute_dtype(_XP, x.dtype)
            g_ab = _math.pair_vjp(_XP, x.to(cdt), a.to(cdt), b.to(cdt), valid, grad_a, grad_b)
            grad_x = g_ab.to(x.dtype) if grad_x is None else grad_x + g_ab.to(x.dtype)
        return (grad_x if ctx.needs_input_grad[0] else None), grad_tau, None, None, None


def _setup_context(ctx: Any, inputs: tuple, output: tuple, differentiable_ab: bool) -> None:
    """The Functions' ``setup_context``; ``a`` and ``b`` differentiable only with a jvp."""
    x, tau, _k, valid, kind = inputs
    out, a, b = output
    if differentiable_ab:
        # an unused output's gradient comes as None, not zeros: a and b cost nothing in
        # a backward that does not use them
        ctx.set_materialize_grads(False)
    else:
        ctx.mark_non_differentiable(a, b)
    # "hard": the mask forward, differentiated as "probs"
    ctx.hard = kind == "hard"
    ctx.kind = "probs" if ctx.hard else kind
    tau_t = tau if isinstance(tau, torch.Tensor) else None
    ctx.tau_float = None if tau_t is not None else float(tau)
    # x and the mask are inputs and ``out`` is the output (no new memory);
    # a and b are one value per row
    saved = (x, tau_t, valid, a, b, None if ctx.hard else out)
    ctx.save_for_backward(*saved)
    # the same tuple: torch.vmap's generated rule keeps one record of the saved
    # tensors' batch dims, the last call's, for the backward and the jvp alike
    ctx.save_for_forward(*saved)
    ctx.candidates = getattr(a, "_topk_core_candidates", None)


try:  # private: the transforms (torch.func levels) active around a call
    from torch._functorch.pyfunctorch import (
        retrieve_all_functorch_interpreters as _functorch_interpreters,
    )
except ImportError:
    _functorch_interpreters = None


def _refuse_forward_over_forward() -> None:
    """``NotImplementedError`` where this jvp runs under a second ``torch.func`` jvp level.

    PyTorch runs a custom ``jvp`` with forward AD disabled, so an outer forward
    level (``jacfwd(jacfwd(f))``, a ``jvp`` of a ``jvp``, also one that only
    moves the inner tangent) would get 0 for this output's tangent: a silent
    wrong answer.  ``torch.autograd.forward_ad`` has a single level.
    """
    if _functorch_interpreters is None:  # a torch without this record: nothing to check
        return
    levels = [i for i in _functorch_interpreters() if i.key().name == "Jvp"]
    if len(levels) > 1:
        raise NotImplementedError(
            "topk_core on torch: forward-over-forward differentiation (jacfwd(jacfwd(f)), "
            "torch.func.jvp of a jvp) is not supported: PyTorch runs the operator's custom "
            "jvp with forward AD disabled, so the outer derivative would be 0. Use "
            "torch.func.hessian (forward-over-reverse), jacrev(jacfwd(f)) or jacrev(jacrev(f))"
        )


class DFTopKFunction(_DFTopKNoJvp):
    """DFTopK on normalised inputs with the spec's closed-form VJP and JVP.

    ``apply(x, tau, k, valid, output) -> (out, a, b)``: ``x`` has the selection
    axis last (negated already for ``largest=False``), ``tau`` is a float or a
    tensor broadcasting against ``x`` in the compute dtype, ``k`` a Python int
    or an integer tensor of shape ``x.shape[:-1] + (1,)`` in ``[0, n_valid]``,
    ``valid`` a bool tensor like ``x`` or None, ``output`` ``"probs"``,
    ``"logits"`` or ``"hard"`` (straight-through: the forward is the hard
    top-k mask from the same selection, the derivatives are those of
    ``"probs"``).  ``a``/``b`` (k-th and (k+1)-th largest, per row) are
    returned for saving; their derivative is the mean over each one's ties
    (0 for an infinite one), in both modes: torch.vmap's generated batching
    rule needs their tangents for forward mode around it (``jvp(vmap(f))``,
    ``jacfwd(vmap(f))``), and a backward that does not use them pays nothing
    for them.  Use :func:`topk_core.dftopk` rather than calling this directly.

    Forward-over-forward (``jacfwd(jacfwd(f))``, a ``torch.func.jvp`` of a
    ``jvp``) raises ``NotImplementedError``: PyTorch runs a custom ``jvp`` with
    forward AD disabled, so the outer tangent would silently be 0.
    ``torch.func.hessian`` (forward-over-reverse), reverse-over-forward and
    reverse-over-reverse are exact.  Forward and reverse mode around
    ``torch.vmap`` and ``vmap`` around either work.

    Examples
    --------
    >>> import torch
    >>> from topk_core.adapters.torch_adapter import DFTopKFunction
    >>> x = torch.tensor([[4.0, 1.0, 3.0, 2.0]], requires_grad=True)
    >>> p, a, b = DFTopKFunction.apply(x, 1.0, 2, None, "probs")
    >>> p.sum().backward()
    >>> x.grad
    tensor([[ 0.1491,  0.1491, -0.1491, -0.1491]])
    """

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output, differentiable_ab=True)

    @staticmethod
    def jvp(ctx, x_t, tau_t, _k_t, _valid_t, _kind_t):
        _refuse_forward_over_forward()
        x, xc, tau, valid, a, b = _unpack(ctx)
        # constants, as in the backward: z's straight-through term carries d theta / dx.
        # The saved a and b are this Function's differentiable outputs, so reverse mode
        # over this tangent (jacrev(jacfwd(f))) counted d theta / dx twice through them
        a, b = a.detach(), b.detach()
        z = _logits(xc, a, b, tau, valid, differentiable=True)
        u = torch.zeros_like(xc) if x_t is None else x_t.to(xc.dtype)
        dtau = tau_t if isinstance(tau_t, torch.Tensor) else None
        # a's and b's own tangents too: forward mode around torch.vmap needs them
        d, da, db = _math.jvp(_XP, xc, a, b, z, u, tau, dtau, valid, ctx.kind, pair=True)
        return d.to(x.dtype), da.to(x.dtype), db.to(x.dtype)


def apply_problem(pb: Any, output: str, hard: bool = False) -> torch.Tensor:
    """The torch backend's ``apply`` hook: DFTopK of a normalised problem.

    Parameters
    ----------
    pb : topk_core._problem.Problem
        A validated problem on torch tensors (axis last, negated for
        ``largest=False``; autograd tracks those moves).
    output : {"probs", "logits"}
        Which output to compute.
    hard : bool, default False
        Return the hard top-k mask, differentiated as ``"probs"``
        (straight-through; needs ``output="probs"``).

    Returns
    -------
    torch.Tensor
        The output in the normalised layout, x's dtype.

    Examples
    --------
    >>> import torch
    >>> from topk_core._problem import prepare
    >>> from topk_core.adapters.torch_adapter import apply_problem
    >>> apply_problem(prepare(torch.tensor([4.0, 1.0, 3.0, 2.0]), 2, 0.5, -1, None, True), "logits")
    tensor([ 3., -3.,  1., -1.])
    """
    # Dynamo cannot trace an autograd.Function with a custom jvp; forward AD
    # does not exist inside torch.compile anyway
    fn = _DFTopKNoJvp if torch.compiler.is_compiling() else DFTopKFunction
    out, _, _ = fn.apply(pb.x, pb.tau, pb.k, pb.valid, "hard" if hard else output)
    return out


def _check_learnable_tau(tau: float, log_tau: torch.Tensor) -> None:
    """:func:`topk_core._layer_args.check_learnable_tau` in the parameter's dtype (the
    default dtype, float32 unless changed)."""
    check_learnable_tau(
        tau,
        str(log_tau.dtype).replace("torch.", ""),
        float(log_tau.exp()),
        torch.finfo(log_tau.dtype).smallest_normal,
    )


class SoftTopK(nn.Module):
    """Differentiable top-k layer (DFTopK): ``sigmoid((x - theta) / tau)``.

    ``theta`` lies halfway between the k-th and (k+1)-th largest entries along
    ``axis``; the output is each entry's soft membership in the top k, O(n)
    forward and backward.

    Parameters
    ----------
    k : int
        Number of entries to select (>= 0; at most the size of ``axis`` at call
        time).  A call may override it with ``forward(x, k=...)``, including a
        per-row integer tensor.
    tau : float, default 1.0
        Temperature > 0 (initial value when learnable).
    learnable_tau : bool, default False
        Learn the temperature.  It is stored as the parameter ``log_tau`` and
        used as ``tau = exp(log_tau)``, so gradient steps keep it positive (a
        float32 ``log_tau`` past about -87 or +87 leaves tau's allowed range, and
        the call raises tau's ``ValueError``; an initial tau outside it, such as
        1e-39 in float32, is a ``ValueError`` here).
    axis : int, default -1
        Axis along which to select.
    largest : bool, default True
        Select the k largest (True) or the k smallest (False).
    output : {"probs", "logits"}, default "probs"
        Return probabilities, or the logits ``(x - theta) / tau`` for a
        ``BCEWithLogitsLoss``.
    hard : bool, default False
        Straight-through: return the hard top-k mask (exactly ``min(k,
        n_valid)`` ones per row), differentiated as the soft probabilities.
        Needs ``output="probs"``.

    Examples
    --------
    >>> import torch
    >>> from topk_core.adapters.torch_adapter import SoftTopK
    >>> layer = SoftTopK(2, tau=0.5, learnable_tau=True)
    >>> layer
    SoftTopK(k=2, tau=0.5, learnable_tau=True, axis=-1, largest=True, output='probs')
    >>> p = layer(torch.tensor([4.0, 1.0, 3.0, 2.0]))
    >>> p.detach().round(decimals=3)
    tensor([0.9530, 0.0470, 0.7310, 0.2690])
    >>> p[0].backward()
    >>> layer.log_tau.grad.round(decimals=4)
    tensor(-0.1355)
    """

    def __init__(
        self,
        k: int,
        tau: float = 1.0,
        learnable_tau: bool = False,
        axis: int = -1,
        largest: bool = True,
        output: str = "probs",
        hard: bool = False,
    ) -> None:
        super().__init__()
        args = check_layer_args(k, tau, learnable_tau, axis, largest, output, hard)
        self.k = args.k
        self.hard = args.hard
        self.learnable_tau = args.learnable_tau
        self.axis = args.axis
        self.largest = args.largest
        self.output = args.output
        if learnable_tau:
            log_tau = torch.tensor(math.log(float(tau)))
            _check_learnable_tau(float(tau), log_tau)
            self.log_tau = nn.Parameter(log_tau)
            self._tau = None
        else:
            self.register_parameter("log_tau", None)
            self._tau = float(tau)

    @property
    def tau(self) -> float | torch.Tensor:
        """The temperature: a float, or ``exp(log_tau)`` (a 0-d tensor) when learnable."""
        if self.log_tau is None:
            return self._tau
        return self.log_tau.exp()

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        k: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Soft top-k of ``x`` along ``self.axis``.

        Parameters
        ----------
        x : torch.Tensor
            Scores, floating dtype.
        mask : torch.Tensor of bool, optional
            Valid entries (True); masked entries get 0 (``-inf`` logits).
        k : int or integer tensor, optional
            Overrides ``self.k`` for this call (a tensor gives a per-row k).

        Returns
        -------
        torch.Tensor
            Same shape, dtype and device as ``x``.
        """
        from topk_core import dftopk, dftopk_logits

        k = self.k if k is None else k
        kw = dict(tau=self.tau, axis=self.axis, mask=mask, largest=self.largest)
        if self.output == "logits":
            return dftopk_logits(x, k, **kw)
        return dftopk(x, k, hard=self.hard, **kw)

    def hard_mask(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        k: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The matching hard 0/1 top-k mask (:func:`topk_core.topk_mask`), e.g. for labels."""
        from topk_core import topk_mask

        k = self.k if k is None else k
        return topk_mask(x, k, axis=self.axis, mask=mask, largest=self.largest)

    def extra_repr(self) -> str:
        if self.log_tau is None:
            tau = self._tau
        else:
            log_tau = self.log_tau.detach()
            # a meta or fake (subclass) parameter has no value to print
            if log_tau.device.type == "meta" or type(log_tau) is not torch.Tensor:
                tau = "exp(log_tau)"
            else:
                tau = float(f"{float(log_tau.exp()):.6g}")  # 6 significant digits, any scale
        return (
            f"k={self.k}, tau={tau}, learnable_tau={self.learnable_tau}, axis={self.axis}, "
            f"largest={self.largest}, output={self.output!r}"
        ) + (", hard=True" if self.hard else "")
