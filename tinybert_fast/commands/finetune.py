"""`tinybert-fast finetune-teacher`: supervised fine-tuning on a GLUE task.

A task teacher is a prerequisite of task distillation; the same command trains a hard-label
baseline student (`--model tinybert4 --tokenizer PATH` gives a randomly initialised one).
"""

from __future__ import annotations

import argparse
import json
import logging

from ..distill import config
from ._args import add_training_arguments, check_training_paths, config_from_args

log = logging.getLogger("tinybert_fast.finetune")

HELP = "fine-tune a model (a task teacher, or a hard-label baseline) on a GLUE task"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help=f"checkpoint dir or hub name, a config.json, or a preset "
                        f"{sorted(config.PRESETS)} (random weights; needs --tokenizer)")
    p.add_argument("--tokenizer", help="default: the model's")
    add_training_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Raises ValueError (the CLI's one-line error, exit status 2) for a missing --task."""
    if args.task is None:
        raise ValueError("--task is required")
    check_training_paths(args)
    from ..distill import distill
    summary = distill(config_from_args(args, stage="finetune", student=args.model,
                                       teacher=None))
    log.info("summary: %s", json.dumps(summary))
    return 0
