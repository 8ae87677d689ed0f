"""GLUE data for training and evaluation: examples (local GLUE TSV folders, or `datasets` by
task name), tokenising, batching, sampling and metrics.

The tasks and their TSV files (reading, writing, task names) live in `tinybert_fast.glue`; the
names are re-exported here.  Labels follow the `datasets` GLUE label order for every source (see
tinybert_fast.glue).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .errors import InputError
from .glue import (TASKS, Task, TsvTable, decode_line, get_task, read_tsv, task_key,
                   warn_tolerated, write_tsv)

__all__ = ["TASKS", "Task", "TsvTable", "get_task", "read_tsv", "task_key", "write_tsv",
           "GLUE_DATASET", "Example", "table_examples", "load_examples", "read_corpus",
           "TokenizedDataset", "collate", "epoch_order", "batch_indices", "compute_metrics",
           "iterate_batches"]

# The `datasets` GLUE repository: the hub no longer resolves the namespace-free "glue".  A mirror,
# or a local folder in its layout (README.md configs, <task>/<split>-*.parquet), can be named with
# the environment variable TINYBERT_FAST_GLUE_DATASET.
GLUE_DATASET = "nyu-mll/glue"
# `datasets` GLUE column names
_HF_COLUMNS = {"sst2": ("sentence",), "cola": ("sentence",), "mrpc": ("sentence1", "sentence2"),
               "rte": ("sentence1", "sentence2"), "stsb": ("sentence1", "sentence2"),
               "qnli": ("question", "sentence"), "qqp": ("question1", "question2"),
               "mnli": ("premise", "hypothesis")}


@dataclasses.dataclass
class Example:
    texts: tuple[str, ...]
    label: float | int | None   # class index, regression score, or None (unlabeled / test)


def _parse_label(value: str, task: Task, path: str, line: int | None):
    at = dict(path=path, line=line, found=repr(value))
    if task.is_regression:
        try:
            number = float(value)
        except ValueError:
            raise InputError("the label is not a number", **at,
                             expected=f"a {task.name} score") from None
        if not math.isfinite(number):
            raise InputError("the label is not a finite number", **at,
                             expected=f"a {task.name} score")
        return number
    if value not in task.labels:
        raise InputError(f"the label is not one of task {task.name}'s labels", **at,
                         expected=f"one of {task.labels}")
    return task.labels.index(value)


def table_examples(table: TsvTable, task: Task, path: str) -> list[Example]:
    """The examples of a table read from `path`: its text columns and its label (a class index,
    a score, or None without a label column).  InputError at `path:line` for a label outside
    the task's set (or not a number, for a regression task)."""
    out = []
    for i, row in enumerate(table.rows):
        label = None
        if table.label_idx is not None:
            label = _parse_label(row[table.label_idx], task, path, table.line_of(i))
        out.append(Example(tuple(row[j] for j in table.text_idx), label))
    return out


def load_examples(task: Task, split: str, data_dir: str | None = None,
                  train_file: str | None = None) -> list[Example]:
    """Examples of a split ("train", "dev", "dev_matched", ...).

    data_dir: a GLUE TSV folder (../shared/data/glue/SST-2); without it the split comes from
    `datasets.load_dataset(GLUE_DATASET, task)` ("nyu-mll/glue"; needs the hub or its cache).
    train_file overrides the train split's file (an augmented TSV in the same layout).
    """
    if split == "train" and train_file:
        path = train_file
    elif data_dir:
        if not os.path.isdir(data_dir):
            raise InputError("no such file or folder" if not os.path.exists(data_dir)
                             else "not a folder",
                             argument="data_dir (--data-dir)", path=data_dir,
                             expected=f"a GLUE {task.glue_dir} TSV folder ({split}.tsv, ...)")
        path = os.path.join(data_dir, f"{split}.tsv")
    else:
        return _load_hf(task, split)
    examples = table_examples(read_tsv(path, task), task, path)
    if not examples:
        raise InputError("no examples: the file has a header and no rows", path=path)
    return examples


