"""GLUE tasks and their TSV files: the one home of the task table, of task-name normalisation and
of GLUE TSV reading and writing (used by `tinybert_fast.data` for training and evaluation and by
`tinybert_fast.augment`, which streams a file and writes it back in the same layout).

Plain Python (no torch, no numpy), so that the command line can name the tasks cheaply.

A GLUE TSV file is lines separated by "\\n" (a trailing "\\r" is dropped), fields separated by
"\\t", no quoting; an optional UTF-8 byte-order mark (MRPC's files) is kept apart and written back.
Every file has a header line except CoLA's train and dev files (source, label, original_mark,
sentence).  Empty lines are skipped.

Labels follow the `datasets` GLUE label order for every source, so a model trained on TSV files
and one trained on `datasets` agree.  MNLI in particular is (entailment, neutral, contradiction)
= (0, 1, 2); TinyBERT's reference scripts used (contradiction, entailment, neutral), which made
checkpoints and the `datasets` data disagree.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Sequence

from ._io import atomic_open


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

# GLUE TSV layouts by task key: (text columns, label column) of the header.  Beside the tasks
# above, the layouts of files that augmentation reads but the loop does not train on (WNLI, and
# "mnlimm" for MNLI's mismatched files).  CoLA's train/dev files have no header (COLA_COLUMNS);
# its test file's header is (index, sentence).
TSV_COLUMNS = {
    "sst2": (("sentence",), "label"),
    "cola": (("sentence",), None),
    "mrpc": (("#1 String", "#2 String"), "Quality"),
    "rte": (("sentence1", "sentence2"), "label"),
    "stsb": (("sentence1", "sentence2"), "score"),
    "qnli": (("question", "sentence"), "label"),
    "qqp": (("question1", "question2"), "is_duplicate"),
    "mnli": (("sentence1", "sentence2"), "gold_label"),
    "mnlimm": (("sentence1", "sentence2"), "gold_label"),
    "wnli": (("sentence1", "sentence2"), "label"),
}
COLA_COLUMNS = ("source", "label", "original_mark", "sentence")
COLA_TEXT_COLUMN = 3
COLA_LABEL_COLUMN = 1

# Column names that hold text in the GLUE layouts (and a few common generic names): what a file
# of no named task is searched for.
TEXT_COLUMN_NAMES = ("sentence", "sentence1", "sentence2", "question", "question1", "question2",
                     "#1 String", "#2 String", "premise", "hypothesis", "text", "text_a", "text_b")


def task_key(name: str) -> str:
    """The one normalisation of a task name: lower case without '-', '_' and spaces
    ("SST-2" -> "sst2", "MNLI_mm" -> "mnlimm")."""
    return re.sub(r"[-_ ]", "", str(name).lower())


def get_task(name: str) -> Task:
    """The Task of a name in any spelling `task_key` accepts; ValueError for an unknown one."""
    key = task_key(name)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[key]


# --- layouts -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TsvLayout:
    """Where the text of a GLUE TSV file is.  `header` is the first line as read (BOM removed),
    None for headerless files (CoLA train/dev); column indices are 0-based; `label_column` is
    None where the layout has no label (a test file) or is not known (text_columns given)."""
    header: str | None
    bom: bool
    n_columns: int
    text_columns: tuple[int, ...]
    label_column: int | None = None

    @property
    def names(self) -> list[str]:
        return self.header.split("\t") if self.header is not None else []


def _layout_task(task: str | None) -> str | None:
    if task is None:
        return None
    key = task_key(task)
    if key not in TSV_COLUMNS:
        raise ValueError(f"task={task!r} is not a known task; choose from "
                         f"{sorted(TSV_COLUMNS)} or pass text_columns=")
    return key


def task_from_path(path: str) -> str | None:
    """The task key of a file's folder name (glue/SST-2/train.tsv -> "sst2"), if it names one."""
    key = task_key(os.path.basename(os.path.dirname(os.path.abspath(path))))
    return key if key in TSV_COLUMNS else None


def detect_layout(first_line: str, path: str, task: str | None = None,
                  text_columns: Sequence[str | int] | None = None) -> TsvLayout:
    """The layout of a GLUE TSV file from its first line and the task (or text_columns).

    task: "sst2", "cola", "mrpc", "rte", "mnli", "qnli", "qqp", "stsb", "wnli" (any spelling
    `task_key` accepts), None to infer it from the folder name (glue/<TASK>/train.tsv) or the
    header.  text_columns: column names (a file with a header) or 0-based indices (a headerless
    file), overriding the task.  Raises ValueError naming the file and the columns it has.
    """
    bom = first_line.startswith("\ufeff")
    line = first_line[1:] if bom else first_line
    fields = line.split("\t")
    if text_columns is not None:
        text_columns = list(text_columns)
        if not text_columns:
            raise ValueError("text_columns is empty; expected the text columns' names or indices")
        if all(isinstance(c, int) for c in text_columns):
            bad = [c for c in text_columns if not 0 <= c < len(fields)]
            if bad:
                raise ValueError(f"text_columns {bad} are out of range: {path!r} has "
                                 f"{len(fields)} columns")
            return TsvLayout(None, bom, len(fields), tuple(text_columns))
        missing = [c for c in text_columns if c not in fields]
        if missing:
            raise ValueError(f"text_columns {missing} are not in the header of {path!r}, whose "
                             f"columns are {fields}")
        return TsvLayout(line, bom, len(fields), tuple(fields.index(c) for c in text_columns))
    task = _layout_task(task) or task_from_path(path)
    if task == "cola" and "sentence" not in fields:
        if len(fields) != len(COLA_COLUMNS):
            raise ValueError(f"task 'cola': {path!r} has no header and {len(fields)} columns on "
                             f"line 1; CoLA train/dev files have {len(COLA_COLUMNS)} "
                             f"{COLA_COLUMNS}")
        return TsvLayout(None, bom, len(COLA_COLUMNS), (COLA_TEXT_COLUMN,), COLA_LABEL_COLUMN)
    if task is not None:
        want, label = TSV_COLUMNS[task]
        missing = [c for c in want if c not in fields]
        if missing:
            raise ValueError(f"task {task!r}: the header of {path!r} lacks the column(s) "
                             f"{missing} (expected {list(want)}); its first line has the "
                             f"columns {fields}")
        return TsvLayout(line, bom, len(fields), tuple(fields.index(c) for c in want),
                         fields.index(label) if label in fields else None)
    found = [i for i, f in enumerate(fields) if f in TEXT_COLUMN_NAMES]
    if not found:
        raise ValueError(
            f"unknown columns in {path!r}: its first line has the columns {fields[:8]}, none of "
            f"them a text column this module knows ({', '.join(TEXT_COLUMN_NAMES)}); pass task= "
            f"(e.g. 'cola' for headerless CoLA files) or text_columns=")
    return TsvLayout(line, bom, len(fields), tuple(found))


