#!/usr/bin/env bash
# A lent GPU session, sized to the lease: ONE device command of about 9 minutes on the H100 (the
# H200 runs it unchanged), the most valuable figures first.
#
#   bash benchmarks/gpu_session.sh              the lease's one call (BUDGET_S=540; timeout_s 570)
#   bash benchmarks/gpu_session.sh --dry-run    here, no GPU: every step's command, the carried
#                                               wheels and Triton cache checked; nothing is run
#   bash benchmarks/gpu_session.sh --plan       the steps and their limits
#   bash benchmarks/gpu_session.sh second       a later session: Q/K and KL at L = 8192, the cache
#   bash benchmarks/gpu_session.sh long         README "A real run" (a session of its own)
#
# The call, in order (each step under `timeout`, limited to what is left of BUDGET_S; a step that
# would get under MIN_STEP_S is skipped and says so):
#   env          device, driver, versions, GPU memory (78 GiB on the H100) and the measured
#                device-to-device copy bandwidth (read + write; ~3.0 TB/s on the H100, 4.3 on the
#                H200): $OUT/env.txt, the first file back
#   triton_cache the carried cache (.gpu/triton-cache.tar.xz, built here by gpu_prepare.sh with
#                the image's Triton 3.6 under Python 3.12 for sm_90) unpacked and its manifest
#                compared with this machine; then after EVERY step the kernels that compiled during
#                it are counted (benchmarks/triton_cache.py count): this package's kernels should
#                be 0, torch.compile's own (Inductor) are compiled by design: $OUT/triton_cache.txt
#   install      the package against the image's torch (no network, no deps), the carried wheels;
#                the teacher-cache extension builds in the background meanwhile
#   bench_ops    python -m benchmarks --headline: all 8 ops at one TinyBERT4 <- BERT-base shape
#                each, eager / compile / fused, fwd / bwd / full, GB/s and % of the copy bandwidth,
#                peak memory (the figures to set beside benchmarks/results/traffic's prediction)
#   smoke        every op on CUDA against the float64 reference, every dtype, forward and backward
#   bench_step   the end-to-end distillation step: eager / fused / fused + cache / student alone
#   tests        the rest of the test suite, in the time left
#
# $OUT (the device tool returns at most 8 files): env.txt, session.log, triton_cache.txt and
# results.tgz (results/<device>/*.json to commit under benchmarks/results/, step logs, JUnit XML),
# re-packed every PACK_EVERY_S seconds while a step runs, so that a call stopped at any point
# returns everything finished so far, a benchmark's cases included (each rewrites its JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=run
phase=first
for arg in "$@"; do
    case "$arg" in
    --dry-run) mode=dry ;;
    --plan) mode=plan ;;
    first|second|long) phase=$arg ;;
    *) echo "usage: $0 [--dry-run|--plan] [first|second|long] (got '$arg')" >&2; exit 2 ;;
    esac
done
case "$phase" in
first) budget="${BUDGET_S:-540}" ;;
second) budget="${BUDGET_S:-220}" ;;
long) budget="${BUDGET_S:-${LONG_LIMIT:-540}}" ;;
esac
PY="${PYTHON:-python3}"
MIN_STEP_S="${MIN_STEP_S:-20}"
RESERVE_S="${RESERVE_S:-10}"    # kept back for the final packing
PACK_EVERY_S="${PACK_EVERY_S:-20}"
CACHE_ARCHIVE=.gpu/triton-cache.tar.xz
CARRY_LIMIT_MIB=64              # the device tool carries 64 MiB a call: repository + carried paths

# Each step's time limit in seconds (0: the rest of the budget); a step also gets no more than
# what the budget has left when it starts.  first: 15 + 10 + 60 + 200 + 90 + 60 + the rest.
declare -A LIMIT=([env]=30 [triton_cache]=30 [install]=60 [bench_ops]=200 [smoke]=90
                  [bench_step]=60 [tests]=0 [bench_qk]=80 [bench_cache]=70 [bench_kl]=60
                  [real_run]=0)
plan_first=(env triton_cache install bench_ops smoke bench_step tests)
plan_second=(env triton_cache install bench_qk bench_cache bench_kl)
plan_long=(env install real_run)
eval "plan=(\"\${plan_${phase}[@]}\")"
# The smoke selection: the tests that compare each op's forward and gradients with the float64
# reference over dtypes and shapes (real ones included).  `tests` runs everything else.
SMOKE_FILES="tests/test_attention_mse.py tests/test_hidden_mse.py tests/test_soft_cross_entropy.py
tests/test_attention_mse_qk.py tests/test_attention_kl_qk.py tests/test_kl_divergence.py
tests/test_attention_kl.py tests/test_hidden_cosine.py"
SMOKE_K="matches_reference or matches_score_path or dtypes or real_shape or mixed"

if [ "$mode" = plan ]; then
    echo "gpu_session $phase: budget ${budget} s (${RESERVE_S} s of it kept for packing)"
    for name in "${plan[@]}"; do
        limit=${LIMIT[$name]}
        printf '  %-12s limit %s\n' "$name" "$([ "$limit" = 0 ] && echo "the rest" || echo "$limit s")"
    done
    exit 0
