"""The shared radix-select driver (topk_core._radix) against a full sort.

Run through NumPy (the backend's bincount shims and the comparison-only
GenericShims), through array-api-strict (proves the driver uses nothing but
Array API operations) and under ``jax.jit`` (proves it is traceable).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from topk_core.backends import numpy_backend
from topk_core.backends.numpy_backend import SHIMS, NumpyShims
from topk_core.conformance.reference import ref_dftopk

import topk_core as tk
from topk_core._radix import (
    GenericShims,
    check_digit_bits,
    digit_widths,
    float_to_keys,
    float_to_signed_keys,
    keys_to_float,
    locate_bin,
    pass_histogram,
    radix_select_pair,
    signed_keys_to_float,
)

DTYPES = (np.float16, np.float32, np.float64)
DIGIT_BITS = (1, 2, 3, 4, 5, 8, 11, 16)


def _view(a, dt):
    return a.view(dt)


GENERIC = GenericShims(np, _view)


class OneHotShims(NumpyShims):
    """NumPy's shims without the optional ``block_bins`` gather: the driver's one-hot pick."""

    block_bins = None


ONE_HOT = OneHotShims()


def shims_for(digit_bits):
    # the comparison histogram costs one reduction per bin: only for tiny digits; the
    # one-hot pick of a block's bins (no gather in the namespace) from 7-bit digits on
    if digit_bits <= 2:
        return [SHIMS, GENERIC]
    return [SHIMS, ONE_HOT] if digit_bits > 6 else [SHIMS]


def adversarial_values(dtype):
    fi = np.finfo(dtype)
    vals = [
        -np.inf,
        np.inf,
        0.0,
        -0.0,
        1.0,
        -1.0,
        fi.max,
        -fi.max,
        fi.tiny,
        -fi.tiny,
        fi.smallest_subnormal,
        -fi.smallest_subnormal,
        fi.smallest_subnormal * 3,
        fi.eps,
        1 + fi.eps,
        2.5,
    ]
    return np.array(vals, dtype=dtype)


def sort_pair(x, k):
    """(a, b) from a full descending sort per row with the sentinels (no NaN)."""
    x = np.asarray(x)
    n = x.shape[-1]
    s = -np.sort(-x, axis=-1)
    lead = x.shape[:-1] + (1,)
    ext = np.concatenate(
        [np.full(lead, np.inf, x.dtype), s, np.full(lead, -np.inf, x.dtype)], axis=-1
    )
    k = np.broadcast_to(np.asarray(k), lead) if not isinstance(k, int) else np.full(lead, k)
    assert (k >= 0).all() and (k <= n).all()
    return np.take_along_axis(ext, k, -1), np.take_along_axis(ext, k + 1, -1)


def check_pair(x, k, digit_bits, shims):
    ea, eb = sort_pair(x, k)
    # b from a final masked max, and b narrowed alongside a (track_b)
    for track_b in (False, True):
        a, b = radix_select_pair(np, x, k, shims, digit_bits=digit_bits, track_b=track_b)
        assert a.dtype == x.dtype and b.dtype == x.dtype
        assert a.shape == x.shape[:-1] + (1,) and b.shape == a.shape
        np.testing.assert_array_equal(a, ea)
        np.testing.assert_array_equal(b, eb)
        check_counts(x, k, digit_bits, shims, track_b, ea, eb)


def check_counts(x, k, digit_bits, shims, track_b, ea, eb):
    """``counts=True``: the same pair, and the tie counts of every finite ``a``/``b``."""
    a, b, ca, cb = radix_select_pair(
        np, x, k, shims, digit_bits=digit_bits, track_b=track_b, counts=True
    )
    np.testing.assert_array_equal(a, ea)
    np.testing.assert_array_equal(b, eb)
    assert ca.shape == a.shape and np.issubdtype(ca.dtype, np.integer)
    fa = np.isfinite(ea)
    np.testing.assert_array_equal(ca[fa], np.sum(x == ea, axis=-1, keepdims=True)[fa])
    if not track_b:
        assert cb is None  # b from a key maximum: not counted
        return
    assert cb.shape == b.shape and np.issubdtype(cb.dtype, np.integer)
    fb = np.isfinite(eb)
    np.testing.assert_array_equal(cb[fb], np.sum(x == eb, axis=-1, keepdims=True)[fb])


# ---------------------------------------------------------------- key mapping


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shims", [SHIMS, GENERIC], ids=["numpy", "generic"])
def test_keys_order_preserving(dtype, shims):
    vals = np.unique(adversarial_values(dtype))  # sorted ascending, -0.0 == 0.0 merged
    rng = np.random.default_rng(1)
    more = rng.normal(scale=100, size=200).astype(dtype)
    xs = np.sort(np.concatenate([vals, more]))
    keys = shims.to_keys(xs)
    assert keys.dtype == np.dtype(f"uint{np.finfo(dtype).bits}")
    # same order, ties exactly where the values tie
    assert (np.diff(keys.astype(np.float64)) >= 0).all()
    np.testing.assert_array_equal(keys[1:] == keys[:-1], xs[1:] == xs[:-1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_keys_signed_zero_and_nan(dtype):
    x = np.array([0.0, -0.0, np.inf, np.nan, -np.nan, -np.inf], dtype=dtype)
    keys = SHIMS.to_keys(x)
    assert keys[0] == keys[1]
    assert keys[3] > keys[2] and keys[4] > keys[2]  # NaN of either sign above +inf
    assert keys[5] < keys[0]
    back = SHIMS.from_keys(keys, x.dtype)
    assert back.dtype == x.dtype
    assert np.signbit(back[1]) == np.False_  # -0.0 comes back canonical (+0.0)
    np.testing.assert_array_equal(back[[0, 1, 2, 5]], x[[0, 1, 2, 5]])
    assert np.isnan(back[3]) and np.isnan(back[4])


@pytest.mark.parametrize("dtype", DTYPES)
def test_keys_roundtrip_bitwise(dtype):
    rng = np.random.default_rng(2)
    bits = np.finfo(dtype).bits
    raw = rng.integers(0, 2**bits, size=5000, dtype=np.uint64).astype(f"uint{bits}")
    x = raw.view(dtype)
    x = x[~np.isnan(x) & (x != 0)]  # canonical values: zero and NaN checked above
    back = keys_to_float(np, float_to_keys(np, x, _view), dtype, _view)
    np.testing.assert_array_equal(back.view(f"uint{bits}"), x.view(f"uint{bits}"))


def test_digit_widths_and_validation():
    assert digit_widths(64, 11) == [11] * 5 + [9]
    assert digit_widths(16, 16) == [16]
    assert sum(digit_widths(32, 3)) == 32
    with pytest.raises(ValueError, match="digit_bits"):
        check_digit_bits(0)
    with pytest.raises(ValueError, match="digit_bits"):
        check_digit_bits(17)
    with pytest.raises(TypeError, match="digit_bits"):
        check_digit_bits(8.0)
    with pytest.raises(ValueError, match="digit_bits"):
        radix_select_pair(np, np.ones((2, 3)), 1, SHIMS, digit_bits=32)


def test_histogram_shims_agree():
    rng = np.random.default_rng(3)
    for nbins in (2, 4, 256):
        digits = rng.integers(0, nbins, size=(3, 2, 50)).astype(np.uint32)
        active = rng.random((3, 2, 50)) < 0.6
        expected = np.zeros((3, 2, nbins), dtype=np.int64)
        for idx in np.ndindex(3, 2):
            expected[idx] = np.bincount(digits[idx][active[idx]], minlength=nbins)
        np.testing.assert_array_equal(SHIMS.row_histogram(digits, active, nbins), expected)
        if nbins <= 4:
            np.testing.assert_array_equal(GENERIC.row_histogram(digits, active, nbins), expected)
    # uint64 digits (float64 keys) must not trip bincount's safe casting
    d64 = rng.integers(0, 8, size=(4, 9)).astype(np.uint64)
    act = np.ones((4, 9), bool)
    assert SHIMS.row_histogram(d64, act, 8).sum() == 36


# --------------------------------------------------------- driver vs full sort


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("digit_bits", DIGIT_BITS)
def test_adversarial_per_row_k(dtype, digit_bits):
    rng = np.random.default_rng(digit_bits)
    vals = adversarial_values(dtype)
    n = 23
    x = rng.choice(vals, size=(4, 3, n))
    x[0, 0] = vals[2]  # all-equal row (zeros)
    x[0, 1] = np.where(rng.random(n) < 0.5, 0.0, -0.0).astype(dtype)  # signed zeros only
    x[1, 0] = np.inf
    x[1, 1] = -np.inf
    x[1, 2, :5] = -np.inf  # masked-like tail
    k = rng.integers(0, n + 1, size=(4, 3, 1))
    k[0, :, 0] = [0, n, 1]
    k[1, :, 0] = [n, 0, n - 1]
    for shims in shims_for(digit_bits):
        check_pair(x, k, digit_bits, shims)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("digit_bits", (1, 8, 11))
def test_scalar_k_every_rank(dtype, digit_bits):
    rng = np.random.default_rng(4)
    x = rng.choice(adversarial_values(dtype), size=(2, 9))
    for k in range(10):
        check_pair(x, k, digit_bits, SHIMS)


@pytest.mark.parametrize("digit_bits", (2, 8, 11))
def test_many_ties_and_clusters(digit_bits):
    rng = np.random.default_rng(5)
    # values sharing long key prefixes: consecutive floats around 1.0
    base = np.float32(1.0)
    steps = rng.integers(-3, 4, size=(6, 200))
    x = (base + steps * np.finfo(np.float32).eps).astype(np.float32)
    k = rng.integers(0, 201, size=(6, 1))
    for shims in shims_for(digit_bits):
        check_pair(x, k, digit_bits, shims)


@pytest.mark.parametrize("shims", [SHIMS, ONE_HOT], ids=["gather", "one-hot"])
def test_wide_digits_a_and_b_in_different_blocks(shims):
    # 16-bit digits, track_b: the k-th and (k+1)-th share the first digit but sit in
    # different blocks of the second pass's bins, or in different first-pass bins
    # (b then read from the upper half's blocks); both block pickers agree with a sort
    lo = np.float32(1.0).view(np.uint32)
    steps = np.array([0, 1, 255, 256, 257, 65535, 65536, 65537, 131072], dtype=np.uint32)
    x = (lo + steps).view(np.float32)
    x = np.stack([x, x[::-1], np.roll(x, 3)])
    for k in range(x.shape[-1] + 1):
        for digit_bits in (8, 11, 16):
            check_pair(x, k, digit_bits, shims)


@pytest.mark.parametrize("width", [1, 3, 8, 11])
def test_locate_bin_against_a_count(width):
    """``locate_bin``'s bin, entries above and entries in it, from a plain count."""
    rng = np.random.default_rng(width)
    nbins = 1 << width
    hist = rng.integers(0, 4, size=(5, 2, nbins)) * (rng.random((5, 2, nbins)) < 0.3)
    hist[..., 0] += 1  # at least one entry a row
    total = hist.sum(-1, keepdims=True)
    remaining = (rng.integers(0, 1 << 30, size=total.shape) % total) + 1
    for take in (SHIMS.block_bins, None):  # the gather, and the one-hot pick
        digit, gt, count = locate_bin(np, hist, remaining, width, take)
        # suffix[..., j]: entries with digit >= j (0 past the last bin)
        suffix = np.cumsum(hist[..., ::-1], -1)[..., ::-1]
        suffix = np.concatenate([suffix, np.zeros_like(suffix[..., :1])], -1)
        above = np.take_along_axis(suffix, digit + 1, -1)
        np.testing.assert_array_equal(gt, above)
        np.testing.assert_array_equal(count, np.take_along_axis(hist, digit, -1))
        assert ((gt < remaining) & (remaining <= gt + count)).all()


