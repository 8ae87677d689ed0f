"""GLUE tasks: reading (local GLUE TSV directories or `datasets` by task name), tokenising,
batching, sampling and metrics.

Labels follow the `datasets` GLUE label order for every source, so a model trained on TSV files
and one trained on `datasets` agree.  MNLI in particular is (entailment, neutral, contradiction)
= (0, 1, 2); TinyBERT's reference scripts used (contradiction, entailment, neutral), which made
checkpoints and the `datasets` data disagree.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch

csv.field_size_limit(sys.maxsize)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str                      # "sst2"
    glue_dir: str                  # "SST-2": the folder name in the GLUE download
    text_columns: tuple[str, ...]  # canonical names: ("sentence",) or ("sentence1", "sentence2")
    labels: tuple[str, ...] | None  # label names in `datasets` order; None for regression
    metric: str                    # "accuracy" | "mcc" | "accuracy_f1" | "pearson_spearman"
    dev_splits: tuple[str, ...] = ("dev",)

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


TASKS = {
    "sst2": Task("sst2", "SST-2", ("sentence",), ("0", "1"), "accuracy"),
    "cola": Task("cola", "CoLA", ("sentence",), ("0", "1"), "mcc"),
    "mrpc": Task("mrpc", "MRPC", ("sentence1", "sentence2"), ("0", "1"), "accuracy_f1"),
    "rte": Task("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"),
                "accuracy"),
    "stsb": Task("stsb", "STS-B", ("sentence1", "sentence2"), None, "pearson_spearman"),
    "qnli": Task("qnli", "QNLI", ("sentence1", "sentence2"), ("entailment", "not_entailment"),
                 "accuracy"),
    "qqp": Task("qqp", "QQP", ("sentence1", "sentence2"), ("0", "1"), "accuracy_f1"),
    "mnli": Task("mnli", "MNLI", ("sentence1", "sentence2"),
                 ("entailment", "neutral", "contradiction"), "accuracy",
                 dev_splits=("dev_matched", "dev_mismatched")),
}

# GLUE TSV layouts: (text columns, label column) by header name; CoLA has no header.
_TSV_COLUMNS = {
    "sst2": (("sentence",), "label"),
    "mrpc": (("#1 String", "#2 String"), "Quality"),
    "rte": (("sentence1", "sentence2"), "label"),
    "stsb": (("sentence1", "sentence2"), "score"),
    "qnli": (("question", "sentence"), "label"),
    "qqp": (("question1", "question2"), "is_duplicate"),
    "mnli": (("sentence1", "sentence2"), "gold_label"),
}
_COLA_COLUMNS = ("source", "label", "original_mark", "sentence")
# The `datasets` GLUE repository: the hub no longer resolves the namespace-free "glue".  A mirror,
# or a local folder in its layout (README.md configs, <task>/<split>-*.parquet), can be named with
# the environment variable TINYBERT_FAST_GLUE_DATASET.
GLUE_DATASET = "nyu-mll/glue"
# `datasets` GLUE column names
_HF_COLUMNS = {"sst2": ("sentence",), "cola": ("sentence",), "mrpc": ("sentence1", "sentence2"),
               "rte": ("sentence1", "sentence2"), "stsb": ("sentence1", "sentence2"),
               "qnli": ("question", "sentence"), "qqp": ("question1", "question2"),
               "mnli": ("premise", "hypothesis")}


def get_task(name: str) -> Task:
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[key]


@dataclasses.dataclass
class Example:
    texts: tuple[str, ...]
    label: float | int | None   # class index, regression score, or None (unlabeled / test)


@dataclasses.dataclass
class TsvTable:
    """A GLUE TSV file: its header (None for CoLA) and rows, kept to write augmented copies."""
    header: list[str] | None
    rows: list[list[str]]
    text_idx: tuple[int, ...]
    label_idx: int | None
    bom: bool = False


def read_tsv(path: str, task: Task) -> TsvTable:
    """Read a GLUE TSV file in its original layout; errors name the file and what is wrong."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected a GLUE {task.glue_dir} TSV file)")
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    bom = text.startswith("\ufeff")
    lines = list(csv.reader(text.lstrip("\ufeff").splitlines(), delimiter="\t",
                            quoting=csv.QUOTE_NONE))
    lines = [row for row in lines if row]
    if not lines:
        raise ValueError(f"{path}: the file is empty")
    if task.name == "cola" and lines[0][:2] != ["index", "sentence"]:
        width = len(_COLA_COLUMNS)
        bad = [i + 1 for i, row in enumerate(lines) if len(row) != width]
        if bad:
            raise ValueError(f"{path}: CoLA rows have {width} tab-separated columns "
                             f"{_COLA_COLUMNS}; lines {bad[:5]} do not")
        return TsvTable(None, lines, (3,), 1, bom)
    header, rows = lines[0], lines[1:]
    if task.name == "cola":  # CoLA's test file: index, sentence
        return TsvTable(header, rows, (1,), None, bom)
    text_cols, label_col = _TSV_COLUMNS[task.name]
    missing = [c for c in text_cols if c not in header]
    if missing:
        raise ValueError(f"{path}: header {header} lacks the {task.name} column(s) {missing}")
    label_idx = header.index(label_col) if label_col in header else None
    short = [i + 2 for i, row in enumerate(rows) if len(row) < len(header)]
    if short:
        raise ValueError(f"{path}: lines {short[:5]} have fewer columns than the header "
                         f"({len(header)})")
    return TsvTable(header, rows, tuple(header.index(c) for c in text_cols), label_idx, bom)


