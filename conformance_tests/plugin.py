"""The conformance suite's pytest plugin: options and fixtures.

Loaded explicitly, never through an entry point (so it never enters another
project's pytest run): ``python -m topk_core.conformance`` passes ``-p
topk_core.conformance.plugin``, and topk-core's own ``pyproject.toml`` adds the
same to the project's test runs.

``lib`` runs a test once per array library (skipping absent ones).  Options
(each also settable by an environment variable; the option wins):

``--array-module=NAME`` (``TOPK_CONFORMANCE_ARRAY_MODULE``)
    Run every ``lib`` test against this importable Array API library instead of
    the built-in list, e.g. ``--array-module=array_api_strict``.
``--backend=MODULE:ATTR`` (``TOPK_CONFORMANCE_BACKEND``)
    Register this :class:`topk_core.Backend` for the ``--array-module``
    library (``topk_core.register_backend``) before the run.
``--conformance-report=PATH`` (``TOPK_CONFORMANCE_REPORT``)
    Write a per-backend Markdown table (errors, scaling exponents, counts).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable

import numpy as np
import pytest
from topk_core.conformance.libs import BUILTIN_LIBS, TOLERANCE, ArrayLib, third_party_lib
from topk_core.conformance.report import METRICS, ConformanceReport

os.environ.setdefault("JAX_ENABLE_X64", "1")  # float64 cases need it; set before jax loads

_THIRD_PARTY = pytest.StashKey[ArrayLib]()
_REPORT = pytest.StashKey[ConformanceReport]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("topk-conformance")
    group.addoption(
        "--array-module",
        default=os.environ.get("TOPK_CONFORMANCE_ARRAY_MODULE") or None,
        metavar="NAME",
        help="run the lib-parametrized checks against this Array API library only "
        "(env TOPK_CONFORMANCE_ARRAY_MODULE)",
    )
    group.addoption(
        "--backend",
        dest="topk_backend",
        default=os.environ.get("TOPK_CONFORMANCE_BACKEND") or None,
        metavar="MODULE:ATTR",
        help="register this topk_core.Backend for the --array-module library "
        "(env TOPK_CONFORMANCE_BACKEND)",
    )
    group.addoption(
        "--conformance-report",
        default=os.environ.get("TOPK_CONFORMANCE_REPORT") or None,
        metavar="PATH",
        help="write a per-backend Markdown report to PATH (env TOPK_CONFORMANCE_REPORT)",
    )


def _load_backend(spec: str):
    from topk_core import Backend

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise pytest.UsageError(f"--backend must look like 'package.module:ATTR', got {spec!r}")
    try:
        backend = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise pytest.UsageError(f"--backend {spec!r}: {type(exc).__name__}: {exc}") from None
    if not isinstance(backend, Backend):
        raise pytest.UsageError(
            f"--backend {spec!r} is a {type(backend).__name__}, not a topk_core.Backend"
        )
    return backend


def pytest_configure(config: pytest.Config) -> None:
    # JAX_ENABLE_X64 above covers a later import; a jax imported earlier needs the flag
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_enable_x64", True)

    name = config.getoption("array_module")
    spec = config.getoption("topk_backend")
    if spec and not name:
        raise pytest.UsageError(
            "--backend needs --array-module: the library whose arrays the backend handles"
        )
    if name:
        try:
            lib = third_party_lib(name)
        except (TypeError, ValueError) as exc:
            raise pytest.UsageError(str(exc)) from None
        config.stash[_THIRD_PARTY] = lib
        if spec:
            import topk_core
            from topk_core._registry import library_name

            library = library_name(lib.asarray(np.zeros(1), lib.dtypes[-1]))
            topk_core.register_backend(library, _load_backend(spec))

    # a report object handed in by the runner (pytest.main(..., plugins=[report]))
    for plugin in config.pluginmanager.get_plugins():
        if isinstance(plugin, ConformanceReport):
            config.stash[_REPORT] = plugin
    path = config.getoption("conformance_report")
    if (path or _REPORT in config.stash) and _distributed(config):
        workers = config.getoption("numprocesses", None)
        raise pytest.UsageError(
            "a conformance report (--conformance-report, TOPK_CONFORMANCE_REPORT or "
            "python -m topk_core.conformance) cannot be written from a pytest-xdist run "
            f"({f'-n {workers}' if workers else '--tx'}): its errors and scaling "
            "exponents are recorded inside the test processes, so each worker would hold "
            "part of them; run the report without -n"
        )
    if path:
        report = ConformanceReport(path, list(config.invocation_params.args))
        config.stash[_REPORT] = report
        config.pluginmanager.register(report, "topk-conformance-report")


def _distributed(config: pytest.Config) -> bool:
    """Whether pytest-xdist runs the tests in worker processes (controller or worker)."""
    if hasattr(config, "workerinput"):
        return True
    dist = getattr(config.option, "dist", "no")
    return dist != "no" and bool(getattr(config.option, "tx", None))


def pytest_report_header(config: pytest.Config) -> list[str]:
    lib = config.stash.get(_THIRD_PARTY, None)
    if lib is None:
        return []
    line = f"topk conformance: --array-module={lib.name} (dtypes {', '.join(lib.dtypes)})"
    spec = config.getoption("topk_backend")
    return [line + (f", --backend={spec}" if spec else "")]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "lib" not in metafunc.fixturenames:
        return
    third = metafunc.config.stash.get(_THIRD_PARTY, None)
    names = [third.name] if third is not None else list(BUILTIN_LIBS)
    metafunc.parametrize("lib", names, ids=names, indirect=True)


@pytest.fixture
def lib(request: pytest.FixtureRequest) -> ArrayLib:
    third = request.config.stash.get(_THIRD_PARTY, None)
    if third is not None and request.param == third.name:
        return third
    spec = BUILTIN_LIBS[request.param]
    reason = spec.unavailable()
    if reason:
        pytest.skip(reason)
    return spec


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20251011)


@pytest.fixture
def conformance_record(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``record(kind, value, lib=NAME, dtype="")`` for ``--conformance-report``.

    ``kind`` is one of ``forward_err``, ``grad_err``, ``scaling_fwd``,
    ``scaling_fwd_bwd``.  Without the option, values are validated and dropped.
    """
    report = request.config.stash.get(_REPORT, None)

    def record(kind: str, value: float, lib: str, dtype: str = "") -> None:
        if kind not in METRICS:
            raise ValueError(f"kind must be one of {sorted(METRICS)}, got {kind!r}")
        if report is not None:
            report.record(kind, value, lib, dtype)

    def note(lib: str, text: str) -> None:
        if report is not None:
            report.note(lib, text)

    record.note = note  # type: ignore[attr-defined]
    return record


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Drop JAX's compiled programs when the process holds too many memory mappings.

    XLA's CPU runtime maps a few hundred memory regions per compiled program
    (273 for ``dftopk`` and its ``grad`` at one shape, measured), and a whole run
    compiles thousands: it reached Linux's ``vm.max_map_count`` (65530), where
    the next compile segfaulted (test_scaling, the suite's last JAX test).
    ``jax.clear_caches()`` unmaps them; it runs between tests, only once the
    count passes half the limit, so no test sees its own programs recompiled.
    """
    jax = sys.modules.get("jax")
    if jax is None:
        return
    count = _mapped_regions()
    if count is not None and count > _map_budget():
        jax.clear_caches()


def _mapped_regions() -> int | None:
    """Memory mappings of this process (Linux ``/proc``), or None where unknown."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return None


@functools.cache
def _map_budget() -> int:
    """Half of ``vm.max_map_count`` (65530 by default), read once."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read()) // 2
    except (OSError, ValueError):
        return 65530 // 2


def tol(dtype: str) -> float:
    return TOLERANCE[dtype]