class CountingLocate(NumpyShims):
    """NumPy's shims with a ``locate`` hook that counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def locate(self, hist, remaining, width):
        self.calls += 1
        return locate_bin(np, hist, remaining, width, self.block_bins)


def test_a_shims_locate_hook_is_used_where_one_rank_is_narrowed():
    x = np.random.default_rng(4).standard_normal((3, 200))
    x[0, :50] = 1.0  # ties
    for track_b in (False, True):
        hooked = CountingLocate()
        for k in (0, 1, 50, 51, np.array([[3], [200], [7]])):
            want = radix_select_pair(np, x, k, SHIMS, digit_bits=8, track_b=track_b)
            got = radix_select_pair(np, x, k, hooked, digit_bits=8, track_b=track_b)
            for w, g in zip(want, got, strict=True):
                np.testing.assert_array_equal(g, w)
        # 8-bit digits of float64 keys: 8 passes a call, 5 calls; with track_b none
        assert hooked.calls == (0 if track_b else 40)


class PrefixShims(NumpyShims):
    """NumPy's shims with the Dask backend's ``prefix_histogram`` hook, counting its calls;
    ``signed``: PyTorch's signed keys instead of unsigned ones."""

    def __init__(self, signed=False):
        super().__init__()
        self.signed = signed
        self.calls = 0

    def to_keys(self, x):
        return float_to_signed_keys(np, x, _view) if self.signed else super().to_keys(x)

    def from_keys(self, keys, dtype):
        if self.signed:
            return signed_keys_to_float(np, keys, dtype, _view)
        return super().from_keys(keys, dtype)

    def prefix_histogram(self, keys, prefix, shift, width, first):
        self.calls += 1
        return pass_histogram(np, keys, prefix, shift, width, first, self.row_histogram)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("digit_bits", (1, 3, 8, 11, 16))
