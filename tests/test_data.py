"""GLUE data: TSV layouts of the real files, labels, batching and metrics (tinybert_fast.data)."""

import math
import os

import numpy as np
import pytest

from tinybert_fast import data

GLUE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")
needs_glue = pytest.mark.skipif(not os.path.isdir(GLUE), reason=f"GLUE data not found at {GLUE}")

# Row counts from ../shared/data/README.md (the official GLUE figures).
COUNTS = {("sst2", "train"): 67349, ("sst2", "dev"): 872, ("cola", "train"): 8551,
          ("cola", "dev"): 1043, ("mrpc", "train"): 3668, ("mrpc", "dev"): 408,
          ("rte", "train"): 2490, ("rte", "dev"): 277}


@needs_glue
@pytest.mark.parametrize("task, split", sorted(COUNTS))
def test_real_glue_files_read_completely(task, split):
    t = data.get_task(task)
    examples = data.load_examples(t, split, os.path.join(GLUE, t.glue_dir))
    assert len(examples) == COUNTS[(task, split)]
    assert all(len(e.texts) == len(t.text_columns) and all(e.texts) for e in examples)
    assert {e.label for e in examples} == set(range(t.num_labels))


@needs_glue
def test_mrpc_bom_and_rte_label_names():
    mrpc = data.load_examples(data.get_task("mrpc"), "dev", os.path.join(GLUE, "MRPC"))
    assert not mrpc[0].texts[0].startswith("\ufeff")
    rte_path = os.path.join(GLUE, "RTE", "dev.tsv")
    with open(rte_path, encoding="utf-8") as f:
        first_label = f.read().splitlines()[1].split("\t")[-1]
    rte = data.load_examples(data.get_task("rte"), "dev", os.path.join(GLUE, "RTE"))
    assert rte[0].label == ("entailment", "not_entailment").index(first_label)


@needs_glue
def test_test_split_has_no_labels():
    examples = data.load_examples(data.get_task("sst2"), "test", os.path.join(GLUE, "SST-2"))
    assert len(examples) == 1821 and all(e.label is None for e in examples)


def test_mnli_uses_datasets_label_order():
    assert data.get_task("mnli").labels == ("entailment", "neutral", "contradiction")


def test_tsv_round_trip_and_errors(tmp_path):
    t = data.get_task("rte")
    src = tmp_path / "train.tsv"
    src.write_text("index\tsentence1\tsentence2\tlabel\n0\tA b.\tC d.\tentailment\n"
                   "1\tE f.\tG h.\tnot_entailment\n", encoding="utf-8")
    table = data.read_tsv(str(src), t)
    out = tmp_path / "copy.tsv"
    data.write_tsv(str(out), table)
    assert out.read_text(encoding="utf-8") == src.read_text(encoding="utf-8")
    assert [e.label for e in data.table_examples(table, t, str(src))] == [0, 1]
    bad = tmp_path / "bad.tsv"
    bad.write_text("idx\ttext\n0\thello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lacks"):
        data.read_tsv(str(bad), t)
    empty = tmp_path / "empty.tsv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        data.read_tsv(str(empty), t)
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.read_tsv(str(tmp_path / "missing.tsv"), t)
    wrong = tmp_path / "wrong.tsv"
    wrong.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", encoding="utf-8")
    with pytest.raises(ValueError, match="maybe"):
        data.load_examples(t, "train", train_file=str(wrong))
    with pytest.raises(ValueError, match="unknown task"):
        data.get_task("glue-x")


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_together_see_one_process_batches(world_size):
    n, bs = 50, 8
    single = data.batch_indices(n, bs, epoch=3, seed=7)
    ranks = [data.batch_indices(n, bs, epoch=3, seed=7, rank=r, world_size=world_size)
             for r in range(world_size)]
    n_full = len(ranks[0])
    assert all(len(r) == n_full for r in ranks)
    # 50 = 6 * 8 + 2: the last global batch (2 examples) is dropped only with 4 ranks
    assert n_full == (len(single) - 1 if world_size > 2 else len(single))
    for i, batch in enumerate(single[:n_full]):
        assert sorted(sum((r[i] for r in ranks), [])) == sorted(batch)
    assert sorted(sum(single, [])) == list(range(n))
    assert data.batch_indices(n, bs, 4, 7) != single  # epochs differ
    with pytest.raises(ValueError, match="divisible"):
        data.batch_indices(n, 6, 0, 0, world_size=4)


