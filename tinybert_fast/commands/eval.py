"""`tinybert-fast eval`: GLUE dev metrics of a sequence-classification checkpoint
(tinybert_fast.evaluate)."""

from __future__ import annotations

import argparse
import json
import logging
import os

from ._args import (add_data_arguments, add_device_argument, check_input_path,
                    check_model, check_output_file)

log = logging.getLogger("tinybert_fast.evaluate")

HELP = "evaluate a checkpoint on a GLUE task's dev split(s)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory")
    add_data_arguments(p, task_required=True, train_file=False, padding=False, limits=(),
                       max_length=128)
    p.add_argument("--split", action="append", help="default: the task's dev split(s)")
    p.add_argument("--batch-size", type=int, default=128)
    add_device_argument(p)
    p.add_argument("--limit", type=int)
    p.add_argument("--output", help="also write the metrics as JSON here")


def run(args: argparse.Namespace) -> int:
    check_model(args.model, "--model")
    check_input_path(args.data_dir, "--data-dir", "folder")
    if args.output:
        check_output_file(args.output, "--output")
    from .. import train
    from ..evaluate import evaluate_checkpoint
    results = evaluate_checkpoint(args.model, args.task, args.data_dir, args.split,
                                  args.max_length, args.batch_size, args.device, args.limit)
    print(json.dumps(results, indent=1))
    if args.output:
        train.write_json_atomic(args.output, results)
    log.info("%s on %s: %s", os.path.basename(os.path.normpath(args.model)), args.task, results)
    return 0
