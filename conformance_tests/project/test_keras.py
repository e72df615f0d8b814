"""Keras 3 ``SoftTopK`` layer (``topk_core.adapters.keras``) on the JAX and PyTorch backends.

Keras fixes its backend at import, so each backend runs in its own process
(:mod:`conformance_tests.project.keras_worker`, bounded by a timeout and ended by
``subprocess.run``): it trains a small model in ``model.fit``, compares it with
``topk_core`` on the same weights, and saves / reloads it; a second model trains
with ``jit_compile=True``.  About 50 s (torch, mostly ``torch.compile``) and 25 s
(JAX) on 2 shared cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("keras") is None,
    reason="keras is not installed (pip install 'topk-core[keras]')",
)


def _worker(backend: str, out_dir: pathlib.Path, timeout: float = 300) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend}
    env.pop("JAX_ENABLE_X64", None)  # Keras' default float32 world, not the suite's x64
    proc = subprocess.run(
        [sys.executable, "-m", "conformance_tests.project.keras_worker", str(out_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"keras worker ({backend}) failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_layer_trains_and_matches_topk_core(backend, tmp_path):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    result = _worker(backend, tmp_path)
    assert result["backend"] == backend
    losses = result["losses"]
    assert losses[-1] < 0.8 * losses[0]
    assert result["max_err"]["probs"] < 1e-4
    assert result["max_err"]["hard_grad"] < 1e-5
    # model.compile(jit_compile=True): XLA on JAX, torch.compile on torch
    assert result["jit_losses"][-1] < 0.8 * result["jit_losses"][0]
    assert result["max_err"]["jit_compile"] < 1e-4
    assert (tmp_path / f"model-{backend}.keras").is_file()


def test_keras_unsupported_backend_is_a_clear_error(tmp_path):
    # Keras' NumPy backend needs nothing beyond NumPy; TensorFlow is not installed here
    result = _worker("numpy", tmp_path)
    message = result["error"]
    for name in ("'numpy'", "'jax'", "'torch'", "KERAS_BACKEND"):
        assert name in message, message
