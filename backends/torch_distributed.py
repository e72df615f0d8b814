"""PyTorch scale-out: ``group=`` a ``torch.distributed`` process group.

Each rank passes its shard of a selection axis split across the ranks of the
group, in rank order; ``k`` is global.  Selection is the project's shared
radix driver (:func:`topk_core._radix.radix_select_pair`) with torch shims:

* keys: the order-preserving float -> integer mapping in the *signed* integer
  type of the float's width (:func:`topk_core._radix.float_to_signed_keys`):
  torch's unsigned 32/64-bit types lack comparisons, so the driver reads the
  sign from the key dtype and flips the top digit;
* per-row histogram: one ``bincount`` over ``row * bins + digit`` of the
  active entries on the CPU; on CUDA an ``index_add_`` of the active flags
  instead (``bincount`` and boolean compaction would read sizes on the host);
* collectives: ``all_reduce`` (SUM) of each pass's per-row histogram, one
  ``all_reduce`` (MAX) of a per-row key, ``all_gather`` of per-row tie counts
  for ``topk_mask``: ``passes x 256`` counts per row, whatever the axis length.

The forward runs through its own ``torch.autograd.Function``
(:class:`GroupDFTopKFunction`) whose backward all-reduces the same per-row
sums as the VJP (``sum(s)`` and the tie counts), so ``x.grad`` is the
gradient of the sum of every rank's loss; it also has a forward-mode ``jvp``.
A ``tau`` tensor's gradient is this rank's contribution, as for any parameter
(all-reduce it, or let DistributedDataParallel do so, when ``tau`` is shared by
the ranks).  With ``create_graph=True`` the backward is built from
differentiable ops and autograd-aware all-reduces, so double backward (e.g.
Hessian-vector products) and forward over reverse (``torch.func.jvp`` of
``torch.func.grad``) work across the ranks too.  ``torch.func.vmap`` (and so
``jacrev``, ``jacfwd``, ``hessian``) works through batching rules of the
selection, the forward and every collective: the mapped slices become one
more batch axis of the physical call, the same on every rank (checked on CPU
tensors, so ranks that map over different sizes, e.g. ``jacrev`` over shards of
unequal length, raise a ``ValueError`` instead of aborting in gloo).

Checks: on CPU tensors (gloo) every call first all-gathers each rank's axis
length, dtype, batch shape and ``k`` (an int, or a digest of a per-row ``k``
tensor's shape and values; one small message), so shards of different dtypes
or shapes, ranks passing different ``k`` and a ``k`` above the global length
raise the same clear error on every rank instead of hanging in a mismatched
collective or answering a mix of ranks.  On CUDA
that check would need a host synchronisation and is skipped: a scalar ``k``
is then clipped to the global length on the device, like an array ``k``.
None of the CUDA/NCCL paths has been run (no GPU was available); they use
only ops that do not synchronise with the host.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import array_api_compat
import torch
import torch.distributed as dist

from topk_core import _math
from topk_core._group import row_sum_of
from topk_core._radix import float_to_signed_keys, radix_select_pair, signed_keys_to_float

__all__ = ["DIGIT_BITS", "GroupDFTopKFunction", "TorchGroup", "TorchShims", "resolve_group"]

DIGIT_BITS = 8
_XP = array_api_compat.array_namespace(torch.empty(0))
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def _view(a: torch.Tensor, dtype: Any) -> torch.Tensor:
    return a.view(dtype)


class TorchShims:
    """Radix shims for torch: signed keys, a per-row histogram without host reads on CUDA."""

    def to_keys(self, x: torch.Tensor) -> torch.Tensor:
        return float_to_signed_keys(_XP, x, _view)

    def from_keys(self, keys: torch.Tensor, dtype: Any) -> torch.Tensor:
        return signed_keys_to_float(_XP, keys, dtype, _view)

    def row_histogram(self, digits: torch.Tensor, active: Any, nbins: int) -> Any:
        lead = tuple(digits.shape[:-1])
        n = digits.shape[-1]
        rows = math.prod(lead)
        flat = digits.reshape(rows, n).to(torch.int64)
        if rows > 1:
            flat = flat + torch.arange(rows, device=flat.device).mul_(nbins)[:, None]
        act = None if active is None else active.reshape(rows, n)
        if flat.device.type == "cpu":
            kept = flat.reshape(-1) if act is None else flat[act]
            counts = torch.bincount(kept, minlength=rows * nbins)
        else:
            counts = torch.zeros(rows * nbins, dtype=torch.int64, device=flat.device)
            ones = torch.ones_like(flat) if act is None else act.to(torch.int64)
            counts.index_add_(0, flat.reshape(-1), ones.reshape(-1))
        return counts.reshape(lead + (nbins,))


SHIMS = TorchShims()


class TorchGroup:
    """Collectives of one process group (:class:`topk_core._group.Group`).

    Shard order is the rank within ``group``.
    """

    def __init__(self, group: Any, shard: tuple[torch.Tensor, int] | None) -> None:
        self.pg = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        # (x, axis) until the call's handshake (CPU tensors only) has run; then the
        # global axis length is known
        self._shard = shard
        self.n_total: int | None = None
        self.label = f"torch.distributed group of {self.size} ranks"

    def _gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's ``values`` (the same count on each), in rank order."""
        t = torch.tensor(values, dtype=torch.int64)
        every = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(every, t, group=self.pg)
        return [e.tolist() for e in every]

    def _reduce(self, v: torch.Tensor, op: Any) -> torch.Tensor:
        # c10d collectives are in place and not autograd-aware: reduce a detached copy
        t = v.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t, op=op, group=self.pg)
        return t

    def sum(self, v: torch.Tensor) -> torch.Tensor:
        # through the Function always: on a graph (double backward) it is differentiable,
        # under torch.func.vmap it has a batching rule (c10d collectives have none)
        return _GroupSum.apply(v, self)

    def check_batch(self, size: int, device: Any) -> None:
        """Under ``torch.func.vmap`` every rank must map over the same number of slices.

        The batched collectives would otherwise mismatch between ranks (an
        error or a hang); one small all-gather, on CPU tensors (gloo) only, like
        the call's handshake.
        """
        if device.type != "cpu":
            return
        sizes = [e[0] for e in self._gather_ints([size])]
        if len(set(sizes)) > 1:
            raise ValueError(
                f"torch.func.vmap over a call with group=: the ranks map over different "
                f"batch sizes (by rank: {sizes}); every rank must vmap over as many slices "
                f"(torch.func.jacrev/jacfwd/hessian map over this rank's outputs or inputs: "
                f"shards of equal length)"
            )

    def check_same_k(self, k: Any) -> None:
        """The call's handshake, with ``k`` (an int, an array ``k``, or None for none).

        Every rank must pass the same ``k``: each rank's selection would
        otherwise look for a different rank of one global row (a silently wrong
        answer).  An int rides in the handshake's one all-gather as its value, a
        per-row ``k`` tensor as a digest of its shape and values (CPU tensors
        only; elsewhere there is no handshake and ``n_total`` stays None).
        """
        if self._shard is None:
            return
        x, axis = self._shard
        self._shard = None
        self.n_total = _handshake(self, x, axis, k)

    def max(self, v: torch.Tensor) -> torch.Tensor:
        return _GroupOp.apply(v, self, "max")

    def exclusive_sum(self, v: torch.Tensor) -> torch.Tensor:
        return _GroupOp.apply(v, self, "exclusive_sum")

    def _max(self, v: torch.Tensor) -> torch.Tensor:
        # gloo has no int16 reductions: widening keeps the signed keys' order
        return self._reduce(v.to(torch.int64), dist.ReduceOp.MAX).to(v.dtype)

    def _exclusive_sum(self, v: torch.Tensor) -> torch.Tensor:
        t = v.detach().contiguous()
        every = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(every, t, group=self.pg)
        out = torch.zeros_like(t)
        for r in range(self.rank):
            out = out + every[r]
        return out

    def total(self, n_local: int) -> int | None:
        if self._shard is not None:  # no check_same_k before: the handshake without k
            self.check_same_k(None)
        return self.n_total

    def select_pair(self, xp: Any, x: torch.Tensor, k: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return _GroupSelect.apply(x.detach(), k, self)

    def apply(self, pb: Any, output: str, hard: bool = False) -> torch.Tensor:
        kind = "hard" if hard else output
        out, _, _ = GroupDFTopKFunction.apply(pb.x, pb.tau, pb.k, pb.valid, kind, self)
        return out


class _GroupSum(torch.autograd.Function):
    """All-reduce (SUM) that autograd can differentiate, to any order.

    Every rank holds the same sum of every rank's ``v``, so the adjoint of one
    rank's ``v`` is the sum of every rank's cotangent: another all-reduce; so is
    the tangent (forward mode).  (``torch.distributed.nn.functional.all_reduce``
    differentiates the same way in reverse mode, but as an old-style Function
    that ``torch.func`` transforms refuse, and without a ``jvp``.)
    """

    @staticmethod
    def forward(v: torch.Tensor, group: TorchGroup) -> torch.Tensor:
        return group._reduce(v, dist.ReduceOp.SUM)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _GroupSum.apply(grad, ctx.group), None

    @staticmethod
    def jvp(ctx: Any, v_t: torch.Tensor, _group_t: Any) -> torch.Tensor:
        # linear: the tangent of the sum is the sum of every rank's tangent
        return _GroupSum.apply(v_t, ctx.group)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, v: torch.Tensor, group: TorchGroup) -> tuple:
        return _vmap_collective(_GroupSum, info, in_dims, v, group)


