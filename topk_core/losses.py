"""Top-k losses on DFTopK logits: single-stage BCE and the cascade joint loss.

Written once against the Array API, so they run on every backend; gradients
come from the framework's autodiff flowing through
:func:`topk_core.dftopk_logits` (torch autograd, JAX custom rules) and the
elementwise ``xp`` operations used here.

Numerics.  Every log-probability is a log-sigmoid of a DFTopK logit,
``log sigmoid(z) = -softplus(-z)`` with ``softplus(t) = max(t, 0) +
log1p(exp(-|t|))`` (the stable form of ``logaddexp(0, t)``): no ``log(p +
eps)``, no overflow, relative accuracy in the tails, and bounded derivatives
also at ``z = +-inf`` (masked entries have ``z = -inf``; infinite scores or a
tiny ``tau`` give infinite logits).  ``log(1 - prod_j p_j)`` is computed from
the telescoping identity

``1 - p_1 p_2 ... p_m = sum_j (1 - p_j) p_1 ... p_{j-1}``,

a log-sum-exp of log-sigmoids: every term is positive, so there is no
cancellation even where the product rounds to 1 (where ``log1mexp`` of the
summed log-probabilities would return ``-inf``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import array_api_compat

from . import _math
from ._api import named_logits, named_topk_mask
from ._problem import _check_same_library, _is_bool, check_x, host_values, is_real_floating
from ._registry import get_backend, under_errstate

Array = Any

__all__ = ["cascade_joint_loss", "topk_bce_loss"]

_REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------
# elementwise pieces


def _softplus(xp: Any, t: Array) -> Array:
    """``log(1 + exp(t))``; derivative ``sigmoid(t)`` stays finite at ``t = +-inf``.

    ``max(t, 0) + log1p(exp(-|t|))`` with both kinks built from ``where(t > 0, ...)``
    instead of ``maximum``/``abs``, whose derivatives at ``t = 0`` are each library's
    convention (JAX: ``|t|' = 1`` there, which made ``softplus'(0)`` 0, not 1/2, for
    every score exactly at the threshold).  Here, at ``t = 0``, ``max(t, 0)`` has
    derivative 0 and ``-|t|`` derivative 1, so the sum's is ``sigmoid(0) = 1/2``
    under any autodiff.
    """
    pos = t > 0
    return xp.where(pos, t, xp.zeros_like(t)) + xp.log1p(xp.exp(xp.where(pos, -t, t)))


def _bce_elementwise(xp: Any, z: Array, positive: Array) -> Array:
    """BCE with logits for hard labels: ``softplus(-z)`` if positive else ``softplus(z)``.

    Selecting the sign before the softplus (instead of ``softplus(z) - y z``)
    keeps ``inf - inf`` out when ``z`` is infinite.
    """
    return _softplus(xp, xp.where(positive, -z, z))


def _joint_bce_elementwise(xp: Any, zs: Sequence[Array], positive: Array) -> Array:
    """BCE of the joint probability ``q = prod_j sigmoid(z_j)`` against hard labels.

    Positive: ``-log q = sum_j softplus(-z_j)``.  Negative: ``-log(1 - q)`` with
    ``log(1 - q) = logsumexp_j [log(1 - p_j) + sum_{l<j} log p_l]``.
    """
    neg_sp = [_softplus(xp, -z) for z in zs]  # -log p_j
    pos_loss = neg_sp[0]
    for t in neg_sp[1:]:
        pos_loss = pos_loss + t
    terms = []
    prefix = None  # sum_{l<j} log p_l
    for j, z in enumerate(zs):
        term = -_softplus(xp, z)  # log(1 - p_j)
        if prefix is not None:
            term = term + prefix
        terms.append(term)
        prefix = -neg_sp[j] if prefix is None else prefix - neg_sp[j]
    stacked = xp.stack(terms, axis=0)
    m = xp.max(stacked, axis=0)
    # all terms -inf (q = 1 exactly: every stage saturated): keep -inf - -inf out
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    total = xp.sum(xp.exp(stacked - m), axis=0)
    # total = 0 (q = 1) makes the negative loss +inf; keep log(0) out of the
    # arithmetic: no warning, and no log'(0) = inf in the unselected side of a
    # where (that would turn the gradient of positives into NaN).  A NaN total (a
    # NaN score) stays NaN: ``total > 0`` would have made it +inf
    none = total == 0
    safe = xp.where(none, xp.ones_like(total), total)
    inf = xp.asarray(xp.inf, dtype=total.dtype)
    neg_loss = xp.where(none, inf, -(m + xp.log(safe)))
    return xp.where(positive, pos_loss, neg_loss)


def _reduce(xp: Any, elem: Array, valid: Array | None, reduction: str) -> Array:
    """Zero the masked entries, then 'none' / 'sum' / 'mean' over valid entries."""
    if valid is not None:
        elem = xp.where(valid, elem, xp.zeros_like(elem))
    if reduction == "none":
        return elem
    if reduction == "sum":
        return xp.sum(elem)
    if valid is None:
        count = max(math.prod(elem.shape), 1)
    else:
        count = xp.sum(xp.astype(valid, elem.dtype))
        # a batch without any valid entry has mean loss 0, not 0/0
        count = xp.maximum(count, xp.ones_like(count))
    # divided before the sum: a mean in range whose sum is not (entries near the
    # dtype's largest value) stays finite
    return xp.sum(elem / count)


# ---------------------------------------------------------------------------
# validation


def _check_reduction(reduction: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")


def _validate_relevance(xp: Any, relevance: Any, scores: Any, lib: str, name: str) -> None:
    _check_same_library(relevance, "relevance", lib, {"x": name})
    if not is_real_floating(xp, relevance.dtype):
        raise TypeError(
            f"relevance must have a real floating dtype (cast integer or bool labels "
            f"first), got {relevance.dtype}"
        )
    if tuple(relevance.shape) != tuple(scores.shape):
        raise ValueError(
            f"relevance must have the shape of {name} {tuple(scores.shape)}, "
            f"got {tuple(relevance.shape)}"
        )


def _valid_mask(xp: Any, mask: Any, shape: tuple[int, ...]) -> Array | None:
    # mask has already been validated by dftopk_logits
    if mask is None:
        return None
    return xp.broadcast_to(mask, shape)


# ---------------------------------------------------------------------------
# public losses


@under_errstate
def topk_bce_loss(
    scores: Array,
    relevance: Array,
    k: int | Array,
    *,
    tau: float | Array = 1.0,
    mask: Array | None = None,
    reduction: str = "mean",
    axis: int = -1,
) -> Array:
    """Binary cross-entropy between DFTopK membership and the true top-k set.

    The labels are ``y = topk_mask(relevance, k)`` (exactly ``min(k,
    n_valid)`` ones per row, ties broken by lower index), the predictions
    ``p = dftopk(scores, k, tau=tau)``.  The loss per entry,
    ``-[y log p + (1 - y) log(1 - p)]``, is computed from the logits
    ``z = dftopk_logits(scores, k, tau=tau)`` as ``softplus(-z)`` (y = 1) or
    ``softplus(z)`` (y = 0): finite for all finite inputs, also for huge
    scores and extreme ``tau``, and free of ``log(p + eps)`` bias.

    Parameters
    ----------
    scores : array
        Model scores, real floating dtype, any Array API library.
    relevance : array
        Ground-truth relevance of the same shape and library (real floating;
        any dtype of that kind).  Only its order matters.
    k : int or integer array
        Size of the top-k set, as in :func:`topk_core.dftopk` (per-row arrays
        allowed; clipped to the number of valid entries).
    tau : float or array, default 1.0
        DFTopK temperature.
    mask : bool array, optional
        Valid entries.  Masked-out entries are excluded from labels,
        threshold and loss.
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean": average over the valid entries (0 if there are none);
        "sum": total over valid entries; "none": per-entry loss of
        ``scores``' shape, 0 at masked entries.
    axis : int, default -1
        The list axis.

    Returns
    -------
    array
        The loss in ``scores``' dtype: 0-d for "mean"/"sum", else scores'
        shape.  An entry can be ``+inf`` only when an infinite score sits on
        the wrong side of the threshold (the exact value); never NaN unless
        the input has NaN.

    Raises
    ------
    TypeError
        Non-floating or mixed-library inputs.
    ValueError
        Shape mismatch, bad ``k``, ``tau``, ``axis`` or ``reduction``.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core.losses import topk_bce_loss
    >>> scores = np.array([[2.0, 0.5, 1.0, -1.0]])
    >>> relevance = np.array([[3.0, 0.0, 2.0, 1.0]])
    >>> round(float(topk_bce_loss(scores, relevance, 2)), 4)
    0.391
    >>> topk_bce_loss(scores, relevance, 2, reduction="none").round(4)
    array([[0.2519, 0.5759, 0.5759, 0.1602]])
    """
    _check_reduction(reduction, _REDUCTIONS)
    xp, lib = check_x(scores, {"x": "scores"})
    _validate_relevance(xp, relevance, scores, lib, "scores")
    # logits first: errors about k / tau / mask / axis then refer to the scores
    z = named_logits(scores, k, tau, axis, mask, {"x": "scores"})
    positive = named_topk_mask(relevance, k, axis, mask, {"x": "relevance"}) > 0.5
    cdt = _math.compute_dtype(xp, scores.dtype)
    elem = _bce_elementwise(xp, xp.astype(z, cdt, copy=False), positive)
    out = _reduce(xp, elem, _valid_mask(xp, mask, tuple(scores.shape)), reduction)
    return xp.astype(out, scores.dtype, copy=False)


def _per_stage(value: Any, n_stages: int, name: str) -> list[Any]:
    """A shared value, or a list/tuple with one value per stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != n_stages:
            raise ValueError(
                f"{name} given per stage must have one entry per stage ({n_stages}), "
                f"got {len(value)}"
            )
        return list(value)
    return [value] * n_stages


