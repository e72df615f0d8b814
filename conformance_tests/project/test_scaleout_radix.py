"""The radix driver's ``group`` hook and signed keys, on NumPy, without any framework.

A :class:`ThreadGroup` runs one thread per shard with collectives built from a
barrier, so the driver's scale-out logic (per-pass histogram sums, the final
key maximum, shards of unequal and zero length, int32/int64 counts) is checked
against the unsharded result in milliseconds.  The same driver runs under JAX
``shard_map`` and ``torch.distributed`` (test_scaleout_jax.py,
test_scaleout_torch.py).
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
from topk_core.backends.numpy_backend import SHIMS, NumpyShims

from topk_core._group import row_sum_of
from topk_core._radix import (
    float_to_signed_keys,
    radix_select_pair,
    signed_keys_to_float,
)

TIMEOUT_S = 30


class ThreadGroup:
    """Collectives among ``size`` threads (one per shard), for tests."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list = [None] * size
        self.barrier = threading.Barrier(size, timeout=TIMEOUT_S)
        self.n_total = None

    def member(self, rank: int) -> Member:
        return Member(self, rank)


class Member:
    label = "test threads"
    apply = None

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.g = group
        self.rank = rank

    def _gather(self, v):
        self.g.slots[self.rank] = np.array(v, copy=True)
        self.g.barrier.wait()
        every = list(self.g.slots)
        self.g.barrier.wait()  # nobody overwrites a slot before all have read
        return every

    def sum(self, v):
        return sum(self._gather(v), start=np.zeros_like(v))

    def max(self, v):
        return np.max(np.stack(self._gather(v)), axis=0)

    def exclusive_sum(self, v):
        every = self._gather(v)
        return sum(every[: self.rank], start=np.zeros_like(v))

    def total(self, n_local: int):
        return self.g.n_total

    def select_pair(self, xp, x, k):
        return radix_select_pair(xp, x, k, SHIMS, group=self)


def run_sharded(fn, shards, n_total=None):
    """``fn(member, shard)`` on one thread per shard; returns the results in order."""
    group = ThreadGroup(len(shards))
    group.n_total = n_total
    out: list = [None] * len(shards)
    errors: list = []

    def work(rank):
        try:
            out[rank] = fn(group.member(rank), shards[rank])
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a shard thread hung"
    if errors:
        raise errors[0]
    return out


class SignedShims(NumpyShims):
    """NumPy shims with signed keys (the layout the torch backend uses)."""

    def to_keys(self, x):
        return float_to_signed_keys(np, x, lambda a, dt: a.view(dt))

    def from_keys(self, keys, dtype):
        return signed_keys_to_float(np, keys, dtype, lambda a, dt: a.view(dt))