class _GroupOp(torch.autograd.Function):
    """A collective without a gradient (a key maximum, exclusive sums of tie counts),
    with a batching rule for ``torch.func.vmap``."""

    @staticmethod
    def forward(v: torch.Tensor, group: TorchGroup, op: str) -> torch.Tensor:
        return group._max(v) if op == "max" else group._exclusive_sum(v)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.mark_non_differentiable(output)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, v: torch.Tensor, group: TorchGroup, op: str) -> tuple:
        return _vmap_collective(_GroupOp, info, in_dims, v, group, op)


class _GroupSelect(torch.autograd.Function):
    """The group's (a, b) selection, with a batching rule for ``torch.func.vmap``: the
    mapped slices are one more batch axis of one physical selection (the radix
    driver's compaction and collectives cannot take batched tensors)."""

    @staticmethod
    def forward(x: torch.Tensor, k: Any, group: TorchGroup) -> tuple[torch.Tensor, torch.Tensor]:
        return radix_select_pair(_XP, x, k, SHIMS, digit_bits=DIGIT_BITS, group=group)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.mark_non_differentiable(*output)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: torch.Tensor, k: Any, group: TorchGroup) -> tuple:
        size = info.batch_size
        group.check_batch(size, x.device)
        x, k = _batched(x, in_dims[0], size), _batched(k, in_dims[1], size)
        a, b = _GroupSelect.apply(x, k, group)
        return (a, b), (0, 0)


