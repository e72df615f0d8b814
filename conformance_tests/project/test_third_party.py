"""Libraries reached through array-api-compat, beyond what the suite checks on them.

The suite itself (``python -m topk_core.conformance --array-module dask.array``,
``... ndonnx``) checks results; here: Dask stays lazy (no compute inside
topk-core, whatever the chunking, the selection axis included), and each library
gets arrays of its own back.
"""

from __future__ import annotations

import numpy as np
import pytest

import topk_core as tk
from topk_core._registry import get_backend, library_name


def _no_compute(*args, **kwargs):
    raise AssertionError("topk-core computed a Dask array")


@pytest.mark.parametrize("chunks", [(2, 5), (4, 20), (1, 3)])
def test_dask_stays_lazy_with_chunks_along_the_selection_axis(chunks):
    dask = pytest.importorskip("dask")
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 20))
    x[1, 4] = np.nan
    g = rng.standard_normal(x.shape)
    k = np.array([0, 3, 20, 7])
    mask = rng.random(x.shape) > 0.2
    d = {name: da.from_array(v, chunks=chunks) for name, v in (("x", x), ("g", g), ("m", mask))}
    dk = da.from_array(k, chunks=2)
    with dask.config.set(scheduler=_no_compute):  # any compute inside topk-core raises
        out = {
            "p": tk.dftopk(d["x"], 3, tau=0.5),
            "p_rowk_mask": tk.dftopk(d["x"], dk, mask=d["m"]),
            "z_axis0": tk.dftopk_logits(d["x"], 2, axis=0, largest=False),
            "th": tk.topk_threshold(d["x"], dk),
            "hard": tk.topk_mask(d["x"], 5, mask=d["m"]),
            "vjp": tk.dftopk_vjp(d["x"], 3, d["g"], tau=0.5)[0],
            "jvp": tk.dftopk_jvp(d["x"], dk, d["g"])[1],
        }
    assert all(isinstance(v, da.Array) for v in out.values())
    ref = {
        "p": tk.dftopk(x, 3, tau=0.5),
        "p_rowk_mask": tk.dftopk(x, k, mask=mask),
        "z_axis0": tk.dftopk_logits(x, 2, axis=0, largest=False),
        "th": tk.topk_threshold(x, k),
        "hard": tk.topk_mask(x, 5, mask=mask),
        "vjp": tk.dftopk_vjp(x, 3, g, tau=0.5)[0],
        "jvp": tk.dftopk_jvp(x, k, g)[1],
    }
    got = dask.compute(out, scheduler="threads")[0]
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], atol=1e-12, err_msg=key)
    assert library_name(d["x"]) == "dask"
    assert get_backend("dask").select_pair is not None


def test_ndonnx_matches_numpy():
    ndx = pytest.importorskip("ndonnx")
    pytest.importorskip("onnxruntime")  # value propagation
    x = np.random.default_rng(4).standard_normal((3, 9))
    p = tk.dftopk(ndx.asarray(x), 4, tau=0.3)
    assert library_name(p) == "ndonnx"
    np.testing.assert_allclose(p.unwrap_numpy(), tk.dftopk(x, 4, tau=0.3), atol=1e-12)


def test_sparse_forward_matches_numpy():
    sparse = pytest.importorskip("sparse")
    x = np.random.default_rng(5).standard_normal((3, 9))
    p = tk.dftopk(sparse.asarray(x), 4, tau=0.3)
    assert library_name(p) == "sparse"
    np.testing.assert_allclose(p.todense(), tk.dftopk(x, 4, tau=0.3), atol=1e-12)
    # its namespace has no arange / cumulative_sum: the project's error, not sparse's
    k_rows = sparse.asarray(np.array([1, 2, 3]))
    with pytest.raises(TypeError, match=r"library sparse has no arange\(\).*per-row k"):
        tk.dftopk(sparse.asarray(x), k_rows)
    with pytest.raises(TypeError, match=r"library sparse has no cumulative_sum\(\).*hard"):
        tk.topk_mask(sparse.asarray(np.ones((3, 9))), 4)
