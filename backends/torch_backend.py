"""PyTorch backend: O(n) selection of the k-th and (k+1)-th largest values, no NumPy.

Measured on this project's shared 2-core CPU machine (torch 2.13.0 CPU build,
2 threads, float32 normal data; one run, methods interleaved, 9 rounds, min /
median ms; the machine had a load average of 7-8 from other jobs, so medians
are noisy and only the mins compare well):

=====================  ==============  ==============  ===============
shape, k               topk(sorted=F)  kthvalue + max  sampled bracket
=====================  ==============  ==============  ===============
1e4, n/10              0.15 / 0.16     0.15 / 0.16     0.45 / 0.48
1e4, n/2               0.16 / 0.16     0.18 / 0.19     0.48 / 0.52
1e5, n/10              0.97 / 1.00     1.52 / 9.70     1.15 / 1.23
1e5, n/2               1.38 / 9.60     1.66 / 1.72     1.14 / 1.21
1e6, n/10              24.7 / 28.9     41.1 / 58.5     11.6 / 19.8
1e6, n/2               44.2 / 84.2     52.8 / 69.1     3.7 / 80.4
1e7, n/10              478 / 551       452 / 537       144 / 310
1e7, n/2               996 / 1343      1035 / 1395     339 / 645
1024 x 4096, n/10      103 / 255       216 / 288       346 / 543
1024 x 4096, n/2       216 / 279       232 / 271       456 / 512
=====================  ==============  ==============  ===============

Per-row k (random in [0, n]):

=====================  ==============  ===============
shape                  sort + gather   sampled bracket
=====================  ==============  ===============
64 x 1e5               1120 / 1174     188 / 330
1024 x 4096            852 / 999       333 / 782
4096 x 1024            489 / 707       536 / 620
=====================  ==============  ===============

(With one thread the sampled path took 57 ms on 1024 x 4096, n/10, against
77 ms for topk; with two contended threads its many small ops lose.)

So:

* scalar ``k``, plain CPU tensor in eager mode (:func:`host_ok`), rows of at
  least 2**16: the sampled bracket (:func:`_select_sampled`); otherwise
  ``torch.topk(m, sorted=False)`` on the smaller side (``m = k+1`` largest or
  ``n-k+1`` smallest) with ``a``/``b`` read off those ``m`` values by
  elementwise ops; where the backward will run (eager CPU,
  :func:`select_pair_and_candidates`), ``m + 1`` values and the positions
  ``topk`` returns, so that the backward finds the tied entries among those
  (issue 11: 1024 x 4096 fwd+bwd 30.5 -> 27 ms).  On CUDA ``kthvalue`` and
  ``topk`` are both radix selects and ``topk`` also has a multi-block path for
  one long row; that CUDA choice is NOT measured here (no GPU).
* per-row ``k`` tensor (also what a mask produces: k is clipped to each row's
  valid count): the sampled bracket on host tensors with rows of at least 2048;
  shorter host rows take one sorted ``topk`` of the ``max(k) + 1`` largest (or
  the ``max(n - k) + 1`` smallest) and gather (:func:`_select_rowk_topk`,
  issue 11: 8192 x 256 with one thread, per-row k near n/10 costs what scalar
  k does, 24 ms, where the sort took 118 ms); rows whose k straddle both
  halves, and everything graph-safe, ``torch.sort`` + gather (no host reads,
  no Python loop over rows).  The shared radix driver (:mod:`topk_core._radix`) was not wired to
  torch: it needs unsigned keys that torch supports only partly, and on the
  CPU the sampled path is already 2.5-6x faster than the sort.

The sampled bracket (Floyd-Rivest style): from a fixed, seeded stratified
sample of ~n**(2/3) positions per row, take the sample values ``hi``/``lo``
3 standard deviations of the sample rank beyond the wanted ranks; count the
entries above ``hi`` (NaN counts as above) and gather those in ``[lo, hi]``
(a variable-size compaction: free to size on the host, which is why this path
never runs on CUDA, under ``torch.compile`` or functorch); pick ``a`` and ``b``
among them exactly by rank.  Rows whose bracket misses either rank are redone
with the exact path above, so results never depend on the sample.  NaN counts
as larger than ``+inf`` on every path, like ``torch.sort``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from topk_core._registry import Backend

__all__ = ["BACKEND", "host_ok", "select_pair", "select_pair_and_candidates"]

_INF = float("inf")

# sampling (host) path, by measurement (module docstring): per-row k from rows
# of 2048, scalar k only for long rows (topk wins on batches of short rows)
_SAMPLE_MIN_N = 2048
_SAMPLE_MIN_N_SCALAR = 1 << 16
# half-width of the bracket in standard deviations of the sample rank; a row
# whose bracket misses (probability ~0.3% per row at 3 sd on random data)
# is redone exactly, so this trades bracket size against redo work only
_BRACKET_SD = 3.0
# the host path may be switched off (tests compare it with the torch-only path)
_HOST_PATH = True
_SAMPLE_CACHE: dict[tuple[int, int], torch.Tensor] = {}
_SAMPLE_SEED = 20251011


def host_ok(x: torch.Tensor) -> bool:
    """True when ``x``'s values may be read on the host at no cost.

    That is: a plain CPU tensor in eager mode.  Not while ``torch.compile``
    traces (reading values would break the graph), not for functorch-wrapped
    (``vmap``/``grad``) or fake/subclass tensors, never for CUDA (a sync).

    Examples
    --------
    >>> import torch
    >>> from topk_core.backends.torch_backend import host_ok
    >>> host_ok(torch.ones(3)), host_ok(torch.ones(3, device="meta"))
    (True, False)
    """
    if x.device.type != "cpu" or type(x) is not torch.Tensor:
        return False
    if torch.compiler.is_compiling():
        return False
    ft = torch._C._functorch
    # legacy batched tensors too: autograd's is_grads_batched (gradcheck's batched check)
    return not (ft.is_functorch_wrapped_tensor(x) or ft.is_legacy_batchedtensor(x))


def _sentinel(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full(x.shape[:-1] + (1,), value, dtype=x.dtype, device=x.device)


def _extreme_and_next(v: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the values ``v`` (last axis), the smallest and the 2nd smallest
    (``largest=True``) or the largest and the 2nd largest, counting repeats.

    NaN counts as larger than ``+inf`` (as in ``torch.sort`` and ``topk``).
    """
    nan = v.isnan()
    n_nan = nan.sum(-1, keepdim=True)
    w = torch.where(nan, _INF if largest else -_INF, v)
    if largest:
        e = w.amin(-1, keepdim=True)
        beyond = w > e
    else:
        e = w.amax(-1, keepdim=True)
        beyond = w < e
    nxt = torch.where(beyond, w, _INF if largest else -_INF)
    nxt = nxt.amin(-1, keepdim=True) if largest else nxt.amax(-1, keepdim=True)
    # a repeated extreme is its own runner-up
    repeated = (~beyond).sum(-1, keepdim=True) >= 2
    nxt = torch.where(repeated, e, nxt)
    if largest:
        # the non-NaN values are the smallest: NaN only where fewer than 1 or 2 exist
        n_real = v.shape[-1] - n_nan
        return torch.where(n_real >= 1, e, math.nan), torch.where(n_real >= 2, nxt, math.nan)
    # NaN are the largest: one is the maximum, two the runner-up as well
    return torch.where(n_nan >= 1, math.nan, e), torch.where(
        n_nan >= 2, math.nan, torch.where(n_nan == 1, e, nxt)
    )


