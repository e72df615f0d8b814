"""Mutation proof: the conformance suite fails on every planted bug.

Runs the suite's correctness files (:data:`topk_core.conformance.MUTATION_FILES`:
contract, forward, gradients) in pytest subprocesses against ``--array-module``
(array-api-strict by default): once clean (must pass, else the proof means
nothing) and once per mutant of :mod:`topk_core.conformance.mutants` (each must
fail with pytest's "tests failed" exit code 1; a crash or usage error does not
count as caught).  NumPy stays unmutated as the anchor.  ``python -m
topk_core.conformance`` runs it after the suite, reusing the suite's own run of
those files as the clean baseline.

Usage::

    python -m topk_core.conformance.mutation_proof            # exit 0: every mutant caught
    python -m topk_core.conformance.mutation_proof --jobs 1 --array-module numpy
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from topk_core.conformance import MUTATION_FILES
from topk_core.conformance.mutants import ENV, MUTANTS

PACKAGE_DIR = Path(__file__).resolve().parent
#: the pytest settings of a conformance run (passed with ``-c``)
INI = PACKAGE_DIR / "conformance.ini"

__all__ = ["Outcome", "main", "pytest_args", "run_proof"]


def pytest_args(files, array_module: str | None, backend: str | None = None) -> list[str]:
    """pytest arguments of a conformance run of ``files`` (names in this package).

    The suite's own ini file and rootdir, so that the settings of whatever
    project the command runs in do not apply; the plugin loaded explicitly.
    """
    args = [str(PACKAGE_DIR / f) for f in files]
    args += ["-c", str(INI), "--rootdir", str(PACKAGE_DIR), "-p", "topk_core.conformance.plugin"]
    if array_module:
        args.append(f"--array-module={array_module}")
    if backend:
        args.append(f"--backend={backend}")
    return args


@dataclass(frozen=True)
class Outcome:
    """One pytest subprocess: which mutant, exit code, first failure, seconds."""

    mutant: str
    returncode: int
    first_failure: str
    seconds: float

    @property
    def caught(self) -> bool:
        return self.returncode == 1  # pytest: tests ran and some failed


def _pytest(array_module: str, backend: str | None, mutant: str | None) -> Outcome:
    cmd = [sys.executable, "-m", "pytest", *pytest_args(MUTATION_FILES, array_module, backend)]
    cmd += ["-q", "-x", "-p", "topk_core.conformance.mutants", "-m", "not scaling and not slow"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPK_CONFORMANCE_")}
    if mutant is not None:
        env[ENV] = mutant
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=PACKAGE_DIR, env=env, capture_output=True, text=True, timeout=1800
    )
    seconds = time.perf_counter() - t0
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr.strip()[-300:]]
    first = (failed or tail or [""])[0]
    return Outcome(mutant or "(none)", proc.returncode, first[:160], seconds)


def run_proof(
    array_module: str = "array_api_strict",
    jobs: int = 2,
    *,
    backend: str | None = None,
    baseline: Outcome | None = None,
) -> tuple[Outcome, list[Outcome]]:
    """Run the clean baseline (unless given) and every mutant; ``(baseline, outcomes)``."""
    if baseline is None:
        baseline = _pytest(array_module, backend, None)
    if baseline.returncode != 0:
        return baseline, []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        outcomes = list(pool.map(lambda m: _pytest(array_module, backend, m), MUTANTS))
    return baseline, outcomes


def markdown(baseline: Outcome, outcomes: list[Outcome]) -> list[str]:
    """The proof as Markdown lines (a table, or why there is none)."""
    if baseline.returncode != 0:
        return [
            f"Not run: the suite's correctness files fail without a planted bug "
            f"(exit {baseline.returncode}), so the proof would mean nothing.",
        ]
    lines = ["| mutant | planted bug | caught | exit | first failing test | s |"]
    lines.append("|---|---|---|---|---|---|")
    for o in outcomes:
        lines.append(
            f"| {o.mutant} | {MUTANTS[o.mutant].description} | {'yes' if o.caught else 'NO'} "
            f"| {o.returncode} | `{o.first_failure}` | {o.seconds:.1f} |"
        )
    caught = sum(o.caught for o in outcomes)
    lines += ["", f"{caught}/{len(outcomes)} planted bugs caught."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--array-module", default="array_api_strict")
    parser.add_argument("--backend", default=None, metavar="MODULE:ATTR")
    parser.add_argument("--jobs", type=int, default=2, help="parallel pytest processes")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    baseline, outcomes = run_proof(args.array_module, args.jobs, backend=args.backend)
    print(f"baseline (no mutant): exit {baseline.returncode} in {baseline.seconds:.1f} s")
    print("\n".join(markdown(baseline, outcomes)))
    if baseline.returncode != 0:
        print(baseline.first_failure)
        return 2
    survivors = [o.mutant for o in outcomes if not o.caught]
    print(f"in {time.perf_counter() - t0:.1f} s")
    if survivors:
        print(f"SURVIVED: {', '.join(survivors)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
