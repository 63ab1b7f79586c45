#!/usr/bin/env bash
# Build, test and benchmark hybrimoe on a GPU box, in one go, under a wall-clock budget.
#
#   microbench/run_gpu.sh [OUTDIR]        (OUTDIR defaults to $OUT, else ./gpu_results)
#
# Steps (each under its own timeout, all under TOTAL_S; a failing step is reported, later steps
# still run, and the exit status is non-zero if any failed):
#   1. carried wheels: if .whl/ exists, install them into /tmp/site (offline) and use PYTHONPATH
#   2. build: pip install --no-build-isolation --no-deps -e .  (the C++ extension, the packages)
#   3. tests: pytest -m gpu (real shapes)
#   4. every benchmark in BENCHES that exists, with --json OUTDIR/<name>.json: triton_moe (its full
#      shape list under --budget-s), cpu_kernels --quick, moe_layer (8 DSv2-Lite layers), e2e
#      (DSv2-Lite, 9 layers, prefill 512 + decode 32; FLAME routing replayed when shared/traces
#      was carried into the checkout), host_overhead (the runtime's host time per layer)
#   5. if time is left, the Triton tests at small shapes, compiled
#   6. a short table of the benchmark rows
# Everything is logged to OUTDIR/run_gpu.log. Environment knobs: TOTAL_S (default 470),
# BENCHES (space-separated microbench stems), BENCH_ARGS (extra args for every benchmark),
# HYBRIMOE_COMMIT (recorded in the JSON when .git is absent). Call it with the device tool's
# timeout_s >= TOTAL_S + 60.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-${OUT:-$REPO/gpu_results}}"
TOTAL_S="${TOTAL_S:-470}"
BENCHES="${BENCHES:-triton_moe cpu_kernels moe_layer e2e host_overhead}"
BENCH_ARGS="${BENCH_ARGS:-}"
PY="${PYTHON:-python3}"
START=$(date +%s)
FAILED=()

mkdir -p "$OUTDIR"
LOG="$OUTDIR/run_gpu.log"
: >"$LOG"
export PYTHONUNBUFFERED=1
cd "$REPO"

say() { echo "[run_gpu $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# Seconds left of TOTAL_S, capped at $1.
budget() {
    local left=$((TOTAL_S - ($(date +%s) - START)))
    if ((left > $1)); then left=$1; fi
    echo "$left"
}

# step NAME MAX_SECONDS CMD...: run CMD with a timeout (the smaller of MAX_SECONDS and what is
# left), log it, record a failure; returns CMD's status (callers add `|| true` to carry on).
step() {
    local name=$1 max=$2
    shift 2
    local t
    t=$(budget "$max")
    if ((t < 10)); then
        say "SKIP $name: the ${TOTAL_S}s budget is spent"
        FAILED+=("$name(skipped)")
        return 1
    fi
    say "START $name (timeout ${t}s): $*"
    local rc=0
    timeout --kill-after=10 "$t" "$@" >>"$LOG" 2>&1 || rc=$?
    if ((rc == 0)); then
        say "OK $name"
    else
        if ((rc == 124 || rc == 137)); then say "TIMEOUT $name after ${t}s"; else say "FAIL $name (rc=$rc)"; fi
        FAILED+=("$name")
        tail -n 30 "$LOG" | sed 's/^/    | /'
    fi
    return "$rc"
}

say "repo $REPO, output $OUTDIR, budget ${TOTAL_S}s"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true; } | tee -a "$LOG"
"$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.is_available())' 2>&1 | tee -a "$LOG" || true

# 1. carried wheels (the GPU image has no gguf and no internet)
if compgen -G ".whl/*.whl" >/dev/null; then
    step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl || true
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. build: editable install. If pip cannot, build the extension in place and link the two
# mapped packages into hybrimoe/ (this is a throwaway copy of the tree on the GPU box).
if ! step build 180 "$PY" -m pip install -q --no-build-isolation --no-deps -e . ||
    ! "$PY" -c 'import hybrimoe.gpu, hybrimoe.triton_kernels' >>"$LOG" 2>&1; then
    say "editable install unusable; falling back to build_ext --inplace + package links"
    step build_inplace 180 "$PY" setup.py -q build_ext --inplace || true
    ln -sfn ../kernels/triton hybrimoe/triton_kernels
    ln -sfn ../kernels/cuda hybrimoe/cuda_kernels
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c 'import hybrimoe.triton_kernels, hybrimoe.gpu; print("import ok")' 2>&1 | tee -a "$LOG"; then
    FAILED+=("import")
fi

# 3. tests
step tests_gpu 80 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests || true

# 4. benchmarks
for b in $BENCHES; do
    script="microbench/$b.py"
    if [[ ! -f "$script" ]]; then
        say "skip $b: $script not present"
        continue
    fi
    case "$b" in
    triton_moe) max=120; extra=(--budget-s 90) ;;  # the full shape list, no new shape after 90 s
    cpu_kernels) max=45; extra=(--quick) ;;
    moe_layer) max=80; extra=(--layers 8 --prefill 512 --reps 3) ;;
    e2e)
        max=100
        extra=(--layers 9 --prefill 512 --decode 32)
        flame="shared/traces/flame-moe-290m_dynande/flame290m_prefill_4x512tok_8layers_top6.npz"
        if [[ -f "$flame" ]]; then extra+=(--trace "$flame"); fi
        ;;
    host_overhead)  # the runtime's Python time per layer, on this host's cores
        max=40
        extra=(--steps 100)
        flame="shared/traces/flame-moe-290m_dynande/flame290m_prefill_4x512tok_8layers_top6.npz"
        if [[ -f "$flame" ]]; then extra+=(--trace "$flame"); fi
        ;;
    *) max=60; extra=(--quick) ;;
    esac
    # shellcheck disable=SC2086  # BENCH_ARGS is a user-supplied word list
    step "bench_$b" "$max" "$PY" "$script" --json "$OUTDIR/$b.json" "${extra[@]}" $BENCH_ARGS || true
done

# 5. if time is left: the Triton tests at small shapes, compiled (the interpreter runs them in CI)
step tests_triton_small 90 "$PY" -m pytest -q -m "not gpu" -p no:cacheprovider \
    tests/test_triton_dequant.py tests/test_triton_moe.py || true

# 6. summary table (Markdown for BENCHMARKS.md: python microbench/report.py OUTDIR/*.json)
"$PY" microbench/report.py --text \
    --extra gbps,hit_rate,decode_tok_s,prefill_x_vs_kt_static "$OUTDIR"/*.json 2>&1 | tee -a "$LOG" || true

if ((${#FAILED[@]})); then
    say "done in $(($(date +%s) - START))s; FAILED: ${FAILED[*]}"
    exit 1
fi
say "done in $(($(date +%s) - START))s; all steps passed"