fi

if [ "$mode" = dry ]; then
    # Everything the call will need, checked here without a GPU: each step's command resolves,
    # the files it reads are there, the carried wheels and cache are present and fit the carry.
    fail=0
    ok() { printf '  ok    %s\n' "$*"; }
    bad() { printf '  FAIL  %s\n' "$*"; fail=1; }
    echo "gpu_session --dry-run ($phase, budget ${budget} s): checking, running nothing"
    for tool in timeout tar xz git "$PY"; do
        command -v "$tool" >/dev/null && ok "command $tool" || bad "command $tool not found"
    done
    modules="benchmarks benchmarks.triton_cache benchmarks.bench_step benchmarks.bench_attention_qk
             benchmarks.bench_attention_kl benchmarks.bench_cache pytest tinybert_fast.cli"
    for m in $modules; do
        "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$m') is None)" \
            2>/dev/null && ok "module $m" || bad "module $m not importable by $PY"
    done
    for f in $SMOKE_FILES benchmarks/real_run.sh pyproject.toml; do
        [ -f "$f" ] && ok "file $f" || bad "file $f missing"
    done
    "$PY" -m benchmarks --help >/dev/null 2>&1 && ok "python -m benchmarks --help" \
        || bad "python -m benchmarks --help failed"
    # wheels the image lacks (gpu_prepare.sh wheels): cp312 / py3, one version of each
    for w in datasets dill multiprocess; do
        n=$(ls .gpu/wheels/"$w"-*.whl 2>/dev/null | wc -l)
        [ "$n" = 1 ] && ok "wheel $(basename .gpu/wheels/"$w"-*.whl)" \
            || bad "wheel $w: $n in .gpu/wheels (bash benchmarks/gpu_prepare.sh wheels)"
    done
    if "$PY" -m benchmarks.triton_cache check "$CACHE_ARCHIVE" | sed 's/^/        /'; then
        ok "Triton cache $CACHE_ARCHIVE matches this checkout's kernels"
    else
        bad "Triton cache $CACHE_ARCHIVE (bash benchmarks/gpu_prepare.sh triton-cache)"
    fi
    repo=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
    carried=$(du -cb .gpu/wheels "$CACHE_ARCHIVE" 2>/dev/null | tail -n 1 | cut -f1)
    total=$(( (repo + ${carried:-0}) / 1048576 ))
    [ "$total" -lt "$CARRY_LIMIT_MIB" ] && ok "carry: ${total} MiB of ${CARRY_LIMIT_MIB}" \
        || bad "carry: ${total} MiB > ${CARRY_LIMIT_MIB} MiB"
    echo "device call: command 'bash benchmarks/gpu_session.sh', timeout_s $((budget + 30)),"
    echo "  carry [\".gpu/wheels\", \"$CACHE_ARCHIVE\"]"
    [ "$fail" = 0 ] && echo "dry run: all checks passed" || echo "dry run: FAILED"
    exit "$fail"
fi

