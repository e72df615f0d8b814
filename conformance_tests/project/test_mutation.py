"""The suite's plumbing: --array-module, --backend, the report, and the mutants.

The full mutation proof (every mutant caught by the forward, gradient and
contract files) is ``python -m topk_core.conformance.mutation_proof``; it also
runs here under ``-m slow`` (and after every ``python -m topk_core.conformance``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from topk_core.conformance import mutants
from topk_core.conformance.mutation_proof import main as proof_main

import topk_core
from topk_core import _api, _math
from topk_core._registry import get_backend

ROOT = Path(__file__).resolve().parents[2]
OFF_BY_ONE = "--backend=topk_core.conformance.mutants:OFF_BY_ONE_K"


def _pytest(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOPK_CONFORMANCE_")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(
        cmd, cwd=ROOT, env=clean | (env or {}), capture_output=True, text=True, timeout=300
    )


def test_no_mutant_in_the_normal_run():
    """Mutants only exist in processes that ask for them."""
    assert mutants.ENV not in os.environ
    for module, name in ((_math, "tie_weights"), (_math, "threshold"), (_api, "select")):
        assert getattr(module, name).__module__ == module.__name__, f"{name} is patched"
    assert _api.forward.__qualname__ == "forward"
    assert "mutant" not in get_backend("array_api_strict").name


def _battery(xp):
    """Outputs that each planted bug changes (ties, masks, huge values, dtype)."""
    x = xp.asarray(np.array([[3.0, 1.0, 3.0, 2.0, 2.0, 0.0]]), dtype=xp.float32)
    g = xp.asarray(np.array([[1.0, -2.0, 0.5, 1.5, -1.0, 0.3]]), dtype=xp.float32)
    mask = xp.asarray(np.array([[False, True, True, True, True, True]]))
    big = xp.asarray(np.array([[3e38, 2.9e38, 2.8e38, -3e38]]), dtype=xp.float32)
    p = topk_core.dftopk(x, 2)
    return {
        "p": np.asarray(p),
        "dtype": str(p.dtype),
        "grad": np.asarray(topk_core.dftopk_vjp(x, 2, g)[0]),
        "masked": np.asarray(topk_core.dftopk(x, 2, mask=mask)),
        "big": np.asarray(topk_core.dftopk(big, 2)),
    }


@pytest.mark.parametrize("name", list(mutants.MUTANTS))
def test_mutant_is_live_and_undone(name):
    """Each mutant changes results for its target library only, and undo restores them."""
    import array_api_strict as xp

    clean = _battery(xp)
    clean_np = _battery(np)
    undo = mutants.install(name, "array_api_strict")
    try:
        mutated = _battery(xp)
        mutated_np = _battery(np)
    finally:
        undo()

    def same(a, b) -> bool:
        return a == b if isinstance(a, str) else np.array_equal(a, b, equal_nan=True)

    changed = [key for key in clean if not same(clean[key], mutated[key])]
    assert changed, f"mutant {name} changed nothing"
    assert all(same(clean_np[key], mutated_np[key]) for key in clean_np), "NumPy was mutated"
    after = _battery(xp)
    assert all(same(clean[key], after[key]) for key in clean), "undo did not restore"
    test_no_mutant_in_the_normal_run()


def test_array_module_option_runs_the_suite_and_writes_the_report(tmp_path):
    """--array-module=array_api_strict drives the lib fixture; the report gets its row."""
    report = tmp_path / "report.md"
    proc = _pytest(
        "conformance_tests/test_contract.py",
        "-k",
        "float32 and (random or mask)",
        "--array-module=array_api_strict",
        f"--conformance-report={report}",
        "-rA",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (
        "PASSED conformance_tests/test_contract.py::test_agrees_with_numpy[array_api_strict-"
        in (proc.stdout)
    )
    assert "[numpy-" not in proc.stdout and "[torch-" not in proc.stdout
    text = report.read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| array_api_strict |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1].startswith("float32: ") and int(cells[5]) == 2 and cells[6] == "0", row


def test_backend_option_registers_the_backend():
    """--backend swaps in a Backend for the library: an off-by-one copy makes checks fail."""
    args = ("conformance_tests/test_contract.py", "-k", "agrees and float32 and random")
    ok = _pytest(*args, "--array-module=array_api_strict")
    bad = _pytest(
        *args,
        "--array-module=array_api_strict",
        "--backend=topk_core.conformance.mutants:OFF_BY_ONE_K",
    )
    assert ok.returncode == 0, ok.stdout[-2000:]
    assert bad.returncode == 1, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "topk_mask differs from NumPy" in bad.stdout or "max error" in bad.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--array-module=no_such_array_lib_xyz"], "cannot import 'no_such_array_lib_xyz'"),
        (
            ["--backend=topk_core.conformance.mutants:OFF_BY_ONE_K"],
            "--backend needs --array-module",
        ),
        (["--array-module=numpy", "--backend=nocolon"], "must look like 'package.module:ATTR'"),
        (
            ["--array-module=numpy", "--backend=topk_core.conformance.mutants:ENV"],
            "not a topk_core",
        ),
    ],
)
def test_bad_options_are_usage_errors(args, message):
    proc = _pytest("conformance_tests/project/test_mutation.py", "--co", *args)
    assert proc.returncode == 4, proc.stdout[-1000:] + proc.stderr[-1000:]
    assert message in proc.stderr


@pytest.mark.slow
def test_mutation_proof_catches_every_mutant(capsys):
    """Every planted bug makes the forward/gradient/contract files fail."""
    assert proof_main([]) == 0, capsys.readouterr().out


@pytest.mark.slow
def test_mutation_proof_reaches_numpys_own_fast_paths(capsys):
    """NumPy arrays run the backend's O(#ties) tie weights, not the generic
    ``tie_weights``: the gradient mutants must reach them too (they planted their bug
    in ``tie_weights`` alone, and NumPy's proof caught 4 of 6, until 2026-12-07)."""
    assert proof_main(["--array-module", "numpy"]) == 0, capsys.readouterr().out


def test_proof_says_why_the_clean_run_did_not_run(capsys):
    """A clean run stopped by a usage error (bad --backend) is not 'failing files'."""
    assert proof_main(["--backend", "no_such_module_xyz:BACKEND", "--jobs", "1"]) == 2
    out = capsys.readouterr().out
    assert "stopped with a usage error (exit 4)" in out, out
    assert "ModuleNotFoundError" in out and "fail without a planted bug" not in out, out


def test_proof_markdown_of_failing_files_and_of_crashed_mutants():
    from topk_core.conformance.mutation_proof import Outcome, markdown

    failing = markdown(
        Outcome("(none)", 1, "FAILED test_forward.py::t - AssertionError: x", 1.0), []
    )
    assert "fail without a planted bug (exit 1): `FAILED test_forward.py::t" in failing[0]
    crashed = Outcome("off_by_one_k", 4, "ERROR: --backend 'm:X' | bad", 1.0)
    row = next(ln for ln in markdown(Outcome("(none)", 0, "", 1.0), [crashed]) if "off_by" in ln)
    assert "| NO | 4 (usage error) | `ERROR: --backend 'm:X' / bad` |" in row, row


@pytest.mark.parametrize("jobs", ["0", "-3"])
def test_proof_rejects_jobs_below_one(jobs, capsys):
    with pytest.raises(SystemExit) as exc:
        proof_main(["--jobs", jobs])
    assert exc.value.code == 2
    assert f"--jobs must be an integer >= 1, got {jobs}" in capsys.readouterr().err


def test_proof_help_names_the_module(capsys):
    with pytest.raises(SystemExit) as exc:
        proof_main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m topk_core.conformance.mutation_proof"), out
    assert "Exit code: 0 when every planted bug was caught" in " ".join(out.split())


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_dtype_upcast_reaches_the_autodiff_backends(library):
    """torch and JAX run their forward through the backend's ``apply`` hook, not
    ``_api.forward``: the dtype mutant wraps that too (before 2026-12-07 their mutation
    proofs reported it uncaught, 5/6)."""
    mod = pytest.importorskip(library)
    if library == "jax" and not mod.config.jax_enable_x64:
        pytest.skip("float64 needs jax_enable_x64")
    x = mod.numpy.ones(4, dtype="float32") if library == "jax" else mod.ones(4)
    undo = mutants.install("dtype_upcast", library)
    try:
        assert str(topk_core.dftopk(x, 2).dtype).endswith("float64")
        assert str(topk_core.dftopk(x, 2, hard=True).dtype).endswith("float64")
        assert topk_core.dftopk(np.ones(4, np.float32), 2).dtype == np.float32
    finally:
        undo()
    assert str(topk_core.dftopk(x, 2).dtype).endswith("float32")
    assert "mutant" not in get_backend(library).name
    test_no_mutant_in_the_normal_run()
