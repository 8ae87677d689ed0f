"""Teacher-activation cache (tinybert_fast.cache + the csrc/ extension), CPU path.

Round trips (exact for fp32/bf16/fp16, within the documented bound for 8-bit), ragged lengths 1 to
512, fingerprints, a build killed with SIGKILL and resumed (files identical to an uninterrupted
build), corruption (flipped bytes, truncated and missing files), concurrent readers in two
processes, shards, prefetching and argument checks.  The CUDA path (gather into pinned memory,
copy on a side stream, unpack kernel) is checked against the CPU path when a GPU is present.

Without the C++ extension every test here is skipped, unless TBF_REQUIRE_EXTENSION=1 (CI), where
its absence is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tinybert_fast import cache as C

from conftest import require_cache_extension  # noqa: E402

require_cache_extension()

ON_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not (ON_CUDA and C.HAS_CUDA_KERNELS),
                               reason="needs a CUDA device and the CUDA kernels")

FLOAT_STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Unit roundoff of each output dtype (round to nearest): the extra error of dequantising to it.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


class Shape:
    """One cache layout: B examples of lengths `lengths`, padded to Lp."""

    def __init__(self, lengths, H, d, n_att, n_hid, C_, Lp=None):
        self.lengths = torch.tensor(lengths, dtype=torch.int64)
        self.B, self.H, self.d, self.n_att, self.n_hid, self.C = (len(lengths), H, d, n_att,
                                                                  n_hid, C_)
        self.Lp = Lp or int(max(lengths))

    def __repr__(self):
        return (f"B={self.B} H={self.H} d={self.d} att={self.n_att} hid={self.n_hid} "
                f"C={self.C} Lp={self.Lp}")


SHAPES = [
    Shape([1, 37, 5, 36, 2, 19, 37], H=5, d=37, n_att=2, n_hid=3, C_=3),          # odd sizes
    Shape([13, 64, 9, 30, 64, 1, 22, 40], H=12, d=48, n_att=3, n_hid=4, C_=2, Lp=64),  # SST-2-like
    Shape([4, 7, 1], H=2, d=8, n_att=0, n_hid=2, C_=0),                               # no scores
    Shape([3, 8], H=3, d=5, n_att=1, n_hid=0, C_=1271),                               # big C
]


def teacher_outputs(shape: Shape, dtype=torch.float32, seed=0, spread=False):
    """Random padded teacher outputs like a real batch: pre-softmax scores carry the dtype
    minimum on padded keys.  spread=True: rows of very different magnitudes (8-bit tests)."""
    g = torch.Generator().manual_seed(seed)
    B, Lp = shape.B, shape.Lp

    def draw(*size):
        x = torch.randn(*size, generator=g)
        if spread:
            x = x * torch.exp(torch.empty(*size[:-1], 1).uniform_(-5, 5, generator=g))
        return x

    att = draw(shape.n_att, B, shape.H, Lp, Lp) * 4
    key_pad = torch.arange(Lp)[None, :] >= shape.lengths[:, None]               # [B, Lp]
    att = att.masked_fill(key_pad[None, :, None, None, :], torch.finfo(torch.float32).min)
    hid = draw(shape.n_hid, B, Lp, shape.d)
    logits = draw(B, shape.C) if shape.C else None
    cast = (lambda t: None if t is None else t.to(dtype))
    return (cast(logits), cast(hid) if shape.n_hid else None,
            cast(att) if shape.n_att else None)


def write_cache(path, shape: Shape, dtype: str, outputs, ids=None, chunk_examples=3, **kw):
    ids = torch.arange(shape.B) * 7 + 1000 if ids is None else torch.as_tensor(ids)
    logits, hid, att = outputs
    w = C.CacheWriter(path, dtype, chunk_examples=chunk_examples, fsync=False, **kw)
    # two appends, to cross a chunk boundary inside the data
    half = max(1, shape.B // 2)
    for sl in (slice(0, half), slice(half, shape.B)):
        if sl.start >= shape.B:
            continue
        w.append(ids[sl], shape.lengths[sl],
                 None if logits is None else logits[sl],
                 None if hid is None else hid[:, sl],
                 None if att is None else att[:, sl])
    assert w.close()
    return ids


def expected(shape: Shape, outputs, b: int, P: int, dtype: torch.dtype):
    """Example b's outputs as fetch must return them at padded length P (zeros padded)."""
    logits, hid, att = outputs
    L = int(shape.lengths[b])
    a = h = lg = None
    if att is not None:
        a = torch.zeros(shape.n_att, shape.H, P, P, dtype=dtype)
        a[:, :, :L, :L] = att[:, b, :, :L, :L].to(dtype)
    if hid is not None:
        h = torch.zeros(shape.n_hid, P, shape.d, dtype=dtype)
        h[:, :L] = hid[:, b, :L].to(dtype)
    if logits is not None:
        lg = logits[b].to(dtype)
    return a, h, lg


def check_batch(t: C.TeacherBatch, shape: Shape, outputs, order, P, dtype):
    B = len(order)
    assert t.attention_mask.shape == (B, P) and t.attention_mask.dtype == torch.int64
    for k, b in enumerate(order):
        L = int(shape.lengths[b])
        assert t.attention_mask[k].tolist() == [1] * L + [0] * (P - L)
        a, h, lg = expected(shape, outputs, b, P, dtype)
        if a is None:
            assert t.attention is None
        else:
            assert t.attention.shape == (shape.n_att, B, shape.H, P, P)
            assert t.attention.dtype == dtype
            assert torch.equal(t.attention[:, k], a), f"attention of example {b}"
        if h is None:
            assert t.hidden is None
        else:
            assert t.hidden.shape == (shape.n_hid, B, P, shape.d)
            assert torch.equal(t.hidden[:, k], h), f"hidden of example {b}"
        if lg is None:
            assert t.logits is None
        else:
            assert torch.equal(t.logits[k], lg), f"logits of example {b}"


