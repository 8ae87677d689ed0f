#!/usr/bin/env bash
# A lent GPU session, sized to the lease: two device commands, the most valuable figures first.
#
#   bash benchmarks/gpu_session.sh first    one device call of at most 8 minutes (BUDGET_S=470)
#   bash benchmarks/gpu_session.sh second   one device call of at most 4 minutes (BUDGET_S=220)
#   bash benchmarks/gpu_session.sh long     README "A real run" with --losses fused and eager
#                                           (needs a session of its own: LONG_LIMIT, default 540)
#   PLAN=1 bash benchmarks/gpu_session.sh first|second   print the plan (steps, limits), run nothing
#
# first:  install     the package (no network, no deps: the image's torch / triton / transformers)
#                     and the wheels carried in .gpu/wheels; the teacher-cache extension builds
#                     for this GPU in the background meanwhile (it is needed from bench_step on)
#         smoke       every op on CUDA against the float64 reference, every dtype, forward and
#                     backward: the tests' reference comparisons (SMOKE_K below), 8 workers
#         bench_ops   python -m benchmarks --headline: each op at one TinyBERT4 <- BERT-base
#                     shape, eager / compile / fused, fwd / bwd / full, GB/s, peak memory
#         bench_step  end-to-end distillation step: eager / fused / fused + cache / student alone
#         tests       the rest of the test suite on the GPU, in the time left
# second: install     only if the machine is bare (a warm machine keeps the first call's install)
#         bench_qk    Q/K attention loss at L = 2048 and 8192 vs the score path (target >= 4x)
#         bench_cache cache fetch GB/s vs pinned host-to-device, the epoch ratio (target >= 3x);
#                     needs .gpu/minilm and .gpu/SST-2 (benchmarks/gpu_prepare.sh)
#         bench_kl    MiniLM attention KL at L = 2048 and 8192
#
# Every step runs under `timeout`, limited to what is left of BUDGET_S; a step that would get
# under MIN_STEP_S is skipped and says so.  After every step $OUT holds everything finished so far,
# so a call stopped at its limit still returns it (the device tool returns at most 8 files):
#   $OUT/env.txt       device, driver, versions            $OUT/session.log  steps, limits, times
#   $OUT/results.tgz   results/<device>/*.json (to commit under benchmarks/results/), the step
#                      logs and JUnit XML; re-packed after every step
# Without a GPU the same steps run their CPU variants (TRITON_INTERPRET=1): the dry run.
# A Triton cache carried in .gpu/triton-cache (python -m benchmarks.static --cache-dir) is used
# when present, so that the lease does not spend its minutes compiling kernels.
set -uo pipefail
cd "$(dirname "$0")/.."
phase="${1:-first}"
case "$phase" in
first) budget="${BUDGET_S:-470}" ;;
second) budget="${BUDGET_S:-220}" ;;
long) budget="${BUDGET_S:-${LONG_LIMIT:-540}}" ;;
*) echo "usage: $0 first|second|long (got '$phase')" >&2; exit 2 ;;
esac
OUT="${OUT:-/tmp/tbf-gpu}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"           # step logs and JUnit XML, packed into $OUT/results.tgz
PY="${PYTHON:-python3}"
MIN_STEP_S="${MIN_STEP_S:-20}"
RESERVE_S="${RESERVE_S:-10}"  # kept back for the final packing
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" TBF_GIT_COMMIT="${TBF_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
[ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
[ -d .gpu/triton-cache ] && export TRITON_CACHE_DIR="$PWD/.gpu/triton-cache"
export PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"  # carried wheels (install)
GPU=0
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && GPU=1
if [ "$GPU" = 0 ]; then
    export TRITON_INTERPRET=1  # the dry run: CPU variants of every step
fi
# The smoke selection: the tests that compare each op's forward and gradients with the float64
# reference over dtypes and shapes (real ones included).  `tests` runs everything else.
SMOKE_FILES="tests/test_attention_mse.py tests/test_hidden_mse.py tests/test_soft_ce.py
tests/test_attention_qk.py tests/test_attention_kl.py tests/test_kl_div.py
tests/test_attention_kl_scores.py tests/test_hidden_cosine.py"
SMOKE_K="matches_reference or matches_score_path or dtypes or real_shape or mixed"

# Each step's time limit in seconds (0: the rest of the budget); a step also gets no more than
# what the budget has left when it starts.
declare -A LIMIT=([install]=120 [smoke]=90 [bench_ops]=150 [bench_step]=90 [tests]=0
                  [bench_qk]=80 [bench_cache]=70 [bench_kl]=60 [real_run]=0)
plan_first=(install smoke bench_ops bench_step tests)
plan_second=(install bench_qk bench_cache bench_kl)
plan_long=(install real_run)
eval "plan=(\"\${plan_${phase}[@]}\")"

if [ "${PLAN:-0}" = 1 ]; then
    echo "gpu_session $phase: budget ${budget} s (${RESERVE_S} s of it kept for packing)"
    for name in "${plan[@]}"; do
        limit=${LIMIT[$name]}
        printf '  %-12s limit %s\n' "$name" "$([ "$limit" = 0 ] && echo "the rest" || echo "$limit s")"
    done
    exit 0
fi

summary=()
log() { echo "[$(date -u +%T) +${SECONDS}s] $*" | tee -a "$OUT/session.log"; }

pack() {  # $OUT/results.tgz, atomically: what is finished so far
    cp "$OUT/session.log" "$WORK/" 2>/dev/null
    tar -czf "$OUT/.results.tgz" -C "$WORK" . 2>/dev/null \
        && mv -f "$OUT/.results.tgz" "$OUT/results.tgz"
}

step() {  # step NAME COMMAND...: run under the smaller of LIMIT[NAME] and the budget left
    local name=$1 limit=${LIMIT[$1]}
    shift
    local left=$((budget - SECONDS - RESERVE_S))
    if [ "$limit" = 0 ] || [ "$limit" -gt "$left" ]; then limit=$left; fi
    if [ "$limit" -lt "$MIN_STEP_S" ]; then
        log "skip $name: ${left} s left of the ${budget} s budget"
        summary+=("$(printf '%-12s skipped (budget)' "$name")")
        return
    fi
    local what="$*"
    log "start $name (limit ${limit} s): ${what:0:160}$([ ${#what} -gt 160 ] && echo ' ...')"
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    log "end $name: rc=$rc in $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (stopped at its limit)')"
    tail -n 3 "$WORK/$name.log" | sed 's/^/    /' | tee -a "$OUT/session.log"
    summary+=("$(printf '%-12s rc=%-4s %4s s of %4s' "$name" "$rc" "$((SECONDS - t0))" "$limit")")
    pack
}

env_report() {
    {
        echo "phase $phase, budget ${budget} s, commit $TBF_GIT_COMMIT"
        if [ "$GPU" = 1 ]; then
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
                --format=csv
        else
            echo "no GPU: dry run (the CPU variant of every step, TRITON_INTERPRET=1)"
        fi
        "$PY" - <<'PY'
import os, platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "TRITON_CACHE_DIR", os.environ.get("TRITON_CACHE_DIR"))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
PY
    } 2>&1 | tee "$OUT/env.txt" | tee -a "$OUT/session.log"
}

installed() { "$PY" -c "import tinybert_fast, sys; sys.exit(not tinybert_fast.__file__.startswith('$PWD/'))" 2>/dev/null; }

# install: the carried wheels into .gpu/site, then the package against the machine's torch
INSTALL='set -e
if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target .gpu/site .gpu/wheels/*.whl
fi
"$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e .
"$PY" -c "import tinybert_fast; print(\"tinybert_fast from\", tinybert_fast.__file__)"'
export PY

build_extension_bg() {  # the teacher-cache extension, for this GPU, while other steps run
    local cuda=()
    [ "$GPU" = 1 ] && cuda=(--cuda)  # the visible GPU's arch; fail unless the kernels build
    log "extension build started in the background (log: ext_build.log)"
    ( timeout 300 "$PY" -m tinybert_fast.cli build-extension "${cuda[@]}" \
          >"$WORK/ext_build.log" 2>&1
      echo "rc=$?" >>"$WORK/ext_build.log" ) &
    EXT_PID=$!
}

wait_extension() {
    [ -n "${EXT_PID:-}" ] || return 0
    local t0=$SECONDS
    wait "$EXT_PID"
    log "extension build finished ($(tail -n 1 "$WORK/ext_build.log"); waited $((SECONDS - t0)) s)"
    EXT_PID=
}

have() { "$PY" -c "import $1" >/dev/null 2>&1; }
# pytest: quiet, failures listed, 8 workers and a per-test limit where the plugins are there
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider)
have xdist && PYTEST+=(-n "${TEST_WORKERS:-$([ "$GPU" = 1 ] && echo 8 || echo 2)}")
have pytest_timeout && PYTEST+=(--timeout "${TEST_TIMEOUT:-120}")
RESULTS="$WORK/results"  # every benchmark writes here (<device>/*.json), packed with the logs

env_report
case "$phase" in
first)
    step install bash -c "$INSTALL"
    build_extension_bg
    # shellcheck disable=SC2086
    step smoke "${PYTEST[@]}" --junitxml "$WORK/smoke.xml" $SMOKE_FILES -k "$SMOKE_K"
    # shellcheck disable=SC2086
    "$PY" -m pytest -q --collect-only -p no:cacheprovider $SMOKE_FILES -k "$SMOKE_K" 2>/dev/null \
        | grep '::' >"$WORK/smoke_ids.txt"
    step bench_ops "$PY" -m benchmarks --headline --out "$RESULTS"
    wait_extension
    step bench_step "$PY" -m benchmarks.bench_step --out "$RESULTS"
    deselect=()
    while read -r id; do deselect+=(--deselect "$id"); done <"$WORK/smoke_ids.txt"
    step tests "${PYTEST[@]}" --junitxml "$WORK/tests.xml" tests "${deselect[@]}"
    ;;
second)
    if installed; then log "install: already installed on this machine"
    else step install bash -c "$INSTALL"; build_extension_bg; fi
    step bench_qk "$PY" -m benchmarks.bench_attention_qk --lengths 2048,8192 --out "$RESULTS"
    wait_extension
    if [ -d .gpu/minilm ] && [ -d .gpu/SST-2 ]; then
        step bench_cache env TBF_MINILM_DIR="$PWD/.gpu/minilm" "$PY" -m benchmarks.bench_cache \
            --data-dir .gpu/SST-2 --examples 4096 --out "$RESULTS"
    else
        log "skip bench_cache: .gpu/minilm and .gpu/SST-2 are not there (benchmarks/gpu_prepare.sh)"
    fi
    step bench_kl "$PY" -m benchmarks.bench_attention_kl --lengths 2048,8192 --out "$RESULTS"
    ;;
long)
    step install bash -c "$INSTALL"
    build_extension_bg
    wait_extension
    step real_run env LOSSES="fused eager" TEACHER="${TEACHER:-$PWD/.gpu/teacher}" \
        DATA="${DATA:-$PWD/.gpu/SST-2}" bash benchmarks/real_run.sh "$WORK/real-run"
    ;;
esac
wait_extension
pack
echo
echo "== gpu_session $phase: $(sed -n 2p "$OUT/env.txt")  (${SECONDS} s of ${budget} s)"
printf '%s\n' "${summary[@]}"
for f in "$WORK"/smoke.log "$WORK"/bench_ops.log "$WORK"/bench_qk.log "$WORK"/tests.log; do
    [ -f "$f" ] && { echo "-- $(basename "$f")"; tail -n 15 "$f"; }
done
exit 0
