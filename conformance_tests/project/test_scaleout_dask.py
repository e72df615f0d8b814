"""Dask: DFTopK over a selection axis that spans many chunks.

Every result is compared with NumPy on the same (computed) data.  Checks that
the call stays lazy, the output keeps the input's chunks, the graph holds no
rechunk or sort, and no task produces more than O(chunk) bytes; then the same
on a ``dask.distributed.LocalCluster`` with 2 worker processes on 127.0.0.1.
About 15 s here, most of it starting the cluster.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import topk_core as tk

da = pytest.importorskip("dask.array", reason="dask[array] is not installed (extra [dask])")
import dask  # noqa: E402
from dask.callbacks import Callback  # noqa: E402

TIMEOUT_S = 120


def _close(got, want, atol=1e-6):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    fin = np.isfinite(want)
    np.testing.assert_array_equal(got[~fin], want[~fin])
    np.testing.assert_allclose(got[fin], want[fin], rtol=atol, atol=atol)


def _data(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


LAYOUTS = [
    ((4, 1000), (4, 100)),  # 10 chunks along the axis
    ((4, 1000), (3, (1, 400, 99, 500))),  # uneven chunks, rows split too
    ((2, 3, 500), (1, 3, 64)),  # 3-d, 8 chunks along the axis
]


@pytest.mark.parametrize(("shape", "chunks"), LAYOUTS)
def test_forward_threshold_mask_match_numpy(shape, chunks):
    xn = _data(shape)
    xn.reshape(-1, shape[-1])[0, :300] = np.round(xn.reshape(-1, shape[-1])[0, :300])  # ties
    x = da.from_array(xn, chunks=chunks)
    n = shape[-1]
    lazy, want = [], []
    for k in (0, 1, 37, n // 2, n - 1, n):
        for fn in (tk.dftopk, tk.dftopk_logits):
            lazy.append(fn(x, k, tau=0.3))
            want.append(fn(xn, k, tau=0.3))
        lazy += [tk.topk_threshold(x, k), tk.topk_mask(x, k)]
        want += [tk.topk_threshold(xn, k), tk.topk_mask(xn, k)]
    for out in lazy:
        assert isinstance(out, da.Array)
        assert out.chunks == x.chunks or out.shape[-1] == 1
    for got, w in zip(dask.compute(*lazy), want):
        _close(got, w)


def test_axis_largest_mask_per_row_k_infinities():
    rng = np.random.default_rng(1)
    xn = _data((600, 5), seed=1)
    xn[:40, 0] = np.inf
    xn[::3, 1] = -np.inf
    xn[7, 2] = np.nan
    xn[:, 3] = np.round(xn[:, 3])
    mn = rng.random((600, 5)) > 0.3
    kn = np.array([0, 39, 41, 599, 600])
    x = da.from_array(xn, chunks=(64, 2))
    mask = da.from_array(mn, chunks=(100, 5))
    k = da.from_array(kn)
    lazy, want = [], []
    for largest in (True, False):
        kw = dict(axis=0, largest=largest)
        for fn in (tk.dftopk, tk.dftopk_logits):
            lazy += [fn(x, k, mask=mask, tau=0.5, **kw), fn(x, 40, tau=0.5, **kw)]
            want += [fn(xn, kn, mask=mn, tau=0.5, **kw), fn(xn, 40, tau=0.5, **kw)]
        lazy += [tk.topk_threshold(x, k, mask=mask, **kw), tk.topk_mask(x, k, mask=mask, **kw)]
        want += [tk.topk_threshold(xn, kn, mask=mn, **kw), tk.topk_mask(xn, kn, mask=mn, **kw)]
    for got, w in zip(dask.compute(*lazy), want):
        _close(got, w)


def test_vjp_jvp_and_vjp_match_numpy():
    xn = _data((3, 900), seed=2)
    xn[0, :450] = np.round(xn[0, :450])
    gn = _data((3, 900), seed=3)
    un = _data((3, 900), seed=4)
    mn = np.random.default_rng(5).random((3, 900)) > 0.2
    tau_row = np.array([[0.3], [1.0], [2.0]], dtype=np.float32)
    x, g, u, mask = (da.from_array(a, chunks=(2, 128)) for a in (xn, gn, un, mn))
    lazy, want = [], []
    for tau_n, tau, output, k in (
        (0.6, 0.6, "probs", 5),
        (tau_row, da.from_array(tau_row), "logits", 450),
        (tau_row, da.from_array(tau_row), "probs", 899),
    ):
        kw = dict(mask=mask, output=output, tau=tau)
        kwn = dict(mask=mn, output=output, tau=tau_n)
        lazy += [*tk.dftopk_vjp(x, k, g, **kw), *tk.dftopk_jvp(x, k, u, **kw)]
        want += [*tk.dftopk_vjp(xn, k, gn, **kwn), *tk.dftopk_jvp(xn, k, un, **kwn)]
        out, vjp = tk.dftopk_and_vjp(x, k, **kw)
        wout, wvjp = tk.dftopk_and_vjp(xn, k, **kwn)
        lazy += [out, *vjp(g)]
        want += [wout, *wvjp(gn)]
    assert lazy[0].chunks == x.chunks
    for got, w in zip(dask.compute(*lazy), want):
        _close(got, w, 1e-5)


def _boom(block):
    raise RuntimeError("computed too early")


def test_lazy_no_rechunk_no_sort():
    x = da.from_array(_data((2, 4096)), chunks=(1, 256)).map_blocks(_boom, dtype=np.float32)
    p = tk.dftopk(x, 100)  # builds the graph only
    gx, _ = tk.dftopk_vjp(x, 100, x)
    for arr in (p, gx):
        assert arr.chunks == x.chunks
        names = " ".join(str(name) for name in arr.dask.layers)
        for word in ("rechunk", "sort", "topk", "partition"):
            assert word not in names, f"{word} in the graph"
    with pytest.raises(RuntimeError, match="computed too early"):
        p.compute(scheduler="sync")


def test_outputs_keep_x_chunks_whatever_the_other_arguments_chunks():
    """README: outputs (the VJP's and JVP's too) are chunked like ``x``, also where a
    per-row ``k`` or ``tau``, the mask or the cotangent is chunked otherwise (before
    2026-12-06 the outputs took the finer row chunks of ``k`` or ``tau``)."""
    rng = np.random.default_rng(3)
    xn = _data((4, 4000))
    x = da.from_array(xn, chunks=(4, 500))
    k = da.from_array(np.array([1, 10, 100, 400]), chunks=2)
    tau = da.from_array(rng.uniform(0.5, 2.0, (4, 1)).astype(np.float32), chunks=(2, 1))
    mask = da.from_array(rng.random((4, 4000)) > 0.3, chunks=(1, 700))
    g = da.from_array(rng.standard_normal((4, 4000)).astype(np.float32), chunks=(2, 1000))
    outs = [
        tk.dftopk(x, k),
        tk.dftopk(x, 10, tau=tau, mask=mask),
        tk.topk_mask(x, k, mask=mask),
        *tk.dftopk_vjp(x, k, g, tau=tau)[:1],
        tk.dftopk_jvp(x, k, g, tau=tau)[1],
    ]
    for out in outs:
        assert out.chunks == x.chunks
    kn, tn = np.array([1, 10, 100, 400]), np.asarray(tau)
    np.testing.assert_allclose(outs[0].compute(), tk.dftopk(xn, kn), atol=1e-6)
    gx = tk.dftopk_vjp(xn, kn, np.asarray(g), tau=tn)[0]
    # float32 row sums in another order (per chunk vs NumPy's einsum, whose SIMD lanes
    # differ between AVX2 and AVX-512): a few ulp of gradients up to about 4
    np.testing.assert_allclose(outs[3].compute(), gx, rtol=2e-6, atol=1e-6)


class _Sizes(Callback):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def _posttask(self, key, result, dsk, state, worker_id):
        # "finalize" is dask.compute concatenating the result for the caller
        if not str(key).startswith("finalize"):
            self.largest = max(self.largest, getattr(result, "nbytes", 0))


def test_memory_per_task_is_per_chunk():
    rows, n, width = 2, 2**18, 2**13  # 32 chunks along the axis
    # generated chunk by chunk: no task ever holds the whole array
    x = da.random.default_rng(6).standard_normal((rows, n), chunks=(rows, width), dtype=np.float32)
    g = da.ones_like(x)
    sizes = _Sizes()
    with sizes:
        p, vjp = tk.dftopk_and_vjp(x, 1000, tau=0.5)
        got = dask.compute(p, vjp(g)[0], x, scheduler="sync")
    # the widest per-chunk arrays: float64/int64 temporaries or counts
    chunk_bytes = rows * width * 8
    assert 0 < sizes.largest <= chunk_bytes, (sizes.largest, chunk_bytes)
    want_p, want_vjp = tk.dftopk_and_vjp(got[2], 1000, tau=0.5)
    _close(got[0], want_p)
    _close(got[1], want_vjp(np.ones_like(got[2]))[0], 1e-5)


def test_many_chunks_tree_reduction():
    xn = _data((1, 20000), seed=7)
    x = da.from_array(xn, chunks=(1, 100))  # 200 chunks: a tree of depth 3 at fan-in 8
    _close(tk.dftopk(x, 2000).compute(), tk.dftopk(xn, 2000))


def test_float64_float16():
    for dtype in (np.float64, np.float16):
        xn = _data((2, 700), seed=8, dtype=dtype)
        x = da.from_array(xn, chunks=(1, 90))
        got = tk.dftopk(x, 70, tau=0.5).compute()
        assert got.dtype == dtype
        _close(got, tk.dftopk(xn, 70, tau=0.5), 1e-3 if dtype == np.float16 else 1e-12)


def test_array_tau_checked_when_computed():
    """An array tau's values are checked in the graph: the call computes nothing, and
    the result's compute() raises the ValueError that NumPy raises at the call."""
    xn = _data((3, 200))
    x = da.from_array(xn, chunks=(1, 50))
    for bad, match in ((-1.0, "finite and > 0"), (np.nan, "finite and > 0"), (1e-320, "within")):
        tn = np.array([[0.5], [bad], [2.0]])
        with pytest.raises(ValueError, match=match):
            tk.dftopk(xn, 20, tau=tn)
        tau = da.from_array(tn, chunks=(1, 1))
        lazy = tau.map_blocks(_boom, dtype=tau.dtype)
        tk.dftopk(x, 20, tau=lazy)  # builds the graph only
        tk.dftopk_vjp(x, 20, x, tau=lazy)
        for out in (tk.dftopk(x, 20, tau=tau), tk.dftopk_vjp(x, 20, x, tau=tau)[0]):
            with pytest.raises(ValueError, match=match):
                out.compute(scheduler="sync")
    good = da.from_array(np.array([[0.5], [1.0], [2.0]]), chunks=(1, 1))
    _close(tk.dftopk(x, 20, tau=good).compute(), tk.dftopk(xn, 20, tau=good.compute()))


