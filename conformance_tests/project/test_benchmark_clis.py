"""Argument checks of ``python -m benchmarks.scaleout`` and ``python -m benchmarks.cascade``.

Bad input must exit with status 2 and an argparse message that names the option, the
value given and what is allowed, before any work is done (no JAX run, no training):
never a traceback, and never a run that exits 0 with useless rows.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ is run from the checkout, never installed

from benchmarks import cascade, passes, scaleout  # noqa: E402

# the smallest real run: a bad option given after these must still be rejected
SMALL = ["--n", "2^4", "--p", "1", "--batch", "1", "--methods", "ours", "--repeats", "1"]


def _refuse(*args, **kwargs):
    raise AssertionError("the arguments were accepted: the run started")


@pytest.fixture
def scaleout_argv(monkeypatch, tmp_path):
    """``SMALL`` + an output folder; any run past the argument checks fails the test fast."""
    monkeypatch.setattr(scaleout, "_run", _refuse)
    monkeypatch.setattr(scaleout, "_machine", _refuse)
    monkeypatch.setattr(subprocess, "run", _refuse)  # the re-run when JAX is loaded here
    # main() may set these for JAX: restore them after the test
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
    return [*SMALL, "--no-plot", "--out", str(tmp_path)]


@pytest.mark.parametrize(
    "bad, expected",
    [
        (["--tau", "0"], ["--tau", "finite number > 0", "got 0.0"]),
        (["--tau", "nan"], ["--tau", "got nan"]),
        (["--tau", "-1"], ["--tau", "got -1.0"]),
        (["--tau", "inf"], ["--tau", "got inf"]),
        (["--batch", "0"], ["--batch", ">= 1", "got [0]"]),
        (["--batch", "1,0"], ["--batch", "got [1, 0]"]),
        (["--max-seconds", "-1"], ["--max-seconds", "> 0", "got -1.0"]),
        (["--max-seconds", "0"], ["--max-seconds", "got 0.0"]),
        (["--max-seconds", "nan"], ["--max-seconds", "got nan"]),
        (["--n", "0"], ["--n", ">= 2", "got [0]"]),
        (["--n", "1"], ["--n", ">= 2", "got [1]"]),
        (["--n", ""], ["--n", "nothing given"]),
        (["--n", " , "], ["--n", "nothing given"]),
        (["--p", ""], ["--p", "nothing given"]),
        (["--batch", ""], ["--batch", "nothing given"]),
        (["--n", "30", "--p", "4"], ["--n", "divisible", "n = 30", "by 4"]),
        (["--max-gib", "-1"], ["--max-gib", "> 0", "got -1.0"]),
        (["--max-gib", "0"], ["--max-gib", "got 0.0"]),
        (["--max-gib", "1e-9"], ["--max-gib", "skips every case", "GiB"]),
        (["--seed", "-1"], ["--seed", ">= 0", "got -1"]),
        (["--repeats", "0"], ["--repeats", ">= 1", "got 0"]),
        # repeats only repeated rows (and their time)
        (["--n", "2^4,16"], ["--n", "16 is given more than once"]),
        (["--p", "1,2,1"], ["--p", "1 is given more than once"]),
        (["--batch", "1,1"], ["--batch", "1 is given more than once"]),
        (["--methods", "ours,ours"], ["--methods", "ours is given more than once"]),
    ],
)
def test_scaleout_rejects_bad_arguments(scaleout_argv, capsys, bad, expected):
    """Each of these used to run (exit 0 with error/NaN rows, or the full default sizes
    for an empty list) or end in a traceback (--batch 0, --max-seconds -1)."""
    with pytest.raises(SystemExit) as exc:
        scaleout.main([*scaleout_argv, *bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err


@pytest.mark.parametrize(
    "extra",
    [
        ["--n", "2", "--p", "1,2"],  # the smallest n: k = 1, the all-gather reads a 2nd value
        ["--n", "3000", "--p", "1,2,4,8"],
        ["--max-seconds", "inf", "--max-gib", "inf"],  # no limits
        ["--tau", "1e-3", "--batch", "3", "--seed", "0"],
    ],
)
def test_scaleout_accepts_the_boundaries(extra):
    parser = scaleout.build_parser()
    args = parser.parse_args([*SMALL, *extra])
    scaleout._check_args(parser, args)
    assert all(n >= 2 for n in args.n) and args.methods == ["ours"]


def test_scaleout_defaults_only_when_an_option_is_left_out():
    parser = scaleout.build_parser()
    args = parser.parse_args(["--quick"])
    scaleout._check_args(parser, args)
    assert (args.n, args.p, args.batch) == (list(scaleout.QUICK_SIZES), [1, 2], [1, 2])


def test_scaleout_table_labels_n_that_is_not_a_power_of_two(tmp_path):
    """``2^{bit_length - 1}`` labelled n = 3000 as 2^11."""
    row = {"method": "ours", "batch": 1, "P": 1, "n": 3000, "k": 300, "status": "ok"}
    row |= {"median_s": 1e-3, "bytes_per_device": 0.0}
    payload = {
        "machine": {},
        "results": [row],
        "config": {"command": "c", "tau": 1.0, "repeats": 1, "batch": [1], "n": [3000], "p": [1]},
    }
    scaleout.write_markdown(tmp_path / "r.md", payload, None)
    text = (tmp_path / "r.md").read_text()
    assert "| 1 | 3000 | 1 | 1.0 |" in text and "2^11" not in text
    assert "k = max(1, n // 10)" in text


def test_scaleout_command_line_exit_status(tmp_path):
    """Through ``python -m benchmarks scaleout``: status 2, no traceback, no JAX run."""
    cmd = [sys.executable, "-m", "benchmarks", "scaleout", *SMALL, "--tau", "0"]
    cmd += ["--no-plot", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--tau" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "results.json").exists()


@pytest.fixture
def cascade_quiet(monkeypatch):
    # one thread for torch is the benchmark's choice, not this test session's
    monkeypatch.setattr(cascade, "_single_thread", lambda: None)


@pytest.mark.parametrize("steps", ["1", "5"])
def test_cascade_rejects_steps_within_the_warmup(
    cascade_quiet, monkeypatch, capsys, tmp_path, steps
):
    """ms/step is the median after 5 warm-up steps: it was NaN for --steps <= 5."""
    monkeypatch.setattr(cascade, "run", _refuse)
    with pytest.raises(SystemExit) as exc:
        cascade.main(["--steps", steps, "--no-plot", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--steps must be > {cascade.Config.warmup}" in err and f"got {steps}" in err


def test_cascade_rejects_repeated_methods(cascade_quiet, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cascade, "run", _refuse)
    for option, value in (("--methods", "bce,dftopk,bce"), ("--frameworks", "torch,torch")):
        with pytest.raises(SystemExit) as exc:
            cascade.main([option, value, "--no-plot", "--out", str(tmp_path)])
        assert exc.value.code == 2
        assert "is given more than once" in capsys.readouterr().err


def test_cascade_run_rejects_steps_within_the_warmup():
    with pytest.raises(ValueError, match="warmup"):
        cascade.run(replace(cascade.QUICK, steps=cascade.Config.warmup), progress=False)


def test_cascade_one_seed_has_no_std(cascade_quiet, tmp_path):
    """A sample std of one seed is undefined: it was shown as ``± 0.000``."""
    pytest.importorskip("torch")
    argv = ["--seeds", "1", "--steps", "6", "--methods", "bce", "--frameworks", "torch"]
    assert cascade.main([*argv, "--no-plot", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "± n/a" in table and "± 0.000" not in table and "one seed (0)" in table
    assert "nan" not in table  # 6 steps leave one timed step
    r = json.loads((tmp_path / "results.json").read_text())["results"]["torch"]["bce"]
    assert r["recall_std"] is None and r["curve_std"] is None


def test_cascade_markdown_with_seeds():
    row = {"recall_mean": 0.7449, "recall_std": 0.0123, "step_ms_median": 2.0}
    cfg = {"k": 5, "k1": 20, "methods": ["bce"], "n_test": 8, "list_min": 40}
    cfg |= {"list_max": 64, "steps": 6, "batch": 32, "seeds": [0, 1]}
    report = {"config": cfg, "results": {"torch": {"bce": row}}}
    report |= {"machine": "m", "total_seconds": 1.0}
    text = cascade.markdown(report)
    assert "| bce | 0.745 ± 0.012 | 2.00 |" in text
    assert "mean ± sample std over seeds [0, 1]" in text


@pytest.mark.parametrize("module", [scaleout, cascade, passes])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
