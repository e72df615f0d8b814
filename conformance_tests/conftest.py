"""Fixtures: ``lib`` runs a test once per array library (skipping absent ones)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from .libs import BUILTIN_LIBS, TOLERANCE, ArrayLib

os.environ.setdefault("JAX_ENABLE_X64", "1")  # float64 cases need it; set before jax loads


def pytest_configure(config):
    try:
        import jax
    except ImportError:
        return
    jax.config.update("jax_enable_x64", True)


@pytest.fixture(params=list(BUILTIN_LIBS), ids=list(BUILTIN_LIBS))
def lib(request) -> ArrayLib:
    spec = BUILTIN_LIBS[request.param]
    reason = spec.unavailable()
    if reason:
        pytest.skip(reason)
    return spec


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20251011)


def tol(dtype: str) -> float:
    return TOLERANCE[dtype]
