"""``python -m benchmarks``: DFTopK against the operators users would pick instead.

Run from a checkout installed with ``pip install -e .`` (``benchmarks/`` itself is
never installed)::

    python -m benchmarks --quick
    python -m benchmarks --backends torch,jax --sizes 2^16,1e6,1024x4096 --k 0.1
    python -m benchmarks scaleout --quick    # sharded axis: see benchmarks/scaleout.py

Every shape is one group: all requested operators are built on the same input,
warmed up (this includes JIT compilation), then timed in interleaved rounds
(each operator once per round) so that noise from a shared machine hits all of
them alike.  Results: ``results.md``, ``results.json`` and ``plot.png`` in
``--out``.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from . import ops, passes, report

__all__ = ["load_results", "main", "no_repeats", "parse_sizes", "parse_fractions"]

FULL_SIZES = "2^10,2^12,2^14,2^16,2^18,1e6,2^22,2^24,1024x256,1024x1024,1024x4096,1024x16384"
QUICK_SIZES = "2^10,2^14,2^18,256x1024"
QUICK_BACKEND_OPS = "ours,official,lapsum,hard,ours_select"


def _parse_int(text: str, what: str) -> int:
    t = text.strip().lower()
    m = re.fullmatch(r"(\d+)\s*(?:\^|\*\*)\s*(\d+)", t)
    try:
        if m:
            value = int(m.group(1)) ** int(m.group(2))
        elif re.fullmatch(r"\d+(\.\d+)?e\d+", t):
            f = float(t)
            if f != int(f):
                raise ValueError
            value = int(f)
        else:
            value = int(t)
    except ValueError:
        raise ValueError(
            f"{what}: cannot read {text!r}; use an integer, 2^20, 2**20 or 1e6"
        ) from None
    if value < 2:
        raise ValueError(f"{what}: must be >= 2, got {text!r}")
    return value


def no_repeats(items: list[Any], what: str) -> list[Any]:
    """``items`` unchanged, or a ``ValueError`` naming a value given twice.

    A repeated value would only repeat rows of the results (and their time).

    Examples
    --------
    >>> no_repeats([1, 2], "--p")
    [1, 2]
    >>> no_repeats([(None, 1000), (None, 1000)], "--sizes")
    Traceback (most recent call last):
    ...
    ValueError: --sizes: 1000 is given more than once; give each value once
    """
    seen = set()
    for item in items:
        if item in seen:
            shown = (
                (f"{item[0]}x{item[1]}" if item[0] is not None else item[1])
                if isinstance(item, tuple)
                else item
            )
            raise ValueError(f"{what}: {shown} is given more than once; give each value once")
        seen.add(item)
    return items


def parse_sizes(text: str) -> list[tuple[int | None, int]]:
    """``"2^10,1e6,1024x4096"`` -> ``[(None, 1024), (None, 1000000), (1024, 4096)]``.

    Examples
    --------
    >>> parse_sizes("2^10, 1e6, 1024x4096")
    [(None, 1024), (None, 1000000), (1024, 4096)]
    """
    out: list[tuple[int | None, int]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "x" in item.lower():
            b, n = re.split(r"[xX]", item, maxsplit=1)
            out.append((_parse_int(b, "--sizes batch"), _parse_int(n, "--sizes n")))
        else:
            out.append((None, _parse_int(item, "--sizes")))
    if not out:
        raise ValueError(f"--sizes: no size given in {text!r}")
    return no_repeats(out, "--sizes")


def parse_fractions(text: str) -> list[float]:
    """``"0.1,0.5"`` -> ``[0.1, 0.5]``; each fraction in (0, 1).

    Examples
    --------
    >>> parse_fractions("0.1, 0.5")
    [0.1, 0.5]
    """
    out = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            f = float(item)
        except ValueError:
            raise ValueError(f"--k: {item!r} is not a number; give fractions of n") from None
        if not 0 < f < 1:
            raise ValueError(f"--k: fractions must lie in (0, 1), got {item!r}")
        out.append(f)
    if not out:
        raise ValueError(f"--k: no fraction given in {text!r}")
    return no_repeats(out, "--k")


def _choices(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(f"{what}: got {bad or text!r}; allowed: {', '.join(allowed)}")
    return no_repeats(items, what)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time topk-core's DFTopK against the official DFTopK form, LapSum, a "
        "sort-based DFTopK, hard selection and one elementwise pass.",
    )
    p.add_argument(
        "--backends",
        default=None,
        help="comma list of numpy,torch,jax,cupy "
        "(default: every installed one that runs on --device)",
    )
    p.add_argument(
        "--operators", default=None, help=f"comma list of {','.join(ops.OPERATORS)} (default: all)"
    )
    p.add_argument(
        "--modes",
        default="fwd,fwd+bwd",
        help="fwd and/or fwd+bwd for the differentiable operators (default both)",
    )
    p.add_argument(
        "--sizes",
        default=None,
        help=f"comma list of n (1-D) or BxN (batched); default {FULL_SIZES}",
    )
    p.add_argument("--k", default="0.1,0.5", help="k as fractions of n (default 0.1,0.5)")
    p.add_argument(
        "--dtype",
        default="float32",
        help="comma list of float32,float16,bfloat16,float64 (default float32)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per shape (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--tau", type=float, default=1.0, help="temperature (LapSum's alpha too)")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=1.5,
        help="skip larger sizes of an operator once one call took longer; >= 0 (0: each "
        "operator at its smallest size only, inf: never skip; default 1.5)",
    )
    p.add_argument(
        "--group-budget",
        type=float,
        default=30.0,
        help="stop a shape's rounds after this many seconds, keeping >= 3; >= 0 "
        "(inf: no limit; default 30)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"small smoke run (~1 min): sizes {QUICK_SIZES}, k 0.1, operators "
        f"{QUICK_BACKEND_OPS}, fwd+bwd only, 3 repeats, no memory measurement",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for torch (torch.set_num_threads) and for topk-core's NumPy backend "
        "(topk_core.backends.numpy_soft.set_num_threads); default: leave both defaults, "
        "recorded in the JSON",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=None, help="output directory (default benchmarks/results/<device>)"
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument(
        "--from-json",
        default=None,
        help="re-render results.md / plot.png (and rewrite the JSON) from an earlier "
        "results.json instead of measuring",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument(
        "--no-passes",
        action="store_true",
        help="skip the pass budget (ours' phases in units of one x * 2 pass)",
    )
    p.add_argument(
        "--no-compile-kernels",
        action="store_true",
        help="skip counting the kernels torch.compile (inductor) generates for ours fwd+bwd "
        "(done at the headline shapes, 1024x4096, 8192x256 and the 1-D size closest to 1e6)",
    )
    p.add_argument(
        "--pass-rounds",
        type=int,
        default=40,
        help="interleaved rounds of the pass budget per shape; minima are kept (default 40)",
    )
    p.add_argument(
        "--pass-budget",
        type=float,
        default=8.0,
        help="stop a shape's pass-budget rounds after this many seconds, keeping >= 5; >= 0 "
        "(inf: no limit; default 8)",
    )
    return p


class Progress:
    """Plain stderr progress: one line per shape group, with elapsed time and ETA."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, label: str) -> None:
        self.done += 1
        el = time.perf_counter() - self.start
        eta = el / self.done * (self.total - self.done)
        width = 24
        fill = int(width * self.done / self.total)
        bar = "#" * fill + "." * (width - fill)
        msg = f"[{bar}] {self.done}/{self.total} {el:6.1f}s eta {eta:5.0f}s  {label}"
        if self.tty:
            sys.stderr.write("\r" + msg[:150].ljust(150))
            if self.done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()