def test_metrics_against_hand_computed_values():
    t = data.get_task("cola")
    p, y = [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]
    tp, tn, fp, fn = 2, 2, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert data.compute_metrics(t, p, y)["mcc"] == pytest.approx(mcc)
    f1 = data.compute_metrics(data.get_task("mrpc"), p, y)["f1"]
    assert f1 == pytest.approx(2 * tp / (2 * tp + fp + fn))
    s = data.compute_metrics(data.get_task("stsb"), [1.0, 2.0, 3.0, 5.0], [1.0, 3.0, 2.0, 4.0])
    a, b = np.array([1.0, 2.0, 3.0, 5.0]), np.array([1.0, 3.0, 2.0, 4.0])
    assert s["pearson"] == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert s["spearman"] == pytest.approx(0.8)  # ranks 1,2,3,4 vs 1,3,2,4
    ties = data.compute_metrics(data.get_task("stsb"), [1.0, 1.0, 2.0], [1.0, 2.0, 3.0])
    assert ties["spearman"] == pytest.approx(np.corrcoef([0.5, 0.5, 2], [0, 1, 2])[0, 1])
    with pytest.raises(ValueError, match="equal length"):
        data.compute_metrics(t, [1], [1, 0])


def _metrics_as_before(task, p, y):
    """The hand-written GLUE metrics that compute_metrics had before it used scikit-learn and
    SciPy (kept here as the reference the library versions must equal)."""
    p, y = np.asarray(p), np.asarray(y)
    if task.metric == "pearson_spearman":
        def pearson(a, b):
            a, b = a - a.mean(), b - b.mean()
            den = math.sqrt(float((a * a).sum() * (b * b).sum()))
            return float((a * b).sum() / den) if den else 0.0

        def ranks(x):
            order = np.argsort(x, kind="mergesort")
            r, sx, i = np.empty(len(x)), x[order], 0
            while i < len(x):
                j = i
                while j + 1 < len(x) and sx[j + 1] == sx[i]:
                    j += 1
                r[order[i:j + 1]] = (i + j) / 2.0
                i = j + 1
            return r
        p, y = p.astype(np.float64), y.astype(np.float64)
        pr, sr = pearson(p, y), pearson(ranks(p), ranks(y))
        return {"pearson": pr, "spearman": sr, "score": (pr + sr) / 2}
    out = {"accuracy": float((p == y).mean())}
    tp = float(((p == 1) & (y == 1)).sum())
    fp, fn = float(((p == 1) & (y != 1)).sum()), float(((p != 1) & (y == 1)).sum())
    if task.metric == "accuracy_f1":
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        out["score"] = (out["accuracy"] + out["f1"]) / 2
    elif task.metric == "mcc":
        tn = float(((p == 0) & (y == 0)).sum())
        den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        out["mcc"] = (tp * tn - fp * fn) / den if den else 0.0
        out["score"] = out["mcc"]
    else:
        out["score"] = out["accuracy"]
    return out


@pytest.mark.parametrize("task_name, folder", [("cola", "CoLA"), ("mrpc", "MRPC"),
                                               ("rte", "RTE"), ("sst2", "SST-2")])