def _load_hf(task: Task, split: str) -> list[Example]:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("loading GLUE by task name needs `datasets` (pip install datasets), "
                          "or pass a local GLUE TSV folder as data_dir (--data-dir)") from exc
    hf_split = {"dev": "validation", "dev_matched": "validation_matched",
                "dev_mismatched": "validation_mismatched"}.get(split, split)
    source = os.environ.get("TINYBERT_FAST_GLUE_DATASET", GLUE_DATASET)
    try:
        ds = datasets.load_dataset(source, task.name, split=hf_split)
    except Exception as exc:
        raise ValueError(f"task {task.name!r}: could not load {source} {task.name}/{hf_split} "
                         f"with datasets ({type(exc).__name__}: {exc}); pass a local GLUE TSV "
                         f"folder as data_dir (--data-dir) instead") from exc
    cols = _HF_COLUMNS[task.name]
    return [Example(tuple(r[c] for c in cols),
                    (float(r["label"]) if task.is_regression else int(r["label"]))
                    if r["label"] is not None and r["label"] >= 0 else None) for r in ds]


def read_corpus(path: str) -> list[Example]:
    """Unlabeled text for general distillation: one passage per non-empty line, each line checked
    as a TSV line is (glue.decode_line: InputError at `path:line:column` for a byte that is not
    UTF-8, a NUL or a lone carriage return; other control characters kept with a warning)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {'a folder' if os.path.isdir(path) else 'no such file'}"
                                f" (expected the corpus file, one passage per line)")
    tolerated: list[tuple[int, int, str]] = []
    with open(path, "rb") as f:
        lines = [decode_line(raw, path, n, tolerated).strip() for n, raw in enumerate(f, 1)]
    warn_tolerated(path, tolerated)
    examples = [Example((line,), None) for line in lines if line]
    if not examples:
        raise InputError("the corpus file has no text", path=path,
                         expected="one passage per line")
    return examples


# --- tokenising and batching -----------------------------------------------------------------------

class TokenizedDataset(torch.utils.data.Dataset):
    """Examples tokenised once up front (unpadded); item i carries example_id i."""

    def __init__(self, examples: Sequence[Example], tokenizer, max_length: int):
        enc = tokenizer(*zip(*[e.texts for e in examples]), truncation=True,
                        max_length=max_length)
        self.input_ids = enc["input_ids"]
        self.token_type_ids = enc.get("token_type_ids")
        self.labels = [e.label for e in examples]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.input_ids[i], "example_id": i, "label": self.labels[i]}
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[i]
        return item


def collate(items: list[dict], pad_id: int, pad_to: int | None = None,
            regression: bool = False) -> dict:
    """Pad a list of tokenised items to the longest (or to pad_to) into a batch dict of tensors:
    input_ids, attention_mask, token_type_ids [B, L]; example_id [B]; labels [B] when labeled."""
    L = max(len(it["input_ids"]) for it in items)
    if pad_to is not None:
        L = max(L, pad_to)
    B = len(items)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    types = torch.zeros((B, L), dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        ids[b, :n] = torch.tensor(it["input_ids"])
        mask[b, :n] = 1
        if "token_type_ids" in it:
            types[b, :n] = torch.tensor(it["token_type_ids"])
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
             "example_id": torch.tensor([it["example_id"] for it in items])}
    if all(it["label"] is not None for it in items):
        batch["labels"] = torch.tensor([it["label"] for it in items],
                                       dtype=torch.float32 if regression else torch.long)
    return batch


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool = True) -> list[int]:
    """The example order of an epoch: a permutation fixed by (seed, epoch), so a resumed run
    replays exactly the same batches."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


# group_by_length: examples are sorted by length within windows of this many batches
LENGTH_GROUP_BATCHES = 50


