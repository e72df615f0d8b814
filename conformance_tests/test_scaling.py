"""Linear-scaling check per library (``-m scaling``; method in :mod:`.scaling`).

Forward and forward+backward, n = 2^12 .. 2^20, float32, k = n/10: the
normalised exponent must stay below :data:`topk_core.conformance.scaling.BOUND`.
"""

from __future__ import annotations

import pytest
from topk_core.conformance.scaling import BOUND, _ops, check_linear


@pytest.fixture
def single_thread_torch(lib):
    """Time torch on one thread: with its 2-thread pool on the shared 2-core machine,
    ``torch.exp`` of 4096 floats measured 4-9 ms instead of 5 us."""
    if lib.name != "torch":
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.scaling
def test_linear_scaling(lib, conformance_record, single_thread_torch):
    """Forward and forward+backward scale linearly in n (normalised exponent <= BOUND)."""
    make, elementwise, fwd, fwd_bwd, how = _ops(lib)
    results = {}
    for kind, op in (("scaling_fwd", fwd), ("scaling_fwd_bwd", fwd_bwd)):
        res = check_linear(op, elementwise, make)
        results[kind] = res
        conformance_record(kind, res.exponent, lib=lib.name)
    conformance_record.note(lib.name, f"scaling: n = 2^12..2^20 float32, backward via {how}")
    for kind, res in results.items():
        print(
            f"{lib.name} {kind}: normalised exponent {res.exponent:.3f} "
            f"(raw {res.raw_exponent:.3f}, attempts {res.attempts}), "
            f"t(2^20) = {res.times[-1] * 1e3:.2f} ms vs exp {res.ref_times[-1] * 1e3:.2f} ms"
        )
    for kind, res in results.items():
        assert res.passed, (
            f"{lib.name} {kind} scales with normalised exponent {res.exponent:.2f} > {BOUND} "
            f"(sizes {res.sizes}, times {[f'{t:.3g}' for t in res.times]} s, "
            f"elementwise {[f'{t:.3g}' for t in res.ref_times]} s)"
        )