@pytest.mark.parametrize(("shape", "chunks"), [((7,), (7,)), ((9, 2, 5), (4, 1, 5))])
def test_locate_runs_the_drivers_own_function_per_row_chunk(shape, chunks):
    from topk_core.backends.dask_backend import SHIMS
    from topk_core.backends.numpy_backend import SHIMS as NUMPY

    from topk_core._radix import locate_bin

    rng = np.random.default_rng(0)
    lead = shape[:-1]
    hist = rng.integers(0, 3, size=(*lead, 256)) + (np.arange(256) == 7)
    remaining = rng.integers(1, 1 << 20, size=(*lead, 1)) % hist.sum(-1, keepdims=True) + 1
    want = locate_bin(np, hist, remaining, 8, NUMPY.block_bins)
    got = SHIMS.locate(
        da.from_array(hist, chunks=chunks[:-1] + (64,)),
        da.from_array(remaining, chunks=chunks[:-1] + (1,)),
        8,
    )
    for g, w in zip(got, want, strict=True):
        assert g.chunks[:-1] == da.from_array(remaining, chunks=chunks[:-1] + (1,)).chunks[:-1]
        np.testing.assert_array_equal(g.compute(), w)


@pytest.mark.parametrize(
    ("shape", "chunks"), [((50,), (20,)), ((3, 2, 40), (2, 1, 15)), ((4, 30), (4, 30))]
)
def test_prefix_histogram_runs_the_drivers_own_function_per_chunk(shape, chunks):
    from topk_core.backends.dask_backend import SHIMS
    from topk_core.backends.numpy_backend import SHIMS as NUMPY

    from topk_core._radix import pass_histogram

    rng = np.random.default_rng(1)
    keys = rng.integers(0, 1 << 16, size=shape).astype(np.uint32)
    keys[..., :9] = keys[..., :1]  # candidates shared by several chunks
    prefix = keys[..., :1] >> 8 << 8
    dkeys = da.from_array(keys, chunks=chunks)
    for shift, width, first in ((8, 8, True), (3, 5, False), (0, 8, False)):
        p = prefix if first else keys[..., :1] >> (shift + width) << (shift + width)
        want = pass_histogram(np, keys, p, shift, width, first, NUMPY.row_histogram)
        # the prefix chunked unlike the keys' rows, as the driver's per-row values may be
        got = SHIMS.prefix_histogram(dkeys, da.from_array(p, chunks=1), shift, width, first)
        assert got.shape == want.shape and got.chunks[:-1] == dkeys.chunks[:-1]
        np.testing.assert_array_equal(got.compute(), want)