def _vmap_collective(fn: Any, info: Any, in_dims: tuple, v: torch.Tensor, *args: Any) -> tuple:
    """The batching rule of a one-tensor collective ``fn.apply(v, group, ...)``: the
    mapped slices are one more batch axis of the reduced tensor, the same on every rank."""
    v = _batched(v, in_dims[0], info.batch_size)
    args[0].check_batch(info.batch_size, v.device)
    return fn.apply(v, *args), 0


def _batched(t: Any, dim: int | None, size: int) -> Any:
    """``t`` with its vmapped axis first (an unmapped tensor expanded to ``size``)."""
    if not isinstance(t, torch.Tensor):
        return t
    if dim is None:
        return t.unsqueeze(0).expand((size,) + tuple(t.shape))
    return t.movedim(dim, 0)


def resolve_group(group: Any, x: torch.Tensor, axis: int) -> TorchGroup | None:
    """The public API's ``group=`` for torch tensors: a ``torch.distributed`` ProcessGroup.

    None for a group of one rank: its shard is the whole axis, and the call runs
    the single-process path (the group's radix driver and generic math were 5-13x
    slower there: 1e6 entries, forward + backward).

    Examples
    --------
    >>> import torch
    >>> from topk_core.backends.torch_distributed import resolve_group
    >>> resolve_group("d", torch.ones(3), 0)
    Traceback (most recent call last):
    ...
    TypeError: group for torch tensors must be a torch.distributed ProcessGroup ...
    """
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group for torch tensors must be a torch.distributed ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD after init_process_group), got "
            f"{type(group).__name__} {group!r}"
        )
    if not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized (init_process_group)")
    if dist.get_rank(group) < 0:
        raise ValueError("group: this process is not a member of the given process group")
    backend = str(dist.get_backend(group))
    if x.device.type == "cpu" and "gloo" not in backend and "cpu:" not in backend:
        raise TypeError(
            f"group uses the {backend!r} backend, which has no CPU collectives, but x is a "
            f"CPU tensor; use a gloo group (or move x to CUDA for NCCL)"
        )
    if dist.get_world_size(group) == 1:
        return None
    return TorchGroup(group, (x, axis) if x.device.type == "cpu" else None)


