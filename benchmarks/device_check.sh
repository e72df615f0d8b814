#!/usr/bin/env bash
# The GPU check of issue 11 (item 3), prepared so that a session lent a GPU spends its
# device minutes on the check, not on setting it up.  Two steps:
#
#   bash benchmarks/device_check.sh prepare   # here, with pip: wheels into .whl/ (git-ignored)
#   bash benchmarks/device_check.sh run       # there, in the repository root; results in $OUT
#
# The device machine has CUDA builds of torch, JAX and CuPy, NumPy and pytest, but no
# package index: topk-core itself and its two pure-Python dependencies travel as wheels
# (the `run` call carries .whl).  `run` installs them into /tmp/site and works from a
# copy of benchmarks/ outside the checkout, so the checkout's own folders never shadow
# the installed package.  Each step has its own time limit and its output lands in $OUT
# as it goes (at most 8 files come back: log.txt, conformance.txt, gpu_tests.txt,
# conformance_jax.txt and the two benchmarks' results.md / results.json), so a step cut
# short still leaves the others.
#
# Environment (the defaults are the GPU check; the test suite runs `run` on the CPU with
# small values):
#   TOPK_CHECK_DEVICE      cuda                          the benchmarks' --device
#   TOPK_CHECK_BACKENDS    ""                            the benchmarks' --backends ("": every
#                                                        installed one that runs on the device,
#                                                        so a library failing there is skipped)
#   TOPK_CHECK_SIZES       1e6,1024x4096,8192x256        the pass-budget run's --sizes
#   TOPK_CHECK_BIG         1e8                           the bandwidth run's --sizes ("" skips it)
#   TOPK_CHECK_SUITE_K     "torch_cuda or cupy"          pytest -k of the conformance suite
#   TOPK_CHECK_JAX_K       jax                           -k of the suite's last run ("" skips it)
#   TOPK_CHECK_JOBS        8                             pytest-xdist workers for the suite
#   TOPK_CHECK_LIMITS      "60 45 180 60 75"             seconds: suite, GPU tests, benchmark,
#                                                        big, JAX suite (420 s together)
#   TOPK_CHECK_BENCH_ARGS  ""                            more benchmark options (both runs)
#   TOPK_CHECK_WHEELS      .whl                          the folder of carried wheels
#   TOPK_CHECK_SITE        /tmp/site                     where they are installed
#   PYTHON                 python3                       the interpreter with torch/JAX/CuPy
set -uo pipefail

step=${1:-}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2

prepare() {
    # wheels for the device machine: pure Python, so any platform's pip builds them
    set -e
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
    rm -rf .whl
    mkdir -p .whl
    python -m pip wheel -q --no-deps --no-build-isolation -w .whl .
    local compat extra
    compat=$(python -c "import array_api_compat as m; print(m.__version__)")
    extra=$(python -c "import array_api_extra as m; print(m.__version__)")
    python -m pip download -q --no-deps --only-binary=:all: -d .whl \
        "array-api-compat==$compat" "array-api-extra==$extra"
    ls -l .whl
    echo "now: run with carry [\".whl\"] and command 'bash benchmarks/device_check.sh run'"
}

