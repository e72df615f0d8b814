"""The DFTopK math, once, against the Array API.

Every function here works on *normalised* inputs: the selection axis is last,
``largest=False`` has already been turned into ``largest=True`` by negating
``x``, and ``a``/``b``/``tau`` broadcast against ``x``.  The public API
(:mod:`topk_core._api`) and the framework adapters both call these, so the
formulas exist in exactly one place.

Notation (per row): ``a`` = k-th largest valid value, ``b`` = (k+1)-th,
``theta = a/2 + b/2``, ``z = (x - theta) / tau``, ``p = sigmoid(z)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Array = Any

__all__ = [
    "MASKED",
    "TIE_A",
    "TIE_B",
    "SoftResiduals",
    "compute_dtype",
    "logits",
    "row_sum",
    "sigmoid",
    "sigmoid_grad",
    "soft_backward",
    "soft_forward",
    "threshold",
    "tie_weights",
    "jvp",
    "jvp_from_code",
    "tie_code",
    "vjp",
    "vjp_from_s",
]


def row_sum(xp: Any, v: Array) -> Array:
    """Per-row sum over the selection axis (last), axis kept.

    Every reduction over the selection axis in the math goes through here
    (``sum(s)`` of the VJP, the tie counts and the JVP's tie sums), so a
    selection axis split across devices needs its collective in one place.
    """
    return xp.sum(v, axis=-1, keepdims=True)


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """Dtype for the elementwise math: half types are computed in float32."""
    if dtype == xp.float32 or dtype == xp.float64:
        return dtype
    return xp.float32


def threshold(xp: Any, a: Array, b: Array) -> Array:
    """``theta = a/2 + b/2``; the halved form cannot overflow where ``(a+b)/2`` does.

    ``a = -b`` gives exactly 0, also for ``a = +inf, b = -inf`` (the limit of
    ``M/2 - M/2``), without ever evaluating ``inf - inf``.
    """
    opposite = a == -b
    zero = xp.zeros_like(a)
    return xp.where(opposite, zero, a / 2) + xp.where(opposite, zero, b / 2)


def logits(
    xp: Any,
    x: Array,
    a: Array,
    b: Array,
    tau: float | Array,
    valid: Array | None,
    *,
    eager: bool = False,
) -> Array:
    """``z = (x - theta) / tau``; masked entries ``-inf``.

    Infinite entries follow the spec's limit rule: ``z = ((x-a) + (x-b)) / 2tau``
    with ``inf - inf`` taken as 0.  Where ``theta`` is finite the plain formula
    already gives that; rows with an infinite ``a`` or ``b`` (sentinels or
    genuine infinities) take their values, all 0 or +-inf, from comparisons.
    Eager backends skip that branch when no row needs it.
    """
    theta = threshold(xp, a, b)
    # None: unknown (lazy/traced backends), so the infinite-row branch always runs
    finite = bool(xp.all(xp.isfinite(theta))) if eager else None
    if not finite:
        # keep inf - inf out of the arithmetic (no NaN, no warnings)
        theta_ok = xp.isfinite(theta)
        theta = xp.where(theta_ok, theta, xp.zeros_like(theta))
    # halves first: |x/2 - theta/2| cannot overflow, so z only overflows when it truly exceeds
    # the dtype's range (x - theta can reach twice the largest float)
    z = x * 0.5 - theta * 0.5
    if isinstance(tau, float) and tau == 1.0:
        z = z * 2.0
    elif isinstance(tau, float) and tau < 1e-37:
        z = z / tau * 2.0  # tau/2 could flush to 0 in float32
    else:
        z = z / (tau * 0.5)
    if not finite:
        inf = xp.asarray(xp.inf, dtype=z.dtype)
        zero = xp.asarray(0.0, dtype=z.dtype)
        # rows with an infinite a or b: every z is 0 or +-inf
        z_inf = xp.where(
            x == inf,
            xp.where(b == inf, zero, inf),
            xp.where(
                x == -inf,
                xp.where(a == -inf, zero, -inf),
                xp.where(a == inf, -inf, inf),
            ),
        )
        z_inf = xp.where(
            xp.isnan(x) | xp.isnan(a) | xp.isnan(b), xp.asarray(xp.nan, dtype=z.dtype), z_inf
        )
        z = xp.where(theta_ok, z, z_inf)
    if valid is not None:
        z = xp.where(valid, z, xp.asarray(-xp.inf, dtype=z.dtype))
    return z


def sigmoid(xp: Any, z: Array) -> Array:
    """Stable logistic ``exp(min(z, 0)) / (1 + exp(-|z|))``.

    Never exponentiates a positive number and keeps relative accuracy in both
    tails.  Branch-free on purpose: a ``where`` on the sign of random scores
    costs eager NumPy more than both exponentials (branch mispredictions).
    """
    return xp.exp(xp.minimum(z, xp.zeros_like(z))) / (1 + xp.exp(-xp.abs(z)))


def sigmoid_grad(xp: Any, z: Array) -> Array:
    """``p * (1 - p)`` as ``e / (1 + e)^2`` with ``e = exp(-|z|)``: no cancellation."""
    e = xp.exp(-xp.abs(z))
    r = 1 / (1 + e)
    return e * r * r


def tie_weights(
    xp: Any, x: Array, a: Array, b: Array, valid: Array | None
) -> tuple[Array, Array, Array, Array]:
    """Entries tied with ``a`` / ``b`` and their per-row weights.

    Returns ``(eq_a, eq_b, wa, wb)``: boolean masks of the valid entries equal
    to ``a`` and to ``b``, and the per-row weight each such entry carries
    (``1/2`` split evenly among the ties; 0 for an infinite ``a`` or ``b``).
    The spec's ``w`` is ``eq_a * wa + eq_b * wb``.
    """
    eq_a = x == a
    eq_b = x == b
    if valid is not None:
        eq_a = eq_a & valid
        eq_b = eq_b & valid
    dtype = a.dtype if xp.isdtype(a.dtype, "real floating") else xp.float32
    ca = row_sum(xp, xp.astype(eq_a, dtype))
    cb = row_sum(xp, xp.astype(eq_b, dtype))
    zero = xp.asarray(0.0, dtype=dtype)
    one = xp.asarray(1.0, dtype=dtype)
    wa = xp.where(xp.isfinite(a) & (ca > 0), 0.5 / xp.maximum(ca, one), zero)
    wb = xp.where(xp.isfinite(b) & (cb > 0), 0.5 / xp.maximum(cb, one), zero)
    return eq_a, eq_b, wa, wb


def _apply_w(xp: Any, eq_a: Array, eq_b: Array, wa: Array, wb: Array, scale: Array) -> Array:
    """``scale * w`` elementwise (``scale`` per row)."""
    zero = xp.asarray(0.0, dtype=scale.dtype)
    return xp.where(eq_a, scale * wa, zero) + xp.where(eq_b, scale * wb, zero)


def vjp(
    xp: Any,
    x: Array,
    a: Array,
    b: Array,
    z: Array,
    g: Array,
    tau: float | Array,
    valid: Array | None,
    output: str = "probs",
) -> tuple[Array, Array]:
    """Closed-form VJP of ``p = sigmoid(z)`` (or of ``z`` itself).

    Returns ``(grad_x, t)`` where ``t`` is the elementwise contribution to the
    gradient of ``tau``: ``grad_tau = sum(t)`` reduced to tau's shape.
    ``grad_x = s - sum(s) * w`` with ``s = g * p (1 - p) / tau`` (``g / tau``
    for logits).
    """
    zero = xp.asarray(0.0, dtype=z.dtype)
    s = g * sigmoid_grad(xp, z) if output == "probs" else g
    s, grad_x = vjp_from_s(xp, x, a, b, s, tau, valid)
    # dz/dtau = -z/tau; infinite z (masked, or infinite x) stays infinite whatever tau is,
    # so those entries contribute 0
    t = -s * xp.where(xp.isfinite(z), z, zero)
    return grad_x, t


def vjp_from_s(
    xp: Any, x: Array, a: Array, b: Array, s: Array, tau: float | Array, valid: Array | None
) -> tuple[Array, Array]:
    """``grad_x = s - sum(s) * w`` from ``s = g * dout/dz`` (not yet divided by tau).

    Returns ``(s / tau with masked entries 0, grad_x)``.  Split out of :func:`vjp`
    so that an adapter with a cheaper ``g * p (1 - p)`` (e.g. from a saved output)
    reuses the threshold term instead of restating it.
    """
    if not (isinstance(tau, float) and tau == 1.0):
        s = s / tau
    if valid is not None:
        s = xp.where(valid, s, xp.asarray(0.0, dtype=s.dtype))
    total = row_sum(xp, s)
    eq_a, eq_b, wa, wb = tie_weights(xp, x, a, b, valid)
    wa = xp.astype(wa, s.dtype)
    wb = xp.astype(wb, s.dtype)
    return s, s - _apply_w(xp, eq_a, eq_b, wa, wb, total)


def jvp(
    xp: Any,
    x: Array,
    a: Array,
    b: Array,
    z: Array,
    u: Array,
    tau: float | Array,
    tau_tangent: Array | None,
    valid: Array | None,
    output: str = "probs",
) -> Array:
    """Closed-form JVP: ``dz = (u - w.u) / tau - z dtau / tau``; ``dp = p(1-p) dz``."""
    zero = xp.asarray(0.0, dtype=z.dtype)
    if valid is not None:
        u = xp.where(valid, u, zero)
    eq_a, eq_b, wa, wb = tie_weights(xp, x, a, b, valid)
    dtheta = xp.astype(wa, z.dtype) * row_sum(xp, xp.where(eq_a, u, zero))
    dtheta = dtheta + xp.astype(wb, z.dtype) * row_sum(xp, xp.where(eq_b, u, zero))
    dz = u - dtheta
    if not (isinstance(tau, float) and tau == 1.0):
        dz = dz / tau
    if tau_tangent is not None:
        dz = dz - xp.where(xp.isfinite(z), z, zero) * (tau_tangent / tau)
    if valid is not None:
        dz = xp.where(valid, dz, zero)
    if output == "probs":
        return sigmoid_grad(xp, z) * dz
    return dz


@dataclass
class SoftResiduals:
    """What the generic backward needs from the forward (normalised layout, compute dtype).

    ``z`` are the logits (masked entries ``-inf``); ``d`` is ``p (1 - p)`` for
    ``output="probs"`` (None for logits, or where the backward recomputes it
    from ``z``).
    """

    x: Array
    a: Array
    b: Array
    z: Array
    d: Array | None
    output: str


def soft_forward(
    xp: Any,
    x: Array,
    a: Array,
    b: Array,
    tau: float | Array,
    valid: Array | None,
    output: str,
    *,
    keep: bool,
    eager: bool = False,
    native_sigmoid: Any = None,
) -> tuple[Array, SoftResiduals | None]:
    """The forward after the selection: ``(out, residuals)`` in the compute dtype.

    ``out`` is ``p`` (or ``z`` for logits) and never aliases the residuals;
    the residuals are None unless ``keep``.
    """
    z = logits(xp, x, a, b, tau, valid, eager=eager)
    if output == "logits":
        if not keep:
            return z, None
        return xp.asarray(z, copy=True), SoftResiduals(x, a, b, z, None, output)
    if not keep:
        return (native_sigmoid(z) if native_sigmoid is not None else sigmoid(xp, z)), None
    # the backward's p (1 - p) from the forward's one exponential: none recomputed
    p, d = sigmoid_and_grad(xp, z)
    return p, SoftResiduals(x, a, b, z, d, output)


def sigmoid_and_grad(xp: Any, z: Array) -> tuple[Array, Array]:
    """``(p, p (1 - p))`` from one exponential ``e = exp(-|z|)``, both tails relatively exact."""
    e = xp.exp(-xp.abs(z))
    r = 1 / (1 + e)
    er = e * r
    return xp.where(z >= 0, r, er), er * r


def soft_backward(
    xp: Any, res: SoftResiduals, g: Array, tau: float | Array, valid: Array | None
) -> tuple[Array, Array]:
    """Closed-form VJP from the residuals: ``(grad_x, t)`` as :func:`vjp` returns them."""
    zero = xp.asarray(0.0, dtype=res.z.dtype)
    if res.d is not None:
        s = g * res.d
    elif res.output == "probs":
        s = g * sigmoid_grad(xp, res.z)
    else:
        s = g
    s, grad_x = vjp_from_s(xp, res.x, res.a, res.b, s, tau, valid)
    t = -s * xp.where(xp.isfinite(res.z), res.z, zero)
    return grad_x, t


# tie code bits (int8, per entry): tied with a, tied with b, masked out
TIE_A, TIE_B, MASKED = 1, 2, 4


def tie_code(
    xp: Any, x: Array, a: Array, b: Array, valid: Array | None
) -> tuple[Array, Array, Array]:
    """The tie weights as one int8 per entry plus two per row: ``(code, wa, wb)``.

    ``code`` has bit :data:`TIE_A` on the valid entries equal to ``a``,
    :data:`TIE_B` on those equal to ``b`` and :data:`MASKED` on the masked
    ones; ``wa``/``wb`` as in :func:`tie_weights`.  A compact residual for a
    linearised JVP (:func:`jvp_from_code`): 1 byte per entry instead of ``x``.
    """
    eq_a, eq_b, wa, wb = tie_weights(xp, x, a, b, valid)
    i8 = xp.int8
    code = xp.astype(eq_a, i8) + xp.astype(eq_b, i8) * xp.asarray(TIE_B, dtype=i8)
    if valid is not None:
        code = code + xp.astype(~valid, i8) * xp.asarray(MASKED, dtype=i8)
    return code, wa, wb


def jvp_from_code(
    xp: Any,
    code: Array,
    wa: Array,
    wb: Array,
    scale: Array,
    u: Array,
    z_dtau: Array | None = None,
) -> Array:
    """The closed-form JVP from :func:`tie_code`'s residuals, linear in ``u`` and ``z_dtau``.

    ``scale * ((u - w.u) - z dtau)`` on the valid entries, 0 on the masked
    ones, with ``scale = p (1 - p) / tau`` (``1 / tau`` for logits) and
    ``z_dtau = z * dtau`` (finite ``z`` only; None for a constant ``tau``):
    the same tangent as :func:`jvp`.
    """
    zero_u = xp.zeros_like(u)
    ok = (code & xp.asarray(MASKED, dtype=code.dtype)) == 0
    u = xp.where(ok, u, zero_u)
    on_a = (code & xp.asarray(TIE_A, dtype=code.dtype)) != 0
    on_b = (code & xp.asarray(TIE_B, dtype=code.dtype)) != 0
    dtheta = xp.astype(wa, u.dtype) * row_sum(xp, xp.where(on_a, u, zero_u))
    dtheta = dtheta + xp.astype(wb, u.dtype) * row_sum(xp, xp.where(on_b, u, zero_u))
    dz = u - dtheta
    if z_dtau is not None:
        dz = dz - z_dtau
    return xp.where(ok, scale * dz, zero_u)
