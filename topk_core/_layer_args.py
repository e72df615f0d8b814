"""Validation of the constructor arguments the framework layers share.

``SoftTopK`` exists for PyTorch (:mod:`topk_core.adapters.torch_adapter`) and
Keras 3 (:mod:`topk_core.adapters.keras`) with the same arguments; the checks,
and their messages, live here once.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

__all__ = ["LayerArgs", "check_axis", "check_layer_args", "check_learnable_tau", "check_tau"]


@dataclass(frozen=True)
class LayerArgs:
    """The validated, normalised arguments of a ``SoftTopK`` layer."""

    k: int
    tau: float
    learnable_tau: bool
    axis: int
    largest: bool
    output: str
    hard: bool


def check_layer_args(
    k: Any, tau: Any, learnable_tau: Any, axis: Any, largest: Any, output: Any, hard: Any
) -> LayerArgs:
    """Validate a layer's arguments; ``TypeError``/``ValueError`` naming the bad one.

    Examples
    --------
    >>> from topk_core._layer_args import check_layer_args
    >>> check_layer_args(5, 0.5, False, -1, True, "probs", True).k
    5
    >>> check_layer_args(5, 0.5, False, -1, True, "logits", True)
    Traceback (most recent call last):
    ...
    ValueError: hard=True needs output='probs' (the mask replaces p)
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be a non-negative int, got {type(k).__name__} {k!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    check_tau(tau)
    if not isinstance(learnable_tau, bool):
        raise TypeError(f"learnable_tau must be a bool, got {type(learnable_tau).__name__}")
    check_axis(axis)
    if not isinstance(largest, bool):
        raise TypeError(f"largest must be a bool, got {type(largest).__name__} {largest!r}")
    if output not in ("probs", "logits"):
        raise ValueError(f"output must be 'probs' or 'logits', got {output!r}")
    if not isinstance(hard, bool):
        raise TypeError(f"hard must be a bool, got {type(hard).__name__} {hard!r}")
    if hard and output != "probs":
        raise ValueError("hard=True needs output='probs' (the mask replaces p)")
    return LayerArgs(int(k), float(tau), learnable_tau, int(axis), largest, output, hard)


def check_tau(tau: Any) -> None:
    """A layer's (or loss module's) float temperature: a finite real number > 0.

    Examples
    --------
    >>> from topk_core._layer_args import check_tau
    >>> check_tau(0.0)
    Traceback (most recent call last):
    ...
    ValueError: tau must be a finite float > 0, got 0.0
    """
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a positive float, got {type(tau).__name__} {tau!r}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite float > 0, got {tau!r}")


def check_axis(axis: Any) -> None:
    """A layer's (or loss module's) axis: an int (its range is checked against x)."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {type(axis).__name__} {axis!r}")


def check_learnable_tau(tau: float, dtype: str, value: float, smallest_normal: float) -> None:
    """A learnable tau must start where its weight's dtype can call with it.

    ``value`` is ``exp(log(tau))`` computed in the weight's ``dtype`` (its name):
    a value that is not a normal number of that dtype, or whose inverse is not,
    would make every call raise tau's ``ValueError``.

    Examples
    --------
    >>> from topk_core._layer_args import check_learnable_tau
    >>> check_learnable_tau(1e-39, "float32", 1e-39, 1.1754944e-38)
    Traceback (most recent call last):
    ...
    ValueError: tau=1e-39 with learnable_tau=True: its float32 weight log_tau gives ...
    """
    if not smallest_normal <= value <= 1.0 / smallest_normal:
        raise ValueError(
            f"tau={tau!r} with learnable_tau=True: its {dtype} weight log_tau gives "
            f"exp(log_tau) = {value!r}, outside {smallest_normal:.4g} <= tau <= "
            f"{1.0 / smallest_normal:.4g} (tau and 1/tau normal numbers of that dtype), so "
            f"every call would raise; pick a tau in that range or a wider dtype for the weight"
        )
