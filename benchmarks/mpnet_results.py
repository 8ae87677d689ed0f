"""Gather the MPNet -> TinyBERT4 GLUE runs of benchmarks/mpnet_glue_run.sh into glue_mpnet.json.

    python -m benchmarks.mpnet_results RUNS [--out benchmarks/results/cpu--x86-64--2-cores/glue_mpnet.json]

For each task folder under RUNS that has a teacher: the teacher's, the distilled student's
(task2), the hard-label student's (hard) and the task-distillation-only student's (task_only2)
last dev score, as fractions (MRPC: the mean of accuracy and F1, its GLUE "score"), the dev-set
size, each run's command (from its log) and training seconds.  A run that has not finished is
null.  "student_vs_hard_label": the distilled student against the hard-label one on the same dev
examples (score difference, paired-bootstrap 95% interval and p), once both runs left their
predictions.  Writes the JSON atomically and prints the table with % of the teacher and the dev
SE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tinybert_fast import glue, study
from tinybert_fast.distill.config import PREDICTIONS_FILE
from tinybert_fast.study_stats import paired_comparison
from tinybert_fast._io import atomic_write

TASKS = {"sst2": "accuracy", "cola": "mcc", "mrpc": "acc_f1", "rte": "accuracy"}
RUNS = {"teacher": "teacher", "student": "task2", "hard_label_student": "hard",
        "task_only_student": "task_only2"}
TRAIN_PARTS = {"teacher": ["teacher"], "student": ["task1", "task2"],
               "hard_label_student": ["hard"], "task_only_student": ["task_only1", "task_only2"]}


def _summary(folder: str) -> dict | None:
    path = os.path.join(folder, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def dev_score(summary: dict | None) -> tuple[float | None, int | None]:
    """(the last dev evaluation's "score", the dev-set size) of a run's summary.json."""
    if summary is None or not summary.get("dev"):
        return None, None
    dev = summary["dev"]
    split = next(k for k in dev if isinstance(dev[k], dict))
    return dev[split].get("score"), (summary.get("dev_examples") or {}).get(split)


def standard_error(metric: str, score: float | None, n: int | None) -> float | None:
    """The dev-set SE of a score (tinybert_fast.study.standard_error): sqrt(p(1-p)/n) for
    accuracy (and MRPC's mean, an approximation), (1 - r^2)/sqrt(n - 1) for MCC."""
    if score is None:
        return None
    return study.standard_error("mcc" if metric == "mcc" else "accuracy", score, n)


def _predictions(folder: str) -> dict | None:
    path = os.path.join(folder, PREDICTIONS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    return {split: (v["predictions"], v["labels"]) for split, v in saved.items()}


def paired_vs(task: str, folder: str, baseline: str) -> dict | None:
    """The run in `folder` against the run in `baseline` on the same dev examples: score
    difference, paired-bootstrap 95% interval and p (tinybert_fast.study_stats); None until both
    left predictions (PREDICTIONS_FILE)."""
    a, b = _predictions(folder), _predictions(baseline)
    if a is None or b is None:
        return None
    split = next(iter(b))
    return paired_comparison(glue.get_task(task), {0: a[split]}, {0: b[split]})


def gather(runs: str, teacher: str = "all-mpnet-base-v2",
           student: str = "TinyBERT4 (4 x 312, 12 heads, FFN 1200)") -> dict:
    tasks = {}
    for task, metric in TASKS.items():
        folder = os.path.join(runs, task)
        if not os.path.isdir(os.path.join(folder, "teacher")):
            continue
        row = {"metric": metric, "dev_examples": None, "commands": [], "train_seconds": {}}
        for key, name in RUNS.items():
            score, n = dev_score(_summary(os.path.join(folder, name)))
            row[key] = score
            row["dev_examples"] = row["dev_examples"] or n
        for key, parts in TRAIN_PARTS.items():
            summaries = [_summary(os.path.join(folder, p)) for p in parts]
            row["train_seconds"][key] = (round(sum(s["train_seconds"] for s in summaries), 1)
                                         if all(summaries) else None)
            for part in parts:
                config = os.path.join(folder, part, "command.txt")
                if os.path.isfile(config):
                    with open(config, encoding="utf-8") as f:
                        row["commands"].append(f.read().strip())
        row["dev_se"] = standard_error(metric, row["teacher"], row["dev_examples"])
        row["student_vs_hard_label"] = paired_vs(task, os.path.join(folder, RUNS["student"]),
                                                 os.path.join(folder, RUNS["hard_label_student"]))
        tasks[task] = row
    return {"teacher": teacher, "student": student, "tasks": tasks}


def paired_text(p: dict | None) -> str:
    if p is None:
        return "—"
    return f"{p['delta']:+.4f} ({p['ci_low']:+.4f}, {p['ci_high']:+.4f}; p {p['p']:.3f})"


def table(result: dict) -> str:
    lines = ["| task | teacher | TinyBERT4 | % of teacher | hard-label | task-only | dev SE | "
             "TinyBERT4 − hard-label, paired (95% interval) |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: "—" if x is None else f"{x:.4f}"  # noqa: E731
    for task, r in result["tasks"].items():
        share = (f"{100 * r['student'] / r['teacher']:.1f}%" if r["student"] is not None
                 and r["teacher"] else "—")
        lines.append(f"| {task} ({r['metric']}) | {fmt(r['teacher'])} | {fmt(r['student'])} | "
                     f"{share} | {fmt(r['hard_label_student'])} | {fmt(r['task_only_student'])} "
                     f"| {fmt(r['dev_se'])} | {paired_text(r.get('student_vs_hard_label'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", help="the RUNS folder of benchmarks/mpnet_glue_run.sh")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "cpu--x86-64--2-cores", "glue_mpnet.json"))
    args = p.parse_args(argv)
    if not os.path.isdir(args.runs):
        print(f"mpnet_results: RUNS {args.runs!r} is not a folder", file=sys.stderr)
        return 2
    result = gather(args.runs)
    atomic_write(args.out, json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