def test_library_metrics_equal_the_previous_ones_on_real_dev_sets(task_name, folder):
    """scikit-learn's accuracy / F1 / Matthews correlation equal the previous hand-written ones
    on each real dev set's labels, for predictions of several qualities (a student's: the labels
    with 10-40% flipped; a constant one; the labels themselves), and SciPy's Pearson/Spearman
    on regression scores with ties (STS-B has no dev set here)."""
    path = os.path.join(GLUE, folder)
    if not os.path.isdir(path):
        pytest.skip(f"{folder} not found at {path}")
    task = data.get_task(task_name)
    y = np.array([e.label for e in data.load_examples(task, "dev", path)])
    rng = np.random.default_rng(0)
    cases = [np.where(rng.random(len(y)) < q, 1 - y, y) for q in (0.1, 0.25, 0.4)]
    cases += [np.zeros_like(y), np.ones_like(y), y.copy()]
    for p in cases:
        new, old = data.compute_metrics(task, p, y), _metrics_as_before(task, p, y)
        assert new.keys() == old.keys()
        for k in new:
            assert new[k] == pytest.approx(old[k], abs=1e-12), (k, new[k], old[k])
    stsb = data.get_task("stsb")
    scores = np.round(rng.normal(2.5, 1.2, 1500).clip(0, 5) * 5) / 5  # many ties, as STS-B
    for pred in (scores + rng.normal(0, s, len(scores)) for s in (0.3, 1.0, 3.0)):
        pred = np.round(pred, 1)
        new, old = data.compute_metrics(stsb, pred, scores), _metrics_as_before(stsb, pred, scores)
        for k in new:
            assert new[k] == pytest.approx(old[k], abs=1e-9), k
    assert data.compute_metrics(stsb, np.full(10, 2.0), scores[:10])["pearson"] == 0.0


