"""Commit a finished (or partial) MPNet study (benchmarks/mpnet_study.sh) under the results.

    python -m benchmarks.mpnet_study_summary TASK RUNS STUDY \
        [--out benchmarks/results/cpu--x86-64--2-cores/study_mpnet]

Copies STUDY's tables (the study rewrites them as each run finishes: a stopped study's hold its
finished runs), results.csv, results.md, paired.json and the plots, to OUT, and writes
OUT/summary.json: {"task", "majority_score" (the dev score of predicting the training set's most
frequent label everywhere), "dev_examples", "teacher_score" (RUNS/TASK/teacher's last dev
score), "cells", "runs", "min_cell_mean", "min_cell_se_above_majority"}: the last two check the
study's budget (every cell's mean at least 5 dev SE above the majority class).
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import shutil
import statistics
import sys

from tinybert_fast import data, glue, study
from tinybert_fast._io import atomic_write

from .mpnet_results import _summary, dev_score

OUT = os.path.join(os.path.dirname(__file__), "results", "cpu--x86-64--2-cores", "study_mpnet")
FOLDERS = {"cola": "CoLA", "mrpc": "MRPC", "rte": "RTE", "sst2": "SST-2"}
COPIED = ("results.csv", "results.md", "paired.json", "score.png", "loss.png")


def majority_score(task: glue.Task, data_dir: str) -> tuple[float, int]:
    """(the dev score of the training set's most frequent label, the dev-set size)."""
    train = [e.label for e in data.load_examples(task, "train", data_dir)]
    dev = [e.label for e in data.load_examples(task, "dev", data_dir)]
    majority = collections.Counter(train).most_common(1)[0][0]
    return data.compute_metrics(task, [majority] * len(dev), dev)["score"], len(dev)


def summarise(task_name: str, runs: str, study_dir: str, glue_dir: str) -> dict:
    task = glue.get_task(task_name)
    majority, n_dev = majority_score(task, os.path.join(glue_dir, FOLDERS[task_name]))
    teacher, _ = dev_score(_summary(os.path.join(runs, task_name, "teacher")))
    with open(os.path.join(study_dir, "results.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_cell = collections.defaultdict(list)
    for row in rows:
        by_cell[row["cell"]].append(float(row["dev_score"]))
    means = {cell: statistics.fmean(v) for cell, v in by_cell.items()}
    lowest = min(means.values()) if means else None
    metric = "mcc" if task.metric == "mcc" else "accuracy"
    se = study.standard_error(metric, lowest, n_dev) if lowest is not None else None
    return {"task": task_name, "majority_score": majority, "dev_examples": n_dev,
            "teacher_score": teacher, "cells": len(by_cell), "runs": len(rows),
            "seeds_per_cell": {c: len(v) for c, v in sorted(by_cell.items())},
            "min_cell_mean": lowest,
            "min_cell_se_above_majority": (lowest - majority) / se if se else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=sorted(FOLDERS))
    p.add_argument("runs", help="the RUNS folder of benchmarks/mpnet_glue_run.sh")
    p.add_argument("study", help="the study's folder (benchmarks/mpnet_study.sh's STUDY)")
    p.add_argument("--glue", default=os.path.join("..", "shared", "data", "glue"))
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.study, "results.csv")):
        print(f"mpnet_study_summary: {args.study} has no results.csv yet", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    for name in COPIED:
        source = os.path.join(args.study, name)
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(args.out, name + ".tmp"))
            os.replace(os.path.join(args.out, name + ".tmp"), os.path.join(args.out, name))
    summary = summarise(args.task, args.runs, args.study, args.glue)
    atomic_write(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
