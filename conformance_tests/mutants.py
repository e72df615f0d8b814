"""Planted bugs ("mutants") for the mutation proof of the conformance suite.

Each mutant is a realistic bug in a *copy* of a backend: the patched
functions wrap the real ones and misbehave only for arrays of one target
library (the ``--array-module`` library), so NumPy, the suite's anchor, stays
correct.  Nothing here runs on import.  A mutant is active only in a pytest
process started with ``-p topk_core.conformance.mutants`` and the environment
variable ``TOPK_CONFORMANCE_MUTANT=NAME`` (the mutation proof does that in
subprocesses).  ``OFF_BY_ONE_K`` is the off-by-one selection as a ready-made
backend for ``--backend=topk_core.conformance.mutants:OFF_BY_ONE_K``.

=====================  =======================================================
mutant                 planted bug
=====================  =======================================================
grad_no_threshold      gradient forgets the threshold term ``- sum(s) * w``
ties_uneven            ties at a / b each get weight 1/2 instead of sharing it
overflow_threshold     ``theta = (a + b) / 2``: overflows for huge finite a, b
off_by_one_k           selection returns the (k+1)-th and (k+2)-th largest
mask_leak              masked-out entries take part in the selection
dtype_upcast           forward returns float64 whatever x's dtype
=====================  =======================================================
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

ENV = "TOPK_CONFORMANCE_MUTANT"

__all__ = ["ENV", "MUTANTS", "OFF_BY_ONE_K", "Mutant", "install"]


@dataclass(frozen=True)
class Mutant:
    """A planted bug: ``install(target) -> undo``."""

    description: str
    install: Callable[[str], Callable[[], None]]


def _is_target(arr: Any, target: str) -> bool:
    from topk_core._registry import library_name

    return library_name(arr) == target


def _patch(module: Any, name: str, make: Callable[[Callable], Callable]) -> Callable[[], None]:
    original = getattr(module, name)
    setattr(module, name, make(original))

    def undo() -> None:
        setattr(module, name, original)

    return undo


def _grad_no_threshold(target: str) -> Callable[[], None]:
    from topk_core import _math

    # tie_share: the one weight rule behind tie_weights and the backends' O(#ties) paths
    def make(orig):
        def tie_share(xp, v, count):
            w = orig(xp, v, count)
            return w * 0 if _is_target(v, target) else w

        return tie_share

    return _patch(_math, "tie_share", make)


def _ties_uneven(target: str) -> Callable[[], None]:
    from topk_core import _math

    def make(orig):
        def tie_share(xp, v, count):
            w = orig(xp, v, count)
            if _is_target(v, target):
                half = xp.asarray(0.5, dtype=w.dtype)
                w = xp.where(w > 0, half, w)  # every tie gets 1/2: not split
            return w

        return tie_share

    return _patch(_math, "tie_share", make)


def _overflow_threshold(target: str) -> Callable[[], None]:
    from topk_core import _math

    def make(orig):
        def threshold(xp, a, b):
            if _is_target(a, target):
                return (a + b) / 2
            return orig(xp, a, b)

        return threshold

    return _patch(_math, "threshold", make)


def _shift_k(select_pair: Callable) -> Callable:
    def shifted(xp, x, k):
        n = x.shape[-1]
        if isinstance(k, int):
            return select_pair(xp, x, min(k + 1, n))
        return select_pair(xp, x, xp.minimum(k + 1, xp.full_like(k, n)))

    return shifted


def _mask_leak(target: str) -> Callable[[], None]:
    from topk_core import _api

    def make(orig):
        def select(pb, candidates=False):
            if _is_target(pb.x, target):
                from topk_core.backends.generic import select_pair

                return (pb.backend.select_pair or select_pair)(pb.xp, pb.x, pb.k)  # no -inf fill
            return orig(pb, candidates)

        return select

    return _patch(_api, "select", make)


def _dtype_upcast(target: str) -> Callable[[], None]:
    from dataclasses import replace

    from topk_core import _api

    def upcast(pb, out):
        return pb.xp.astype(out, pb.xp.float64) if _is_target(out, target) else out

    def make(orig):
        def forward(pb, output):
            return upcast(pb, orig(pb, output))

        return forward

    def with_apply(base):
        # autodiff backends (torch, JAX) run their forward through ``apply``, not forward()
        if base.apply is None:
            return base
        orig = base.apply

        def apply(pb, output, **kw):
            return upcast(pb, orig(pb, output, **kw))

        return replace(base, name=f"{base.name}-mutant-dtype-upcast", apply=apply)

    undo_forward = _patch(_api, "forward", make)
    undo_backend = _swap_backend(target, with_apply)

    def undo() -> None:
        undo_backend()
        undo_forward()

    return undo


def _swap_backend(target: str, change: Callable[[Any], Any]) -> Callable[[], None]:
    """Register ``change(backend)`` for ``target``'s arrays; returns ``undo()``."""
    import topk_core
    from topk_core._registry import _REGISTRY, get_backend

    previous = _REGISTRY.get(target)
    topk_core.register_backend(target, change(get_backend(target)))

    def undo() -> None:
        if previous is None:
            _REGISTRY.pop(target, None)
        else:
            _REGISTRY[target] = previous

    return undo


