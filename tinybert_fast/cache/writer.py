"""The journaled writer: teacher outputs of one shard streamed into a cache folder.

Writing is crash-safe: records stream into the data file and are committed a chunk at a time
(data fsync'd, then a checksummed journal entry), the index is written atomically when the shard
is done, and the manifest last (finalize, by whichever shard finishes last).  A writer opened on
an interrupted build of the same fingerprint replays its journal and resumes after the last
committed chunk, giving files identical to an uninterrupted build.

Journal (shard-RRRRR-of-WWWWW.journal): JOURNAL_HEADER + its CRC32C, then one entry per committed
chunk: ENTRY_HEADER (magic, n, chunk number, start, end, chunk CRC32C), int64 ids[n], lengths[n],
offsets[n], crcs[n], token digests[n], and the entry's CRC32C.  A torn last entry is dropped on
resume; the committed chunks' CRC32C are checked against the data file before anything is
appended (CacheCorruptionError naming the chunk and its first damaged example).

The folder's lock, temp-file cleanup, chunk checks and the manifest: tinybert_fast.cache.folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import sys

import numpy as np
import torch

from .errors import CacheCorruptionError, CacheError, CacheMismatchError
from .extension import crc32c, default_threads, ops
from .fingerprint import diff, token_digests
from .folder import (_SHARD_FILE, _atomic_write, finalize, remove_temp_files, resolve_shard,
                     verify_chunks)
from .format import (ATTENTION_STORAGE, BUILD_SPEC, DATA_HEADER, DATA_HEADER_BYTES, DATA_MAGIC,
                     ENTRY_HEADER, ENTRY_MAGIC, FORMAT_NAME, FORMAT_VERSION, JOURNAL_HEADER,
                     JOURNAL_MAGIC, MANIFEST, REBUILD, STORAGE, CacheLayout, canonical,
                     decode_index, encode_index, is_temp_file, qk_min_length,
                     read_json, scores_from_qk, shard_name, storage_name)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

logger = logging.getLogger(__name__)


def _crash_point(name: str) -> None:
    """Test hook: tests/test_cache.py sets tinybert_fast.cache._crash_point to a function that
    kills the process at the point `name`; a no-op otherwise."""
    hook = getattr(sys.modules.get(__package__), "_crash_point", _crash_point)
    if hook is not _crash_point:
        hook(name)


class CacheWriter:
    """Streams teacher outputs of one shard into a cache folder (the low-level writer).

        w = CacheWriter(path, dtype="bf16", fingerprint={...}, shard=(rank, world_size))
        w.append(example_ids, lengths, logits=..., hidden=..., attention=...,
                 input_ids=..., token_type_ids=...)                      # per batch
        w.close()      # index; the manifest once every shard is closed

    append() takes padded batch tensors on any device, in any float dtype:
      example_ids [B] int, lengths [B] int (real tokens; right padding: tokens 0..L-1),
      logits [B, C] or None, hidden [n_hid, B, Lp, d] or a list of [B, Lp, d] or None,
      attention [n_att, B, H, Lp, Lp] or a list of [B, H, Lp, Lp] or None (pre-softmax scores;
      whatever is in padded rows/columns, e.g. the mask's dtype minimum, is dropped),
      or instead query and key, each [n_att, B, H, Lp, d_h] or a list of [B, H, Lp, d_h]
      (unscaled, as tinybert_fast.capture.record_qk gives them; scores = Q K^T / sqrt(d_h)).
    attention_storage: "auto" (default) stores Q and K for the examples where they take fewer
    bytes than the scores (about L > 2*d_h; `qk_min_length`) and the scores of the others, computed
    from Q and K; "qk" stores Q and K for every example (what attention_mse_qk reads);
    "scores" stores scores.  Given scores (not Q and K), "auto" stores scores and "qk" is an error.
    The first append fixes the layout; later ones must match it.  Memory stays bounded by a batch:
    records go to the data file at once and are committed (fsync + journal entry) every
    `chunk_examples` examples.  A writer opened on a folder where a build of the same fingerprint
    was interrupted resumes it: `committed` holds the example ids already stored, and append()
    skips them (ids appended twice otherwise are an error).  `fingerprint` (a JSON-able dict) is
    stored in the manifest; `format_version` and `dtype` are added to it, and at the end
    `example_ids` and `tokens` (fingerprint.tokens_fingerprint of the token digests of every
    example: give append input_ids, and token_type_ids if any, for that; None without them).
    Opening a folder removes the temp files a killed write left there (remove_temp_files); a
    resumed shard's committed chunks are checked against their CRC32C first (verify_chunks).
    """

    def __init__(self, path: str | os.PathLike, dtype="bf16", *, fingerprint: dict | None = None,
                 shard: tuple[int, int] | None = None, chunk_examples: int = 1024,
                 overwrite: bool = False, fsync: bool = True, num_threads: int | None = None,
                 attention_storage: str = "auto"):
        ops()
        self.path = os.fspath(path)
        self.dtype = storage_name(dtype)
        if attention_storage not in ATTENTION_STORAGE:
            raise ValueError(f"attention_storage must be one of {ATTENTION_STORAGE}; got "
                             f"{attention_storage!r}")
        self.attention_storage = attention_storage
        self.rank, self.world = resolve_shard(shard)
        if chunk_examples < 1:
            raise ValueError(f"chunk_examples must be >= 1; got {chunk_examples}")
        self.chunk_examples = int(chunk_examples)
        self.fsync = fsync
        self.num_threads = num_threads or default_threads()
        fp = dict(fingerprint or {})
        fp.setdefault("format_version", FORMAT_VERSION)
        if fp.setdefault("dtype", self.dtype) != self.dtype:
            raise ValueError(f"fingerprint['dtype'] is {fp['dtype']!r} but dtype is {self.dtype!r}")
        self.fingerprint = json.loads(canonical(fp))
        self.spec = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                     "fingerprint": self.fingerprint, "world_size": self.world}
        self.spec_hash = hashlib.sha256(canonical(self.spec).encode()).digest()
        os.makedirs(self.path, exist_ok=True)
        self._data_path = os.path.join(self.path, shard_name(self.rank, self.world, "data"))
        self._index_path = os.path.join(self.path, shard_name(self.rank, self.world, "index"))
        self._journal_path = os.path.join(self.path, shard_name(self.rank, self.world, "journal"))
        self._committed_tokens: dict[int, int] = {}  # example id -> token digest, committed
        self._prepare_folder(overwrite)

        self.layout: CacheLayout | None = None
        self._ids: list[np.ndarray] = []          # committed, per chunk
        self._lengths: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        self._crcs: list[np.ndarray] = []
        self._tokens: list[np.ndarray] = []
        self._has_tokens: bool | None = None      # whether appends give input_ids
        self._chunks: list[tuple[int, int, int, int]] = []
        self._resumed: set[int] = set()
        self._seen: set[int] = set()
        self._pending: list[tuple[np.ndarray, ...]] = []
        self._pending_n = 0
        self._journal = None
        self._closed = self.done
        if not self.done:
            self._open_files()

    # -- setup --------------------------------------------------------------------------------
    def _prepare_folder(self, overwrite: bool) -> None:
        manifest = os.path.join(self.path, MANIFEST)
        spec_path = os.path.join(self.path, BUILD_SPEC)
        remove_temp_files(self.path)
        if overwrite:
            mine = [manifest, self._data_path, self._index_path, self._journal_path]
            if self.world == 1 and os.path.isdir(self.path):  # nobody else is writing here
                mine += [os.path.join(self.path, n) for n in os.listdir(self.path)
                         if _SHARD_FILE.fullmatch(n) or is_temp_file(n)]
            for p in mine:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(p)
        if os.path.exists(manifest):
            raise CacheError(f"{self.path} already holds a complete cache ({MANIFEST}); open it "
                             f"with TeacherCache.open, or pass overwrite=True to rebuild it")
        if os.path.exists(spec_path):
            old = read_json(spec_path)
            if canonical(old) != canonical(self.spec):
                if not overwrite and isinstance(old, dict) and old.get("format_version") != \
                        FORMAT_VERSION:
                    raise CacheMismatchError(
                        f"{self.path} holds an interrupted build of cache format version "
                        f"{old.get('format_version')}; this tinybert_fast writes version "
                        f"{FORMAT_VERSION}: {REBUILD}")
                if not overwrite:
                    differences = diff(old, self.spec)
                    raise CacheMismatchError(
                        f"{self.path} holds an interrupted build of something else; differences: "
                        + "; ".join(differences) + ".  Remove the folder or pass overwrite=True")
                _atomic_write(spec_path, json.dumps(self.spec, indent=1).encode(), self.fsync)
        else:
            _atomic_write(spec_path, json.dumps(self.spec, indent=1).encode(), self.fsync)
        # A shard whose index exists was finished by an earlier run (killed before the manifest
        # was written): there is nothing to append; close() writes the manifest.
        self.done = os.path.exists(self._index_path)
        if self.done:
            idx = decode_index(self._index_path)
            if idx.spec != self.spec_hash:
                raise CacheCorruptionError(f"{self._index_path}: belongs to another build; "
                                           f"remove it or pass overwrite=True")
            if not os.path.exists(self._data_path):
                raise CacheCorruptionError(f"{self._data_path}: missing data file of a finished "
                                           f"shard: {REBUILD}")
            verify_chunks(self._data_path, idx.chunks, idx.ids, idx.lengths, idx.offsets,
                          idx.crcs, idx.layout)
            self._committed_tokens = dict(zip(idx.ids.tolist(), idx.tokens.tolist()))
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._journal_path)

    def _open_files(self) -> None:
        header = DATA_HEADER.pack(DATA_MAGIC, FORMAT_VERSION, DATA_HEADER_BYTES, self.rank,
                                   self.world, self.spec_hash)
        self._end = DATA_HEADER_BYTES
        resumed = os.path.exists(self._journal_path) and os.path.exists(self._data_path)
        if resumed:
            resumed = self._replay_journal(header)
        if not resumed:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._journal_path)
            with open(self._data_path, "wb") as f:
                f.write(header)
        self._data = open(self._data_path, "r+b")
        self._data.truncate(self._end)  # drop anything written after the last commit
        self._data.seek(self._end)
        self._chunk_start = self._end
        self._chunk_crc = 0

    def _replay_journal(self, header: bytes) -> bool:
        with open(self._journal_path, "rb") as f:
            raw = f.read()
        with open(self._data_path, "rb") as f:
            if f.read(DATA_HEADER_BYTES) != header:
                logger.warning("%s: header does not match this build; starting the shard afresh",
                               self._data_path)
                return False
        hs = JOURNAL_HEADER.size
        if len(raw) < hs + 4 or struct.unpack_from("<I", raw, hs)[0] != crc32c(raw[:hs]):
            return False  # killed while writing the journal header: nothing was committed
        magic, version, rank, world, spec, *lay = JOURNAL_HEADER.unpack_from(raw)
        if (magic != JOURNAL_MAGIC or version != FORMAT_VERSION or spec != self.spec_hash
                or (rank, world) != (self.rank, self.world)):
            logger.warning("%s belongs to another build; starting the shard afresh",
                           self._journal_path)
            return False
        self.layout = CacheLayout.from_ints(lay)
        pos, good = hs + 4, hs + 4
        es = ENTRY_HEADER.size
        while pos + es <= len(raw):
            magic, n, chunk, start, end, ccrc = ENTRY_HEADER.unpack_from(raw, pos)
            size = es + 40 * n + 4
            if magic != ENTRY_MAGIC or pos + size > len(raw) or chunk != len(self._chunks):
                break
            (ecrc,) = struct.unpack_from("<I", raw, pos + size - 4)
            if ecrc != crc32c(raw[pos:pos + size - 4]) or start != self._end:
                break
            arr = np.frombuffer(raw, dtype="<i8", count=5 * n, offset=pos + es).astype(np.int64)
            self._ids.append(arr[:n])
            self._lengths.append(arr[n:2 * n])
            self._offsets.append(arr[2 * n:3 * n])
            self._crcs.append(arr[3 * n:4 * n])
            self._tokens.append(arr[4 * n:])
            self._chunks.append((start, end, ccrc, sum(len(a) for a in self._ids[:-1])))
            self._end = end
            pos += size
            good = pos
        if os.path.getsize(self._data_path) < self._end:
            logger.warning("%s is shorter than its journal says; starting the shard afresh",
                           self._data_path)
            self._reset_committed()
            return False
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
        # Before appending to it: the committed chunks must still be what was committed.
        verify_chunks(self._data_path, self._chunks, cat(self._ids), cat(self._lengths),
                      cat(self._offsets), cat(self._crcs), self.layout)
        if good < len(raw):  # a torn last entry (killed mid-write): drop it
            with open(self._journal_path, "r+b") as f:
                f.truncate(good)
        self._journal = open(self._journal_path, "ab")
        if self._ids:
            self._resumed = set(np.concatenate(self._ids).tolist())
            tokens = cat(self._tokens)
            self._committed_tokens = dict(zip(cat(self._ids).tolist(), tokens.tolist()))
            self._has_tokens = bool((tokens != 0).all())
        logger.info("%s: resuming after %d committed examples", self._data_path,
                    len(self._resumed))
        return True

    def _reset_committed(self) -> None:
        self.layout = None
        self._ids, self._lengths, self._offsets, self._crcs, self._chunks = [], [], [], [], []
        self._tokens = []
        self._end = DATA_HEADER_BYTES
        self._journal = None

    # -- appending ----------------------------------------------------------------------------
    @property
    def committed(self) -> set[int]:
        """Example ids stored by an earlier, interrupted run of this shard (skipped by append)."""
        return self._resumed

    def all_committed(self, example_ids) -> bool:
        ids = np.asarray(torch.as_tensor(example_ids).cpu()).reshape(-1).tolist()
        return bool(self._resumed) and all(i in self._resumed for i in ids)

    def check_committed(self, example_ids, lengths, input_ids, token_type_ids=None) -> None:
        """CacheMismatchError if examples that an earlier, interrupted run stored (committed)
        come with other token ids now (the data changed between the runs); the build calls it
        for the batches it skips.  Shapes as for append; examples not committed are ignored."""
        ids = torch.as_tensor(example_ids).reshape(-1).cpu().to(torch.int64).tolist()
        self._check_resumed(ids, token_digests(input_ids, lengths, token_type_ids))

    def _check_resumed(self, ids: list[int], digests: np.ndarray) -> None:
        stored = self._committed_tokens
        bad = [i for i, d in zip(ids, digests.tolist())
               if i in stored and stored[i] != 0 and stored[i] != d]
        if bad:
            raise CacheMismatchError(
                f"{self.path}: the interrupted build stored examples {bad[:8]} with other token "
                f"ids than these batches give: the training data changed since; remove the "
                f"folder or pass overwrite=True (distill: --rebuild-cache) to build it afresh")

    def append(self, example_ids, lengths, logits=None, hidden=None, attention=None, query=None,
               key=None, input_ids=None, token_type_ids=None) -> None:
        """Store the teacher outputs of one batch (shapes in the class docstring).

        input_ids, token_type_ids: the batch's tokens [B, Lp] (right-padded; token_type_ids None:
        all 0): their digests (fingerprint.token_digests) go into the index, the manifest's
        fingerprint["tokens"] covers them all, and open(expect_tokens=...) checks a training set
        against them.  Give input_ids with every batch or with none."""
        if self._closed:
            why = " (this shard was completed by an earlier run)" if self.done else ""
            raise RuntimeError(f"append on a closed CacheWriter{why}")
        ids = torch.as_tensor(example_ids).reshape(-1).cpu().to(torch.int64)
        B = ids.numel()
        lengths = torch.as_tensor(lengths).reshape(-1).cpu().to(torch.int64)
        if lengths.numel() != B:
            raise ValueError(f"lengths has {lengths.numel()} entries but example_ids has {B}")
        if input_ids is not None:
            if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2
                    or input_ids.shape[0] != B or input_ids.is_floating_point()):
                raise ValueError(f"input_ids: expected an integer tensor [B={B}, L], got "
                                 f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                                 f"{tuple(getattr(input_ids, 'shape', ()))}")
            digests = token_digests(input_ids, lengths, token_type_ids)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids without input_ids: give input_ids too")
        else:
            digests = np.zeros(B, np.int64)
        if self._has_tokens is None:
            self._has_tokens = input_ids is not None
        elif self._has_tokens != (input_ids is not None):
            had = "with" if self._has_tokens else "without"
            raise ValueError(f"input_ids: give them with every batch of a cache or with none "
                             f"(this cache's earlier batches came {had} them)")
        hidden = _stack("hidden", hidden, 3)
        attention = _stack("attention", attention, 4)
        query, key = _stack("query", query, 4), _stack("key", key, 4)
        if (query is None) != (key is None):
            raise ValueError("query and key: give both or neither")
        if query is not None and attention is not None:
            raise ValueError("give attention (scores) or query and key, not both")
        if query is not None and (query.shape != key.shape or query.shape[1] != B):
            raise ValueError(f"query and key: expected equal shapes [n_att, B={B}, H, L, d_h], got "
                             f"{tuple(query.shape)} and {tuple(key.shape)}")
        if attention is not None and self.attention_storage == "qk":
            raise ValueError("attention_storage 'qk' stores queries and keys: pass query= and "
                             "key= (tinybert_fast.capture.record_qk), not scores")
        if logits is not None and (logits.dim() != 2 or logits.shape[0] != B):
            raise ValueError(f"logits: expected [B={B}, C], got {tuple(logits.shape)}")
        if hidden is not None and hidden.shape[1] != B:
            raise ValueError(f"hidden: expected [n_hid, B={B}, L, d], got {tuple(hidden.shape)}")
        if attention is not None and (attention.shape[1] != B
                                      or attention.shape[-1] != attention.shape[-2]):
            raise ValueError(f"attention: expected [n_att, B={B}, H, L, L], got "
                             f"{tuple(attention.shape)}")
        if hidden is None and attention is None and logits is None and query is None:
            raise ValueError("append: logits, hidden, attention and query/key are all None")
        padded = [t.shape[2] for t in (hidden,) if t is not None] + \
                 [t.shape[-1] for t in (attention,) if t is not None] + \
                 [t.shape[-2] for t in (query,) if t is not None]
        if len(set(padded)) > 1:
            raise ValueError(f"hidden and attention (or query/key) have different padded lengths "
                             f"{padded}")
        if B and (int(lengths.min()) < 1 or (padded and int(lengths.max()) > padded[0])):
            raise ValueError(f"lengths must be in [1, {padded[0] if padded else 'inf'}]; got "
                             f"min {int(lengths.min())}, max {int(lengths.max())}")
        scores_in = attention if attention is not None else query
        qk_dim = 0
        if query is not None and self.attention_storage != "scores":
            qk_dim = int(query.shape[-1])
        layout = CacheLayout(
            self.dtype, 0 if logits is None else int(logits.shape[1]),
            0 if hidden is None else int(hidden.shape[0]),
            0 if hidden is None else int(hidden.shape[3]),
            0 if scores_in is None else int(scores_in.shape[0]),
            0 if scores_in is None else int(scores_in.shape[2]),
            qk_dim, qk_min_length(self.attention_storage, self.dtype, qk_dim) if qk_dim else 0)
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise ValueError(f"this batch's layout {layout} differs from the cache's "
                             f"{self.layout}")
        # Resume: drop what an interrupted run already stored; refuse real duplicates.
        id_list = ids.tolist()
        if len(set(id_list)) != len(id_list):
            u, c = np.unique(np.asarray(id_list), return_counts=True)
            raise ValueError(f"example ids repeated within one batch: {u[c > 1][:10].tolist()}")
        self._check_resumed(id_list, digests)
        keep = [b for b, i in enumerate(id_list) if i not in self._resumed]
        dup = [id_list[b] for b in keep if id_list[b] in self._seen]
        if dup:
            raise ValueError(f"example ids appended twice: {dup[:10]}")
        if not keep:
            return
        if len(keep) < B:
            sel = torch.tensor(keep)
            ids, lengths, digests = ids[sel], lengths[sel], digests[keep]
            pick = (lambda t, dim: None if t is None  # noqa: E731
                    else t.index_select(dim, sel.to(t.device)))
            logits, hidden, attention = pick(logits, 0), pick(hidden, 1), pick(attention, 1)
            query, key = pick(query, 1), pick(key, 1)
        Lmax = int(lengths.max())
        if hidden is not None:
            hidden = hidden[:, :, :Lmax]
        if attention is not None:
            attention = attention[..., :Lmax, :Lmax]
        qk = None
        if query is not None:  # Q and K of the long examples; scores of the others, from Q and K
            on_qk = torch.as_tensor(self.layout.stores_qk(lengths.numpy()))
            q, k = query[..., :Lmax, :], key[..., :Lmax, :]
            if bool(on_qk.any()):
                sel = torch.nonzero(on_qk)[:, 0].to(q.device)
                qk = torch.stack([q.index_select(1, sel), k.index_select(1, sel)])
            if not bool(on_qk.all()):
                sel = torch.nonzero(~on_qk)[:, 0].to(q.device)
                attention = scores_from_qk(q.index_select(1, sel), k.index_select(1, sel))
        store = torch.float32 if self.dtype == "int8" else STORAGE[self.dtype][1]
        on_qk = self.layout.stores_qk(lengths.numpy())
        tensors = {}
        for name, t in (("logits", logits), ("hidden", hidden), ("attention", attention),
                        ("qk", qk)):
            if t is None:
                tensors[name] = None
                continue
            if not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
            t = t.detach()
            if name != "logits":
                # Zero what is not stored (the mask's dtype minimum in padded scores would turn
                # into -inf in fp16 and hide real overflow from the finiteness check).
                mine = on_qk if name == "qk" else ~on_qk if name == "attention" else \
                    np.ones(len(on_qk), bool)
                n = torch.as_tensor(lengths.numpy()[mine]).to(t.device)
                tok = torch.arange(t.shape[-2], device=t.device)[None, :] < n[:, None]
                keep_mask = (tok[None, :, :, None] if name == "hidden"
                             else tok[None, None, :, None, :, None] if name == "qk"
                             else tok[None, :, None, :, None] & tok[None, :, None, None, :])
                t = t.masked_fill(~keep_mask, 0)
            tensors[name] = t.to(store).cpu().contiguous()
        self._check_finite(ids, lengths, on_qk, tensors)
        records, offsets, crcs = ops().pack(lengths, tensors["logits"], tensors["hidden"],
                                             tensors["attention"], tensors["qk"],
                                             self.layout.ints(), self.num_threads)
        self._data.write(memoryview(records.numpy()))
        self._chunk_crc = crc32c(records, self._chunk_crc)
        start = self._end
        self._end += records.numel()
        self._pending.append((ids.numpy().copy(), lengths.numpy().copy(),
                              offsets[:-1].numpy() + start, crcs.numpy().copy(), digests.copy()))
        self._pending_n += len(keep)
        self._seen.update(ids.tolist())
        if self._pending_n >= self.chunk_examples:
            self._commit()

    @staticmethod
    def _check_finite(ids, lengths, on_qk, tensors) -> None:
        for name, t in tensors.items():
            if t is None or bool(torch.isfinite(t).all()):
                continue
            # find the example: the slow path, only on failure
            where = (np.nonzero(on_qk)[0] if name == "qk" else np.nonzero(~on_qk)[0]
                     if name == "attention" else np.arange(ids.numel()))
            for k, b in enumerate(where.tolist()):
                L = int(lengths[b])
                part = (t[b] if name == "logits" else t[:, b, :L] if name == "hidden"
                        else t[:, :, k, :, :L] if name == "qk" else t[:, k, :, :L, :L])
                if not bool(torch.isfinite(part).all()):
                    what = "query/key" if name == "qk" else name
                    raise ValueError(f"{what} of example {int(ids[b])} has non-finite values "
                                     f"(inf/nan): refusing to cache them")

    def _commit(self) -> None:
        if not self._pending:
            return
        self._data.flush()
        if self.fsync:
            os.fsync(self._data.fileno())
        _crash_point("after_data_sync")
        ids, lengths, offsets, crcs, tokens = (np.concatenate([p[k] for p in self._pending])
                                               for k in range(5))
        n = len(ids)
        if self._journal is None:
            head = JOURNAL_HEADER.pack(JOURNAL_MAGIC, FORMAT_VERSION, self.rank, self.world,
                                        self.spec_hash, *self.layout.ints())
            self._journal = open(self._journal_path, "wb")
            self._journal.write(head + struct.pack("<I", crc32c(head)))
        body = ENTRY_HEADER.pack(ENTRY_MAGIC, n, len(self._chunks), self._chunk_start, self._end,
                                  self._chunk_crc)
        body += b"".join(np.ascontiguousarray(a, dtype="<i8").tobytes()
                         for a in (ids, lengths, offsets, crcs, tokens))
        entry = body + struct.pack("<I", crc32c(body))
        half = len(entry) // 2
        self._journal.write(entry[:half])
        self._journal.flush()
        _crash_point("journal_torn")
        self._journal.write(entry[half:])
        self._journal.flush()
        if self.fsync:
            os.fsync(self._journal.fileno())
        self._chunks.append((self._chunk_start, self._end, self._chunk_crc,
                             sum(len(a) for a in self._ids)))
        self._ids.append(ids)
        self._lengths.append(lengths)
        self._offsets.append(offsets)
        self._crcs.append(crcs)
        self._tokens.append(tokens)
        self._pending, self._pending_n = [], 0
        self._chunk_start, self._chunk_crc = self._end, 0
        _crash_point("after_commit")

    def close(self) -> bool:
        """Commit, write this shard's index, and the manifest if every shard is done.

        Returns True when the cache is complete (openable)."""
        if self._closed:
            return finalize(self.path, self.fsync)
        self._commit()
        self._data.flush()
        if self.fsync:
            os.fsync(self._data.fileno())
        self._data.close()
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
        index = encode_index(self.rank, self.world, self.spec_hash, self.layout, self._end,
                              cat(self._ids), cat(self._lengths), cat(self._offsets),
                              cat(self._crcs), cat(self._tokens),
                              np.asarray(self._chunks, np.int64).reshape(-1, 4))
        _crash_point("before_index")
        _atomic_write(self._index_path, index, self.fsync)
        _crash_point("after_index")
        if self._journal is not None:
            self._journal.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._journal_path)
        self._closed = True
        return finalize(self.path, self.fsync)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        elif not self._closed:  # leave a resumable partial shard
            with contextlib.suppress(Exception):
                self._data.close()
            if self._journal is not None:
                with contextlib.suppress(Exception):
                    self._journal.close()


def _stack(name: str, x, inner_dims: int) -> torch.Tensor | None:
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        if not x:
            return None
        x = torch.stack(list(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor or a list of tensors, got {type(x).__name__}")
    if x.dim() != inner_dims + 1:
        raise ValueError(f"{name}: expected {inner_dims + 1} dimensions (layers stacked first), "
                         f"got shape {tuple(x.shape)}")
    return x
