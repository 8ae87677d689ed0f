"""`tinybert-fast study`: a grid of distillation runs, each run once (resumable), tabulated.

A grid maps DistillConfig fields (`attention_weight`, `mapping`, ...; every field but those
the study sets, RESERVED) to the values to try, as text; each value is checked against its
field's type, and every combination is a cell, run once per seed:

    grid = {"mapping": ["uniform", "top"], "attention_weight": ["0.5", "1"]}   # 2 x 2 cells
    run_study(out, grid, seeds=[1, 2], base_argv=["--stage", "task1", "--teacher", ...],
              parse_argv=tinybert_fast.commands.study.parse_distill_argv)

Each run is a `tinybert-fast distill` process: its command line is the study's common flags, then
the cell's (`--<field with '-'>`; a switch that is on by default is `--no-<field>`).  This module
builds those flags without argparse, which lives in the command-line wing only; the distill
command line is read back into a DistillConfig by `parse_argv`, which the caller passes.

Layout of the output folder:

    runs/<cell id>/seed<k>/   each run's `distill` output (summary.json, log.jsonl, model/) and
                              run.json (its command line); run.log (its stdout and stderr)
    caches/<key>/             one teacher cache per distinct set of teacher outputs the cells
                              need (the teacher runs once per key, not once per run)
    results.csv               one row per finished run (rewritten as each run finishes): grid
                              keys, seed, dev metrics, wall time, examples/s
    results.md                one row per cell: mean and standard deviation over seeds, and the
                              dev metric's standard error from the dev-set size
    score.png, loss.png       the dev metric per cell (error bars), training loss per cell
                              (matplotlib, an optional extra; skipped with a note without it)

A cell id is its `key=value` pairs, sorted by key and joined by `__`.  A finished run (its
summary.json) is never redone; an unfinished one continues from its checkpoint (`--resume`); a
run folder made with another command line is refused.  Every cell is checked (option names,
values, the resolved config, the layer mapping) before the first run starts.

Standard errors of a dev metric m measured on n dev examples: sqrt(m (1 - m) / n) for accuracy,
F1 and their average (a binomial proportion; for F1 an approximation), (1 - r^2) / sqrt(n - 1)
for a Matthews, Pearson or Spearman correlation r.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
import typing
from collections.abc import Callable

from ._io import atomic_write
from .cache.format import MANIFEST
from .distill.config import PREDICTIONS_FILE, is_intermediate
from .errors import InputError
# the grid's names, reachable as study.<name> as before the grid had a module of its own
from .study_grid import (DESIGNS, RESERVED, _default, cell_argv, cell_id,  # noqa: F401
                         cell_value, cells, flag, grid_fields, load_grid_file, parse_grid_flags)

if typing.TYPE_CHECKING:
    from .distill.config import DistillConfig

log = logging.getLogger("tinybert_fast.study")

# the DistillConfig fields that decide what a teacher cache holds (with the mapped layers)
CACHE_FIELDS = ("teacher", "tokenizer", "task", "data_dir", "train_file", "corpus", "max_length",
                "pad_to_max_length", "limit_train", "cache_dtype", "attention_form")
CORRELATIONS = ("mcc", "pearson", "spearman")


@dataclasses.dataclass
class Run:
    """One run of the study: a cell and a seed."""
    cell: dict[str, str]
    seed: int
    argv: list[str]          # the distill command line, output dir and seed included
    directory: str
    cache_key: str | None

    @property
    def name(self) -> str:
        return f"{cell_id(self.cell)}/seed{self.seed}"

    @property
    def finished(self) -> bool:
        return os.path.isfile(os.path.join(self.directory, "summary.json"))


def _layer_sets(cfg) -> dict | None:
    """What a resolved intermediate-stage config reads from the teacher ({attention, hidden,
    storage}: its TeacherTargets' layers and cache storage), or None when the model configs
    cannot be read here (a hub name offline: the run will say)."""
    from . import mapping
    from .distill.models import check_pair, student_config
    from .distill.targets import TeacherTargets
    try:
        from transformers import AutoConfig
        t_config = AutoConfig.from_pretrained(cfg.teacher)
    except (OSError, ValueError):
        return None
    s_config = student_config(cfg.student, t_config, cfg.student_family)
    lm = mapping.layer_map(cfg.mapping, s_config.num_hidden_layers, t_config.num_hidden_layers,
                           seed=cfg.mapping_seed, layers=cfg.mapping_layers)
    targets = TeacherTargets.of(cfg, lm, t_config)
    check_pair(s_config, t_config, targets)
    return {"attention": list(targets.attention_layers), "hidden": list(targets.hidden_states),
            "storage": targets.cache_attention_storage}


def _cache_key(cfg) -> str:
    """What decides a run's teacher cache, hashed: the data, the teacher, the cache's dtype and
    attention storage, and (intermediate stages) the mapped teacher layers."""
    key = {name: getattr(cfg, name) for name in CACHE_FIELDS}
    if is_intermediate(cfg.stage):  # plan() passes a --stage all cell as its step 1
        layers = _layer_sets(cfg)
        key["layers"] = layers if layers is not None else {
            "mapping": cfg.mapping, "mapping_layers": cfg.mapping_layers,
            "mapping_seed": cfg.mapping_seed, "student": cfg.student}
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def plan(output_dir: str, grid: dict[str, list[str]], seeds: list[int], base_argv: list[str],
         *, parse_argv: Callable[[list[str]], DistillConfig],
         teacher_cache: bool = True, design: str = "product") -> list[Run]:
    """Every run of the study (the cells of `design`, study_grid.cells), each cell checked (its
    distill command line parses, its config resolves, its layer mapping and student/teacher pair
    are valid, its input paths exist) before any runs: InputError naming the cell otherwise.
    Seed-major order: every cell's run with the first seed, then with the second, ..., so a
    study stopped part-way has all cells measured at the seeds it finished.

    parse_argv: a distill command line -> its DistillConfig, raising ValueError for a bad one
    (tinybert_fast.commands.study.parse_distill_argv: the command line knows the flags, this
    module the config)."""
    if not seeds:
        raise InputError("give at least one seed", argument="--seeds")
    if len(set(seeds)) != len(seeds):
        raise InputError("the seeds must be distinct", argument="--seeds", found=seeds)
    for option in ("--output-dir", "--seed", "--resume", "--teacher-cache"):
        if any(a == option or a.startswith(option + "=") for a in base_argv):
            raise InputError(f"{option} is set by the study for each run; leave it out of the "
                             f"distill flags")
    checked = []  # (cell, argv, cache key) of each cell
    for cell in cells(grid, design):
        name = cell_id(cell)
        try:
            argv = [*base_argv, *cell_argv(cell)]
            probe = [*argv, "--output-dir", os.path.join(output_dir, "runs", name), "--seed", "0"]
            cfg = parse_argv(probe)
            for key, value in cell.items():  # the flag set the field (cell_argv's convention)
                if getattr(cfg, key) != cell_value(key, value):
                    raise ValueError(f"grid key {key!r}: {flag(key)} {value} gave "
                                     f"{getattr(cfg, key)!r}")
            check_inputs(cfg)
            if cfg.stage == "all":  # the loop resolves each step on its own: check both
                dataclasses.replace(cfg, stage="task2").resolved()
                cfg = dataclasses.replace(cfg, stage="task1")
            cfg = cfg.resolved()
            key = _cache_key(cfg) if teacher_cache and cfg.stage != "finetune" else None
        except ValueError as exc:
            raise InputError(f"cell {name}: {exc}") from exc
        checked.append((cell, argv, key))
    runs = []
    for seed in seeds:  # seed-major: one seed of every cell first, then the next seed
        for cell, argv, key in checked:
            directory = os.path.join(output_dir, "runs", cell_id(cell), f"seed{seed}")
            run_argv = [*argv, "--output-dir", directory, "--seed", str(seed)]
            if key is not None:
                run_argv += ["--teacher-cache", os.path.join(output_dir, "caches", key)]
            runs.append(Run(cell, seed, run_argv, directory, key))
    return runs


def check_inputs(cfg: DistillConfig) -> None:
    """The paths a run reads exist: the model folders (tinybert_fast.checkpoints: a local folder
    checked, a local path that does not exist refused, a hub id passed on) and the data.  The
    runs are other processes: without this, each would fail on its own, after the study
    started."""
    from .checkpoints import check_model_argument
    from .distill.config import PRESETS
    if cfg.teacher:
        check_model_argument(cfg.teacher, "teacher (--teacher)")
    if cfg.student not in PRESETS and not cfg.student.endswith(".json"):
        check_model_argument(cfg.student, "student (--student)")
    if cfg.tokenizer:
        check_model_argument(cfg.tokenizer, "tokenizer (--tokenizer)", "tokenizer")
    for name, kind in (("data_dir", "folder"), ("train_file", "file"), ("corpus", "file")):
        path = getattr(cfg, name)
        if path is not None and not (os.path.isdir(path) if kind == "folder"
                                     else os.path.isfile(path)):
            raise InputError("no such file or folder" if not os.path.exists(path)
                             else f"not a {kind}", argument=f"--{name.replace('_', '-')}",
                             path=path, expected=f"an existing {kind}")


# --- running ---------------------------------------------------------------------------------------

def _read_record(path: str, key: str | None = None) -> dict:
    """A run's JSON record (run.json, summary.json), a table holding `key` (when given):
    InputError naming the file (and line and column) for a damaged one, e.g. a study folder
    edited or copied half-way."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg}); delete the run's folder to redo it",
                         path=path, line=exc.lineno, column=exc.colno) from None
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text; delete the run's folder to redo it", path=path) \
            from None
    if not isinstance(record, dict) or (key is not None and key not in record):
        raise InputError("not a run's record" + (f" (no {key!r})" if key else ""), path=path,
                         expected="the file a study run writes")
    return record