# --- reading ----------------------------------------------------------------------------------

class TsvReader:
    """A GLUE TSV file streamed: `layout`, then the data rows as (line number, fields).

        with TsvReader(path, task) as rows:
            for n, fields in rows: ...

    Raises FileNotFoundError for a missing file, ValueError for an empty one or one whose first
    line does not fit the task (see detect_layout).  Rows are not checked against the layout's
    width: the caller decides (training refuses a short row, augmentation skips it).
    """

    def __init__(self, path: str, task: str | None = None,
                 text_columns: Sequence[str | int] | None = None):
        if not os.path.isfile(path):
            known = task is not None and task_key(task) in TASKS
            what = f"a GLUE {get_task(task).glue_dir} TSV file" if known else "a GLUE TSV file"
            raise FileNotFoundError(f"{path}: no such file (expected {what})")
        self.path = path
        self.file = open(path, encoding="utf-8", newline="")
        try:
            self.first_number, self.first = 0, ""
            for n, line in enumerate(self.file, 1):
                line = line.rstrip("\r\n")
                if line:
                    self.first_number, self.first = n, line
                    break
            if not self.first.strip("\ufeff\t "):
                raise ValueError(f"{path}: the file is empty")
            self.layout = detect_layout(self.first, path, task, text_columns)
        except BaseException:
            self.file.close()
            raise

    def __enter__(self) -> "TsvReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        n = self.first_number
        if self.layout.header is None:
            line = self.first[1:] if self.layout.bom else self.first
            yield n, line.split("\t")
        for line in self.file:
            n += 1
            line = line.rstrip("\r\n")
            if line:
                yield n, line.split("\t")


def count_data_lines(path: str, layout: TsvLayout) -> int:
    """The number of data rows of a file (non-empty lines less the header), without parsing."""
    with open(path, "rb") as f:
        n = sum(1 for line in f if line.strip(b"\r\n"))
    return n - (layout.header is not None)


@dataclasses.dataclass
class TsvTable:
    """A GLUE TSV file held whole: its header (None for CoLA train/dev) and rows, kept to write
    augmented or filtered copies in the same layout."""
    header: list[str] | None
    rows: list[list[str]]
    text_idx: tuple[int, ...]
    label_idx: int | None
    bom: bool = False


def read_tsv(path: str, task: Task) -> TsvTable:
    """Read a GLUE TSV file of a task in its original layout, every row checked: a headerless
    (CoLA) row must have all its columns, a row under a header at least the header's.  Errors
    name the file and the lines that are wrong."""
    with TsvReader(path, task.name) as reader:
        layout = reader.layout
        numbered = list(reader)
    header = layout.names if layout.header is not None else None
    rows = [fields for _, fields in numbered]
    if header is None:
        bad = [n for n, fields in numbered if len(fields) != layout.n_columns]
        if bad:
            raise ValueError(f"{path}: CoLA rows have {layout.n_columns} tab-separated columns "
                             f"{COLA_COLUMNS}; lines {bad[:5]} do not")
    else:
        short = [n for n, fields in numbered if len(fields) < len(header)]
        if short:
            raise ValueError(f"{path}: lines {short[:5]} have fewer columns than the header "
                             f"({len(header)})")
    return TsvTable(header, rows, layout.text_columns, layout.label_column, layout.bom)


# --- writing -------------------------------------------------------------------------------------

def format_row(fields: Sequence[str]) -> str:
    """One TSV line (with its "\\n") from fields, which must hold no tab or newline."""
    return "\t".join(fields) + "\n"


def write_tsv(path: str, table: TsvTable) -> None:
    """Write a table in its GLUE layout (BOM and header as read), atomically (tinybert_fast._io).
    """
    for row in ([table.header] if table.header is not None else []) + table.rows:
        bad = [field for field in row if "\t" in field or "\n" in field or "\r" in field]
        if bad:
            raise ValueError(f"{path}: the field {bad[0][:40]!r} holds a tab or a line break, "
                             f"which a GLUE TSV file (no quoting) cannot hold")
    with atomic_open(path, "w", newline="") as f:
        if table.bom:
            f.write("\ufeff")
        if table.header is not None:
            f.write(format_row(table.header))
        f.writelines(format_row(row) for row in table.rows)
