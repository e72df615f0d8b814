"""``group=`` on PyTorch: 4 gloo processes on 127.0.0.1 (torch.multiprocessing, spawn).

The ranks run :mod:`conformance_tests.project.scaleout_torch_worker` in one launcher
subprocess; each check compares a rank's shard of the result with the
single-process result on the whole axis: forward, threshold, hard mask with
ties across shard boundaries, masks, per-row k, autograd backward (x and a
shared tau), the closed-form VJP/JVP, forward-mode AD, dtypes, infinities, an
empty shard, communication independent of n, the errors (including a
dtype mismatch between ranks, raised on every rank instead of hanging), and
``torch.compile`` (``eager``/``aot_eager`` backends) plus ``torch.func.grad``, and
``torch.func.vmap``/``jacrev``/``jacfwd``/``hessian`` (ranks mapping over different
sizes raise on every rank).  NCCL/CUDA is not tested here (no GPU).  About 60-70 s
on 2 shared cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# project/ is not a package: load the worker beside this file by its path
_spec = importlib.util.spec_from_file_location(
    "scaleout_torch_worker", Path(__file__).with_name("scaleout_torch_worker.py")
)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

TIMEOUT_S = worker.DEADLINE_S + 60


def _distributed_available() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available in this build"
    return None


@pytest.fixture(scope="module")
def results() -> dict:
    why = _distributed_available()
    if why:
        pytest.skip(why)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(worker.__file__))],
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the torch scale-out launcher ran past {TIMEOUT_S} s: {exc.stderr!r:.2000}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(worker.MARKER)]
    if proc.returncode != 0 or not lines:
        pytest.fail(
            f"launcher failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(worker.MARKER) :])


def test_all_ranks_finished(results: dict) -> None:
    assert "_launcher" not in results, results.get("_launcher")


@pytest.mark.parametrize("case", worker.CASES)
def test_torch_group(results: dict, case: str) -> None:
    assert case in results, f"no rank reported {case}"
    assert results[case]["ok"], results[case]["detail"]


def test_docstring_examples():
    pytest.importorskip("torch")
    import doctest

    from topk_core.backends import torch_distributed

    result = doctest.testmod(
        torch_distributed, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    )
    assert result.attempted > 0 and result.failed == 0


def test_group_errors_without_a_process_group():
    torch = pytest.importorskip("torch")
    import numpy as np

    import topk_core as tk

    with pytest.raises(TypeError, match="ProcessGroup"):
        tk.dftopk(torch.ones(2, 8), 3, group="d")
    with pytest.raises(TypeError, match="dask"):
        tk.dftopk(np.ones((2, 8)), 3, group=object())