def _check_run_folder(run: Run) -> None:
    """A run folder made by another command line is not taken over."""
    path = os.path.join(run.directory, "run.json")
    if os.path.isfile(path):
        before = _read_record(path, "argv")["argv"]
        if before != run.argv:
            raise ValueError(f"run {run.name} was made with another command line "
                             f"({' '.join(before)}); use another --output-dir or delete "
                             f"{run.directory}")


def _start(run: Run, gpu: int | None) -> subprocess.Popen:
    os.makedirs(run.directory, exist_ok=True)
    atomic_write(os.path.join(run.directory, "run.json"),
                 json.dumps({"cell": run.cell, "seed": run.seed, "argv": run.argv}, indent=1)
                 + "\n")
    argv = list(run.argv)
    if os.path.isdir(os.path.join(run.directory, "checkpoint")):
        argv.append("--resume")
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    logfile = open(os.path.join(run.directory, "run.log"), "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "tinybert_fast.cli", "distill", *argv],
                                stdout=logfile, stderr=subprocess.STDOUT, env=env)
    finally:
        logfile.close()


def execute(runs: list[Run], parallel: int = 1,
            on_finished: Callable[[], object] | None = None) -> list[str]:
    """Run the unfinished runs, `parallel` at a time (one per GPU when several are visible);
    runs sharing a teacher cache that is not built yet wait for the one building it;
    `on_finished()` is called after each run that finishes.  Returns the names of the runs that
    failed (their run.log says why)."""
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1; got {parallel}")
    for run in runs:
        _check_run_folder(run)
    pending = [r for r in runs if not r.finished]
    done = len(runs) - len(pending)
    if done:
        log.info("study: %d of %d runs already finished", done, len(runs))
    try:
        import torch
        n_gpus = torch.cuda.device_count()
    except ImportError:  # pragma: no cover - torch is a dependency
        n_gpus = 0
    active: dict[int, tuple[Run, subprocess.Popen]] = {}  # slot -> run
    building: set[str] = set()
    failed: list[str] = []

    def cache_ready(run):  # built, or nobody is building it (this run will)
        if run.cache_key is None:
            return True
        path = run.argv[run.argv.index("--teacher-cache") + 1]
        return os.path.isfile(os.path.join(path, MANIFEST)) or run.cache_key not in building

    try:
        while pending or active:
            for slot in [s for s in range(parallel) if s not in active]:
                ready = next((r for r in pending if cache_ready(r)), None)
                if ready is None:
                    break
                pending.remove(ready)
                if ready.cache_key is not None:
                    building.add(ready.cache_key)
                gpu = slot % n_gpus if n_gpus > 1 else None
                log.info("study: starting %s", ready.name)
                active[slot] = (ready, _start(ready, gpu))
            time.sleep(0.2)
            for slot, (run, proc) in list(active.items()):
                if proc.poll() is None:
                    continue
                del active[slot]
                if run.cache_key is not None:
                    building.discard(run.cache_key)
                if proc.returncode != 0 or not run.finished:
                    failed.append(run.name)
                    log.error("study: %s failed (exit status %s): see %s", run.name,
                              proc.returncode, os.path.join(run.directory, "run.log"))
                else:
                    log.info("study: %s finished", run.name)
                    if on_finished is not None:
                        on_finished()
    finally:
        for _, proc in active.values():
            proc.terminate()
    return failed


