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
Arguments after ``--`` go to pytest unchanged.  Exit code: 0 when every check
passed and every planted bug was caught, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

__all__ = ["main"]


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m topk_core.conformance",
        description="Check topk-core on one Array API library and write a Markdown report.",
    )
    parser.add_argument("--array-module", required=True, metavar="NAME", help="e.g. dask.array")
    parser.add_argument(
        "--backend", metavar="MODULE:ATTR", help="register this topk_core.Backend first"
    )
    parser.add_argument(
        "--report", metavar="PATH", help="Markdown report (default: conformance-NAME.md)"
    )
    parser.add_argument("--no-scaling", action="store_true", help="skip the timing checks")
    parser.add_argument("--no-mutation", action="store_true", help="skip the mutation proof")
    parser.add_argument("--jobs", type=int, default=2, help="parallel mutant runs (default 2)")
    parser.add_argument("-k", dest="keyword", metavar="EXPR", help="only tests matching EXPR")
    parser.add_argument("-x", "--exitfirst", action="store_true", help="stop at the first failure")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")

    import pytest
    from topk_core.conformance import SUITE_FILES
    from topk_core.conformance.libs import third_party_lib
    from topk_core.conformance.mutation_proof import markdown, pytest_args, run_proof
    from topk_core.conformance.report import ConformanceReport

    name = args.array_module
    try:
        third_party_lib(name)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    path = Path(args.report or f"conformance-{name.replace('.', '_')}.md")
    command = " ".join(
        ["python -m topk_core.conformance", *(argv + (["--", *extra] if extra else []))]
    )
    report = ConformanceReport(path)
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
    if rc not in (0, 1):  # usage error, interrupted, nothing collected
        print(f"pytest exited with {rc}: no report", file=sys.stderr)
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
    path.parent.mkdir(parents=True, exist_ok=True)
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
