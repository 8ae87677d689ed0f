"""Training curves of `distill` / `finetune-teacher` runs from their log.jsonl, as one PNG.

    plot_runs(["runs/task1", "runs/task2"], "curves.png")

Three panels against the step: every loss term the log holds (attention, embedding, hidden,
prediction, hard, total), one curve per run and term; the learning rate, one per run; the dev
metric at each evaluation (the task's "score", or the dev "total" loss of an intermediate stage),
one per run.  matplotlib is an optional extra (`pip install matplotlib`).
"""

from __future__ import annotations

import json
import os

from ._io import atomic_open

TERMS = ("attention", "embedding", "hidden", "prediction", "hard", "total")


def read_log(run_dir: str) -> dict:
    """{"train": {term: ([steps], [values])}, "lr": ([steps], [values]), "dev": (name, [steps],
    [values])} from a run folder's log.jsonl."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"run folder {run_dir!r} has no log.jsonl (is it a distill or "
                         f"finetune-teacher --output-dir?)")
    train: dict[str, tuple[list, list]] = {}
    lr: tuple[list, list] = ([], [])
    dev_name, dev_steps, dev_values = None, [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record.get("event") == "train":
                for term in TERMS:
                    if term in record:
                        steps, values = train.setdefault(term, ([], []))
                        steps.append(record["step"])
                        values.append(record[term])
                if "lr" in record:
                    lr[0].append(record["step"])
                    lr[1].append(record["lr"])
            elif record.get("event") == "eval":
                metrics = next(iter((record.get("metrics") or {}).values()), {})
                name = "score" if "score" in metrics else "dev_total" \
                    if "dev_total" in metrics else None
                if name is not None:
                    dev_name = dev_name or name
                    dev_steps.append(record["step"])
                    dev_values.append(metrics[name])
    return {"train": train, "lr": lr, "dev": (dev_name, dev_steps, dev_values)}


def plot_runs(run_dirs: list[str], output: str, labels: list[str] | None = None) -> dict:
    """Write the PNG (atomically); returns the number of curves per panel ({"loss", "lr",
    "dev"})."""
    if not run_dirs:
        raise ValueError("plot: give at least one run folder")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"plot: {len(labels)} labels for {len(run_dirs)} run folders")
    if not output.endswith(".png"):
        raise ValueError(f"plot: --output must be a .png file; got {output!r}")
    logs = [read_log(d) for d in run_dirs]  # every folder checked before matplotlib loads
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("tinybert-fast plot needs matplotlib (pip install matplotlib)") from exc
    labels = labels or [os.path.basename(os.path.normpath(d)) or d for d in run_dirs]
    fig, (ax_loss, ax_lr, ax_dev) = plt.subplots(1, 3, figsize=(15, 4))
    counts = {"loss": 0, "lr": 0, "dev": 0}
    for label, log in zip(labels, logs):
        for term, (steps, values) in log["train"].items():
            ax_loss.plot(steps, values, label=f"{label}: {term}",
                         linewidth=2.0 if term == "total" else 1.0)
            counts["loss"] += 1
        if log["lr"][0]:
            ax_lr.plot(*log["lr"], label=label)
            counts["lr"] += 1
        name, steps, values = log["dev"]
        if steps:
            ax_dev.plot(steps, values, marker="o", label=f"{label}: {name}")
            counts["dev"] += 1
    for ax, title in ((ax_loss, "training loss terms"), (ax_lr, "learning rate"),
                      (ax_dev, "dev metric")):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(output, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return counts
