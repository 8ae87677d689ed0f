"""Teacher-activation cache: run the teacher once, read its outputs back every epoch.

In task distillation the teacher's forward pass is most of every step (BERT-base costs about 6x the
FLOPs of TinyBERT4's forward and backward).  The cache stores, per example, the teacher's logits,
the mapped hidden states and the mapped pre-softmax attention scores, **unpadded** (hidden states
as token-major rows, scores as an L x L block per head), back to back in memory-mapped files with
an offsets index, and hands them back padded, in the layout the fused losses take.

Attention storage (`attention_storage=`): an example of L tokens needs L*L scores per head, or
2*L*d_h values for its queries and keys, from which the scores are Q K^T / sqrt(d_h) (BERT's
scaling; padded keys are simply absent).  "auto" (default) stores Q and K for the examples where
that is smaller (L > 2*d_h: from 129 tokens for BERT-base's d_h = 64, 65 for MiniLM's 32) and
the scores of the others, chosen per example by its length; fetch returns scores either way,
forming those of the Q/K examples with one batched GEMM on the output device.  "qk" stores Q and
K for every example, which `fetch(..., attention="qk")` returns as TeacherBatch.query / .key for
`tbf.attention_mse_qk`; "scores" stores scores only.  When Q and K are stored, the teacher runs
SDPA attention on every layer while the cache is built.

    cache = tbf.TeacherCache.build("cache/sst2", teacher, loader,
                                   attention_layers=[2, 5, 8, 11], hidden_states=[0, 3, 6, 9, 12])
    cache = tbf.TeacherCache.open("cache/sst2")
    t = cache.fetch(batch["example_id"], device="cuda")
    t.attention        # [n_att, B, H, L, L]   (L = longest example of the batch, or pad_to)
    t.query, t.key     # [n_att, B, H, L, d_h]  with fetch(..., attention="qk") instead
    t.hidden           # [n_hid, B, L, d]
    t.logits           # [B, C]
    t.attention_mask   # [B, L] int64, 1 = token
    for t in cache.prefetch(id_batches, device="cuda"):   # batch i+1 staged while i trains
        ...

Every padded entry (padded key columns and query rows of the scores, padded token rows of the
hidden states) is 0.  Output dtype: the storage dtype (fp32 / bf16 / fp16), or `out_dtype`
(default bfloat16) for 8-bit storage.

Storage (`dtype=`) and what a round trip returns:

=====  ==================  ===========================================================
fp32   4 bytes / value     exact
bf16   2 bytes / value     exact for bf16 teacher outputs; fp32 outputs rounded to bf16
fp16   2 bytes / value     exact for fp16 outputs; fp32 outputs rounded to fp16
int8   1 byte / value +    per row (one attention row, Q or K row, hidden row or logits
       4 bytes / row       row) a fp32 scale s = max|row| / 127 and q = rint(x / s),
                           x_hat = q * s: |x_hat - x| <= max|row| * (1/254 + 2^-22) (the
                           2^-22: fp32 arithmetic), then rounding x_hat to out_dtype adds at
                           most u * |x_hat| (u = 2^-8 bf16, 2^-11 fp16, 2^-24 fp32); the
                           row's largest value comes back exactly (up to that rounding)
=====  ==================  ===========================================================

Those hold for what is stored: for an example stored as Q and K, Q and K themselves.  Its scores
are then formed from the stored Q and K with fp32 accumulation and rounded once to the output
dtype, so they carry the storage error of Q and K: in 8-bit, |dS_ij| <= (sum_t |q_it| |dk_jt| +
|dq_it| |k_jt| + |dq_it| |dk_jt|) / sqrt(d_h) with dq, dk bounded as above (tested).

On disk a cache is a folder:

    cache.json                          manifest: format version, fingerprint, layout, shards
                                        (written last: its presence means "complete")
    build.json                          what is being built (lets an interrupted build resume)
    shard-RRRRR-of-WWWWW.data           64-byte header, then records (layout: csrc/teacher_cache.h)
    shard-RRRRR-of-WWWWW.index          example ids, lengths, offsets, CRC32C per record and per
                                        chunk; CRC32C of the whole index
    shard-RRRRR-of-WWWWW.journal        only while building: committed chunks, for resuming

Integrity: the manifest and every index carry a CRC32C, checked on open, where the data files'
sizes and headers are checked too (a truncated or swapped file is refused); every record's
CRC32C is checked when it is read (fetch, prefetch), so a flipped byte raises
`CacheCorruptionError` naming the file and the example; `cache.verify()` checks every chunk.

Writing is crash-safe: records stream into the data file and are committed a chunk at a time
(data fsync'd, then a checksummed journal entry), the index is written atomically when the shard
is done, and the manifest last.  A build killed at any point leaves no manifest (open refuses it)
and `TeacherCache.build` with the same arguments resumes after the last committed chunk, giving
files identical to an uninterrupted build.  DDP ranks build shards in parallel
(`shard=(rank, world_size)`, or taken from torch.distributed); whichever finishes last writes the
manifest.  Readers (any number of processes) map the files read-only.

The C++ extension (csrc/) does the byte work: packing, a multithreaded gather from the mapped
files (into a pinned staging buffer for CUDA), CRC32C, and unpacking (C++ on the CPU; a CUDA
kernel after an asynchronous host-to-device copy on a side stream).  It is compiled on the first
use of the cache, not at install or import (tinybert_fast._extension: cached per torch release,
CUDA version and source hash; `tinybert-fast build-extension` builds it ahead).  `HAS_EXTENSION`
and `HAS_CUDA_KERNELS` say what was built (reading them builds or loads it); without the extension
the cache API raises RuntimeError and the rest of tinybert_fast works.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import mmap
import os
import queue
import struct
import threading
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from . import _extension

logger = logging.getLogger(__name__)

__all__ = ["TeacherCache", "CacheWriter", "TeacherBatch", "CacheLayout", "CacheError",
           "CacheCorruptionError", "CacheMismatchError", "CacheIncompleteError", "HAS_EXTENSION",
           "HAS_CUDA_KERNELS", "FORMAT_VERSION", "INT8_BOUND"]

FORMAT_NAME = "tinybert-fast teacher cache"
FORMAT_VERSION = 2  # 2: attention stored as Q and K for long examples (layout of 8 ints)
MANIFEST = "cache.json"
BUILD_SPEC = "build.json"
# 8-bit storage: |x_hat - x| <= INT8_BOUND * max|row| (before rounding to the output dtype).
INT8_BOUND = 1.0 / 254.0

_DATA_MAGIC, _INDEX_MAGIC, _JOURNAL_MAGIC, _ENTRY_MAGIC = (b"TBFCDATA", b"TBFCINDX", b"TBFCJRNL",
                                                           b"TBFJ")
_DATA_HEADER = struct.Struct("<8sIIII32s8x")            # magic, version, size, rank, world, spec
_INDEX_HEADER = struct.Struct("<8sIIIIQQQ32s8q")        # + n, chunks, data bytes, layout
_INDEX_TRAILER = struct.Struct("<I4s")                  # crc32c of everything before, b"TBFE"
_JOURNAL_HEADER = struct.Struct("<8sIII32s8q")          # magic, version, rank, world, spec, layout
_ENTRY_HEADER = struct.Struct("<4sIqqqq")               # magic, n, chunk, start, end, chunk crc
DATA_HEADER_BYTES = _DATA_HEADER.size
assert DATA_HEADER_BYTES == 64

# name -> (storage code in csrc/teacher_cache.h, torch dtype of the stored values)
_STORAGE = {"fp32": (0, torch.float32), "bf16": (1, torch.bfloat16), "fp16": (2, torch.float16),
            "int8": (3, torch.int8)}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
                  "half": "fp16", "8bit": "int8", "8-bit": "int8",
                  torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                  torch.int8: "int8"}
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# How a cache stores attention: "scores" (an L x L block per head), "qk" (the head's Q and K,
# 2 x L x d_h, for every example) or "auto" (Q and K for the examples where that is smaller).
ATTENTION_STORAGE = ("auto", "scores", "qk")


# --------------------------------------------------------------------------------------------
# The extension: compiled on first use (tinybert_fast._extension), not when this module is imported

_EXTENSION_FLAGS = {"HAS_EXTENSION": lambda s: s.loaded,
                    "HAS_CUDA_KERNELS": lambda s: s.cuda_kernels,
                    "EXTENSION_ERROR": lambda s: s.error}


def __getattr__(name: str):
    """HAS_EXTENSION, HAS_CUDA_KERNELS, EXTENSION_ERROR: the first access builds (or loads from
    the cache) and loads the extension."""
    if name in _EXTENSION_FLAGS:
        return _EXTENSION_FLAGS[name](_extension.state())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _ops():
    return _extension.ops()


def _has_cuda_kernels() -> bool:
    return _extension.state().cuda_kernels


def build_info() -> str:
    """What the loaded extension was built against, e.g. "torch 2.14.1 cuda"."""
    return _ops().build_info()


def _default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def crc32c(data: bytes | bytearray | memoryview | np.ndarray | torch.Tensor, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of a buffer, continuing from `crc`."""
    if not isinstance(data, torch.Tensor):
        arr = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        if arr.size == 0:
            return crc
        with warnings.catch_warnings():  # read-only buffers: the op only reads
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(np.ascontiguousarray(arr).view(np.uint8).reshape(-1))
    return int(_ops().crc32c(data.contiguous(), crc))