def _off_by_one_install(target: str) -> Callable[[], None]:
    return _swap_backend(target, _off_by_one_backend)


def _off_by_one_backend(base: Any) -> Any:
    from dataclasses import replace

    from topk_core.backends.generic import select_pair

    return replace(
        base,
        name=f"{base.name}-mutant-off-by-one-k",
        select_pair=_shift_k(base.select_pair or select_pair),
        select_candidates=None,  # the backend's own would bypass the shifted selection
    )


def _strict_off_by_one() -> Any:
    from topk_core.backends.generic import STRICT_BACKEND

    return _off_by_one_backend(STRICT_BACKEND)


#: a copy of the array-api-strict backend with the off-by-one selection, for --backend
OFF_BY_ONE_K = _strict_off_by_one()


MUTANTS: dict[str, Mutant] = {
    "grad_no_threshold": Mutant("gradient without the threshold term", install=_grad_no_threshold),
    "ties_uneven": Mutant("ties at a/b not split evenly", install=_ties_uneven),
    "overflow_threshold": Mutant("theta = (a + b) / 2", install=_overflow_threshold),
    "off_by_one_k": Mutant("selection off by one in k", install=_off_by_one_install),
    "mask_leak": Mutant("masked entries leak into the selection", install=_mask_leak),
    "dtype_upcast": Mutant("forward output upcast to float64", install=_dtype_upcast),
}


def install(name: str, target: str) -> Callable[[], None]:
    """Activate mutant ``name`` for arrays of library ``target``; returns ``undo()``.

    Never installed by importing this module: a doctest that installed one and then
    failed before ``undo()`` would leak the bug into the rest of the session.

    Examples
    --------
    >>> sorted(MUTANTS)[:3]
    ['dtype_upcast', 'grad_no_threshold', 'mask_leak']
    """
    if name not in MUTANTS:
        raise ValueError(f"mutant must be one of {sorted(MUTANTS)}, got {name!r}")
    if not isinstance(target, str) or not target:
        raise TypeError(f"target must be a library name (str), got {target!r}")
    return MUTANTS[name].install(target)


# ------------------------------------------------------------------ pytest plugin hooks


@pytest.hookimpl(trylast=True)
def pytest_configure(config: Any) -> None:
    """Install ``$TOPK_CONFORMANCE_MUTANT`` for the ``--array-module`` library.

    Runs after the suite's plugin registered a ``--backend``: the mutant wraps it.
    """
    name = os.environ.get(ENV)
    if not name:
        return
    target = config.getoption("array_module", None)
    if not target:
        raise pytest.UsageError(f"{ENV}={name} needs --array-module (the library to mutate)")
    from topk_core.conformance.libs import third_party_lib

    from topk_core._registry import library_name

    lib = third_party_lib(target)
    library = library_name(lib.asarray([0.0], lib.dtypes[-1]))
    try:
        config._topk_mutant_undo = install(name, library)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_report_header(config: Any) -> str | None:
    name = os.environ.get(ENV)
    return f"topk conformance: MUTANT {name!r} installed (expect failures)" if name else None
