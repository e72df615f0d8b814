"""``group=`` on JAX: a selection axis sharded over 8 simulated CPU devices.

The checks run in subprocesses (``XLA_FLAGS`` must be set before JAX starts)
from :mod:`conformance_tests.project.scaleout_jax_worker`; each compares the
``shard_map`` + ``group=`` result with the single-device one on the same data
(forward, threshold, hard mask, gradients, ties across shard boundaries,
masks, per-row k, infinities, dtypes), checks batch-sharded inputs without a
group, the errors, and that the compiled HLO's collectives do not grow with n.
About 1 minute on 2 shared cores (the checks split over two processes at once).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# project/ is not a package: load the worker beside this file by its path
_spec = importlib.util.spec_from_file_location(
    "scaleout_jax_worker", Path(__file__).with_name("scaleout_jax_worker.py")
)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

TIMEOUT_S = 600


#: the worker's checks in this many subprocesses at once: compile-bound, they
#: keep both of CI's cores busy (about 77 s in one process, 45-55 s in two)
PARTS = 2


@pytest.fixture(scope="module")
def results() -> dict:
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={worker.DEVICES}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_ENABLE_X64"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(worker.__file__)), *worker.CASES[i::PARTS]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(PARTS)
    ]
    merged: dict = {}
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the JAX scale-out worker ran past {TIMEOUT_S} s")
            lines = [ln for ln in out.splitlines() if ln.startswith(worker.MARKER)]
            if proc.returncode != 0 or not lines:
                pytest.fail(
                    f"worker failed (exit {proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}"
                )
            merged.update(json.loads(lines[-1][len(worker.MARKER) :]))
    finally:
        for proc in procs:  # every process ended, whatever failed
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return merged


@pytest.mark.parametrize("case", worker.CASES)
def test_jax_group(results: dict, case: str) -> None:
    assert case in results, f"the worker did not run {case}"
    assert results[case]["ok"], results[case]["detail"]


def test_docstring_examples():
    pytest.importorskip("jax")
    import doctest

    from topk_core.backends import jax_backend

    result = doctest.testmod(
        jax_backend, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    )
    assert result.attempted > 0 and result.failed == 0


def test_scaleout_benchmark_smoke(tmp_path):
    """``python -m benchmarks scaleout``: every method runs and agrees with ours; our
    communication stays constant in n while GSPMD's (on a batch) and the all-gather's grow."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "benchmarks", "scaleout", "--n", "2^12,2^14", "--p", "4"]
    cmd += ["--batch", "2", "--repeats", "1", "--no-plot", "--out", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    by = {(r["method"], r["n"]): r for r in rows}
    assert all(r["status"] == "ok" for r in rows), rows
    assert all(r["max_abs_diff_vs_ours"] < 1e-6 for r in rows)
    small, large = 2**12, 2**14
    assert by["ours", small]["bytes_per_device"] == by["ours", large]["bytes_per_device"] > 0
    for method in ("gspmd", "allgather"):
        assert by[method, large]["bytes_per_device"] > 2 * by[method, small]["bytes_per_device"]
    assert (tmp_path / "results.md").read_text().count("| 2 | 2^1") == 2
