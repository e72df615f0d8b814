"""Scale-out benchmark: DFTopK over a selection axis sharded across JAX devices.

``python -m benchmarks.scaleout`` (or ``python -m benchmarks scaleout``)
shards one row of ``n`` float32 scores over ``P`` devices (``P(None, "d")``)
and times the forward ``p = dftopk(x, k)``, ``k = max(1, n // 10)``, three ways:

``ours``
    ``shard_map`` + ``topk_core.dftopk(x_local, k, group="d")``: the radix
    select narrows locally and ``psum``s per-pass digit histograms.
``gspmd``
    ``jax.jit(topk_core.dftopk)`` on the sharded array, no group: XLA's
    automatic (GSPMD) partitioning of the single-device program.
``allgather``
    the usual sharded-inference pattern: per shard ``lax.top_k(x_local, k+1)``,
    ``all_gather`` of the ``P (k+1)`` candidates, ``top_k`` again for the
    k-th and (k+1)-th values, then the same elementwise DFTopK.

Bytes communicated come from the compiled HLO (every all-reduce, all-gather,
all-to-all, reduce-scatter and collective-permute with its shape), reported
as the collectives' total result size and as bytes each device sends under a
ring model (all-reduce ``2 (P-1)/P S``, all-gather/reduce-scatter/all-to-all
``(P-1)/P S``, permute ``S``).

What a CPU simulation can show: the communication volume (exact: it is
the compiled program's) and how the total work grows with ``n`` and ``P``.
What it cannot show: interconnect time and parallel speed-up.  The ``P``
"devices" (``XLA_FLAGS=--xla_force_host_platform_device_count``) share one
host's cores and memory, and a "collective" is a memory copy, so more devices
never make a call faster here and the times mostly add up the devices' work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cli import no_repeats

__all__ = ["METHODS", "Collective", "collectives", "main", "per_device_bytes"]

METHODS = ("ours", "gspmd", "allgather")
DEVICES = 8
FULL_SIZES = (2**20, 2**22, 2**24)
FULL_P = (1, 2, 4, 8)
QUICK_SIZES = (2**12, 2**14)
QUICK_P = (1, 2)

_OPS = (
    "all-reduce",
    "all-gather",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-broadcast",
    "reduce-scatter",
)
# "= <shape or (tuple of shapes)> <op>(" or "<op>-start(" in optimised HLO text
_LINE = re.compile(
    r"=\s*(?P<shape>\([^=]*?\)|\S+)\s+(?P<op>" + "|".join(_OPS) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b(pred|bf16|[suf]\d+|c\d+)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}


@dataclass(frozen=True)
class Collective:
    """One collective of a compiled HLO module: its op and result arrays."""

    op: str
    arrays: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the result arrays."""
        total = 0
        for dtype, shape in self.arrays:
            size = 1
            for s in shape:
                size *= s
            total += size * _BYTES.get(dtype, max(1, int(re.sub(r"\D", "", dtype) or 8) // 8))
        return total


def collectives(hlo_text: str) -> list[Collective]:
    """The collectives of an HLO module's text (``compiled.as_text()``).

    Examples
    --------
    >>> line = "%p = s32[4,256]{1,0} all-reduce(%b), channel_id=1, to_apply=%r"
    >>> [(c.op, c.arrays, c.nbytes) for c in collectives(line)]
    [('all-reduce', (('s32', (4, 256)),), 4096)]
    """
    out = []
    for line in hlo_text.splitlines():
        m = _LINE.search(line)
        if m is None:
            continue
        arrays = tuple(
            (dt, tuple(int(d) for d in dims.split(",") if d))
            for dt, dims in _ARRAY.findall(m.group("shape"))
        )
        if m.group("start") and len(arrays) > 1:
            arrays = arrays[-1:]  # async start: (operand..., result)
        out.append(Collective(m.group("op"), arrays))
    return out


def per_device_bytes(cols: list[Collective], p: int) -> float:
    """Bytes each device sends for ``cols`` under a ring model on ``p`` devices.

    Examples
    --------
    >>> per_device_bytes([Collective("all-reduce", (("f32", (1024,)),))], 4)
    6144.0
    """
    if p <= 1:
        return 0.0
    total = 0.0
    for c in cols:
        if c.op == "all-reduce":
            total += 2 * (p - 1) / p * c.nbytes
        elif c.op == "collective-permute":
            total += c.nbytes
        else:
            total += (p - 1) / p * c.nbytes
    return total


def _builders(k: int, tau: float) -> dict[str, Any]:
    """``method -> make(mesh) -> jitted fn(x)``; JAX imported here (after XLA_FLAGS)."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import PartitionSpec as P

    import topk_core

    spec = P(None, "d")

    def ours(mesh):
        f = jax.shard_map(
            lambda x: topk_core.dftopk(x, k, tau=tau, group="d"),
            mesh=mesh,
            in_specs=spec,
            out_specs=spec,
        )
        return jax.jit(f)

    def gspmd(mesh):
        return jax.jit(lambda x: topk_core.dftopk(x, k, tau=tau))

    def allgather(mesh):
        def local(x):
            m = min(k + 1, x.shape[-1])
            cand = lax.top_k(x, m)[0]
            every = lax.all_gather(cand, "d", axis=x.ndim - 1, tiled=True)
            top = lax.top_k(every, k + 1)[0]
            a, b = top[..., k - 1 : k], top[..., k : k + 1]
            theta = a / 2 + b / 2
            return jax.nn.sigmoid((x - theta) / tau)

        f = jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec)
        return jax.jit(f)

    del jnp
    return {"ours": ours, "gspmd": gspmd, "allgather": allgather}


def _mesh(p: int) -> Any:
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    # Auto axes: GSPMD partitions the plain program (explicit axes reject it)
    return Mesh(np.array(jax.devices()[:p]), ("d",), axis_types=(AxisType.Auto,))


def _estimated_bytes(method: str, batch: int, n: int, p: int) -> int:
    """Rough host memory of one case: GSPMD on a batch gathers the full keys to every device."""
    whole = batch * n * 4
    if method == "gspmd" and batch > 1:
        return whole * p * 8
    return whole * 8


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if jax.device_count() < max(args.p):
        raise RuntimeError(
            f"need {max(args.p)} devices, have {jax.device_count()} (XLA_FLAGS not applied?)"
        )
    results: list[dict[str, Any]] = []
    slow: dict[tuple[str, int], float] = {}
    for batch in args.batch:
        for n in args.n:
            k = max(1, n // 10)
            builders = _builders(k, args.tau)
            x_host = np.random.default_rng(args.seed).standard_normal((batch, n), dtype=np.float32)
            for p in args.p:
                mesh = _mesh(p)
                x = jax.device_put(x_host, NamedSharding(mesh, P(None, "d")))
                live = []
                for method in args.methods:
                    row = {"method": method, "batch": batch, "P": p, "n": n, "k": k, "status": "ok"}
                    results.append(row)
                    est = _estimated_bytes(method, batch, n, p)
                    if slow.get((method, batch), 0.0) > args.max_seconds:
                        row["status"] = f"skipped: a smaller n took {slow[method, batch]:.1f} s"
                        continue
                    if est > args.max_gib * 2**30:
                        row["status"] = f"skipped: ~{est / 2**30:.0f} GiB > --max-gib"
                        continue
                    try:
                        fn = builders[method](mesh)
                        t0 = time.perf_counter()
                        compiled = fn.lower(x).compile()
                        row["compile_s"] = time.perf_counter() - t0
                        cols = collectives(compiled.as_text())
                        row["collectives"] = len(cols)
                        row["collective_result_bytes"] = sum(c.nbytes for c in cols)
                        row["bytes_per_device"] = per_device_bytes(cols, p)
                        row["largest_collective_bytes"] = max((c.nbytes for c in cols), default=0)
                        out = compiled(x)
                        out.block_until_ready()
                        live.append((method, compiled, row, out))
                    except Exception as exc:  # report and go on
                        row["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
                ref = next((o for m, _, _, o in live if m == "ours"), None)
                for _method, _, row, out in live:
                    if ref is not None:
                        row["max_abs_diff_vs_ours"] = float(np.max(np.abs(np.asarray(out - ref))))
                for _ in range(args.repeats):  # interleaved: noise hits every method alike
                    for _method, compiled, row, _ in live:
                        t0 = time.perf_counter()
                        compiled(x).block_until_ready()
                        row.setdefault("times_s", []).append(time.perf_counter() - t0)
                for method, _, row, _ in live:
                    row["median_s"] = statistics.median(row["times_s"])
                    row["min_s"] = min(row["times_s"])
                    slow[method, batch] = max(slow.get((method, batch), 0.0), row["median_s"])
                del live, x
                print(
                    f"{batch} x {_fmt_n(n)} P={p}: "
                    + ", ".join(
                        f"{r['method']} {r.get('median_s', float('nan')) * 1e3:.1f} ms "
                        f"{r.get('bytes_per_device', float('nan')) / 1024:.1f} KiB"
                        for r in results
                        if (r["batch"], r["n"], r["P"]) == (batch, n, p)
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    return {"results": results}


def _machine() -> dict[str, Any]:
    import jax

    from . import report

    info = report.machine_info({"jax": jax.__version__})
    info["simulated_devices"] = jax.device_count()
    return info


def write_markdown(path: Path, payload: dict[str, Any], plot: str | None) -> None:
    """The results table (one row per batch, n, P) and the setup."""
    m = payload["machine"]
    cfg = payload["config"]
    lines = [
        "# Scale-out: DFTopK over a sharded selection axis (simulated JAX CPU devices)",
        "",
        f"Command: `{cfg['command']}`.  `batch` rows of n float32 scores, the axis of "
        f"length n sharded over P devices, k = max(1, n // 10), tau = {cfg['tau']}, forward only; "
        f"median of {cfg['repeats']} interleaved calls after compiling.",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, load average "
        f"{_load(m.get('loadavg_start'))} at the start, {_load(m.get('loadavg_end'))} at the "
        f"end; jax {m.get('jax')}, {m.get('simulated_devices')} simulated devices.",
        "",
        "Bytes: sent per device per call under a ring model, from the compiled HLO's",
        "collectives (exact volumes).  Times on simulated devices add up every device's",
        "work on the same cores: they show the total work, not a parallel speed-up or",
        "the interconnect's cost.",
        "",
        "| batch | n | P | ours ms | ours bytes/dev | gspmd ms | gspmd bytes/dev | "
        "allgather ms | allgather bytes/dev |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["batch"], r["n"], r["P"], r["method"]): r for r in payload["results"]}
    for batch in cfg["batch"]:
        for n in cfg["n"]:
            for p in cfg["p"]:
                cells = [str(batch), _fmt_n(n), str(p)]
                for method in METHODS:
                    r = by.get((batch, n, p, method))
                    if r is None:
                        cells += ["-", "-"]
                    elif r["status"] != "ok":
                        cells += [r["status"].split(":")[0], "-"]
                    else:
                        cells += [f"{r['median_s'] * 1e3:.1f}", _fmt_bytes(r["bytes_per_device"])]
                lines.append("| " + " | ".join(cells) + " |")
    if plot:
        lines += ["", f"![scale-out]({plot})"]
    path.write_text("\n".join(lines) + "\n")


def _fmt_n(n: int) -> str:
    """``2^j`` for a power of two, else the number (``--n`` accepts any n).

    Examples
    --------
    >>> _fmt_n(2**20), _fmt_n(3000)
    ('2^20', '3000')
    """
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)


def _load(v: Any) -> str:
    return "/".join(f"{x:.1f}" for x in v) if v else "?"


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if b < 1024:
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} GiB"


def write_plot(path: Path, payload: dict[str, Any]) -> bool:
    """Bytes per device and time against n at the largest P (one panel per batch size)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in payload["results"] if r["status"] == "ok"]
    if not ok:
        return False
    cfg = payload["config"]
    pmax = max(cfg["p"])
    batches = cfg["batch"]
    fig, axes = plt.subplots(2, len(batches), figsize=(6.5 * len(batches), 8), squeeze=False)
    for col, batch in enumerate(batches):
        for method, style in zip(METHODS, ("o-", "s--", "^:")):
            sel = sorted(
                (r for r in ok if (r["method"], r["P"], r["batch"]) == (method, pmax, batch)),
                key=lambda r: r["n"],
            )
            if not sel:
                continue
            ns = [r["n"] for r in sel]
            axes[0][col].loglog(
                ns, [max(r["bytes_per_device"], 1) for r in sel], style, label=method
            )
            axes[1][col].loglog(ns, [r["median_s"] * 1e3 for r in sel], style, label=method)
        axes[0][col].set(
            xlabel="n (axis length)",
            ylabel="bytes sent per device per call",
            title=f"communication, batch {batch}, P = {pmax}",
        )
        axes[1][col].set(
            xlabel="n (axis length)",
            ylabel="ms per call (simulated devices)",
            title=f"time, batch {batch}, P = {pmax}",
        )
    for ax in axes.ravel():
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(
        "DFTopK over a sharded axis on simulated JAX CPU devices (k = max(1, n // 10), float32)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scaleout",
        description="DFTopK over a selection axis sharded across simulated JAX CPU devices: "
        "topk-core's group= against GSPMD and local top-k + all-gather.",
    )
    p.add_argument(
        "--n",
        default=None,
        help="comma list of n, each >= 2 and divisible by every P (default 2^20,2^22,2^24)",
    )
    p.add_argument("--p", default=None, help="comma list of device counts (default 1,2,4,8)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument(
        "--batch", default=None, help="comma list of rows per call (default 1,4; quick 1,2)"
    )
    p.add_argument(
        "--max-gib",
        type=float,
        default=6.0,
        help="skip a case whose estimated host memory exceeds this many GiB, > 0 (default 6)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tau", type=float, default=1.0, help="temperature, finite > 0 (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-seconds",
        type=float,
        default=20.0,
        help="skip larger n for a method once one call took longer, > 0; inf: never (default 20)",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: n 2^12,2^14, P 1,2, batch 1,2, 2 repeats"
    )
    p.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/scaleout)"
    )
    p.add_argument("--no-plot", action="store_true")
    return p