def _k_entry(k: Any) -> list[int]:
    """``k`` for the handshake: ``[1, value]`` for an int, ``[2, digest]`` for an integer
    tensor on the CPU (its shape and values: the same on every rank, unlike ``hash``,
    which is salted per process), ``[0, 0]`` otherwise (nothing to compare: a kind of
    argument the call rejects on every rank anyway, None, or a tensor without values on
    the host, as under ``torch.func.vmap``)."""
    if isinstance(k, int):
        return [1, k]
    if (
        isinstance(k, torch.Tensor)
        and k.device.type == "cpu"
        and not k.is_floating_point()
        and not k.is_complex()
        and k.dtype != torch.bool
    ):
        try:
            values = k.detach().to(torch.int64).contiguous().numpy().tobytes()
        except RuntimeError:  # no values on the host: a torch.func-batched (or fake) tensor
            return [0, 0]
        h = hashlib.blake2b(repr(tuple(k.shape)).encode() + values, digest_size=7)
        return [2, int.from_bytes(h.digest(), "little")]
    return [0, 0]


def _handshake(group: TorchGroup, x: torch.Tensor, axis: int, k: Any) -> int:
    """All-gather every rank's (axis length, dtype, batch shape, k); check; the global length."""
    batch = tuple(x.shape[:axis]) + tuple(x.shape[axis + 1 :])
    code = _DTYPE_CODES.get(x.dtype, 0)
    # the batch shape as (ndim, numel, a hash): equal shapes give equal triples; k as
    # (kind, value or digest): _k_entry
    info = [x.shape[axis], code, len(batch), math.prod(batch), hash(batch) % (2**62)]
    every = group._gather_ints(info + _k_entry(k))
    names = {v: str(k).replace("torch.", "") for k, v in _DTYPE_CODES.items()}
    dtypes = [names.get(int(e[1]), "?") for e in every]
    if len(set(dtypes)) > 1:
        raise ValueError(
            f"x: the shards of the group have different dtypes (by rank: {dtypes}); every "
            f"rank must pass the same floating dtype"
        )
    if len({tuple(e[2:5]) for e in every}) > 1:
        raise ValueError(
            f"x: the shards of the group have different batch shapes (x's shape without axis "
            f"{axis}; this rank: {batch}); only the selection axis may differ between ranks"
        )
    if len({tuple(e[5:]) for e in every}) > 1:
        kinds = {1: None, 2: "an array", 0: "another kind"}
        ks = [kinds[int(e[5])] or e[6] for e in every]
        arrays = [e[6] for e in every if e[5] == 2]
        extra = " (per-row k arrays of different shapes or values)" if len(set(arrays)) > 1 else ""
        raise ValueError(
            f"k: the ranks of the group passed different values (by rank: {ks}){extra}; "
            f"every rank must pass the same k, the size of the top-k set of the whole row"
        )
    return int(sum(int(e[0]) for e in every))


