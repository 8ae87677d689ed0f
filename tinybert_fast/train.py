"""Training-loop plumbing shared by distillation and fine-tuning: devices, DDP, optimizer and
schedule, atomic checkpoints with exact resume, logging and evaluation.  (`resolve_device` is
re-exported from tinybert_fast._device, the one device resolution.)"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

from . import data
from ._device import resolve_device  # noqa: F401  (re-exported: train.resolve_device)
from ._io import atomic_open, fsync_dir, umask

log = logging.getLogger(__name__)


# --- devices and processes ---------------------------------------------------------------------

class Distributed:
    """torchrun/DDP state: rank and world size from the environment (1 process without it)."""

    def __init__(self, device: torch.device):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Average a tensor over ranks (for logging)."""
        if self.enabled:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world_size
        return values


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- optimizer and schedule --------------------------------------------------------------------

def make_optimizer(params_by_name, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and LayerNorm weights (BERT's convention)."""
    decay, no_decay = [], []
    for name, p in params_by_name:
        if p.requires_grad:
            (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def make_schedule(optimizer, schedule: str, total_steps: int, warmup_ratio: float):
    """"linear": linear warmup over warmup_ratio of the steps, then linear decay to 0;
    "constant": linear warmup, then constant."""
    warmup = int(round(warmup_ratio * total_steps))
    if schedule == "linear":
        def factor(step):
            if step < warmup:
                return (step + 1) / max(1, warmup)
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    elif schedule == "constant":
        def factor(step):
            return (step + 1) / max(1, warmup) if step < warmup else 1.0
    else:
        raise ValueError(f"schedule must be 'linear' or 'constant'; got {schedule!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- checkpoints ------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: str) -> None:
    """fsync every file and folder under path (the folders: so their entries are durable)."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def _usual_modes(path: str) -> None:
    """Give every file and folder under path the mode a plain open/mkdir would (0666 / 0777 less
    the umask): some writers (transformers' safetensors save) create private 0600 temp files and
    rename them, so a saved model would otherwise be unreadable to the rest of a team."""
    mask = umask()
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def atomic_save_dir(final: str, write) -> None:
    """Write a directory atomically, with the policy of tinybert_fast._io for files: `write(tmp)`
    fills a temporary sibling folder, whose files get the usual modes and are fsynced with their
    folders; it then replaces `final` and the parent folder is fsynced.  A crash leaves either
    the old directory (possibly renamed to final.old, which `latest_dir` falls back to) or the
    new one, never a half-written `final`."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{final}.tmp-{os.getpid()}"
    old = f"{final}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        _usual_modes(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


def latest_dir(final: str) -> str | None:
    """`final` if it exists, else the `final.old` left by a crash between two renames."""
    for path in (final, f"{final}.old"):
        if os.path.isfile(os.path.join(path, "trainer_state.pt")):
            return path
    return None


# --- logging ----------------------------------------------------------------------------------

class JsonlLog:
    """Append-only JSONL metrics log (rank 0 only); each line is flushed as written."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, **record) -> None:
        if self.path:
            record.setdefault("time", time.time())
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def write_json_atomic(path: str, obj) -> None:
    """obj as indented JSON at path, written atomically and durably (tinybert_fast._io)."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1)


# --- evaluation -------------------------------------------------------------------------------

def autocast(device: torch.device, bf16: bool):
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_inputs(model, batch: dict) -> tuple[str, ...]:
    """The names of a batch's tensors that `model` takes: input_ids and attention_mask, and
    token_type_ids for families with token types (BERT, RoBERTa, ELECTRA: the config's
    type_vocab_size); MPNet and DistilBERT have none (their forward would swallow them)."""
    config = getattr(model, "config", None) or model.module.config
    names = ("input_ids", "attention_mask")
    if getattr(config, "type_vocab_size", 0) and "token_type_ids" in batch:
        names += ("token_type_ids",)
    return names


@torch.inference_mode()
def predict(model, dataset: data.TokenizedDataset, task: data.Task, batch_size: int,
            device: torch.device, pad_id: int, bf16: bool = False) -> np.ndarray:
    """Class indices (or regression scores) for every example of a dataset, in order.  The
    batches hold examples of similar lengths (sorted by length), so little is padded; each
    prediction goes back to its example's place."""
    was_training = model.training
    model.eval()
    by_length = sorted(range(len(dataset)), key=lambda i: len(dataset.input_ids[i]))
    batches = [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    preds, order = [], []
    for batch in data.iterate_batches(dataset, batches, pad_id, None, task.is_regression):
        inputs = {k: batch[k].to(device) for k in model_inputs(model, batch)}
        with autocast(device, bf16):
            logits = model(**inputs).logits.float()
        preds.append(logits[:, 0] if task.is_regression else logits.argmax(-1))
        order.append(batch["example_id"])
    model.train(was_training)
    out = torch.empty(len(dataset), dtype=preds[0].dtype) if preds else torch.empty(0)
    if preds:
        out[torch.cat(order)] = torch.cat(preds).cpu()
    return out.numpy()


def evaluate(model, dataset: data.TokenizedDataset, task: data.Task, batch_size: int,
             device: torch.device, pad_id: int, bf16: bool = False) -> dict[str, float]:
    """GLUE metrics of a model on a labeled dataset."""
    return evaluate_with_predictions(model, dataset, task, batch_size, device, pad_id, bf16)[0]


def evaluate_with_predictions(model, dataset: data.TokenizedDataset, task: data.Task,
                              batch_size: int, device: torch.device, pad_id: int,
                              bf16: bool = False) -> tuple[dict[str, float], np.ndarray]:
    """(GLUE metrics, the predictions they come from: predict's [n]) on a labeled dataset."""
    if any(label is None for label in dataset.labels):
        raise ValueError("evaluation needs labels: this split has none (a GLUE test split?)")
    preds = predict(model, dataset, task, batch_size, device, pad_id, bf16)
    return data.compute_metrics(task, preds, dataset.labels), preds