def _select_scalar_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Graph-safe path: one ``topk`` on the smaller side (no host reads)."""
    n = x.shape[-1]
    if k == 0:
        return _sentinel(x, _INF), x.amax(-1, keepdim=True)
    if k == n:
        # amin would return NaN; NaN counts as the largest, so skip it
        low = torch.where(x.isnan(), _INF, x).amin(-1, keepdim=True)
        low = torch.where(x.isnan().all(-1, keepdim=True), math.nan, low)
        return low, _sentinel(x, -_INF)
    if k + 1 <= n - k + 1:
        # the k+1 largest: b is their minimum, a the runner-up
        v = torch.topk(x, k + 1, dim=-1, largest=True, sorted=False).values
        b, a = _extreme_and_next(v, largest=True)
    else:
        # the n-k+1 smallest: a (the (n-k+1)-th smallest) is their maximum
        v = torch.topk(x, n - k + 1, dim=-1, largest=False, sorted=False).values
        a, b = _extreme_and_next(v, largest=False)
    return a, b


def _select_scalar_k_ties(
    x: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Host path for short rows: :func:`_select_scalar_k` from one more value, plus the ties.

    One ``topk`` of ``m + 1`` values on the smaller side (``m = k + 1`` largest or
    ``n - k + 1`` smallest) returns their positions as well.  Its extreme value
    ``c`` lies beyond ``b`` (largest side) or ``a`` (smallest side) in a row
    exactly when no entry outside those ``m + 1`` can equal ``a`` or ``b``; then
    the flat positions of the selected entries in ``[b, a]`` hold every tie, and
    the backward corrects them without comparing all of ``x`` (two comparisons,
    an ``and`` and a ``nonzero``: 12 passes on 1024 x 4096, more than the whole
    math after the selection).  A row that fails that test (ties beyond the
    selected values) contributes all its positions; when more than one row in
    eight fails, the candidates are None and the backward compares all of ``x``.
    """
    n = x.shape[-1]
    largest = k + 1 <= n - k + 1
    m = (k + 2) if largest else (n - k + 2)
    vals, idx = torch.topk(x, m, dim=-1, largest=largest, sorted=False)
    # the three values nearest the cut, nearest first (NaN ranks above +inf, as in topk)
    three = torch.topk(vals, 3, dim=-1, largest=not largest, sorted=True).values
    c, inner, outer = three[..., 0:1], three[..., 1:2], three[..., 2:3]
    a, b = (outer, inner) if largest else (inner, outer)
    # rows where an entry beyond the selected ones may equal the cut value (NaN bounds nothing)
    beyond = ~((c < inner) if largest else (c > inner)) & ~inner.isnan()
    spill = beyond.reshape(-1).nonzero().reshape(-1)
    rows_total = beyond.numel()
    if spill.numel() * 8 > rows_total:
        return a, b, None  # many tied rows: comparing all of x is cheaper
    top = torch.where(a.isnan(), _INF, a)
    band = ((vals <= top) & (vals >= b)).reshape(-1, m)
    row_start = torch.arange(rows_total, device=x.device).reshape(-1, 1) * n
    pos = (row_start + idx.reshape(-1, m))[band]
    if spill.numel():
        # such a row's candidates are all of it (what was selected there is a subset)
        keep = ~torch.isin(pos // n, spill)
        every = (row_start[spill] + torch.arange(n, device=x.device)).reshape(-1)
        pos = torch.cat([pos[keep], every])
    return a, b, pos


def _gather_sorted(s: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` from rows ``s`` sorted ascending and per-row ``k`` in [0, n]."""
    n = s.shape[-1]
    k = k.to(torch.int64)
    # the k-th largest sits at ascending index n - k
    ia = (n - k).clamp(0, n - 1)
    ib = (n - k - 1).clamp(0, n - 1)
    a = torch.take_along_dim(s, ia, dim=-1)
    b = torch.take_along_dim(s, ib, dim=-1)
    a = torch.where(k == 0, _INF, a)
    b = torch.where(k == n, -_INF, b)
    return a.to(s.dtype), b.to(s.dtype)


def _select_sorted(x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Graph-safe per-row ``k``: sort, then gather."""
    return _gather_sorted(torch.sort(x, dim=-1).values, k)


def _select_rowk_topk(x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``k`` on short rows (host path): one sorted ``topk`` on one side, then gathers.

    The largest ``max(k) + 1`` (or the smallest ``max(n - k) + 1``) values
    sorted, when that side is at most half the row for every row: a per-row
    ``k`` near a common value then costs about what a scalar one does (a full
    sort costs 4-5x); rows whose ``k`` straddle both halves take the sort.
    """
    n = x.shape[-1]
    kk = k.to(torch.int64)
    m_top = int(kk.max()) + 1
    m_bottom = n - int(kk.min()) + 1
    if min(m_top, m_bottom) > (n + 1) // 2 + 1:
        return _select_sorted(x, k)
    if m_top <= m_bottom:
        v = torch.topk(x, min(m_top, n), dim=-1, largest=True, sorted=True).values
        a = torch.take_along_dim(v, (kk - 1).clamp(min=0), dim=-1)
        b = torch.take_along_dim(v, kk.clamp(max=v.shape[-1] - 1), dim=-1)
    else:
        # ascending: the k-th largest is the (n - k + 1)-th smallest
        v = torch.topk(x, min(m_bottom, n), dim=-1, largest=False, sorted=True).values
        a = torch.take_along_dim(v, (n - kk).clamp(max=v.shape[-1] - 1), dim=-1)
        b = torch.take_along_dim(v, (n - kk - 1).clamp(min=0), dim=-1)
    a = torch.where(kk == 0, _INF, a)
    b = torch.where(kk == n, -_INF, b)
    return a.to(x.dtype), b.to(x.dtype)


def _sample_size(n: int) -> int:
    # ~n**(2/3) (Floyd-Rivest), at most a quarter of the row
    return max(64, min(n // 4, round(n ** (2 / 3))))


def _sample_index(n: int, s: int) -> torch.Tensor:
    """Fixed stratified sample of ``s`` positions in ``[0, n)`` (one per stratum).

    Deterministic (fixed seed) and cached; the results never depend on it,
    only the speed does: an unrepresentative sample only makes rows miss
    their bracket, and those are redone exactly.
    """
    key = (n, s)
    idx = _SAMPLE_CACHE.get(key)
    if idx is None:
        gen = torch.Generator().manual_seed(_SAMPLE_SEED)
        edges = torch.arange(s + 1, dtype=torch.int64) * n // s
        width = edges[1:] - edges[:-1]
        jitter = (torch.rand(s, generator=gen, dtype=torch.float64) * width).to(torch.int64)
        idx = edges[:-1] + jitter
        if len(_SAMPLE_CACHE) > 64:
            _SAMPLE_CACHE.clear()
        _SAMPLE_CACHE[key] = idx
    return idx


def _sample_value(samp: torch.Tensor, j: int) -> torch.Tensor:
    """Per row, the value at descending position ``j`` (0-based) of ``samp``.

    One ``topk`` on the smaller side: on (1024, 256) samples it took 3.3 ms
    where ``kthvalue`` took 7.8 ms (one thread).
    """
    s = samp.shape[-1]
    if j + 1 <= s - j:
        return torch.topk(samp, j + 1, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    return torch.topk(samp, s - j, dim=-1, largest=False, sorted=False).values.amax(
        -1, keepdim=True
    )


def _bracket(
    x2: torch.Tensor, kl: torch.Tensor, kh: torch.Tensor, scalar_k: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(lo, hi)``, shape ``(R, 1)``: sample values that enclose the
    ``kl``-th and ``kh``-th largest of each row with high probability."""
    n = x2.shape[1]
    s = _sample_size(n)
    samp = x2.index_select(1, _sample_index(n, s))
    if scalar_k is not None:
        # one pair of sample ranks for all rows: two selections, no sort
        q = scalar_k / n
        d = _BRACKET_SD * math.sqrt(s * q * (1.0 - q)) + 1.0
        hi_pos = math.floor(max(scalar_k, 1) * s / n - 1.0 - d)  # descending, 0-based
        lo_pos = math.ceil(min(scalar_k + 1, n) * s / n - 1.0 + d)
        hi = _sample_value(samp, hi_pos) if hi_pos >= 0 else _sentinel(x2, _INF)
        lo = _sample_value(samp, lo_pos) if lo_pos < s else _sentinel(x2, -_INF)
        return lo, hi
    desc = torch.sort(samp, dim=-1, descending=True).values
    q = kl.to(torch.float64) / n
    d = _BRACKET_SD * torch.sqrt(s * q * (1.0 - q)) + 1.0
    hi_pos = torch.floor(kl * (s / n) - 1.0 - d).to(torch.int64)
    lo_pos = torch.ceil(kh * (s / n) - 1.0 + d).to(torch.int64)
    hi = torch.take_along_dim(desc, hi_pos.clamp(0, s - 1), dim=-1)
    lo = torch.take_along_dim(desc, lo_pos.clamp(0, s - 1), dim=-1)
    hi = torch.where(hi_pos < 0, _INF, hi)
    lo = torch.where(lo_pos >= s, -_INF, lo)
    return lo, hi


def _row_counts(mask: torch.Tensor) -> torch.Tensor:
    """Per-row number of True in a contiguous bool ``(R, 8 w)`` mask, ``(R, 1)`` int64.

    Sums the mask as 64-bit words, so each byte lane adds up its 0/1 bytes; a
    lane cannot carry into the next within 255 words.  Measured 0.15 ms for
    1024 x 4096 (one thread) where ``mask.sum(-1)`` (bool -> int64) takes 36 ms
    and ``count_nonzero(dim=-1)`` 3 ms; 0.16 ms vs 67 ms for one row of 1e7.
    """
    rows = mask.shape[0]
    words = mask.view(torch.int64)
    groups, rest = divmod(words.shape[1], 255)
    parts = []
    if groups:
        parts.append(words[:, : groups * 255].reshape(rows, groups, 255).sum(-1))
    if rest:
        parts.append(words[:, groups * 255 :].sum(-1, keepdim=True))
    lanes = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    return lanes.view(torch.uint8).sum(-1, keepdim=True, dtype=torch.int64)


def _select_exact(
    x2: torch.Tensor, scalar_k: int | None, kk: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact paths for rows ``x2`` whose bracket missed (``kk``: their k, ``(R, 1)``)."""
    if scalar_k is not None:
        return _select_scalar_k(x2, scalar_k)
    return _select_sorted(x2, kk)


def _select_sampled(
    x: torch.Tensor, k: int | torch.Tensor, positions: list | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host path (eager CPU only): sample, bracket, compact, select exactly.

    Per row: a value bracket ``[lo, hi]`` from a fixed sample, ``above`` = the
    entries above ``hi`` (NaN counts as above: ``~(x <= hi)``), the entries
    inside it gathered (variable size: reading it is free on the host), and the
    k-th / (k+1)-th largest picked among those by rank ``k - above``.  Rows
    whose bracket does not hold both ranks are redone with the exact path.
    """
    n = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, n)
    rows = x2.shape[0]
    scalar_k = k if isinstance(k, int) else None
    if scalar_k is not None:
        kk = torch.full((rows, 1), scalar_k, dtype=torch.int64)
    else:
        kk = k.reshape(rows, 1).to(torch.int64)
    kl = kk.clamp(min=1)  # rank of a, or of b for k = 0
    kh = (kk + 1).clamp(max=n)  # rank of b, or of a for k = n
    lo, hi = _bracket(x2, kl, kh, scalar_k)
    # a NaN upper end (NaN ranks above +inf) would count every entry as above it;
    # +inf has the same entries above it, the NaNs
    hi = torch.where(hi.isnan(), _INF, hi)
    # masks in buffers padded to whole 8-byte words (pad = False) for _row_counts
    width8 = -(-n // 8) * 8
    le_buf = torch.zeros((rows, width8), dtype=torch.bool)
    cand_buf = torch.zeros((rows, width8), dtype=torch.bool)
    le = torch.le(x2, hi, out=le_buf[:, :n])
    cand = torch.ge(x2, lo, out=cand_buf[:, :n])
    cand &= le
    above = n - _row_counts(le_buf)
    ncand = _row_counts(cand_buf)
    pos = torch.nonzero(cand.reshape(-1)).reshape(-1)
    flat = x2.reshape(-1)[pos]
    miss = (above >= kl) | (above + ncand < kh)
    if bool(miss.all()):
        # no bracket held its ranks (NaN at the sampled ranks, adversarial input)
        a, b = _select_exact(x2, scalar_k, kk)
        return a.reshape(lead + (1,)), b.reshape(lead + (1,))
    # descending rank of b among the row's candidates; rows are shifted by
    # ``e`` leading +inf so that it is the same rank ``m`` in every row (a missed
    # row takes rank 1 and is redone below: it must not widen the others)
    rb = torch.where(miss, 1, (kh - above).clamp(min=1))
    m = int(rb.max())
    e = m - rb
    width = max(m, int((e + ncand).max()))
    cols = torch.arange(width, dtype=torch.int64)
    pad = torch.where(cols < e, _INF, -_INF).to(x2.dtype)
    counts = ncand.view(-1)
    starts = torch.cumsum(counts, 0) - counts
    offset = torch.arange(rows, dtype=torch.int64) * width + e.view(-1) - starts
    lin = torch.arange(flat.shape[0], dtype=torch.int64) + torch.repeat_interleave(
        offset, counts, output_size=flat.shape[0]
    )
    pad.view(-1)[lin] = flat
    top = torch.topk(pad, m, dim=-1, sorted=False).values
    b, runner = _extreme_and_next(top, largest=True)
    a = torch.where(kh > kl, runner, b)
    a = torch.where(kk == 0, _INF, a)
    b = torch.where(kk == n, -_INF, b)
    redo = miss.view(-1).nonzero().view(-1)
    if positions is not None and not redo.numel():
        # every entry tied with a or b lies in its row's bracket and is among the
        # gathered values: keep those in [b, a] (the ties; usually two per row)
        row = lin // width if rows > 1 else 0
        top = torch.where(a.isnan(), _INF, a).view(-1)[row]
        positions.append(pos[(flat <= top) & (flat >= b.view(-1)[row])])
    if redo.numel():
        ar, br = _select_exact(x2.index_select(0, redo), scalar_k, kk.index_select(0, redo))
        a[redo] = ar
        b[redo] = br
    return a.reshape(lead + (1,)), b.reshape(lead + (1,))


def select_pair(xp: Any, x: torch.Tensor, k: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """k-th and (k+1)-th largest along the last axis (see :class:`topk_core.Backend`).

    Parameters
    ----------
    xp : namespace
        The array namespace (unused; kept for the backend contract).
    x : torch.Tensor
        Scores with the selection axis last; masked entries already ``-inf``.
    k : int or torch.Tensor
        A Python int in ``[0, n]`` or an integer tensor of shape
        ``x.shape[:-1] + (1,)`` with values in ``[0, n]``.

    Returns
    -------
    a, b : torch.Tensor
        Shape ``x.shape[:-1] + (1,)``, x's dtype and device; ``a = +inf`` for
        ``k = 0`` and ``b = -inf`` for ``k = n``.

    Examples
    --------
    >>> import torch
    >>> from topk_core.backends.torch_backend import select_pair
    >>> select_pair(None, torch.tensor([[1.0, 4.0, 3.0, 2.0]]), 2)
    (tensor([[3.]]), tensor([[2.]]))
    >>> select_pair(None, torch.tensor([[1.0, 4.0], [5.0, 6.0]]), torch.tensor([[0], [2]]))
    (tensor([[inf],
            [5.]]), tensor([[4.],
            [-inf]]))
    """
    n = x.shape[-1]
    if x.numel() == 0:  # n = 0 (only k = 0) or an empty batch (nothing to select)
        shape_inf = _sentinel(x, _INF)
        return shape_inf, -shape_inf
    if isinstance(k, int):
        if _HOST_PATH and n >= _SAMPLE_MIN_N_SCALAR and 0 < k < n and host_ok(x):
            return _select_sampled(x, k)
        return _select_scalar_k(x, k)
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"k must be a Python int or a torch.Tensor, got {type(k).__name__}")
    if _HOST_PATH and host_ok(x) and type(k) is torch.Tensor:
        if n >= _SAMPLE_MIN_N:
            return _select_sampled(x, k)
        return _select_rowk_topk(x, k)
    return _select_sorted(x, k)


def select_pair_and_candidates(
    x: torch.Tensor, k: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`select_pair` plus, where known for free, flat positions holding every tie.

    The sampled path gathers each row's entries inside its bracket; when no
    row missed, those include every entry equal to ``a`` or ``b``, so a
    backward can find the ties among them (O(#candidates)) instead of
    comparing all of ``x``.  Shorter rows with a scalar ``k`` take one more
    value from their ``topk`` and the positions it returns
    (:func:`_select_scalar_k_ties`).  None where unknown (every other path).
    """
    n = x.shape[-1]
    host = _HOST_PATH and host_ok(x) and x.numel() > 0
    if host and (
        (isinstance(k, int) and n >= _SAMPLE_MIN_N_SCALAR and 0 < k < n)
        or (type(k) is torch.Tensor and n >= _SAMPLE_MIN_N)
    ):
        found: list = []
        a, b = _select_sampled(x, k, found)
        return a, b, (found[0] if found else None)
    if host and isinstance(k, int) and 2 <= k <= n - 2:
        return _select_scalar_k_ties(x, k)
    a, b = select_pair(None, x, k)
    return a, b, None


def _sigmoid(z: torch.Tensor) -> torch.Tensor:
    # torch.sigmoid is stable (no overflow) and keeps tail accuracy
    return torch.sigmoid(z)


def _apply(pb: Any, output: str, hard: bool = False) -> Any:
    # the autograd hook lives in the adapter; imported lazily to keep this module light
    from topk_core.adapters.torch_adapter import apply_problem

    return apply_problem(pb, output, hard=hard)


class _Soft:
    """The ``soft`` hook: :func:`topk_core.dftopk_vjp`, :func:`topk_core.dftopk_and_vjp`
    and :func:`topk_core.dftopk_jvp` in the adapter's eager kernels on plain CPU
    tensors (issue 11: the generic Array API math cost 2-3.5x the autograd path
    there).  Imported on first
    use, like ``apply``.  Elsewhere (CUDA, ``torch.compile``, ``torch.func``,
    or a graph to record: grad mode with an input that requires grad) it
    defers to the generic code, which is graph-safe and differentiable (the
    backward and the tangent defer from inside :func:`closed_form_backward` and
    :func:`closed_form_tangent`).
    """

    owns_residuals = False

    def applies(self, pb: Any, *arrays: Any) -> bool:
        ts = [pb.x, *arrays]
        ts += [t for t in (pb.tau, pb.valid) if isinstance(t, torch.Tensor)]
        if not all(isinstance(t, torch.Tensor) and host_ok(t) for t in ts):
            return False
        # the backward (arrays: the cotangent) runs here even where a graph is recorded:
        # the residuals it reads may be pooled buffers (closed_form_backward copies them)
        return bool(arrays) or not (torch.is_grad_enabled() and any(t.requires_grad for t in ts))

    def forward(self, pb: Any, a: Any, b: Any, output: str, *, keep: bool, out: bool = True):
        from topk_core.adapters.torch_adapter import closed_form_forward

        return closed_form_forward(pb, a, b, output, keep=keep, out=out)

    def backward(self, pb: Any, res: Any, g: Any):
        from topk_core.adapters.torch_adapter import closed_form_backward

        return closed_form_backward(pb, res, g)

    def copy_input(self, pb: Any, x: Any):
        from topk_core.adapters.torch_adapter import closed_form_input_copy

        return closed_form_input_copy(pb, x)

    def tangent(self, pb: Any, res: Any, u: Any, dtau: Any):
        from topk_core.adapters.torch_adapter import closed_form_tangent

        return closed_form_tangent(pb, res, u, dtau)


def _select_candidates(xp: Any, x: torch.Tensor, k: Any) -> Any:
    return select_pair_and_candidates(x, k)


def host_values(t: Any) -> torch.Tensor | None:
    """``t`` detached if its values are free to read (:func:`host_ok`), else None."""
    if not isinstance(t, torch.Tensor):
        return None
    v = t.detach()  # a Parameter or a tensor that requires grad reads the same
    return v if host_ok(v) else None


def _group(group: Any, x: torch.Tensor, axis: int) -> Any:
    # scale-out (group=): its own module, imported on first use
    from topk_core.backends.torch_distributed import resolve_group

    return resolve_group(group, x, axis)


BACKEND = Backend(
    name="torch",
    select_pair=select_pair,
    sigmoid=_sigmoid,
    apply=_apply,
    host_values=host_values,
    group=_group,
    soft=_Soft(),
    select_candidates=_select_candidates,
)