def test_a_shims_prefix_histogram_hook_gives_the_same_pairs(signed, dtype, digit_bits):
    """Candidates from the keys' top bits against the prefix (no mask carried between
    passes): the same pairs and tie counts as a sort, signed keys' flipped top digit
    included; the hook runs once a pass where one rank is narrowed, never with track_b."""
    rng = np.random.default_rng(digit_bits)
    vals = adversarial_values(dtype)
    n = 23
    x = rng.choice(vals, size=(4, 3, n))
    x[0, 0] = vals[2]  # all-equal row
    x[0, 1] = np.where(rng.random(n) < 0.5, 0.0, -0.0).astype(dtype)
    x[1, 0] = np.inf
    x[1, 1] = -np.inf
    x[1, 2, :5] = -np.inf
    k = rng.integers(0, n + 1, size=(4, 3, 1))
    k[0, :, 0] = [0, n, 1]
    shims = PrefixShims(signed)
    check_pair(x, k, digit_bits, shims)
    bits = np.finfo(dtype).bits
    passes = len(digit_widths(bits, min(digit_bits, bits - 1) if signed else digit_bits))
    # check_pair: two calls without track_b (plain, and with counts), two with it
    assert shims.calls == 2 * passes


def test_pass_histogram_is_the_carried_mask_histogram():
    """Pass by pass, the histogram from the prefix equals the one from the mask the
    driver carries (digits equal to the chosen ones in every earlier pass)."""
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 1 << 12, size=(5, 300)).astype(np.uint16)
    keys[:, :100] = keys[:, :1]  # a shared key: candidates left in the last pass
    chosen = keys[:, 7:8]  # narrow towards one key of each row
    active = None
    for shift, width in ((12, 4), (8, 4), (3, 5), (0, 3)):
        digits = (keys >> shift) & ((1 << width) - 1)
        want = SHIMS.row_histogram(digits, active, 1 << width)
        prefix = (chosen >> (shift + width)) << (shift + width)
        got = pass_histogram(np, keys, prefix, shift, width, active is None, SHIMS.row_histogram)
        np.testing.assert_array_equal(got, want)
        hit = digits == ((chosen >> shift) & ((1 << width) - 1))
        active = hit if active is None else active & hit
    assert (want.sum(-1) >= 100).all()


