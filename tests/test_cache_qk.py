"""Teacher cache storing attention as queries and keys (attention_storage "auto" / "qk").

An example of length L stores 2*L*d_h values per head as Q and K instead of L*L scores, which is
smaller from L > 2*d_h on.  Checked here: which examples take which form and what they cost in
bytes; Q and K round-trip exactly (fp32/bf16/fp16) or within the 8-bit bound; scores formed from
them equal Q K^T / sqrt(d_h) of the stored Q and K up to one rounding; mixed batches, ragged
lengths 1 to 512, every padded entry 0; attention_form="qk" fetches; prefetch; the staged (CUDA-path)
gather unpacked on the CPU; corruption inside a Q/K record; argument errors; and, on a GPU, the
CUDA unpack kernel against the CPU path.
"""

from __future__ import annotations

import os

import warnings

import numpy as np
import pytest
import torch

from tinybert_fast import cache as C

from conftest import require_cache_extension  # noqa: E402

require_cache_extension()

cuda_only = pytest.mark.skipif(not (torch.cuda.is_available() and C.HAS_CUDA_KERNELS),
                               reason="needs a CUDA device and the CUDA kernels")

FLOAT_STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


class Batch:
    """Padded Q/K (+ hidden states and logits) of B examples with `lengths`."""

    def __init__(self, lengths, H=3, dh=8, n_att=2, n_hid=2, d=5, C_=3, seed=0, spread=False):
        g = torch.Generator().manual_seed(seed)
        self.lengths = torch.tensor(lengths, dtype=torch.int64)
        self.B, self.H, self.dh, self.n_att = len(lengths), H, dh, n_att
        Lp = int(self.lengths.max())

        def draw(*size):
            x = torch.randn(*size, generator=g)
            if spread:  # rows of very different magnitudes (8-bit tests)
                x = x * torch.exp(torch.empty(*size[:-1], 1).uniform_(-4, 4, generator=g))
            return x

        self.query = draw(n_att, self.B, H, Lp, dh)
        self.key = draw(n_att, self.B, H, Lp, dh)
        self.hidden = draw(n_hid, self.B, Lp, d) if n_hid else None
        self.logits = draw(self.B, C_) if C_ else None
        self.ids = torch.arange(self.B) * 3 + 11

    def write(self, path, dtype="fp32", storage="auto", chunk_examples=3):
        w = C.CacheWriter(path, dtype, fsync=False, chunk_examples=chunk_examples,
                          attention_storage=storage)
        half = max(1, self.B // 2)
        for sl in (slice(0, half), slice(half, self.B)):
            if sl.start < self.B:
                w.append(self.ids[sl], self.lengths[sl],
                         None if self.logits is None else self.logits[sl],
                         None if self.hidden is None else self.hidden[:, sl],
                         query=self.query[:, sl], key=self.key[:, sl])
        assert w.close()
        return C.TeacherCache.open(path)


def scores64(q, k):
    """float64 Q K^T / sqrt(d_h)."""
    q, k = q.double(), k.double()
    return q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5


def test_which_examples_store_qk_and_their_bytes():
    """"auto" takes Q and K exactly where they are smaller than the scores (up to the 16-byte
    alignment of each section): from L = 2*d_h + 1 on (2*d_h + 5 in 8-bit, whose Q/K rows carry
    twice as many fp32 scales)."""
    H, dh, n_att = 3, 8, 2
    L = np.arange(1, 300)
    for dtype, e in (("fp32", 4), ("bf16", 2), ("fp16", 2), ("int8", 1)):
        thr = C._qk_min_length("auto", dtype, dh)
        assert thr == 2 * dh + (5 if dtype == "int8" else 1)
        scales = 4 if dtype == "int8" else 0
        score_bytes = n_att * H * (L * L * e + L * scales)
        qk_bytes = n_att * H * (2 * L * dh * e + 2 * L * scales)
        assert ((qk_bytes < score_bytes) == (L >= thr)).all()
        auto = C.CacheLayout(dtype, 0, 0, 0, n_att, H, dh, thr)
        plain = C.CacheLayout(dtype, 0, 0, 0, n_att, H)
        every = C.CacheLayout(dtype, 0, 0, 0, n_att, H, dh, 1)
        got, s_b, q_b = (lay.record_bytes(L) for lay in (auto, plain, every))
        assert (got == np.where(L >= thr, q_b, s_b)).all()
        assert (got <= np.minimum(s_b, q_b) + 16).all()
        assert (auto.stores_qk(L) == (L >= thr)).all() and not plain.stores_qk(L).any()


@pytest.mark.parametrize("dtype", list(FLOAT_STORAGE))
@pytest.mark.parametrize("storage", ["auto", "qk", "scores"])
def test_round_trip_mixed_batch(tmp_path, dtype, storage):
    """Lengths on both sides of the "auto" threshold (17 for d_h = 8), fetched in a shuffled
    order and padded past the longest: Q and K come back bit for bit, the scores as
    Q K^T / sqrt(d_h) of the stored (rounded) Q and K, rounded once; padding is 0."""
    b = Batch([1, 40, 16, 17, 3, 29, 18, 2])
    cache = b.write(tmp_path / "c", dtype, storage)
    odt = FLOAT_STORAGE[dtype]
    assert cache.fingerprint["format_version"] == C.FORMAT_VERSION
    order = [5, 0, 2, 7, 3, 1, 6, 4]
    ids = b.ids[order]
    for pad_to in (None, 48):
        t = cache.fetch(ids, pad_to=pad_to)
        P = 40 if pad_to is None else pad_to
        assert t.attention.shape == (2, 8, 3, P, P) and t.attention.dtype == odt
        assert t.query is None and t.key is None
        for j, e in enumerate(order):
            L = int(b.lengths[e])
            q, k = b.query[:, e, :, :L], b.key[:, e, :, :L]
            if cache.layout.stores_qk([L])[0]:  # the scores of the stored, rounded Q and K
                q, k = q.to(odt), k.to(odt)
            want = scores64(q, k)                # else: scores of the input, rounded when stored
            got = t.attention[:, j].double()
            # one rounding to the output dtype, plus the fp32 accumulation
            tol = 2 * UNIT_ROUNDOFF[odt] * want.abs() + 1e-5 * float(want.abs().max())
            assert ((got[:, :, :L, :L] - want).abs() <= tol).all(), f"example {e}"
            assert (got[:, :, L:] == 0).all() and (got[:, :, :, L:] == 0).all()
            assert torch.equal(t.hidden[:, j, :L], b.hidden[:, e, :L].to(odt))
            assert (t.hidden[:, j, L:] == 0).all()
            assert torch.equal(t.logits[j], b.logits[e].to(odt))
            assert t.attention_mask[j].tolist() == [1] * L + [0] * (P - L)
        if storage == "qk":
            tq = cache.fetch(ids, pad_to=pad_to, attention_form="qk")
            assert tq.attention is None and tq.query.shape == (2, 8, 3, P, 8)
            for j, e in enumerate(order):
                L = int(b.lengths[e])
                assert torch.equal(tq.query[:, j, :, :L], b.query[:, e, :, :L].to(odt))
                assert torch.equal(tq.key[:, j, :, :L], b.key[:, e, :, :L].to(odt))
                assert (tq.query[:, j, :, L:] == 0).all() and (tq.key[:, j, :, L:] == 0).all()
    assert cache.layout.qk_min_length == {"auto": 17, "qk": 1, "scores": 0}[storage]


def test_auto_is_smallest_on_ragged_lengths_1_to_512(tmp_path):
    """Every length from 1 to 512 (d_h = 16, so Q and K from 33 tokens on), in batches of
    mixed lengths: the scores match, and "auto" is never larger than either plain layout."""
    rng = np.random.default_rng(0)
    lengths = rng.permutation(np.arange(1, 513))
    b = Batch(lengths.tolist(), H=1, dh=16, n_att=1, n_hid=1, d=4, C_=0, seed=3)
    paths = {}
    for storage in ("auto", "scores", "qk"):
        paths[storage] = b.write(tmp_path / storage, "bf16", storage, chunk_examples=100)
    auto = paths["auto"]
    assert auto.nbytes < min(paths["scores"].nbytes, paths["qk"].nbytes)
    for chunk in np.array_split(np.arange(512), 8):
        ids = b.ids[chunk]
        t = auto.fetch(ids)
        ref = paths["scores"].fetch(ids)
        for j, e in enumerate(chunk.tolist()):
            L = int(b.lengths[e])
            q, k = b.query[:, e, :, :L], b.key[:, e, :, :L]
            if L > 32:  # stored as Q and K: the scores of the stored, rounded Q and K
                q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
            want = scores64(q, k)
            tol = 2 ** -7 * want.abs() + 1e-4 * float(want.abs().max())
            assert ((t.attention[:, j, :, :L, :L].double() - want).abs() <= tol).all()
            assert (t.attention[:, j, :, L:] == 0).all()
        # a scores-layout cache of the same Q and K holds the same scores (both rounded once)
        diff = (t.attention.double() - ref.attention.double()).abs()
        assert float(diff.max()) <= 2 ** -7 * float(ref.attention.double().abs().max())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_int8_qk_within_bound(tmp_path, out_dtype):
    """8-bit Q and K: each value within max|row| * (1/254 + 2^-22) of the input, per Q or K row;
    the scores from them within the bound that follows,
    |dS_ij| <= (sum_t |q_it||dk_jt| + |dq_it||k_jt| + |dq_it||dk_jt|) / sqrt(d_h)."""
    b = Batch([20, 3, 33, 64], H=2, dh=8, spread=True, seed=5)
    cache = b.write(tmp_path / "c", "int8", "qk")
    t = cache.fetch(b.ids, attention_form="qk", out_dtype=out_dtype)
    ts = cache.fetch(b.ids, out_dtype=out_dtype)
    u = UNIT_ROUNDOFF[out_dtype]
    for e in range(b.B):
        L = int(b.lengths[e])
        parts = []
        for got, x in ((t.query, b.query), (t.key, b.key)):
            x = x[:, e, :, :L].double()
            g = got[:, e, :, :L].double()
            amax = x.abs().amax(-1, keepdim=True)
            bound = amax * (1 / 254 + 2 ** -22) + u * g.abs()
            assert ((g - x).abs() <= bound).all(), f"example {e}"
            parts.append((x, amax * (1 / 254 + 2 ** -22)))
        (q, dq), (k, dk) = parts
        s_bound = (q.abs().sum(-1, keepdim=True) * dk.transpose(-1, -2)
                   + dq * k.abs().sum(-1)[..., None, :] + dq * dk.transpose(-1, -2) * q.shape[-1])
        s_bound = s_bound / 8 ** 0.5
        want = scores64(q, k)
        got = ts.attention[:, e, :, :L, :L].double()
        assert ((got - want).abs() <= s_bound + 2 * u * got.abs() + 1e-6).all(), f"example {e}"


def test_fetch_qk_refuses_examples_stored_as_scores(tmp_path):
    b = Batch([4, 30, 2])
    cache = b.write(tmp_path / "c", "fp32", "auto")
    cache.fetch(b.ids[[1]], attention_form="qk")          # 30 tokens: stored as Q and K
    with pytest.raises(ValueError, match=r"attention_form='qk': examples \[11, 17\] of this "
                                         r"batch are stored as scores.*attention_storage='qk'"):
        cache.fetch(b.ids, attention_form="qk")
    with pytest.raises(ValueError, match="attention_form must be 'scores' or 'qk'"):
        cache.fetch(b.ids, attention_form="probs")
    plain = b.write(tmp_path / "s", "fp32", "scores")
    with pytest.raises(ValueError, match="attention_form='qk'"):
        plain.fetch(b.ids[[1]], attention_form="qk")


def test_prefetch_and_staged_gather(tmp_path):
    """prefetch(attention_form=...) equals fetch; the host half of the CUDA path (records + [4, B]
    metadata whose last row lists the score examples, then the Q/K examples) unpacked by the CPU
    kernel gives fetch's Q and K."""
    b = Batch([20, 3, 33, 5, 18, 40], seed=2)
    cache = b.write(tmp_path / "c", "fp16", "auto")
    batches = [b.ids[[0, 1, 2]], b.ids[[3]], b.ids[[5, 4]]]
    for got, ids in zip(cache.prefetch(batches, depth=2), batches):
        want = cache.fetch(ids)
        for x, y in zip(got[:4], want[:4]):
            assert torch.equal(x, y)
    order = b.ids[[1, 0, 3, 2, 5]]           # lengths 3, 20, 5, 33, 40: scores at 0 and 2
    plan = cache._plan(order, None, None)
    assert plan.positions.tolist() == [0, 2, 1, 3, 4] and plan.n_scores == 2
    host, meta_at, total = cache._gather(plan, C._Staging(), True, 2, pin=False)
    meta = host[meta_at:].view(torch.int64).view(4, len(order))
    assert meta[3].tolist() == [0, 2, 1, 3, 4]
    att, hid, lg, mask, bad, qk = torch.ops.tinybert_fast_cache.unpack(
        [host[:total]], meta[2], meta[0], meta[1], None, cache.layout.ints(), plan.P,
        plan.out_dtype, 2, meta[3, :2], meta[3, 2:])
    assert att.shape[1] == 2 and qk.shape[:3] == (2, 2, 3)
    want = cache.fetch(order)
    for j, pos in enumerate([1, 3, 4]):      # the Q/K examples, in batch order
        L = int(want.attention_mask[pos].sum())
        e = [1, 0, 3, 2, 5][pos]
        assert torch.equal(qk[0, :, j, :, :L], b.query[:, e, :, :L].half())
    assert torch.equal(att, want.attention[:, [0, 2]])
    assert torch.equal(hid, want.hidden) and torch.equal(mask, want.attention_mask)


def test_flipped_byte_in_qk_record_detected(tmp_path):
    """A flipped byte in the Q/K section (the last bytes of a record of 30 tokens) is caught by
    fetch and by verify, naming the example; the other example still reads."""
    b = Batch([30, 2])
    path = tmp_path / "c"
    cache = b.write(path, "bf16", "auto", chunk_examples=1)
    row = cache._rows([int(b.ids[0])])[0]
    assert cache.layout.stores_qk([30])[0]
    last = int(cache._offs[row] + cache._nbytes[row] - 1)
    cache.close()
    with open(os.path.join(path, "shard-00000-of-00001.data"), "r+b") as f:
        f.seek(last)
        byte = f.read(1)
        f.seek(last)
        f.write(bytes([byte[0] ^ 0x01]))
    damaged = C.TeacherCache.open(path)
    damaged.fetch(b.ids[[1]])
    for read in (lambda: damaged.fetch(b.ids), damaged.verify):
        with pytest.raises(C.CacheCorruptionError, match=f"example {int(b.ids[0])}"):
            read()


def test_writer_argument_errors(tmp_path):
    b = Batch([4, 30])
    w = C.CacheWriter(tmp_path / "c", "fp32", fsync=False)
    with pytest.raises(ValueError, match="give attention .* or query and key, not both"):
        w.append(b.ids, b.lengths, query=b.query, key=b.key,
                 attention=torch.zeros(2, 2, 3, 30, 30))
    with pytest.raises(ValueError, match="query and key: give both"):
        w.append(b.ids, b.lengths, query=b.query)
    with pytest.raises(ValueError, match="query and key: expected equal shapes"):
        w.append(b.ids, b.lengths, query=b.query, key=b.key[..., :4])
    bad = b.query.clone()
    bad[1, 1, 0, 3, 0] = float("inf")
    with pytest.raises(ValueError, match=f"query/key of example {int(b.ids[1])} has non-finite"):
        w.append(b.ids, b.lengths, query=bad, key=b.key)
    with pytest.raises(ValueError, match="attention_storage must be one of"):
        C.CacheWriter(tmp_path / "d", "fp32", attention_storage="maps")
    qk_only = C.CacheWriter(tmp_path / "e", "fp32", fsync=False, attention_storage="qk")
    with pytest.raises(ValueError, match="attention_storage 'qk' stores queries and keys"):
        qk_only.append(b.ids, b.lengths, attention=torch.zeros(2, 2, 3, 30, 30))


@cuda_only
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_cuda_fetch_matches_cpu(tmp_path, dtype):
    """The CUDA unpack kernel (score rows and Q/K rows by batch position) against the CPU path:
    Q and K bit for bit; the scores formed from them by cuBLAS within a rounding."""
    b = Batch([20, 3, 33, 5, 18, 40, 1, 64], seed=4, spread=dtype == "int8")
    cache = b.write(tmp_path / "c", dtype, "auto")
    qk_cache = b.write(tmp_path / "q", dtype, "qk")
    order = b.ids[[5, 1, 0, 7, 2, 6]]
    for pad_to in (None, 72):
        cpu, gpu = cache.fetch(order, pad_to=pad_to), cache.fetch(order, "cuda", pad_to=pad_to)
        for x, y in zip(cpu[1:4], gpu[1:4]):
            assert torch.equal(x, y.cpu())
        u = UNIT_ROUNDOFF[cpu.attention.dtype]
        diff = (cpu.attention.double() - gpu.attention.cpu().double()).abs()
        assert (diff <= 4 * u * cpu.attention.double().abs() + 1e-5).all()
        cq, gq = (qk_cache.fetch(order, dev, pad_to=pad_to, attention_form="qk")
                  for dev in ("cpu", "cuda"))
        assert torch.equal(cq.query, gq.query.cpu()) and torch.equal(cq.key, gq.key.cpu())
    for got, ids in zip(qk_cache.prefetch([order[:3], order[3:]], "cuda", attention_form="qk"),
                        [order[:3], order[3:]]):
        want = qk_cache.fetch(ids, attention_form="qk")
        assert torch.equal(got.query.cpu(), want.query) and torch.equal(got.key.cpu(), want.key)


def test_the_deprecated_attention_keyword_still_fetches_with_a_warning(tmp_path):
    """fetch/prefetch(attention=...) is 0.1.0's name of attention_form: it warns, and gives what
    attention_form gives, for one release."""
    b = Batch([4, 30, 2])
    cache = b.write(tmp_path / "c", "fp32", "qk")
    with warnings.catch_warnings():  # the new name warns nowhere, prefetch's worker included
        warnings.simplefilter("error", DeprecationWarning)
        want = cache.fetch(b.ids, attention_form="qk")
        assert torch.equal(next(iter(cache.prefetch([b.ids], attention_form="qk"))).query,
                           want.query)
    with pytest.warns(DeprecationWarning, match="attention_form"):
        got = cache.fetch(b.ids, attention="qk")
    torch.testing.assert_close(got.query, want.query, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="attention_form"):
        got = next(iter(cache.prefetch([b.ids], attention="qk")))
    torch.testing.assert_close(got.key, want.key, rtol=0, atol=0)
