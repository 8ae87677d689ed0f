"""GLUE tasks and their TSV files: the one home of the task table, of task-name normalisation and
of GLUE TSV reading and writing (used by `tinybert_fast.data` for training and evaluation and by
`tinybert_fast.augment`, which streams a file and writes it back in the same layout).

Plain Python (no torch, no numpy), so that the command line can name the tasks cheaply.

A GLUE TSV file is lines separated by "\\n" (a trailing "\\r" is dropped), fields separated by
"\\t", no quoting; an optional UTF-8 byte-order mark (MRPC's files) is kept apart and written back.
Every file has a header line except CoLA's train and dev files (source, label, original_mark,
sentence).  Empty lines are skipped.  Quotes are plain characters (the GLUE files do not quote:
`"` inside a sentence is kept as it is).

Reading is strict, and every error names `file:line[:column]` (tinybert_fast.errors.InputError):
a byte that is not UTF-8, a NUL or a character that ends a line for other readers (a lone
"\\r", VT, FF, U+001C-U+001E), a row with more or fewer columns than the header.  Other C0
control characters (the official CoLA and MRPC train files hold a few) and rows with an empty
sentence are kept, with a warning that names their lines.

Labels follow the `datasets` GLUE label order for every source, so a model trained on TSV files
and one trained on `datasets` agree.  MNLI in particular is (entailment, neutral, contradiction)
= (0, 1, 2); TinyBERT's reference scripts used (contradiction, entailment, neutral), which made
checkpoints and the `datasets` data disagree.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Sequence

from ._io import atomic_open
from .errors import InputError

log = logging.getLogger("tinybert_fast.glue")


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
                  text_columns: Sequence[str | int] | None = None, *,
                  line_number: int = 1) -> TsvLayout:
    """The layout of a GLUE TSV file from its first line and the task (or text_columns).

    task: "sst2", "cola", "mrpc", "rte", "mnli", "qnli", "qqp", "stsb", "wnli" (any spelling
    `task_key` accepts), None to infer it from the folder name (glue/<TASK>/train.tsv) or the
    header.  text_columns: column names (a file with a header) or 0-based indices (a headerless
    file), overriding the task.  line_number: the first line's (for errors).  Raises
    InputError (a ValueError) at `path:line_number`, naming the columns the line has.
    """
    at = dict(path=path, line=line_number)
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
                raise InputError(f"text_columns {bad} are out of range", **at,
                                 found=f"{len(fields)} columns",
                                 expected=f"indices below {len(fields)}")
            return TsvLayout(None, bom, len(fields), tuple(text_columns))
        missing = [c for c in text_columns if c not in fields]
        if missing:
            raise InputError(f"text_columns {missing} are not in the header", **at,
                             found=f"the columns {fields}", expected=f"{missing} among them")
        return TsvLayout(line, bom, len(fields), tuple(fields.index(c) for c in text_columns))
    task = _layout_task(task) or task_from_path(path)
    if task == "cola" and "sentence" not in fields:
        if len(fields) != len(COLA_COLUMNS):
            raise InputError("task 'cola': the file has no header and a first row of the "
                             "wrong width", **at, found=f"{len(fields)} columns",
                             expected=f"CoLA train/dev files' {len(COLA_COLUMNS)} "
                                      f"{COLA_COLUMNS}")
        return TsvLayout(None, bom, len(COLA_COLUMNS), (COLA_TEXT_COLUMN,), COLA_LABEL_COLUMN)
    if task is not None:
        want, label = TSV_COLUMNS[task]
        missing = [c for c in want if c not in fields]
        if missing:
            raise InputError(f"task {task!r}: the header lacks the column(s) {missing}", **at,
                             found=f"the columns {fields}", expected=f"{list(want)} among them")
        return TsvLayout(line, bom, len(fields), tuple(fields.index(c) for c in want),
                         fields.index(label) if label in fields else None)
    found = [i for i, f in enumerate(fields) if f in TEXT_COLUMN_NAMES]
    if not found:
        raise InputError(
            "unknown columns: none is a text column this module knows (pass task=, e.g. 'cola' "
            "for headerless CoLA files, or text_columns=)", **at,
            found=f"the columns {fields[:8]}", expected=f"one of {', '.join(TEXT_COLUMN_NAMES)}")
    return TsvLayout(line, bom, len(fields), tuple(found))


# --- reading ----------------------------------------------------------------------------------

# C0 control characters (other than tab) in a line.  Refused: NUL (never text: a binary or
# damaged file) and the characters that end a line for some reader (a lone "\r", VT, FF, and
# the file/group/record separators that str.splitlines breaks at), which would make the row
# another reader's two rows.  Kept with a warning: the rest (backspace, DC2, ...), which the
# official GLUE files hold (CoLA train: 3 backspaces, MRPC train: one U+0012 for an
# apostrophe) and which BERT's tokenizers drop.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f]")
_REFUSED = frozenset("\x00\n\x0b\x0c\r\x1c\x1d\x1e")


def decode_line(raw: bytes, path: str, number: int,
                tolerated: list[tuple[int, int, str]] | None = None) -> str:
    """One line of a UTF-8 text file, its line end ("\n", "\r\n") dropped, checked: InputError
    at `path:number:column` for a byte that is not UTF-8, a NUL, or a character that ends a
    line for other readers (a lone carriage return, VT, FF, U+001C-U+001E).  The other C0
    control characters (not tab) are appended to `tolerated` as (line, column, character)."""
    raw = raw.rstrip(b"\n")
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # everything before exc.start decodes: the column is in characters, as an editor counts
        column = len(raw[:exc.start].decode("utf-8")) + 1
        raise InputError("the file is not UTF-8 text", path=path, line=number, column=column,
                         found=f"byte 0x{raw[exc.start]:02x}",
                         expected="UTF-8 (re-save the file as UTF-8)") from None
    for bad in _CONTROL.finditer(text):
        char = bad.group()
        if char in _REFUSED:
            raise InputError("a control character inside a line", path=path, line=number,
                             column=bad.start() + 1, found=f"U+{ord(char):04X}",
                             expected="text (tabs only between the fields)")
        if tolerated is not None:
            tolerated.append((number, bad.start() + 1, char))
    return text


def warn_tolerated(path: str, tolerated: list[tuple[int, int, str]]) -> None:
    """One warning naming the places of the control characters decode_line kept."""
    if tolerated:
        places = ", ".join(f"{n}:{c} U+{ord(ch):04X}" for n, c, ch in tolerated[:10])
        log.warning("%s: %d control character(s) kept in the text (line:column %s%s)", path,
                    len(tolerated), places, " ..." if len(tolerated) > 10 else "")


class TsvReader:
    """A GLUE TSV file streamed: `layout`, then the data rows as (line number, fields).

        with TsvReader(path, task) as rows:
            for n, fields in rows: ...

    Raises FileNotFoundError for a missing file, InputError (a ValueError) for an empty one, one
    whose first line does not fit the task (see detect_layout), and, while iterating, for a line
    that is not UTF-8 or holds a refused control character (decode_line: file:line:column).
    Rows are not checked against the layout's width: the caller decides (training refuses a row
    whose column count differs from the header's, augmentation skips it).
    """

    def __init__(self, path: str, task: str | None = None,
                 text_columns: Sequence[str | int] | None = None):
        if not os.path.isfile(path):
            known = task is not None and task_key(task) in TASKS
            what = f"a GLUE {get_task(task).glue_dir} TSV file" if known else "a GLUE TSV file"
            kind = "a folder, not a file" if os.path.isdir(path) else "no such file"
            raise FileNotFoundError(f"{path}: {kind} (expected {what})")
        self.path = path
        # binary: lines end at "\n" only, and every line is decoded (and checked) with its number
        self.file = open(path, "rb")
        self.tolerated: list[tuple[int, int, str]] = []  # kept control characters
        try:
            self.first_number, self.first = 0, ""
            for n, raw in enumerate(self.file, 1):
                line = decode_line(raw, path, n, self.tolerated)
                if line:
                    self.first_number, self.first = n, line
                    break
            if not self.first.strip("\ufeff\t "):
                raise InputError("the file is empty", path=path, expected="a header line and rows")
            self.layout = detect_layout(self.first, path, task, text_columns,
                                        line_number=self.first_number)
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
        for raw in self.file:
            n += 1
            line = decode_line(raw, self.path, n, self.tolerated)
            if line:
                yield n, line.split("\t")
        warn_tolerated(self.path, self.tolerated)


def count_data_lines(path: str, layout: TsvLayout) -> int:
    """The number of data rows of a file (non-empty lines less the header), without parsing."""
    with open(path, "rb") as f:
        n = sum(1 for line in f if line.strip(b"\r\n"))
    return n - (layout.header is not None)


@dataclasses.dataclass
class TsvTable:
    """A GLUE TSV file held whole: its header (None for CoLA train/dev) and rows, kept to write
    augmented or filtered copies in the same layout.  `lines`: each row's line number in the
    file it was read from (None for a table built in memory), for errors that name the line."""
    header: list[str] | None
    rows: list[list[str]]
    text_idx: tuple[int, ...]
    label_idx: int | None
    bom: bool = False
    lines: list[int] | None = None

    def line_of(self, i: int) -> int | None:
        """The file line of row i (None when the table was not read from a file)."""
        return self.lines[i] if self.lines is not None else None


def read_tsv(path: str, task: Task) -> TsvTable:
    """Read a GLUE TSV file of a task in its original layout, every row checked (InputError at
    `path:line`): each row has the header's number of columns (CoLA's headerless files: 4),
    more and fewer alike, as well as decode_line's checks (the control characters it keeps are
    warned about, naming their places).  Rows whose text columns are empty are kept, with one
    warning naming their lines."""
    with TsvReader(path, task.name) as reader:
        layout = reader.layout
        numbered = list(reader)
    header = layout.names if layout.header is not None else None
    width = len(header) if header is not None else layout.n_columns
    for n, fields in numbered:
        if len(fields) != width:
            than = "the header" if header is not None else "CoLA's layout (no header)"
            names = f"the header's {width}" if header is not None else f"{width} {COLA_COLUMNS}"
            raise InputError(f"a row with {'more' if len(fields) > width else 'fewer'} "
                             f"tab-separated columns than {than}", path=path, line=n,
                             found=f"{len(fields)} column{'s' * (len(fields) != 1)}",
                             expected=names)
    empty = [n for n, fields in numbered
             if any(not fields[j].strip() for j in layout.text_columns)]
    if empty:
        log.warning("%s: %d row(s) with an empty sentence, on line(s) %s%s", path, len(empty),
                    ", ".join(map(str, empty[:10])), " ..." if len(empty) > 10 else "")
    return TsvTable(header, [fields for _, fields in numbered], layout.text_columns,
                    layout.label_column, layout.bom, [n for n, _ in numbered])


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