def _data(rng, rows, n, dtype):
    x = rng.standard_normal((rows, n)).astype(dtype)
    x[0, : n // 3] = np.round(x[0, : n // 3])  # ties, across shards
    x[1, :4] = [np.inf, -np.inf, -0.0, 0.0]
    if rows > 2:
        x[2, ::7] = -np.inf
    return x


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("digit_bits", [3, 8, 11])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("track_b", [False, True])
def test_radix_group_matches_unsharded(dtype, digit_bits, signed, track_b):
    rng = np.random.default_rng(digit_bits)
    n = 300
    x = _data(rng, 4, n, dtype)
    k = rng.integers(0, n + 1, (4, 1))
    k[3] = 0
    shims = SignedShims() if signed else SHIMS
    want = radix_select_pair(np, x, k, shims, digit_bits=digit_bits)
    # unequal shards, one of them empty
    cuts = [0, 17, 17, 150, 151, n]
    shards = [x[:, a:b] for a, b in itertools.pairwise(cuts)]
    for n_total in (n, None):  # None: counts in int64, as when the length is unknown

        def fn(member, shard):
            return radix_select_pair(
                np, shard, k, shims, digit_bits=digit_bits, group=member, track_b=track_b
            )

        for a, b in run_sharded(fn, shards, n_total):
            np.testing.assert_array_equal(a, want[0])
            np.testing.assert_array_equal(b, want[1])
            assert a.dtype == x.dtype

    # counts=True: every shard holds the global tie counts (what the JAX adapter uses)
    def fn_counts(member, shard):
        return radix_select_pair(
            np, shard, k, shims, digit_bits=digit_bits, group=member, track_b=track_b, counts=True
        )

    for a, b, ca, cb in run_sharded(fn_counts, shards, n):
        np.testing.assert_array_equal(a, want[0])
        np.testing.assert_array_equal(b, want[1])
        for v, c in ((a, ca), (b, cb)):
            if c is None:
                assert not track_b and v is b
                continue
            fin = np.isfinite(v)
            np.testing.assert_array_equal(c[fin], np.sum(x == v, axis=-1, keepdims=True)[fin])


def test_radix_group_static_k_and_nan():
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    x[1, 40] = np.nan
    shards = np.split(x, 4, axis=1)
    for k in (0, 1, 32, 63, 64):
        want = radix_select_pair(np, x, k, SHIMS)

        def fn(member, shard, k=k):
            return radix_select_pair(np, shard, k, SHIMS, group=member)

        for a, b in run_sharded(fn, shards, 64):
            np.testing.assert_array_equal(a, want[0])
            np.testing.assert_array_equal(b, want[1])


def test_row_sum_hook_sums_over_shards():
    x = np.arange(12.0).reshape(2, 6)
    shards = np.split(x, 3, axis=1)
    out = run_sharded(lambda m, s: row_sum_of(np, m)(s), shards)
    for o in out:
        np.testing.assert_array_equal(o, x.sum(-1, keepdims=True))


def test_signed_keys_round_trip_and_order():
    rng = np.random.default_rng(2)
    for dtype in (np.float16, np.float32, np.float64):
        x = np.concatenate(
            [
                rng.standard_normal(200).astype(dtype),
                np.array([np.inf, -np.inf, 0.0, -0.0, np.finfo(dtype).tiny / 2], dtype=dtype),
            ]
        )
        view = lambda a, dt: a.view(dt)  # noqa: E731
        keys = float_to_signed_keys(np, x, view)
        assert keys.dtype == np.dtype(f"int{np.finfo(dtype).bits}")
        order = np.argsort(keys, kind="stable")
        assert np.all(np.diff(x[order].astype(np.float64)) >= 0)
        back = signed_keys_to_float(np, keys, dtype, view)
        np.testing.assert_array_equal(back, np.where(x == 0, 0, x))
        assert keys.min() > np.iinfo(keys.dtype).min


def test_docstring_examples():
    import doctest

    from topk_core import _group, _radix

    for mod in (_group, _radix):
        result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("group", ["d", ("a", "b"), 0, object()])
def test_group_rejected_where_there_are_no_collectives(group):
    import topk_core as tk

    x = np.ones((2, 8))
    for fn in (tk.dftopk, tk.dftopk_logits, tk.topk_threshold, tk.topk_mask):
        with pytest.raises(TypeError, match=r"group=.*numpy array.*dask"):
            fn(x, 3, group=group)
    with pytest.raises(TypeError, match="group="):
        tk.dftopk_vjp(x, 3, x, group=group)
    with pytest.raises(TypeError, match="group="):
        tk.dftopk_jvp(x, 3, x, group=group)
    with pytest.raises(TypeError, match="group="):
        tk.dftopk_and_vjp(x, 3, group=group)
    xps = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="array_api_strict"):
        tk.dftopk(xps.ones((2, 8)), 3, group=group)


def test_group_none_is_the_default():
    import topk_core as tk

    x = np.random.default_rng(3).standard_normal((2, 9))
    np.testing.assert_array_equal(tk.dftopk(x, 4, group=None), tk.dftopk(x, 4))
