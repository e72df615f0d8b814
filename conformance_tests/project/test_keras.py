"""Keras 3 ``SoftTopK`` layer (``topk_core.adapters.keras``) on the JAX and PyTorch backends.

Keras fixes its backend at import, so each backend runs in its own process
(:mod:`conformance_tests.project.keras_worker`; all of them at once, bounded by a
timeout and ended by the fixture): it trains a small model in ``model.fit``,
compares it with ``topk_core`` on the same weights, and saves / reloads it; a
second model trains with ``jit_compile=True``.  About 30-50 s (torch, mostly
``torch.compile``) and 20-25 s (JAX) on 2 shared cores, one after the other.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("keras") is None,
    reason="keras is not installed (pip install 'topk-core[keras]')",
)


#: each backend's worker, all started at once (each process fixes its own Keras
#: backend); "numpy" is the unsupported one
BACKENDS = ("jax", "torch", "numpy")
TIMEOUT_S = 300


def _start(backend: str, out_dir: pathlib.Path) -> subprocess.Popen:
    env = {**os.environ, "KERAS_BACKEND": backend}
    env.pop("JAX_ENABLE_X64", None)  # Keras' default float32 world, not the suite's x64
    return subprocess.Popen(
        [sys.executable, "-m", "conformance_tests.project.keras_worker", str(out_dir)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> dict:
    """``backend -> (out_dir, exit code, stdout, stderr)`` for every installed backend."""
    procs = {}
    for backend in BACKENDS:
        if backend == "numpy" or importlib.util.find_spec(backend) is not None:
            out_dir = tmp_path_factory.mktemp(f"keras-{backend}")
            procs[backend] = (out_dir, _start(backend, out_dir))
    done: dict = {}
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for backend, (out_dir, proc) in procs.items():
            try:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the keras worker ({backend}) ran past {TIMEOUT_S} s")
            done[backend] = (out_dir, proc.returncode, out, err)
    finally:
        for _, proc in procs.values():  # every process ended, whatever failed
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return done


def _result(workers: dict, backend: str) -> tuple[dict, pathlib.Path]:
    out_dir, code, out, err = workers[backend]
    assert code == 0, f"keras worker ({backend}) failed:\n{out}\n{err}"
    return json.loads(out.strip().splitlines()[-1]), out_dir


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_layer_trains_and_matches_topk_core(backend, workers):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    result, out_dir = _result(workers, backend)
    assert result["backend"] == backend
    losses = result["losses"]
    assert losses[-1] < 0.8 * losses[0]
    assert result["max_err"]["probs"] < 1e-4
    assert result["max_err"]["hard_grad"] < 1e-5
    # model.compile(jit_compile=True): XLA on JAX, torch.compile on torch
    assert result["jit_losses"][-1] < 0.8 * result["jit_losses"][0]
    assert result["max_err"]["jit_compile"] < 1e-4
    assert (out_dir / f"model-{backend}.keras").is_file()


def test_keras_unsupported_backend_is_a_clear_error(workers):
    # Keras' NumPy backend needs nothing beyond NumPy; TensorFlow is not installed here
    result, _ = _result(workers, "numpy")
    message = result["error"]
    for name in ("'numpy'", "'jax'", "'torch'", "KERAS_BACKEND"):
        assert name in message, message
