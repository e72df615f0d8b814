"""Negative controls of the linear-scaling check: it must flag a quadratic selection.

A sort-based selection (n log n) is measured and reported, not asserted (see
:mod:`topk_core.conformance.scaling`).
"""

from __future__ import annotations

import numpy as np
import pytest
from topk_core.conformance.scaling import (
    BOUND,
    CONTROL_SIZES,
    SIZES,
    TAU,
    _forward_with,
    check_linear,
    quadratic_select_pair,
    sort_select_pair,
)

import topk_core


def test_quadratic_select_is_correct(rng):
    """The control computes the right answer (so the check flags cost, not a bug)."""
    x = np.round(rng.standard_normal((3, 50)), 1)  # with ties
    for k in (0, 1, 7, 49, 50):
        a, b = quadratic_select_pair(np, x, k)
        s = np.sort(x, axis=-1)[:, ::-1]
        ext = np.concatenate([np.full((3, 1), np.inf), s, np.full((3, 1), -np.inf)], axis=1)
        np.testing.assert_array_equal(a[:, 0], ext[:, k])
        np.testing.assert_array_equal(b[:, 0], ext[:, k + 1])
    np.testing.assert_allclose(
        _forward_with(quadratic_select_pair)(x), topk_core.dftopk(x, 5, tau=TAU), rtol=1e-12
    )


def test_sort_control_really_sorts(rng, monkeypatch):
    """The n log n control is a full sort, not NumPy's O(n) ``np.partition``."""

    def no_partition(*args, **kwargs):
        raise AssertionError("the sort control must not use np.partition (O(n))")

    x = np.round(rng.standard_normal((3, 50)), 1)  # with ties
    want = _forward_with(quadratic_select_pair)(x)
    monkeypatch.setattr(np, "partition", no_partition)
    monkeypatch.setattr(np, "argpartition", no_partition)
    for k in (0, 1, 7, 49, 50):
        a, b = sort_select_pair(np, x, k)
        qa, qb = quadratic_select_pair(np, x, k)
        np.testing.assert_array_equal(a, qa)
        np.testing.assert_array_equal(b, qb)
    np.testing.assert_allclose(_forward_with(sort_select_pair)(x), want, rtol=1e-12)


@pytest.mark.scaling
def test_quadratic_control_is_flagged(conformance_record):
    """The same check flags an O(n^2) selection; the O(n log n) sort is measured and reported."""
    rng = np.random.default_rng(3)

    def make(n: int) -> np.ndarray:
        return rng.standard_normal(n).astype(np.float32)

    quad = check_linear(
        _forward_with(quadratic_select_pair), np.exp, make, CONTROL_SIZES, repeats=3
    )
    print(
        f"quadratic control: normalised exponent {quad.exponent:.3f} (raw {quad.raw_exponent:.3f})"
    )
    assert not quad.passed, (
        f"quadratic selection was not flagged: exponent {quad.exponent:.2f} <= {BOUND} "
        f"after {quad.attempts} attempts"
    )

    srt = check_linear(_forward_with(sort_select_pair), np.exp, make, SIZES, retries=0)
    print(f"sort control: normalised exponent {srt.exponent:.3f} (raw {srt.raw_exponent:.3f})")
    conformance_record("scaling_fwd", quad.exponent, lib="control: quadratic select (numpy)")
    conformance_record("scaling_fwd", srt.exponent, lib="control: sort select (numpy)")


def test_timing_waits_for_cuda_tensors(monkeypatch):
    """Timed calls wait for torch's CUDA queue (kernels run asynchronously there)."""
    torch = pytest.importorskip("torch")
    from topk_core.conformance import scaling

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))

    class CudaLike:  # a result on a CUDA device, without needing one
        device = torch.device("cuda", 0)

    scaling._block((CudaLike(), [torch.zeros(2)]))
    assert waited == [torch.device("cuda", 0)]  # once, and not for the CPU tensor