def _graph_backward(
    kind: str,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    tau: float | torch.Tensor,
    valid: torch.Tensor | None,
    row_sum: Any,
    want_tau: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backward as differentiable ops (``create_graph=True``): double backward.

    ``z`` carries d theta / dx = w, with ``theta``'s linearisation summed over
    the group, and every per-row sum is the autograd-aware all-reduce
    (:meth:`TorchGroup.sum`), so a second backward on every rank sees all the
    ranks' terms; ``w`` is locally constant.  Returns ``(grad_x, grad_tau)``
    (this rank's share of ``grad_tau`` where ``want_tau``, else None), compute
    dtype.
    """
    from topk_core.adapters.torch_adapter import _logits, graph_vjp

    z = _logits(x, a, b, tau, valid, differentiable=True, row_sum=row_sum)
    s = g if kind == "logits" else g * _math.sigmoid_grad(_XP, z)
    return graph_vjp(x, a, b, s, tau, valid, want_tau, row_sum=row_sum)


def _unpack(ctx: Any) -> tuple:
    x, tau_t, valid, a, b = ctx.saved_tensors[:5]
    tau = tau_t if tau_t is not None else ctx.tau_float
    cdt = _math.compute_dtype(_XP, x.dtype)
    return x, x.to(cdt), tau, valid, a.to(cdt), b.to(cdt)


class GroupDFTopKFunction(torch.autograd.Function):
    """DFTopK on one shard of a distributed axis, with the closed-form VJP and JVP.

    ``apply(x, tau, k, valid, output, group) -> (out, a, b)`` on normalised
    inputs (as :class:`topk_core.adapters.torch_adapter.DFTopKFunction`, plus
    the :class:`TorchGroup`).  Backward all-reduces ``sum(s)`` and the tie
    counts; the tau-gradient is this rank's contribution.  Use
    ``topk_core.dftopk(x, k, group=...)`` rather than calling this directly.
    """

    @staticmethod
    def forward(x, tau, k, valid, output, group):
        a, b = group.select_pair(_XP, _math.selection_scores(_XP, x, valid), k)
        cdt = _math.compute_dtype(_XP, x.dtype)
        xc = x.to(cdt)
        if output == "hard":
            # straight-through: the global hard mask (ties by lower global index)
            out = _math.hard_mask(_XP, x, a, valid, k, group=group)
            return out.to(x.dtype), a, b
        z = _math.logits(_XP, xc, a.to(cdt), b.to(cdt), tau, valid, eager=x.device.type == "cpu")
        out = torch.sigmoid(z) if output == "probs" else z
        return out.to(x.dtype), a, b

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, tau, _k, valid, kind, group = inputs
        _out, a, b = output
        ctx.mark_non_differentiable(a, b)
        # "hard": the mask forward, differentiated as "probs"
        ctx.kind = "probs" if kind == "hard" else kind
        ctx.group = group
        tau_t = tau if isinstance(tau, torch.Tensor) else None
        ctx.tau_float = None if tau_t is not None else float(tau)
        ctx.save_for_backward(x, tau_t, valid, a, b)
        ctx.save_for_forward(x, tau_t, valid, a, b)

    @staticmethod
    def backward(ctx, grad_out, _grad_a, _grad_b):
        x, xc, tau, valid, a, b = _unpack(ctx)
        row_sum = row_sum_of(_XP, ctx.group)
        g = grad_out.to(xc.dtype)
        want_tau = isinstance(tau, torch.Tensor) and ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            grad_x, grad_tau = _graph_backward(ctx.kind, xc, a, b, g, tau, valid, row_sum, want_tau)
        else:
            z = _math.logits(_XP, xc, a, b, tau, valid, eager=x.device.type == "cpu")
            grad_x, t = _math.vjp(_XP, xc, a, b, z, g, tau, valid, ctx.kind, row_sum=row_sum)
            # this rank's contribution, like any parameter's gradient under DDP
            grad_tau = t.sum_to_size(tau.shape).to(tau.dtype) if want_tau else None
        grad_x = grad_x.to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_tau, None, None, None, None

    @staticmethod
    def jvp(ctx, x_t, tau_t, _k_t, _valid_t, _kind_t, _group_t):
        from topk_core.adapters.torch_adapter import _refuse_forward_over_forward

        _refuse_forward_over_forward()
        x, xc, tau, valid, a, b = _unpack(ctx)
        row_sum = row_sum_of(_XP, ctx.group)
        if torch.is_grad_enabled() and xc.requires_grad:
            # reverse mode over this tangent needs d theta / dx (a and b are constants):
            # the straight-through z of the backward's graph (one more all-reduce, only
            # where x is differentiated)
            from topk_core.adapters.torch_adapter import _logits

            z = _logits(xc, a, b, tau, valid, differentiable=True, row_sum=row_sum)
        else:
            z = _math.logits(_XP, xc, a, b, tau, valid, eager=x.device.type == "cpu")
        u = torch.zeros_like(xc) if x_t is None else x_t.to(xc.dtype)
        dtau = tau_t if isinstance(tau_t, torch.Tensor) else None
        d = _math.jvp(_XP, xc, a, b, z, u, tau, dtau, valid, ctx.kind, row_sum=row_sum)
        return d.to(x.dtype), None, None

    @staticmethod
    def vmap(info, in_dims, x, tau, k, valid, output, group):
        # the mapped slices become one more leading batch axis of every shard (the
        # collectives cannot take batched tensors): same shapes on every rank
        size = info.batch_size
        group.check_batch(size, x.device)
        # an unmapped tau tensor is expanded like the rest: a view, whose gradient autograd
        # sums back to tau's own shape
        x, tau, k, valid = (_batched(t, d, size) for t, d in zip((x, tau, k, valid), in_dims))
        return GroupDFTopKFunction.apply(x, tau, k, valid, output, group), (0, 0, 0)
