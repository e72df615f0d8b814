"""Independent float64 reference of DFTopK, written from the spec.

Row by row with a full sort and plain Python: slow and obviously correct.  It
shares no code with topk_core so that agreement with it means something.

NaN rule: a NaN entry ranks first (above ``+inf``; for ``largest=False``,
which is ``-x``, below ``-inf``), its own ``p`` is NaN, a NaN k-th or
(k+1)-th value makes the row's threshold NaN, and for gradients a NaN entry
is a constant: it keeps its own term and stays out of the row sums.
"""

from __future__ import annotations

import math

import numpy as np


def _rows(x, axis):
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    return x, x.reshape(-1, x.shape[-1])


def _rank_key(v):
    """Descending rank order of the spec: NaN first (above +inf), then by value."""
    return (0, 0.0) if math.isnan(v) else (1, -v)


def _pair(row, valid, k):
    vals = sorted((v for v, m in zip(row, valid) if m), key=_rank_key)
    ext = [math.inf, *vals, -math.inf]
    k = min(max(int(k), 0), len(vals))
    return ext[k], ext[k + 1]


def _z(xv, a, b, tau):
    def half(d1, d2):  # (x - a)/2 with inf - inf := 0
        return 0.0 if d1 == d2 else d1 / 2 - d2 / 2

    if math.isnan(xv):
        return math.nan
    return (half(xv, a) + half(xv, b)) / tau


def _sig(z):
    if math.isnan(z):
        return math.nan
    if z >= 0:
        return 1 / (1 + math.exp(-z))
    e = math.exp(z)
    return e / (1 + e)


def _broadcast(v, shape, axis, default):
    if v is None:
        return np.full(shape, default)
    v = np.broadcast_to(np.asarray(v), shape)
    return np.moveaxis(v, axis, -1).reshape(-1, shape[axis])


def _k_rows(k, shape, axis):
    batch = shape[:axis] + shape[axis + 1 :]
    return np.broadcast_to(np.asarray(k), batch).reshape(-1)


def ref_parts(x, k, tau=1.0, axis=-1, mask=None, largest=True):
    """Per-row (a, b), z and the weights w, in the moved layout (rows, n)."""
    x = np.asarray(x, dtype=np.float64)
    shape = x.shape
    axis = axis % x.ndim
    _, rows = _rows(x if largest else -x, axis)
    valid = _broadcast(mask, shape, axis, True).reshape(rows.shape)
    taus = _broadcast(tau, shape, axis, 1.0).reshape(rows.shape).astype(np.float64)
    ks = _k_rows(k, shape, axis)
    z = np.empty_like(rows)
    w = np.zeros_like(rows)
    ab = []
    for r in range(rows.shape[0]):
        a, b = _pair(rows[r], valid[r], ks[r])
        ab.append((a, b))
        for i, xv in enumerate(rows[r]):
            z[r, i] = _z(xv, a, b, taus[r, i]) if valid[r, i] else -math.inf
        for val in (a, b):
            if math.isfinite(val):
                hits = [i for i, xv in enumerate(rows[r]) if valid[r, i] and xv == val]
                for i in hits:
                    w[r, i] += 0.5 / len(hits)
    return rows, valid, taus, z, w, ab


def _restore(v, x_shape, axis):
    moved = list(x_shape)
    moved.append(moved.pop(axis))
    return np.moveaxis(v.reshape(moved), -1, axis)


def ref_dftopk(x, k, tau=1.0, axis=-1, mask=None, largest=True, output="probs"):
    x = np.asarray(x, dtype=np.float64)
    _, _, _, z, _, _ = ref_parts(x, k, tau, axis, mask, largest)
    out = z if output == "logits" else np.vectorize(_sig)(z)
    return _restore(out, x.shape, axis % x.ndim)


def ref_threshold(x, k, axis=-1, mask=None, largest=True):
    x = np.asarray(x, dtype=np.float64)
    _, _, _, _, _, ab = ref_parts(x, k, 1.0, axis, mask, largest)
    th = np.array([0.0 if a == -b else a / 2 + b / 2 for a, b in ab])
    th = th if largest else -th
    shape = list(x.shape)
    shape[axis % x.ndim] = 1
    moved = list(shape)
    moved.append(moved.pop(axis % x.ndim))
    return np.moveaxis(th.reshape(moved), -1, axis % x.ndim)


def ref_topk_mask(x, k, axis=-1, mask=None, largest=True):
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    rows = np.moveaxis(x if largest else -x, axis, -1).reshape(-1, x.shape[axis])
    valid = _broadcast(mask, x.shape, axis, True).reshape(rows.shape)
    ks = _k_rows(k, x.shape, axis)
    out = np.zeros_like(rows)
    for r in range(rows.shape[0]):
        idx = [i for i in range(rows.shape[1]) if valid[r, i]]
        # stable sort in rank order (NaN first): lower index first among ties
        idx.sort(key=lambda i: _rank_key(rows[r, i]))
        for i in idx[: max(0, min(int(ks[r]), len(idx)))]:
            out[r, i] = 1.0
    return _restore(out, x.shape, axis)


def ref_vjp(x, k, g, tau=1.0, axis=-1, mask=None, largest=True, output="probs"):
    """(grad_x, grad_tau_elementwise) from the spec's closed form, float64."""
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    rows, valid, taus, z, w, _ = ref_parts(x, k, tau, axis, mask, largest)
    g = np.moveaxis(np.asarray(g, dtype=np.float64), axis, -1).reshape(rows.shape)
    # sigmoid(z) sigmoid(-z), not p (1 - p): relatively exact where p rounds to 1
    sig = np.vectorize(_sig)
    dp = sig(z) * sig(-z) if output == "probs" else np.ones_like(z)
    s = np.where(valid, g * dp / taus, 0.0)
    # NaN rule: a NaN entry keeps its own term but is a constant for the rest of the row
    nan = np.isnan(rows)
    gx = s - np.where(nan, 0.0, s).sum(-1, keepdims=True) * w
    # masked entries: exactly 0, also where a NaN threshold made the row sum NaN (NaN * 0)
    gx = np.where(valid, gx, 0.0)
    t = np.where(nan, 0.0, -s * np.where(np.isinf(z), 0.0, z))  # infinite z: no tau effect
    if not largest:
        gx = -gx
    return _restore(gx, x.shape, axis), _restore(t, x.shape, axis)


def finite_difference(f, x, u, eps=1e-6):
    """Central difference of f along direction u (float64)."""
    return (f(x + eps * u) - f(x - eps * u)) / (2 * eps)