run() {
    local out=${OUT:-}
    if [ -z "$out" ]; then
        echo "device_check.sh run: set OUT to the folder that collects the results" >&2
        exit 2
    fi
    local device=${TOPK_CHECK_DEVICE:-cuda}
    local backends=()
    [ -n "${TOPK_CHECK_BACKENDS:-}" ] && backends=(--backends "$TOPK_CHECK_BACKENDS")
    local sizes=${TOPK_CHECK_SIZES:-1e6,1024x4096,8192x256}
    local big=${TOPK_CHECK_BIG-1e8}
    local suite_k=${TOPK_CHECK_SUITE_K:-torch_cuda or cupy}
    local jax_k=${TOPK_CHECK_JAX_K-jax}
    local jobs=${TOPK_CHECK_JOBS:-8}
    local extra_args=${TOPK_CHECK_BENCH_ARGS:-}
    local t_suite t_gpu t_bench t_big t_jax
    read -r t_suite t_gpu t_bench t_big t_jax <<<"${TOPK_CHECK_LIMITS:-60 45 180 60 75}"
    local py=${PYTHON:-python3}
    local site=${TOPK_CHECK_SITE:-/tmp/site}
    local log=$out/log.txt
    exec > >(tee -a "$log") 2>&1
    export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
    # JAX would take 75% of the GPU's memory at its first call, leaving torch and CuPy
    # too little for n = 1e8 in the same process
    export XLA_PYTHON_CLIENT_PREALLOCATE=false

    echo "== $(date -u +%FT%TZ) install the carried wheels into $site"
    shopt -s nullglob
    local wheeldir=${TOPK_CHECK_WHEELS:-.whl}
    local wheels=("$wheeldir"/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "no wheels in $wheeldir: run 'bash benchmarks/device_check.sh prepare' here and carry .whl"
        exit 2
    fi
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${wheels[@]}" || exit 1
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}

    # the wheel, not a checkout folder or an older install, is what the checks below run
    "$py" -P -c "import sys, topk_core; sys.exit(not topk_core.__file__.startswith('$site/'))" || {
        echo "topk_core does not import from $site"
        exit 1
    }
    echo "== machine"
    nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
    "$py" -P - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("topk_core", "numpy", "array_api_compat", "torch", "jax", "cupy"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as exc:
        print(name, "not usable:", type(exc).__name__, exc)
try:
    import torch
    print("torch cuda", torch.cuda.is_available(), torch.version.cuda,
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as exc:
    print("torch:", exc)
try:
    import jax
    print("jax devices", jax.devices())
except Exception as exc:
    print("jax:", exc)
EOF

    local conf=$site/topk_core/conformance
    suite() {  # suite KEYWORDS LIMIT FILE: the installed suite's checks selected by -k
        echo "== $(date -u +%T) conformance suite (-k '$1'), limit $2 s"
        # -P: the checkout's folders stay off sys.path, so the installed wheel is what runs
        timeout "$2" "$py" -P -m pytest -p topk_core.conformance.plugin \
            -c "$conf/conformance.ini" --rootdir "$conf" -q -rfEs -n "$jobs" -k "$1" \
            "$conf"/test_contract.py "$conf"/test_forward.py "$conf"/test_gradients.py \
            "$conf"/test_errors.py "$conf"/test_scaling.py >"$3" 2>&1
        echo "exit $?; $(tail -n 1 "$3")"
    }
    suite "$suite_k" "$t_suite" "$out/conformance.txt"

    echo "== $(date -u +%T) the project's GPU tests (CuPy; the README's CuPy example), limit ${t_gpu} s"
    timeout "$t_gpu" "$py" -P -m pytest -q -rfEs -p no:cacheprovider \
        conformance_tests/project/test_cupy.py "conformance_tests/project/test_readme.py::test_readme_example_runs[CuPy]" \
        >"$out/gpu_tests.txt" 2>&1
    echo "exit $?; $(tail -n 1 "$out/gpu_tests.txt")"

    local work
    work=$(mktemp -d)
    cp -r benchmarks "$work/"
    cd "$work" || exit 1
    echo "== $(date -u +%T) benchmark: pass budget and ratios ($sizes), limit ${t_bench} s"
    # shellcheck disable=SC2086  # extra_args: several options
    timeout "$t_bench" "$py" -m benchmarks --device "$device" "${backends[@]}" \
        --sizes "$sizes" --k 0.1 --modes fwd+bwd --no-plot --out "$out/bench" $extra_args
    echo "exit $?"
    if [ -n "$big" ]; then
        echo "== $(date -u +%T) benchmark: bandwidth at $big, limit ${t_big} s"
        # ours and x * 2 only: a sort-based top_k with k = 1e7 could take the whole limit
        # shellcheck disable=SC2086
        timeout "$t_big" "$py" -m benchmarks --device "$device" "${backends[@]}" \
            --sizes "$big" --k 0.1 --modes fwd+bwd --operators ours,elementwise \
            --repeats 5 --pass-rounds 10 --no-plot --no-memory --no-compile-kernels \
            --out "$out/big" $extra_args
        echo "exit $?"
    fi
    if [ -n "$jax_k" ]; then
        # last: JAX's part of the suite is compile-bound (about 400 s of the suite's CPU
        # time here), so a cut-short run costs nothing above
        suite "$jax_k" "$t_jax" "$out/conformance_jax.txt"
    fi
    echo "== $(date -u +%T) done"
}

case "$step" in
prepare) prepare ;;
run) run ;;
*)
    echo "usage: bash benchmarks/device_check.sh prepare|run" >&2
    exit 2
    ;;
esac
