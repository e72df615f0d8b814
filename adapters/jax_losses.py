"""JAX functions for the top-k losses of :mod:`topk_core.losses`.

Same signatures as :func:`topk_core.losses.topk_bce_loss` and
:func:`topk_core.losses.cascade_joint_loss`; the math lives once there.  These
wrappers add what JAX code needs:

- every call is compiled with ``jax.jit``: Python scalars (``k``, ``tau``,
  ``reduction``, ``axis``, ``weights``, ...) are static, arrays are traced, and
  compiled functions are cached per static signature;
- array arguments may be NumPy arrays (data batches) next to JAX arrays
  (model outputs): ``jit`` turns them all into JAX arrays;
- they compose with ``jax.grad``, ``jax.value_and_grad``, ``jax.vmap`` and an
  outer ``jax.jit`` (an inner ``jit`` is inlined), also when only the scores
  are being differentiated and the mask / relevance are concrete arrays.

Gradients flow through :func:`topk_core.dftopk_logits` (the JAX backend's
differentiation rule) and the elementwise ``jax.numpy`` operations of the
losses.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from topk_core import losses as _losses
from topk_core._problem import check_tau_now, host_values
from topk_core._registry import get_backend, library_name

__all__ = ["cascade_joint_loss", "init_log_vars", "topk_bce_loss"]

_DYNAMIC = object()  # placeholder for an array inside a static template


def _is_static(v: Any) -> bool:
    return v is None or isinstance(v, (numbers.Number, str))


def _split(args: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Static (hashable) part and dynamic (array) part of keyword arguments.

    A list/tuple argument is split element-wise, so ``k=(100, 10)`` stays
    static while ``stage_scores=[s1, s2]`` is traced.
    """
    static = []
    dynamic: dict[str, Any] = {}
    for name, v in args.items():
        if _is_static(v):
            static.append((name, "value", v))
        elif isinstance(v, (list, tuple)):
            template = tuple(e if _is_static(e) else _DYNAMIC for e in v)
            arrays = [e for e in v if not _is_static(e)]
            static.append((name, "sequence", template))
            if arrays:
                dynamic[name] = arrays
        else:
            static.append((name, "array", None))
            dynamic[name] = v
    return tuple(static), dynamic


