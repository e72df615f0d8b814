"""``python -m topk_core.conformance``: the installable third-party run.

The wheel-installed variant (from outside the checkout) is in test_packaging.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


# a correct backend and one whose threshold is off (a local module: the
# README's `--backend mylib_topk:BACKEND` workflow, run from its folder)
_TOY_BACKENDS = """
import topk_core
from topk_core.backends.generic import select_pair


def theta_off_select(xp, x, k):
    a, b = select_pair(xp, x, k)
    return a + 1e-3, b


GOOD = topk_core.Backend("good-local", select_pair, eager=True)
THETA_OFF = topk_core.Backend("broken-theta", theta_off_select, eager=True)
NOT_A_BACKEND = 42
"""


def _toy(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "toy_topk.py").write_text(_TOY_BACKENDS)
    return folder


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nocolon", "must look like 'package.module:ATTR', got 'nocolon'"),
        ("no_such_module_xyz:X", "--backend 'no_such_module_xyz:X': ModuleNotFoundError"),
        ("topk_core:no_such_attr", "--backend 'topk_core:no_such_attr': AttributeError"),
        ("toy_topk:NOT_A_BACKEND", "is a int, not a topk_core.Backend"),
    ],
)
def test_bad_backend_is_a_bad_argument_before_the_run(tmp_path, spec, message):
    """Exit 2 (bad arguments) with the reason, before pytest runs; no report."""
    _toy(tmp_path)
    proc = _run(["--array-module", "array_api_strict", "--backend", spec], cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr
    assert "pytest exited" not in proc.stderr and "passed" not in proc.stdout
    assert not (tmp_path / "conformance-array_api_strict.md").exists()


@pytest.mark.parametrize(
    ("report", "message"),
    [
        (".", "is a directory"),
        ("missing/dir/r.md", "'missing/dir' does not exist"),
        ("afile/r.md", "'afile' is not a directory"),
    ],
)
def test_bad_report_path_is_a_bad_argument_before_the_run(tmp_path, report, message):
    (tmp_path / "afile").write_text("")
    args = ["--array-module", "array_api_strict", "--no-mutation", "--report", report]
    proc = _run(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"--report {report!r}" in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr and "passed" not in proc.stdout


def test_no_selected_test_keeps_the_existing_report(tmp_path):
    """-k matching nothing: exit 5, said so, and the previous report is not overwritten."""
    old = tmp_path / "conformance-array_api_strict.md"
    old.write_text("previous report\n")
    proc = _run(["--array-module", "array_api_strict", "-k", "zzznothing"], cwd=tmp_path)
    assert proc.returncode == 5, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no tests ran (-k or -m matched no test); no report written" in proc.stderr
    assert old.read_text() == "previous report\n"


def test_help_documents_exit_codes_and_pytest_passthrough(capsys):
    from topk_core.conformance.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "[-- PYTEST_ARGS ...]" in out and "Arguments after -- go to pytest" in out
    for code in ("0 every check passed", "2 bad arguments", "5 no test selected"):
        assert code in out, code
    assert "conformance-dask_array.md" in out


def _theta_off_report(tmp_path, selection):
    """The report lines of a run of the tests ``-k selection`` on a backend whose
    threshold is off (it must fail)."""
    _toy(tmp_path)
    report = tmp_path / "theta.md"
    args = ["--array-module", "array_api_strict", "--backend", "toy_topk:THETA_OFF"]
    args += ["--no-mutation", "--report", str(report), "-k", selection]
    proc = _run(args, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    return report.read_text().splitlines()


def test_report_failure_messages_say_why(tmp_path):
    """Failures keep their content: NumPy assertions' first line is empty."""
    lines = _theta_off_report(tmp_path, "test_axis_and_nd_batches")
    rows = [ln for ln in lines if ln.startswith("| array_api_strict | `")]
    assert len(rows) == 4 and all("test_axis_and_nd_batches" in row for row in rows), rows
    for row in rows:
        message = row.rstrip("|").rsplit("|", 1)[-1].strip()
        assert message.startswith("AssertionError: Not equal to tolerance"), row
        assert "Mismatched elements" in message and "Max absolute difference" in message, row