# --------------------------------------------------------------------------------------------
# Errors and small types

class CacheError(RuntimeError):
    """Base class of the teacher cache's errors."""


class CacheCorruptionError(CacheError):
    """A cache file is damaged (checksum mismatch, truncated, missing, foreign)."""


class CacheIncompleteError(CacheError):
    """The folder holds a build that has not finished (or is still running)."""


class CacheMismatchError(CacheError, ValueError):
    """The cache was built from something else than what the caller expects (fingerprint)."""


class TeacherBatch(NamedTuple):
    """Teacher outputs of a batch, padded to L (the longest example, or pad_to).

    attention: [n_att, B, H, L, L] pre-softmax scores (None when none are stored, or when fetched
        with attention="qk")
    hidden: [n_hid, B, L, d] (None when none are stored)
    logits: [B, C] (None when none are stored)
    attention_mask: [B, L] int64, 1 = token, 0 = padding
    example_ids: [B] int64 (CPU)
    query, key: [n_att, B, H, L, d_h] unscaled queries and keys (fetch(..., attention="qk") only;
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


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """What one record holds (shared by every record of a cache)."""
    dtype: str             # "fp32" | "bf16" | "fp16" | "int8"
    num_logits: int        # C (0: no logits)
    num_hidden: int        # mapped hidden states
    hidden_size: int       # d
    num_attention: int     # mapped attention layers
    num_heads: int         # H
    qk_head_dim: int = 0   # d_h of stored Q and K (0: every example stores its scores)
    qk_min_length: int = 0  # examples of at least this many tokens store Q and K, not scores

    def ints(self) -> list[int]:
        """The `int[] layout` argument of the ops (csrc/teacher_cache.h: Layout)."""
        return [self.num_logits, self.num_hidden, self.hidden_size, self.num_attention,
                self.num_heads, _STORAGE[self.dtype][0], self.qk_head_dim, self.qk_min_length]

    @classmethod
    def from_ints(cls, v: Sequence[int]) -> CacheLayout:
        names = {code: name for name, (code, _) in _STORAGE.items()}
        return cls(names[int(v[5])], int(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]),
                   int(v[6]), int(v[7]))

    def stores_qk(self, lengths) -> np.ndarray:
        """bool per example length: stored as Q and K (True) or as scores (csrc: stores_qk)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if not (self.num_attention and self.qk_head_dim):
            return np.zeros(lengths.shape, bool)
        return lengths >= self.qk_min_length

    @property
    def fields(self) -> list[str]:
        return [f for f, n in (("logits", self.num_logits), ("hidden", self.num_hidden),
                               ("attention", self.num_attention)) if n > 0]

    @property
    def element_size(self) -> int:
        return {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}[self.dtype]

    def record_bytes(self, lengths) -> np.ndarray:
        """Bytes of the record of each example length (the layout in csrc/teacher_cache.h)."""
        t = torch.as_tensor(np.asarray(lengths, dtype=np.int64).reshape(-1))
        return _ops().record_bytes(t, self.ints()).numpy()

    def padded_bytes(self, length: int) -> int:
        """Bytes of one example stored padded to `length` in the storage dtype (no scales)."""
        return self.element_size * (self.num_logits + self.num_hidden * length * self.hidden_size
                                    + self.num_attention * self.num_heads * length * length)


def _qk_min_length(storage: str, dtype: str, head_dim: int) -> int:
    """The shortest example that stores Q and K under attention storage `storage`: 1 for "qk";
    for "auto" the shortest length L whose Q and K take fewer bytes than its scores, per head
    2*L*d_h*e (+ 8*L scale bytes in 8-bit) against L*L*e (+ 4*L), i.e. about L > 2*d_h."""
    if storage == "qk":
        return 1
    e = _STORAGE[dtype][1].itemsize
    extra = 4 if dtype == "int8" else 0   # one more fp32 scale per row: 2L rows against L
    return 2 * head_dim + (extra + e - 1) // e + 1


def _storage_name(dtype) -> str:
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in _STORAGE:
        raise ValueError(f"dtype must be one of 'fp32', 'bf16', 'fp16', 'int8' (or the torch "
                         f"dtypes float32, bfloat16, float16, int8); got {dtype!r}")
    return name


