"""The reader: a complete cache opened read-only (memory-mapped), records fetched back padded.

open checks the manifest's and every index's CRC32C and the data files' sizes and headers (a
truncated or swapped file is refused); fetch checks each record's CRC32C while reading it, so a
flipped byte raises CacheCorruptionError naming the file and the example.  On the CPU the C++
unpack op reads the mapped files directly; for CUDA the records are gathered into a pinned
staging buffer (C++ threads), copied on a side stream and unpacked by the CUDA kernel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch

from .build import build as _build
from .errors import CacheCorruptionError, CacheError, CacheIncompleteError, CacheMismatchError
from .extension import default_threads, has_cuda_kernels, ops
from .fingerprint import diff, make_fingerprint, tokens_difference
from .format import (BUILD_SPEC, DATA_HEADER, DATA_HEADER_BYTES, DATA_MAGIC, FORMAT_NAME,
                     FORMAT_VERSION, MANIFEST, REBUILD, STORAGE, CacheLayout, Index, canonical,
                     decode_index, manifest_checksum, read_json, scores_from_qk)
from .prefetch import Prefetcher, Staging, batched, record_stream
from .folder import remove_temp_files


class TeacherBatch(NamedTuple):
    """Teacher outputs of a batch, padded to L (the longest example, or pad_to).

    attention: [n_att, B, H, L, L] pre-softmax scores (None when none are stored, or when fetched
        with attention_form="qk")
    hidden: [n_hid, B, L, d] (None when none are stored)
    logits: [B, C] (None when none are stored)
    attention_mask: [B, L] int64, 1 = token, 0 = padding
    example_ids: [B] int64 (CPU)
    query, key: [n_att, B, H, L, d_h] unscaled queries and keys (fetch(..., attention_form="qk") only;
        the scores are query @ key^T / sqrt(d_h)), else None
    Every padded entry of attention, hidden, query and key is 0.
    """
    attention: torch.Tensor | None
    hidden: torch.Tensor | None
    logits: torch.Tensor | None
    attention_mask: torch.Tensor
    example_ids: torch.Tensor
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None


class _Plan(NamedTuple):
    """What fetch reads (TeacherCache._plan): cache rows, lengths, padded length P, output dtype,
    the attention wanted ("scores" or "qk"), and the batch positions of the examples stored as
    scores (positions[:n_scores]) and of those stored as Q and K (positions[n_scores:])."""
    rows: np.ndarray
    lens: np.ndarray
    P: int
    out_dtype: torch.dtype
    attention: str
    positions: np.ndarray
    n_scores: int


def _deprecated_attention(attention_form: str, attention: str | None) -> str:
    """fetch/prefetch's attention form, from `attention=` (0.1.0's name; deprecated) if given."""
    if attention is None:
        return attention_form
    warnings.warn("TeacherCache.fetch/prefetch(attention=...) is deprecated: use attention_form",
                  DeprecationWarning, stacklevel=3)
    return attention


class TeacherCache:
    """A complete teacher cache, opened read-only (memory-mapped).  See tinybert_fast.cache."""

    def __init__(self, path, manifest, indices, num_threads=None):
        self.path = path
        self._manifest = manifest
        self.layout = CacheLayout(**manifest["layout"]) if manifest["layout"] else None
        self.num_threads = num_threads or default_threads()
        self._files, self._maps, self._sources = [], [], []
        ids, src, offs, lens, crcs, tokens = [], [], [], [], [], []
        for s, (shard, idx) in enumerate(zip(manifest["shards"], indices)):
            self._files.append(os.path.join(path, shard["data"]))
            ids.append(idx.ids)
            src.append(np.full(len(idx.ids), s, np.int64))
            offs.append(idx.offsets)
            lens.append(idx.lengths)
            crcs.append(idx.crcs)
            tokens.append(idx.tokens)
        self._indices = indices
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
        self._ids, self._src, self._offs = cat(ids), cat(src), cat(offs)
        self._lens, self._crcs, self._tokens = cat(lens), cat(crcs), cat(tokens)
        self._order = np.argsort(self._ids, kind="stable")
        self._sorted_ids = self._ids[self._order]
        self._nbytes = (self.layout.record_bytes(self._lens) if self.layout and len(self._lens)
                        else np.zeros(0, np.int64))
        self._lock = threading.Lock()
        self._staging = [Staging(), Staging()]
        self._staging_next = 0
        self._streams: dict = {}
        self._map_files()

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, expect_fingerprint: dict | None = None, *,
             verify: bool = False, num_threads: int | None = None,
             expect_tokens=None) -> TeacherCache:
        """Open a complete cache.

        expect_fingerprint: a dict (e.g. from `TeacherCache.make_fingerprint`); every key it has
            must equal the cache's, else CacheMismatchError listing each difference.  Keys it
            lacks are not compared.
        expect_tokens: (example_ids [n], digests [n]) of the training data, the digests from
            fingerprint.token_digests / sequence_digests: the cache must hold exactly these
            examples with these token ids, else CacheMismatchError saying what changed (token
            ids, order, example count); see check_tokens.
        Temp files that an interrupted write left in the folder are removed first.
        verify: also check the CRC32C of every chunk now (reads every file once); records are
            checked when fetched either way.
        """
        ops()
        path = os.fspath(path)
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.exists(manifest_path):
            if os.path.exists(os.path.join(path, BUILD_SPEC)):
                raise CacheIncompleteError(
                    f"{path} holds an incomplete teacher cache (no {MANIFEST}): a build was "
                    f"interrupted or is still running; call TeacherCache.build with the same "
                    f"arguments to resume it")
            raise FileNotFoundError(f"{path}: no teacher cache here (no {MANIFEST})")
        remove_temp_files(path)
        manifest = read_json(manifest_path)
        if not isinstance(manifest, dict) or manifest.get("checksum") != manifest_checksum(
                manifest):
            raise CacheCorruptionError(f"{manifest_path}: checksum mismatch (the file is corrupt)")
        if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != \
                FORMAT_VERSION:
            raise CacheError(f"{manifest_path}: format {manifest.get('format')!r} version "
                             f"{manifest.get('format_version')}; this tinybert_fast reads "
                             f"{FORMAT_NAME!r} version {FORMAT_VERSION}: {REBUILD}")
        differences = []
        if expect_fingerprint is not None:
            differences = diff(manifest["fingerprint"], json.loads(canonical(expect_fingerprint)))
        spec_hash = None
        if os.path.exists(os.path.join(path, BUILD_SPEC)):
            spec_hash = hashlib.sha256(canonical(read_json(os.path.join(path, BUILD_SPEC)))
                                       .encode()).digest()
        indices = []
        for shard in manifest["shards"]:
            ipath = os.path.join(path, shard["index"])
            idx = decode_index(ipath)
            if idx.crc != shard["index_crc32c"]:
                raise CacheCorruptionError(f"{ipath}: not the index this cache was built with")
            if spec_hash is not None and idx.spec != spec_hash:
                raise CacheCorruptionError(f"{ipath}: belongs to another build")
            cls._check_data_file(os.path.join(path, shard["data"]), idx, manifest)
            indices.append(idx)
        cache = cls(path, manifest, indices, num_threads)
        if expect_tokens is not None:
            problem = cache.tokens_difference(*expect_tokens)
            if problem:
                differences.append(problem)
        if differences:
            cache.close()
            raise CacheMismatchError(f"{path}: the cache does not match the expected fingerprint: "
                                     + "; ".join(differences) + f".  To build it afresh: "
                                     f"{REBUILD}")
        if verify:
            cache.verify()
        return cache

    @staticmethod
    def _check_data_file(dpath: str, idx: Index, manifest: dict) -> None:
        try:
            size = os.path.getsize(dpath)
        except FileNotFoundError:
            raise CacheCorruptionError(f"{dpath}: missing data file ({len(idx.ids)} examples, "
                                       f"e.g. {idx.ids[:5].tolist()})") from None
        layout = CacheLayout(**manifest["layout"]) if manifest["layout"] else None
        nb = layout.record_bytes(idx.lengths) if len(idx.ids) else np.zeros(0, np.int64)
        if size != idx.data_bytes:
            lost = idx.ids[idx.offsets + nb > size] if size < idx.data_bytes else idx.ids[:0]
            what = (f"examples from {int(lost[0])} on ({len(lost)} examples) lie past its end"
                    if len(lost) else "records lie past its end")
            raise CacheCorruptionError(
                f"{dpath}: {size} bytes, expected {idx.data_bytes}: the file is "
                f"{'truncated: ' + what if size < idx.data_bytes else 'longer than its index'}")
        with open(dpath, "rb") as f:
            head = f.read(DATA_HEADER_BYTES)
        if len(head) < DATA_HEADER_BYTES:
            raise CacheCorruptionError(f"{dpath}: truncated header")
        magic, version, hsize, rank, world, spec = DATA_HEADER.unpack(head)
        if (magic != DATA_MAGIC or version != FORMAT_VERSION or spec != idx.spec
                or (rank, world) != (idx.rank, idx.world)):
            raise CacheCorruptionError(f"{dpath}: header does not match the index (a file of "
                                       f"another cache, or a corrupt header)")
        if len(idx.ids):
            ends = idx.offsets + nb
            nxt = np.append(idx.offsets[1:], idx.data_bytes)
            bad = np.nonzero((idx.offsets < DATA_HEADER_BYTES) | (ends > nxt)
                             | (idx.offsets % 16 != 0))[0]
            if len(bad):
                raise CacheCorruptionError(f"{dpath}: index offsets are inconsistent at example "
                                           f"{int(idx.ids[bad[0]])}")

    def _map_files(self) -> None:
        for f in self._files:
            with open(f, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps.append(mm)
            with warnings.catch_warnings():  # read-only buffer: the ops never write to it
                warnings.simplefilter("ignore", UserWarning)
                self._sources.append(torch.frombuffer(mm, dtype=torch.uint8))

    def close(self) -> None:
        """Unmap the files (tensors returned by fetch stay valid: they are copies)."""
        self._sources = []
        for mm in self._maps:
            with contextlib.suppress(BufferError):
                mm.close()
        self._maps = []

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def __getstate__(self):  # DataLoader workers with spawn: reopen by path
        return {"path": self.path, "num_threads": self.num_threads}

    def __setstate__(self, state):
        other = TeacherCache.open(state["path"], num_threads=state["num_threads"])
        self.__dict__.update(other.__dict__)

    # -- information --------------------------------------------------------------------------
    @property
    def fingerprint(self) -> dict:
        return self._manifest["fingerprint"]

    @property
    def example_ids(self) -> np.ndarray:
        """All stored example ids, sorted."""
        return self._sorted_ids

    def __len__(self) -> int:
        return len(self._ids)

    def token_digests(self, example_ids) -> np.ndarray:
        """int64 digests of these examples' token ids as stored (fingerprint.token_digests;
        0: the cache was written without input_ids)."""
        return self._tokens[self._rows(example_ids)]

    def tokens_difference(self, example_ids, digests, complete: bool = True) -> str | None:
        """What differs between the examples this cache was built from and these (example ids
        [n] and their fingerprint.token_digests / sequence_digests), as a sentence, or None.

        complete: they are the whole training set (count, ids and token ids must all match);
        False: a part of it (one DDP rank's), whose examples must be stored with these tokens."""
        ids = np.asarray(torch.as_tensor(example_ids).cpu(), dtype=np.int64).reshape(-1)
        digests = np.asarray(digests, dtype=np.int64).reshape(-1)
        if ids.size != digests.size:
            raise ValueError(f"example_ids has {ids.size} entries but digests has {digests.size}")
        return tokens_difference(self._ids, self._tokens, ids, digests, complete)

    def check_tokens(self, example_ids, digests, complete: bool = True) -> None:
        """CacheMismatchError saying what changed (other token ids, another order, more or fewer
        examples) unless this cache was built from exactly these examples (tokens_difference)."""
        problem = self.tokens_difference(example_ids, digests, complete)
        if problem:
            raise CacheMismatchError(f"{self.path}: the cache was built from other training "
                                     f"examples: {problem}.  {REBUILD[0].upper()}{REBUILD[1:]}")

    def __contains__(self, example_id) -> bool:
        i = np.searchsorted(self._sorted_ids, int(example_id))
        return i < len(self._sorted_ids) and self._sorted_ids[i] == int(example_id)

    @property
    def nbytes(self) -> int:
        """Bytes of all data files."""
        return int(sum(s["data_bytes"] for s in self._manifest["shards"]))

    def lengths(self, example_ids) -> np.ndarray:
        """Token counts of these examples."""
        return self._lens[self._rows(example_ids)]

    def stored_bytes(self, example_ids) -> int:
        """Bytes of these examples' records: what fetch reads and, on CUDA, copies."""
        return int(self._nbytes[self._rows(example_ids)].sum())

    def __repr__(self) -> str:
        return (f"TeacherCache({self.path!r}, {len(self)} examples, layout={self.layout}, "
                f"{self.nbytes / 2**20:.1f} MiB)")

    # -- reading ------------------------------------------------------------------------------
    def _rows(self, example_ids) -> np.ndarray:
        if isinstance(example_ids, torch.Tensor):
            example_ids = example_ids.detach().cpu().numpy()
        ids = np.asarray(example_ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self._sorted_ids, ids)
        pos_c = np.minimum(pos, max(len(self._sorted_ids) - 1, 0))
        found = (pos < len(self._sorted_ids)) & (self._sorted_ids[pos_c] == ids) if len(
            self._sorted_ids) else np.zeros(len(ids), bool)
        if not found.all():
            missing = ids[~found]
            raise KeyError(f"example ids not in the cache {self.path}: {missing[:10].tolist()}"
                           f"{' ...' if len(missing) > 10 else ''} ({len(missing)} of {len(ids)})")
        return self._order[pos_c]

    def _plan(self, example_ids, pad_to, out_dtype, attention="scores") -> _Plan:
        if self.layout is None:
            raise CacheError(f"{self.path}: the cache is empty")
        if attention not in ("scores", "qk"):
            raise ValueError(f"attention_form must be 'scores' or 'qk'; got {attention!r}")
        rows = self._rows(example_ids)
        if len(rows) == 0:
            raise ValueError("example_ids is empty")
        lens = self._lens[rows]
        longest = int(lens.max())
        P = longest if pad_to is None else int(pad_to)
        if P < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest example of the batch "
                             f"({longest} tokens)")
        if self.layout.dtype == "int8":
            out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
            if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(f"out_dtype must be float32, bfloat16 or float16; got {out_dtype}")
        else:
            store = STORAGE[self.layout.dtype][1]
            if out_dtype not in (None, store):
                raise TypeError(f"out_dtype: a {self.layout.dtype} cache returns {store}; got "
                                f"{out_dtype}")
            out_dtype = store
        on_qk = self.layout.stores_qk(lens)
        if attention == "qk" and not (self.layout.num_attention and on_qk.all()):
            if not self.layout.num_attention:
                raise ValueError(f"attention_form='qk': {self.path} stores no attention")
            short = self._ids[rows][~on_qk]
            raise ValueError(
                f"attention_form='qk': examples {short[:10].tolist()} of this batch are stored as "
                f"scores in {self.path} (attention storage "
                f"{self.fingerprint.get('attention_storage', 'scores')!r}: Q and K only from "
                f"{self.layout.qk_min_length or 'no'} tokens on); build the cache with "
                f"attention_storage='qk' to read queries and keys")
        # batch positions: examples stored as scores, then those stored as Q and K
        positions = np.concatenate([np.nonzero(~on_qk)[0], np.nonzero(on_qk)[0]])
        return _Plan(rows, lens, P, out_dtype, attention, positions, int((~on_qk).sum()))

    def _raise_bad(self, bad: torch.Tensor, rows: np.ndarray) -> None:
        if bad.numel() and bool(bad.any()):
            b = int(torch.nonzero(bad)[0, 0])
            r = rows[b]
            n_bad = int(bad.sum())
            raise CacheCorruptionError(
                f"{self._files[self._src[r]]}: checksum mismatch in the record of example "
                f"{int(self._ids[r])} (bytes {int(self._offs[r])}.."
                f"{int(self._offs[r] + self._nbytes[r])})"
                f"{f' and {n_bad - 1} more of this batch' if n_bad > 1 else ''}: the file is "
                f"corrupt; rebuild the cache")

    def _result(self, plan: _Plan, att, hid, logit, mask, qk, positions) -> TeacherBatch:
        """The TeacherBatch from unpack's outputs (att: [n_att, Bs, H, P, P] for the examples
        stored as scores, qk: [2, n_att, Bq, H, P, d_h] for the others; positions: the plan's
        batch positions, on the outputs' device), forming the scores Q K^T / sqrt(d_h) of the
        examples stored as Q and K when scores are wanted."""
        lay = self.layout
        ids = torch.as_tensor(np.asarray(self._ids[plan.rows], dtype=np.int64))
        query = key = None
        Bs, B = plan.n_scores, len(plan.rows)
        if not lay.num_attention:
            att = None
        elif plan.attention == "qk":
            att, query, key = None, qk[0], qk[1]
        elif Bs < B:  # some examples are stored as Q and K
            from_qk = scores_from_qk(qk[0], qk[1])
            if Bs == 0:
                att = from_qk
            else:
                full = att.new_empty(lay.num_attention, B, *att.shape[2:])
                full.index_copy_(1, positions[:Bs], att)
                full.index_copy_(1, positions[Bs:], from_qk)
                att = full
        return TeacherBatch(att, hid if lay.num_hidden else None,
                            logit if lay.num_logits else None, mask, ids, query, key)

    def fetch(self, example_ids, device: str | torch.device | None = None,
              pad_to: int | None = None, *, out_dtype: torch.dtype | None = None,
              verify: bool = True, num_threads: int | None = None,
              attention_form: str = "scores", attention: str | None = None) -> TeacherBatch:
        """The teacher outputs of these examples, padded, on `device` (default CPU).

        example_ids: [B] ints (list, numpy array or tensor; any order, no need to be sorted).
        pad_to: pad to this length instead of the batch's longest example.
        out_dtype: for 8-bit caches, the float dtype to dequantize to (default bfloat16).
        verify: check each record's CRC32C (raises CacheCorruptionError naming file and example).
        attention_form: "scores" (TeacherBatch.attention; examples stored as Q and K get
            Q K^T / sqrt(d_h), one batched GEMM accumulated in fp32) or "qk" (TeacherBatch.query
            and .key, for attention_mse_qk; every example of the batch must be stored as Q and K:
            a cache built with attention_storage="qk").  `attention=` is its deprecated name.
        Shapes and padding: see TeacherBatch.  On CUDA the records are gathered into a pinned
        buffer, copied on a side stream and unpacked by a CUDA kernel; the current stream waits
        for that copy, and the result is safe to use on it.
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        form = _deprecated_attention(attention_form, attention)
        plan = self._plan(example_ids, pad_to, out_dtype, form)
        if device.type == "cuda" and has_cuda_kernels():
            with self._lock:
                slot = self._staging[self._staging_next]
                self._staging_next = (self._staging_next + 1) % len(self._staging)
                batch, event = self._stage_cuda(plan, device, slot, verify, num_threads)
            stream = torch.cuda.current_stream(device)
            stream.wait_event(event)
            record_stream(batch, stream)
            return batch
        batch = self._unpack_cpu(plan, verify, num_threads)
        if device.type != "cpu":  # CUDA without the CUDA kernels, or another device
            pin = device.type == "cuda"
            move = (lambda t: t if t is None or t is batch.example_ids  # noqa: E731
                    else t.pin_memory().to(device, non_blocking=True) if pin else t.to(device))
            batch = TeacherBatch(*(move(t) for t in batch))
        return batch

    def _unpack_cpu(self, plan: _Plan, verify, num_threads) -> TeacherBatch:
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
        rows, pos, Bs = plan.rows, t(plan.positions), plan.n_scores
        att, hid, logit, mask, bad, qk = ops().unpack(
            self._sources, t(self._src[rows]), t(self._offs[rows]), t(plan.lens),
            t(self._crcs[rows]) if verify else None, self.layout.ints(), plan.P, plan.out_dtype,
            num_threads or self.num_threads, pos[:Bs], pos[Bs:])
        self._raise_bad(bad, rows)
        return self._result(plan, att, hid, logit, mask, qk, pos)

    def _side_stream(self, device: torch.device):
        key = device.index if device.index is not None else torch.cuda.current_device()
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device=key)
        return self._streams[key]

    def _gather(self, plan: _Plan, slot: Staging, verify, num_threads, pin: bool):
        """Host half of the CUDA path: the records back to back in a (pinned) staging buffer
        (C++ threads, each record's CRC32C checked), then int64 [4, B] metadata (record offsets
        in the buffer, lengths, source index 0, the plan's batch positions) at byte `meta_at`, so
        one copy moves everything: unpack([buffer[:meta_at]], meta[2], meta[0], meta[1], ...)
        reads it.  Returns (buffer[:used], meta_at, records' bytes)."""
        rows = plan.rows
        nb = self._nbytes[rows]
        soff = np.zeros(len(rows), np.int64)
        np.cumsum(nb[:-1], out=soff[1:])
        total = int(nb.sum())
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
        meta_at = (total + 15) // 16 * 16
        used = meta_at + 32 * len(rows)
        staging = slot.get(used, pin=pin)
        bad = ops().gather(self._sources, t(self._src[rows]), t(self._offs[rows]), t(nb),
                            t(self._crcs[rows]) if verify else None, staging, t(soff),
                            num_threads or self.num_threads)
        self._raise_bad(bad, rows)
        meta = staging[meta_at:used].view(torch.int64).view(4, len(rows))
        meta[0].copy_(t(soff))
        meta[1].copy_(t(plan.lens))
        meta[2].zero_()
        meta[3].copy_(t(plan.positions))
        return staging[:used], meta_at, total

    def _stage_cuda(self, plan: _Plan, device, slot: Staging, verify, num_threads):
        """Gather into pinned memory, copy to the device on a side stream, unpack there with the
        CUDA kernel (and form the scores of examples stored as Q and K).  Returns (TeacherBatch,
        event recorded after the last kernel)."""
        host, meta_at, total = self._gather(plan, slot, verify, num_threads, pin=True)
        B, Bs = len(plan.rows), plan.n_scores
        stream = self._side_stream(device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            dev = torch.empty(host.numel(), dtype=torch.uint8, device=device)
            dev.copy_(host, non_blocking=True)
            slot.event = torch.cuda.Event()  # the staging buffer is free again once it fires
            slot.event.record(stream)
            meta = dev[meta_at:].view(torch.int64).view(4, B)
            att, hid, logit, mask, _, qk = ops().unpack(
                [dev[:max(total, 1)]], meta[2], meta[0], meta[1], None, self.layout.ints(),
                plan.P, plan.out_dtype, 1, meta[3, :Bs], meta[3, Bs:])
            batch = self._result(plan, att, hid, logit, mask, qk, meta[3])
            done = torch.cuda.Event()
            done.record(stream)
        return batch, done

    def prefetch(self, batches: Iterable, device: str | torch.device | None = None, *,
                 depth: int = 2, pad_to: int | None = None, out_dtype: torch.dtype | None = None,
                 batch_size: int | None = None, verify: bool = True,
                 num_threads: int | None = None, attention_form: str = "scores",
                 attention: str | None = None) -> Iterator[TeacherBatch]:
        """Iterate over TeacherBatch for each batch of example ids, `depth` batches ahead.

        batches: an iterable of id batches (e.g. a BatchSampler over example ids, or lists), or of
            single ids with batch_size given (a Sampler).
        A background thread gathers batch i+1 (C++ threads; pinned buffer, copy on a side stream
        and the unpack kernel on CUDA) while the caller uses batch i.  Each yielded batch is ready
        to use on the current stream.  Errors (a corrupt record, an unknown id) are raised at the
        batch they concern.  attention_form (and its deprecated name `attention`): as for fetch.
        """
        if depth < 1:
            raise ValueError(f"depth must be >= 1; got {depth}")
        if batch_size is not None:
            batches = batched(batches, batch_size)
        device = torch.device(device) if device is not None else torch.device("cpu")
        return Prefetcher(self, batches, device, depth, pad_to, out_dtype, verify, num_threads,
                           _deprecated_attention(attention_form, attention))

    def verify(self) -> None:
        """Check the CRC32C of every chunk of every data file; on a mismatch, find the example."""
        cache_ops = ops()
        for s, (src, idx) in enumerate(zip(self._sources, self._indices)):
            for start, end, crc, first in idx.chunks:
                if int(cache_ops.crc32c(src[start:end], 0)) == crc:
                    continue
                sel = np.nonzero((idx.offsets >= start) & (idx.offsets < end))[0]
                nb = self.layout.record_bytes(idx.lengths[sel])
                for i, n in zip(sel, nb):
                    rec = src[idx.offsets[i]:idx.offsets[i] + n]
                    if int(cache_ops.crc32c(rec, 0)) != idx.crcs[i]:
                        raise CacheCorruptionError(
                            f"{self._files[s]}: checksum mismatch in the record of example "
                            f"{int(idx.ids[i])}: the file is corrupt; rebuild the cache")
                raise CacheCorruptionError(f"{self._files[s]}: checksum mismatch in bytes "
                                           f"{start}..{end} (between records)")

    # -- building -----------------------------------------------------------------------------
    make_fingerprint = staticmethod(make_fingerprint)
    build = classmethod(_build)