def test_the_graph_of_one_call_stays_small():
    """The selection's per-row search is one task per row chunk and pass (the driver's
    Array API calls made it 477 layers before 2026-12-07: 0.7 s to build at 6 x 40),
    and a pass adds no full-size layer: each histogram task finds its candidates from
    the keys and the prefix (the carried digits and mask made 55 full-size layers of
    196 for float64, 39 for float32's half as many passes)."""
    layers = {}
    for dtype in (np.float64, np.float32):  # 8 and 4 passes of 8-bit digits
        x = da.from_array(_data((6, 40)).astype(dtype), chunks=(2, 20))
        graph = tk.dftopk(x, 9).dask.layers
        full = [v for v in graph.values() if v.collection_annotations["shape"] == (6, 40)]
        layers[dtype] = (len(graph), len(full))
    assert layers[np.float64][0] < 190
    assert layers[np.float64][1] == layers[np.float32][1] < 30


@pytest.mark.parametrize("changed", ["x", "mask"])
@pytest.mark.parametrize("chunks", [(2, 3), (2, 6)], ids=["chunks", "one-chunk-a-row"])
def test_vjp_ignores_later_setitem_on_the_inputs(changed, chunks):
    """``x[...] = v`` rebinds a Dask array to a new graph in place; the ``vjp`` of
    ``dftopk_and_vjp`` is still the gradient at the forward's ``x`` and mask (it
    followed the caller's objects before 2026-12-07: 6 conformance failures)."""
    xn = np.array([[4.0, 1.0, 3.0, 2.0, 3.0, 0.0], [0.5, -1.0, 2.0, 2.0, 0.0, 1.5]])
    mn = np.array([[True] * 6, [True, False, True, True, True, True]])
    g = da.from_array(np.linspace(-1.0, 1.0, 12).reshape(2, 6), chunks=chunks)
    args = {"x": da.from_array(xn, chunks=chunks), "mask": da.from_array(mn, chunks=chunks)}
    want = tk.dftopk_vjp(xn, 2, g.compute(), tau=0.5, mask=mn)
    _, vjp = tk.dftopk_and_vjp(args["x"], 2, tau=0.5, mask=args["mask"])
    args[changed][...] = {"x": xn[:, ::-1] + 1.0, "mask": ~mn}[changed]
    for got, w in zip(vjp(g), want, strict=True):
        _close(got.compute(), w, atol=1e-12)


