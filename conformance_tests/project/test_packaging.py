"""Packaging contract: lazy imports, the mapped sub-packages, the built wheel."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import sysconfig

import pytest

import topk_core

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(cmd, cwd, env=None, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_import_is_lazy(tmp_path):
    code = (
        "import sys, numpy as np, topk_core\n"
        "topk_core.dftopk(np.ones(4), 2)\n"
        "heavy = [m for m in ('torch', 'jax', 'cupy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    assert _run([sys.executable, "-c", code], cwd=tmp_path).strip() == "ok"


@pytest.mark.parametrize("name", ["backends", "adapters"])
def test_mapped_folders_refuse_wrong_import_name(tmp_path, name):
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import {name}"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert f"must be imported as 'topk_core.{name}'" in proc.stderr


def test_subpackages_installed_under_topk_core():
    assert importlib.import_module("topk_core.backends").__name__ == "topk_core.backends"
    assert importlib.import_module("topk_core.adapters").__name__ == "topk_core.adapters"


MODULES = [
    "topk_core._api",
    "topk_core._math",
    "topk_core._registry",
    "topk_core._layer_args",
    "topk_core._problem",
    "topk_core.losses",
    "topk_core.backends.generic",
]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """topk-core's wheel, built once for this file's tests."""
    import setuptools

    if _version(setuptools.__version__) < (70, 1) and importlib.util.find_spec("wheel") is None:
        pytest.skip(
            f"setuptools {setuptools.__version__} has no bdist_wheel without the 'wheel' "
            f"package; pip install -e '.[test]' installs setuptools>=70.1"
        )
    tmp_path = tmp_path_factory.mktemp("wheel")
    dist = tmp_path / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(ROOT),
        ],
        cwd=tmp_path,
    )
    wheels = list(dist.glob("topk_core-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_checkout(tmp_path, wheel):
    """Install the wheel into a fresh venv, use it from elsewhere, including the
    conformance suite's entry point (with its mutation proof)."""
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "topk_core/backends/numpy_backend.py" in names
    assert "topk_core/py.typed" in names
    assert not any(n.startswith(("backends/", "adapters/", "conformance_tests/")) for n in names)
    # the third-party suite ships, the project's own tests do not
    assert "topk_core/conformance/test_contract.py" in names
    assert "topk_core/conformance/conformance.ini" in names
    assert "topk_core/conformance/__main__.py" in names
    assert not any(n.startswith("topk_core/conformance/project/") for n in names)
    venv = tmp_path / "venv"
    # reuse this interpreter's site-packages for numpy/array-api-compat: no network needed
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    site = sysconfig.get_paths()["purelib"]
    env = {**os.environ, "PYTHONPATH": site, "PYTHONNOUSERSITE": "1"}
    _run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--target",
            str(tmp_path / "target"),
            str(wheel),
        ],
        cwd=tmp_path,
        env=env,
    )
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "target"), site])
    code = (
        "import numpy as np, topk_core, pathlib\n"
        "assert 'target' in pathlib.Path(topk_core.__file__).parts, topk_core.__file__\n"
        "import topk_core.backends.numpy_backend\n"
        "p = topk_core.dftopk(np.array([3.0, 1.0, 2.0]), 1, tau=0.5)\n"
        "print(np.round(p, 4).tolist())\n"
    )
    out = _run([str(py), "-c", code], cwd=tmp_path, env=env)
    assert out.strip() == "[0.7311, 0.0474, 0.2689]"
    # the installable conformance suite, from outside the checkout
    report = tmp_path / "strict.md"
    args = ["--array-module", "array_api_strict", "--no-scaling", "--report", str(report)]
    env = {k: v for k, v in env.items() if not k.startswith("TOPK_CONFORMANCE_")}
    out = _run([str(py), "-m", "topk_core.conformance", *args], cwd=tmp_path, env=env)
    assert " 0 failed" in out and "6/6 planted bugs caught" in out, out
    text = report.read_text()
    assert str(tmp_path / "target") in _run(
        [str(py), "-c", "import topk_core.conformance as c; print(c.__file__)"], tmp_path, env
    )
    assert "| array_api_strict |" in text and "6/6 planted bugs caught" in text


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def test_version():
    assert isinstance(topk_core.__version__, str)