def test_n_zero_and_n_one():
    a, b = radix_select_pair(np, np.zeros((3, 0)), 0, SHIMS)
    assert a.shape == (3, 1) and (a == np.inf).all() and (b == -np.inf).all()
    x = np.array([[2.0], [-np.inf]])
    check_pair(x, np.array([[0], [1]]), 8, SHIMS)
    check_pair(x, 1, 8, SHIMS)


def test_one_dimensional_x():
    x = np.array([3.0, -0.0, 7.0, 7.0, 1.0])
    a, b = radix_select_pair(np, x, np.array([1]), SHIMS)
    assert a.shape == (1,) and a[0] == 7.0 and b[0] == 7.0  # tie: b = a
    a, b = radix_select_pair(np, x, 3, SHIMS)
    assert a[0] == 3.0 and b[0] == 1.0


@pytest.mark.parametrize("track_b", (False, True))
def test_nan_rows_no_hang_and_nan_largest(track_b):
    x = np.array([[1.0, np.nan, 3.0, -np.nan, 2.0], [np.nan] * 5, [0.0, 1.0, 2.0, 3.0, 4.0]])
    for digit_bits in (1, 8, 11):
        kw = {"digit_bits": digit_bits, "track_b": track_b}
        a, b = radix_select_pair(np, x, np.array([[1], [3], [2]]), SHIMS, **kw)
        # NaN ranks above +inf (like a descending sort that puts NaN first)
        assert np.isnan(a[0, 0]) and np.isnan(b[0, 0])
        assert np.isnan(a[1, 0]) and np.isnan(b[1, 0])
        assert a[2, 0] == 3.0 and b[2, 0] == 2.0
        a, b = radix_select_pair(np, x, np.array([[3], [5], [5]]), SHIMS, **kw)
        assert a[0, 0] == 3.0 and b[0, 0] == 2.0 and b[1, 0] == -np.inf


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
    digit_bits=st.sampled_from(DIGIT_BITS),
)
def test_random_shapes_hypothesis(data, dtype, digit_bits):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12))
    x = data.draw(
        hnp.arrays(
            dtype,
            shape,
            elements=st.floats(allow_nan=False, width=np.finfo(dtype).bits),
        )
    )
    n = shape[-1]
    k = data.draw(hnp.arrays(np.int64, shape[:-1] + (1,), elements=st.integers(0, n)))
    for shims in shims_for(digit_bits):
        check_pair(x, k, digit_bits, shims)