def test_cascade_stage_sizes_checked_when_computed():
    """Dask k arrays of a cascade are compared when the loss is computed (differently
    chunked stages included), and the call computes nothing; the same k from NumPy
    raises at the call."""
    from topk_core.losses import cascade_joint_loss

    sn = [_data((6, 40), seed=s) for s in (1, 2)]
    rel = _data((6, 40), seed=3)
    s = [da.from_array(a, chunks=(2, 20)) for a in sn]
    r = da.from_array(rel, chunks=(3, 40))
    k0n, k1n = np.array([9, 9, 9, 9, 9, 9]), np.array([4, 4, 4, 10, 4, 4])
    with pytest.raises(ValueError, match=r"k\[1\] > k\[0\] in some rows"):
        cascade_joint_loss(sn, rel, [k0n, k1n])
    k0, k1 = da.from_array(k0n, chunks=4), da.from_array(k1n, chunks=(1, 5))
    lazy = [k.map_blocks(_boom, dtype=k.dtype) for k in (k0, k1)]
    cascade_joint_loss(s, r, lazy)  # builds the graph only
    for ks in ([k0, k1], [9, k1], [k0, 10], [k1n.max(), k0, k1]):
        loss = cascade_joint_loss([s[0]] * (len(ks) - 2) + s, r, ks)
        with pytest.raises(ValueError, match=r"k\[\d\] > k\[\d\] in some rows"):
            loss.compute(scheduler="sync")
    good = da.from_array(np.array([4, 4, 4, 9, 4, 4]), chunks=(1, 5))
    got = cascade_joint_loss(s, r, [k0, good], return_terms=True)
    want = cascade_joint_loss(sn, rel, [k0n, good.compute()], return_terms=True)
    _close(got[0].compute(), want[0])
    for t, w in zip(got[1], want[1]):
        _close(t.compute(), w)


