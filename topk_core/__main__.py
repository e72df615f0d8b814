"""``python -m topk_core``: a doctor table for every installed backend.

For each array library that is installed: its version and device, a forward and
a gradient check against the NumPy float64 result on the same data, and the
time of one forward and one forward + backward at n = 1e6 (float32), each the
best of ``--repeats`` calls after warming up until the call time is stable
(the table says how many warm-up calls that took).  The footer lists the
settings used.

Exit status: 0 when every requested library that is installed passed its
check, 1 when a check failed or none of them is installed (nothing was
checked), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import topk_core as tk

LIBRARIES = ("numpy", "array_api_strict", "torch", "jax", "cupy")


def _prepare(name: str) -> tuple[Any, Callable[[np.ndarray], Any], Callable[[Any], np.ndarray]]:
    """(module, numpy -> library, library -> numpy) for an installed library."""
    if name == "numpy":
        return np, np.asarray, np.asarray
    if name == "array_api_strict":
        import array_api_strict as s

        return s, s.asarray, lambda a: np.asarray(np.from_dlpack(a))
    if name == "torch":
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        return torch, lambda a: torch.from_numpy(a).to(dev), lambda a: a.detach().cpu().numpy()
    if name == "jax":
        os.environ.setdefault("JAX_ENABLE_X64", "1")
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        return jax, jnp.asarray, np.asarray
    if name == "cupy":
        import cupy

        return cupy, cupy.asarray, lambda a: a.get()
    raise ValueError(f"unknown library {name!r}")


def _device(mod: Any, arr: Any) -> str:
    from array_api_compat import device

    return str(device(arr))


def _sync(name: str, out: Any) -> None:
    if name == "torch" and out.is_cuda:
        import torch

        torch.cuda.synchronize()
    elif name == "jax":
        out.block_until_ready()
    elif name == "cupy":
        import cupy

        cupy.cuda.Device().synchronize()


#: warm-up stops once this many consecutive calls agree within STABLE_TOL of their fastest
STABLE_CALLS = 3
STABLE_TOL = 0.15
#: ... or after this many calls / seconds, whichever comes first (then it says so)
MAX_WARMUP_CALLS = 50
MAX_WARMUP_S = 20.0
#: the correctness check's settings
CHECK_SHAPE = (4, 257)
CHECK_K = 25
CHECK_TAU = 0.3
#: the timing's settings (k = n // TIME_K_DIV)
TIME_TAU = 0.1
TIME_K_DIV = 10


def warm_up(call: Callable[[], float]) -> tuple[int, bool]:
    """Call until STABLE_CALLS consecutive times agree within STABLE_TOL.

    ``call()`` runs once and returns its time.  Returns ``(calls, stable)``:
    first calls of a process are often several times slower (lazy
    initialisation, JIT compilation, allocator and thread-pool warm-up), so one
    warm-up call is not enough, and how many are needed differs per library.

    Examples
    --------
    >>> times = iter([9.0, 5.0, 1.1, 1.0, 1.05, 1.0])
    >>> warm_up(lambda: next(times))
    (5, True)
    """
    recent: list[float] = []
    t_end = time.perf_counter() + MAX_WARMUP_S
    calls = 0
    while True:
        recent = (recent + [call()])[-STABLE_CALLS:]
        calls += 1
        if len(recent) == STABLE_CALLS and max(recent) <= min(recent) * (1 + STABLE_TOL):
            return calls, True
        if calls >= MAX_WARMUP_CALLS or time.perf_counter() > t_end:
            return calls, False


def _timed(fn: Callable[[], Any], name: str, repeats: int) -> tuple[float, str]:
    """Best of ``repeats`` timed calls after :func:`warm_up`; ``(ms, warm-up note)``."""

    def once() -> float:
        t0 = time.perf_counter()
        _sync(name, fn())
        return time.perf_counter() - t0

    calls, stable = warm_up(once)
    best = min(once() for _ in range(repeats))
    return best * 1e3, f"{calls}" if stable else f"{calls} (not stable)"


def _fwd_bwd(name: str, mod: Any, x: Any, k: int) -> Callable[[], Any]:
    """Forward + backward the way a user of the library would write it."""
    if name == "torch":

        def run():
            xx = x.detach().requires_grad_(True)
            tk.dftopk(xx, k, tau=TIME_TAU).sum().backward()
            return xx.grad

        return run
    if name == "jax":
        grad = mod.jit(mod.grad(lambda v: tk.dftopk(v, k, tau=TIME_TAU).sum()))
        return lambda: grad(x)
    g = x * 0 + 1

    def run():
        _, vjp = tk.dftopk_and_vjp(x, k, tau=TIME_TAU)  # one selection for both
        return vjp(g)[0]

    return run


#: how each library's forward + backward is timed (named in the footer)
BACKWARD = {
    "torch": "autograd .backward()",
    "jax": "jax.jit(jax.grad)",
}
BACKWARD_DEFAULT = "dftopk_and_vjp (one selection for forward and VJP)"


def check(name: str, n: int, repeats: int) -> dict[str, Any]:
    mod, to_lib, to_np = _prepare(name)
    rng = np.random.default_rng(0)
    x64 = rng.standard_normal(CHECK_SHAPE)
    g64 = rng.standard_normal(x64.shape)
    ref = tk.dftopk(x64, CHECK_K, tau=CHECK_TAU)
    ref_grad, _ = tk.dftopk_vjp(x64, CHECK_K, g64, tau=CHECK_TAU)
    x = to_lib(x64)
    fwd_err = float(np.max(np.abs(to_np(tk.dftopk(x, CHECK_K, tau=CHECK_TAU)) - ref)))
    grad, _ = tk.dftopk_vjp(x, CHECK_K, to_lib(g64), tau=CHECK_TAU)
    grad_err = float(np.max(np.abs(to_np(grad) - ref_grad)))
    if name == "torch":
        xx = x.clone().requires_grad_(True)
        (tk.dftopk(xx, CHECK_K, tau=CHECK_TAU) * to_lib(g64)).sum().backward()
        grad_err = max(grad_err, float(np.max(np.abs(to_np(xx.grad) - ref_grad))))
    elif name == "jax":
        gj = mod.grad(lambda v: (tk.dftopk(v, CHECK_K, tau=CHECK_TAU) * g64).sum())(x)
        grad_err = max(grad_err, float(np.max(np.abs(to_np(gj) - ref_grad))))
    xt = to_lib(rng.standard_normal(n).astype(np.float32))
    k = n // TIME_K_DIV
    fwd_ms, fwd_warm = _timed(lambda: tk.dftopk(xt, k, tau=TIME_TAU), name, repeats)
    bwd_ms, bwd_warm = _timed(_fwd_bwd(name, mod, xt, k), name, repeats)
    ok = fwd_err < 1e-9 and grad_err < 1e-9
    return {
        "library": name,
        "version": getattr(mod, "__version__", "?"),
        "device": _device(mod, x),
        "forward err": f"{fwd_err:.1e}",
        "gradient err": f"{grad_err:.1e}",
        "check": "ok" if ok else "FAIL",
        f"fwd ms (n={n:.0e})": f"{fwd_ms:.2f}",
        "fwd+bwd ms": f"{bwd_ms:.2f}",
        "warm-up calls fwd / fwd+bwd": f"{fwd_warm} / {bwd_warm}",
    }


def footer(n: int, repeats: int, names: list[str]) -> list[str]:
    """The settings the table was made with (the same constants the code used).

    Parameters
    ----------
    n : int
        The size of the timed input.
    repeats : int
        Timed calls after warm-up.
    names : list of str
        The libraries that were checked (their backward is named).

    Returns
    -------
    list of str
        One line per setting.
    """
    k = n // TIME_K_DIV
    # only the libraries that were checked: CuPy, when installed, is timed like NumPy
    bwd = "; ".join(f"{lib}: {BACKWARD.get(lib, BACKWARD_DEFAULT)}" for lib in names)
    return [
        f"check: x of shape {CHECK_SHAPE} float64, k = {CHECK_K}, tau = {CHECK_TAU}, "
        f"random cotangent; errors = max |difference| from NumPy float64 (ok below 1e-9)",
        f"timing: 1-d x of n = {n} float32, k = n/{TIME_K_DIV} = {k}, tau = {TIME_TAU}; "
        f"forward = dftopk; forward + backward = {bwd}",
        f"each time: best of {repeats} calls after warm-up calls until {STABLE_CALLS} in a row "
        f"agree within {STABLE_TOL:.0%} (at most {MAX_WARMUP_CALLS} calls / "
        f"{MAX_WARMUP_S:.0f} s; 'not stable' when that limit ended it)",
    ]


def _table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    width = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    line = "| " + " | ".join(k.ljust(width[k]) for k in keys) + " |"
    sep = "|" + "|".join("-" * (width[k] + 2) for k in keys) + "|"
    body = ["| " + " | ".join(str(r.get(k, "")).ljust(width[k]) for k in keys) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m topk_core",
        description="Check and time DFTopK on every installed array library.",
        epilog="exit status: 0 every requested library that is installed passed; 1 a check "
        "failed, or none of the requested libraries is installed (nothing checked); "
        "2 bad arguments",
    )
    parser.add_argument("--n", type=int, default=1_000_000, help="size of the timed 1-d input")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls after warm-up (best is shown)"
    )
    parser.add_argument(
        "--libraries", default=",".join(LIBRARIES), help="comma-separated subset of: %(default)s"
    )
    args = parser.parse_args(argv)
    if args.n < 10:
        parser.error(f"--n must be >= 10, got {args.n}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    names = [s.strip() for s in args.libraries.split(",") if s.strip()]
    if not names:
        parser.error(
            f"--libraries: no library given in {args.libraries!r}; choose from {list(LIBRARIES)}"
        )
    unknown = sorted(set(names) - set(LIBRARIES))
    if unknown:
        parser.error(f"--libraries: unknown libraries {unknown}; choose from {list(LIBRARIES)}")

    print(
        f"topk-core {tk.__version__} on Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs"
    )
    rows, failed, checked = [], False, []
    for name in names:
        if importlib.util.find_spec(name) is None:
            rows.append({"library": name, "version": "not installed"})
            continue
        checked.append(name)
        try:
            row = check(name, args.n, args.repeats)
        except Exception as exc:  # the doctor reports failures, it does not crash
            row = {"library": name, "check": f"ERROR {type(exc).__name__}: {exc}"}
        failed |= row.get("check") != "ok"
        rows.append(row)
        print(f"  checked {name}", file=sys.stderr)
    full = [r for r in rows if "version" in r and "check" in r]
    if full:  # align rows of absent libraries to the full header
        rows = [{k: r.get(k, "") for k in full[0]} for r in rows]
    print(_table(rows))
    if not checked:  # an all-clear with nothing checked would be misleading
        print(
            f"nothing checked: none of the requested libraries ({', '.join(names)}) is installed",
            file=sys.stderr,
        )
        return 1
    print("\n".join(footer(args.n, args.repeats, checked)))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
