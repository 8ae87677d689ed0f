"""`tinybert-fast finetune-teacher`: supervised fine-tuning on a GLUE task.

A task teacher is a prerequisite of task distillation; the same command trains a hard-label
baseline student (`--model tinybert4 --tokenizer PATH` gives a randomly initialised one).
"""

from __future__ import annotations

import argparse
import json
import logging

from . import distill

log = logging.getLogger(__name__)

HELP = "fine-tune a model (a task teacher, or a hard-label baseline) on a GLUE task"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help=f"checkpoint dir or hub name, a config.json, or a preset "
                        f"{sorted(distill.PRESETS)} (random weights; needs --tokenizer)")
    p.add_argument("--tokenizer", help="default: the model's")
    distill.add_common_arguments(p)


def run(args: argparse.Namespace) -> int:
    cfg = distill.config_from_args(args, stage="finetune", student=args.model, teacher=None)
    if cfg.task is None:
        raise ValueError("--task is required")
    summary = distill.distill(cfg)
    log.info("summary: %s", json.dumps(summary))
    return 0