def _ints(text: str, what: str) -> list[int]:
    """``"1,2^3,16"`` -> ``[1, 8, 16]``.

    Examples
    --------
    >>> _ints("1, 2^3, 16", "--p")
    [1, 8, 16]
    """
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)(?:\s*(?:\^|\*\*)\s*(\d+))?", item)
        if m is None:
            raise ValueError(f"{what}: cannot read {item!r}; use an integer or 2^20")
        out.append(int(m.group(1)) ** int(m.group(2)) if m.group(2) else int(m.group(1)))
    if not out:
        raise ValueError(f"{what}: nothing given; use a comma list of integers such as 1,2^20")
    return no_repeats(out, what)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Read the comma lists into ``args`` and reject what cannot give a useful run.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        Reports a bad value with ``parser.error`` (exit status 2).
    args : argparse.Namespace
        The parsed arguments; ``n``, ``p``, ``batch`` and ``methods`` become lists.
    """
    try:
        # "is None", not truthiness: an empty --n '' is an error, not the default sizes
        args.n = (
            _ints(args.n, "--n")
            if args.n is not None
            else list(QUICK_SIZES if args.quick else FULL_SIZES)
        )
        args.p = (
            _ints(args.p, "--p") if args.p is not None else list(QUICK_P if args.quick else FULL_P)
        )
        default_batch = "1,2" if args.quick else "1,4"
        args.batch = _ints(args.batch if args.batch is not None else default_batch, "--batch")
    except ValueError as exc:
        parser.error(str(exc))
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        parser.error(f"--methods: got {bad or args.methods}; allowed: {', '.join(METHODS)}")
    try:
        no_repeats(args.methods, "--methods")
    except ValueError as e:
        parser.error(str(e))
    if any(p < 1 or p > DEVICES for p in args.p):
        parser.error(f"--p: device counts must lie in [1, {DEVICES}], got {args.p}")
    if any(b < 1 for b in args.batch):
        parser.error(f"--batch: rows per call must be >= 1, got {args.batch}")
    # k = max(1, n // 10); the all-gather baseline reads the (k+1)-th value, so n >= 2
    if any(n < 2 for n in args.n):
        parser.error(f"--n: every n must be >= 2 (k = max(1, n // 10) < n), got {args.n}")
    for n in args.n:
        for p in args.p:
            if n % p:
                parser.error(
                    f"--n: every n must be divisible by every P (--p {args.p}), "
                    f"got n = {n}, not divisible by {p}"
                )
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if not (math.isfinite(args.tau) and args.tau > 0):
        parser.error(f"--tau must be a finite number > 0, got {args.tau}")
    # 0 would skip every case after the first n; inf (never skip) is meaningful
    if not args.max_seconds > 0:
        parser.error(
            f"--max-seconds must be > 0 (inf: never skip a larger n), got {args.max_seconds}"
        )
    if not args.max_gib > 0:
        parser.error(f"--max-gib must be > 0 (inf: no memory limit), got {args.max_gib}")
    smallest = min(
        _estimated_bytes(m, b, n, p)
        for m in args.methods
        for b in args.batch
        for n in args.n
        for p in args.p
    )
    if smallest > args.max_gib * 2**30:
        parser.error(
            f"--max-gib {args.max_gib:g} skips every case: the smallest needs "
            f"~{smallest / 2**30:.3g} GiB; raise --max-gib or lower --n/--batch"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point; re-runs itself in a subprocess when JAX is already loaded here."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)  # before any re-run: bad input fails fast, without JAX
    flag = f"--xla_force_host_platform_device_count={DEVICES}"
    if "jax" in sys.modules or flag not in os.environ.get("XLA_FLAGS", ""):
        if "jax" in sys.modules:
            # the device count is fixed when JAX starts: measure in a fresh interpreter
            env = dict(os.environ)
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
            env.setdefault("JAX_PLATFORMS", "cpu")
            cmd = [sys.executable, "-m", "benchmarks.scaleout", *argv]
            return subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1]).returncode
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.quick:
        args.repeats = min(args.repeats, 2)
    start = time.perf_counter()
    machine = _machine()
    payload = _run(args)
    try:
        machine["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    payload["machine"] = machine
    payload["config"] = {
        "command": "python -m benchmarks.scaleout " + " ".join(argv),
        "n": args.n,
        "p": args.p,
        "batch": args.batch,
        "methods": args.methods,
        "max_gib": args.max_gib,
        "repeats": args.repeats,
        "tau": args.tau,
        "seed": args.seed,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "scaleout"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot = "plot.png" if not args.no_plot and write_plot(out / "plot.png", payload) else None
    write_markdown(out / "results.md", payload, plot)
    print(
        f"wrote {out / 'results.md'}, {out / 'results.json'}" + (f", {out / plot}" if plot else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
