"""Every input a user hands over: a mistake is one line that names it (exit status 2), never a
traceback, never a silent acceptance (tinybert_fast.errors, .glue's readers, .checkpoints, the
CLI boundary in tinybert_fast.cli).

The command-line cases run `cli.main` in this process (capsys holds its stderr) with tiny TSV
files and a tiny random BERT; each stops before training.  A few run `python -m
tinybert_fast.cli` for what only a fresh process shows (the environment variable, the real
stderr).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinybert_fast import checkpoints, cli, data, glue
from tinybert_fast.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE = os.path.join(ROOT, "..", "shared", "data", "glue")
# bounded, quick and the same examples on every run (derandomize: CI never meets a new one);
# no example database written into the checkout
FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
RTE = data.get_task("rte")
RTE_HEADER = "index\tsentence1\tsentence2\tlabel"
WORDS = ["the", "film", "is", "good", "bad", "a", "story", "of", "cats", "dogs"]


def write(path, text: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return str(path)


def rte_file(tmp_path, *rows: str, name="train.tsv", header=RTE_HEADER) -> str:
    return write(tmp_path / "RTE" / name, "\n".join([header, *rows]) + "\n")


def raises_at(exc_info, path, line, column=None):
    """The InputError names the file and the line (and column) as file:line[:column]."""
    err = exc_info.value
    assert isinstance(err, InputError) and err.path == path and err.line == line, str(err)
    where = f"{path}:{line}" + (f":{column}" if column is not None else "")
    assert str(err).startswith(where + ":"), (str(err), where)
    if column is not None:
        assert err.column == column


# --- the error type ------------------------------------------------------------------------------

def test_input_error_is_a_value_error_that_says_where():
    err = InputError("the file is not UTF-8 text", path="a/train.tsv", line=3, column=7,
                     found="byte 0xff", expected="UTF-8")
    assert isinstance(err, ValueError)
    assert str(err) == ("a/train.tsv:3:7: the file is not UTF-8 text: found byte 0xff, "
                        "expected UTF-8")
    arg = InputError("no such folder", argument="--data-dir", path="d")
    assert str(arg) == "--data-dir d: no such folder"
    assert str(InputError("plain")) == "plain"
    import pickle
    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.line, again.column) == (str(err), 3, 7)


# --- the TSV reader: a table of malformed files --------------------------------------------------

BAD_TSV = [
    # (what, rows after the header (bytes or str), line, column or None, words in the message)
    ("more columns than the header", ["0\ta\tb\tentailment\textra"], 2, None,
     ["more", "5 columns", "header's 4"]),
    ("fewer columns", ["0\ta\tb\tentailment", "1\ta\tnot_entailment"], 3, None,
     ["fewer", "3 columns"]),
    ("a NUL inside a sentence", ["0\ta b\x00c\td\tentailment"], 2, 6, ["U+0000"]),
    ("a lone carriage return", ["0\ta\rb\tc\tentailment"], 2, 4, ["U+000D"]),
    ("a form feed", ["0\tab\tc\x0c\tentailment"], 2, 7, ["U+000C"]),
    ("a byte that is not UTF-8", [b"0\tcaf\xe9 noir\tb\tentailment"], 2, 6,
     ["not UTF-8", "byte 0xe9"]),
    ("a truncated UTF-8 sequence after accents", ["0\t\u00e9\u00e9\tb\tentailment".encode()
                                                  + b"\xc3"], 2, 18, ["byte 0xc3"]),
    ("a label outside the task's set", ["0\ta\tb\tmaybe"], 2, None, ["'maybe'",
                                                                     "entailment"]),
]


@pytest.mark.parametrize("what, rows, line, column, words", BAD_TSV,
                         ids=[case[0] for case in BAD_TSV])
def test_malformed_tsv_rows_name_file_and_line(tmp_path, what, rows, line, column, words):
    body = b"\n".join([RTE_HEADER.encode(), *[r if isinstance(r, bytes) else r.encode()
                                              for r in rows]]) + b"\n"
    path = write(tmp_path / "RTE" / "train.tsv", body)
    with pytest.raises(InputError) as exc_info:
        data.load_examples(RTE, "train", str(tmp_path / "RTE"))
    raises_at(exc_info, path, line, column)
    for word in words:
        assert word in str(exc_info.value), (word, str(exc_info.value))


def test_header_errors_name_the_header_line(tmp_path):
    path = write(tmp_path / "RTE" / "train.tsv", "\n\nindex\tsentence1\tlabel\n0\ta\tentailment\n")
    with pytest.raises(InputError, match="lacks the column") as exc_info:
        data.read_tsv(path, RTE)
    raises_at(exc_info, path, 3)
    empty = write(tmp_path / "e.tsv", "")
    with pytest.raises(InputError, match="empty"):
        data.read_tsv(empty, RTE)
    header_only = rte_file(tmp_path, name="h.tsv")
    with pytest.raises(InputError, match="no examples"):
        data.load_examples(RTE, "train", train_file=header_only)


def test_valid_variants_keep_working(tmp_path, caplog):
    """CRLF line ends, a UTF-8 byte-order mark, quotes inside sentences (GLUE does not quote),
    the control characters the official files hold (kept with a warning), and an empty sentence
    (kept, with a warning naming the line)."""
    rows = ['0\tHe said "hi".\t"Quoted" start\tentailment',
            "1\tcaf\u00e9\tb\u0008c\tnot_entailment",
            "2\t\tx\tentailment"]
    path = write(tmp_path / "RTE" / "train.tsv",
                 "\ufeff" + "\r\n".join([RTE_HEADER, *rows]) + "\r\n")
    with caplog.at_level("WARNING", logger="tinybert_fast.glue"):
        examples = data.load_examples(RTE, "train", str(tmp_path / "RTE"))
    assert [e.texts for e in examples] == [('He said "hi".', '"Quoted" start'),
                                           ("caf\u00e9", "b\u0008c"), ("", "x")]
    assert [e.label for e in examples] == [0, 1, 0]
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{path}: 1 row(s) with an empty sentence, on line(s) 4" in m for m in messages)
    assert any(f"{path}: 1 control character(s) kept" in m and "3:9 U+0008" in m
               for m in messages), messages
    table = data.read_tsv(path, RTE)
    assert table.bom and table.lines == [2, 3, 4]


@pytest.mark.skipif(not os.path.isdir(GLUE), reason=f"GLUE data not found at {GLUE}")
def test_official_glue_files_hold_control_characters_that_are_kept(caplog):
    """The reason some C0 characters are warned about rather than refused: CoLA's and MRPC's
    official train files hold four, and must load with their official row counts (test_data)."""
    with caplog.at_level("WARNING", logger="tinybert_fast.glue"):
        cola = data.read_tsv(os.path.join(GLUE, "CoLA", "train.tsv"), data.get_task("cola"))
    assert len(cola.rows) == 8551
    assert "7130:46 U+0008" in caplog.text


@FAST
@given(width=st.integers(1, 6), extra=st.integers(-3, 3).filter(bool), bad_row=st.integers(0, 5),
       words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=4))
def test_property_a_row_of_another_width_is_refused_at_its_line(tmp_path, width, extra, bad_row,
                                                                words):
    header = ["sentence", *[f"c{i}" for i in range(width - 1)]]
    rows = [[" ".join(words)] + ["x"] * (width - 1) for _ in range(6)]
    n = max(1, width + extra)
    if n == width:
        n = width + 1
    rows[bad_row] = (rows[bad_row] + ["y"] * n)[:n]
    path = write(tmp_path / "x" / "any.tsv",
                 "\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    task = glue.Task("any", "X", ("sentence",), None, "pearson_spearman")
    glue.TSV_COLUMNS.setdefault("any", (("sentence",), None))
    with pytest.raises(InputError) as exc_info:
        glue.read_tsv(path, task)
    raises_at(exc_info, path, bad_row + 2)
    assert f"found {n} column{'s' * (n != 1)}," in str(exc_info.value)


@FAST
@given(prefix=st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=12),
       bad=st.sampled_from([b"\xff", b"\xfe", b"\x80", b"\xc3(", b"\xed\xa0\x80"]),
       line=st.integers(0, 4))
def test_property_a_bad_byte_is_reported_at_its_line_and_column(tmp_path, prefix, bad, line):
    rows = [f"{i}\tfine text\tmore\tentailment".encode() for i in range(5)]
    rows[line] = f"{line}\t{prefix}".encode() + bad + b"\tb\tentailment"
    path = write(tmp_path / "RTE" / "train.tsv", b"\n".join([RTE_HEADER.encode(), *rows]) + b"\n")
    with pytest.raises(InputError, match="not UTF-8") as exc_info:
        data.read_tsv(path, RTE)
    raises_at(exc_info, path, line + 2, len(f"{line}\t{prefix}") + 1)


@FAST
@given(text=st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=12),
       at=st.integers(0, 12), char=st.sampled_from(["\x00", "\r", "\x0b", "\x0c", "\x1c", "\x1e"]))
def test_property_a_refused_control_character_is_reported_where_it_is(tmp_path, text, at, char):
    at = min(at, len(text))
    sentence = text[:at] + char + text[at:]
    path = rte_file(tmp_path, f"0\t{sentence}\tb\tentailment")
    with pytest.raises(InputError, match="control character") as exc_info:
        data.read_tsv(path, RTE)
    raises_at(exc_info, path, 2, len("0\t") + at + 1)
    assert f"U+{ord(char):04X}" in str(exc_info.value)


@FAST
@given(rows=st.lists(st.tuples(st.text(st.characters(blacklist_categories=("Cc", "Cs")),
                                       min_size=1, max_size=20).filter(str.strip),
                               st.sampled_from(["entailment", "not_entailment"])),
                     min_size=1, max_size=6),
       crlf=st.booleans(), bom=st.booleans())
def test_property_valid_files_read_back_exactly(tmp_path, rows, crlf, bom):
    end = "\r\n" if crlf else "\n"
    lines = [RTE_HEADER] + [f"{i}\t{s}\tother\t{label}" for i, (s, label) in enumerate(rows)]
    path = write(tmp_path / "RTE" / "train.tsv", ("\ufeff" if bom else "") + end.join(lines) + end)
    examples = data.load_examples(RTE, "train", str(tmp_path / "RTE"))
    assert [(e.texts[0], RTE.labels[e.label]) for e in examples] == rows


def test_corpus_reader_is_as_strict(tmp_path):
    path = write(tmp_path / "corpus.txt", b"first passage\nsecond \xff passage\n")
    with pytest.raises(InputError) as exc_info:
        data.read_corpus(path)
    raises_at(exc_info, path, 2, 8)
    nul = write(tmp_path / "nul.txt", "ok\n\nbad\x00 line\n")
    with pytest.raises(InputError) as exc_info:
        data.read_corpus(nul)
    raises_at(exc_info, nul, 3, 4)
    good = write(tmp_path / "good.txt", "one\r\n\r\n two \r\n")
    assert [e.texts for e in data.read_corpus(good)] == [("one",), ("two",)]


# --- model folders -------------------------------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


def save_tiny_bert(folder, *, vocab_size=None, layers=1, tokenizer=True):
    """A random 1-layer BERT classifier (hidden 16) with a WordPiece tokenizer of VOCAB."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size or len(VOCAB), hidden_size=16,
                        num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    if tokenizer:  # (transformers 5 takes the vocabulary as a dict, not a vocab.txt)
        BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("models") / "tiny")