def write_tsv(path: str, table: TsvTable) -> None:
    """Write a table in its GLUE layout, atomically (temp file + rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        if table.bom:
            f.write("\ufeff")
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None,
                            lineterminator="\n")
        if table.header is not None:
            writer.writerow(table.header)
        writer.writerows(table.rows)
    os.replace(tmp, path)


def _parse_label(value: str, task: Task, where: str):
    if task.is_regression:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: label {value!r} is not a number") from None
    if value not in task.labels:
        raise ValueError(f"{where}: label {value!r} is not one of {task.labels}")
    return task.labels.index(value)


def table_examples(table: TsvTable, task: Task, path: str) -> list[Example]:
    out = []
    for i, row in enumerate(table.rows):
        label = None
        if table.label_idx is not None:
            label = _parse_label(row[table.label_idx], task, f"{path} row {i + 1}")
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
        path = os.path.join(data_dir, f"{split}.tsv")
    else:
        return _load_hf(task, split)
    examples = table_examples(read_tsv(path, task), task, path)
    if not examples:
        raise ValueError(f"{path}: no examples")
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
    """Unlabeled text for general distillation: one passage per non-empty line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such corpus file (one passage per line)")
    with open(path, encoding="utf-8") as f:
        examples = [Example((line.strip(),), None) for line in f if line.strip()]
    if not examples:
        raise ValueError(f"{path}: the corpus file has no text")
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


def batch_indices(n: int, batch_size: int, epoch: int, seed: int, *, shuffle: bool = True,
                  rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batches for an epoch.  Each global batch of batch_size examples is split into
    world_size contiguous slices, so world_size ranks together see exactly what one process
    would (batch_size must be divisible by world_size).  A last global batch with fewer
    examples than ranks is dropped (with one process nothing is dropped)."""
    if batch_size % world_size:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of "
                         f"processes ({world_size})")
    order = epoch_order(n, epoch, seed, shuffle)
    batches = []
    for start in range(0, n, batch_size):
        global_batch = order[start:start + batch_size]
        if len(global_batch) < world_size:
            break
        k = math.ceil(len(global_batch) / world_size)
        batches.append(global_batch[rank * k:(rank + 1) * k])
    return batches


# --- metrics ----------------------------------------------------------------------------------------

def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman's correlation)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den else 0.0


def compute_metrics(task: Task, predictions, labels) -> dict[str, float]:
    """GLUE metrics: accuracy; F1 of class 1 (MRPC, QQP); Matthews correlation (CoLA);
    Pearson/Spearman (STS-B).  predictions: class indices or regression scores."""
    p, y = np.asarray(predictions), np.asarray(labels)
    if len(p) != len(y) or len(y) == 0:
        raise ValueError(f"predictions ({len(p)}) and labels ({len(y)}) must be non-empty and "
                         f"of equal length")
    if task.metric == "pearson_spearman":
        p, y = p.astype(np.float64), y.astype(np.float64)
        pr, sr = _pearson(p, y), _pearson(_ranks(p), _ranks(y))
        return {"pearson": pr, "spearman": sr, "score": (pr + sr) / 2}
    out = {"accuracy": float((p == y).mean())}
    if task.metric == "accuracy_f1":
        tp = float(((p == 1) & (y == 1)).sum())
        fp, fn = float(((p == 1) & (y != 1)).sum()), float(((p != 1) & (y == 1)).sum())
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        out["score"] = (out["accuracy"] + out["f1"]) / 2
    elif task.metric == "mcc":
        tp = float(((p == 1) & (y == 1)).sum())
        tn = float(((p == 0) & (y == 0)).sum())
        fp, fn = float(((p == 1) & (y == 0)).sum()), float(((p == 0) & (y == 1)).sum())
        den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        out["mcc"] = (tp * tn - fp * fn) / den if den else 0.0
        out["score"] = out["mcc"]
    else:
        out["score"] = out["accuracy"]
    return out


def iterate_batches(dataset: TokenizedDataset, batches: list[list[int]], pad_id: int,
                    pad_to: int | None, regression: bool) -> Iterator[dict]:
    for idx in batches:
        yield collate([dataset[i] for i in idx], pad_id, pad_to, regression)
