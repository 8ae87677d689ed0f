"""Paired comparisons of two study cells on the same dev examples.

A cell's runs (one per seed) each leave the last evaluation's prediction of every dev example
(tinybert_fast.distill.config.PREDICTIONS_FILE).  For a cell c and the baseline cell b, over the
seeds both have, the task's score m (accuracy; the mean of accuracy and F1; Matthews correlation)
gives

    delta = mean over seeds s of  m(c_s) - m(b_s)

and a paired bootstrap over dev examples gives its uncertainty: each replicate draws n of the n
dev examples with replacement, the same draw for every seed and both cells, and recomputes delta
on it.  The 95% interval is the 2.5th to 97.5th percentile of the replicates; p is the two-sided
percentile p-value 2 min(P(delta* <= 0), P(delta* >= 0)).  The power the dev set gives:
"detectable" = (z_0.975 + z_0.8) sd(delta*) = 2.80 sd(delta*), the difference this test finds
four times in five at p < 0.05 (normal approximation, the same noise).  This is the dev set's
sampling noise for these trained models, with the differences between the two cells'
predictions on the same examples taken into account (far tighter than two unpaired standard
errors when the cells agree on most examples); the spread over seeds is the study table's sd.

Scores are computed from confusion counts, vectorised over replicates; regression tasks (STS-B)
are not supported (ValueError).
"""

from __future__ import annotations

import numpy as np

from .glue import Task, get_task


DETECTABLE_Z = 1.959964 + 0.841621   # two-sided 5% test, 80% power


def _scores(task: Task, correct: np.ndarray, pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The task's score of each row of [R, n] resampled (correct, predicted class, label)."""
    accuracy = correct.mean(-1)
    if task.metric == "accuracy":
        return accuracy
    tp = ((pred == 1) & (label == 1)).sum(-1).astype(np.float64)
    fp = ((pred == 1) & (label != 1)).sum(-1).astype(np.float64)
    fn = ((pred != 1) & (label == 1)).sum(-1).astype(np.float64)
    if task.metric == "accuracy_f1":
        f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=tp > 0)
        return (accuracy + f1) / 2
    if task.metric == "mcc":  # binary: (TP TN - FP FN) / sqrt of the four margins; 0 if one is 0
        tn = label.shape[-1] - tp - fp - fn
        denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return np.divide(tp * tn - fp * fn, denominator, out=np.zeros_like(tp),
                         where=denominator > 0)
    raise ValueError(f"paired comparisons support classification tasks; {task.name!r} has metric "
                     f"{task.metric!r}")


def paired_comparison(task: Task, cell: dict[int, tuple], baseline: dict[int, tuple], *,
                      replicates: int = 2000, seed: int = 0) -> dict | None:
    """delta, its 95% bootstrap interval and p (module docstring) of `cell` against `baseline`.

    cell, baseline: {seed: (predictions [n], labels [n])} of each finished run.  Only seeds both
    have count; None when there is none.  ValueError when two runs' labels differ (they were not
    evaluated on the same examples).
    Returns {"delta", "ci_low", "ci_high", "p", "detectable", "seeds", "dev_examples",
    "replicates"}.
    """
    seeds = sorted(set(cell) & set(baseline))
    if not seeds:
        return None
    labels = np.asarray(baseline[seeds[0]][1])
    for name, runs in (("cell", cell), ("baseline", baseline)):
        for s in seeds:
            if not np.array_equal(np.asarray(runs[s][1]), labels):
                raise ValueError(f"the {name}'s seed-{s} run was evaluated on other dev examples "
                                 f"than the baseline's seed-{seeds[0]} run")
    n = len(labels)
    rng = np.random.default_rng(seed)
    draws = np.vstack([np.arange(n)[None], rng.integers(0, n, size=(replicates, n))])
    resampled_labels = labels[draws]
    deltas = np.zeros(len(draws))
    for s in seeds:
        for runs, sign in ((cell, 1.0), (baseline, -1.0)):
            pred = np.asarray(runs[s][0])[draws]
            deltas += sign * _scores(task, pred == resampled_labels, pred, resampled_labels)
    deltas /= len(seeds)
    observed, boot = float(deltas[0]), deltas[1:]
    low, high = np.percentile(boot, [2.5, 97.5])
    p = min(1.0, 2 * min(float((boot <= 0).mean()), float((boot >= 0).mean())))
    return {"delta": observed, "ci_low": float(low), "ci_high": float(high), "p": p,
            "detectable": DETECTABLE_Z * float(boot.std()), "seeds": seeds, "dev_examples": n,
            "replicates": replicates}


def paired_with_baseline(task: str, by_cell: dict[str, dict[int, dict]],
                         baseline: str) -> list[dict]:
    """paired_comparison of every cell against `baseline`, per dev split.

    by_cell: {cell id: {seed: {split: (predictions, labels)}}} of the finished runs.  [] when the
    baseline has no finished run or the task is a regression.  Each row: {"cell", "baseline",
    "split", **paired_comparison}."""
    if baseline not in by_cell or get_task(task).is_regression:
        return []
    base = by_cell[baseline]
    splits = sorted({split for runs in base.values() for split in runs})
    rows = []
    for name, seeds in by_cell.items():
        if name == baseline:
            continue
        for split in splits:
            result = paired_comparison(
                get_task(task), {s: v[split] for s, v in seeds.items() if split in v},
                {s: v[split] for s, v in base.items() if split in v})
            if result is not None:
                rows.append({"cell": name, "baseline": baseline, "split": split, **result})
    return rows


def paired_markdown(rows: list[dict]) -> str:
    """The paired comparisons as a markdown table with its caption ("" without any); a row's
    "change" (the keys that differ from the baseline) names it, else its cell id."""
    if not rows:
        return ""
    lines = ["", f"Paired with the baseline `{rows[0]['baseline']}` (cell minus baseline on the "
             f"same dev examples, mean over the seeds both have; paired bootstrap over dev "
             f"examples, {rows[0]['replicates']} replicates; p two-sided; detectable: the "
             f"difference found at p < 0.05 with 80% power):", "",
             "| change from the baseline | split | seeds | Δ score | 95% interval | p | "
             "detectable |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.get('change') or r['cell']} | {r['split']} | {len(r['seeds'])} | "
                     f"{r['delta']:+.4f} | [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | "
                     f"{r['p']:.3f} | {r['detectable']:.4f} |")
    return "\n".join(lines) + "\n"
