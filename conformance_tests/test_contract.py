"""Backend contract: cross-backend agreement, determinism, no mutation, dtype/device.

Every library computes on identical (dtype-rounded) inputs and is compared with
topk_core on NumPy float64, using the per-dtype tolerances of
:data:`conformance_tests.libs.TOLERANCE`.  The worst error against the
independent float64 reference (``reference.py``) is recorded for
``--conformance-report``; asserting it is ``test_forward``'s job.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np
import pytest
from topk_core.conformance.libs import FLOAT_DTYPES, TOLERANCE
from topk_core.conformance.reference import ref_dftopk, ref_vjp

import topk_core

# largest finite value per dtype (bfloat16 is not a NumPy dtype)
_MAX = {"float16": 65504.0, "bfloat16": 3.38e38, "float32": 3.4e38, "float64": 1.79e308}


@dataclass
class Case:
    """One input battery entry, in NumPy float64 before dtype rounding."""

    x: np.ndarray
    k: Any
    tau: Any = 1.0
    axis: int = -1
    mask: np.ndarray | None = None
    largest: bool = True


def _cases() -> dict[str, Case]:
    # one shape (4, 16) for all cases: lazy libraries (jax) compile each op once per shape
    rng = np.random.default_rng(6)
    shape = (4, 16)
    # masked-out entries include each row's largest values, so a leaking mask changes a, b
    xm = rng.normal(size=shape)
    mask = rng.random(shape) > 0.3
    mask[np.arange(4), np.argmax(xm, axis=1)] = False
    mask[3, 3:] = False  # a row with fewer than k + 1 valid entries
    # small integers: a and b are each tied several times, so the even split matters
    ties = rng.integers(0, 4, size=shape).astype(np.float64)
    # top three 0.9, 0.8, 0.7 (times the dtype's max): (a + b) / 2 overflows at k = 2
    huge = rng.uniform(-0.6, 0.6, size=shape)
    for r in range(4):
        huge[r, rng.permutation(16)[:3]] = (0.9, 0.8, 0.7)
    return {
        "random": Case(rng.normal(size=shape), 5, tau=0.7),
        "ties": Case(ties, 5, tau=0.5),
        "mask": Case(xm, 4, tau=0.8, mask=mask),
        "per_row_k_axis0": Case(
            rng.normal(size=shape[::-1]),
            np.array([0, 3, 16, 20]),
            tau=np.array([[0.5, 1.0, 2.0, 0.3]]),
            axis=0,
        ),
        "smallest": Case(rng.normal(size=shape), 6, tau=1.3, largest=False),
        "huge": Case(huge, 2),
    }


CASES = _cases()


@dataclass
class Prepared:
    """A case moved into one library in one dtype, plus its float64 twin."""

    kwargs: dict[str, Any]  # library arrays
    kwargs64: dict[str, Any]  # the same values in NumPy float64
    x: Any
    x64: np.ndarray
    g: Any
    g64: np.ndarray
    u: Any
    u64: np.ndarray
    k: Any
    k64: Any


def _prepare(lib, name: str, dtype: str) -> Prepared:
    case = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # fixed per case
    x = case.x * (_MAX[dtype] if name == "huge" else 1.0)

    def both(a: np.ndarray) -> tuple[Any, np.ndarray]:
        arr = lib.asarray(a, dtype)
        return arr, lib.to_numpy(arr).astype(np.float64)

    x_lib, x64 = both(x)
    g_lib, g64 = both(rng.normal(size=x.shape))
    u_lib, u64 = both(rng.normal(size=x.shape))
    kw: dict[str, Any] = {"axis": case.axis, "largest": case.largest}
    kw64 = dict(kw)
    if isinstance(case.tau, np.ndarray):
        kw["tau"], kw64["tau"] = both(case.tau)
    else:
        kw["tau"] = kw64["tau"] = case.tau
    if case.mask is not None:
        kw["mask"], kw64["mask"] = lib.asarray(case.mask), case.mask
    if isinstance(case.k, np.ndarray):
        k_lib, k64 = lib.asarray(case.k.astype(np.int64)), case.k.astype(np.int64)
    else:
        k_lib = k64 = case.k
    return Prepared(kw, kw64, x_lib, x64, g_lib, g64, u_lib, u64, k_lib, k64)


def _cast(ref: np.ndarray, dtype: str) -> np.ndarray:
    """The float64 anchor rounded to ``dtype``'s range (overflow -> inf, as the library)."""
    with np.errstate(over="ignore"):
        return ref.astype(np.float32 if dtype == "bfloat16" else dtype).astype(np.float64)