# ------------------------------------------------- through the NumPy backend


def test_numpy_backend_routes_per_row_k_through_driver(monkeypatch):
    # per-row k: short rows are sorted, long rows take the sampled bracket, whose missed
    # rows are redone by the driver (issue 11: the driver alone was 5-30x scalar k)
    calls = []
    real = numpy_backend.radix_select_pair

    def spy(*args, **kwargs):
        calls.append(kwargs.get("digit_bits"))
        return real(*args, **kwargs)

    monkeypatch.setattr(numpy_backend, "radix_select_pair", spy)
    x = np.random.default_rng(6).normal(size=(3, 10))
    tk.dftopk(x, np.array([1, 2, 3]))
    short = x > -1.0
    short[0, 1:] = False  # a row with fewer valid entries than k: k becomes per-row
    tk.dftopk(x, 2, mask=short)
    assert calls == []  # rows of 10: sorted
    long = np.random.default_rng(7).normal(size=(3, 4096))
    monkeypatch.setattr(numpy_backend, "_BRACKET_SD", -50.0)  # every bracket misses
    a, b = numpy_backend.select_pair(np, long, np.array([[1], [400], [4096]]))
    assert calls == [8]
    srt = np.sort(long, axis=-1)
    assert a.ravel().tolist() == [srt[0, -1], srt[1, -400], srt[2, 0]]
    assert b.ravel().tolist() == [srt[0, -2], srt[1, -401], -np.inf]
    assert numpy_backend.digit_bits_for(10**6) == 11


@pytest.mark.parametrize("dtype", ("float16", "float32", "float64"))
def test_masks_via_dftopk(dtype):
    rng = np.random.default_rng(7)
    x = rng.choice(adversarial_values(np.float64)[[0, 1, 2, 3, 4, 5, 15]], size=(5, 4, 11))
    x = x + rng.integers(0, 3, size=x.shape)  # ties
    mask = rng.random(x.shape) < 0.7
    mask[0, 0] = False  # no valid entry
    mask[0, 1] = True
    k = rng.integers(0, 12, size=(5, 4))
    xd = x.astype(dtype)
    for axis in (-1, 1):
        xa = np.moveaxis(xd, -1, axis)
        ma = np.moveaxis(mask, -1, axis)
        got = tk.dftopk(xa, k, tau=0.5, axis=axis, mask=ma)
        want = ref_dftopk(xa.astype(np.float64), k, tau=0.5, axis=axis, mask=ma)
        np.testing.assert_allclose(got, want, atol={"float16": 2e-3}.get(dtype, 2e-5))
        hard = tk.topk_mask(xa, k, axis=axis, mask=ma)
        np.testing.assert_array_equal(
            np.moveaxis(hard, axis, -1).sum(-1), np.minimum(k, mask.sum(-1))
        )


def test_nan_propagates_through_dftopk_per_row_k():
    x = np.array([[1.0, np.nan, 3.0, 2.0], [4.0, 3.0, 2.0, 1.0]])
    p = tk.dftopk(x, np.array([2, 2]))
    assert np.isnan(p[0, 1])
    assert not np.isnan(p[1]).any()


# ------------------------------------- the driver is pure Array API + traceable


def _strict_bitcast(a, dt):
    import array_api_strict as xps

    name = str(dt).rsplit(".", 1)[-1]
    return xps.asarray(np.from_dlpack(a).view(np.dtype(name)))