# --- tables and plots ------------------------------------------------------------------------------

def _final_dev(summary: dict) -> tuple[dict, int | None]:
    """(the last dev evaluation's metrics, the dev-set size) of a run's summary.json (for
    `--stage all`, task step 2's)."""
    if "task2" in summary and "dev" not in summary:
        summary = summary["task2"]
    dev = summary.get("dev") or {}
    split = next((k for k in dev if isinstance(dev[k], dict)), None)
    sizes = summary.get("dev_examples") or {}
    return (dev[split] if split else {}), sizes.get(split)


def standard_error(metric: str, value: float, n: int | None) -> float | None:
    """The standard error of a dev metric from the dev-set size (module docstring)."""
    if n is None or n < 2 or value is None or not math.isfinite(value):
        return None
    if metric in CORRELATIONS:
        return (1 - value * value) / math.sqrt(n - 1)
    if 0 <= value <= 1:
        return math.sqrt(value * (1 - value) / n)
    return None


def _score_metric(metrics: dict) -> str:
    """The name of the metric behind "score" (for its standard error)."""
    for name in CORRELATIONS:
        if name in metrics:
            return name
    return "accuracy"


def collect(runs: list[Run]) -> list[dict]:
    """One row per finished run: the cell's keys, seed, dev metrics, wall time, examples/s."""
    rows = []
    for run in runs:
        if not run.finished:
            continue
        summary = _read_record(os.path.join(run.directory, "summary.json"))
        metrics, n_dev = _final_dev(summary)
        steps = [summary[k] for k in ("task1", "task2")] if summary.get("stage") == "all" \
            else [summary]  # a --stage all run's time is both steps'
        seconds = sum(s.get("train_seconds", float("nan")) for s in steps)
        examples = sum(s.get("examples_seen", float("nan")) for s in steps)
        rows.append({"cell": cell_id(run.cell), **run.cell, "seed": run.seed,
                     **{f"dev_{k}": v for k, v in metrics.items()
                        if isinstance(v, (int, float))},
                     "dev_examples": n_dev,
                     "train_seconds": round(seconds, 2),
                     "examples_per_second": round(examples / seconds, 2) if seconds else
                     float("nan")})
    return rows