@pytest.mark.parametrize("shape", [(0, 100), (2, 0, 100)], ids=str)
def test_empty_batch(shape):
    """dask's min/max fail on an empty batch even along a non-empty axis: nothing to select."""
    x = da.zeros(shape, chunks=(1,) * (len(shape) - 1) + (10,))
    for k in (3, da.full(shape[:-1], 3, dtype=np.int64)):
        for out in (tk.dftopk(x, k), tk.topk_mask(x, k), tk.dftopk_vjp(x, k, x)[0]):
            assert out.compute().shape == shape
        assert tk.topk_threshold(x, k).compute().shape == shape[:-1] + (1,)


def test_errors():
    x = da.from_array(_data((2, 100)), chunks=(1, 10))
    with pytest.raises(TypeError, match="chunks"):
        tk.dftopk(x, 3, group="d")
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        tk.dftopk(x[x > 0], 3)
    # an x-shaped argument of unknown shape gets the same hint, naming itself
    y = da.from_array(_data((4, 50)), chunks=(1, 10))
    g = y[y[:, 0] > -np.inf]  # every row kept, but the row count is unknown until computed
    with pytest.raises(ValueError, match=r"cotangent must have a known shape.*compute_chunk_sizes"):
        tk.dftopk_vjp(y, 3, g)
    with pytest.raises(ValueError, match=r"tangent must have a known shape.*compute_chunk_sizes"):
        tk.dftopk_jvp(y, 3, g)
    t = da.from_array(np.ones((4, 1)), chunks=(1, 1))
    t = t[t[:, 0] > 0]
    with pytest.raises(ValueError, match=r"tau_tangent must have a known shape.*compute_chunk"):
        tk.dftopk_jvp(y, 3, y, tau=da.ones((4, 1)), tau_tangent=t)
    with pytest.raises(TypeError, match="one library"):
        tk.dftopk(x, 3, mask=np.ones((2, 100), bool))
    with pytest.raises(ValueError, match="k must satisfy"):
        tk.dftopk(x, 101)


def test_import_topk_core_does_not_import_dask(tmp_path):
    code = (
        "import sys, numpy as np, topk_core\n"
        "topk_core.dftopk(np.ones(4), 2)\n"
        "print('dask' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.fixture
def client():
    """A two-process local cluster for one test: a Client becomes Dask's default
    scheduler, so one that outlived its test sent every later ``compute()`` in this
    module through the cluster (the empty-chunks test took 15-20 s instead of 4)."""
    distributed = pytest.importorskip(
        "distributed", reason="dask.distributed is not installed (dask[distributed])"
    )
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        worker_dashboard_address=None,
        scheduler_port=0,
        silence_logs=40,
        timeout=TIMEOUT_S,
    )
    c = distributed.Client(cluster, timeout=TIMEOUT_S)
    try:
        c.wait_for_workers(2, timeout=TIMEOUT_S)
        yield c
    finally:
        c.close(timeout=30)
        cluster.close(timeout=30)


