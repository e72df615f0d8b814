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
import re
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


#: what pytest's exit codes other than 0 and 1 mean (for the report)
EXIT_MEANING = {
    2: "interrupted or a collection error",
    3: "internal error",
    4: "usage error",
    5: "no tests ran",
}


def _subprocess_env(cwd: Path) -> dict[str, str]:
    """The environment of a proof subprocess: this one's, minus the conformance variables.

    Relative ``PYTHONPATH`` entries are made absolute against ``cwd`` (the
    invoking directory), so that the subprocess imports what this process does.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPK_CONFORMANCE_")}
    if env.get("PYTHONPATH"):
        # an empty entry means the current directory, like "."
        env["PYTHONPATH"] = os.pathsep.join(
            str(cwd / entry) if entry else str(cwd) for entry in env["PYTHONPATH"].split(os.pathsep)
        )
    return env


def _pytest(array_module: str, backend: str | None, mutant: str | None) -> Outcome:
    cmd = [sys.executable, "-m", "pytest", *pytest_args(MUTATION_FILES, array_module, backend)]
    cmd += ["-q", "-x", "-p", "topk_core.conformance.mutants", "-m", "not scaling and not slow"]
    # the invoking directory: `python -m` puts it on sys.path, so a --backend or
    # --array-module module found there is found in the subprocess too (the ini
    # file and --rootdir keep that directory's pytest settings and conftest out)
    cwd = Path.cwd()
    env = _subprocess_env(cwd)
    if mutant is not None:
        env[ENV] = mutant
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    # a usage error (bad --backend, say) is on stderr, with stdout empty
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")]
    tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr.strip()[-300:]]
    first = (failed or errors or tail or [""])[0]
    # pytest writes test paths relative to the cwd ("../../site-packages/..."): keep the file name
    first = re.sub(r"^(FAILED|ERROR) \S*?(\w+\.py::)", r"\1 \2", first)
    return Outcome(mutant or "(none)", proc.returncode, first[:300], seconds)


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
        if baseline.returncode == 1:
            why = "the suite's correctness files fail without a planted bug"
        else:  # the files did not run at all: say why, not that they failed
            meaning = EXIT_MEANING.get(baseline.returncode, "unexpected exit code")
            why = f"the clean pytest run of the correctness files stopped with a {meaning}"
        detail = f": `{baseline.first_failure}`" if baseline.first_failure else ""
        return [
            f"Not run: {why} (exit {baseline.returncode}){detail}, so the proof would "
            "mean nothing.",
        ]
    lines = ["| mutant | planted bug | caught | exit | first failing test | s |"]
    lines.append("|---|---|---|---|---|---|")
    for o in outcomes:
        code = str(o.returncode)
        if o.returncode in EXIT_MEANING:
            code += f" ({EXIT_MEANING[o.returncode]})"
        first = o.first_failure.replace("|", "/").replace("`", "'")
        lines.append(
            f"| {o.mutant} | {MUTANTS[o.mutant].description} | {'yes' if o.caught else 'NO'} "
            f"| {code} | `{first}` | {o.seconds:.1f} |"
        )
    caught = sum(o.caught for o in outcomes)
    lines += ["", f"{caught}/{len(outcomes)} planted bugs caught."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m topk_core.conformance.mutation_proof",
        description=__doc__.split("\n\n")[0],
        epilog="Exit code: 0 when every planted bug was caught, 1 when one survived, "
        "2 for bad arguments or when the clean run does not pass (nothing to prove).",
    )
    parser.add_argument("--array-module", default="array_api_strict", metavar="NAME")
    parser.add_argument("--backend", default=None, metavar="MODULE:ATTR")
    parser.add_argument(
        "--jobs", type=int, default=2, metavar="N", help="parallel pytest processes (>= 1)"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be an integer >= 1, got {args.jobs}")
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