def _csv(rows: list[dict], keys: list[str]) -> str:
    columns = ["cell", *keys, "seed"]
    columns += sorted({c for r in rows for c in r} - set(columns))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return out.getvalue()


def _fmt(x, digits=4):
    return "" if x is None else f"{x:.{digits}f}"


def _markdown(rows: list[dict], keys: list[str], all_cells: list[str]) -> str:
    by_cell: dict[str, list[dict]] = {}
    for row in rows:
        by_cell.setdefault(row["cell"], []).append(row)
    metric_names = sorted({c for r in rows for c in r if c.startswith("dev_")}
                          - {"dev_examples"})
    header = [*keys, "seeds", *(f"{m[4:]} (mean ± sd)" for m in metric_names),
              "SE of score", "train s (mean)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in all_cells:
        group = by_cell.get(name)
        if not group:
            continue
        cells_ = [str(group[0].get(k, "")) for k in keys] + [str(len(group))]
        for m in metric_names:
            values = [r[m] for r in group if r.get(m) is not None]
            if not values:
                cells_.append("")
                continue
            mean = statistics.fmean(values)
            # one seed has no sd: the mean alone, never a "± 0" that reads as no spread
            cells_.append(f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1
                          else f"{mean:.4f}")
        scores = [r["dev_score"] for r in group if r.get("dev_score") is not None]
        se = None
        if scores:
            se = standard_error(_score_metric({m[4:]: 1 for m in metric_names}),
                                statistics.fmean(scores), group[0].get("dev_examples"))
        cells_.append(_fmt(se))
        cells_.append(f"{statistics.fmean(r['train_seconds'] for r in group):.1f}")
        lines.append("| " + " | ".join(cells_) + " |")
    lines.append("")
    lines.append("sd: standard deviation over seeds (none with one seed).  SE: the dev metric's "
                 "standard error from the "
                 "dev-set size (sqrt(m(1-m)/n) for accuracy/F1, (1-r²)/sqrt(n-1) for "
                 "correlations): differences between cells smaller than about 2 SE are within the "
                 "dev set's noise.")
    return "\n".join(lines) + "\n"


def _loss_curves(run: Run) -> tuple[list[int], list[float]]:
    """(steps, total training loss) of a run, from its log.jsonl ([] before it logged); a
    `--stage all` run's is step 1's (task1/log.jsonl), the step the grid's losses act on."""
    from .plot import read_log
    for directory in (run.directory, os.path.join(run.directory, "task1")):
        if os.path.isfile(os.path.join(directory, "log.jsonl")):
            return read_log(directory)["train"].get("total", ([], []))
    return [], []


@functools.cache
def _warn_no_matplotlib() -> None:
    """Once per process: the plots are redrawn after every finished run."""
    log.warning("study: matplotlib is not installed, so no plots (pip install matplotlib)")


def plot(output_dir: str, runs: list[Run], rows: list[dict]) -> list[str]:
    """score.png (dev score per cell, mean with the seeds' sd as error bars) and loss.png (each
    cell's training loss against steps, its first seed); [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _warn_no_matplotlib()
        return []
    names = list(dict.fromkeys(r["cell"] for r in rows))
    written = []
    if names:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names)), 4))
        means, sds = [], []
        for name in names:
            values = [r["dev_score"] for r in rows if r["cell"] == name and "dev_score" in r]
            means.append(statistics.fmean(values) if values else float("nan"))
            sds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        ax.errorbar(range(len(names)), means, yerr=sds, fmt="o", capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("dev score")
        fig.tight_layout()
        written.append(os.path.join(output_dir, "score.png"))
        fig.savefig(written[-1] + ".tmp.png")
        os.replace(written[-1] + ".tmp.png", written[-1])
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    seen = set()
    for run in runs:
        name = cell_id(run.cell)
        if name in seen:
            continue
        steps, losses = _loss_curves(run)
        if steps:
            seen.add(name)
            ax.plot(steps, losses, label=name)
    if seen:
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (total)")
        ax.legend(fontsize=6)
        fig.tight_layout()
        written.append(os.path.join(output_dir, "loss.png"))
        fig.savefig(written[-1] + ".tmp.png")
        os.replace(written[-1] + ".tmp.png", written[-1])
    plt.close(fig)
    return written


def _run_predictions(run: Run) -> tuple[str, dict] | None:
    """(task, {split: (predictions, labels)}) of a finished run's last evaluation
    (PREDICTIONS_FILE; a `--stage all` run's is step 2's), None where it left none."""
    summary = _read_record(os.path.join(run.directory, "summary.json"))
    folder = run.directory
    if summary.get("stage") == "all":
        summary, folder = summary.get("task2") or {}, os.path.join(run.directory, "task2")
    path = os.path.join(folder, PREDICTIONS_FILE)
    if not os.path.isfile(path) or not summary.get("task"):
        return None
    record = _read_record(path)
    splits = {}
    for split, saved in record.items():
        if not (isinstance(saved, dict) and isinstance(saved.get("predictions"), list)
                and isinstance(saved.get("labels"), list)
                and len(saved["predictions"]) == len(saved["labels"])):
            raise InputError(f"split {split!r} is not {{predictions: [...], labels: [...]}} of "
                             f"equal lengths", path=path, expected="the file a run writes")
        splits[split] = (saved["predictions"], saved["labels"])
    return summary["task"], splits


def paired(runs: list[Run]) -> list[dict]:
    """Every cell against the baseline, the first cell (every grid key at its first value), on
    the same dev examples (study_stats.paired_with_baseline), from the finished runs'
    predictions."""
    from .study_stats import paired_with_baseline
    by_cell: dict[str, dict[int, dict]] = {}
    task = None
    for run in runs:
        got = _run_predictions(run) if run.finished else None
        if got is not None:
            task, splits = got
            by_cell.setdefault(cell_id(run.cell), {})[run.seed] = splits
    if not runs or task is None:
        return []
    baseline = runs[0].cell
    rows = paired_with_baseline(task, by_cell, cell_id(baseline))
    changes = {cell_id(r.cell): ", ".join(f"{k}={v}" for k, v in sorted(r.cell.items())
                                          if baseline.get(k) != v) for r in runs}
    return [{**row, "change": changes[row["cell"]]} for row in rows]


def report(output_dir: str, grid: dict[str, list[str]], runs: list[Run]) -> dict:
    """Write results.csv, results.md (with the paired comparisons), paired.json and the plots
    from the finished runs; returns their paths and the row counts."""
    keys = sorted(grid)
    rows = collect(runs)
    all_cells = list(dict.fromkeys(cell_id(r.cell) for r in runs))
    from .study_stats import paired_markdown
    comparisons = paired(runs)
    atomic_write(os.path.join(output_dir, "results.csv"), _csv(rows, keys))
    atomic_write(os.path.join(output_dir, "results.md"),
                 _markdown(rows, keys, all_cells) + paired_markdown(comparisons))
    atomic_write(os.path.join(output_dir, "paired.json"), json.dumps(comparisons, indent=1))
    plots = plot(output_dir, runs, rows)
    return {"runs": len(rows), "cells": len({r["cell"] for r in rows}), "plots": plots,
            "csv": os.path.join(output_dir, "results.csv"),
            "md": os.path.join(output_dir, "results.md"), "paired": len(comparisons)}


def run_study(output_dir: str, grid: dict[str, list[str]], seeds: list[int],
              base_argv: list[str], *, parse_argv: Callable[[list[str]], DistillConfig],
              parallel: int = 1, teacher_cache: bool = True, design: str = "product") -> dict:
    """Plan (and check) every run, run the unfinished ones, write the tables and plots
    (parse_argv: see plan; design: study_grid.cells)."""
    runs = plan(output_dir, grid, seeds, base_argv, parse_argv=parse_argv,
                teacher_cache=teacher_cache, design=design)
    os.makedirs(output_dir, exist_ok=True)
    log.info("study: %d cells x %d seeds = %d runs in %s", len(cells(grid, design)),
             len(seeds), len(runs), output_dir)
    # the tables are rewritten as each run finishes, so a study stopped half-way has them so far
    failed = execute(runs, parallel, on_finished=lambda: report(output_dir, grid, runs))
    result = report(output_dir, grid, runs)
    result["failed"] = failed
    return result
