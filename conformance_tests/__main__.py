"""``python -m topk_core.conformance``: check topk-core on one array library.

Runs the checks about that library (contract, forward, gradients, errors,
determinism, dtype/device, linear scaling; :data:`topk_core.conformance.SUITE_FILES`),
then the mutation proof against it, and writes a Markdown report::

    pip install "topk-core[conformance]"   # plus the library under test
    python -m topk_core.conformance --array-module array_api_strict
    python -m topk_core.conformance --array-module dask.array --report dask.md
    python -m topk_core.conformance --array-module mylib --backend mylib_topk:BACKEND

``--array-module`` is any importable module whose ``asarray`` makes arrays that
array-api-compat knows (directly through ``__array_namespace__``, or a library
it wraps, such as ``dask.array``).  ``--backend MODULE:ATTR`` registers your own
:class:`topk_core.Backend` for that library first, so it is the one under test.
Arguments after ``--`` go to pytest unchanged.  Exit codes: see :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

__all__ = ["EXIT_CODES", "main"]

#: the runner's exit codes (also in ``--help`` and the README)
EXIT_CODES = """\
exit codes:
  0  every check passed and every planted bug was caught
  1  a check failed, or a planted bug was not caught (see the report)
  2  bad arguments (checked before anything runs: --array-module, --backend,
     --report, --jobs), or pytest was interrupted
  3  pytest internal error
  4  pytest rejected an argument given after --
  5  no test selected (-k or -m matched nothing): no report written, an
     existing report file is left as it was"""


def _library_facts(name: str, backend_spec: str | None) -> list[str]:
    """Report lines naming what ran: library, version, namespace, backend, dtypes."""
    import array_api_compat
    import numpy as np
    from topk_core.conformance.libs import third_party_lib

    import topk_core
    from topk_core._registry import get_backend, library_name

    lib = third_party_lib(name)
    probe = lib.asarray(np.zeros(2), lib.dtypes[-1])
    library = library_name(probe)
    root = importlib.import_module(library)  # the library that owns the arrays
    ns = array_api_compat.array_namespace(probe)
    return [
        f"Library: `{name}` (arrays of `{library}`, version "
        f"{getattr(root, '__version__', '?')}; namespace `{ns.__name__}`), "
        f"backend: `{get_backend(library).name}`"
        + (f" from `--backend {backend_spec}`" if backend_spec else "")
        + f"; floating dtypes: {', '.join(lib.dtypes)}; topk-core {topk_core.__version__}",
    ]


def _baseline(report, seconds: float):
    """The suite's own run of the mutation files, as the proof's clean baseline."""
    from topk_core.conformance import MUTATION_FILES
    from topk_core.conformance.mutation_proof import Outcome

    bad = [
        (nodeid, msg)
        for _, nodeid, msg in report.failures
        if nodeid.split("::")[0].rsplit("/", 1)[-1] in MUTATION_FILES
    ]
    first = f"FAILED {bad[0][0]} - {bad[0][1]}" if bad else ""
    return Outcome("(none)", 1 if bad else 0, first[:160], seconds)


def _report_path_problem(path: Path) -> str | None:
    """Why the report cannot be written to ``path``, or None (checked before the run)."""
    if path.is_dir():
        return f"--report {str(path)!r} is a directory; give a file path such as report.md"
    parent = path.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        return f"--report {str(path)!r}: the folder {str(parent)!r} {what}; create it first"
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"--report {str(path)!r} is not writable"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m topk_core.conformance",
        usage="%(prog)s --array-module NAME [options] [-- PYTEST_ARGS ...]",
        description="Check topk-core on one Array API library and write a Markdown report. "
        "Arguments after -- go to pytest unchanged (e.g. -- -v --tb=long).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--array-module", required=True, metavar="NAME", help="e.g. dask.array")
    parser.add_argument(
        "--backend",
        metavar="MODULE:ATTR",
        help="register this topk_core.Backend for NAME's arrays first (MODULE is "
        "imported like any module, so one in the current directory works)",
    )
    parser.add_argument(
        "--report",
        metavar="PATH",
        help="Markdown report (default: conformance-NAME.md with the dots of NAME "
        "replaced by underscores, e.g. conformance-dask_array.md); its folder must exist",
    )
    parser.add_argument("--no-scaling", action="store_true", help="skip the timing checks")
    parser.add_argument("--no-mutation", action="store_true", help="skip the mutation proof")
    parser.add_argument(
        "--jobs", type=int, default=2, metavar="N", help="parallel mutant runs (>= 1, default 2)"
    )
    parser.add_argument("-k", dest="keyword", metavar="EXPR", help="only tests matching EXPR")
    parser.add_argument("-x", "--exitfirst", action="store_true", help="stop at the first failure")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be an integer >= 1, got {args.jobs}")

    import pytest
    from topk_core.conformance import SUITE_FILES
    from topk_core.conformance.libs import third_party_lib
    from topk_core.conformance.mutation_proof import (
        EXIT_MEANING,
        markdown,
        pytest_args,
        run_proof,
    )
    from topk_core.conformance.plugin import _load_backend
    from topk_core.conformance.report import ConformanceReport

    name = args.array_module
    try:
        third_party_lib(name)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    if args.backend:
        # checked here, not only in pytest: a bad --backend is a bad argument (exit 2)
        try:
            _load_backend(args.backend)
        except pytest.UsageError as exc:
            parser.error(str(exc))
    path = Path(args.report or f"conformance-{name.replace('.', '_')}.md")
    problem = _report_path_problem(path)
    if problem:  # before the run, not after minutes of it
        parser.error(problem)
    command = " ".join(
        ["python -m topk_core.conformance", *(argv + (["--", *extra] if extra else []))]
    )
    # written below, once the mutation proof is in it (and not at all if nothing ran)
    report = ConformanceReport(path, autowrite=False)
    pargs = pytest_args(SUITE_FILES, name, args.backend) + ["-q", "-rfE"]
    if args.no_scaling:
        pargs += ["-m", "not scaling"]
    if args.keyword:
        pargs += ["-k", args.keyword]
    if args.exitfirst:
        pargs.append("-x")
    pargs += extra

    t0 = time.perf_counter()
    rc = int(pytest.main(pargs, plugins=[report]))
    suite_s = time.perf_counter() - t0
    if rc not in (0, 1):  # interrupted, internal error, usage error, nothing collected
        meaning = EXIT_MEANING.get(rc, "unexpected exit code")
        hint = " (-k or -m matched no test)" if rc == 5 else ""
        print(f"pytest exited with {rc}: {meaning}{hint}; no report written", file=sys.stderr)
        return rc
    report.meta = _library_facts(name, args.backend)
    report.meta.append(f"Command: `{command}`")
    timing = f"Wall time: suite {suite_s:.1f} s"

    survivors = False
    if not args.no_mutation:
        t1 = time.perf_counter()
        # a filtered run is no baseline: the proof then runs its own clean run
        base = None if (args.keyword or args.exitfirst or extra) else _baseline(report, suite_s)
        baseline, outcomes = run_proof(name, args.jobs, backend=args.backend, baseline=base)
        proof_s = time.perf_counter() - t1
        survivors = baseline.returncode != 0 or not all(o.caught for o in outcomes)
        intro = (
            "Each planted bug (in a copy of the backend, for this library's arrays only; "
            "NumPy stays correct) must make the contract, forward and gradient checks fail."
        )
        report.sections.append(("Mutation proof", [intro, "", *markdown(baseline, outcomes)]))
        timing += f", mutation proof {proof_s:.1f} s"
    report.meta.append(timing + f", total {time.perf_counter() - t0:.1f} s.")
    path.write_text(report.markdown(), encoding="utf-8")
    counts = report.counts.get(name, {"passed": 0, "failed": 0, "skipped": 0})
    print(
        f"{name}: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['skipped']} skipped; {timing.lower()}"
    )
    for section, body in report.sections:
        print(f"{section}: {body[-1]}")
    print(f"report written to {path}")
    return 1 if rc or survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