def _join(static: tuple, dynamic: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kind, v in static:
        if kind == "value":
            out[name] = v
        elif kind == "array":
            out[name] = dynamic[name]
        else:
            arrays = iter(dynamic.get(name, ()))
            out[name] = [next(arrays) if e is _DYNAMIC else e for e in v]
    return out


@functools.lru_cache(maxsize=256)
def _compiled(fn_name: str, static: tuple) -> Any:
    fn = getattr(_losses, fn_name)

    def run(dynamic: dict[str, Any]) -> Any:
        kwargs = _join(static, dynamic)
        return fn(**kwargs)

    return jax.jit(run)


def _check_now(scores: Any, k: Any, tau: Any, scores_name: str) -> None:
    """The value checks the core losses run on concrete arrays, run before ``jit``
    traces them: ``tau > 0`` in its range (per stage) and non-increasing cascade
    ``k`` (a list of stage sizes); traced values stay unchecked, as in the core.
    Messages name the arguments as the core losses do."""
    per_stage = isinstance(tau, (list, tuple))
    for j, t in enumerate(tau if per_stage else (tau,)):
        check_tau_now(scores, t, {"x": scores_name, "tau": f"tau[{j}]" if per_stage else "tau"})
    if not isinstance(k, (list, tuple)):
        return
    known = [v if isinstance(v, numbers.Integral) else _host(v) for v in k]
    for j in range(1, len(k)):
        pair = (known[j - 1], known[j])
        # two ints: the core checks them (they stay static)
        known_now = pair[0] is not None and pair[1] is not None
        if known_now and not all(isinstance(v, numbers.Integral) for v in pair):
            _losses._check_stage_block(pair[1], pair[0], j)


def _host(v: Any) -> Any:
    """A NumPy copy of an array's values where they can be read now, else None."""
    lib = library_name(v)
    values = None if lib is None else host_values(get_backend(lib), v)
    return None if values is None else np.asarray(values)


def _call(fn_name: str, args: dict[str, Any]) -> Any:
    scores, name = args.get("scores", None), "scores"
    if scores is None:
        scores = args["stage_scores"][0] if args["stage_scores"] else None
        name = "stage_scores[0]"
    if scores is not None:
        _check_now(scores, args["k"], args["tau"], name)
    static, dynamic = _split(args)
    try:
        compiled = _compiled(fn_name, static)
    except TypeError as exc:  # an unhashable static value
        raise TypeError(f"{fn_name}: arguments must be arrays or Python scalars: {exc}") from None
    return compiled(dynamic)


def topk_bce_loss(
    scores: Any,
    relevance: Any,
    k: int | Any,
    *,
    tau: float | Any = 1.0,
    mask: Any | None = None,
    reduction: str = "mean",
    axis: int = -1,
) -> jax.Array:
    """BCE between DFTopK membership and the true top-k set (JAX, jit-compiled).

    See :func:`topk_core.losses.topk_bce_loss` for the definition and errors.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from topk_core.adapters.jax_losses import topk_bce_loss
    >>> scores = jnp.array([[2.0, 0.5, 1.0, -1.0]])
    >>> relevance = jnp.array([[3.0, 0.0, 2.0, 1.0]])
    >>> grad = jax.grad(lambda s: topk_bce_loss(s, relevance, 2))(scores)
    >>> grad.shape
    (1, 4)
    """
    return _call(
        "topk_bce_loss",
        dict(
            scores=scores,
            relevance=relevance,
            k=k,
            tau=tau,
            mask=mask,
            reduction=reduction,
            axis=axis,
        ),
    )


def cascade_joint_loss(
    stage_scores: Sequence[Any],
    relevance: Any,
    k: int | Any | Sequence[int | Any],
    *,
    tau: float | Any | Sequence[float | Any] = 1.0,
    mask: Any | None = None,
    weights: Sequence[float] | None = None,
    log_vars: Any | None = None,
    reduction: str = "mean",
    axis: int = -1,
    return_terms: bool = False,
) -> Any:
    """LCRON-style cascade joint loss (JAX, jit-compiled).

    See :func:`topk_core.losses.cascade_joint_loss` for the objective.  Pass
    the learned log-variances (:func:`init_log_vars`) as part of the
    parameters being differentiated.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from topk_core.adapters.jax_losses import cascade_joint_loss, init_log_vars
    >>> relevance = jnp.array([[3.0, 0.0, 2.0, 1.0, 0.5]])
    >>> params = {
    ...     "stages": [jnp.array([[2.0, 0.5, 1.0, -1.0, 0.0]]),
    ...                jnp.array([[1.5, -0.5, 2.0, 0.0, 1.0]])],
    ...     "log_vars": init_log_vars(2),
    ... }
    >>> def loss(p):
    ...     return cascade_joint_loss(p["stages"], relevance, (3, 2), log_vars=p["log_vars"])
    >>> value, grads = jax.value_and_grad(loss)(params)
    >>> round(float(value), 4), grads["log_vars"].shape
    (1.4525, (3,))
    """
    if not isinstance(stage_scores, (list, tuple)):
        raise TypeError(
            f"stage_scores must be a list or tuple of score arrays (one per stage), "
            f"got {type(stage_scores).__name__}"
        )
    if weights is not None and isinstance(weights, list):
        weights = tuple(weights)  # static, so hashable
    return _call(
        "cascade_joint_loss",
        dict(
            stage_scores=list(stage_scores),
            relevance=relevance,
            k=k,
            tau=tau,
            mask=mask,
            weights=weights,
            log_vars=log_vars,
            reduction=reduction,
            axis=axis,
            return_terms=return_terms,
        ),
    )


def init_log_vars(n_stages: int, value: float = 0.0, dtype: Any = jnp.float32) -> jax.Array:
    """Initial learned log-variances for :func:`cascade_joint_loss`: shape ``(n_stages + 1,)``.

    Examples
    --------
    >>> from topk_core.adapters.jax_losses import init_log_vars
    >>> init_log_vars(2).shape
    (3,)
    """
    if isinstance(n_stages, bool) or not isinstance(n_stages, int) or n_stages < 2:
        raise ValueError(f"n_stages must be an int >= 2, got {n_stages!r}")
    return jnp.full((n_stages + 1,), value, dtype=dtype)