def _check_weights(weights: Any, n_terms: int) -> list[float]:
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(
            f"weights must be a sequence of {n_terms} non-negative floats "
            f"(joint term first, then one per stage), got {type(weights).__name__}"
        )
    if len(weights) != n_terms:
        raise ValueError(
            f"weights must have {n_terms} entries (joint term first, then one per stage), "
            f"got {len(weights)}"
        )
    out = []
    for w in weights:
        if _is_bool(w) or not isinstance(w, numbers.Real):
            raise TypeError(f"weights must be real numbers, got {type(w).__name__} {w!r}")
        w = float(w)
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"weights must be finite and >= 0, got {w!r}")
        out.append(w)
    return out


def _check_stage_sizes(
    xp: Any, lib: str, prev: Any, cur: Any, j: int, batch: tuple[int, ...]
) -> Any:
    """A cascade stage keeps at most what the stage before it kept.

    Array ``k`` values are compared now wherever they are concrete (see
    :func:`topk_core._problem.host_values`); under tracing or on GPU arrays
    they are not read.  Returns None, or, for a lazy library whose backend has
    a ``check_lazily`` hook (Dask), the ``k`` to compute stage ``j`` with:
    k[j] broadcast to the batch shape and compared with k[j-1] (broadcast
    alike, so that the hook pairs their chunks) when it is computed.
    """
    if isinstance(prev, numbers.Integral) and isinstance(cur, numbers.Integral):
        _check_int_stages(prev, cur, j)
        return None
    backend = get_backend(lib)
    hv = [v if isinstance(v, numbers.Integral) else host_values(backend, v) for v in (prev, cur)]
    arrays = [v for v in (prev, cur) if not isinstance(v, numbers.Integral)]
    if all(v is not None for v in hv):
        _check_stage_block(hv[1], hv[0], j)
        return None
    if backend.check_lazily is None:
        return None
    if isinstance(cur, numbers.Integral):
        cur = xp.full(batch, cur, dtype=arrays[0].dtype)
    cur = xp.broadcast_to(cur, batch)
    if not isinstance(prev, numbers.Integral):
        prev = xp.broadcast_to(prev, batch)
    return backend.check_lazily(cur, _check_stage_block, prev, j)