# --------------------------------------------------------------------------------------------
# Fingerprints

def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _sha256_json(obj) -> str:
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()


def hash_state_dict(model: torch.nn.Module) -> str:
    """sha256 over a module's state dict: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()


# Config keys that do not change the teacher's outputs, or that the weights hash already covers.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash",
                         "_attn_implementation", "_attn_implementation_internal",
                         "_attn_implementation_autoset", "attn_implementation", "torch_dtype",
                         "dtype", "output_hidden_states", "output_attentions", "return_dict",
                         "use_cache", "_experts_implementation"}


def _config_dict(teacher) -> dict | None:
    config = getattr(teacher, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return json.loads(_canonical(d))


def _tokenizer_fingerprint(tokenizer) -> str | None:
    if tokenizer is None:
        return None
    if isinstance(tokenizer, str):
        return tokenizer
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else None
    return _sha256_json({"class": type(tokenizer).__name__, "vocab": vocab,
                         "lower": getattr(tokenizer, "do_lower_case", None),
                         "special": getattr(tokenizer, "special_tokens_map", None)})


def example_ids_fingerprint(example_ids) -> dict:
    ids = np.sort(np.asarray(torch.as_tensor(example_ids).cpu(), dtype="<i8").reshape(-1))
    return {"count": int(ids.size), "sha256": hashlib.sha256(ids.tobytes()).hexdigest()}


def _probe_logits(teacher) -> bool:
    """Whether the teacher's output has logits (one forward over one token)."""
    try:
        device = next(teacher.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.inference_mode():
        out = teacher(input_ids=ids, attention_mask=torch.ones_like(ids))
    return getattr(out, "logits", None) is not None


def _diff(have, want, path: str = "") -> list[str]:
    """Human-readable differences of `want` (expected) against `have` (the cache's)."""
    def short(v):
        s = _canonical(v)
        return s if len(s) <= 80 else s[:77] + "..."
    if isinstance(want, dict) and isinstance(have, dict):
        out = []
        for k in sorted(set(want)):
            p = f"{path}.{k}" if path else k
            if k not in have:
                out.append(f"{p}: not in the cache (expected {short(want[k])})")
            else:
                out += _diff(have[k], want[k], p)
        return out
    if _canonical(have) != _canonical(want):
        return [f"{path}: cache has {short(have)}, expected {short(want)}"]
    return []


# --------------------------------------------------------------------------------------------
# Files

def _crash_point(name: str) -> None:
    """Test hook (tests/test_cache.py kills the process here); a no-op otherwise."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, data: bytes, fsync: bool = True) -> None:
    """Write a file so that readers see the old file or the whole new one, never a part."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _shard_name(rank: int, world: int, ext: str) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.{ext}"


def _read_json(path: str):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheCorruptionError(f"{path}: not valid JSON ({exc}): the file is corrupt") from None


def _manifest_checksum(manifest: dict) -> int:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return crc32c(_canonical(body).encode())


class _Index(NamedTuple):
    rank: int
    world: int
    spec: bytes
    layout: CacheLayout | None
    data_bytes: int
    ids: np.ndarray        # int64 [n]
    lengths: np.ndarray    # int64 [n]
    offsets: np.ndarray    # int64 [n]
    crcs: np.ndarray       # int64 [n]
    chunks: np.ndarray     # int64 [k, 4]: start, end, crc, first example
    crc: int               # of the whole file


def _encode_index(rank, world, spec: bytes, layout: CacheLayout | None, data_bytes: int, ids,
                  lengths, offsets, crcs, chunks) -> bytes:
    n, k = len(ids), len(chunks)
    head = _INDEX_HEADER.pack(_INDEX_MAGIC, FORMAT_VERSION, rank, world, 0, n, k, data_bytes, spec,
                              *(layout.ints() if layout else [-1] * 8))
    body = b"".join(np.ascontiguousarray(a, dtype="<i8").tobytes()
                    for a in (ids, lengths, offsets, crcs, np.asarray(chunks).reshape(-1, 4)))
    crc = crc32c(head + body)
    return head + body + _INDEX_TRAILER.pack(crc, b"TBFE")


def _decode_index(path: str) -> _Index:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CacheCorruptionError(f"{path}: missing index file (the cache is damaged: rebuild "
                                   f"it, or this shard)") from None
    hs, ts = _INDEX_HEADER.size, _INDEX_TRAILER.size
    if len(raw) < hs + ts:
        raise CacheCorruptionError(f"{path}: index file truncated ({len(raw)} bytes)")
    crc, end = _INDEX_TRAILER.unpack_from(raw, len(raw) - ts)
    if end != b"TBFE" or crc != crc32c(raw[:len(raw) - ts]):
        raise CacheCorruptionError(f"{path}: index checksum mismatch (the file is corrupt or "
                                   f"truncated)")
    magic, version, rank, world, _, n, k, data_bytes, spec, *lay = _INDEX_HEADER.unpack_from(raw)
    if magic != _INDEX_MAGIC or version != FORMAT_VERSION:
        raise CacheCorruptionError(f"{path}: not a format-{FORMAT_VERSION} index file")
    if len(raw) != hs + 8 * (4 * n + 4 * k) + ts:
        raise CacheCorruptionError(f"{path}: index size does not match its header")
    arr = np.frombuffer(raw, dtype="<i8", count=4 * n + 4 * k, offset=hs).astype(np.int64)
    layout = CacheLayout.from_ints(lay) if lay[0] >= 0 else None
    return _Index(rank, world, spec, layout, data_bytes, arr[:n], arr[n:2 * n], arr[2 * n:3 * n],
                  arr[3 * n:4 * n], arr[4 * n:].reshape(k, 4), crc)


# --------------------------------------------------------------------------------------------
# Writing

class CacheWriter:
    """Streams teacher outputs of one shard into a cache folder (the low-level writer).

        w = CacheWriter(path, dtype="bf16", fingerprint={...}, shard=(rank, world_size))
        w.append(example_ids, lengths, logits=..., hidden=..., attention=...)   # per batch
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
    stored in the manifest; `format_version` and `dtype` are added to it.
    """

    def __init__(self, path: str | os.PathLike, dtype="bf16", *, fingerprint: dict | None = None,
                 shard: tuple[int, int] | None = None, chunk_examples: int = 1024,
                 overwrite: bool = False, fsync: bool = True, num_threads: int | None = None,
                 attention_storage: str = "auto"):
        _ops()
        self.path = os.fspath(path)
        self.dtype = _storage_name(dtype)
        if attention_storage not in ATTENTION_STORAGE:
            raise ValueError(f"attention_storage must be one of {ATTENTION_STORAGE}; got "
                             f"{attention_storage!r}")
        self.attention_storage = attention_storage
        self.rank, self.world = _resolve_shard(shard)
        if chunk_examples < 1:
            raise ValueError(f"chunk_examples must be >= 1; got {chunk_examples}")
        self.chunk_examples = int(chunk_examples)
        self.fsync = fsync
        self.num_threads = num_threads or _default_threads()
        fp = dict(fingerprint or {})
        fp.setdefault("format_version", FORMAT_VERSION)
        if fp.setdefault("dtype", self.dtype) != self.dtype:
            raise ValueError(f"fingerprint['dtype'] is {fp['dtype']!r} but dtype is {self.dtype!r}")
        self.fingerprint = json.loads(_canonical(fp))
        self.spec = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                     "fingerprint": self.fingerprint, "world_size": self.world}
        self.spec_hash = hashlib.sha256(_canonical(self.spec).encode()).digest()
        os.makedirs(self.path, exist_ok=True)
        self._data_path = os.path.join(self.path, _shard_name(self.rank, self.world, "data"))
        self._index_path = os.path.join(self.path, _shard_name(self.rank, self.world, "index"))
        self._journal_path = os.path.join(self.path, _shard_name(self.rank, self.world, "journal"))
        self._prepare_folder(overwrite)

        self.layout: CacheLayout | None = None
        self._ids: list[np.ndarray] = []          # committed, per chunk
        self._lengths: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        self._crcs: list[np.ndarray] = []
        self._chunks: list[tuple[int, int, int, int]] = []
        self._resumed: set[int] = set()
        self._seen: set[int] = set()
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_n = 0
        self._journal = None
        self._closed = self.done
        if not self.done:
            self._open_files()

    # -- setup --------------------------------------------------------------------------------
    def _prepare_folder(self, overwrite: bool) -> None:
        manifest = os.path.join(self.path, MANIFEST)
        spec_path = os.path.join(self.path, BUILD_SPEC)
        if overwrite:
            mine = [manifest, self._data_path, self._index_path, self._journal_path]
            if self.world == 1 and os.path.isdir(self.path):  # nobody else is writing here
                mine += [os.path.join(self.path, n) for n in os.listdir(self.path)
                         if n.startswith("shard-") or ".tmp-" in n]
            for p in mine:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(p)
        if os.path.exists(manifest):
            raise CacheError(f"{self.path} already holds a complete cache ({MANIFEST}); open it "
                             f"with TeacherCache.open, or pass overwrite=True to rebuild it")
        if os.path.exists(spec_path):
            old = _read_json(spec_path)
            if _canonical(old) != _canonical(self.spec):
                if not overwrite:
                    diff = _diff(old, self.spec)
                    raise CacheMismatchError(
                        f"{self.path} holds an interrupted build of something else; differences: "
                        + "; ".join(diff) + ".  Remove the folder or pass overwrite=True")
                _atomic_write(spec_path, json.dumps(self.spec, indent=1).encode(), self.fsync)
        else:
            _atomic_write(spec_path, json.dumps(self.spec, indent=1).encode(), self.fsync)
        # A shard whose index exists was finished by an earlier run (killed before the manifest
        # was written): there is nothing to append; close() writes the manifest.
        self.done = os.path.exists(self._index_path)
        if self.done:
            if _decode_index(self._index_path).spec != self.spec_hash:
                raise CacheCorruptionError(f"{self._index_path}: belongs to another build; "
                                           f"remove it or pass overwrite=True")
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._journal_path)

    def _open_files(self) -> None:
        header = _DATA_HEADER.pack(_DATA_MAGIC, FORMAT_VERSION, DATA_HEADER_BYTES, self.rank,
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
        hs = _JOURNAL_HEADER.size
        if len(raw) < hs + 4 or struct.unpack_from("<I", raw, hs)[0] != crc32c(raw[:hs]):
            return False  # killed while writing the journal header: nothing was committed
        magic, version, rank, world, spec, *lay = _JOURNAL_HEADER.unpack_from(raw)
        if (magic != _JOURNAL_MAGIC or version != FORMAT_VERSION or spec != self.spec_hash
                or (rank, world) != (self.rank, self.world)):
            logger.warning("%s belongs to another build; starting the shard afresh",
                           self._journal_path)
            return False
        self.layout = CacheLayout.from_ints(lay)
        pos, good = hs + 4, hs + 4
        es = _ENTRY_HEADER.size
        while pos + es <= len(raw):
            magic, n, chunk, start, end, ccrc = _ENTRY_HEADER.unpack_from(raw, pos)
            size = es + 32 * n + 4
            if magic != _ENTRY_MAGIC or pos + size > len(raw) or chunk != len(self._chunks):
                break
            (ecrc,) = struct.unpack_from("<I", raw, pos + size - 4)
            if ecrc != crc32c(raw[pos:pos + size - 4]) or start != self._end:
                break
            arr = np.frombuffer(raw, dtype="<i8", count=4 * n, offset=pos + es).astype(np.int64)
            self._ids.append(arr[:n])
            self._lengths.append(arr[n:2 * n])
            self._offsets.append(arr[2 * n:3 * n])
            self._crcs.append(arr[3 * n:])
            self._chunks.append((start, end, ccrc, sum(len(a) for a in self._ids[:-1])))
            self._end = end
            pos += size
            good = pos
        if os.path.getsize(self._data_path) < self._end:
            logger.warning("%s is shorter than its journal says; starting the shard afresh",
                           self._data_path)
            self._reset_committed()
            return False
        if good < len(raw):  # a torn last entry (killed mid-write): drop it
            with open(self._journal_path, "r+b") as f:
                f.truncate(good)
        self._journal = open(self._journal_path, "ab")
        if self._ids:
            self._resumed = set(np.concatenate(self._ids).tolist())
        logger.info("%s: resuming after %d committed examples", self._data_path,
                    len(self._resumed))
        return True

    def _reset_committed(self) -> None:
        self.layout = None
        self._ids, self._lengths, self._offsets, self._crcs, self._chunks = [], [], [], [], []
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

    def append(self, example_ids, lengths, logits=None, hidden=None, attention=None, query=None,
               key=None) -> None:
        """Store the teacher outputs of one batch (shapes in the class docstring)."""
        if self._closed:
            why = " (this shard was completed by an earlier run)" if self.done else ""
            raise RuntimeError(f"append on a closed CacheWriter{why}")
        ids = torch.as_tensor(example_ids).reshape(-1).cpu().to(torch.int64)
        B = ids.numel()
        lengths = torch.as_tensor(lengths).reshape(-1).cpu().to(torch.int64)
        if lengths.numel() != B:
            raise ValueError(f"lengths has {lengths.numel()} entries but example_ids has {B}")
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
            qk_dim, _qk_min_length(self.attention_storage, self.dtype, qk_dim) if qk_dim else 0)
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
        keep = [b for b, i in enumerate(id_list) if i not in self._resumed]
        dup = [id_list[b] for b in keep if id_list[b] in self._seen]
        if dup:
            raise ValueError(f"example ids appended twice: {dup[:10]}")
        if not keep:
            return
        if len(keep) < B:
            sel = torch.tensor(keep)
            ids, lengths = ids[sel], lengths[sel]
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
        store = torch.float32 if self.dtype == "int8" else _STORAGE[self.dtype][1]
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
        records, offsets, crcs = _ops().pack(lengths, tensors["logits"], tensors["hidden"],
                                             tensors["attention"], tensors["qk"],
                                             self.layout.ints(), self.num_threads)
        self._data.write(memoryview(records.numpy()))
        self._chunk_crc = crc32c(records, self._chunk_crc)
        start = self._end
        self._end += records.numel()
        self._pending.append((ids.numpy().copy(), lengths.numpy().copy(),
                              offsets[:-1].numpy() + start, crcs.numpy().copy()))
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
        ids, lengths, offsets, crcs = (np.concatenate([p[k] for p in self._pending])
                                       for k in range(4))
        n = len(ids)
        if self._journal is None:
            head = _JOURNAL_HEADER.pack(_JOURNAL_MAGIC, FORMAT_VERSION, self.rank, self.world,
                                        self.spec_hash, *self.layout.ints())
            self._journal = open(self._journal_path, "wb")
            self._journal.write(head + struct.pack("<I", crc32c(head)))
        body = _ENTRY_HEADER.pack(_ENTRY_MAGIC, n, len(self._chunks), self._chunk_start, self._end,
                                  self._chunk_crc)
        body += b"".join(np.ascontiguousarray(a, dtype="<i8").tobytes()
                         for a in (ids, lengths, offsets, crcs))
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
        self._pending, self._pending_n = [], 0
        self._chunk_start, self._chunk_crc = self._end, 0
        _crash_point("after_commit")

    def close(self) -> bool:
        """Commit, write this shard's index, and the manifest if every shard is done.

        Returns True when the cache is complete (openable)."""
        if self._closed:
            return _try_finalize(self.path, self.fsync)
        self._commit()
        self._data.flush()
        if self.fsync:
            os.fsync(self._data.fileno())
        self._data.close()
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
        index = _encode_index(self.rank, self.world, self.spec_hash, self.layout, self._end,
                              cat(self._ids), cat(self._lengths), cat(self._offsets),
                              cat(self._crcs), np.asarray(self._chunks, np.int64).reshape(-1, 4))
        _crash_point("before_index")
        _atomic_write(self._index_path, index, self.fsync)
        _crash_point("after_index")
        if self._journal is not None:
            self._journal.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._journal_path)
        self._closed = True
        return _try_finalize(self.path, self.fsync)

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