def _close(got: np.ndarray, ref: np.ndarray, tol: float, what: str, relative: bool) -> None:
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    same_nonfinite = ~np.isfinite(ref)
    np.testing.assert_array_equal(
        got[same_nonfinite], ref[same_nonfinite], err_msg=f"{what}: non-finite entries differ"
    )
    fin = np.isfinite(ref)
    scale = np.maximum(1.0, np.abs(ref[fin])) if relative else 1.0
    err = np.abs(got[fin] - ref[fin]) / scale
    worst = float(err.max(initial=0.0))
    assert np.all(np.isfinite(got[fin])), f"{what}: non-finite where the anchor is finite"
    assert worst <= tol, f"{what}: max error {worst:.3g} > tolerance {tol:g}"


def _skip_missing(lib, dtype: str) -> None:
    if dtype not in lib.dtypes:
        pytest.skip(lib.no_dtype(dtype))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_agrees_with_numpy(lib, dtype, name, conformance_record):
    """Every public function on ``lib`` matches NumPy float64 on the same inputs."""
    _skip_missing(lib, dtype)
    pr = _prepare(lib, name, dtype)
    tol = TOLERANCE[dtype]
    kw, kw64 = pr.kwargs, pr.kwargs64
    kwt = {key: v for key, v in kw.items() if key != "tau"}
    kwt64 = {key: v for key, v in kw64.items() if key != "tau"}
    got = {
        "dftopk": topk_core.dftopk(pr.x, pr.k, **kw),
        "dftopk_logits": topk_core.dftopk_logits(pr.x, pr.k, **kw),
        "topk_threshold": topk_core.topk_threshold(pr.x, pr.k, **kwt),
        "topk_mask": topk_core.topk_mask(pr.x, pr.k, **kwt),
    }
    want = {
        "dftopk": topk_core.dftopk(pr.x64, pr.k64, **kw64),
        "dftopk_logits": topk_core.dftopk_logits(pr.x64, pr.k64, **kw64),
        "topk_threshold": topk_core.topk_threshold(pr.x64, pr.k64, **kwt64),
        "topk_mask": topk_core.topk_mask(pr.x64, pr.k64, **kwt64),
    }
    gx, gtau = topk_core.dftopk_vjp(pr.x, pr.k, pr.g, **kw)
    gx64, gtau64 = topk_core.dftopk_vjp(pr.x64, pr.k64, pr.g64, **kw64)
    p_j, dp = topk_core.dftopk_jvp(pr.x, pr.k, pr.u, **kw)
    p_j64, dp64 = topk_core.dftopk_jvp(pr.x64, pr.k64, pr.u64, **kw64)
    got |= {"vjp_x": gx, "vjp_tau": gtau, "jvp_p": p_j, "jvp_dp": dp}
    want |= {"vjp_x": gx64, "vjp_tau": gtau64, "jvp_p": p_j64, "jvp_dp": dp64}

    # for the report: distance to the independent float64 reference, recorded
    # before the checks below, so that a failing case shows its error too
    ref_p = ref_dftopk(pr.x64, pr.k64, **kw64)
    ref_g, _ = ref_vjp(pr.x64, pr.k64, pr.g64, **kw64)
    p = lib.to_numpy(got["dftopk"]).astype(np.float64)
    g = lib.to_numpy(gx).astype(np.float64)
    conformance_record("forward_err", float(np.max(np.abs(p - ref_p))), lib=lib.name, dtype=dtype)
    conformance_record("grad_err", float(np.max(np.abs(g - ref_g))), lib=lib.name, dtype=dtype)

    for key, ref in want.items():
        out = lib.to_numpy(got[key]).astype(np.float64)
        ref = _cast(np.asarray(ref, dtype=np.float64), dtype)
        if key == "topk_mask":
            np.testing.assert_array_equal(out, ref, err_msg=f"{key} differs from NumPy")
        elif key in ("dftopk", "jvp_p"):
            _close(out, ref, tol, key, relative=False)
        else:
            # logits, thresholds and gradients scale with the data (and 1/tau)
            _close(
                out,
                ref,
                tol * max(1.0, float(np.abs(ref[np.isfinite(ref)]).max(initial=0))),
                key,
                relative=True,
            )