def _check_int_stages(prev: int, cur: int, j: int) -> None:
    """Integer stage sizes: ``ValueError`` where ``k[j] = cur > k[j-1] = prev``."""
    if cur > prev:
        raise ValueError(
            f"k must be non-increasing along the cascade (a stage keeps at most what "
            f"the stage before it kept), got k[{j}] = {cur} > k[{j - 1}] = {prev}"
        )


def _increasing_text(j: int) -> str:
    return (
        f"k must be non-increasing along the cascade (a stage keeps at most what the "
        f"stage before it kept), but k[{j}] > k[{j - 1}] in some rows"
    )


def _check_stage_block(cur: Any, prev: Any, j: int) -> None:
    """Raise ``ValueError`` where ``cur > prev`` (host values of k[j] and k[j-1]).

    What :func:`_check_stage_sizes` runs on concrete ``k`` now, and on the
    chunks of lazy ``k`` arrays when they are computed (``Backend.check_lazily``).

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core.losses import _check_stage_block
    >>> _check_stage_block(np.array([2, 3]), np.array([5, 3]), 1)
    >>> _check_stage_block(np.array([2, 4]), 3, 1)
    Traceback (most recent call last):
    ...
    ValueError: k must be non-increasing along the cascade (a stage keeps at most what \
the stage before it kept), but k[1] > k[0] in some rows
    """
    arrays = [v for v in (prev, cur) if not isinstance(v, numbers.Integral)]
    if bool(array_api_compat.array_namespace(*arrays).any(cur > prev)):
        raise ValueError(_increasing_text(j))