def scores_from_qk(query: torch.Tensor, key: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """Pre-softmax scores Q K^T / sqrt(d_h) without a mask: [..., L, d_h] x2 -> [..., L, L].

    One batched GEMM with the scale applied to the fp32 accumulator and one rounding to
    `out_dtype` (default: the inputs' dtype); rows of Q or K that are 0 (padding) give 0 scores."""
    out_dtype = query.dtype if out_dtype is None else out_dtype
    *lead, L, dh = query.shape
    q = query.reshape(-1, L, dh)
    k = key.reshape(-1, L, dh)
    if q.dtype != out_dtype:
        q, k = q.to(out_dtype), k.to(out_dtype)
    out = torch.empty(q.shape[0], L, L, dtype=out_dtype, device=q.device)
    torch.baddbmm(out, q, k.transpose(1, 2), beta=0.0, alpha=dh ** -0.5, out=out)
    return out.view(*lead, L, L)


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


def _resolve_shard(shard) -> tuple[int, int]:
    if shard is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    rank, world = (int(v) for v in shard)
    if not (world >= 1 and 0 <= rank < world):
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size; got "
                         f"{shard}")
    return rank, world


def _try_finalize(path: str, fsync: bool = True) -> bool:
    """Write the manifest if every shard's index exists; True when the cache is complete.

    Idempotent and safe to race: every rank that sees all shards writes the same bytes."""
    manifest_path = os.path.join(path, MANIFEST)
    if os.path.exists(manifest_path):
        return True
    spec = _read_json(os.path.join(path, BUILD_SPEC))
    world = int(spec["world_size"])
    spec_hash = hashlib.sha256(_canonical(spec).encode()).digest()
    names = [_shard_name(r, world, "index") for r in range(world)]
    if not all(os.path.exists(os.path.join(path, n)) for n in names):
        return False
    shards, layouts, all_ids, max_len = [], set(), [], 0
    for r, name in enumerate(names):
        idx = _decode_index(os.path.join(path, name))
        if idx.spec != spec_hash:
            raise CacheCorruptionError(f"{os.path.join(path, name)} belongs to another build")
        if idx.layout is not None:
            layouts.add(idx.layout)
        all_ids.append(idx.ids)
        max_len = max(max_len, int(idx.lengths.max()) if len(idx.lengths) else 0)
        shards.append({"data": _shard_name(r, world, "data"), "index": name,
                       "examples": int(len(idx.ids)), "data_bytes": int(idx.data_bytes),
                       "index_crc32c": int(idx.crc)})
    if len(layouts) > 1:
        raise CacheError(f"{path}: shards disagree on the layout: {sorted(map(str, layouts))}")
    ids = np.concatenate(all_ids) if all_ids else np.zeros(0, np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise CacheError(f"{path}: example ids stored by more than one shard: "
                         f"{uniq[counts > 1][:10].tolist()}")
    layout = layouts.pop() if layouts else None
    fingerprint = dict(spec["fingerprint"])
    fields = layout.fields if layout else []
    if fingerprint.setdefault("fields", fields) != fields:
        raise CacheError(f"{path}: the fingerprint names fields {fingerprint['fields']} but the "
                         f"stored outputs are {fields}")
    fingerprint["example_ids"] = example_ids_fingerprint(ids)
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "fingerprint": fingerprint,
                "layout": dataclasses.asdict(layout) if layout else None,
                "num_examples": int(len(ids)), "max_length": max_len, "shards": shards}
    manifest["checksum"] = _manifest_checksum(manifest)
    _atomic_write(manifest_path, json.dumps(manifest, indent=1).encode(), fsync)
    return True