def test_local_cluster_two_worker_processes(client):
    import os

    pids = set(client.run(os.getpid).values())
    assert len(pids) == 2 and os.getpid() not in pids
    xn = _data((3, 5000), seed=9)
    xn[1, :2500] = np.round(xn[1, :2500])
    gn = _data((3, 5000), seed=10)
    mn = np.random.default_rng(11).random((3, 5000)) > 0.1
    kn = np.array([1, 2000, 4999])
    x, g, mask = (da.from_array(a, chunks=(2, 500)) for a in (xn, gn, mn))
    k = da.from_array(kn)
    p, vjp = tk.dftopk_and_vjp(x, k, mask=mask, tau=0.4)
    gx, gt = vjp(g)
    m = tk.topk_mask(x, k, mask=mask)
    from distributed import get_task_stream

    with get_task_stream(client) as stream:
        got = client.gather(client.compute([p, gx, gt, m]), errors="raise")
    # the tasks ran in both worker processes
    assert len({t["worker"] for t in stream.data}) == 2
    wp, wvjp = tk.dftopk_and_vjp(xn, kn, mask=mn, tau=0.4)
    wgx, wgt = wvjp(gn)
    _close(got[0], wp)
    _close(got[1], wgx, 1e-5)
    _close(got[2], wgt, 1e-5)
    np.testing.assert_array_equal(got[3], tk.topk_mask(xn, kn, mask=mn))
    # an array tau's check runs in the worker processes and raises out of the result
    bad = da.from_array(np.array([[0.4], [-1.0], [0.4]]), chunks=(2, 1))
    with pytest.raises(ValueError, match="tau must be finite and > 0"):
        client.compute(tk.dftopk(x, k, mask=mask, tau=bad)).result(timeout=TIMEOUT_S)
    # so does a cascade's check that k does not increase (k[1] = 2000 > 1000 in row 1)
    from topk_core.losses import cascade_joint_loss

    loss = cascade_joint_loss([x, g], x, [1000, k], mask=mask)
    with pytest.raises(ValueError, match=r"k\[1\] > k\[0\] in some rows"):
        client.compute(loss).result(timeout=TIMEOUT_S)


def test_docstring_examples():
    import doctest

    from topk_core.backends import dask_backend

    result = doctest.testmod(dask_backend, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 5)])
def test_generic_backend_on_empty_dask_batches(shape):
    """Dask through the generic backend (the README's third-party row): an empty batch
    failed on compute (Dask's max of an empty block, "zero-size array to reduction
    operation maximum") before 2026-12-06; the built-in Dask backend never did."""
    x = da.from_array(np.zeros(shape), chunks=tuple(max(s, 1) for s in shape))
    tk.register_backend("dask", "topk_core.backends.generic:GENERIC_BACKEND")
    try:
        p = tk.dftopk(x, 2).compute()
        gx, _ = tk.dftopk_vjp(x, 2, x)
        theta = tk.topk_threshold(x, 2).compute()
        mask = tk.topk_mask(x, da.ones(shape[:-1], dtype=np.int64, chunks=1)).compute()
        gx = gx.compute()
    finally:
        tk.register_backend("dask", "topk_core.backends.dask_backend:BACKEND")
    assert p.shape == gx.shape == mask.shape == shape
    assert theta.shape == shape[:-1] + (1,)


def test_empty_chunks_along_the_axis():
    """Empty chunks along the selection axis (boolean indexing, then
    compute_chunk_sizes(), as the error for unknown chunks advises) failed on compute
    before 2026-12-06 (Dask's keepdims max and cumsum on an empty block); now the
    selection runs without them and every output keeps x's own chunks."""
    xn = _data((3, 9), seed=5).astype(np.float64)
    xn[1, 2] = xn[1, 7]  # a tie
    x = da.from_array(xn, chunks=((2, 1), (2, 0, 4, 0, 3)))
    mask_n = xn > -1.5
    mask = da.from_array(mask_n, chunks=((1, 2), (3, 3, 3)))
    k_n = np.array([1, 3, 9])
    k = da.from_array(k_n, chunks=1)
    for fn in (tk.dftopk, tk.dftopk_logits, tk.topk_mask):
        got = fn(x, k, mask=mask)
        assert got.chunks == x.chunks
        _close(got.compute(), fn(xn, k_n, mask=mask_n))
    theta = tk.topk_threshold(x, 2)
    _close(theta.compute(), tk.topk_threshold(xn, 2))
    gx, gt = tk.dftopk_vjp(x, k, x, tau=0.7, mask=mask)
    gxn, gtn = tk.dftopk_vjp(xn, k_n, xn, tau=0.7, mask=mask_n)
    assert gx.chunks == x.chunks
    _close(gx.compute(), gxn)
    _close(gt.compute(), gtn)
    # one row, the case the review found: topk_mask's cumsum
    v = da.from_array(np.array([3.0, 1.0, -1.0, -2.0, 2.0, 2.5]), chunks=2)
    v = v[v > 0.7].compute_chunk_sizes()
    assert 0 in v.chunks[0]
    assert v.chunks == tk.topk_mask(v, 2).chunks
    np.testing.assert_array_equal(tk.topk_mask(v, 2).compute(), [1.0, 0.0, 0.0, 1.0])