def _make_data(batch: int | None, n: int, seed: int) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (n,) if batch is None else (batch, n)
    return rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(
        shape, dtype=np.float32
    )


def _k_of(frac: float, n: int) -> int:
    return max(1, min(n - 1, round(frac * n)))


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the grid described by ``args``; returns the JSON payload."""
    operators = _choices(args.operators, ops.OPERATORS, "--operators")
    modes = _choices(args.modes, ("fwd", "fwd+bwd"), "--modes")
    sizes = parse_sizes(args.sizes)
    kfracs = parse_fractions(args.k)
    dtypes = _choices(args.dtype, ("float32", "float16", "bfloat16", "float64"), "--dtype")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 1:
        raise ValueError(f"--warmup must be >= 1 (the first call compiles), got {args.warmup}")
    if not args.tau > 0:
        raise ValueError(f"--tau must be > 0, got {args.tau}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    # 0 is a real limit (only the smallest size / the minimum rounds); a negative
    # --max-seconds skipped sizes no call was timed for, and NaN disables the check
    for option, value in (
        ("--max-seconds", args.max_seconds),
        ("--group-budget", args.group_budget),
        ("--pass-budget", args.pass_budget),
    ):
        if not value >= 0:
            raise ValueError(f"{option} must be >= 0 seconds (inf: no limit), got {value}")

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        from topk_core.backends.numpy_soft import set_num_threads

        set_num_threads(args.threads)
        try:
            import torch
        except ImportError:
            pass  # the NumPy backend's threads alone
        else:
            torch.set_num_threads(args.threads)
    status = ops.available_backends()
    if args.backends is None:
        backends = [
            b for b, why in status.items() if why is None and ops.get_driver(b).devices(args.device)
        ]
    else:
        backends = _choices(args.backends, ops.BACKENDS, "--backends")
        for b in backends:
            if status[b] is not None:
                raise ValueError(f"--backends: {b} is not usable here ({status[b]})")
            if not ops.get_driver(b).devices(args.device):
                raise ValueError(f"--backends: {b} cannot run on --device {args.device}")
    if not backends:
        raise ValueError(f"no installed backend runs on --device {args.device}")

    versions: dict[str, str] = {}
    for b in backends:
        versions.update(ops.get_driver(b).versions())
    machine = report.machine_info(versions)
    backend_names = {b: ops.get_driver(b).backend_name() for b in backends}

    if args.pass_rounds < 5:
        raise ValueError(f"--pass-rounds must be >= 5, got {args.pass_rounds}")
    cases_spec = []
    for op in operators:
        if op in ops.DIFFERENTIABLE:
            cases_spec += [(op, m) for m in modes]
        elif op in ops.VJP_ONLY:
            cases_spec += [(op, m) for m in modes if m == "fwd+bwd"]
        else:
            cases_spec.append((op, "sel"))
    want_passes = not args.no_passes and "ours" in operators

    # smaller shapes first so that --max-seconds can skip what would be too slow
    order = sorted(sizes, key=lambda s: (s[0] is not None, (s[0] or 1) * s[1]))
    groups = [(b, d, s, kf) for b in backends for d in dtypes for kf in kfracs for s in order]
    progress = Progress(len(groups))
    slowest: dict[tuple, float] = {}
    rows: list[dict[str, Any]] = []
    pass_rows: list[dict[str, Any]] = []
    for backend, dtype, (batch, n), kfrac in groups:
        driver = ops.get_driver(backend)
        k = _k_of(kfrac, n)
        base = {
            "backend": backend,
            "dtype": dtype,
            "device": args.device,
            "batch": batch,
            "n": n,
            "kfrac": kfrac,
            "k": k,
        }
        label = f"{backend} {dtype} {report._shape_label(batch, n)} k={kfrac}"
        try:
            x_np, g_np = _make_data(batch, n, args.seed)
            x, g = driver.make_input(x_np, g_np, dtype, args.device)
            del x_np, g_np
        except ops.NotApplicable as exc:
            rows += [dict(base, op=o, mode=m, status=f"n/a: {exc}") for o, m in cases_spec]
            progress.update(label + " (n/a)")
            continue
        live = []
        kind = batch is not None
        for op, mode in cases_spec:
            row = dict(base, op=op, mode=mode, status="ok")
            rows.append(row)
            skip_key = (backend, dtype, kind, kfrac, op, mode)
            if slowest.get(skip_key, 0.0) > args.max_seconds:
                row["status"] = (
                    f"skipped: a smaller size took {slowest[skip_key]:.3g} s "
                    f"> --max-seconds {args.max_seconds}"
                )
                continue
            try:
                case = driver.build(op, mode, x, g, k, args.tau)
                t0 = time.perf_counter()
                case.run()
                row["first_call_s"] = time.perf_counter() - t0
                if case.verify is not None:
                    case.verify()
                for _ in range(args.warmup - 1):
                    case.run()
            except ops.NotApplicable as exc:
                row["status"] = f"n/a: {exc}"
                continue
            except Exception as exc:  # report and go on: one broken operator must not stop a run
                row["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
                continue
            row["times_s"] = []
            live.append((case, row))
        start = time.perf_counter()
        min_rounds = min(3, args.repeats)
        for r in range(args.repeats):
            for case, row in live:
                t0 = time.perf_counter()
                case.run()
                row["times_s"].append(time.perf_counter() - t0)
            if r + 1 >= min_rounds and time.perf_counter() - start > args.group_budget:
                break
        for case, row in live:
            ts = row["times_s"]
            row["min_s"] = min(ts)
            row["median_s"] = statistics.median(ts)
            key = (backend, dtype, kind, kfrac, row["op"], row["mode"])
            slowest[key] = max(slowest.get(key, 0.0), row["median_s"])
            if case.memory is not None and not args.no_memory:
                try:
                    row["memory"] = case.memory()
                except Exception as exc:
                    row["memory"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        del live
        if want_passes:
            group_rows = rows[-len(cases_spec) :]
            ours_row = next(
                (r for r in group_rows if r["op"] == "ours" and r["mode"] == "fwd+bwd"), None
            )
            if ours_row is None or ours_row["status"] == "ok" or "fwd+bwd" not in modes:
                entry = _measure_passes(driver, x, g, k, args)
                if entry is not None:
                    if entry["status"] == "ok":
                        entry["bandwidth"] = passes.bandwidth(entry, (batch or 1) * n, dtype)
                    if backend == "torch" and _compile_shape(dtype, batch, n, sizes, args):
                        entry["compile"] = _compile_kernels(x, g, k, args)
                    pass_rows.append(dict(base, **entry))
        del x, g
        gc.collect()
        progress.update(label)

    try:
        machine["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    payload = {
        "machine": machine,
        "config": {
            "command": "python -m benchmarks " + shlex.join(args.argv),
            "backends": backends,
            "backend_names": backend_names,
            "operators": operators,
            "operators_all": list(ops.OPERATORS),
            "modes": modes,
            "sizes": [report._shape_label(b, n) for b, n in sizes],
            "k_fractions": kfracs,
            "dtypes": dtypes,
            "device": args.device,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "tau": args.tau,
            "seed": args.seed,
            "threads": args.threads,
            "max_seconds": args.max_seconds,
            "group_budget_s": args.group_budget,
            "pass_rounds": args.pass_rounds,
            "pass_budget_s": args.pass_budget,
            "wall_s": round(progress_elapsed(progress), 1),
        },
        "results": rows,
        "passes": pass_rows,
    }
    payload["ratios"] = report.ratios(rows)
    payload["slopes"] = report.slopes(rows)
    return payload


def _measure_passes(driver: ops.Driver, x: Any, g: Any, k: int, args: Any) -> dict | None:
    """The pass budget of one shape (:mod:`benchmarks.passes`), or the reason it has none."""
    try:
        unit = driver.build("elementwise", "sel", x, g, k, args.tau).run
        phases = driver.phases(x, g, k, args.tau)
        total = driver.build("ours", "fwd+bwd", x, g, k, args.tau).run
        entry = passes.measure(
            unit, phases, total, rounds=args.pass_rounds, budget_s=args.pass_budget
        )
    except ops.NotApplicable as exc:
        return {"status": f"n/a: {exc}"}
    except Exception as exc:  # one broken phase must not stop a run
        return {"status": f"error: {type(exc).__name__}: {str(exc)[:200]}"}
    try:
        entry["loadavg"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    entry["status"] = "ok"
    return entry


def _compile_shape(dtype: str, batch: int | None, n: int, sizes: list, args: Any) -> bool:
    if args.no_compile_kernels or args.quick or dtype != "float32":
        return False
    if (batch, n) in ((1024, 4096), (8192, 256)):
        return True
    ones = [s[1] for s in sizes if s[0] is None]
    return batch is None and bool(ones) and n == min(ones, key=lambda m: abs(m - 1_000_000))


def _compile_kernels(x: Any, g: Any, k: int, args: Any) -> dict:
    try:
        return passes.torch_compile_kernels(x, g, k, args.tau)
    except Exception as exc:  # a compiler missing on the machine must not stop the run
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}


def progress_elapsed(p: Progress) -> float:
    return time.perf_counter() - p.start


_JSON_KINDS = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


def load_results(path: str) -> dict[str, Any]:
    """Read an earlier ``results.json`` for ``--from-json``.

    Parameters
    ----------
    path : str
        The file.

    Returns
    -------
    dict
        The payload: a JSON object with ``machine``, ``config`` and ``results``.

    Raises
    ------
    ValueError
        Naming ``--from-json`` and the file, when it cannot be read, is not
        JSON or is not shaped like a ``results.json`` of ``python -m benchmarks``.
    """
    import json

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--from-json: cannot read {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--from-json: {path!r} is not a UTF-8 text file") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--from-json: {path!r} is not JSON ({exc})") from None
    what = f"--from-json: {path!r} is not a results.json written by python -m benchmarks"
    if not isinstance(payload, dict):
        kind = _JSON_KINDS.get(type(payload), "number")
        raise ValueError(f"{what}: it holds a JSON {kind}, not an object")
    for key, kind in (("machine", dict), ("config", dict), ("results", list)):
        if key not in payload:
            raise ValueError(f"{what}: it has no {key!r} entry")
        if not isinstance(payload[key], kind):
            raise ValueError(f"{what}: its {key!r} is not a JSON {_JSON_KINDS[kind]}")
    return payload


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["scaleout"]:
        from . import scaleout  # its own section: sharded axis, simulated JAX devices

        return scaleout.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.sizes = args.sizes or QUICK_SIZES
        args.operators = args.operators or QUICK_BACKEND_OPS
        args.k = "0.1" if args.k == parser.get_default("k") else args.k
        args.modes = "fwd+bwd" if args.modes == parser.get_default("modes") else args.modes
        args.repeats = min(args.repeats, 3)
        args.no_memory = True
        args.group_budget = min(args.group_budget, 5.0)
        args.pass_rounds = min(args.pass_rounds, 10)
        args.pass_budget = min(args.pass_budget, 2.0)
    args.sizes = args.sizes or FULL_SIZES
    args.operators = args.operators or ",".join(ops.OPERATORS)
    try:
        payload = load_results(args.from_json) if args.from_json else run_benchmark(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if args.from_json:
        try:  # render once in memory: a malformed row must fail before any file is written
            payload = report.prepare(payload)
            report.render_markdown(payload, None)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            detail = f"no {exc} entry" if isinstance(exc, KeyError) else str(exc)
            parser.error(
                f"--from-json: {args.from_json!r} is not a results.json written by "
                f"python -m benchmarks ({type(exc).__name__}: {detail})"
            )
    else:
        payload = report.prepare(payload)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / args.device
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "results.json", payload)
    plot = None
    if not args.no_plot and report.write_plot(out / "plot.png", payload):
        plot = "plot.png"
    report.write_markdown(out / "results.md", payload, plot)
    passes_plot = not args.no_plot and report.write_passes_plot(out / "passes.png", payload)
    for r in report.headline(payload["ratios"]):
        what = (
            f"{r['ours_op']}/{r['baseline']}"
            if r["kind"] == "ours/floor"
            else f"{r['baseline']}/{r['ours_op']}"
        )
        print(
            f"{r['backend']:6s} {report._shape_label(r['batch'], r['n']):10s} {what:24s} "
            f"{r['ratio_median']:7.2f}  target {r['target']:6s} {'met' if r['met'] else 'MISSED'}"
        )
    for e in report.pass_headline(payload.get("passes", [])):
        p = e["passes"]
        bw = report.bandwidth_of(e)
        print(
            f"{e['backend']:6s} {report._shape_label(e['batch'], e['n']):10s} passes: "
            f"select {p['select']:.1f}, fwd math {p['fwd_math']:.1f}, bwd math "
            f"{p['bwd_math']:.1f}, total {p.get('total', float('nan')):.1f} "
            f"(median {e.get('passes_median', {}).get('total', float('nan')):.1f}; "
            f"1 pass = {e['unit_s'] * 1e3:.3f} ms; back to back "
            f"{report._fmt_hot(e.get('unit_hot_s'))} ms; GB/s: pass "
            f"{report._fmt_gbps(bw['pass_gbps'])}, total "
            f"{report._fmt_gbps(bw.get('total_gbps'))})"
        )
    written = [out / "results.md", out / "results.json"] + ([out / plot] if plot else [])
    written += [out / "passes.png"] if passes_plot else []
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
