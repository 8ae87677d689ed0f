"""`tinybert-fast plot`: training loss terms, learning rate and dev metric of runs against steps,
several runs on one figure (tinybert_fast.plot)."""

from __future__ import annotations

import argparse
import logging

from ._args import check_input_path, check_output_file

log = logging.getLogger("tinybert_fast.plot")

HELP = "plot the training curves of runs (log.jsonl) into one PNG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="--output-dir of distill / finetune-teacher runs")
    p.add_argument("--output", required=True, help="the PNG to write")
    p.add_argument("--labels", default=None,
                   help="comma-separated legend names, one per run (default: folder names)")


def run(args: argparse.Namespace) -> int:
    for run_dir in args.run_dirs:
        check_input_path(run_dir, "RUN_DIR", "folder")
    check_output_file(args.output, "--output")
    from ..plot import plot_runs
    labels = args.labels.split(",") if args.labels else None
    counts = plot_runs(args.run_dirs, args.output, labels)
    log.info("plot: wrote %s (%d loss curves, %d lr, %d dev)", args.output, counts["loss"],
             counts["lr"], counts["dev"])
    return 0