@pytest.mark.skipif(
    importlib.util.find_spec("array_api_strict") is None, reason="array-api-strict not installed"
)
@pytest.mark.parametrize("digit_bits", (1, 2))
def test_driver_uses_only_array_api(digit_bits):
    import array_api_strict as xps

    rng = np.random.default_rng(8)
    x = rng.choice(adversarial_values(np.float32), size=(3, 13))
    k = rng.integers(0, 14, size=(3, 1))
    shims = GenericShims(xps, _strict_bitcast)
    ea, eb = sort_pair(x, k)
    for track_b in (False, True):
        a, b = radix_select_pair(
            xps, xps.asarray(x), xps.asarray(k), shims, digit_bits=digit_bits, track_b=track_b
        )
        np.testing.assert_array_equal(np.from_dlpack(a), ea)
        np.testing.assert_array_equal(np.from_dlpack(b), eb)


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
@pytest.mark.parametrize(
    "dtype",
    # compile time grows with the unrolled passes (16/32/64 at digit_bits=1)
    [
        "float16",
        pytest.param("float32", marks=pytest.mark.slow),
        pytest.param("float64", marks=pytest.mark.slow),
    ],
)
def test_driver_traces_under_jax_jit(dtype):
    import jax
    import jax.numpy as jnp

    if dtype == "float64" and not jax.config.read("jax_enable_x64"):
        pytest.skip("jax x64 mode is off")
    shims = GenericShims(jnp, jax.lax.bitcast_convert_type)
    select = jax.jit(lambda x, k: radix_select_pair(jnp, x, k, shims, digit_bits=1))
    rng = np.random.default_rng(9)
    x = rng.choice(adversarial_values(np.dtype(dtype).type), size=(4, 17))
    k = rng.integers(0, 18, size=(4, 1)).astype(np.int32)
    a, b = select(jnp.asarray(x), jnp.asarray(k))
    ea, eb = sort_pair(x, k)
    np.testing.assert_array_equal(np.asarray(a), ea)
    np.testing.assert_array_equal(np.asarray(b), eb)


