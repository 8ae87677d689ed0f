#!/usr/bin/env bash
# The loss / mapping / weight study of TinyBERT4 from the MPNet teacher (#27): one factor at a time
# around TinyBERT's choices (benchmarks/mpnet_study.toml: 14 cells), 3 seeds, each run task step 1
# then step 2 from the general-distilled TinyBERT4, on one task, with the task's fine-tuned
# teacher of benchmarks/mpnet_glue_run.sh.  Resumable: run it again after a stop.
#
#   bash benchmarks/mpnet_study.sh TASK RUNS [STUDY]      # STUDY: default RUNS/study_TASK
#
# RUNS is mpnet_glue_run.sh's folder (RUNS/general/run/model, RUNS/TASK/teacher/model).
# Settings (environment): STEP1_EPOCHS (5), STEP2_EPOCHS (2), STEP1_LR (5e-5), STEP2_LR (3e-5),
# SEEDS (1,2,3), GLUE (../shared/data/glue), THREADS (1), PARALLEL (1).
# Then: python -m benchmarks.mpnet_study_summary TASK RUNS STUDY
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: bash benchmarks/mpnet_study.sh cola|mrpc|rte|sst2 RUNS [STUDY]" >&2
                  exit 2; }
task=$1 runs=$2 study=${3:-$2/study_$1}
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
GLUE="${GLUE:-../shared/data/glue}"
case "$task" in
    rte) folder=RTE max_length=128 ;;  mrpc) folder=MRPC max_length=128 ;;
    cola) folder=CoLA max_length=64 ;; sst2) folder=SST-2 max_length=64 ;;
    *) echo "mpnet_study: the first argument must be cola, mrpc, rte or sst2; got '$task'" >&2
       exit 2 ;;
esac
for need in "$runs/general/run/model/config.json" "$runs/$task/teacher/model/config.json"; do
    [ -f "$need" ] || { echo "mpnet_study: $need is missing: run benchmarks/mpnet_glue_run.sh" \
                             "general / $task first" >&2; exit 2; }
done
export OMP_NUM_THREADS="${THREADS:-1}" MKL_NUM_THREADS="${THREADS:-1}" HF_HUB_OFFLINE=1
"$PY" -m tinybert_fast.cli study --output-dir "$study" --design one-at-a-time \
    --grid-file benchmarks/mpnet_study.toml --seeds "${SEEDS:-1,2,3}" \
    --parallel "${PARALLEL:-1}" -- \
    --stage all --teacher "$runs/$task/teacher/model" --student "$runs/general/run/model" \
    --task "$task" --data-dir "$GLUE/$folder" --max-length "$max_length" --group-by-length \
    --batch-size 32 --epochs "${STEP1_EPOCHS:-5}" --lr "${STEP1_LR:-5e-5}" \
    --task2-epochs "${STEP2_EPOCHS:-2}" --task2-lr "${STEP2_LR:-3e-5}" --no-progress
