"""PyTorch modules for the top-k losses of :mod:`topk_core.losses`.

``TopKBCELoss`` and ``CascadeJointLoss`` are thin ``torch.nn.Module`` wrappers:
the math lives once in :mod:`topk_core.losses` (Array API), gradients come from
torch autograd through :func:`topk_core.dftopk_logits`.  ``CascadeJointLoss``
owns the learned uncertainty weights (log-variances) as an ``nn.Parameter``, so
the optimiser that trains the stage models trains them too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from topk_core._layer_args import check_axis, check_tau
from topk_core.losses import (
    _REDUCTIONS,
    _check_int_stages,
    _check_reduction,
    cascade_joint_loss,
    topk_bce_loss,
)

__all__ = ["CascadeJointLoss", "TopKBCELoss"]


class TopKBCELoss(nn.Module):
    """BCE between DFTopK membership of ``scores`` and the true top-k set.

    See :func:`topk_core.losses.topk_bce_loss` for the definition.

    Parameters
    ----------
    k : int
        Size of the top-k set (a per-row integer tensor can be passed to
        :meth:`forward` instead).
    tau : float, default 1.0
        DFTopK temperature.
    reduction : {"mean", "sum", "none"}, default "mean"
        Reduction over the valid entries.
    axis : int, default -1
        The list axis.

    Examples
    --------
    >>> import torch
    >>> from topk_core.adapters.torch_losses import TopKBCELoss
    >>> loss_fn = TopKBCELoss(k=2, tau=0.5)
    >>> scores = torch.tensor([[2.0, 0.5, 1.0, -1.0]], requires_grad=True)
    >>> relevance = torch.tensor([[3.0, 0.0, 2.0, 1.0]])
    >>> loss = loss_fn(scores, relevance)
    >>> loss.backward()
    >>> round(loss.item(), 4), scores.grad.shape
    (0.2642, torch.Size([1, 4]))
    """

    def __init__(self, k: int, tau: float = 1.0, reduction: str = "mean", axis: int = -1) -> None:
        super().__init__()
        _check_k(k)
        # the checks the loss runs on every call, at construction: a bad module fails here
        check_tau(tau)
        _check_reduction(reduction, _REDUCTIONS)
        check_axis(axis)
        self.k = k
        self.tau = float(tau)
        self.reduction = reduction
        self.axis = axis

    def forward(
        self,
        scores: torch.Tensor,
        relevance: torch.Tensor,
        mask: torch.Tensor | None = None,
        k: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of ``scores`` (``mask``: valid entries; ``k`` overrides the module's k)."""
        return topk_bce_loss(
            scores,
            relevance,
            self.k if k is None else k,
            tau=self.tau,
            mask=mask,
            reduction=self.reduction,
            axis=self.axis,
        )

    def extra_repr(self) -> str:
        return f"k={self.k}, tau={self.tau}, reduction={self.reduction!r}, axis={self.axis}"