def test_numpy_shims_module_parameter():
    # the CuPy backend reuses NumpyShims with mod=cupy: the class must use only self.mod
    shims = NumpyShims(np)
    x = np.array([[1.0, 5.0, 3.0]], dtype=np.float32)
    a, b = radix_select_pair(np, x, np.array([[2]]), shims)
    assert a[0, 0] == 3.0 and b[0, 0] == 1.0


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
def test_jax_backend_long_rows_track_b():
    # rows of >= 2**16 entries: 16-bit digits with b narrowed alongside a (track_b),
    # the JAX backend's own scatter histogram that drops inactive entries
    import jax.numpy as jnp
    from topk_core.backends import jax_backend

    n = 1 << 16
    assert jax_backend.digit_bits_for(3, n) == 16
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, n)).astype(np.float32)
    x[0] = np.round(x[0] * 4)  # wide ties: a and b tied, b one key below a's run
    x[1, ::5] = -np.inf  # masked-like entries
    x[1, 7] = np.inf
    x[2, :] = np.float32(1.0) + rng.integers(-2, 3, n) * np.finfo(np.float32).eps
    x[2, 9] = np.nan
    for k in (0, 1, 2, 6553, n - 1, n):
        a, b = jax_backend.select_pair(jnp, jnp.asarray(x), k)
        ea, eb = sort_pair(np.where(np.isnan(x), np.inf, x), k)
        nan_top = np.isnan(x).any(-1, keepdims=True)
        if k in (0, 1):  # the NaN is the largest entry of row 2
            if k == 1:
                ea = np.where(nan_top, np.nan, ea)
            eb = np.where(nan_top, np.nan, eb) if k == 0 else eb
        np.testing.assert_array_equal(np.asarray(a), ea)
        np.testing.assert_array_equal(np.asarray(b), eb)
    kk = np.array([[0], [n // 5], [n]])
    a, b = jax_backend.select_pair(jnp, jnp.asarray(x), jnp.asarray(kk, dtype=jnp.int32))
    want = radix_select_pair(np, x, kk, SHIMS, digit_bits=8)
    np.testing.assert_array_equal(np.asarray(a), want[0])
    np.testing.assert_array_equal(np.asarray(b), want[1])


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
@pytest.mark.parametrize(
    "rows, n",
    [
        (1, (1 << 18) + 3),  # one long row: two halves with their own counters
        (3, 1 << 16),  # a few long rows, 16-bit digits, one scatter per row
        (37, 4100),  # 11-bit digits, two uneven row blocks
        (1030, 300),  # 8-bit digits, three row blocks
    ],
)
def test_jax_backend_counts_and_row_blocks(rows, n):
    # the histogram the JAX selection uses (split into independent scatters) and the
    # tie counts select_pair_counts reads from it, against NumPy
    import jax.numpy as jnp
    from topk_core.backends import jax_backend

    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x[0, : n // 2] = np.round(x[0, : n // 2] * 2)  # long runs of ties
    x[-1, :6] = [0.0, -0.0, 0.0, np.inf, -np.inf, -np.inf]
    bits = jax_backend.digit_bits_for(rows, n)
    digits = np.asarray(SHIMS.to_keys(x) >> np.uint32(32 - bits), dtype=np.int32)
    active = rng.random((rows, n)) < 0.7
    got = np.asarray(jax_backend.SHIMS.row_histogram(jnp.asarray(digits), active, 1 << bits))
    np.testing.assert_array_equal(got, SHIMS.row_histogram(digits, active, 1 << bits))
    ks = [rng.integers(0, n + 1, (rows, 1)).astype(np.int32), 0, 1, n // 10, n]
    for k in ks:
        kj = k if isinstance(k, int) else jnp.asarray(k)
        a, b, ca, cb = jax_backend.select_pair_counts(jnp.asarray(x), kj)
        ea, eb = sort_pair(x, k)
        np.testing.assert_array_equal(np.asarray(a), ea)
        np.testing.assert_array_equal(np.asarray(b), eb)
        fin = np.isfinite(ea)
        want = np.sum(x == ea, axis=-1, keepdims=True)
        np.testing.assert_array_equal(np.asarray(ca)[fin], want[fin])
        if bits < 16:
            assert cb is None
            continue
        fin = np.isfinite(eb)
        want = np.sum(x == eb, axis=-1, keepdims=True)
        np.testing.assert_array_equal(np.asarray(cb)[fin], want[fin])


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
@pytest.mark.parametrize(
    "rows, n, nbins, masked, index",
    [
        (1, 3000, 1 << 16, False, "uint16"),  # every counter addressable in 16 bits
        (256, 40, 1 << 8, False, "uint16"),  # 65536 counters over rows, the last at 0xFFFF
        (3, 500, 1 << 14, True, "uint16"),  # the drop slot (49152) still fits
        (1, 3000, 1 << 16, True, "int32"),  # the drop slot would be 65536
        (257, 40, 1 << 8, False, "int32"),  # 65792 counters
        (1, 3000, 1 << 17, True, "int32"),
    ],
)
def test_jax_histogram_index_width(rows, n, nbins, masked, index):
    # the scatter's indices are 16-bit wherever every index (the drop slot included)
    # fits: same counts as NumPy, the extreme digits included, and the width asserted
    # on the traced scatter (jnp's .at[] would silently widen them to int32)
    import jax
    import jax.numpy as jnp
    from topk_core.backends import jax_backend

    rng = np.random.default_rng(nbins + rows)
    digits = rng.integers(0, nbins, (rows, n)).astype(np.uint32)
    digits[-1, :3] = [nbins - 1, 0, nbins - 1]
    active = rng.random((rows, n)) < 0.6 if masked else np.ones((rows, n), dtype=bool)
    active[-1, :3] = True
    shims = jax_backend.SHIMS
    if masked:
        fn = lambda d, a: shims.row_histogram(d, a, nbins)  # noqa: E731
    else:
        fn = lambda d, a: shims.row_histogram(d, None, nbins)  # noqa: E731
    got = np.asarray(jax.jit(fn)(jnp.asarray(digits), jnp.asarray(active)))
    np.testing.assert_array_equal(got, SHIMS.row_histogram(digits, active, nbins))
    jaxpr = jax.make_jaxpr(fn)(jnp.asarray(digits), jnp.asarray(active))
    widths = {
        str(eqn.invars[1].aval.dtype)
        for eqn in jaxpr.jaxpr.eqns
        if eqn.primitive.name == "scatter-add"
    }
    assert widths == {index}


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
def test_jax_16bit_indices_under_vmap_over_more_rows_than_they_hold():
    # vmap makes each row's 16-bit scatter one batched scatter over 70,000 rows, more
    # than a uint16 index can number: the batch must not wrap into other rows' counters
    import jax
    import jax.numpy as jnp
    from topk_core.backends import jax_backend

    x = np.random.default_rng(7).standard_normal((70_000, 8)).astype(np.float32)
    x[::3, :4] = 0.5  # ties
    a, b = jax.jit(jax.vmap(lambda r: jax_backend.select_pair(jnp, r[None], 3)))(jnp.asarray(x))
    ea, eb = sort_pair(x, 3)
    np.testing.assert_array_equal(np.asarray(a).reshape(-1, 1), ea)
    np.testing.assert_array_equal(np.asarray(b).reshape(-1, 1), eb)


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
@pytest.mark.parametrize("rows, n", [(37, 100), (40, 128)])
def test_jax_backend_batches_in_map_steps(monkeypatch, rows, n):
    # a batch is selected in lax.map steps of a few rows (plus a tail call when the
    # steps do not divide the rows): same pairs and counts as NumPy, int and per-row k
    import jax
    import jax.numpy as jnp
    from topk_core.backends import jax_backend

    monkeypatch.setattr(jax_backend, "MAP_ENTRIES", 1 << 10)
    steps = jax_backend.map_steps(rows, n)
    assert steps > 1
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x[::3, : n // 2] = np.round(x[::3, : n // 2])  # ties
    x[-1, :4] = [np.inf, -np.inf, 0.0, -0.0]
    kk = rng.integers(0, n + 1, (rows, 1)).astype(np.int32)
    # fresh jit wrappers: the backend's own cache may hold these shapes from other tests
    select = jax.jit(jax_backend._radix, static_argnums=(1, 2))
    select_k = jax.jit(jax_backend._radix, static_argnums=2)
    for k in (kk, 0, 7, n):
        ea, eb = sort_pair(x, k)
        if isinstance(k, int):
            a, b, ca, cb = select(jnp.asarray(x), k, True)
            a2, b2 = select(jnp.asarray(x), k, False)
        else:
            a, b, ca, cb = select_k(jnp.asarray(x), jnp.asarray(k), True)
            a2, b2 = select_k(jnp.asarray(x), jnp.asarray(k), False)
        for got_a, got_b in ((a, b), (a2, b2)):
            np.testing.assert_array_equal(np.asarray(got_a), ea)
            np.testing.assert_array_equal(np.asarray(got_b), eb)
        assert cb is None  # 8-bit digits: b from a key maximum
        fin = np.isfinite(ea)
        want = np.sum(x == ea, axis=-1, keepdims=True)
        np.testing.assert_array_equal(np.asarray(ca)[fin], want[fin])
    # a leading batch axis of its own, and vmap over it, take the same path
    x3 = np.stack([x, x[::-1]])
    a, b = jax.jit(jax_backend._radix, static_argnums=(1, 2))(jnp.asarray(x3), 5, False)
    ea, eb = sort_pair(x3, 5)
    np.testing.assert_array_equal(np.asarray(a), ea)
    np.testing.assert_array_equal(np.asarray(b), eb)
    a, b = jax.vmap(lambda t: jax_backend._radix(t, 5))(jnp.asarray(x3))
    np.testing.assert_array_equal(np.asarray(a), ea)
    np.testing.assert_array_equal(np.asarray(b), eb)
    # the steps are a loop in the program on the CPU, and only there
    assert "scan" in str(jax.make_jaxpr(lambda t: jax_backend._radix(t, 5))(jnp.asarray(x)))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "scan" not in str(jax.make_jaxpr(lambda t: jax_backend._radix(t, 5))(jnp.asarray(x)))


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_jax_backend_counts_half_precision_one_pass(dtype):
    # 16-bit keys with 16-bit digits: a single histogram pass, whose bins hold single keys
    import jax.numpy as jnp
    from topk_core.backends import jax_backend

    n = 1 << 16
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((2, n)) * 4, dtype=dtype)  # many ties in 16 bits
    x = x.at[1, :3].set(jnp.asarray([0.0, -0.0, jnp.inf], dtype=dtype))
    xf = np.asarray(x.astype(jnp.float32))  # exact: every 16-bit float is a float32
    for k in (0, 1, n // 10, n // 2, n):
        a, b, ca, cb = jax_backend.select_pair_counts(x, k)
        ea, eb = sort_pair(xf, k)
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), ea)
        np.testing.assert_array_equal(np.asarray(b.astype(jnp.float32)), eb)
        for v, c in ((ea, ca), (eb, cb)):
            fin = np.isfinite(v)
            want = np.sum(xf == v, axis=-1, keepdims=True)
            np.testing.assert_array_equal(np.asarray(c)[fin], want[fin])


@pytest.mark.parametrize("library", ["numpy", "generic", "dask", "torch"])
def test_row_histogram_without_a_mask_counts_every_entry(library):
    # active=None (the driver's first pass) counts what an all-True mask counts
    from topk_core._radix import GenericShims

    rng = np.random.default_rng(3)
    digits = rng.integers(0, 8, (3, 2, 50)).astype(np.uint32)
    ones = np.ones(digits.shape, dtype=bool)
    want = SHIMS.row_histogram(digits, ones, 8)
    if library == "numpy":
        got = SHIMS.row_histogram(digits, None, 8)
    elif library == "generic":
        got = GenericShims(np, lambda a, dt: a.view(dt)).row_histogram(digits, None, 8)
    elif library == "dask":
        da = pytest.importorskip("dask.array")
        from topk_core.backends import dask_backend

        d = da.from_array(digits, chunks=(2, 1, 20))
        got = dask_backend.SHIMS.row_histogram(d, None, 8).compute()
    else:
        torch = pytest.importorskip("torch")
        from topk_core.backends import torch_distributed

        t = torch.from_numpy(digits.astype(np.int64))
        got = torch_distributed.SHIMS.row_histogram(t, None, 8).numpy()
    np.testing.assert_array_equal(np.asarray(got), want)
    assert want.sum() == digits.size