def test_doctor_runs_and_reports(tmp_path):
    out = _run(
        [
            sys.executable,
            "-m",
            "topk_core",
            "--n",
            "20000",
            "--repeats",
            "1",
            "--libraries",
            "numpy,array_api_strict",
        ],
        cwd=tmp_path,
    )
    lines = [ln for ln in out.splitlines() if ln.startswith("| numpy") or ln.startswith("| array")]
    assert len(lines) == 2
    assert all("| ok " in ln for ln in lines)
    assert "warm-up calls" in out
    # the footer names the settings the run used
    assert "n = 20000 float32, k = n/10 = 2000, tau = 0.1" in out
    assert "check: x of shape (4, 257) float64, k = 25, tau = 0.3" in out
    assert "best of 1 calls after warm-up" in out
    assert "numpy: dftopk_and_vjp" in out


def test_doctor_rejects_bad_arguments(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "topk_core", "--libraries", "nope"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "unknown libraries ['nope']" in proc.stderr


def _device_check(tmp_path, **env):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TOPK_", "JAX_"))},
        "PYTHON": sys.executable,
        "MPLBACKEND": "Agg",
        **env,
    }
    script = ROOT / "benchmarks" / "device_check.sh"
    return subprocess.run(
        ["bash", str(script), "run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_device_check_script_runs_on_the_cpu(tmp_path, wheel):
    """The prepared GPU check (benchmarks/device_check.sh run) end to end on the CPU with
    small sizes: the carried wheel installed apart and imported from there, the suite from
    the installed files, both benchmark runs, and only what the device tool brings back
    (at most 8 files, at most 2 folders down) in OUT."""
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / wheel.name).write_bytes(wheel.read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    site = tmp_path / "site"
    proc = _device_check(
        tmp_path,
        OUT=str(out),
        TOPK_CHECK_WHEELS=str(wheels),
        TOPK_CHECK_SITE=str(site),
        TOPK_CHECK_DEVICE="cpu",
        TOPK_CHECK_BACKENDS="numpy",
        TOPK_CHECK_SIZES="2^10",
        TOPK_CHECK_BIG="2^12",
        TOPK_CHECK_SUITE_K="torch_cuda or cupy or (numpy and float32 and test_forward)",
        TOPK_CHECK_JAX_K="numpy and float64 and test_errors",  # the last step, cheaply
        TOPK_CHECK_JOBS="0",
        TOPK_CHECK_BENCH_ARGS="--repeats 1 --warmup 1 --pass-rounds 5 --pass-budget 0.2",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert f"topk_core 0.1.0 {site}/topk_core/__init__.py" in log, log[:2000]
    assert log.count("exit 0") == 5, log
    conformance = (out / "conformance.txt").read_text()
    # the installed files (named relative to the working directory or not, by pytest)
    assert "site/topk_core/conformance/test_" in conformance, conformance
    assert " passed" in conformance and "failed" not in conformance
    assert "no CUDA device visible to torch" in conformance  # torch_cuda selected, skipped
    assert " passed" in (out / "gpu_tests.txt").read_text()
    assert " passed" in (out / "conformance_jax.txt").read_text()
    for name, n in (("bench", 1024), ("big", 4096)):
        payload = json.loads((out / name / "results.json").read_text())
        entry = next(e for e in payload["passes"] if e["n"] == n)
        assert entry["status"] == "ok" and entry["bandwidth"]["total_gbps"] > 0
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)


def test_device_check_script_refuses_without_out_or_wheels(tmp_path):
    proc = _device_check(tmp_path)
    assert proc.returncode == 2 and "set OUT" in proc.stderr
    proc = _device_check(tmp_path, OUT=str(tmp_path), TOPK_CHECK_WHEELS=str(tmp_path))
    assert proc.returncode == 2 and "no wheels in" in proc.stdout