def copy_model(model, tmp_path, name="copy"):
    import shutil
    return shutil.copytree(model, tmp_path / name)


def test_a_good_folder_passes_and_hub_ids_are_left_to_transformers(model):
    for what in ("model", "config", "tokenizer"):
        checkpoints.check_model_folder(model, "--teacher", what)
    checkpoints.check_model_argument("bert-base-uncased", "--teacher")
    checkpoints.check_model_argument("google/bert_uncased_L-2_H-128_A-2", "--teacher")
    assert checkpoints.looks_local("/abs/path") and checkpoints.looks_local("runs/a/model")
    assert not checkpoints.looks_local("org/name")


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("damage, file, words", [
    ("missing path", None, ["no such file or folder"]),
    ("no weights", None, ["no weight file", "model.safetensors"]),
    ("header cut", "model.safetensors", ["truncated safetensors", "header is shorter"]),
    ("data cut", "model.safetensors", ["truncated safetensors", "ends past the end"]),
    ("no config", None, ["no config.json"]),
    ("config not JSON", "config.json", ["not valid JSON"]),
    ("config vs weights", "config.json", ["does not match the weights", "hidden_size"]),
    ("layers vs weights", "config.json", ["num_hidden_layers = 3", "1 encoder layers"]),
    ("shard missing", "model.safetensors.index.json", ["shard files that are not there"]),
])
def test_damaged_model_folders_are_named(model, tmp_path, damage, file, words):
    folder = copy_model(model, tmp_path)
    weights, config = folder / "model.safetensors", folder / "config.json"
    if damage == "missing path":
        folder = tmp_path / "nowhere" / "model"
    elif damage == "no weights":
        weights.unlink()
    elif damage == "header cut":
        _truncate(weights, 40)
    elif damage == "data cut":
        _truncate(weights, weights.stat().st_size - 100)
    elif damage == "no config":
        config.unlink()
    elif damage == "config not JSON":
        config.write_text('{\n  "vocab_size": 15,\n  oops\n}\n')
    elif damage in ("config vs weights", "layers vs weights"):
        values = json.loads(config.read_text())
        values.update({"hidden_size": 32} if damage == "config vs weights"
                      else {"num_hidden_layers": 3})
        config.write_text(json.dumps(values))
    elif damage == "shard missing":
        weights.rename(folder / "model-00001-of-00002.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(InputError) as exc_info:
        checkpoints.check_model_argument(str(folder), "--teacher")
    text = str(exc_info.value)
    assert text.startswith("--teacher "), text
    assert str(folder / file) in text if file else str(folder) in text
    for word in words:
        assert word in text, (word, text)
    if damage == "config not JSON":
        assert f"{folder / file}:3:3:" in text


def test_factored_embeddings_are_compared_with_embedding_size(tmp_path):
    """ALBERT/ELECTRA-style configs: the word embeddings are [vocab_size, embedding_size]."""
    import torch
    from safetensors.torch import save_file
    folder = tmp_path / "albert"
    folder.mkdir()
    save_file({"albert.embeddings.word_embeddings.weight": torch.zeros(20, 8)},
              str(folder / "model.safetensors"))
    config = {"vocab_size": 20, "embedding_size": 8, "hidden_size": 32, "num_hidden_layers": 2}
    (folder / "config.json").write_text(json.dumps(config))
    checkpoints.check_model_folder(str(folder), "--teacher")
    (folder / "config.json").write_text(json.dumps({**config, "embedding_size": 16}))
    with pytest.raises(InputError, match=r"vocab_size, embedding_size = 20, 16.*\[20, 8\]"):
        checkpoints.check_model_folder(str(folder), "--teacher")


def test_a_tokenizer_larger_than_the_vocabulary_is_named(tmp_path):
    folder = save_tiny_bert(tmp_path / "small", vocab_size=len(VOCAB) - 3)
    with pytest.raises(InputError, match=r"tokenizer does not fit.*ids up to 14.*vocab_size 12"):
        checkpoints.check_model_folder(folder, "--model")


def test_pretrained_checks_local_folders_first(model, tmp_path):
    from transformers import AutoModelForSequenceClassification
    from tinybert_fast.distill.models import pretrained
    folder = copy_model(model, tmp_path)
    _truncate(folder / "model.safetensors", 40)
    with pytest.raises(InputError, match=r"^teacher .*model.safetensors: truncated"):
        pretrained("teacher", AutoModelForSequenceClassification.from_pretrained, str(folder))


def test_a_safetensors_error_is_a_user_error(model, tmp_path):
    """Any damage the checks miss still reaches the user as one line: the CLI counts
    safetensors' own error as a user's."""
    from safetensors import safe_open
    folder = copy_model(model, tmp_path)
    _truncate(folder / "model.safetensors", 40)
    with pytest.raises(Exception) as exc_info:
        with safe_open(str(folder / "model.safetensors"), "pt"):
            pass
    assert type(exc_info.value).__name__ == "SafetensorError"
    assert cli.is_user_error(exc_info.value)
    assert not cli.is_user_error(RuntimeError("a bug"))


# --- the command line ----------------------------------------------------------------------------

def run_cli(capsys, *argv: str) -> tuple[int, str]:
    status = cli.main(["--log-level", "WARNING", *argv])
    return status, capsys.readouterr().err


def assert_one_line(status, err, *names, command=None):
    """Exit status 2, no traceback, one error line that names every one of `names`."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("tinybert-fast ")]
    assert status == 2 and len(lines) == 1, (status, err)
    assert ": error: " in lines[0] and (command is None or lines[0].startswith(
        f"tinybert-fast {command}: error: ")), lines[0]
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def sst2_dir(tmp_path, train: str | bytes | None = None) -> str:
    folder = tmp_path / "SST-2"
    rows = "sentence\tlabel\nthe film is good\t1\na bad story\t0\n"
    write(folder / "train.tsv", rows if train is None else train)
    write(folder / "dev.tsv", rows)
    return str(folder)


def finetune(model, data_dir, out, *extra):
    return ["finetune-teacher", "--model", model, "--task", "sst2", "--data-dir", data_dir,
            "--output-dir", str(out), "--device", "cpu", "--no-progress", "--max-steps", "1",
            *extra]


# (name, train.tsv bytes or None for the default, extra flags, what the line names: "FILE"
# stands for the train file, "FILE:n" for file:line n)
CLI_CASES = [
    ("no train.tsv", "absent", [], ["FILE", "no such file"]),
    ("row with more columns", "sentence\tlabel\nthe film\t1\tspare\n", [], ["FILE:2", "more"]),
    ("row with fewer columns", "sentence\tlabel\nthe film\t1\ngood\n", [], ["FILE:3", "fewer"]),
    ("NUL in a sentence", "sentence\tlabel\nthe fi\x00lm\t1\n", [], ["FILE:2:7", "U+0000"]),
    ("non-UTF-8 byte", b"sentence\tlabel\nthe film\t1\ncaf\xff\t0\n", [], ["FILE:3:4", "0xff"]),
    ("missing column", "text\tlabel\nthe film\t1\n", [], ["FILE:1", "lacks"]),
    ("label outside the set", "sentence\tlabel\nthe film\t7\n", [], ["FILE:2", "'7'"]),
    ("empty file", "", [], ["FILE", "empty"]),
    ("header without rows", "sentence\tlabel\n", [], ["FILE", "no examples"]),
    ("--lr nan", None, ["--lr", "nan"], ["lr must be > 0"]),
    ("--epochs -1", None, ["--epochs", "-1"], ["epochs must be > 0"]),
    ("--max-length 0", None, ["--max-length", "0"], ["max_length must be > 0"]),
    ("--batch-size 0", None, ["--batch-size", "0"], ["batch_size must be > 0"]),
]


@pytest.mark.parametrize("name, train, extra, names", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_data_is_one_line(model, tmp_path, capsys, name, train, extra, names):
    data_dir = sst2_dir(tmp_path, None if train in (None, "absent") else train)
    path = os.path.join(data_dir, "train.tsv")
    if train == "absent":
        os.remove(path)
    out = tmp_path / "out"
    status, err = run_cli(capsys, *finetune(model, data_dir, out, *extra))
    assert_one_line(status, err, *[n.replace("FILE", path) for n in names],
                    command="finetune-teacher")
    assert not out.exists(), sorted(os.listdir(out))  # a failed run leaves nothing


def test_cli_model_folder_mistakes(model, tmp_path, capsys):
    data_dir = sst2_dir(tmp_path)
    out = tmp_path / "out"
    damaged = copy_model(model, tmp_path, "damaged")
    _truncate(damaged / "model.safetensors", 40)
    status, err = run_cli(capsys, "distill", "--stage", "task1", "--teacher", str(damaged),
                          "--student", "tinybert4", "--task", "sst2", "--data-dir", data_dir,
                          "--output-dir", str(out), "--device", "cpu")
    assert_one_line(status, err, "--teacher", damaged / "model.safetensors", "truncated")
    bad_student = write(tmp_path / "student.json", '{"model_type": "bert", "num_hidden_layers": }')
    status, err = run_cli(capsys, *finetune(bad_student, data_dir, out, "--tokenizer", model))
    assert_one_line(status, err, bad_student)
    assert not out.exists()


def test_cli_output_dir_that_is_a_file(model, tmp_path, capsys):
    out = write(tmp_path / "out", "keep me")
    status, err = run_cli(capsys, *finetune(model, sst2_dir(tmp_path), out))
    assert_one_line(status, err, "--output-dir", out, "is a file")
    assert open(out).read() == "keep me"
    below = os.path.join(out, "run")
    status, err = run_cli(capsys, *finetune(model, sst2_dir(tmp_path), below))
    assert_one_line(status, err, "--output-dir", f"{out} is a file")
    status, err = run_cli(capsys, "distill", "--stage", "task1", "--teacher", model,
                          "--student", "tinybert4", "--task", "sst2", "--data-dir",
                          sst2_dir(tmp_path), "--output-dir", str(tmp_path / "run"),
                          "--teacher-cache", out)
    assert_one_line(status, err, "--teacher-cache", out, "is a file")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, where", [('{"lr": [1e-4, 2e-4],}', ":1:21:"),
                                         ("lr = [1e-4\nmapping = 3\n", ":2:1:")])
def test_cli_malformed_grid_file(model, tmp_path, capsys, text, where):
    path = write(tmp_path / ("grid.json" if text.startswith("{") else "grid.toml"), text)
    out = tmp_path / "study"
    status, err = run_cli(capsys, "study", "--output-dir", str(out), "--grid-file", path, "--",
                          "--stage", "task2", "--teacher", model, "--student", "tinybert4")
    line = assert_one_line(status, err, "--grid-file", path + where, command="study")
    assert "not valid" in line
    assert not out.exists()


# Each subcommand with a missing data folder and with a missing model folder: (subcommand, the
# flags with {data} and {model} standing for the missing paths, flags naming them in the line).
# None: the subcommand takes no such input (build-extension takes neither; plot reads run
# folders, which are its data, and no model).
MISSING = {
    "finetune-teacher": (["finetune-teacher", "--model", "{model}", "--task", "sst2",
                          "--data-dir", "{data}", "--output-dir", "{out}"], "--model"),
    "distill": (["distill", "--stage", "task1", "--teacher", "{model}", "--student", "tinybert4",
                 "--task", "sst2", "--data-dir", "{data}", "--output-dir", "{out}"], "--teacher"),
    "eval": (["eval", "--model", "{model}", "--task", "sst2", "--data-dir", "{data}"], "--model"),
    "cache": (["cache", "--teacher", "{model}", "--task", "sst2", "--data-dir", "{data}",
               "--output", "{out}", "--student-layers", "1"], "--teacher"),
    "augment": (["augment", "--input", "{data}/train.tsv", "--output", "{out}.tsv",
                 "--mlm", "{model}"], "--mlm"),
    "study": (["study", "--output-dir", "{out}", "--", "--stage", "task2", "--teacher",
               "{model}", "--student", "tinybert4", "--task", "sst2", "--data-dir", "{data}"],
              "--teacher"),
    "plot": (["plot", "{data}", "--output", "{out}.png"], None),
    "build-extension": None,
}


def test_every_subcommand_is_in_the_missing_inputs_table():
    assert set(MISSING) == set(cli.COMMANDS)


@pytest.mark.parametrize("missing", ["data", "model"])
@pytest.mark.parametrize("command", sorted(c for c in MISSING if MISSING[c] is not None))
def test_every_subcommand_names_a_missing_data_or_model_folder(model, tmp_path, capsys, command,
                                                               missing):
    argv, model_flag = MISSING[command]
    if missing == "model" and model_flag is None:
        pytest.skip(f"{command} reads no model")
    good_data = sst2_dir(tmp_path)
    nowhere = str(tmp_path / "nowhere" / missing)
    paths = {"data": nowhere if missing == "data" else good_data,
             "model": nowhere if missing == "model" else model, "out": str(tmp_path / "out")}
    status, err = run_cli(capsys, *[a.format(**paths) for a in argv])
    assert_one_line(status, err, nowhere, "no such file or folder", command=command)
    assert not any(p.startswith("out") for p in os.listdir(tmp_path))


def test_an_internal_error_is_one_line_with_the_traceback_at_debug(monkeypatch, capsys):
    from tinybert_fast.commands import plot

    def boom(args):
        raise RuntimeError("a bug, not the user's")
    monkeypatch.setattr(plot, "run", boom)
    argv = ["plot", "somewhere", "--output", "x.png"]
    assert cli.main(["--log-level", "WARNING", *argv]) == 1
    err = capsys.readouterr().err
    assert err == ("tinybert-fast plot: internal error: RuntimeError: a bug, not the user's "
                   "(--log-level DEBUG prints the traceback)\n")
    assert cli.main(["--log-level", "DEBUG", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in boom" in err
    assert err.splitlines()[-1] == ("tinybert-fast plot: internal error: RuntimeError: a bug, "
                                    "not the user's")


def test_a_multi_line_message_becomes_one_line():
    assert cli.one_line(ValueError("teacher 'x': cannot load it:\n  first\n\n  second")) == \
        "teacher 'x': cannot load it: first second"
    err = FileExistsError(17, "File exists")
    err.filename = "/tmp/o"
    assert cli.one_line(err) == "/tmp/o: File exists"
    assert len(cli.one_line(ValueError("x" * 5000))) == cli.MAX_MESSAGE


def _python_cli(*argv, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "tinybert_fast.cli", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bogus_backend_variable_in_a_real_process(tmp_path):
    """TINYBERT_FAST_BACKEND=bogus: the import succeeds, the CLI names the variable (it was a
    traceback at import)."""
    proc = _python_cli("plot", str(tmp_path), "--output", str(tmp_path / "x.png"),
                       env={"TINYBERT_FAST_BACKEND": "bogus"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "tinybert-fast plot: error: environment variable TINYBERT_FAST_BACKEND: "
        "TINYBERT_FAST_BACKEND must be one of ('auto', 'triton', 'torch'): found 'bogus', "
        "expected one of ('auto', 'triton', 'torch'), or unset"], proc.stderr


def test_a_bad_tsv_in_a_real_process_is_exactly_one_stderr_line(model, tmp_path):
    data_dir = sst2_dir(tmp_path, b"sentence\tlabel\nthe film\t1\nca\xfef\t0\n")
    out = tmp_path / "out"
    proc = _python_cli("--log-level", "WARNING", *finetune(model, data_dir, out))
    path = os.path.join(data_dir, "train.tsv")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"tinybert-fast finetune-teacher: error: {path}:3:3: the file is not UTF-8 text: "
        f"found byte 0xfe, expected UTF-8 (re-save the file as UTF-8)"], proc.stderr
    assert not out.exists()


def test_the_valid_variants_train(model, tmp_path, capsys):
    """A training file with CRLF line ends, a byte-order mark, quotes inside a sentence, a kept
    control character and an empty sentence trains through the command line (exit 0, a model)."""
    train = ("\ufeffsentence\tlabel\r\n"
             'he said "hi"\t1\r\n'
             "b\u0008c is fine\t0\r\n"
             "\t1\r\n")
    data_dir = sst2_dir(tmp_path, train)
    out = tmp_path / "out"
    status, err = run_cli(capsys, *finetune(model, data_dir, out))
    assert status == 0, err
    assert (out / "model" / "config.json").is_file() and (out / "summary.json").is_file()
