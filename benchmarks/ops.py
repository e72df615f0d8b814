"""The benchmarked operators, per array library.

Every operator is built into a :class:`Case`: a zero-argument callable that
computes the result and waits for it (device sync / ``block_until_ready``), so
that the harness only has to time calls.  Operators:

``ours``
    ``topk_core.dftopk``: torch autograd / ``jax.jit`` (+ ``jax.vjp``) /
    ``dftopk_and_vjp`` (one selection, then the VJP) on NumPy and CuPy.
``ours_vjp``
    The public closed-form ``topk_core.dftopk_vjp`` (it computes its own
    forward; no autodiff), ``fwd+bwd`` only; on JAX called eagerly, as a user
    calls it outside ``jit`` (its compiled programs, not one fused ``jit``).
``ours_rowk``
    ``ours`` with ``k`` given as a per-row integer array (every row the same
    value): the per-row-k path against the scalar one.
``official``
    The official DFTopK formulation: two selections of the k-th and (k+1)-th
    values with the library's primitive and autodiff through them (torch: two
    ``kthvalue`` on ``-x``; JAX: ``lax.top_k(x, k + 1)``).  Not defined for
    NumPy/CuPy (no autodiff).
``lapsum``
    LapSum soft top-k (:mod:`benchmarks.lapsum`) with its closed-form gradient.
``sort_dftopk``
    ``topk_core.dftopk`` with the backend's selection replaced by a full sort:
    same math and gradient, isolates the cost of the selection.
``ours_select``
    The ``(a, b)`` selection topk-core uses on that backend, alone.
``hard``
    The library's own best k-th value primitive alone (NumPy/CuPy
    ``partition``, torch ``kthvalue``, JAX ``lax.top_k``): the floor a user
    without topk-core would compare against.
``sort``
    A bare full sort of the same scores along the axis (``np.sort``,
    ``torch.sort``, ``jnp.sort``): what a user without an O(n) selection pays.
``elementwise``
    ``x * 2``: one read and one write of ``x``, the memory-traffic unit (the
    "pass" of the pass budget, :mod:`benchmarks.passes`).

Modes: ``fwd`` (forward only, no autodiff tape) and ``fwd+bwd`` (forward, then
the gradient for a fixed random cotangent ``g``); the last three operators
have only ``sel`` (forward, nothing to differentiate).
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BACKENDS",
    "DIFFERENTIABLE",
    "MODES",
    "OPERATORS",
    "VJP_ONLY",
    "Case",
    "Driver",
    "available_backends",
    "get_driver",
]

OPERATORS = (
    "ours",
    "ours_vjp",
    "ours_rowk",
    "official",
    "lapsum",
    "sort_dftopk",
    "ours_select",
    "hard",
    "sort",
    "elementwise",
)
DIFFERENTIABLE = ("ours", "ours_rowk", "official", "lapsum", "sort_dftopk")
VJP_ONLY = ("ours_vjp",)  # fwd+bwd only
MODES = ("fwd", "fwd+bwd", "sel")
BACKENDS = ("numpy", "torch", "jax", "cupy")


@dataclass
class Case:
    """One operator, in one mode, on one input: ``run()`` computes and syncs."""

    op: str
    mode: str
    run: Callable[[], Any]
    # optional: returns {"saved_bytes": int|None, "peak_bytes": int|None, "peak_kind": str}
    memory: Callable[[], dict[str, Any]] | None = None
    # optional: raises if the case did not compute what its name says
    verify: Callable[[], None] | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class NotApplicable(Exception):
    """The operator makes no sense (or is unavailable) on this backend/dtype."""


@contextlib.contextmanager
def sort_selection(library: str) -> Iterator[list[int]]:
    """Temporarily give ``library``'s backend (and its adapter) a full-sort selection.

    The backend's ``select_pair`` is swapped in the registry, and so is the
    ``select_pair`` name the framework adapter (``topk_core.adapters.<lib>_adapter``)
    imported, if it has one.  Yields a one-element counter of how often the sort
    selection ran, so that callers can check the swap really took effect.
    """
    import importlib
    import sys

    from topk_core import register_backend
    from topk_core._registry import get_backend

    original = get_backend(library)
    calls = [0]

    def counted(xp: Any, x: Any, k: Any) -> Any:
        calls[0] += 1
        return sort_select(xp, x, k)

    adapter_name = f"topk_core.adapters.{library}_adapter"
    adapter = sys.modules.get(adapter_name)
    if adapter is None and original.apply is not None:
        with contextlib.suppress(ImportError):
            adapter = importlib.import_module(adapter_name)
    patched = adapter is not None and hasattr(adapter, "select_pair")
    saved = adapter.select_pair if patched else None
    register_backend(
        library,
        dataclasses.replace(
            original, name=original.name + "-sort", select_pair=counted, select_candidates=None
        ),
    )
    if patched:
        adapter.select_pair = counted
    try:
        yield calls
    finally:
        register_backend(library, original)
        if patched:
            adapter.select_pair = saved


def sort_select(xp: Any, x: Any, k: Any) -> tuple[Any, Any]:
    """``(a, b)`` from a full descending sort (unstable: stability costs 2-3x here)."""
    from topk_core.backends.generic import select_pair, sentinel

    if not isinstance(k, int):
        return select_pair(xp, x, k)
    n = x.shape[-1]
    s = xp.sort(x, axis=-1, descending=True, stable=False)
    a = sentinel(xp, x, xp.inf) if k == 0 else s[..., k - 1 : k]
    b = sentinel(xp, x, -xp.inf) if k == n else s[..., k : k + 1]
    return a, b


def _select_pair(library: str) -> Callable[..., Any]:
    from topk_core.backends.generic import select_pair as generic_select

    from topk_core._registry import get_backend

    fn = get_backend(library).select_pair
    return fn if fn is not None else generic_select


class Driver(ABC):
    """What the harness needs from an array library (one subclass per library)."""

    name = "?"
    dtypes: tuple[str, ...] = ()

    @abstractmethod
    def available(self) -> str | None:
        """None if usable, else the reason it is not."""

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Versions of the library and its companions, for the JSON."""

    @abstractmethod
    def devices(self, device: str) -> bool:
        """Whether this library can run on ``device`` ("cpu" or "cuda")."""

    @abstractmethod
    def make_input(self, x_np: Any, g_np: Any, dtype: str, device: str) -> tuple[Any, Any]:
        """Scores and cotangent in the library, dtype and device."""

    @abstractmethod
    def build(self, op: str, mode: str, x: Any, g: Any, k: int, tau: float) -> Case:
        """The timed callable for one operator and mode."""

    def backend_name(self) -> str:
        from topk_core._registry import get_backend

        return get_backend(self.name).name

    def phases(self, x: Any, g: Any, k: int, tau: float) -> dict[str, Callable[[], Any]]:
        """``ours`` (fwd+bwd, k scalar, no mask) split into its phases, each a synced call.

        ``select``: the ``(a, b)`` selection; ``fwd_math``: the forward after it
        (output and what the backward keeps); ``bwd_math``: the backward from
        those residuals.  Inputs are computed once, outside the timed calls.
        """
        raise NotApplicable(f"no phase split for {self.name}")


