"""Mutation proof: the conformance suite fails on every planted bug.

Runs the suite's correctness files (forward, gradients, contract) in pytest
subprocesses against ``--array-module`` (array-api-strict by default, the
stand-in third-party library): once clean (must pass, else the proof means
nothing) and once per mutant of :mod:`conformance_tests.mutants` (each must
fail with pytest's "tests failed" exit code 1; a crash or usage error does not
count as caught).  NumPy stays unmutated as the anchor.

Usage (from the repository root)::

    python -m conformance_tests.mutation_proof            # exit 0: every mutant caught
    python -m conformance_tests.mutation_proof --jobs 1 --array-module numpy
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

from .mutants import ENV, MUTANTS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILES = ("test_forward.py", "test_gradients.py", "test_contract.py")

__all__ = ["DEFAULT_FILES", "Outcome", "main", "run_proof"]


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


def _pytest(files: list[str], array_module: str, mutant: str | None) -> Outcome:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *files,
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-p",
        "conformance_tests.mutants",
        "-m",
        "not scaling and not slow",
        f"--array-module={array_module}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPK_CONFORMANCE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if mutant is not None:
        spec = MUTANTS[mutant]
        if spec.backend:  # planted through the suite's own --backend option
            cmd.append(f"--backend={spec.backend}")
        else:
            env[ENV] = mutant
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    first = failed[0] if failed else proc.stdout.strip().splitlines()[-1:] or [proc.stderr[-300:]]
    if isinstance(first, list):
        first = first[0] if first else ""
    return Outcome(mutant or "(none)", proc.returncode, first[:160], seconds)


def run_proof(
    files: list[str] | None = None, array_module: str = "array_api_strict", jobs: int = 2
) -> tuple[Outcome, list[Outcome]]:
    """Run the clean baseline and every mutant; returns ``(baseline, outcomes)``."""
    names = list(files or DEFAULT_FILES)
    missing = [f for f in names if not (ROOT / "conformance_tests" / f).exists()]
    if missing:
        raise FileNotFoundError(f"conformance_tests/{missing[0]} does not exist")
    paths = [f"conformance_tests/{f}" for f in names]
    baseline = _pytest(paths, array_module, None)
    if baseline.returncode != 0:
        return baseline, []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        outcomes = list(pool.map(lambda m: _pytest(paths, array_module, m), MUTANTS))
    return baseline, outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--array-module", default="array_api_strict")
    parser.add_argument("--files", nargs="+", default=list(DEFAULT_FILES))
    parser.add_argument("--jobs", type=int, default=2, help="parallel pytest processes")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    baseline, outcomes = run_proof(args.files, args.array_module, args.jobs)
    print(f"baseline (no mutant): exit {baseline.returncode} in {baseline.seconds:.1f} s")
    if baseline.returncode != 0:
        print(f"the suite fails without a mutant, so the proof is void: {baseline.first_failure}")
        return 2
    print("\n| mutant | caught | exit | first failing test | s |\n|---|---|---|---|---|")
    for o in outcomes:
        print(
            f"| {o.mutant} | {'yes' if o.caught else 'NO'} | {o.returncode} "
            f"| `{o.first_failure}` | {o.seconds:.1f} |"
        )
    survivors = [o.mutant for o in outcomes if not o.caught]
    print(
        f"\n{len(outcomes) - len(survivors)}/{len(outcomes)} mutants caught "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    if survivors:
        print(f"SURVIVED: {', '.join(survivors)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
