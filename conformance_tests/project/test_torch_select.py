"""PyTorch selection without NumPy: the sampling (host) path and the
graph-safe topk / sort paths against a full sort, on adversarial input."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from topk_core.backends import torch_backend as tb  # noqa: E402

import topk_core  # noqa: E402

SEED = 20251012
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _want(x, k):
    """(a, b) from a full descending sort (NaN sorts first, like torch.sort)."""
    s = torch.sort(x, dim=-1, descending=True).values
    inf = torch.full(x.shape[:-1] + (1,), math.inf, dtype=x.dtype)
    ext = torch.cat([inf, s, -inf], dim=-1)
    kk = k if isinstance(k, torch.Tensor) else torch.full(x.shape[:-1] + (1,), k)
    return ext.gather(-1, kk), ext.gather(-1, kk + 1)


def _check(x, k, paths=("host", "native", "sampled")):
    want_a, want_b = _want(x, k)
    for path in paths:
        if path == "sampled":
            a, b = tb._select_sampled(x, k)  # forced, whatever the size
        else:
            saved = tb._HOST_PATH
            tb._HOST_PATH = path == "host"
            try:
                a, b = tb.select_pair(None, x, k)
            finally:
                tb._HOST_PATH = saved
        assert a.dtype == x.dtype and a.shape == want_a.shape, path
        # equal, with NaN == NaN; -0.0 == +0.0 is fine (the math cannot tell)
        assert torch.equal(a.isnan(), want_a.isnan()) and torch.equal(b.isnan(), want_b.isnan())
        assert torch.equal(a.nan_to_num(0.5), want_a.nan_to_num(0.5)), (path, k)
        assert torch.equal(b.nan_to_num(0.5), want_b.nan_to_num(0.5)), (path, k)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(SEED)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_k_all_ranks_small_rows_with_ties(gen, dtype):
    x = torch.randint(-3, 4, (4, 9), generator=gen).to(dtype)
    x[0, 0], x[1, 1], x[2, 2] = math.inf, -math.inf, -0.0
    x[3] = 2.0  # an all-equal row
    for k in range(10):
        _check(x, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2048, 5000])
def test_scalar_k_long_rows_through_every_path(gen, dtype, n):
    x = torch.randn(3, n, generator=gen).to(dtype)  # half types: many ties
    x[0, :7] = math.inf
    x[1, :5] = -math.inf
    x[2, ::3] = 0.0
    x[2, 1::3] = -0.0
    for k in (0, 1, 2, 6, 7, 8, n // 10, n // 2, n - 6, n - 5, n - 4, n - 1, n):
        _check(x, k)


@pytest.mark.parametrize("n", [1, 2, 3, 17])
def test_tiny_rows_forced_through_the_sampling_path(gen, n):
    x = torch.randn(2, n, generator=gen)
    for k in range(n + 1):
        _check(x, k, paths=("sampled",))


def test_all_equal_and_empty_rows():
    x = torch.full((2, 4096), 1.5)
    for k in (0, 1, 2048, 4095, 4096):
        _check(x, k)
    a, b = tb.select_pair(None, torch.ones(3, 0), 0)
    assert torch.equal(a, torch.full((3, 1), math.inf)) and torch.equal(b, -a)


def test_nan_counts_as_largest():
    x = torch.randn(2, 4096, generator=torch.Generator().manual_seed(1))
    x[0, 100:110] = math.nan
    for k in (1, 9, 10, 11, 12, 400, 4096):
        _check(x, k)


@pytest.mark.parametrize("n", [2048, 70001])
@pytest.mark.parametrize("frac", [0.02, 0.3, 0.9])
def test_many_nan_rows_through_the_sampling_path(n, frac):
    """NaN at the sampled bracket ranks: every row, or only some, misses its bracket.

    Once raised ``RuntimeError: selected index k out of range`` from the
    sampled path (an empty candidate set when every row missed).
    """
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(3, n, generator=g)
    x[torch.rand(3, n, generator=g) < frac] = math.nan
    x[2] = torch.randn(n, generator=g)  # one NaN-free row beside the others
    n_nan = int(x[0].isnan().sum())
    for k in (1, 5, n_nan - 1, n_nan, n_nan + 1, n_nan + 3, n // 2, n - 1):
        _check(x, k)
        _check(x[:2], k)  # only NaN rows
        _check(x, torch.tensor([[k], [max(k - 7, 0)], [n // 10]]))
    dft = topk_core.dftopk(x, n_nan + 3)  # and the public call
    assert dft.shape == x.shape and not dft[2].isnan().any()


def _adversarial(n):
    """Rows where the fixed sample is unrepresentative: every sampled position
    holds a huge value and the rest are small (or the reverse)."""
    idx = tb._sample_index(n, tb._sample_size(n))
    x = torch.zeros(2, n)
    x[0] = torch.linspace(-1.0, 0.0, n)
    x[0, idx] = torch.linspace(10.0, 11.0, idx.numel())
    x[1] = torch.linspace(10.0, 11.0, n)
    x[1, idx] = torch.linspace(-1.0, 0.0, idx.numel())
    return x


def test_bracket_miss_falls_back_to_the_exact_path(monkeypatch):
    n = 8192
    x = _adversarial(n)
    calls = []
    exact = tb._select_scalar_k
    monkeypatch.setattr(
        tb, "_select_scalar_k", lambda xr, k: calls.append(xr.shape) or exact(xr, k)
    )
    for k in (n // 10, n // 2):
        _check(x, k, paths=("sampled",))
    assert calls and all(shape[0] >= 1 for shape in calls)  # the redo really ran
    rows = []
    sort_exact = tb._select_sorted
    monkeypatch.setattr(
        tb, "_select_sorted", lambda xr, k: rows.append(xr.shape) or sort_exact(xr, k)
    )
    _check(x, torch.tensor([[n // 3], [n // 5]]), paths=("sampled",))
    assert rows


def test_per_row_k_all_regimes(gen):
    for n in (7, 4096, 3000):
        x = torch.randint(-20, 20, (6, n), generator=gen).to(torch.float32)
        x[0, :3] = -math.inf
        k = torch.tensor([[0], [n], [1], [n - 1], [n // 2], [n // 3]])
        _check(x, k)
        for dtype in DTYPES:
            _check(x.to(dtype), torch.randint(0, n + 1, (6, 1), generator=gen))


def test_batched_leading_dims_and_non_contiguous(gen):
    x = torch.randn(2, 3, 4100, generator=gen)
    _check(x, 410)
    _check(x.transpose(0, 1), 2050)
    _check(x, torch.randint(0, 4101, (2, 3, 1), generator=gen))


def test_masked_rows_via_the_public_api(gen):
    x = torch.randn(4, 4096, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 4096, generator=gen) < 0.3
    mask[0] = False
    got = topk_core.topk_threshold(x, 100, mask=mask)
    # the NumPy backend runs its own (radix) selection on the same problem
    want = topk_core.topk_threshold(x.numpy(), 100, mask=mask.numpy())
    np.testing.assert_array_equal(got.numpy(), want)


def test_no_numpy_is_called(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the torch backend called NumPy")

    for name in ("partition", "sort", "asarray", "array", "take_along_axis", "max", "bincount"):
        monkeypatch.setattr(np, name, boom)
    monkeypatch.setattr(torch.Tensor, "numpy", boom)
    monkeypatch.setattr(torch, "from_numpy", boom)
    x = torch.randn(3, 4096, generator=torch.Generator().manual_seed(3))
    for k in (1, 409, 2048, 4095):
        tb.select_pair(None, x, k)
    tb.select_pair(None, x, torch.tensor([[0], [7], [4096]]))
    long_row = torch.randn(1, 1 << 16, generator=torch.Generator().manual_seed(5))
    assert long_row.shape[-1] >= tb._SAMPLE_MIN_N_SCALAR  # the sampled path for scalar k
    _check(long_row, 6553, paths=("host",))
    tb.select_pair(None, x[:, :100], 10)
    tb.select_pair(None, x[:, :100], torch.tensor([[0], [7], [100]]))
    assert "numpy" not in tb.__dict__ and "_np" not in tb.__dict__


def test_graph_safe_paths_never_read_sizes():
    # under vmap the host path is off; results still match the sort
    x = torch.randn(3, 4096, generator=torch.Generator().manual_seed(4))
    a, b = torch.func.vmap(lambda r: tb.select_pair(None, r, 100))(x)
    want_a, want_b = _want(x, 100)
    assert torch.equal(a, want_a) and torch.equal(b, want_b)
