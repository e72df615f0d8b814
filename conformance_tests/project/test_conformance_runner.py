"""``python -m topk_core.conformance``: the installable third-party run.

The wheel-installed variant (from outside the checkout) is in test_packaging.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from topk_core.conformance import SUITE_FILES
from topk_core.conformance.libs import _from_lib


def _run(args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPK_CONFORMANCE_")}
    return subprocess.run(
        [sys.executable, "-m", "topk_core.conformance", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_runner_runs_only_the_library_checks_and_writes_the_report(tmp_path):
    report = tmp_path / "strict.md"
    proc = _run(
        [
            "--array-module",
            "array_api_strict",
            "--no-mutation",
            "--report",
            str(report),
            "-k",
            "float32 and (random or mask) or test_k_errors",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = report.read_text()
    assert "Library: `array_api_strict`" in text and "backend: `array_api_strict`" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| array_api_strict |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1].startswith("float32: ") and cells[6] == "0", row
    assert int(cells[5]) >= 6, row
    # only the library's own checks: no project test, no other library
    assert "(backend-independent)" not in text and "| numpy |" not in text
    assert "array_api_strict: " in proc.stdout and " 0 failed" in proc.stdout


def test_suite_files_take_the_lib_fixture_only():
    """Every test of a third-party run is about the library under test."""
    import ast
    import pathlib

    import topk_core.conformance as pkg

    root = pathlib.Path(pkg.__file__).parent
    for name in SUITE_FILES:
        tree = ast.parse((root / name).read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                args = [a.arg for a in node.args.args]
                assert "lib" in args, f"{name}::{node.name} does not take the lib fixture"


def test_runner_rejects_unknown_module(tmp_path):
    proc = _run(["--array-module", "no_such_array_lib_xyz"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "cannot import 'no_such_array_lib_xyz'" in proc.stderr


def test_plugin_is_not_auto_loaded(tmp_path):
    """Installing topk-core must not add options or fixtures to other pytest runs."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--array-module" not in proc.stdout


class _Opaque:
    """An array whose library cannot export its data (no DLPack, no __array__)."""

    __module__ = "fakelib.core"
    shape = (2,)
    dtype = np.dtype("float64")


def test_results_that_cannot_be_read_are_an_error_naming_the_library():
    """np.asarray wraps such an object in a 0-d object array: that is not a result."""
    assert np.asarray(_Opaque()).dtype == object  # what used to be accepted
    with pytest.raises(TypeError, match=r"cannot read a fakelib array .*0-d object array"):
        _from_lib(np, _Opaque(), "fakelib")


def test_results_of_the_wrong_shape_are_rejected():
    class Wrong:
        shape = (3,)
        dtype = np.dtype("float64")

        def __array__(self, dtype=None, copy=None):
            return np.zeros(2)

    with pytest.raises(TypeError, match=r"gave a 1-d float64 array of shape \(2,\)"):
        _from_lib(np, Wrong(), "wronglib")


def test_backend_option_works_for_a_library_reached_through_array_api_compat(tmp_path):
    """--backend registers a Backend for dask's arrays (found by array-api-compat)."""
    pytest.importorskip("dask")
    report = tmp_path / "dask.md"
    args = ["--array-module", "dask.array", "--no-mutation", "--report", str(report)]
    args += ["--backend", "topk_core.backends.generic:GENERIC_BACKEND", "-k", "random or ties"]
    proc = _run(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = report.read_text()
    assert "arrays of `dask`" in text
    assert "backend: `generic` from `--backend topk_core.backends.generic:GENERIC_BACKEND`" in text
