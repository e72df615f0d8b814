"""The NumPy backend's threaded ufunc chains (``numpy_soft.set_num_threads``).

Parts of an array run the same ufuncs on the same values as the whole array,
so every result must be bit for bit the one-thread result, whatever the
number of threads, the axis the parts are cut along, masks, per-row or
per-entry tau, infinities or the caller's floating-point error state.  The
cut threshold is lowered so that small arrays are cut.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
from topk_core.backends import numpy_soft

import topk_core as tk

from .test_fast_paths import _cases


@pytest.fixture
def threads(monkeypatch):
    """``use(n)``: run with ``n`` threads and parts of at least 4 entries; restored after."""
    monkeypatch.setattr(numpy_soft, "_MIN_PER_THREAD", 4)

    def use(n):
        numpy_soft.set_num_threads(n)

    yield use
    numpy_soft.set_num_threads(None)


def _all_outputs(x, k, kw):
    g = np.linspace(-1.0, 1.0, x.size).reshape(x.shape).astype(x.dtype)
    out = [tk.dftopk(x, k, **kw)]
    out += list(tk.dftopk_vjp(x, k, g, **kw))
    p, vjp = tk.dftopk_and_vjp(x, k, **kw)
    out += [p, *vjp(g)]
    out += list(tk.dftopk_jvp(x, k, g, **kw))
    return [np.asarray(o) for o in out]


def _cases_and_more(rng):
    yield from _cases(rng)
    yield rng.standard_normal((2, 3, 40)).astype(np.float32), 5, {"tau": 0.2}
    yield rng.standard_normal((1, 64)).astype(np.float16), 9, {}  # cut along the axis
    yield rng.standard_normal((5, 33)), 3, {"tau": rng.random((1, 33)) + 0.1}
    yield rng.standard_normal((2, 50)), 4, {"tau": 1e-3}  # p rounds to 0 and 1


@pytest.mark.parametrize("n", [2, 3, 5])
def test_results_are_bit_for_bit_the_one_thread_results(threads, n):
    rng = np.random.default_rng(5)
    for x, k, kw in _cases_and_more(rng):
        threads(1)
        want = _all_outputs(x, k, kw)
        threads(n)
        got = _all_outputs(x, k, kw)
        for w, v in zip(want, got, strict=True):
            np.testing.assert_array_equal(v, w, err_msg=f"{x.shape} {x.dtype} k={k} {kw}")


def _spy_threads(monkeypatch):
    names = []
    chain = numpy_soft._sigmoid_into

    def spy(r, *args):
        names.append((threading.current_thread().name, r.shape))
        chain(r, *args)

    monkeypatch.setattr(numpy_soft, "_sigmoid_into", spy)
    return names


@pytest.mark.parametrize(
    ("shape", "pieces"),
    [((10,), [(5,), (5,)]), ((1, 9), [(1, 4), (1, 5)]), ((4, 6), [(2, 6), (2, 6)])],
)
def test_parts_run_on_a_helper_thread(threads, monkeypatch, shape, pieces):
    """Rows are cut along the first axis; one row (or fewer rows than threads) along
    the selection axis; the caller computes one part, a helper thread the other."""
    names = _spy_threads(monkeypatch)
    threads(2)
    x = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    tk.dftopk(x, 2)
    assert sorted(s for _, s in names) == sorted(pieces)
    who = {name for name, _ in names}
    assert threading.current_thread().name in who
    assert any(name.startswith("topk_core-numpy") for name in who)


def test_small_arrays_and_one_thread_stay_on_the_calling_thread(monkeypatch):
    names = _spy_threads(monkeypatch)
    x = np.random.default_rng(0).standard_normal((4, 1000))
    numpy_soft.set_num_threads(2)
    try:
        tk.dftopk(x, 3)  # 4000 entries: fewer than 2**17 a thread
        monkeypatch.setattr(numpy_soft, "_MIN_PER_THREAD", 4)
        numpy_soft.set_num_threads(1)
        tk.dftopk(x, 3)
    finally:
        numpy_soft.set_num_threads(None)
    assert names == [(threading.current_thread().name, (4, 1000))] * 2


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_a_bad_thread_count_is_refused(bad):
    before = numpy_soft.get_num_threads()
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got"):
        numpy_soft.set_num_threads(bad)
    assert numpy_soft.get_num_threads() == before


def _python(code, env_value):
    env = dict(os.environ)
    env.pop(numpy_soft.THREADS_ENV, None)
    if env_value is not None:
        env[numpy_soft.THREADS_ENV] = env_value
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_the_default_comes_from_the_environment_or_the_cpus():
    code = "from topk_core.backends import numpy_soft as s; print(s.get_num_threads())"
    assert _python(code, "3").stdout.split() == ["3"]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert _python(code, None).stdout.split() == [str(min(cpus, 4))]
    bad = _python(code, "two")
    assert bad.returncode != 0
    assert "TOPK_CORE_NUMPY_THREADS must be an integer >= 1, got 'two'" in bad.stderr


def test_caller_threads_at_once_share_the_helpers(threads):
    """Several caller threads at once: a part that finds the helpers busy runs on its
    caller (no waiting); every caller gets its own result."""
    threads(2)
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((8, 500)) for _ in range(6)]
    want = [tk.dftopk_vjp(x, 7, x, tau=0.4)[0] for x in xs]
    got = [None] * len(xs)

    def work(i):
        for _ in range(20):
            got[i] = tk.dftopk_vjp(xs[i], 7, xs[i], tau=0.4)[0]

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not any(w.is_alive() for w in workers)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(g, w)


def test_an_error_in_a_part_is_raised_after_every_part_is_done(threads):
    threads(3)
    done = []

    def part(v):
        if v[0] == 0:
            raise FloatingPointError("part 0")
        time.sleep(0.05)  # still running when the caller's own part has failed
        done.append(v[0])

    v = np.arange(30.0)
    with pytest.raises(FloatingPointError, match="part 0"):
        numpy_soft._in_parts(part, v.shape, (v,))
    assert sorted(done) == [10.0, 20.0]


def test_each_part_runs_under_the_callers_error_state(threads):
    threads(3)
    seen = []
    v = np.zeros((6, 5))
    with np.errstate(divide="raise", over="ignore", under="warn", invalid="call"):
        want = np.geterr()
        numpy_soft._in_parts(lambda piece: seen.append(np.geterr()), v.shape, (v,))
    assert seen == [want] * 3


def test_parts_run_under_the_callers_error_state(threads):
    """The spec's limits (p rounding to 0, e overflowing) neither warn nor raise in a
    helper thread either, under the caller's ``seterr(all='raise')``."""
    threads(2)
    x = np.array([[3e38, -3e38, 1.0, 2.0, 0.5, -1e30, 7.0, 1e-40]], dtype=np.float32)
    g = np.ones_like(x)
    threads(1)
    want = tk.dftopk_vjp(x, 3, g, tau=1e-3)
    threads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            got = tk.dftopk_vjp(x, 3, g, tau=1e-3)
    for w, v in zip(want, got, strict=True):
        np.testing.assert_array_equal(v, w)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_its_own_helpers():
    """The parent's helper threads do not exist in a forked child: it must not wait for
    them (a hang here is the bug; the process is killed after 60 s)."""
    code = (
        "import os, signal, sys, numpy as np\n"
        "from topk_core.backends import numpy_soft\n"
        "import topk_core as tk\n"
        "numpy_soft._MIN_PER_THREAD = 4\n"
        "numpy_soft.set_num_threads(2)\n"
        "x = np.random.default_rng(3).standard_normal((4, 64))\n"
        "want = tk.dftopk(x, 5)  # starts the parent's helper\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    signal.alarm(20)  # a child waiting for threads that do not exist: killed\n"
        "    ok = np.array_equal(tk.dftopk(x, 5), want)\n"
        "    os._exit(0 if ok else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