# --------------------------------------------------------------------------------------------
# Reading

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


class _Staging:
    """A pinned host buffer that grows as needed, and the event of the last copy out of it."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.event = None

    def get(self, nbytes: int, pin: bool) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()  # the previous copy out of this buffer must be done
            self.event = None
        if self.buffer is None or self.buffer.numel() < nbytes:
            size = max(nbytes, 1 << 20)
            size = 1 << (size - 1).bit_length()
            self.buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        return self.buffer


class TeacherCache:
    """A complete teacher cache, opened read-only (memory-mapped).  See the module docstring."""

    def __init__(self, path, manifest, indices, num_threads=None):
        self.path = path
        self._manifest = manifest
        self.layout = CacheLayout(**manifest["layout"]) if manifest["layout"] else None
        self.num_threads = num_threads or _default_threads()
        self._files, self._maps, self._sources = [], [], []
        ids, src, offs, lens, crcs = [], [], [], [], []
        for s, (shard, idx) in enumerate(zip(manifest["shards"], indices)):
            self._files.append(os.path.join(path, shard["data"]))
            ids.append(idx.ids)
            src.append(np.full(len(idx.ids), s, np.int64))
            offs.append(idx.offsets)
            lens.append(idx.lengths)
            crcs.append(idx.crcs)
        self._indices = indices
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
        self._ids, self._src, self._offs = cat(ids), cat(src), cat(offs)
        self._lens, self._crcs = cat(lens), cat(crcs)
        self._order = np.argsort(self._ids, kind="stable")
        self._sorted_ids = self._ids[self._order]
        self._nbytes = (self.layout.record_bytes(self._lens) if self.layout and len(self._lens)
                        else np.zeros(0, np.int64))
        self._lock = threading.Lock()
        self._staging = [_Staging(), _Staging()]
        self._staging_next = 0
        self._streams: dict = {}
        self._map_files()

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, expect_fingerprint: dict | None = None, *,
             verify: bool = False, num_threads: int | None = None) -> TeacherCache:
        """Open a complete cache.

        expect_fingerprint: a dict (e.g. from `TeacherCache.make_fingerprint`); every key it has
            must equal the cache's, else CacheMismatchError listing each difference.  Keys it
            lacks are not compared.
        verify: also check the CRC32C of every chunk now (reads every file once); records are
            checked when fetched either way.
        """
        _ops()
        path = os.fspath(path)
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.exists(manifest_path):
            if os.path.exists(os.path.join(path, BUILD_SPEC)):
                raise CacheIncompleteError(
                    f"{path} holds an incomplete teacher cache (no {MANIFEST}): a build was "
                    f"interrupted or is still running; call TeacherCache.build with the same "
                    f"arguments to resume it")
            raise FileNotFoundError(f"{path}: no teacher cache here (no {MANIFEST})")
        manifest = _read_json(manifest_path)
        if not isinstance(manifest, dict) or manifest.get("checksum") != _manifest_checksum(
                manifest):
            raise CacheCorruptionError(f"{manifest_path}: checksum mismatch (the file is corrupt)")
        if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != \
                FORMAT_VERSION:
            raise CacheError(f"{manifest_path}: format {manifest.get('format')!r} version "
                             f"{manifest.get('format_version')}; this tinybert_fast reads "
                             f"{FORMAT_NAME!r} version {FORMAT_VERSION}: rebuild the cache")
        if expect_fingerprint is not None:
            diff = _diff(manifest["fingerprint"], json.loads(_canonical(expect_fingerprint)))
            if diff:
                raise CacheMismatchError(
                    f"{path}: the cache does not match the expected fingerprint: "
                    + "; ".join(diff))
        spec_hash = None
        if os.path.exists(os.path.join(path, BUILD_SPEC)):
            spec_hash = hashlib.sha256(_canonical(_read_json(os.path.join(path, BUILD_SPEC)))
                                       .encode()).digest()
        indices = []
        for shard in manifest["shards"]:
            ipath = os.path.join(path, shard["index"])
            idx = _decode_index(ipath)
            if idx.crc != shard["index_crc32c"]:
                raise CacheCorruptionError(f"{ipath}: not the index this cache was built with")
            if spec_hash is not None and idx.spec != spec_hash:
                raise CacheCorruptionError(f"{ipath}: belongs to another build")
            cls._check_data_file(os.path.join(path, shard["data"]), idx, manifest)
            indices.append(idx)
        cache = cls(path, manifest, indices, num_threads)
        if verify:
            cache.verify()
        return cache

    @staticmethod
    def _check_data_file(dpath: str, idx: _Index, manifest: dict) -> None:
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
        magic, version, hsize, rank, world, spec = _DATA_HEADER.unpack(head)
        if (magic != _DATA_MAGIC or version != FORMAT_VERSION or spec != idx.spec
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
            raise ValueError(f"attention must be 'scores' or 'qk'; got {attention!r}")
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
            store = _STORAGE[self.layout.dtype][1]
            if out_dtype not in (None, store):
                raise TypeError(f"out_dtype: a {self.layout.dtype} cache returns {store}; got "
                                f"{out_dtype}")
            out_dtype = store
        on_qk = self.layout.stores_qk(lens)
        if attention == "qk" and not (self.layout.num_attention and on_qk.all()):
            if not self.layout.num_attention:
                raise ValueError(f"attention='qk': {self.path} stores no attention")
            short = self._ids[rows][~on_qk]
            raise ValueError(
                f"attention='qk': examples {short[:10].tolist()} of this batch are stored as "
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
              attention: str = "scores") -> TeacherBatch:
        """The teacher outputs of these examples, padded, on `device` (default CPU).

        example_ids: [B] ints (list, numpy array or tensor; any order, no need to be sorted).
        pad_to: pad to this length instead of the batch's longest example.
        out_dtype: for 8-bit caches, the float dtype to dequantize to (default bfloat16).
        verify: check each record's CRC32C (raises CacheCorruptionError naming file and example).
        attention: "scores" (TeacherBatch.attention; examples stored as Q and K get
            Q K^T / sqrt(d_h), one batched GEMM accumulated in fp32) or "qk" (TeacherBatch.query
            and .key, for attention_mse_qk; every example of the batch must be stored as Q and K:
            a cache built with attention_storage="qk").
        Shapes and padding: see TeacherBatch.  On CUDA the records are gathered into a pinned
        buffer, copied on a side stream and unpacked by a CUDA kernel; the current stream waits
        for that copy, and the result is safe to use on it.
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        plan = self._plan(example_ids, pad_to, out_dtype, attention)
        if device.type == "cuda" and _has_cuda_kernels():
            with self._lock:
                slot = self._staging[self._staging_next]
                self._staging_next = (self._staging_next + 1) % len(self._staging)
                batch, event = self._stage_cuda(plan, device, slot, verify, num_threads)
            stream = torch.cuda.current_stream(device)
            stream.wait_event(event)
            _record_stream(batch, stream)
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
        att, hid, logit, mask, bad, qk = _ops().unpack(
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

    def _gather(self, plan: _Plan, slot: _Staging, verify, num_threads, pin: bool):
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
        bad = _ops().gather(self._sources, t(self._src[rows]), t(self._offs[rows]), t(nb),
                            t(self._crcs[rows]) if verify else None, staging, t(soff),
                            num_threads or self.num_threads)
        self._raise_bad(bad, rows)
        meta = staging[meta_at:used].view(torch.int64).view(4, len(rows))
        meta[0].copy_(t(soff))
        meta[1].copy_(t(plan.lens))
        meta[2].zero_()
        meta[3].copy_(t(plan.positions))
        return staging[:used], meta_at, total

    def _stage_cuda(self, plan: _Plan, device, slot: _Staging, verify, num_threads):
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
            att, hid, logit, mask, _, qk = _ops().unpack(
                [dev[:max(total, 1)]], meta[2], meta[0], meta[1], None, self.layout.ints(),
                plan.P, plan.out_dtype, 1, meta[3, :Bs], meta[3, Bs:])
            batch = self._result(plan, att, hid, logit, mask, qk, meta[3])
            done = torch.cuda.Event()
            done.record(stream)
        return batch, done

    def prefetch(self, batches: Iterable, device: str | torch.device | None = None, *,
                 depth: int = 2, pad_to: int | None = None, out_dtype: torch.dtype | None = None,
                 batch_size: int | None = None, verify: bool = True,
                 num_threads: int | None = None,
                 attention: str = "scores") -> Iterator[TeacherBatch]:
        """Iterate over TeacherBatch for each batch of example ids, `depth` batches ahead.

        batches: an iterable of id batches (e.g. a BatchSampler over example ids, or lists), or of
            single ids with batch_size given (a Sampler).
        A background thread gathers batch i+1 (C++ threads; pinned buffer, copy on a side stream
        and the unpack kernel on CUDA) while the caller uses batch i.  Each yielded batch is ready
        to use on the current stream.  Errors (a corrupt record, an unknown id) are raised at the
        batch they concern.  attention: as for fetch.
        """
        if depth < 1:
            raise ValueError(f"depth must be >= 1; got {depth}")
        if batch_size is not None:
            batches = _batched(batches, batch_size)
        device = torch.device(device) if device is not None else torch.device("cpu")
        return _Prefetcher(self, batches, device, depth, pad_to, out_dtype, verify, num_threads,
                           attention)

    def verify(self) -> None:
        """Check the CRC32C of every chunk of every data file; on a mismatch, find the example."""
        ops = _ops()
        for s, (src, idx) in enumerate(zip(self._sources, self._indices)):
            for start, end, crc, first in idx.chunks:
                if int(ops.crc32c(src[start:end], 0)) == crc:
                    continue
                sel = np.nonzero((idx.offsets >= start) & (idx.offsets < end))[0]
                nb = self.layout.record_bytes(idx.lengths[sel])
                for i, n in zip(sel, nb):
                    rec = src[idx.offsets[i]:idx.offsets[i] + n]
                    if int(ops.crc32c(rec, 0)) != idx.crcs[i]:
                        raise CacheCorruptionError(
                            f"{self._files[s]}: checksum mismatch in the record of example "
                            f"{int(idx.ids[i])}: the file is corrupt; rebuild the cache")
                raise CacheCorruptionError(f"{self._files[s]}: checksum mismatch in bytes "
                                           f"{start}..{end} (between records)")

    # -- building -----------------------------------------------------------------------------
    @staticmethod
    def make_fingerprint(teacher=None, *, attention_layers: Sequence[int],
                         hidden_states: Sequence[int], dtype="bf16", logits: bool | None = None,
                         tokenizer=None, max_length: int | None = None, dataset=None,
                         example_ids=None, fingerprint_extra=None,
                         attention_storage: str = "auto") -> dict:
        """The fingerprint `build` stores, for `open(..., expect_fingerprint=...)`.

        teacher_weights: sha256 of the state dict; teacher_config: the config (minus keys that
        do not change outputs); tokenizer: sha256 of its class, vocabulary and special tokens (or
        the string given); max_length, attention_layers, hidden_states, fields, dtype,
        attention_storage; dataset:
        whatever identifies the data (a name, a path and a checksum...); example_ids: count and
        sha256 of the sorted ids (only when given); extra: fingerprint_extra.
        """
        if attention_storage not in ATTENTION_STORAGE:
            raise ValueError(f"attention_storage must be one of {ATTENTION_STORAGE}; got "
                             f"{attention_storage!r}")
        if logits is None:
            logits = _probe_logits(teacher) if teacher is not None else False
        fp = {"format_version": FORMAT_VERSION,
              "teacher_weights": hash_state_dict(teacher) if teacher is not None else None,
              "teacher_config": _config_dict(teacher) if teacher is not None else None,
              "tokenizer": _tokenizer_fingerprint(tokenizer),
              "max_length": max_length,
              "attention_layers": [int(i) for i in attention_layers],
              "hidden_states": [int(i) for i in hidden_states],
              "fields": [f for f, on in (("logits", logits), ("hidden", len(hidden_states)),
                                         ("attention", len(attention_layers))) if on],
              "dtype": _storage_name(dtype),
              "attention_storage": attention_storage if len(attention_layers) else None,
              "dataset": dataset,
              "extra": fingerprint_extra}
        if example_ids is not None:
            fp["example_ids"] = example_ids_fingerprint(example_ids)
        return json.loads(_canonical(fp))

    @classmethod
    def build(cls, path: str | os.PathLike, teacher: torch.nn.Module, loader: Iterable[dict], *,
              attention_layers: Sequence[int], hidden_states: Sequence[int], dtype="bf16",
              logits: bool | None = None, tokenizer=None, max_length: int | None = None,
              dataset=None, fingerprint_extra=None, shard: tuple[int, int] | None = None,
              chunk_examples: int = 1024, overwrite: bool = False, fsync: bool = True,
              num_threads: int | None = None, progress: bool = False,
              attention_storage: str = "auto") -> TeacherCache | None:
        """Run the teacher over `loader` once and store its outputs at `path`.

        teacher: a Hugging Face model (BertModel, BertForSequenceClassification, ...).  It runs in
            eval mode under inference_mode, with tinybert_fast.capture's attention (switched to
            for the build and back) to record Q and K (SDPA attention on every layer), or, with
            attention_storage="scores", the pre-softmax scores of the stored layers.
        loader: yields dicts with input_ids [B, L], attention_mask [B, L] (right padding: 1 for
            the first L_i positions), optionally token_type_ids / position_ids, and example_id
            [B] int64: a stable id per example (the key for fetch).  Other keys are ignored.
            tinybert_fast.data.collate produces this.
        attention_layers: 0-based teacher layers whose scores to store ([n_att, B, H, L, L]).
        hidden_states: indices into output.hidden_states (0 = embeddings).
        logits: store out.logits (None: when the model has them).
        dtype: "fp32" | "bf16" | "fp16" | "int8" (see the module docstring for error bounds).
        attention_storage: "auto" (Q and K for the examples where they are smaller than the
            scores, about L > 2*d_h; scores, from Q and K, for the others), "qk" (Q and K for every
            example: what fetch(..., attention="qk") and attention_mse_qk read), "scores".
        tokenizer, max_length, dataset, fingerprint_extra: go into the fingerprint.
        shard: (rank, world_size) (default: from torch.distributed, else (0, 1)); each rank
            builds its shard from its own loader; the last rank to finish writes the manifest.
            With torch.distributed initialised, ranks wait for each other at the end.
        chunk_examples: examples per commit (fsync + journal entry): what a crash can lose.

        An interrupted build with the same arguments resumes; a complete cache with the same
        fingerprint is opened without running the teacher (a different one: CacheMismatchError,
        unless overwrite=True).  Returns the open cache, or None on a rank whose cache is not
        complete yet (other shards still building, without torch.distributed).
        """
        from . import capture

        path = os.fspath(path)
        rank, world = _resolve_shard(shard)
        fp = cls.make_fingerprint(teacher, attention_layers=attention_layers,
                                  hidden_states=hidden_states, dtype=dtype, logits=logits,
                                  tokenizer=tokenizer, max_length=max_length, dataset=dataset,
                                  fingerprint_extra=fingerprint_extra,
                                  attention_storage=attention_storage)
        store_logits = "logits" in fp["fields"]
        if os.path.exists(os.path.join(path, MANIFEST)) and not overwrite:
            logger.info("%s: a complete cache exists; checking its fingerprint", path)
            try:
                return cls.open(path, expect_fingerprint=fp, num_threads=num_threads)
            except CacheMismatchError as exc:
                raise CacheMismatchError(f"{exc}.  Pass overwrite=True to rebuild it") from None
        writer = CacheWriter(path, dtype, fingerprint=fp, shard=(rank, world),
                             chunk_examples=chunk_examples, overwrite=overwrite, fsync=fsync,
                             num_threads=num_threads, attention_storage=attention_storage)
        record = capture.record_scores if attention_storage == "scores" else capture.record_qk
        att_layers = [int(i) for i in attention_layers]
        hid_states = [int(i) for i in hidden_states]
        was_training = teacher.training
        old_impl = getattr(getattr(teacher, "config", None), "_attn_implementation", None)
        switch = bool(att_layers) and old_impl != capture.ATTN_IMPLEMENTATION
        if switch:
            teacher.set_attn_implementation(capture.register())
        teacher.eval()
        device = next(teacher.parameters()).device
        try:
            it = () if writer.done else loader
            if progress and not writer.done:
                from tqdm.auto import tqdm
                total = len(loader) if hasattr(loader, "__len__") else None  # total and ETA
                it = tqdm(loader, desc=f"teacher cache shard {rank}/{world}", total=total,
                          unit="batch", dynamic_ncols=True)
            for batch in it:
                if "example_id" not in batch:
                    raise KeyError("loader batches must carry 'example_id' ([B] int64): the key "
                                   "under which fetch finds each example")
                ids = torch.as_tensor(batch["example_id"]).reshape(-1)
                if writer.all_committed(ids):
                    continue
                inputs = {k: batch[k].to(device) for k in _MODEL_INPUTS if k in batch}
                mask = inputs.get("attention_mask")
                if mask is None:
                    raise KeyError("loader batches must carry 'attention_mask' [B, L]")
                lengths = _right_padded_lengths(mask, ids)
                with torch.inference_mode(), record(att_layers) as rec:
                    out = teacher(**inputs, output_hidden_states=bool(hid_states))
                hidden = (torch.stack([out.hidden_states[i] for i in hid_states])
                          if hid_states else None)
                attention = query = key = None
                if att_layers and rec.kind == "qk":
                    query = torch.stack([q for q, _ in rec.layers])
                    key = torch.stack([k for _, k in rec.layers])
                elif att_layers:
                    attention = torch.stack(rec.layers)
                lg = getattr(out, "logits", None)
                if store_logits and lg is None:
                    raise ValueError("logits=True but the teacher's output has no logits")
                writer.append(ids, lengths, logits=lg if store_logits else None, hidden=hidden,
                              attention=attention, query=query, key=key)
            complete = writer.close()
        except BaseException:
            writer.__exit__(RuntimeError, None, None)
            raise
        finally:
            teacher.train(was_training)
            if switch:
                teacher.set_attn_implementation(old_impl)
        dist = torch.distributed
        if world > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()
            complete = _try_finalize(path, fsync)
        if not complete:
            logger.info("%s: shard %d of %d done; the cache completes when every shard is", path,
                        rank, world)
            return None
        return cls.open(path, num_threads=num_threads)


def _right_padded_lengths(mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    m = mask.detach().to("cpu", torch.int64)
    lengths = m.sum(1)
    L = m.shape[1]
    expect = (torch.arange(L)[None, :] < lengths[:, None]).to(torch.int64)
    bad = (m != expect).any(1)
    if bad.any() or (lengths < 1).any():
        b = int(torch.nonzero(bad | (lengths < 1))[0, 0])
        raise ValueError(f"attention_mask of example {int(ids[b])} is not right-padded with at "
                         f"least one token (got {m[b].tolist()[:20]}...): the cache stores tokens "
                         f"0..L-1")
    return lengths


def _record_stream(tensors, stream) -> None:
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            t.record_stream(stream)


def _batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for x in items:
        batch.append(int(x))
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class _Prefetcher:
    """Iterator over TeacherBatch with a background producer thread (see TeacherCache.prefetch)."""

    _DONE = object()

    def __init__(self, cache: TeacherCache, batches, device, depth, pad_to, out_dtype, verify,
                 num_threads, attention):
        self.cache, self.device = cache, device
        self.cuda = device.type == "cuda" and _has_cuda_kernels()
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        # depth batches queued + one being built + one in use by the caller
        self.slots = [_Staging() for _ in range(depth + 2)]
        self.args = (pad_to, out_dtype, verify, num_threads, attention)
        self.thread = threading.Thread(target=self._produce, args=(iter(batches),), daemon=True,
                                       name="tinybert_fast-cache-prefetch")
        self.thread.start()

    def _produce(self, batches) -> None:
        pad_to, out_dtype, verify, num_threads, attention = self.args
        try:
            for k, ids in enumerate(batches):
                if self.stop.is_set():
                    return
                if self.cuda:
                    plan = self.cache._plan(ids, pad_to, out_dtype, attention)
                    item = self.cache._stage_cuda(plan, self.device,
                                                  self.slots[k % len(self.slots)], verify,
                                                  num_threads)
                else:
                    item = (self.cache.fetch(ids, self.device, pad_to, out_dtype=out_dtype,
                                             verify=verify, num_threads=num_threads,
                                             attention=attention), None)
                self._put(item)
        except BaseException as exc:  # delivered to the consumer at the batch it concerns
            self._put(exc)
            return
        self._put(self._DONE)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self) -> TeacherBatch:
        if self.stop.is_set():
            raise StopIteration
        item = self.queue.get()
        if item is self._DONE:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, event = item
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            _record_stream(batch, stream)
        return batch

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()

    def __del__(self):
        self.stop.set()
