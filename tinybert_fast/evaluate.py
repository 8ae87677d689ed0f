"""GLUE dev metrics of a sequence-classification checkpoint (the `tinybert-fast eval` subcommand
is tinybert_fast.commands.eval).  Loads the model with the loop's model loading
(tinybert_fast.distill.models), not the loop."""

from __future__ import annotations

import json
import logging
import os

from . import data, train
from ._device import resolve_device
from .distill.config import TRAINING_FILE
from .distill.models import LOAD_DTYPE, pretrained

log = logging.getLogger(__name__)


def evaluate_checkpoint(model_dir: str, task_name: str, data_dir: str | None = None,
                        splits: list[str] | None = None, max_length: int = 128,
                        batch_size: int = 128, device: str = "auto",
                        limit: int | None = None) -> dict:
    """{split: metrics} for a saved model (each split evaluated with its own data: MNLI's
    matched and mismatched dev sets never share a loader)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    task = data.get_task(task_name)
    dev = resolve_device(device)
    tokenizer = pretrained("model", AutoTokenizer.from_pretrained, model_dir)
    model = pretrained("model", AutoModelForSequenceClassification.from_pretrained,
                       model_dir, dtype=LOAD_DTYPE).to(dev).eval()
    trained = os.path.join(model_dir, TRAINING_FILE)
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