class CascadeJointLoss(nn.Module):
    """LCRON-style joint loss of a multi-stage cascade with learned weights.

    ``L = sum_t exp(-s_t) L_t + s_t`` over the end-to-end term ``L_0`` and the
    per-stage terms ``L_1..L_m`` (see
    :func:`topk_core.losses.cascade_joint_loss`), with the log-variances
    ``s = self.log_vars`` an ``nn.Parameter`` of shape ``(m + 1,)``.  With
    ``learn_weights=False`` the terms are combined with fixed ``weights``
    (default all 1) and the module has no parameters.

    Parameters
    ----------
    k : int or sequence of int
        Candidates kept by each stage (one value for all stages, or one per
        stage; the last is the size of the true top-k set).
    n_stages : int, default 2
        Number of stages (>= 2).
    tau : float or sequence of float, default 1.0
        DFTopK temperature, shared or per stage.
    learn_weights : bool, default True
        Learn uncertainty weights (``log_vars``).
    weights : sequence of float, optional
        Fixed weights when ``learn_weights=False``.
    init_log_var : float, default 0.0
        Initial value of every ``s_t``.
    reduction : {"mean", "sum"}, default "mean"
        Reduction of each term over the valid entries.
    axis : int, default -1
        The candidate-list axis.

    Examples
    --------
    >>> import torch
    >>> from topk_core.adapters.torch_losses import CascadeJointLoss
    >>> loss_fn = CascadeJointLoss(k=(3, 2))
    >>> retrieval = torch.tensor([[2.0, 0.5, 1.0, -1.0, 0.0]], requires_grad=True)
    >>> ranking = torch.tensor([[1.5, -0.5, 2.0, 0.0, 1.0]], requires_grad=True)
    >>> relevance = torch.tensor([[3.0, 0.0, 2.0, 1.0, 0.5]])
    >>> loss = loss_fn([retrieval, ranking], relevance)
    >>> loss.backward()
    >>> round(loss.item(), 4), loss_fn.log_vars.grad.shape
    (1.4525, torch.Size([3]))
    """

    def __init__(
        self,
        k: int | Sequence[int],
        n_stages: int = 2,
        tau: float | Sequence[float] = 1.0,
        learn_weights: bool = True,
        weights: Sequence[float] | None = None,
        init_log_var: float = 0.0,
        reduction: str = "mean",
        axis: int = -1,
    ) -> None:
        super().__init__()
        if isinstance(n_stages, bool) or not isinstance(n_stages, int) or n_stages < 2:
            raise ValueError(f"n_stages must be an int >= 2, got {n_stages!r}")
        if isinstance(k, (list, tuple)):
            if len(k) != n_stages:
                raise ValueError(f"k has {len(k)} entries but n_stages is {n_stages}")
            for kj in k:
                _check_k(kj)
            for j in range(1, n_stages):
                _check_int_stages(k[j - 1], k[j], j)
            k = tuple(k)
        else:
            _check_k(k)
        if isinstance(tau, (list, tuple)):
            if len(tau) != n_stages:
                raise ValueError(f"tau has {len(tau)} entries but n_stages is {n_stages}")
            for t in tau:
                check_tau(t)
        else:
            check_tau(tau)
        _check_reduction(reduction, ("mean", "sum"))
        check_axis(axis)
        if learn_weights and weights is not None:
            raise ValueError("weights are fixed weights: pass them with learn_weights=False")
        if not math.isfinite(init_log_var):
            raise ValueError(f"init_log_var must be finite, got {init_log_var!r}")
        self.k = k
        self.n_stages = n_stages
        self.tau = tuple(float(t) for t in tau) if isinstance(tau, (list, tuple)) else float(tau)
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        self.reduction = reduction
        self.axis = axis
        if learn_weights:
            self.log_vars = nn.Parameter(torch.full((n_stages + 1,), float(init_log_var)))
        else:
            self.register_parameter("log_vars", None)

    def forward(
        self,
        stage_scores: Sequence[torch.Tensor],
        relevance: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_terms: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Joint loss of ``stage_scores`` (one tensor per stage, cascade order)."""
        if not isinstance(stage_scores, (list, tuple)):
            # a stacked tensor would be split into its rows, one "stage" each
            raise TypeError(
                f"stage_scores must be a list or tuple of {self.n_stages} score tensors "
                f"(one per stage), got {type(stage_scores).__name__}"
            )
        if len(stage_scores) != self.n_stages:
            raise ValueError(
                f"expected {self.n_stages} stage score tensors, got {len(stage_scores)}"
            )
        log_vars = self.log_vars
        if log_vars is not None and log_vars.device != stage_scores[0].device:
            raise ValueError(
                f"the module is on {log_vars.device} but the scores are on "
                f"{stage_scores[0].device}; move the module with .to(device)"
            )
        return cascade_joint_loss(
            list(stage_scores),
            relevance,
            self.k,
            tau=self.tau,
            mask=mask,
            weights=self.weights,
            log_vars=log_vars,
            reduction=self.reduction,
            axis=self.axis,
            return_terms=return_terms,
        )

    def term_weights(self) -> torch.Tensor:
        """Current effective weights ``exp(-s_t)`` (or the fixed ones), detached."""
        if self.log_vars is None:
            w = self.weights or (1.0,) * (self.n_stages + 1)
            return torch.tensor(w)
        return torch.exp(-self.log_vars.detach())

    def extra_repr(self) -> str:
        learned = self.log_vars is not None
        return f"k={self.k}, n_stages={self.n_stages}, tau={self.tau}, learned_weights={learned}"


def _check_k(k: object) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(
            f"k must be an int (pass per-row integer tensors to forward), got {type(k).__name__}"
        )
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