def _length_grouped(order: list[int], lengths: Sequence[int], batch_size: int, epoch: int,
                    seed: int) -> list[list[int]]:
    """The epoch's global batches of similar lengths: `order` (a permutation) is cut into
    windows of LENGTH_GROUP_BATCHES batches, each window sorted by length (longest first) and
    cut into batches, and the batches are shuffled; fixed by (seed, epoch) like epoch_order."""
    window = batch_size * LENGTH_GROUP_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def batch_indices(n: int, batch_size: int, epoch: int, seed: int, *, shuffle: bool = True,
                  rank: int = 0, world_size: int = 1,
                  lengths: Sequence[int] | None = None) -> list[list[int]]:
    """This rank's batches for an epoch.  Each global batch of batch_size examples is split into
    world_size contiguous slices, so world_size ranks together see exactly what one process
    would (batch_size must be divisible by world_size).  A last global batch with fewer
    examples than ranks is dropped (with one process nothing is dropped).

    lengths (the n examples' token counts; with shuffle): batches of similar lengths
    (_length_grouped), so that padding to the longest of a batch pads little.  The number of
    batches is the same as without it."""
    if batch_size % world_size:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of "
                         f"processes ({world_size})")
    order = epoch_order(n, epoch, seed, shuffle)
    if lengths is not None and shuffle:
        if len(lengths) != n:
            raise ValueError(f"lengths: expected {n} entries (one per example); got "
                             f"{len(lengths)}")
        global_batches = _length_grouped(order, lengths, batch_size, epoch, seed)
    else:
        global_batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    batches = []
    for global_batch in global_batches:
        if len(global_batch) < world_size:
            continue
        k = math.ceil(len(global_batch) / world_size)
        batches.append(global_batch[rank * k:(rank + 1) * k])
    return batches


# --- metrics ----------------------------------------------------------------------------------------

def compute_metrics(task: Task, predictions, labels) -> dict[str, float]:
    """GLUE metrics, from scikit-learn and SciPy: accuracy; F1 of class 1 (MRPC, QQP); Matthews
    correlation (CoLA); Pearson and Spearman correlation (STS-B); "score" is the task's one
    number (the mean of a pair).  predictions: class indices or regression scores.

    Degenerate inputs give 0, not NaN: F1 with no true positive, and a correlation of a constant
    prediction (a student that learned one value), where SciPy would warn and return NaN.
    """
    p, y = np.asarray(predictions), np.asarray(labels)
    if len(p) != len(y) or len(y) == 0:
        raise ValueError(f"predictions ({len(p)}) and labels ({len(y)}) must be non-empty and "
                         f"of equal length")
    if task.metric == "pearson_spearman":
        from scipy import stats
        p, y = p.astype(np.float64), y.astype(np.float64)
        if np.ptp(p) == 0 or np.ptp(y) == 0:  # constant: correlation undefined
            pr = sr = 0.0
        else:
            pr = float(stats.pearsonr(p, y)[0])
            sr = float(stats.spearmanr(p, y)[0])
        return {"pearson": pr, "spearman": sr, "score": (pr + sr) / 2}
    from sklearn import metrics
    out = {"accuracy": float(metrics.accuracy_score(y, p))}
    if task.metric == "accuracy_f1":
        out["f1"] = float(metrics.f1_score(y, p, pos_label=1, average="binary",
                                           zero_division=0))
        out["score"] = (out["accuracy"] + out["f1"]) / 2
    elif task.metric == "mcc":
        out["mcc"] = float(metrics.matthews_corrcoef(y, p))
        out["score"] = out["mcc"]
    else:
        out["score"] = out["accuracy"]
    return out


def iterate_batches(dataset: TokenizedDataset, batches: list[list[int]], pad_id: int,
                    pad_to: int | None, regression: bool) -> Iterator[dict]:
    for idx in batches:
        yield collate([dataset[i] for i in idx], pad_id, pad_to, regression)
