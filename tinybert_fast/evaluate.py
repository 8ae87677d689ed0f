"""`tinybert-fast eval`: GLUE dev metrics of a sequence-classification checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
import os

from . import data, distill, train

log = logging.getLogger(__name__)

HELP = "evaluate a checkpoint on a GLUE task's dev split(s)"


def evaluate_checkpoint(model_dir: str, task_name: str, data_dir: str | None = None,
                        splits: list[str] | None = None, max_length: int = 128,
                        batch_size: int = 128, device: str = "auto",
                        limit: int | None = None) -> dict:
    """{split: metrics} for a saved model (each split evaluated with its own data: MNLI's
    matched and mismatched dev sets never share a loader)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    task = data.get_task(task_name)
    dev = train.resolve_device(device)
    tokenizer = distill.pretrained("model", AutoTokenizer.from_pretrained, model_dir)
    model = distill.pretrained("model", AutoModelForSequenceClassification.from_pretrained,
                               model_dir, dtype=distill.LOAD_DTYPE).to(dev).eval()
    trained = os.path.join(model_dir, distill.TRAINING_FILE)
    if os.path.isfile(trained):
        with open(trained, encoding="utf-8") as f:
            record = json.load(f)
        if not record.get("head_trained", True):
            log.warning("%s was trained by stage %r, which does not train the prediction head: "
                        "its scores are those of an untrained head (evaluate the model of task "
                        "step 2 or of a fine-tune)", model_dir, record.get("stage"))
    if model.config.num_labels != task.num_labels:
        raise ValueError(f"{model_dir} predicts {model.config.num_labels} labels but {task.name} "
                         f"has {task.num_labels}")
    results = {}
    for split in splits or list(task.dev_splits):
        examples = data.load_examples(task, split, data_dir)
        ds = data.TokenizedDataset(examples[:limit] if limit else examples, tokenizer, max_length)
        results[split] = train.evaluate(model, ds, task, batch_size, dev, tokenizer.pad_token_id)
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--task", required=True, choices=sorted(data.TASKS))
    p.add_argument("--data-dir", help="local GLUE TSV folder (default: `datasets`)")
    p.add_argument("--split", action="append", help="default: the task's dev split(s)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int)
    p.add_argument("--output", help="also write the metrics as JSON here")


def run(args: argparse.Namespace) -> int:
    results = evaluate_checkpoint(args.model, args.task, args.data_dir, args.split,
                                  args.max_length, args.batch_size, args.device, args.limit)
    print(json.dumps(results, indent=1))
    if args.output:
        train.write_json_atomic(args.output, results)
    log.info("%s on %s: %s", os.path.basename(os.path.normpath(args.model)), args.task, results)
    return 0