# ------------------------------------------------------------------------------------------------
# CRC32C

def crc32c_reference(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def test_crc32c_known_values():
    assert C.crc32c(b"123456789") == 0xE3069283
    assert C.crc32c(bytes(32)) == 0x8A9136AA                 # RFC 3720 B.4
    assert C.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert C.crc32c(bytes(range(32))) == 0x46DD794E
    assert C.crc32c(b"") == 0


def test_crc32c_unaligned_and_incremental():
    rng = np.random.default_rng(0)
    buf = rng.integers(0, 256, 300, dtype=np.uint8)
    t = torch.from_numpy(buf)
    for start, end in [(0, 300), (1, 300), (3, 17), (5, 6), (7, 299), (8, 8)]:
        want = crc32c_reference(buf[start:end].tobytes())
        assert C.crc32c(t[start:end]) == want, (start, end)
        mid = (start + end) // 2
        assert C.crc32c(t[mid:end], C.crc32c(t[start:mid])) == want


# ------------------------------------------------------------------------------------------------
# Round trips

@pytest.mark.parametrize("shape", SHAPES, ids=repr)
@pytest.mark.parametrize("dtype", list(FLOAT_STORAGE))
@pytest.mark.parametrize("input_dtype", ["storage", "fp32"])
def test_round_trip_exact(tmp_path, shape, dtype, input_dtype):
    """Stored values come back bit for bit: x itself when x is in the storage dtype, else
    x.to(storage dtype); padded entries are 0; any order, any pad length."""
    store = FLOAT_STORAGE[dtype]
    outputs = teacher_outputs(shape, store if input_dtype == "storage" else torch.float32)
    ids = write_cache(tmp_path / "c", shape, dtype, outputs)
    cache = C.TeacherCache.open(tmp_path / "c", verify=True)
    assert len(cache) == shape.B and cache.layout.dtype == dtype
    order = list(np.random.default_rng(1).permutation(shape.B))
    t = cache.fetch(ids[order])
    assert t.example_ids.tolist() == ids[order].tolist()
    check_batch(t, shape, outputs, order, int(shape.lengths.max()), store)
    t = cache.fetch(ids[order[:2]].tolist(), pad_to=shape.Lp + 3)
    check_batch(t, shape, outputs, order[:2], shape.Lp + 3, store)
    for b in range(shape.B):  # one at a time: padded to its own length
        t = cache.fetch([int(ids[b])], num_threads=1)
        check_batch(t, shape, outputs, [b], int(shape.lengths[b]), store)


def test_ragged_lengths_1_to_512(tmp_path):
    lengths = [1, 2, 3, 17, 64, 127, 128, 129, 255, 256, 300, 511, 512]
    shape = Shape(lengths, H=2, d=8, n_att=1, n_hid=2, C_=2, Lp=512)
    outputs = teacher_outputs(shape, torch.bfloat16)
    ids = write_cache(tmp_path / "c", shape, "bf16", outputs, chunk_examples=4)
    cache = C.TeacherCache.open(tmp_path / "c")
    assert cache.lengths(ids).tolist() == lengths
    order = list(range(shape.B))[::-1]
    check_batch(cache.fetch(ids[order]), shape, outputs, order, 512, torch.bfloat16)
    for b in (0, 4, 11, 12):
        check_batch(cache.fetch(ids[b:b + 1]), shape, outputs, [b], lengths[b], torch.bfloat16)
    # unpadded storage: the data is the sum of the per-example sizes, not B x 512
    rec = cache.layout.record_bytes(lengths)
    assert cache.nbytes == C.DATA_HEADER_BYTES + int(rec.sum())
    assert cache.nbytes < 0.5 * shape.B * cache.layout.padded_bytes(512)


def int8_bound(x: torch.Tensor, got: torch.Tensor, out_dtype) -> torch.Tensor:
    """The documented bound per element: max|row| (1/254 + 2^-22) + u(out_dtype) |got|."""
    amax = x.abs().amax(dim=-1, keepdim=True).double()
    return amax * (1 / 254 + 2.0 ** -22) + UNIT_ROUNDOFF[out_dtype] * got.double().abs()


@pytest.mark.parametrize("shape", SHAPES[:2], ids=repr)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_int8_within_documented_bound(tmp_path, shape, out_dtype):
    outputs = teacher_outputs(shape, torch.float32, spread=True)
    logits, hid, att = outputs
    hid[0, 1, 0] = 0.0                     # an all-zero row (example 1 has >= 2 tokens)
    hid[0, 1, 1] = 0.0
    hid[0, 1, 1, 3] = -2.5                 # a row with one non-zero value
    ids = write_cache(tmp_path / "c", shape, "int8", outputs)
    cache = C.TeacherCache.open(tmp_path / "c")
    t = cache.fetch(ids, out_dtype=out_dtype)
    assert t.hidden.dtype == out_dtype
    assert C.INT8_BOUND == 1 / 254
    worst = 0.0
    for b in range(shape.B):
        L = int(shape.lengths[b])
        pairs = [(hid[:, b, :L], t.hidden[:, b, :L])]
        if att is not None:
            pairs.append((att[:, b, :, :L, :L], t.attention[:, b, :, :L, :L]))
        if logits is not None:
            pairs.append((logits[b], t.logits[b]))
        for x, got in pairs:
            err = (got.double() - x.double()).abs()
            bound = int8_bound(x, got, out_dtype)
            assert (err <= bound).all(), f"example {b}: error {err.max():.3e} above the bound"
            worst = max(worst, float((err / bound.clamp_min(1e-30)).max()))
        assert (t.hidden[:, b, L:] == 0).all() and (t.attention_mask[b, L:] == 0).all()
        if att is not None:
            assert (t.attention[:, b, :, L:] == 0).all()
            assert (t.attention[:, b, :, :, L:] == 0).all()
    assert worst > 0.5  # the bound is tight enough to mean something
    assert torch.equal(t.hidden[0, 1, 0], torch.zeros(shape.d, dtype=out_dtype))
    assert t.hidden[0, 1, 1, 3].item() == -2.5  # max|row| is stored exactly


def test_int8_default_out_dtype_and_size(tmp_path):
    shape = SHAPES[1]
    outputs = teacher_outputs(shape, torch.float32)
    write_cache(tmp_path / "q", shape, "int8", outputs)
    write_cache(tmp_path / "h", shape, "bf16", outputs)
    q, h = C.TeacherCache.open(tmp_path / "q"), C.TeacherCache.open(tmp_path / "h")
    assert q.fetch(q.example_ids).attention.dtype == torch.bfloat16
    assert q.nbytes < 0.75 * h.nbytes


# ------------------------------------------------------------------------------------------------
# Argument checks

def test_fetch_argument_errors(tmp_path):
    shape = SHAPES[0]
    ids = write_cache(tmp_path / "c", shape, "bf16", teacher_outputs(shape))
    cache = C.TeacherCache.open(tmp_path / "c")
    with pytest.raises(KeyError, match="not in the cache.*12345"):
        cache.fetch([int(ids[0]), 12345])
    with pytest.raises(ValueError, match="pad_to=5 is shorter than the longest example"):
        cache.fetch(ids, pad_to=5)
    with pytest.raises(TypeError, match="out_dtype"):
        cache.fetch(ids, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="empty"):
        cache.fetch([])
    assert int(ids[0]) in cache and 12345 not in cache


def test_writer_argument_errors(tmp_path):
    shape = SHAPES[0]
    logits, hid, att = teacher_outputs(shape)
    ids, L = torch.arange(shape.B), shape.lengths
    w = C.CacheWriter(tmp_path / "c", "fp16", fsync=False)
    with pytest.raises(ValueError, match="lengths has 2 entries"):
        w.append(ids, L[:2], logits, hid, att)
    with pytest.raises(ValueError, match=r"hidden: expected \[n_hid, B=7"):
        w.append(ids, L, logits, hid[:, :3], att)
    with pytest.raises(ValueError, match="lengths must be in"):
        w.append(ids, L + 1, logits, hid, att)
    with pytest.raises(ValueError, match="repeated within one batch"):
        w.append(torch.zeros(shape.B, dtype=torch.long), L, logits, hid, att)
    bad = hid.clone()
    bad[1, 3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="hidden of example 3 has non-finite"):
        w.append(ids, L, logits, bad, att)
    huge = hid.clone()
    huge[0, 2, 0, 0] = 1e6  # overflows fp16
    with pytest.raises(ValueError, match="hidden of example 2 has non-finite"):
        w.append(ids, L, logits, huge, att)
    w.append(ids, L, logits, hid, att)
    with pytest.raises(ValueError, match="appended twice"):
        w.append(ids[:1], L[:1], logits[:1], hid[:, :1], att[:, :1])
    with pytest.raises(ValueError, match="differs from the cache's"):
        w.append(ids + 100, L, None, hid, att)
    assert w.close()
    with pytest.raises(ValueError, match="dtype must be one of"):
        C.CacheWriter(tmp_path / "d", "fp8")
    with pytest.raises(C.CacheError, match="already holds a complete cache"):
        C.CacheWriter(tmp_path / "c", "fp16")


def test_op_argument_checks_name_the_argument():
    ops = torch.ops.tinybert_fast_cache
    lengths = torch.tensor([2, 3])
    with pytest.raises(ValueError, match="layout: expected 8 integers"):
        ops.record_bytes(lengths, [1, 2, 3])
    with pytest.raises(ValueError, match="lengths\\[1\\]: expected >= 1"):
        ops.record_bytes(torch.tensor([2, 0]), [0, 1, 4, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="qk_min_length >= 1"):
        ops.record_bytes(lengths, [0, 0, 0, 1, 2, 0, 4, 0])
    with pytest.raises(TypeError, match="hidden: expected Float"):
        ops.pack(lengths, None, torch.zeros(1, 2, 3, 4, dtype=torch.float64), None, None,
                 [0, 1, 4, 0, 0, 3, 0, 0], 1)
    # Q/K layout (d_h 4, from length 3 on): example 1 (L=3) stores Q and K, example 0 scores
    qk_layout = [0, 0, 0, 1, 2, 0, 4, 3]
    with pytest.raises(ValueError, match="qk: required .*examples of the batch store Q and K"):
        ops.pack(lengths, None, None, torch.zeros(1, 1, 2, 3, 3), None, qk_layout, 1)
    with pytest.raises(ValueError, match=r"attention: expected \[1, 1 \(the examples that store "
                                         r"scores\)"):
        ops.pack(lengths, None, None, torch.zeros(1, 2, 2, 3, 3), torch.zeros(2, 1, 1, 2, 3, 4),
                 qk_layout, 1)
    src = [torch.zeros(64, dtype=torch.uint8)]
    with pytest.raises(IndexError, match="offsets\\[0\\]: record .* runs past the end"):
        ops.unpack(src, torch.zeros(1, dtype=torch.long), torch.tensor([48]), torch.tensor([2]),
                   None, [0, 1, 4, 0, 0, 3, 0, 0], 2, torch.float32, 1)
    with pytest.raises(TypeError, match="out_dtype: records stored as"):
        ops.unpack(src, torch.zeros(1, dtype=torch.long), torch.tensor([0]), torch.tensor([2]),
                   None, [0, 1, 4, 0, 0, 1, 0, 0], 2, torch.float32, 1)
    with pytest.raises(ValueError, match="qk_examples: expected the 0 batch positions"):
        ops.unpack(src, torch.zeros(1, dtype=torch.long), torch.tensor([0]), torch.tensor([2]),
                   None, [0, 0, 0, 1, 1, 0, 2, 3], 2, torch.float32, 1, None, torch.tensor([0]))


# ------------------------------------------------------------------------------------------------
# The layout's field order; fake kernels (torch.library.opcheck)

def test_layout_field_order_is_the_extensions():
    ops = torch.ops.tinybert_fast_cache
    assert tuple(ops.layout_fields().split(", ")) == C.LAYOUT_FIELDS
    lay = C.CacheLayout("int8", 3, 2, 4, 1, 5, 8, 17)
    assert lay.ints() == [3, 2, 4, 1, 5, 3, 8, 17]
    assert C.CacheLayout.from_ints(lay.ints()) == lay
    with pytest.raises(ValueError, match="layout: expected 8 integers \\[num_logits, "
                                         "num_hidden,"):
        ops.record_bytes(torch.tensor([2]), [1, 2, 3])


# (storage, layout): scores only; "auto" Q/K from length 3 on (examples of 3 and 5 tokens store
# Q and K, that of 2 its scores); no attention.
OPCHECK_LAYOUTS = [("fp32", C.CacheLayout("fp32", 3, 2, 4, 1, 2)),
                   ("bf16", C.CacheLayout("bf16", 3, 2, 4, 1, 2, 4, 3)),
                   ("int8", C.CacheLayout("int8", 0, 2, 4, 0, 0))]


def opcheck_inputs(layout: C.CacheLayout, Lp=5, seed=0):
    """(lengths, pack's tensors) for 3 examples of 2, 5 and 3 tokens padded to Lp."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([2, 5, 3])
    on_qk = torch.as_tensor(layout.stores_qk(lengths.numpy()))
    dtype = torch.float32 if layout.dtype == "int8" else FLOAT_STORAGE[layout.dtype]
    draw = (lambda *size: torch.randn(*size, generator=g).to(dtype))  # noqa: E731
    n_att, H = layout.num_attention, layout.num_heads
    logits = draw(3, layout.num_logits) if layout.num_logits else None
    hidden = draw(layout.num_hidden, 3, Lp, layout.hidden_size) if layout.num_hidden else None
    att = draw(n_att, int((~on_qk).sum()), H, Lp, Lp) if n_att and (~on_qk).any() else None
    qk = draw(2, n_att, int(on_qk.sum()), H, Lp, layout.qk_head_dim) if on_qk.any() else None
    return lengths, on_qk, (logits, hidden, att, qk)


@pytest.mark.parametrize("storage,layout", OPCHECK_LAYOUTS, ids=[s for s, _ in OPCHECK_LAYOUTS])
def test_opcheck(storage, layout):
    """Schema, fake kernel (shapes, dtypes, devices against the real kernel) and AOT dispatch
    of record_bytes, pack, gather and unpack (with and without the batch positions)."""
    ops = torch.ops.tinybert_fast_cache
    lengths, on_qk, tensors = opcheck_inputs(layout)
    ints, B = layout.ints(), lengths.numel()
    torch.library.opcheck(ops.record_bytes, (lengths, ints))
    torch.library.opcheck(ops.pack, (lengths, *tensors, ints, 2))
    records, offsets, crcs = ops.pack(lengths, *tensors, ints, 2)
    starts, nbytes = offsets[:-1].clone(), offsets[1:] - offsets[:-1]
    zeros = torch.zeros(B, dtype=torch.long)
    for want in (crcs, None):
        staging = torch.zeros(int(nbytes.sum()) + 16, dtype=torch.uint8)
        torch.library.opcheck(ops.gather, ([records], zeros, starts, nbytes, want, staging,
                                           starts, 2))
    out_dtype = torch.float16 if storage == "int8" else FLOAT_STORAGE[storage]
    positions = (torch.nonzero(~on_qk)[:, 0], torch.nonzero(on_qk)[:, 0])
    for want, given in ((crcs, positions), (None, positions), (crcs, ())):
        torch.library.opcheck(ops.unpack, ([records], zeros, starts, lengths, want, ints, 7,
                                           out_dtype, 2, *given))


# ------------------------------------------------------------------------------------------------
# Shards, prefetch

def test_shards_merge_and_incomplete_refused(tmp_path):
    shape = SHAPES[0]
    logits, hid, att = teacher_outputs(shape)
    path = tmp_path / "c"
    parts = [slice(0, 4), slice(4, 7)]
    writers = [C.CacheWriter(path, "fp32", shard=(r, 2), fsync=False) for r in range(2)]
    for w, sl in zip(writers, parts):
        w.append(torch.arange(shape.B)[sl], shape.lengths[sl], logits[sl], hid[:, sl],
                 att[:, sl])
    assert not writers[1].close()                         # shard 0 still open
    with pytest.raises(C.CacheIncompleteError, match="incomplete"):
        C.TeacherCache.open(path)
    assert writers[0].close()
    cache = C.TeacherCache.open(path)
    order = [6, 0, 5, 3]
    check_batch(cache.fetch(order), shape, (logits, hid, att), order, 37, torch.float32)
    assert cache.fingerprint["example_ids"]["count"] == 7
    # the same id in two shards is refused when the cache is finalised
    dup = tmp_path / "dup"
    for r in range(2):
        w = C.CacheWriter(dup, "fp32", shard=(r, 2), fsync=False)
        w.append([5, 6 + r], shape.lengths[:2], logits[:2], hid[:, :2], att[:, :2])
        if r == 0:
            assert not w.close()
        else:
            with pytest.raises(C.CacheError, match=r"more than one shard: \[5\]"):
                w.close()


def test_prefetch_matches_fetch_cpu(tmp_path):
    shape = SHAPES[1]
    outputs = teacher_outputs(shape, torch.bfloat16)
    ids = write_cache(tmp_path / "c", shape, "bf16", outputs)
    cache = C.TeacherCache.open(tmp_path / "c")
    batches = [ids[[0, 3, 5]], ids[[7]], ids[[1, 2, 4, 6]]]
    got = list(cache.prefetch(batches, depth=2))
    assert len(got) == 3
    for t, bt in zip(got, batches):
        want = cache.fetch(bt)
        for a, b in zip(t[:5], want[:5]):
            assert torch.equal(a, b)
    # a sampler of single ids with batch_size; stopping early does not hang
    it = cache.prefetch(iter(ids.tolist()), batch_size=3, depth=1)
    first = next(it)
    assert first.example_ids.tolist() == ids[:3].tolist()
    it.close()
    # an unknown id is raised at its batch, after the good ones
    it = cache.prefetch([ids[:2], [999999], ids[2:4]])
    next(it)
    with pytest.raises(KeyError, match="999999"):
        next(it)


def test_staged_gather_matches_fetch(tmp_path):
    """The host half of the CUDA path (gather into a staging buffer, records back to back plus
    metadata, as copied to the device), unpacked by the CPU kernel, equals fetch."""
    shape = SHAPES[0]
    for dtype in ("fp16", "int8"):
        ids = write_cache(tmp_path / dtype, shape, dtype, teacher_outputs(shape, spread=True))
        cache = C.TeacherCache.open(tmp_path / dtype)
        order = ids[[4, 0, 6, 1]]
        plan = cache._plan(order, None, None)
        host, meta_at, total = cache._gather(plan, C._Staging(), True, 2, pin=False)
        assert total == cache.stored_bytes(order) and meta_at % 16 == 0
        meta = host[meta_at:].view(torch.int64).view(4, len(order))
        assert meta[3].tolist() == list(range(len(order)))  # every example stores scores
        att, hid, lg, mask, bad, qk = torch.ops.tinybert_fast_cache.unpack(
            [host[:total]], meta[2], meta[0], meta[1], None, cache.layout.ints(), plan.P,
            plan.out_dtype, 2)
        assert qk.numel() == 0
        want = cache.fetch(order)
        for a, b in zip((att, hid, lg, mask), want[:4]):
            assert torch.equal(a, b)
        assert bad.numel() == 0


def test_pickle_reopens(tmp_path):
    import pickle
    shape = SHAPES[2]
    ids = write_cache(tmp_path / "c", shape, "bf16", teacher_outputs(shape))
    cache = C.TeacherCache.open(tmp_path / "c")
    other = pickle.loads(pickle.dumps(cache))
    a, b = cache.fetch(ids), other.fetch(ids)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.attention_mask, b.attention_mask)


# ------------------------------------------------------------------------------------------------
# Build from a real (tiny) BERT teacher; fingerprints

def tiny_teacher(head=True, seed=0):
    from transformers import BertConfig, BertForSequenceClassification, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=40, num_labels=2)
    return (BertForSequenceClassification(cfg) if head else BertModel(cfg)).eval()


def tiny_batches(n_batches=4, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n_batches):
        L = torch.randint(1, 30, (B,), generator=g)
        Lp = int(L.max()) + k % 2  # sometimes padded past the longest
        mask = (torch.arange(Lp)[None] < L[:, None]).long()
        ids = torch.randint(1, 60, (B, Lp), generator=g) * mask
        out.append({"input_ids": ids, "attention_mask": mask,
                    "token_type_ids": torch.zeros_like(ids), "labels": torch.zeros(B),
                    "example_id": torch.arange(B) + 100 * k})
    return out


@pytest.mark.parametrize("storage", ["scores", "auto", "qk"])
def test_build_stores_what_the_teacher_computes(tmp_path, storage):
    """The cache returns the teacher's own outputs: with attention_storage="scores" the scores it
    recorded, bit for bit; with "auto" / "qk" the teacher runs SDPA and records Q and K, and the
    scores come back as Q K^T / sqrt(d_h) (stored as scores below 2*d_h + 1 = 17 tokens under
    "auto", as Q and K from there on; the tiny batches have 1 to 29 tokens)."""
    from tinybert_fast import capture
    teacher = tiny_teacher()
    batches = tiny_batches()
    cache = C.TeacherCache.build(tmp_path / "c", teacher, batches, attention_layers=[0, 2],
                                 hidden_states=[0, 1, 3], dtype="fp32", chunk_examples=4,
                                 max_length=40, dataset="synthetic", fsync=False,
                                 attention_storage=storage)
    assert cache.fingerprint["fields"] == ["logits", "hidden", "attention"]
    assert cache.fingerprint["attention_storage"] == storage
    assert cache.layout.qk_min_length == {"scores": 0, "auto": 17, "qk": 1}[storage]
    assert teacher.config._attn_implementation != capture.ATTN_IMPLEMENTATION  # restored
    teacher.set_attn_implementation(capture.register())
    record = capture.record_scores if storage == "scores" else capture.record_qk
    kinds = set()
    for batch in batches:
        with torch.no_grad(), record([0, 2]) as rec:
            out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch["token_type_ids"], output_hidden_states=True)
        t = cache.fetch(batch["example_id"])
        for b, L in enumerate(batch["attention_mask"].sum(1).tolist()):
            kinds.add(bool(cache.layout.stores_qk([L])[0]))
            if storage == "scores":
                assert torch.equal(t.attention[:, b, :, :L, :L],
                                   torch.stack(rec.layers)[:, b, :, :L, :L])
            else:
                q = torch.stack([q for q, _ in rec.layers])[:, b, :, :L].double()
                k = torch.stack([k for _, k in rec.layers])[:, b, :, :L].double()
                want = q @ k.transpose(-1, -2) / 8 ** 0.5
                torch.testing.assert_close(t.attention[:, b, :, :L, :L].double(), want,
                                           atol=1e-6, rtol=1e-6)
            assert torch.equal(t.hidden[:, b, :L],
                               torch.stack([out.hidden_states[i] for i in (0, 1, 3)])[:, b, :L])
            assert torch.equal(t.logits[b], out.logits[b])
            if storage == "qk":
                tq = cache.fetch(batch["example_id"], attention_form="qk")
                assert tq.attention is None
                assert torch.equal(tq.query[:, b, :, :L], torch.stack(
                    [q for q, _ in rec.layers])[:, b, :, :L])
                assert torch.equal(tq.key[:, b, :, :L], torch.stack(
                    [k for _, k in rec.layers])[:, b, :, :L])
    assert kinds == {"scores": {False}, "auto": {False, True}, "qk": {True}}[storage]
    if storage != "scores":
        return
    # A model without a head stores no logits.
    c2 = C.TeacherCache.build(tmp_path / "nohead", tiny_teacher(head=False), batches,
                              attention_layers=[1], hidden_states=[3], fsync=False)
    assert c2.fingerprint["fields"] == ["hidden", "attention"] and c2.fetch([0]).logits is None
    # Left padding is refused, naming the example.
    bad = dict(batches[0])
    bad["attention_mask"] = batches[0]["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="attention_mask of example .* not right-padded"):
        C.TeacherCache.build(tmp_path / "bad", teacher, [bad], attention_layers=[0],
                             hidden_states=[0], fsync=False)


def test_build_in_shards(tmp_path):
    """Each rank builds its shard from its own loader; the last to finish writes the manifest."""
    teacher = tiny_teacher()
    batches = tiny_batches(4)
    kw = dict(attention_layers=[1], hidden_states=[0, 2], dtype="fp32", fsync=False)
    path = tmp_path / "c"
    assert C.TeacherCache.build(path, teacher, batches[1::2], shard=(1, 2), **kw) is None
    with pytest.raises(C.CacheIncompleteError):
        C.TeacherCache.open(path)
    cache = C.TeacherCache.build(path, teacher, batches[0::2], shard=(0, 2), **kw)
    whole = C.TeacherCache.build(tmp_path / "whole", teacher, batches, **kw)
    ids = [int(i) for b in batches for i in b["example_id"]]
    assert sorted(ids) == cache.example_ids.tolist()
    for a, b in zip(cache.fetch(ids)[:4], whole.fetch(ids)[:4]):
        assert torch.equal(a, b)


def test_a_given_weights_hash_is_not_computed_again(tmp_path, monkeypatch):
    teacher = tiny_teacher()
    kw = dict(attention_layers=[0, 2], hidden_states=[0, 3], dtype="bf16", max_length=40)
    want = C.TeacherCache.make_fingerprint(teacher, **kw)
    from tinybert_fast.cache import fingerprint
    monkeypatch.setattr(fingerprint, "hash_state_dict",
                        lambda model: pytest.fail("the weights were hashed again"))
    given = dict(kw, teacher_weights=want["teacher_weights"])
    assert C.TeacherCache.make_fingerprint(teacher, **given) == want
    cache = C.TeacherCache.build(tmp_path / "c", teacher, tiny_batches(1), fsync=False, **given)
    assert cache.fingerprint["teacher_weights"] == want["teacher_weights"]
    C.TeacherCache.open(tmp_path / "c", expect_fingerprint=want)


def test_fingerprint_mismatch_refused(tmp_path):
    teacher = tiny_teacher()
    batches = tiny_batches(2)
    kw = dict(attention_layers=[0, 2], hidden_states=[0, 3], dtype="bf16", max_length=40,
              tokenizer="vocab-v1", dataset={"name": "synthetic", "md5": "abc"})
    path = tmp_path / "c"
    C.TeacherCache.build(path, teacher, batches, fsync=False, **kw)
    fp = C.TeacherCache.make_fingerprint(teacher, **kw)
    C.TeacherCache.open(path, expect_fingerprint=fp)                     # matches
    ids = [int(i) for b in batches for i in b["example_id"]]
    C.TeacherCache.open(path, expect_fingerprint=C.TeacherCache.make_fingerprint(
        teacher, example_ids=ids, **kw))

    changed = tiny_teacher()
    with torch.no_grad():
        changed.bert.encoder.layer[1].output.dense.weight[0, 0] += 1e-3
    cases = {
        "teacher_weights": (changed, {}),
        "teacher_config.num_hidden_layers": (None, {}),
        "attention_layers": (teacher, {"attention_layers": [0, 1]}),
        "hidden_states": (teacher, {"hidden_states": [0, 2]}),
        "dtype": (teacher, {"dtype": "fp16"}),
        "max_length": (teacher, {"max_length": 128}),
        "tokenizer": (teacher, {"tokenizer": "vocab-v2"}),
        "dataset.md5": (teacher, {"dataset": {"name": "synthetic", "md5": "abd"}}),
        "example_ids.count": (teacher, {"example_ids": ids[:-1]}),
    }
    from transformers import BertConfig, BertForSequenceClassification
    deeper = BertForSequenceClassification(BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=40, num_labels=2)).eval()
    for key, (t, change) in cases.items():
        want = C.TeacherCache.make_fingerprint(t if t is not None else deeper, **{**kw, **change})
        with pytest.raises(C.CacheMismatchError, match=rf"{key}: cache has") as info:
            C.TeacherCache.open(path, expect_fingerprint=want)
        assert str(path) in str(info.value)
    # build on a complete cache: the same fingerprint opens it without running the teacher ...
    C.TeacherCache.build(path, teacher, iter(()), fsync=False, **kw)
    # ... a different one is refused, saying what differs
    with pytest.raises(C.CacheMismatchError, match="teacher_weights: cache has.*overwrite=True"):
        C.TeacherCache.build(path, changed, batches, fsync=False, **kw)
    c = C.TeacherCache.build(path, changed, batches, overwrite=True, fsync=False, **kw)
    assert c.fingerprint["teacher_weights"] == C.hash_state_dict(changed)
    # an interrupted build of something else is refused too
    partial = tmp_path / "p"
    C.CacheWriter(partial, "bf16", fingerprint={"teacher": "A"}, fsync=False)
    with pytest.raises(C.CacheMismatchError, match="fingerprint.teacher: cache has"):
        C.CacheWriter(partial, "bf16", fingerprint={"teacher": "B"}, fsync=False)


# ------------------------------------------------------------------------------------------------
# Crash safety: SIGKILL at several points, resume, compare with an uninterrupted build

CHILD = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from transformers import BertConfig, BertForSequenceClassification
from tinybert_fast import cache as C

def teacher():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=40, num_labels=2)
    return BertForSequenceClassification(cfg).eval()

def batches(kill_before=None):
    g = torch.Generator().manual_seed(1)
    for k in range(8):                 # 8 batches of 3; chunk_examples=7: commits after 3, 6, 8
        if k == kill_before:
            os.kill(os.getpid(), signal.SIGKILL)
        L = torch.randint(1, 30, (3,), generator=g)
        mask = (torch.arange(int(L.max()))[None] < L[:, None]).long()
        ids = torch.randint(1, 60, mask.shape, generator=g) * mask
        yield {"input_ids": ids, "attention_mask": mask, "example_id": torch.arange(3) + 3 * k}

def build(path, **kw):
    t = teacher()
    calls = [0]
    t.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    C.TeacherCache.build(path, t, batches(**kw), attention_layers=[0, 2], hidden_states=[0, 1, 3],
                         dtype="bf16", chunk_examples=7, max_length=40, dataset="synthetic")
    return calls[0]

def killed_build(path, kind, *args):
    if kind == "kill-loader":
        build(path, kill_before=int(args[0]))
    else:
        name, nth, seen = args[0], int(args[1]), [0]
        def hook(point):
            if point == name:
                seen[0] += 1
                if seen[0] == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
        C._crash_point = hook
        build(path)

# This process imports once, then forks one child per scenario (nothing has started threads
# yet); each child builds until it SIGKILLs itself.  Then it resumes every partial cache and
# builds the uninterrupted reference.
scenarios = json.loads(sys.argv[1])
report = {"killed": {}, "open_error": {}, "calls": {}}
for path, args in scenarios.items():
    pid = os.fork()
    if pid == 0:
        try:
            killed_build(path, *args)
        finally:
            os._exit(3)  # not killed
    _, status = os.waitpid(pid, 0)
    report["killed"][path] = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
for path in scenarios:
    try:
        C.TeacherCache.open(path)
        report["open_error"][path] = None
    except Exception as exc:
        report["open_error"][path] = type(exc).__name__
for path in [sys.argv[2], *scenarios]:
    report["calls"][path] = build(path)
print(json.dumps(report))
"""

KILLS = {
    "before any batch": ["kill-loader", "0"],
    "uncommitted data after a commit": ["kill-loader", "4"],
    "torn journal entry": ["kill-at", "journal_torn", "2"],
    "all committed, no index": ["kill-at", "before_index", "1"],
    "index written, no manifest": ["kill-at", "after_index", "1"],
}


def cache_files(path) -> dict:
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


def test_killed_build_resumes_identical(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    paths = {name: str(tmp_path / f"k{i}") for i, name in enumerate(KILLS)}
    ref = str(tmp_path / "ref")
    run = subprocess.run([sys.executable, str(script),
                          json.dumps({paths[n]: args for n, args in KILLS.items()}), ref],
                         capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr.decode()
    report = json.loads(run.stdout.decode().strip().splitlines()[-1])
    for name, path in paths.items():
        assert report["killed"][path], f"{name}: the build was not killed"
        # never a cache that opens as complete
        assert report["open_error"][path] == "CacheIncompleteError", name
    want = cache_files(ref)
    assert set(want) == {"build.json", "cache.json", "shard-00000-of-00001.data",
                         "shard-00000-of-00001.index"}
    for name, path in paths.items():
        got = cache_files(path)
        assert sorted(got) == sorted(want), name
        for f in want:
            assert got[f] == want[f], f"{name}: {f} differs from the uninterrupted build"
    # resuming recomputed only what was not committed (1 probe forward + one per batch)
    calls = report["calls"]
    assert calls[ref] == 9
    assert calls[paths["before any batch"]] == 9
    assert calls[paths["uncommitted data after a commit"]] == 1 + 5
    assert calls[paths["torn journal entry"]] == 1 + 5
    assert calls[paths["all committed, no index"]] == 1
    assert calls[paths["index written, no manifest"]] == 1
    cache = C.TeacherCache.open(ref, verify=True)
    assert len(cache) == 24


# ------------------------------------------------------------------------------------------------
# Corruption

def flip(path, pos):
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x10]))


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.fixture
def small_cache(tmp_path):
    shape = SHAPES[0]
    path = tmp_path / "clean"
    ids = write_cache(path, shape, "int8", teacher_outputs(shape), chunk_examples=2)
    return str(path), ids


def damaged(small_cache, tmp_path, name="bad"):
    src, ids = small_cache
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst, ids


DATA = "shard-00000-of-00001.data"
INDEX = "shard-00000-of-00001.index"


def test_flipped_data_byte_detected_on_fetch(small_cache, tmp_path):
    clean = C.TeacherCache.open(small_cache[0])
    size = clean.nbytes
    rng = np.random.default_rng(0)
    offs = clean._offs
    for k, pos in enumerate(sorted(rng.integers(C.DATA_HEADER_BYTES, size, 12).tolist())
                            + [size - 1]):
        path, ids = damaged(small_cache, tmp_path, f"bad{k}")
        flip(os.path.join(path, DATA), pos)
        cache = C.TeacherCache.open(path)  # sizes and headers are fine
        victim = int(clean._ids[np.searchsorted(offs, pos, side="right") - 1])
        with pytest.raises(C.CacheCorruptionError,
                           match=rf"{DATA}: checksum mismatch in the record of example {victim}"):
            cache.fetch(ids)
        others = [int(i) for i in ids if int(i) != victim]
        cache.fetch(others)  # the undamaged records still read
        with pytest.raises(C.CacheCorruptionError, match=f"example {victim}"):
            cache.verify()
        it = cache.prefetch([others, [victim]])
        next(it)
        with pytest.raises(C.CacheCorruptionError, match=f"example {victim}"):
            next(it)


@pytest.mark.parametrize("damage", ["data header", "data truncated by 1", "data truncated by half",
                                    "data missing", "index byte", "index truncated",
                                    "index missing", "manifest value"])
def test_damaged_files_detected_on_open(small_cache, tmp_path, damage):
    path, ids = damaged(small_cache, tmp_path)
    data, index = os.path.join(path, DATA), os.path.join(path, INDEX)
    size = os.path.getsize(data)
    match = {
        "data header": (lambda: flip(data, 20), f"{DATA}: header does not match"),
        "data truncated by 1": (lambda: truncate(data, size - 1),
                                rf"{DATA}: {size - 1} bytes, expected {size}: the file is "
                                rf"truncated: examples from {int(ids[-1])} on \(1 examples\)"),
        "data truncated by half": (lambda: truncate(data, size // 2), f"{DATA}: .* truncated"),
        "data missing": (lambda: os.remove(data), f"{DATA}: missing data file"),
        "index byte": (lambda: flip(index, os.path.getsize(index) // 2),
                       f"{INDEX}: index checksum mismatch"),
        "index truncated": (lambda: truncate(index, os.path.getsize(index) - 9),
                            f"{INDEX}: index checksum mismatch"),
        "index missing": (lambda: os.remove(index), f"{INDEX}: missing index file"),
        "manifest value": (lambda: _edit_manifest(path), "cache.json: checksum mismatch"),
    }
    do, pattern = match[damage]
    do()
    with pytest.raises(C.CacheCorruptionError, match=pattern):
        C.TeacherCache.open(path)


def _edit_manifest(path):
    p = os.path.join(path, C.MANIFEST)
    text = open(p).read()
    assert '"num_examples": 7' in text
    open(p, "w").write(text.replace('"num_examples": 7', '"num_examples": 8'))


# ------------------------------------------------------------------------------------------------
# Several processes

DIGEST = '''
def digest(t, b, L):
    assert not t.attention[:, b, :, L:].any() and not t.attention[:, b, :, :, L:].any()
    assert not t.hidden[:, b, L:].any()
    h = hashlib.sha256()
    for x in (t.attention[:, b, :, :L, :L], t.hidden[:, b, :L], t.logits[b]):
        h.update(x.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
'''

READER = '''
import hashlib, json, sys
import numpy as np, torch
from tinybert_fast import cache as C
''' + DIGEST + '''
cache = C.TeacherCache.open(sys.argv[1])
rng = np.random.default_rng(int(sys.argv[2]))
ids = cache.example_ids.copy()
seen = {}
for rep in range(10):
    rng.shuffle(ids)
    for k in range(0, len(ids), 3):
        t = cache.fetch(ids[k:k + 3])
        for b, i in enumerate(ids[k:k + 3]):
            d = digest(t, b, int(t.attention_mask[b].sum()))
            assert seen.setdefault(int(i), d) == d
print(json.dumps(seen))
'''


def test_two_processes_read_at_once(tmp_path):
    shape = SHAPES[1]
    ids = write_cache(tmp_path / "c", shape, "fp16", teacher_outputs(shape, torch.float16))
    script = tmp_path / "reader.py"
    script.write_text(READER)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "c"), str(seed)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for seed in (1, 2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        outs.append(json.loads(out.decode().strip().splitlines()[-1]))
    ns = {"hashlib": hashlib, "torch": torch}
    exec(textwrap.dedent(DIGEST), ns)
    cache = C.TeacherCache.open(tmp_path / "c")
    t = cache.fetch(ids)
    want = {str(int(i)): ns["digest"](t, b, int(shape.lengths[b])) for b, i in enumerate(ids)}
    assert outs[0] == want and outs[1] == want


# ------------------------------------------------------------------------------------------------
# CUDA path (gather -> pinned -> side-stream copy -> unpack kernel)

@cuda_only
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
def test_cuda_fetch_matches_cpu(tmp_path, dtype):
    shape = SHAPES[1]
    ids = write_cache(tmp_path / "c", shape, dtype, teacher_outputs(shape, spread=True))
    cache = C.TeacherCache.open(tmp_path / "c")
    order = ids[[5, 0, 7, 2]]
    for pad_to in (None, 80):
        cpu = cache.fetch(order, pad_to=pad_to)
        gpu = cache.fetch(order, device="cuda", pad_to=pad_to)
        for a, b in zip(cpu[:4], gpu[:4]):
            assert b.is_cuda and torch.equal(a, b.cpu())
    batches = [ids[:3], ids[3:], ids[[1]]]
    for t, bt in zip(cache.prefetch(batches, device="cuda", depth=2), batches):
        want = cache.fetch(bt)
        for a, b in zip(want[:4], t[:4]):
            assert torch.equal(a, b.cpu())


@cuda_only
@pytest.mark.parametrize("storage,layout", OPCHECK_LAYOUTS, ids=[s for s, _ in OPCHECK_LAYOUTS])
def test_opcheck_cuda_unpack(storage, layout):
    """The CUDA kernel of unpack against the fake kernel: records staged on the device, no
    checksums (gather checks them on the host), the batch positions given."""
    ops = torch.ops.tinybert_fast_cache
    lengths, on_qk, tensors = opcheck_inputs(layout)
    records, offsets, _ = ops.pack(lengths, *tensors, layout.ints(), 2)
    cuda = (lambda t: t.to("cuda"))  # noqa: E731
    out_dtype = torch.float16 if storage == "int8" else FLOAT_STORAGE[storage]
    args = ([cuda(records)], cuda(torch.zeros(3, dtype=torch.long)), cuda(offsets[:-1]),
            cuda(lengths), None, layout.ints(), 7, out_dtype, 1,
            cuda(torch.nonzero(~on_qk)[:, 0]), cuda(torch.nonzero(on_qk)[:, 0]))
    torch.library.opcheck(ops.unpack, args)