def _all_outputs(pr: Prepared) -> dict[str, Any]:
    kw = pr.kwargs
    kwt = {key: v for key, v in kw.items() if key != "tau"}
    gx, gtau = topk_core.dftopk_vjp(pr.x, pr.k, pr.g, **kw)
    gxl, _ = topk_core.dftopk_vjp(pr.x, pr.k, pr.g, output="logits", **kw)
    p_j, dp = topk_core.dftopk_jvp(pr.x, pr.k, pr.u, **kw)
    return {
        "dftopk": topk_core.dftopk(pr.x, pr.k, **kw),
        "dftopk_logits": topk_core.dftopk_logits(pr.x, pr.k, **kw),
        "topk_threshold": topk_core.topk_threshold(pr.x, pr.k, **kwt),
        "topk_mask": topk_core.topk_mask(pr.x, pr.k, **kwt),
        "vjp_x": gx,
        "vjp_tau": gtau,
        "vjp_logits_x": gxl,
        "jvp_p": p_j,
        "jvp_dp": dp,
    }


@pytest.mark.parametrize("name", ["ties", "mask", "per_row_k_axis0"])
def test_deterministic(lib, name):
    """Two identical calls give bitwise identical results (ties and masks included)."""
    dtype = "float32" if "float32" in lib.dtypes else lib.dtypes[-1]
    pr = _prepare(lib, name, dtype)
    first = {key: lib.to_numpy(v).copy() for key, v in _all_outputs(pr).items()}
    second = {key: lib.to_numpy(v) for key, v in _all_outputs(pr).items()}
    for key in first:
        np.testing.assert_array_equal(second[key], first[key], err_msg=f"{key} not deterministic")


def _snapshot(lib, pr: Prepared) -> dict[str, np.ndarray]:
    arrays = {"x": pr.x, "g": pr.g, "u": pr.u, "k": pr.k}
    arrays |= {key: v for key, v in pr.kwargs.items() if key in ("mask", "tau")}
    # copy: to_numpy may share memory with the library's buffer (torch)
    return {
        key: np.array(lib.to_numpy(v), copy=True)
        for key, v in arrays.items()
        if not isinstance(v, (int, float))
    }


@pytest.mark.parametrize("name", ["mask", "per_row_k_axis0", "smallest"])
def test_inputs_not_mutated(lib, name):
    """No public function writes into x, k, tau, mask, cotangent or tangent."""
    dtype = lib.dtypes[-1]
    pr = _prepare(lib, name, dtype)
    before = _snapshot(lib, pr)
    _all_outputs(pr)
    after = _snapshot(lib, pr)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=f"{key} was modified")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtype_device_shape_preserved(lib, dtype):
    """Outputs keep x's dtype, device and shape; grad_tau keeps tau's dtype and shape."""
    _skip_missing(lib, dtype)
    for name in ("mask", "per_row_k_axis0"):
        pr = _prepare(lib, name, dtype)
        outs = _all_outputs(pr)
        device = array_api_compat.device(pr.x)
        tau = pr.kwargs["tau"]
        for key, out in outs.items():
            if key == "vjp_tau":
                want_dtype = pr.x.dtype if isinstance(tau, float) else tau.dtype
                want_shape = () if isinstance(tau, float) else tuple(tau.shape)
            else:
                want_dtype = pr.x.dtype
                want_shape = tuple(pr.x.shape)
                if key == "topk_threshold":
                    want_shape = tuple(
                        1 if d == pr.kwargs["axis"] % pr.x.ndim else s
                        for d, s in enumerate(want_shape)
                    )
            assert out.dtype == want_dtype, f"{name}/{key}: dtype {out.dtype} != {want_dtype}"
            assert tuple(out.shape) == want_shape, f"{name}/{key}: shape {tuple(out.shape)}"
            got_device = array_api_compat.device(out)
            assert got_device == device, f"{name}/{key}: device {got_device} != {device}"