# ---------------------------------------------------------------------------
# NumPy / CuPy: no autodiff; fwd+bwd is the forward then the closed-form VJP.


class ArrayDriver(Driver):
    """NumPy (and CuPy, same code through the Array API)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtypes = ("float32", "float16", "float64")

    def _mod(self) -> Any:
        import importlib

        return importlib.import_module(self.name)

    def available(self) -> str | None:
        try:
            mod = self._mod()
            if self.name == "cupy" and mod.cuda.runtime.getDeviceCount() < 1:
                return "no CUDA device"
        except Exception as exc:  # ImportError, CUDA driver errors
            return f"{type(exc).__name__}: {exc}"
        return None

    def versions(self) -> dict[str, str]:
        out = {self.name: self._mod().__version__}
        if self.name == "numpy":
            from topk_core.backends.numpy_soft import get_num_threads

            out["numpy_threads"] = str(get_num_threads())
        return out

    def devices(self, device: str) -> bool:
        return device == ("cuda" if self.name == "cupy" else "cpu")

    def _sync(self) -> None:
        if self.name == "cupy":
            self._mod().cuda.get_current_stream().synchronize()

    def make_input(self, x_np, g_np, dtype, device):
        mod = self._mod()
        if dtype not in self.dtypes:
            raise NotApplicable(f"{self.name} has no {dtype}")
        return mod.asarray(x_np, dtype=dtype), mod.asarray(g_np, dtype=dtype)

    def build(self, op, mode, x, g, k, tau):
        import array_api_compat

        import topk_core

        from . import lapsum as ls

        mod = self._mod()
        xp = array_api_compat.array_namespace(x)
        n = x.shape[-1]
        sync = self._sync

        def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> Any:
                out = fn()
                sync()
                return out

            return run

        if op == "ours_vjp":
            return Case(op, mode, wrap(lambda: topk_core.dftopk_vjp(x, k, g, tau=tau)))
        if op in ("ours", "ours_rowk", "sort_dftopk"):
            kk = mod.full(x.shape[:-1], k, dtype=mod.int64) if op == "ours_rowk" else k
            if mode == "fwd":

                def fn():
                    return topk_core.dftopk(x, kk, tau=tau)
            else:

                def fn():
                    # one selection shared by the forward and the VJP
                    p, vjp = topk_core.dftopk_and_vjp(x, kk, tau=tau)
                    return p, vjp(g)

            if op == "ours_rowk":
                return Case(op, mode, wrap(fn))
            if op == "ours":
                return Case(op, mode, wrap(fn), memory=self._tracemalloc(fn))
            calls: list[int] = []

            def sorted_fn():
                with sort_selection(self.name) as c:
                    out = fn()
                calls.append(c[0])
                sync()
                return out

            def verify():
                if not calls or calls[-1] == 0:
                    raise NotApplicable("the backend did not use the sort selection")

            return Case(op, mode, sorted_fn, memory=self._tracemalloc(sorted_fn), verify=verify)
        if op == "lapsum":
            if mode == "fwd":

                def fn():
                    return ls.lapsum(xp, x, k, tau)
            else:

                def fn():
                    return ls.lapsum(xp, x, k, tau), ls.lapsum_vjp(xp, x, k, g, tau)

            return Case(op, mode, wrap(fn), memory=self._tracemalloc(fn))
        if op == "official":
            raise NotApplicable("no autodiff in NumPy/CuPy")
        if op == "ours_select":
            sel = _select_pair(self.name)
            return Case(op, mode, wrap(lambda: sel(xp, x, k)))
        if op == "hard":
            # one kth: numpy's SIMD quickselect (shared/measurements: 2-kth is slower)
            return Case(op, mode, wrap(lambda: mod.partition(x, n - k, axis=-1)[..., n - k]))
        if op == "sort":
            return Case(op, mode, wrap(lambda: mod.sort(x, axis=-1)))
        if op == "elementwise":
            return Case(op, mode, wrap(lambda: x * 2))
        raise NotApplicable(op)

    def phases(self, x, g, k, tau):
        from topk_core import _api
        from topk_core._problem import prepare

        sync = self._sync
        pb = prepare(x, k, tau, -1, None, True)
        # as the public fwd+bwd call selects (a backend may hand over tie candidates)
        a, b = _api.select(pb, candidates=True)
        gl = pb.in_layout(g, "cotangent")
        _, res = _api.soft_forward(pb, a, b, "probs", keep=True)

        def timed(fn):
            def run():
                out = fn()
                sync()
                return out

            return run

        return {
            "select": timed(lambda: _api.select(pb, candidates=True)),
            "fwd_math": timed(lambda: _api.soft_forward(pb, a, b, "probs", keep=True)),
            "bwd_math": timed(lambda: _api.soft_backward(pb, res, gl)),
        }

    def _tracemalloc(self, fn: Callable[[], Any]) -> Callable[[], dict[str, Any]] | None:
        if self.name != "numpy":
            return None

        def memory() -> dict[str, Any]:
            import tracemalloc

            # NumPy reports its data allocations to tracemalloc
            tracemalloc.start()
            try:
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
                out = fn()
                peak = tracemalloc.get_traced_memory()[1] - base
                del out
            finally:
                tracemalloc.stop()
            return {"saved_bytes": None, "peak_bytes": peak, "peak_kind": "tracemalloc peak"}

        return memory


# ---------------------------------------------------------------------------
# PyTorch


class TorchDriver(Driver):
    name = "torch"
    dtypes = ("float32", "float16", "bfloat16", "float64")

    def available(self):
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            return str(exc)
        return None

    def versions(self):
        import torch

        return {"torch": torch.__version__, "torch_threads": str(torch.get_num_threads())}

    def devices(self, device):
        import torch

        return device == "cpu" or (device == "cuda" and torch.cuda.is_available())

    def make_input(self, x_np, g_np, dtype, device):
        import torch

        dt = getattr(torch, dtype)
        return (
            torch.as_tensor(x_np).to(device=device, dtype=dt),
            torch.as_tensor(g_np).to(device=device, dtype=dt),
        )

    def build(self, op, mode, x, g, k, tau):
        import torch

        import topk_core

        from . import lapsum as ls

        n = x.shape[-1]
        cuda = x.device.type == "cuda"

        def sync():
            if cuda:
                torch.cuda.synchronize()

        def official(t):
            # the official code: the k-th and (k+1)-th largest via kthvalue on -x
            a = -torch.kthvalue(-t, k, dim=-1, keepdim=True).values
            b = -torch.kthvalue(-t, k + 1, dim=-1, keepdim=True).values
            z = t - (a + b) / 2
            if tau != 1:
                z = z / tau
            return torch.sigmoid(z)

        calls: list[int] = []

        def sort_dftopk(t):
            with sort_selection("torch") as c:
                out = topk_core.dftopk(t, k, tau=tau)
            calls.append(c[0])
            return out

        k_rows = torch.full(x.shape[:-1], k, dtype=torch.int64, device=x.device)
        fns = {
            "ours": lambda t: topk_core.dftopk(t, k, tau=tau),
            "ours_rowk": lambda t: topk_core.dftopk(t, k_rows, tau=tau),
            "official": official,
            "lapsum": lambda t: ls.lapsum_torch(t, k, tau),
            "sort_dftopk": sort_dftopk,
        }
        if op == "ours_vjp":

            def run():
                out = topk_core.dftopk_vjp(x, k, g, tau=tau)
                sync()
                return out

            return Case(op, mode, run)
        if op in fns:
            f = fns[op]
            if mode == "fwd":

                def run():
                    with torch.no_grad():
                        out = f(x)
                    sync()
                    return out
            else:

                def run():
                    xr = x.detach().requires_grad_(True)
                    p = f(xr)
                    p.backward(g)
                    sync()
                    return p, xr.grad

            verify = None
            if op == "sort_dftopk":

                def verify():
                    if not calls or calls[-1] == 0:
                        raise NotApplicable("the torch backend bypasses select_pair")

            memory = None
            if mode == "fwd+bwd" and op != "ours_rowk":
                memory = self._memory(f, x, g, cuda)
            return Case(op, mode, run, memory=memory, verify=verify)
        if op == "ours_select":
            import array_api_compat

            xp = array_api_compat.array_namespace(x)
            sel = _select_pair("torch")

            def run():
                out = sel(xp, x, k)
                sync()
                return out

            return Case(op, mode, run)
        if op == "hard":

            def run():
                # one kthvalue: fastest k-th value primitive measured on CPU
                out = torch.kthvalue(x, n - k + 1, dim=-1).values
                sync()
                return out

            return Case(op, mode, run)
        if op == "sort":

            def run():
                out = torch.sort(x, dim=-1).values
                sync()
                return out

            return Case(op, mode, run)
        if op == "elementwise":

            def run():
                out = x * 2
                sync()
                return out

            return Case(op, mode, run)
        raise NotApplicable(op)

    def phases(self, x, g, k, tau):
        import torch
        from topk_core.adapters import torch_adapter as ta
        from topk_core.backends.torch_backend import select_pair_and_candidates

        cuda = x.device.type == "cuda"

        def timed(fn):
            def run():
                with torch.no_grad():
                    out = fn()
                if cuda:
                    torch.cuda.synchronize()
                return out

            return run

        # what the autograd Function runs: the selection (and, on the sampled path, the
        # positions that hold the ties), the forward math, the backward from what it saved
        with torch.no_grad():
            a, b, cand = select_pair_and_candidates(x, k)
            out = ta.forward_math(x, a, b, tau, None, "probs")
        return {
            "select": timed(lambda: select_pair_and_candidates(x, k)),
            "fwd_math": timed(lambda: ta.forward_math(x, a, b, tau, None, "probs")),
            "bwd_math": timed(
                lambda: ta.backward_math(
                    "probs", x, a, b, out, g, tau, None, False, candidates=cand
                )
            ),
        }

    @staticmethod
    def _memory(f, x, g, cuda):
        def memory():
            import torch

            seen: dict[Any, int] = {}

            def pack(t):
                # count each storage once (x itself is saved by several nodes)
                try:
                    key = (t.untyped_storage().data_ptr(), t.device.type)
                    seen[key] = t.untyped_storage().nbytes()
                except Exception:
                    seen[id(t)] = t.element_size() * t.numel()
                return t

            xr = x.detach().requires_grad_(True)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                p = f(xr)
            p.backward(g)
            peak = None
            if cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            return {
                "saved_bytes": int(sum(seen.values())),
                "peak_bytes": peak,
                "peak_kind": "cuda max_memory_allocated" if cuda else "n/a on CPU",
            }

        return memory


# ---------------------------------------------------------------------------
# JAX: every operator is one jitted function with k static.


class JaxDriver(Driver):
    name = "jax"
    dtypes = ("float32", "float16", "bfloat16", "float64")

    def available(self):
        try:
            import jax  # noqa: F401
        except ImportError as exc:
            return str(exc)
        return None

    def versions(self):
        import jax
        import jaxlib

        return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}

    def devices(self, device):
        import jax

        platform = "cpu" if device == "cpu" else "gpu"
        try:
            return len(jax.devices(platform)) > 0
        except RuntimeError:
            return False

    def make_input(self, x_np, g_np, dtype, device):
        import jax
        import jax.numpy as jnp

        if dtype == "float64" and not jax.config.jax_enable_x64:
            raise NotApplicable("float64 needs JAX_ENABLE_X64=1")
        dev = jax.devices("cpu" if device == "cpu" else "gpu")[0]
        dt = getattr(jnp, dtype)
        return (
            jax.device_put(jnp.asarray(x_np, dtype=dt), dev),
            jax.device_put(jnp.asarray(g_np, dtype=dt), dev),
        )

    def build(self, op, mode, x, g, k, tau):
        import jax
        import jax.numpy as jnp

        import topk_core

        from . import lapsum as ls

        def official(t):
            # the official (TensorFlow) code's form: top_k(k + 1), autodiff through it
            vals = jax.lax.top_k(t, k + 1)[0]
            z = t - (vals[..., k - 1 : k] + vals[..., k : k + 1]) / 2
            if tau != 1:
                z = z / tau
            return jax.nn.sigmoid(z)

        k_rows = jnp.full(x.shape[:-1], k, dtype=jnp.int32)
        fns = {
            "ours": lambda t: topk_core.dftopk(t, k, tau=tau),
            "ours_rowk": lambda t: topk_core.dftopk(t, k_rows, tau=tau),
            "official": official,
            "lapsum": lambda t: ls.lapsum_jax(t, k, tau),
            "sort_dftopk": _jax_sort_dftopk(k, tau),
        }
        if op == "ours_vjp":
            return Case(
                op, mode, lambda: jax.block_until_ready(topk_core.dftopk_vjp(x, k, g, tau=tau))
            )
        if op in fns:
            f = fns[op]
            if mode == "fwd":
                jf = jax.jit(f)
            else:

                def fb(t):
                    p, pull = jax.vjp(f, t)
                    return p, pull(g)[0]

                jf = jax.jit(fb)
            verify = None

            def run():
                return jax.block_until_ready(jf(x))

            memory = None
            if mode == "fwd+bwd" and op != "ours_rowk":
                memory = self._memory(f, fb, x)
            return Case(op, mode, run, memory=memory, verify=verify)
        if op == "ours_select":
            sel = _select_pair("jax")
            jf = jax.jit(lambda t: sel(jnp, t, k))
        elif op == "hard":
            jf = jax.jit(lambda t: jax.lax.top_k(t, k)[0][..., k - 1])
        elif op == "sort":
            jf = jax.jit(lambda t: jnp.sort(t, axis=-1))
        elif op == "elementwise":
            jf = jax.jit(lambda t: t * 2)
        else:
            raise NotApplicable(op)

        def run():
            return jax.block_until_ready(jf(x))

        return Case(op, mode, run)

    def phases(self, x, g, k, tau):
        import jax
        import jax.numpy as jnp
        from topk_core.adapters import jax_adapter as ja
        from topk_core.backends.jax_backend import select_pair_counts

        tau_arg = None if tau == 1.0 else jnp.asarray(tau, dtype=jnp.float32)
        # what the adapter runs: the selection also returns the tie counts
        sel = jax.jit(lambda t: select_pair_counts(t, k))
        fwd = jax.jit(lambda t, a, b, tt, c: ja.forward_math("probs", t, a, b, tt, None, counts=c))
        bwd = jax.jit(lambda res, gg: ja.backward_math("probs", res, gg))
        a, b, *counts = sel(x)
        counts = tuple(counts)
        _, res = fwd(x, a, b, tau_arg, counts)
        return {
            "select": lambda: jax.block_until_ready(sel(x)),
            "fwd_math": lambda: jax.block_until_ready(fwd(x, a, b, tau_arg, counts)),
            "bwd_math": lambda: jax.block_until_ready(bwd(res, g)),
        }

    @staticmethod
    def _memory(f, fb, x):
        def memory():
            import jax

            # residuals jax.vjp keeps for the backward pass (the vjp function's leaves)
            _, pull = jax.vjp(jax.jit(f), x)
            saved = sum(int(leaf.nbytes) for leaf in jax.tree_util.tree_leaves(pull))
            peak = None
            try:
                ma = jax.jit(fb).lower(x).compile().memory_analysis()
                peak = int(ma.temp_size_in_bytes + ma.output_size_in_bytes)
            except Exception:
                pass
            return {
                "saved_bytes": saved,
                "peak_bytes": peak,
                "peak_kind": "XLA temp+output bytes of jit(fwd+bwd)",
            }

        return memory


def _jax_sort_dftopk(k: int, tau: float) -> Callable[[Any], Any]:
    """DFTopK on JAX with ``(a, b)`` from a full sort and the spec's closed-form VJP.

    Built here from ``topk_core._math`` (the project's one copy of the formulas)
    rather than by swapping the jax adapter's selection: the adapter caches its
    traced functions, so a swap would not reliably take effect.
    """
    import jax
    import jax.numpy as jnp

    from topk_core import _math

    def parts(x):
        a, b = sort_select(jnp, x, k)
        a = jax.lax.stop_gradient(a)
        b = jax.lax.stop_gradient(b)
        return a, b, _math.logits(jnp, x, a, b, tau, None)

    @jax.custom_vjp
    def f(x):
        return _math.sigmoid(jnp, parts(x)[2])

    def fwd(x):
        a, b, z = parts(x)
        return _math.sigmoid(jnp, z), (x, a, b, z)

    def bwd(res, g):
        x, a, b, z = res
        return (_math.vjp(jnp, x, a, b, z, g, tau, None, "probs")[0],)

    f.defvjp(fwd, bwd)
    return f


_DRIVERS: dict[str, Driver] = {}


def get_driver(name: str) -> Driver:
    """The driver for backend ``name`` (one of :data:`BACKENDS`)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name not in _DRIVERS:
        _DRIVERS[name] = {
            "numpy": lambda: ArrayDriver("numpy"),
            "cupy": lambda: ArrayDriver("cupy"),
            "torch": TorchDriver,
            "jax": JaxDriver,
        }[name]()
    return _DRIVERS[name]


def available_backends() -> dict[str, str | None]:
    """``{backend: None if usable else why not}`` for every known backend."""
    return {name: get_driver(name).available() for name in BACKENDS}
