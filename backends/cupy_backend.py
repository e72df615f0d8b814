"""CuPy backend: O(n) radix selection on the GPU and fused elementwise kernels.

Loaded by the registry only when a CuPy array is passed; ``cupy`` itself is
imported inside the functions, so this module imports (and its kernel sources
can be checked) without CuPy or a GPU.

Selection: ``cupy.partition`` only has a fast path for small k-th-smallest
positions and otherwise runs a full thrust sort, so ``(a, b)`` come from the
shared radix-select driver (:mod:`topk_core._radix`), the very code NumPy runs
for per-row k and masks (tested there on every CI run), with the NumPy shims
pointed at ``cupy``: a ``.view`` bitcast and one ``cupy.bincount`` over
``row * nbins + digit`` per pass.  On the GPU the shims send inactive entries
to a spare bin instead of compressing them (``compress=False``), so no pass
has a data-dependent size.  Scalar and per-row k, masks, any axis,
float16/float32/float64: 4 (float16: 2, float64: 8) passes of 8-bit digits.

Elementwise: the forward (``apply``) runs the selection, then ONE fused kernel
for ``z = (x - theta) / tau`` with the spec's infinity rules and mask, plus the
stable sigmoid, mirroring :func:`topk_core._math.logits` /
:func:`topk_core._math.sigmoid` line by line.  The VJP/JVP go through
:mod:`topk_core._math` with CuPy arrays: the generic ``soft`` math (no
``Backend.soft`` hook here), whose forward keeps ``p (1 - p)`` from its one
exponential so that the backward recomputes none (several elementwise passes
and two per-row sums; fused CuPy kernels for them would plug into
``Backend.soft`` and are not written: nothing here can run them).

NOT verified on a GPU: no GPU was available when this was written.  The kernel
bodies are compiled and checked on the CPU as C (conformance_tests/project/test_cupy.py).
"""

from __future__ import annotations

from typing import Any

from topk_core._radix import radix_select_pair
from topk_core._registry import Backend

from .numpy_backend import NumpyShims

__all__ = [
    "BACKEND",
    "DIGIT_BITS",
    "FORWARD_PARAMS",
    "LOGITS_BODY",
    "SIGMOID_BODY",
    "apply",
    "forward_body",
    "select_pair",
    "shims",
    "sigmoid",
]

DIGIT_BITS = 8  # 256 bins per row: small shared histograms, 4 passes for float32

# ``z`` from x, a, b, tau and the mask, as in topk_core._math.logits (T is the
# compute dtype).  Infinities and NaN are taken from the inputs (``neg_inf`` is
# passed in), so the source needs no device-specific constants.
LOGITS_BODY = """
T theta = (a == -b) ? (T)0 : (a / (T)2 + b / (T)2);
T z;
if (isfinite(theta)) {
    z = (x - theta) / tau;
} else if (isnan(x) || isnan(a) || isnan(b)) {
    z = x + a + b;
} else if (isinf(x) && x > (T)0) {
    z = (isinf(b) && b > (T)0) ? (T)0 : x;
} else if (isinf(x) && x < (T)0) {
    z = (isinf(a) && a < (T)0) ? (T)0 : x;
} else {
    z = (isinf(a) && a > (T)0) ? -a : -b;
}
if (!valid) {
    z = neg_inf;
}
"""

# stable logistic, as topk_core._math.sigmoid
SIGMOID_BODY = """
T e = exp(-fabs(z));
T r = (T)1 / ((T)1 + e);
out = (z >= (T)0) ? r : e * r;
"""

FORWARD_PARAMS = "T x, T a, T b, T tau, bool valid, T neg_inf"


def forward_body(output: str) -> str:
    """Kernel body of the fused forward: ``z``, then ``out = z`` or ``sigmoid(z)``."""
    if output == "logits":
        return LOGITS_BODY + "out = z;\n"
    if output == "probs":
        return LOGITS_BODY + SIGMOID_BODY
    raise ValueError(f"output must be 'probs' or 'logits', got {output!r}")


_KERNELS: dict[str, Any] = {}
_SHIMS: list[NumpyShims] = []


def _cupy() -> Any:
    import cupy

    return cupy


def shims() -> NumpyShims:
    """The radix shims for CuPy (created on first use)."""
    if not _SHIMS:
        _SHIMS.append(NumpyShims(_cupy(), compress=False))
    return _SHIMS[0]


def select_pair(xp: Any, x: Any, k: Any) -> tuple[Any, Any]:
    """k-th and (k+1)-th largest along the last axis (see :class:`topk_core.Backend`)."""
    return radix_select_pair(xp, x, k, shims(), digit_bits=DIGIT_BITS)


def _kernel(name: str) -> Any:
    kern = _KERNELS.get(name)
    if kern is None:
        cp = _cupy()
        if name == "sigmoid":
            kern = cp.ElementwiseKernel("T z", "T out", SIGMOID_BODY, "topk_core_sigmoid")
        else:
            kern = cp.ElementwiseKernel(
                FORWARD_PARAMS, "T out", forward_body(name), f"topk_core_{name}"
            )
        _KERNELS[name] = kern
    return kern


def sigmoid(z: Any) -> Any:
    """Stable logistic in one kernel."""
    return _kernel("sigmoid")(z)


def apply(pb: Any, output: str, hard: bool = False) -> Any:
    """Fused forward: selection, then logits (and probabilities) in one kernel.

    ``hard=True`` (``dftopk(..., hard=True)``): the hard top-k mask, as on NumPy
    (CuPy has no autodiff, so there is no straight-through derivative to attach).
    """
    from topk_core._api import hard_forward, select

    if hard:
        return hard_forward(pb)

    cp = _cupy()
    cdt = pb.compute_dtype
    a, b = select(pb)
    x = pb.x.astype(cdt, copy=False)
    tau = pb.tau if not isinstance(pb.tau, float) else cp.asarray(pb.tau, dtype=cdt)
    valid = pb.valid if pb.valid is not None else cp.asarray(True)
    name = "probs" if output == "probs" else "logits"
    neg_inf = cp.asarray(-cp.inf, dtype=cdt)
    out = _kernel(name)(x, a.astype(cdt), b.astype(cdt), tau, valid, neg_inf)
    return out.astype(pb.dtype, copy=False)


BACKEND = Backend(name="cupy", select_pair=select_pair, sigmoid=sigmoid, apply=apply)
