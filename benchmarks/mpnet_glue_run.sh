#!/usr/bin/env bash
# TinyBERT's own setting on a CPU: the MPNet teacher (all-mpnet-base-v2, 12 x 768), TinyBERT4
# students (4 x 312, 12 heads, FFN 1200; an MPNet-family student by default), GLUE tasks from
# local TSV folders.  Every step is resumable: a finished run (summary.json) is skipped, an
# interrupted one continues from its checkpoint (--resume), an interrupted teacher cache from its
# committed chunks.  Run it again after a stop and it goes on where it was.
#
#   bash benchmarks/mpnet_glue_run.sh general RUNS            # general distillation
#   bash benchmarks/mpnet_glue_run.sh TASK RUNS               # rte | mrpc | cola | sst2
#
# general: builds the teacher folder (benchmarks.mpnet_teacher) and the corpus
# (benchmarks.glue_corpus: every GLUE training sentence, dev/test excluded), then general
# distillation into RUNS/general/run (teacher cache at RUNS/general/cache).
# TASK: the task's teacher (finetune-teacher; it needs nothing else), then, from the
# general-distilled student RUNS/general/run/model (it stops before them until that exists), task
# step 1 and 2
# from the general-distilled init (RUNS/TASK/task1, task2), the hard-label TinyBERT4 from the same
# init for as many epochs as steps 1 + 2 (RUNS/TASK/hard), and TinyBERT4 with task distillation
# only (random init, steps 1 + 2: RUNS/TASK/task_only1, task_only2).  The teacher cache of the
# task (RUNS/TASK/cache) serves every student.  Then `python -m benchmarks.mpnet_results RUNS`
# gathers glue_mpnet.json.
#
# Settings (environment): MODELS (where the teacher folder goes, default ../models), GLUE
# (default ../shared/data/glue), STUDENT_FAMILY (teacher | bert), GENERAL_EPOCHS (5),
# GENERAL_LR (1e-4), TEACHER_EPOCHS (per task below), TEACHER_LR (2e-5), STEP1_EPOCHS (per task),
# STEP1_LR (5e-5), STEP2_EPOCHS (3), STEP2_LR (3e-5), STEP2_T (1), THREADS (1).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: bash benchmarks/mpnet_glue_run.sh general|rte|mrpc|cola|sst2 RUNS" >&2
                  exit 2; }
what=$1 runs=$2
shift 2
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
GLUE="${GLUE:-../shared/data/glue}"
MODELS="${MODELS:-../models}"
export OMP_NUM_THREADS="${THREADS:-1}" MKL_NUM_THREADS="${THREADS:-1}" HF_HUB_OFFLINE=1
case "$what" in general|rte|mrpc|cola|sst2) ;;
    *) echo "mpnet_glue_run: the first argument must be general, rte, mrpc, cola or sst2;" \
            "got '$what'" >&2; exit 2 ;;
esac
mkdir -p "$runs"
teacher_dir=$("$PY" -m benchmarks.mpnet_teacher --out "$MODELS")
family=(--student-family "${STUDENT_FAMILY:-teacher}")

run() {  # name, then the command's arguments; a finished run (summary.json) is not redone
    local name=$1; shift
    [ -f "$runs/$name/summary.json" ] && return 0
    echo "mpnet_glue_run: $name: tinybert-fast $* --output-dir $runs/$name" >&2
    mkdir -p "$runs/$name"   # the command, for benchmarks.mpnet_results
    echo "tinybert-fast $* --output-dir $runs/$name" > "$runs/$name/command.txt"
    "$PY" -m tinybert_fast.cli "$@" --resume --no-progress --output-dir "$runs/$name"
}

if [ "$what" = general ]; then
    [ -f "$runs/general/corpus.txt" ] || {
        mkdir -p "$runs/general"
        "$PY" -m benchmarks.glue_corpus --glue "$GLUE" --out "$runs/general/corpus.txt"; }
    run general/run distill --stage general --teacher "$teacher_dir" --student tinybert4 \
        "${family[@]}" --corpus "$runs/general/corpus.txt" --max-length 128 \
        --teacher-cache "$runs/general/cache" --batch-size 32 --lr "${GENERAL_LR:-1e-4}" \
        --warmup-ratio 0.1 --schedule linear --epochs "${GENERAL_EPOCHS:-5}" --group-by-length \
        --save-steps 200 "$@"
    exit 0
fi

case "$what" in
    rte)  folder=RTE   max_length=128 step1=20 teacher_epochs=3 ;;
    mrpc) folder=MRPC  max_length=128 step1=20 teacher_epochs=3 ;;
    cola) folder=CoLA  max_length=64  step1=50 teacher_epochs=3 ;;
    # 67k examples: TinyBERT's 20 step-1 epochs are days on one core, and so are 3 teacher epochs
    # (about 2 h each); one teacher epoch
    sst2) folder=SST-2 max_length=64  step1=3  teacher_epochs=1 ;;
    *) echo "mpnet_glue_run: the first argument must be general, rte, mrpc, cola or sst2;" \
            "got '$what'" >&2; exit 2 ;;
esac
general="$runs/general/run/model"
STEP1_EPOCHS="${STEP1_EPOCHS:-$step1}" STEP2_EPOCHS="${STEP2_EPOCHS:-3}"
data=(--task "$what" --data-dir "$GLUE/$folder" --max-length "$max_length" --group-by-length)
cache=(--teacher-cache "$runs/$what/cache")
step1=(--epochs "$STEP1_EPOCHS" --lr "${STEP1_LR:-5e-5}" --batch-size 32)
step2=(--epochs "$STEP2_EPOCHS" --lr "${STEP2_LR:-3e-5}" --batch-size 32
       --temperature "${STEP2_T:-1}")
teacher="$runs/$what/teacher/model"

run "$what/teacher" finetune-teacher --model "$teacher_dir" "${data[@]}" --batch-size 16 \
    --epochs "${TEACHER_EPOCHS:-$teacher_epochs}" --lr "${TEACHER_LR:-2e-5}" --save-steps 100
# the teacher needs no general-distilled student; everything after it starts from one
[ -f "$general/config.json" ] || { echo "mpnet_glue_run: $what/teacher done; no general-distilled" \
    "student at $general yet: run 'bash benchmarks/mpnet_glue_run.sh general $runs' first" >&2
    exit 2; }
run "$what/task1" distill --stage task1 --teacher "$teacher" --student "$general" "${data[@]}" \
    "${cache[@]}" "${step1[@]}" --save-steps 200
run "$what/task2" distill --stage task2 --teacher "$teacher" --student "$runs/$what/task1/model" \
    "${data[@]}" "${cache[@]}" "${step2[@]}"
run "$what/hard" finetune-teacher --model "$general" --tokenizer "$teacher" "${data[@]}" \
    --epochs "$((STEP1_EPOCHS + STEP2_EPOCHS))" --lr "${STEP2_LR:-3e-5}" --batch-size 32 \
    --save-steps 200
run "$what/task_only1" distill --stage task1 --teacher "$teacher" --student tinybert4 \
    "${family[@]}" "${data[@]}" "${cache[@]}" "${step1[@]}" --save-steps 200
run "$what/task_only2" distill --stage task2 --teacher "$teacher" \
    --student "$runs/$what/task_only1/model" "${data[@]}" "${cache[@]}" "${step2[@]}"
echo "mpnet_glue_run: $what done; gather with: $PY -m benchmarks.mpnet_results $runs" >&2