def _batch_shape(x: Any, axis: int) -> tuple[int, ...]:
    """x's shape without ``axis`` (already validated)."""
    shape = tuple(x.shape)
    ax = axis % len(shape)
    return shape[:ax] + shape[ax + 1 :]


def _check_log_vars(xp: Any, log_vars: Any, lib: str, n_terms: int) -> None:
    _check_same_library(log_vars, "log_vars", lib, {"x": "stage_scores[0]"})
    if not is_real_floating(xp, log_vars.dtype):
        raise TypeError(f"log_vars must have a real floating dtype, got {log_vars.dtype}")
    if tuple(log_vars.shape) != (n_terms,):
        raise ValueError(
            f"log_vars must have shape ({n_terms},) (joint term first, then one per "
            f"stage), got {tuple(log_vars.shape)}"
        )


@under_errstate
def cascade_joint_loss(
    stage_scores: Sequence[Array],
    relevance: Array,
    k: int | Array | Sequence[int | Array],
    *,
    tau: float | Array | Sequence[float | Array] = 1.0,
    mask: Array | None = None,
    weights: Sequence[float] | None = None,
    log_vars: Array | None = None,
    reduction: str = "mean",
    axis: int = -1,
    return_terms: bool = False,
) -> Array | tuple[Array, tuple[Array, ...]]:
    """LCRON-style joint loss of a cascade of two or more top-k stages.

    Stage ``j`` (scores ``s_j``) keeps its top ``k_j`` candidates; an item
    leaves the cascade if every stage keeps it.  With DFTopK, the soft
    probability that stage ``j`` keeps item ``i`` is ``p_ij =
    sigmoid(z_ij)``, ``z_j = dftopk_logits(s_j, k_j, tau=tau_j)``, and the
    cascade keeps it with the joint probability ``q_i = prod_j p_ij``
    (stages treated as independent, the LCRON surrogate of the end-to-end
    survival probability).  The objective has ``m + 1`` terms:

    - ``L_0`` (end to end): BCE of ``q`` against ``y = topk_mask(relevance,
      k_m)``, the true top-k set of the final stage's size:
      ``-y log q - (1 - y) log(1 - q)``, with ``log q = sum_j log p_j`` and
      ``log(1 - q) = logsumexp_j [log(1 - p_j) + sum_{l<j} log p_l]``
      (exact, no cancellation).
    - ``L_j`` (stage j = 1..m): :func:`topk_bce_loss` of stage ``j`` with its
      own ``k_j`` and ``tau_j`` against ``topk_mask(relevance, k_j)``.

    Each term is reduced over the valid entries (``reduction``), then

    - ``log_vars = s`` given (learned uncertainty weights, Kendall et al.
      2018): ``L = sum_t exp(-s_t) L_t + s_t``;
    - ``weights = w`` given: ``L = sum_t w_t L_t``;
    - neither: ``L = sum_t L_t`` (all weights 1).

    Parameters
    ----------
    stage_scores : list or tuple of arrays
        Scores of each stage, in cascade order, at least two, all of the
        shape, dtype and library of each other; every stage scores the full
        candidate list.
    relevance : array
        Ground-truth relevance, the shape of each stage's scores.
    k : int, integer array, or a list/tuple of them (one per stage)
        How many candidates each stage keeps; a single value is used for
        every stage.  The last stage's ``k`` defines the true top-k set of
        the end-to-end term.  Non-increasing (e.g. ``(100, 10)``): a later
        stage keeping more than an earlier one is a ``ValueError`` (array
        values are compared wherever they are concrete; on Dask arrays, when
        the loss is computed).
    tau : float, array, or a list/tuple of them (one per stage), default 1.0
        DFTopK temperature(s).
    mask : bool array, optional
        Valid candidates (shared by all stages).
    weights : sequence of float, optional
        ``m + 1`` fixed non-negative weights: end-to-end term first, then one
        per stage.  Not together with ``log_vars``.
    log_vars : array, optional
        ``m + 1`` learned log-variances ``s_t`` (same library as the scores;
        a trainable parameter); end-to-end term first.
    reduction : {"mean", "sum"}, default "mean"
        How each term is reduced over the valid entries ("mean": 0 if none).
    axis : int, default -1
        The candidate-list axis.
    return_terms : bool, default False
        Also return the unweighted terms ``(L_0, L_1, ..., L_m)``.

    Returns
    -------
    loss : array
        0-d, in the scores' dtype (promoted with ``log_vars``' dtype).
    terms : tuple of arrays
        Only with ``return_terms=True``.

    Raises
    ------
    TypeError
        ``stage_scores`` not a list/tuple, non-floating or mixed-library
        arrays, mixed stage dtypes, bad ``weights``/``log_vars`` types.
    ValueError
        Fewer than two stages, shape mismatches, bad ``k``/``tau``/``axis``,
        stage sizes ``k`` that increase along the cascade, wrong number of
        weights, both ``weights`` and ``log_vars``,
        ``reduction="none"``.

    Examples
    --------
    >>> import numpy as np
    >>> from topk_core.losses import cascade_joint_loss
    >>> retrieval = np.array([[2.0, 0.5, 1.0, -1.0, 0.0]])
    >>> ranking = np.array([[1.5, -0.5, 2.0, 0.0, 1.0]])
    >>> relevance = np.array([[3.0, 0.0, 2.0, 1.0, 0.5]])
    >>> loss, terms = cascade_joint_loss(
    ...     [retrieval, ranking], relevance, (3, 2), return_terms=True
    ... )
    >>> [round(float(t), 4) for t in terms]
    [0.3721, 0.6902, 0.3902]
    >>> round(float(loss), 4)
    1.4525
    >>> s = np.zeros(3)  # learned log-variances, here at their initial value 0
    >>> round(float(cascade_joint_loss([retrieval, ranking], relevance, (3, 2), log_vars=s)), 4)
    1.4525
    """
    _check_reduction(reduction, ("mean", "sum"))
    if not isinstance(stage_scores, (list, tuple)):
        raise TypeError(
            f"stage_scores must be a list or tuple of score arrays (one per stage), "
            f"got {type(stage_scores).__name__}"
        )
    n_stages = len(stage_scores)
    if n_stages < 2:
        raise ValueError(
            f"cascade_joint_loss needs at least two stages, got {n_stages}; "
            f"use topk_bce_loss for a single stage"
        )
    xp, lib = check_x(stage_scores[0], {"x": "stage_scores[0]"})
    first = stage_scores[0]
    for j, s in enumerate(stage_scores[1:], start=1):
        _check_same_library(s, f"stage_scores[{j}]", lib, {"x": "stage_scores[0]"})
        if tuple(s.shape) != tuple(first.shape):
            raise ValueError(
                f"stage_scores[{j}] has shape {tuple(s.shape)} but stage_scores[0] has "
                f"shape {tuple(first.shape)}; all stages must score the same candidates"
            )
        if s.dtype != first.dtype:
            raise TypeError(
                f"stage_scores[{j}] has dtype {s.dtype} but stage_scores[0] has "
                f"{first.dtype}; cast the stages to one dtype"
            )
    _validate_relevance(xp, relevance, first, lib, "stage_scores[0]")
    if not isinstance(return_terms, bool):
        raise TypeError(f"return_terms must be a bool, got {type(return_terms).__name__}")
    ks = _per_stage(k, n_stages, "k")
    taus = _per_stage(tau, n_stages, "tau")
    n_terms = n_stages + 1
    if weights is not None and log_vars is not None:
        raise ValueError("pass either weights (fixed) or log_vars (learned), not both")
    w = _check_weights(weights, n_terms) if weights is not None else None
    if log_vars is not None:
        _check_log_vars(xp, log_vars, lib, n_terms)

    cdt = _math.compute_dtype(xp, first.dtype)
    k_name = "k" if not isinstance(k, (list, tuple)) else "k[{}]"
    tau_name = "tau" if not isinstance(tau, (list, tuple)) else "tau[{}]"
    valid = None
    zs = []
    stage_terms = []
    for j in range(n_stages):
        names = {"x": f"stage_scores[{j}]", "k": k_name.format(j), "tau": tau_name.format(j)}
        z = named_logits(stage_scores[j], ks[j], taus[j], axis, mask, names)
        if j:  # k[j] is valid now (dftopk_logits checked it)
            checked = _check_stage_sizes(xp, lib, ks[j - 1], ks[j], j, _batch_shape(first, axis))
            if checked is not None:
                # a lazy graph: the stage is rebuilt on the checked k, nothing computed yet
                ks[j] = checked
                z = named_logits(stage_scores[j], ks[j], taus[j], axis, mask, names)
        else:  # the mask is valid now (the first stage's dftopk_logits checked it)
            valid = _valid_mask(xp, mask, tuple(first.shape))
        z = xp.astype(z, cdt, copy=False)
        y = named_topk_mask(relevance, ks[j], axis, mask, {**names, "x": "relevance"}) > 0.5
        zs.append(z)
        stage_terms.append(_reduce(xp, _bce_elementwise(xp, z, y), valid, reduction))
    # the last stage's labels are the true top-k set of the whole cascade
    joint = _reduce(xp, _joint_bce_elementwise(xp, zs, y), valid, reduction)
    terms = [joint, *stage_terms]

    if log_vars is not None:
        loss = None
        for t, term in enumerate(terms):
            s_t = log_vars[t]
            part = xp.exp(-s_t) * term + s_t
            loss = part if loss is None else loss + part
    else:
        w = w if w is not None else [1.0] * n_terms
        # a zero weight drops its term (0 * inf would be NaN)
        loss = xp.zeros_like(joint)
        for w_t, term in zip(w, terms):
            if w_t != 0.0:
                loss = loss + (term if w_t == 1.0 else w_t * term)
    out_dtype = first.dtype if log_vars is None else xp.result_type(first.dtype, log_vars.dtype)
    loss = xp.astype(loss, out_dtype, copy=False)
    if return_terms:
        return loss, tuple(xp.astype(t, first.dtype, copy=False) for t in terms)
    return loss