def test_failure_summary_of_a_numpy_assertion():
    from topk_core.conformance.report import failure_summary

    with pytest.raises(AssertionError) as exc:
        np.testing.assert_array_equal([1, 2, 3], [1, 2, 4], err_msg="topk_mask differs")
    got = failure_summary(f"AssertionError: {exc.value}")
    assert got.startswith("AssertionError: Arrays are not equal; topk_mask differs;"), got
    assert failure_summary("\n\n") == "(no message)"
    assert len(failure_summary("ValueError: " + "x" * 1000)) == 240


class _FailingCompute:
    """Like a dask array whose compute raises (no DLPack; __array__ computes)."""

    __module__ = "fakelib.core"
    shape = (2,)
    dtype = np.dtype("float64")

    def __array__(self, dtype=None, copy=None):
        raise ValueError("zero-size array to reduction operation maximum which has no identity")


def test_unreadable_result_error_includes_the_exception_messages():
    with pytest.raises(TypeError) as exc:
        _from_lib(np, _FailingCompute(), "fakelib")
    message = str(exc.value)
    assert (
        "np.asarray: ValueError: zero-size array to reduction operation maximum "
        "which has no identity" in message
    ), message


def test_mutation_proof_imports_a_backend_from_the_invoking_directory(tmp_path, monkeypatch):
    """The mutant subprocesses see the cwd and relative PYTHONPATH like the runner."""
    from topk_core.conformance import mutation_proof

    _toy(tmp_path)
    _toy(tmp_path / "sub").joinpath("toy_topk.py").rename(tmp_path / "sub" / "toy_sub.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", "sub")
    for spec in ("toy_topk:GOOD", "toy_sub:GOOD"):
        out = mutation_proof._pytest("array_api_strict", spec, "off_by_one_k")
        assert out.returncode == 1 and out.caught, out
        # the failing test by its file name, not a path relative to the cwd
        assert out.first_failure.startswith("FAILED test_"), out


def test_subprocess_pythonpath_is_absolute(tmp_path, monkeypatch):
    from topk_core.conformance.mutation_proof import _subprocess_env

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["sub", "", "/abs/dir"]))
    got = _subprocess_env(tmp_path)["PYTHONPATH"].split(os.pathsep)
    assert got == [str(tmp_path / "sub"), str(tmp_path), "/abs/dir"]


def test_report_shows_the_errors_of_failing_cases(tmp_path):
    """A broken backend's error columns show its error, not the 0 of passing cases."""
    lines = _theta_off_report(tmp_path, "agrees and float32")
    row = next(ln for ln in lines if ln.startswith("| array_api_strict | f"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1].removeprefix("float32: ")) > 1e-4, row  # forward error
    assert float(cells[2].removeprefix("float32: ")) > 1e-4, row  # gradient error


def test_a_report_from_an_xdist_run_is_refused(tmp_path):
    """With -n the report's values are recorded in the workers: a usage error, not a partial
    report (the runner, and --conformance-report in a checkout's pytest run)."""
    pytest.importorskip("xdist")
    old = tmp_path / "conformance-array_api_strict.md"
    old.write_text("previous report\n")
    proc = _run(["--array-module", "array_api_strict", "--", "-n", "2"], cwd=tmp_path)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "cannot be written from a pytest-xdist run (-n 2)" in proc.stdout + proc.stderr
    assert old.read_text() == "previous report\n"

    suite = Path(__file__).resolve().parents[1]
    report = tmp_path / "r.md"
    args = ["-n", "2", "-p", "no:cacheprovider", f"--conformance-report={report}"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *args, str(suite / "test_contract.py")],
        cwd=suite.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "run the report without -n" in proc.stdout + proc.stderr
    assert "passed" not in proc.stdout and not report.exists()