OUT="${OUT:-/tmp/tbf-gpu}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"           # step logs and JUnit XML, packed into $OUT/results.tgz
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" TBF_GIT_COMMIT="${TBF_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
[ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"  # carried wheels (install)
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/tbf-triton-cache}"
mkdir -p "$TRITON_CACHE_DIR"
GPU=0
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && GPU=1
if [ "$GPU" = 0 ]; then
    export TRITON_INTERPRET=1  # no GPU: the CPU variant of every step
fi

summary=()
log() { echo "[$(date -u +%T) +${SECONDS}s] $*" | tee -a "$OUT/session.log"; }

pack() {  # $OUT/results.tgz, atomically: what is finished so far
    cp "$OUT/session.log" "$WORK/" 2>/dev/null
    tar -czf "$OUT/.results.tgz" -C "$WORK" . 2>/dev/null \
        && mv -f "$OUT/.results.tgz" "$OUT/results.tgz"
}

compiled() {  # after a step: the kernels that compiled during it (the cache-key check)
    local name=$1
    [ -f "$WORK/cache_before.json" ] || return 0
    local line
    line=$("$PY" -m benchmarks.triton_cache count "$TRITON_CACHE_DIR" \
           --since "$WORK/cache_before.json" 2>&1 | tail -n 1)
    printf '%-12s %s\n' "$name" "$line" >>"$OUT/triton_cache.txt"
    "$PY" -m benchmarks.triton_cache count "$TRITON_CACHE_DIR" --save "$WORK/cache_before.json" \
        >/dev/null 2>&1
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
    local what="${*//$'\n'/ }"
    log "start $name (limit ${limit} s): ${what:0:160}$([ ${#what} -gt 160 ] && echo ' ...')"
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >"$WORK/$name.log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do  # results into $OUT as soon as they exist
        sleep 2
        [ $(((SECONDS - t0) % PACK_EVERY_S)) -lt 2 ] && pack
    done
    wait "$pid"
    local rc=$?
    log "end $name: rc=$rc in $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (stopped at its limit)')"
    tail -n 3 "$WORK/$name.log" | sed 's/^/    /' | tee -a "$OUT/session.log"
    summary+=("$(printf '%-12s rc=%-4s %4s s of %4s' "$name" "$rc" "$((SECONDS - t0))" "$limit")")
    compiled "$name"
    pack
}

ENV_PY='
import json, os, platform, time, torch, triton
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton.__version__, "TRITON_CACHE_DIR": os.environ.get("TRITON_CACHE_DIR")}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    info.update(device=p.name, sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(total / 2**30, 1), free_gib=round(free / 2**30, 1))
    # the ceiling every GB/s is set against: a 2 GiB device-to-device copy, read + write
    a = torch.empty(2**31, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ms = []
    for _ in range(10):
        start.record(); b.copy_(a); end.record(); torch.cuda.synchronize()
        ms.append(start.elapsed_time(end))
    ms.sort()
    info["copy_gbs_median"] = round(2 * a.numel() / (ms[len(ms) // 2] * 1e-3) / 1e9)
    info["copy_gbs_max"] = round(2 * a.numel() / (ms[0] * 1e-3) / 1e9)
print(json.dumps(info))
'

env_report() {
    {
        echo "phase $phase, budget ${budget} s, commit $TBF_GIT_COMMIT"
        if [ "$GPU" = 1 ]; then
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
                --format=csv
        else
            echo "no GPU: the CPU variant of every step (TRITON_INTERPRET=1)"
        fi
        timeout 60 "$PY" -c "$ENV_PY"
    } 2>&1 | tee "$OUT/env.txt" | tee -a "$OUT/session.log"
}

triton_cache() {  # the carried cache, unpacked where TRITON_CACHE_DIR points, and compared
    {
        if [ -f "$CACHE_ARCHIVE" ]; then
            "$PY" -m benchmarks.triton_cache unpack "$CACHE_ARCHIVE" "$TRITON_CACHE_DIR"
        else
            echo "no $CACHE_ARCHIVE carried: every kernel compiles on the device"
        fi
        echo "kernels that compiled during each step (this package's should be none):"
    } 2>&1 | tee "$OUT/triton_cache.txt" | tee -a "$OUT/session.log"
    "$PY" -m benchmarks.triton_cache count "$TRITON_CACHE_DIR" --save "$WORK/cache_before.json" \
        | tee -a "$OUT/session.log"
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
    nice -n 5 timeout 300 "$PY" -m tinybert_fast.cli build-extension "${cuda[@]}" \
        >"$WORK/ext_build.log" 2>&1 &
    EXT_PID=$!
}

wait_extension() {  # no longer than the budget has left: then the build is stopped
    [ -n "${EXT_PID:-}" ] || return 0
    local t0=$SECONDS left=$((budget - SECONDS - RESERVE_S))
    while kill -0 "$EXT_PID" 2>/dev/null && [ $((SECONDS - t0)) -lt "$left" ]; do sleep 1; done
    kill -0 "$EXT_PID" 2>/dev/null && kill "$EXT_PID"  # timeout passes the signal on
    wait "$EXT_PID"
    local rc=$?
    echo "rc=$rc" >>"$WORK/ext_build.log"
    log "extension build: rc=$rc$([ $rc = 124 ] || [ $rc = 143 ] && echo ' (stopped)'); waited $((SECONDS - t0)) s"
    EXT_PID=
}

have() { "$PY" -c "import $1" >/dev/null 2>&1; }
# pytest: quiet, failures listed, 8 workers and a per-test limit where the plugins are there
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider)
have xdist && PYTEST+=(-n "${TEST_WORKERS:-$([ "$GPU" = 1 ] && echo 8 || echo 2)}")
have pytest_timeout && PYTEST+=(--timeout "${TEST_TIMEOUT:-120}")
RESULTS="$WORK/results"  # every benchmark writes here (<device>/*.json), packed with the logs

log "gpu_session $phase: budget ${budget} s"
env_report
[ "$phase" != long ] && triton_cache
case "$phase" in
first)
    step install bash -c "$INSTALL"
    build_extension_bg
    step bench_ops "$PY" -m benchmarks --headline --out "$RESULTS"
    # shellcheck disable=SC2086
    step smoke "${PYTEST[@]}" --junitxml "$WORK/smoke.xml" $SMOKE_FILES -k "$SMOKE_K"
    # shellcheck disable=SC2086
    "$PY" -m pytest -q --collect-only -p no:cacheprovider $SMOKE_FILES -k "$SMOKE_K" 2>/dev/null \
        | grep '::' >"$WORK/smoke_ids.txt"
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
echo "== gpu_session $phase: $(tail -n 1 "$OUT/env.txt")  (${SECONDS} s of ${budget} s)"
printf '%s\n' "${summary[@]}"
echo "-- triton_cache.txt"; cat "$OUT/triton_cache.txt" 2>/dev/null
for f in "$WORK"/bench_ops.log "$WORK"/smoke.log "$WORK"/bench_qk.log "$WORK"/tests.log; do
    [ -f "$f" ] && { echo "-- $(basename "$f")"; tail -n 15 "$f"; }
done
exit 0
