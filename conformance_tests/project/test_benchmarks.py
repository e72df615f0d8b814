"""The benchmark harness: LapSum baseline correctness, parsing, reporting, CLI smoke runs.

No timing is asserted: only that every operator runs, computes what it claims
and that the outputs (JSON, Markdown, PNG) are written and consistent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ is run from the checkout, never installed

from benchmarks import cli, lapsum, report  # noqa: E402


def _laplace_cdf(z):
    return np.where(z <= 0, 0.5 * np.exp(np.minimum(z, 0)), 1 - 0.5 * np.exp(-np.maximum(z, 0)))


def _bisect_threshold(x, k, alpha):
    """Independent reference: bisection on the monotone sum of the soft mask."""
    lo = np.full(x.shape[:-1] + (1,), x.min() - 60 * alpha)
    hi = np.full(x.shape[:-1] + (1,), x.max() + 60 * alpha)
    for _ in range(200):
        mid = (lo + hi) / 2
        s = _laplace_cdf((x - mid) / alpha).sum(-1, keepdims=True)
        lo = np.where(s > k, mid, lo)
        hi = np.where(s > k, hi, mid)
    return (lo + hi) / 2


CASES = [
    (10, 3, 1.0, 1.0),
    (300, 30, 0.1, 1.0),
    (300, 150, 5.0, 1.0),
    (64, 1, 0.01, 1.0),
    (64, 63, 50.0, 1.0),
    (40, 20, 1.0, 1000.0),
]  # last: range >> 600 alpha, exact fallback


@pytest.mark.parametrize("n,k,alpha,scale", CASES)
def test_lapsum_numpy_matches_bisection(rng, n, k, alpha, scale):
    x = rng.standard_normal((3, n)) * scale
    p = lapsum.lapsum(np, x, k, alpha)
    ref = _laplace_cdf((x - _bisect_threshold(x, k, alpha)) / alpha)
    np.testing.assert_allclose(p, ref, atol=1e-9)
    np.testing.assert_allclose(p.sum(-1), k, rtol=1e-10)


@pytest.mark.parametrize("n,k,alpha,scale", CASES)
def test_lapsum_vjp_matches_finite_differences(rng, n, k, alpha, scale):
    x = rng.standard_normal((2, n)) * scale
    g = rng.standard_normal(x.shape)
    u = rng.standard_normal(x.shape)
    eps = 1e-6 * max(alpha, 1e-3)
    fd = (
        (lapsum.lapsum(np, x + eps * u, k, alpha) - lapsum.lapsum(np, x - eps * u, k, alpha)) * g
    ).sum() / (2 * eps)
    got = (lapsum.lapsum_vjp(np, x, k, g, alpha) * u).sum()
    assert got == pytest.approx(fd, rel=1e-4, abs=1e-6)


def test_lapsum_torch_and_jax_agree_with_numpy(rng):
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x = rng.standard_normal((4, 500)).astype(np.float32)
    g = rng.standard_normal((4, 500)).astype(np.float32)
    k, alpha = 50, 0.5
    p_ref = lapsum.lapsum(np, x.astype(np.float64), k, alpha)
    g_ref = lapsum.lapsum_vjp(np, x.astype(np.float64), k, g.astype(np.float64), alpha)

    xt = torch.tensor(x, requires_grad=True)
    pt = lapsum.lapsum_torch(xt, k, alpha)
    pt.backward(torch.tensor(g))
    np.testing.assert_allclose(pt.detach().numpy(), p_ref, atol=2e-6)
    np.testing.assert_allclose(xt.grad.numpy(), g_ref, atol=2e-6 * np.abs(g_ref).max())

    f = jax.jit(lambda v: jax.vjp(lambda t: lapsum.lapsum_jax(t, k, alpha), v))
    pj, pull = f(jnp.asarray(x))
    (gj,) = pull(jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(pj), p_ref, atol=2e-6)
    np.testing.assert_allclose(np.asarray(gj), g_ref, atol=2e-6 * np.abs(g_ref).max())


def test_lapsum_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        lapsum.lapsum(np, np.arange(4.0), 4)
    with pytest.raises(ValueError, match="alpha"):
        lapsum.lapsum(np, np.arange(4.0), 2, 0.0)


def test_parse_sizes_and_fractions():
    assert cli.parse_sizes("2^10,2**4,1e6,1024x4096,100") == [
        (None, 1024),
        (None, 16),
        (None, 1_000_000),
        (1024, 4096),
        (None, 100),
    ]
    assert cli.parse_fractions("0.1,0.5") == [0.1, 0.5]
    for bad in ("abc", "1.5e0", "1", "2^x"):
        with pytest.raises(ValueError, match="--sizes"):
            cli.parse_sizes(bad)
    for bad in ("0", "1", "x", ""):
        with pytest.raises(ValueError, match="--k"):
            cli.parse_fractions(bad)


def _row(backend, op, mode, median, n=1_000_000, kfrac=0.1):
    return {
        "backend": backend,
        "dtype": "float32",
        "batch": None,
        "n": n,
        "kfrac": kfrac,
        "op": op,
        "mode": mode,
        "status": "ok",
        "median_s": median,
        "min_s": median,
    }


def test_ratios_and_targets():
    rows = [
        _row("torch", "ours", "fwd+bwd", 0.010),
        _row("torch", "official", "fwd+bwd", 0.030),
        _row("torch", "lapsum", "fwd+bwd", 0.040),
        _row("torch", "hard", "sel", 0.004),
        _row("torch", "ours_select", "sel", 0.006),
        _row("torch", "ours", "fwd+bwd", 0.5, n=1024),  # other sizes are not the headline
    ]
    head = {r["baseline"]: r for r in report.headline(report.ratios(rows))}
    assert head["official"]["ratio_median"] == pytest.approx(3.0)
    assert head["official"]["met"] is True
    assert head["lapsum"]["ratio_median"] == pytest.approx(4.0)
    assert head["lapsum"]["met"] is False  # target >= 5
    floor = head["best_selection (hard)"]
    assert floor["ratio_median"] == pytest.approx(2.5) and floor["met"] is False
    assert report.fit_slope([(2**16, 1.0), (2**18, 4.0), (2**20, 16.0)]) == pytest.approx(1.0)
    assert report.fit_slope([(2**10, 1.0), (2**12, 4.0)]) is None  # below SLOPE_MIN_N


def test_pass_budget_minima_and_medians(monkeypatch):
    # a fake clock: each call advances it by the next scripted duration of that callable
    from benchmarks import passes

    now = [0.0]
    script = {
        "unit": iter([2.0, 1.0, 1.0, 4.0, 1.0] + [1.0] * passes.HOT_CALLS + [0.5]),
        "select": iter([6.0, 5.0, 9.0, 5.0, 7.0]),
        "fwd_math": iter([2.0] * 5),
        "bwd_math": iter([3.0, 3.0, 3.0, 1.0, 3.0]),
        "total": iter([12.0, 9.0, 30.0, 10.0, 11.0]),
    }

    def timed(name):
        def run():
            now[0] += next(script[name])

        return run

    monkeypatch.setattr(passes.time, "perf_counter", lambda: now[0])
    phases = {p: timed(p) for p in passes.PHASES}
    out = passes.measure(timed("unit"), phases, timed("total"), rounds=5, budget_s=1e9, warmup=0)
    assert out["rounds"] == 5 and out["unit_s"] == 1.0 and out["unit_median_s"] == 1.0
    assert out["unit_hot_s"] == 1.0
    p, m = out["passes"], out["passes_median"]
    assert (p["select"], p["fwd_math"], p["bwd_math"], p["total"]) == (5.0, 2.0, 1.0, 9.0)
    assert p["math"] == 3.0 and p["other"] == 1.0
    assert (m["select"], m["bwd_math"], m["total"]) == (6.0, 3.0, 11.0)
    assert m["math"] == 5.0 and m["other"] == 0.0
    row = {"backend": "jax", "n": 10**6, "passes": p}
    assert ("passes, fwd+bwd in all", 9.0, 10.0, True) in passes.targets(row)


def _run_cli(tmp_path, *args):
    env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
    env.pop("JAX_ENABLE_X64", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", *args, "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    return proc, payload, md


def test_cpu_label_names_generation_and_vector_width():
    zen3 = {"cpu": "AMD EPYC", "cpu_flags": ["avx", "avx2"], "cpu_family": 25, "cpu_model_id": 1}
    assert report.cpu_label(zen3) == "AMD EPYC (family 25, model 1; AVX2)"
    zen4 = dict(zen3, cpu_flags=["avx2", "avx512f"], cpu_model_id=17)
    assert report.cpu_label(zen4) == "AMD EPYC (family 25, model 17; AVX-512)"
    # older results.json files have neither the ids nor (before them) the flags
    assert report.cpu_label({"cpu": "AMD EPYC", "cpu_flags": ["avx512f"]}) == "AMD EPYC (AVX-512)"
    assert report.cpu_label({"cpu": "arm64"}) == "arm64"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "cpu family" in cpuinfo.read_text():
        ids = report._cpu_id()
        assert isinstance(ids["cpu_family"], int) and isinstance(ids["cpu_model_id"], int)


def test_cli_smoke_numpy_torch(tmp_path):
    pytest.importorskip("torch")
    proc, payload, md = _run_cli(
        tmp_path,
        "--backends",
        "numpy,torch",
        "--sizes",
        "2^8,4x64",
        "--k",
        "0.1",
        "--repeats",
        "2",
        "--warmup",
        "1",
    )
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert "1/4" in proc.stderr  # progress lines
    rows = payload["results"]
    for r in rows:
        if r["backend"] == "numpy" and r["op"] == "official":
            assert r["status"].startswith("n/a")
        else:
            assert r["status"] == "ok", r
            assert len(r["times_s"]) == 2 and r["median_s"] > 0
    saved = [
        r["memory"]["saved_bytes"]
        for r in rows
        if r["backend"] == "torch" and r["mode"] == "fwd+bwd" and r["n"] == 256 and "memory" in r
    ]
    assert len(saved) == 4 and all(s >= 256 * 4 for s in saved)  # at least x itself
    assert payload["machine"]["cores"] >= 1 and "torch" in payload["machine"]
    assert f"Machine: {report.cpu_label(payload['machine'])}, " in md
    assert "## Targets" in md and "| torch | 256 | official / ours |" in md
    # bandwidth: x * 2 moves 2 arrays, forward + backward at least 4 (x, g in; p, grad out)
    budget = [e for e in payload["passes"] if e["status"] == "ok"]
    assert {(e["backend"], e["batch"], e["n"]) for e in budget} >= {("numpy", None, 256)}
    for e in budget:
        nbytes = (e["batch"] or 1) * e["n"] * 4
        bw = e["bandwidth"]
        assert bw["pass_gbps"] == pytest.approx(2 * nbytes / e["unit_s"] / 1e9, rel=2e-3)
        assert bw["total_gbps"] == pytest.approx(4 * nbytes / e["total_s"] / 1e9, rel=2e-3)
    assert "| pass GB/s | total GB/s | load |" in md
    assert {r["baseline"] for r in payload["ratios"] if r["backend"] == "torch"} >= {
        "official",
        "lapsum",
        "sort_dftopk",
        "hard",
        "elementwise",
    }


def test_cli_smoke_jax(tmp_path):
    pytest.importorskip("jax")
    _, payload, md = _run_cli(
        tmp_path,
        "--backends",
        "jax",
        "--operators",
        "ours,lapsum,sort_dftopk,hard",
        "--modes",
        "fwd+bwd",
        "--sizes",
        "2^7",
        "--k",
        "0.5",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--no-plot",
    )
    rows = payload["results"]
    assert [r["status"] for r in rows] == ["ok"] * 4, rows
    for r in rows:
        if r["mode"] == "fwd+bwd":
            assert r["memory"]["saved_bytes"] > 0 and r["memory"]["peak_bytes"] > 0
    assert not (tmp_path / "plot.png").exists()
    assert "jax" in md


def test_cli_rejects_bad_arguments(tmp_path):
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--operators", "ours,nope", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--operators" in proc.stderr and "nope" in proc.stderr


def _main_error(capsys, *argv):
    """Run ``cli.main`` in-process; the exit code and stderr of its ``parser.error``."""
    with pytest.raises(SystemExit) as info:
        cli.main(list(argv))
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "option,value",
    [
        ("--max-seconds", "-1"),  # was a KeyError traceback
        ("--max-seconds", "-0.5"),
        ("--max-seconds", "nan"),
        ("--group-budget", "-5"),  # was accepted silently
        ("--pass-budget", "-1"),
        ("--seed", "-1"),  # was numpy's message, naming no option
    ],
)
def test_cli_rejects_negative_limits(tmp_path, capsys, option, value):
    argv = ["--backends", "numpy", "--sizes", "2^8", "--operators", "ours,hard", "--repeats"]
    code, err = _main_error(
        capsys, *argv, "1", "--no-plot", "--out", str(tmp_path / "o"), option, value
    )
    assert code == 2 and f"{option} must be >= 0" in err and value.lstrip("-") in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "option,value,shown",
    [
        ("--sizes", "2^8,256", "256"),  # the same n written two ways
        ("--sizes", "4x8,2^8,4x8", "4x8"),
        ("--k", "0.5,0.50", "0.5"),
        ("--operators", "ours,hard,ours", "ours"),
        ("--modes", "fwd,fwd", "fwd"),
        ("--dtype", "float32,float32", "float32"),
        ("--backends", "numpy,numpy", "numpy"),
    ],
)
def test_cli_rejects_repeated_values(tmp_path, capsys, option, value, shown):
    """A value given twice used to run twice and repeat its rows in the results."""
    argv = ["--backends", "numpy", "--sizes", "2^8", "--operators", "ours", "--repeats", "1"]
    code, err = _main_error(capsys, *argv, "--no-plot", "--out", str(tmp_path / "o"), option, value)
    assert code == 2 and f"{option}: {shown} is given more than once" in err, err
    assert not (tmp_path / "o").exists()


def test_cli_max_seconds_zero_runs_the_smallest_size_only(tmp_path):
    # 0 is allowed: every operator runs at its smallest size, the larger ones are skipped
    _, payload, _ = _run_cli(
        tmp_path,
        *("--backends", "numpy", "--operators", "ours,hard", "--modes", "fwd+bwd"),
        *("--sizes", "2^6,2^7", "--k", "0.5", "--repeats", "1", "--warmup", "1"),
        *("--max-seconds", "0", "--group-budget", "0", "--no-passes", "--no-plot"),
    )
    status = {(r["op"], r["n"]): r["status"] for r in payload["results"]}
    assert status[("ours", 64)] == "ok" and status[("hard", 64)] == "ok"
    assert status[("ours", 128)].startswith("skipped") and status[("hard", 128)].startswith(
        "skipped"
    )


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "content,expect",
    [
        (None, "cannot read"),  # missing file
        ("hello", "is not JSON"),
        ("{}", "no 'machine' entry"),  # was KeyError 'results'
        ("[1, 2]", "JSON array, not an object"),  # was TypeError
        ('{"machine": {}, "config": {}, "results": {}}', "'results' is not a JSON array"),
        ('{"machine": {}, "config": {}, "results": [{"status": "ok"}]}', "KeyError"),
        ('{"machine": {}, "config": {}, "results": [1]}', "TypeError"),
    ],
)
def test_cli_from_json_rejects_bad_files(tmp_path, capsys, content, expect):
    path = tmp_path / "in.json"
    if content is not None:
        path.write_text(content)
    code, err = _main_error(capsys, "--from-json", str(path), "--out", str(tmp_path / "o"))
    assert code == 2 and "--from-json" in err and str(path) in err and expect in err, err
    assert not (tmp_path / "o").exists()  # nothing written from a file that cannot render


def _synthetic_payload():
    # medians whose 5th significant digit makes ms to 3 digits round differently
    # from the 4-digit value results.json keeps (28.452 ms -> 28.5, its 0.02845 -> 28.4)
    medians = {"ours": 0.028452268245518695, "official": 0.07585475561418147}
    medians |= {"hard": 0.04215004732228455, "ours_select": 0.045647303408070515}
    rows = [
        _row("torch", op, "sel" if op in ("hard", "ours_select") else "fwd+bwd", t * f, n=n)
        for op, t in medians.items()
        for n, f in ((2**16, 0.063), (2**18, 0.25), (2**20, 1.0))
    ]
    for r in rows:
        r["min_s"] = r["median_s"] * 0.9731234
    machine = {"cpu": "test CPU", "cores": 2, "os": "Linux", "python": "3.11.0"}
    machine |= {"topk_core": "0.1.0", "loadavg_start": [0.123456, 0.5, 0.5]}
    config = {"command": "python -m benchmarks", "warmup": 2, "repeats": 3}
    config |= {"operators_all": list(cli.ops.OPERATORS), "tau": 1.0}
    payload = {"machine": machine, "config": config, "results": rows, "passes": []}
    # as run_benchmark returns it: ratios and slopes from the unrounded times
    return payload | {"ratios": report.ratios(rows), "slopes": report.slopes(rows)}


def test_cli_from_json_reproduces_results_md(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "run_benchmark", lambda args: _synthetic_payload())
    first, second = tmp_path / "a", tmp_path / "b"
    assert cli.main(["--no-plot", "--out", str(first)]) == 0
    again = ["--from-json", str(first / "results.json"), "--no-plot", "--out", str(second)]
    assert cli.main(again) == 0
    capsys.readouterr()
    md = (first / "results.md").read_text()
    assert "| 28.4 |" in md  # rendered from what the JSON keeps, not from 28.452...
    assert (second / "results.md").read_text() == md
    assert (second / "results.json").read_text() == (first / "results.json").read_text()


def test_benchmarks_need_the_checkout_installed_editable(tmp_path):
    # a plain `pip install .` leaves no import hook that maps backends/ into the
    # checkout's topk_core/ (which shadows the installed copy): simulate it by removing
    # the editable install's finder, as the non-editable install never adds one
    code = (
        "import runpy, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path\n"
        "                    if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "sys.path[:0] = ['']\n"
        f"sys.argv = ['benchmarks', '--backends', 'numpy', '--sizes', '2^8', '--out', "
        f"{str(tmp_path / 'o')!r}]\n"
        "runpy.run_module('benchmarks', run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "topk_core.backends" in proc.stderr and "pip install -e ." in proc.stderr


def test_bandwidth_of_runs_saved_before_the_json_kept_it():
    # --from-json of an older results.json: GB/s computed from the saved timings
    entry = {"batch": 4, "n": 250_000, "dtype": "float16", "unit_s": 1e-3, "total_s": 8e-3}
    assert report.bandwidth_of(entry) == {"pass_gbps": 4.0, "total_gbps": 1.0}
    kept = {"pass_gbps": 1.0, "total_gbps": 2.0}
    assert report.bandwidth_of(entry | {"bandwidth": kept}) is kept