def _hub_layout_copy(root, tasks):
    """A local folder laid out like the hub's nyu-mll/glue repository (README.md configs and
    <task>/<split>-00000-of-00001.parquet), made from the GLUE TSV files with the hub's columns
    and label ids (RTE: 0 entailment, 1 not_entailment)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    configs = []
    for name, cols, label_of in tasks:
        t = data.get_task(name)
        lines = [f"- config_name: {name}", "  data_files:"]
        for split, hf_split in (("train", "train"), ("dev", "validation")):
            with open(os.path.join(GLUE, t.glue_dir, f"{split}.tsv"), encoding="utf-8-sig") as f:
                header, *rows = [line.rstrip("\n").split("\t") for line in f]
            table = {c: [r[header.index(src)] for r in rows] for c, src in cols.items()}
            table["label"] = [label_of(r[header.index("label")]) for r in rows]
            table["idx"] = list(range(len(rows)))
            (root / name).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(table), root / name / f"{hf_split}-00000-of-00001.parquet")
            lines += [f"  - split: {hf_split}", f"    path: {name}/{hf_split}-*.parquet"]
        configs += lines
    (root / "README.md").write_text("---\nconfigs:\n" + "\n".join(configs) + "\n---\n")


@needs_glue
def test_task_names_load_through_datasets_like_the_tsv_files(tmp_path, monkeypatch):
    """Without data_dir, a split comes from `datasets` (GLUE_DATASET = "nyu-mll/glue"; the hub
    no longer resolves "glue"): here from a local copy in that repository's layout, named by
    TINYBERT_FAST_GLUE_DATASET, which must give the TSV files' examples and labels."""
    pytest.importorskip("datasets")
    assert data.GLUE_DATASET == "nyu-mll/glue"
    _hub_layout_copy(tmp_path / "glue", [
        ("sst2", {"sentence": "sentence"}, int),
        ("rte", {"sentence1": "sentence1", "sentence2": "sentence2"},
         ("entailment", "not_entailment").index)])
    monkeypatch.setenv("TINYBERT_FAST_GLUE_DATASET", str(tmp_path / "glue"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    for name in ("sst2", "rte"):
        t = data.get_task(name)
        for split in ("train", "dev"):
            via_hub = data.load_examples(t, split)
            via_tsv = data.load_examples(t, split, os.path.join(GLUE, t.glue_dir))
            assert via_hub == via_tsv and len(via_hub) == COUNTS[(name, split)]
    monkeypatch.setenv("TINYBERT_FAST_GLUE_DATASET", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="could not load.*--data-dir"):
        data.load_examples(data.get_task("sst2"), "dev")


def test_one_task_name_normalisation_for_training_and_augmentation():
    from tinybert_fast import glue
    from tinybert_fast.augment import detect_layout
    for spelling in ("SST-2", "sst_2", "Sst 2", "sst2"):
        assert glue.task_key(spelling) == "sst2"
        assert data.get_task(spelling).name == "sst2"
        assert detect_layout("sentence\tlabel", "x.tsv", task=spelling).text_columns == (0,)
    assert data.get_task is glue.get_task and data.read_tsv is glue.read_tsv


def test_training_and_augmentation_read_a_file_alike(tmp_path):
    """data.read_tsv and the augment reader are the same reader: same layout, same rows."""
    from tinybert_fast import glue
    src = tmp_path / "train.tsv"
    src.write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                   "1\t1\t2\tA \"quoted\" one.\tB\r\n\n0\t3\t4\tC\tD\n", encoding="utf-8")
    table = data.read_tsv(str(src), data.get_task("mrpc"))
    with glue.TsvReader(str(src), "mrpc") as reader:
        layout, rows = reader.layout, [fields for _, fields in reader]
    assert table.bom and layout.bom and table.text_idx == layout.text_columns == (3, 4)
    assert table.label_idx == layout.label_column == 0
    assert table.rows == rows == [["1", "1", "2", 'A "quoted" one.', "B"],
                                  ["0", "3", "4", "C", "D"]]
    assert [e.texts for e in data.table_examples(table, data.get_task("mrpc"), str(src))] == \
        [('A "quoted" one.', "B"), ("C", "D")]


def test_write_tsv_is_atomic_and_refuses_unwritable_fields(tmp_path):
    t = data.get_task("sst2")
    out = tmp_path / "out.tsv"
    out.write_text("old\n", encoding="utf-8")
    bad = data.TsvTable(["sentence", "label"], [["a\tb", "1"]], (0,), 1)
    with pytest.raises(ValueError, match="tab or a line break"):
        data.write_tsv(str(out), bad)
    assert out.read_text(encoding="utf-8") == "old\n" and os.listdir(tmp_path) == ["out.tsv"]
    good = data.TsvTable(["sentence", "label"], [['say "hi"', "1"]], (0,), 1)
    data.write_tsv(str(out), good)
    assert data.read_tsv(str(out), t).rows == [['say "hi"', "1"]]
    assert os.listdir(tmp_path) == ["out.tsv"]


def test_length_grouped_batches_pad_less_and_are_a_seeded_partition():
    n, bs = 1000, 32
    lengths = [(i * 37) % 120 + 1 for i in range(n)]
    grouped = data.batch_indices(n, bs, epoch=2, seed=5, lengths=lengths)
    plain = data.batch_indices(n, bs, epoch=2, seed=5)
    assert sorted(sum(grouped, [])) == list(range(n))          # every example once
    assert len(grouped) == len(plain)                          # the same number of steps
    assert grouped == data.batch_indices(n, bs, epoch=2, seed=5, lengths=lengths)  # resumable
    assert grouped != data.batch_indices(n, bs, epoch=3, seed=5, lengths=lengths)

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)
    # random batches pad nearly every example to ~120; grouped ones to within a window's spread
    assert padded(grouped) < 0.6 * padded(plain)
    assert padded(grouped) >= sum(lengths)
    # ranks still split each global batch
    ranks = [data.batch_indices(n, bs, 2, 5, rank=r, world_size=2, lengths=lengths)
             for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*ranks)] == [sorted(g) for g in grouped]
    with pytest.raises(ValueError, match="lengths"):
        data.batch_indices(n, bs, 0, 0, lengths=lengths[:-1])


def test_predictions_come_back_in_example_order_whatever_the_batching():
    import torch
    from tinybert_fast import train

    class Echo(torch.nn.Module):  # predicts class (first token id) % 2: order is checkable
        config = type("C", (), {"type_vocab_size": 0})()

        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(input_ids.shape[0], 2)
            logits[torch.arange(input_ids.shape[0]), input_ids[:, 0] % 2] = 1.0
            return type("O", (), {"logits": logits})()

    class Tok:
        def __call__(self, texts, truncation, max_length):
            return {"input_ids": [[int(t)] * (1 + int(t) % 7) for t in texts]}

    examples = [data.Example((str(i),), i % 2) for i in range(23)]
    ds = data.TokenizedDataset(examples, Tok(), 16)
    preds = train.predict(Echo(), ds, data.get_task("sst2"), 4, torch.device("cpu"), 0)
    assert preds.tolist() == [i % 2 for i in range(23)]
