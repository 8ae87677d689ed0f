"""The teacher cache's on-disk format: the record layout, the file headers, the index codec, the
manifest's checksum.

A cache is a folder (see tinybert_fast.cache):

    cache.json                  manifest (written last: its presence means "complete"), CRC32C
    build.json                  what is being built
    shard-RRRRR-of-WWWWW.data   DATA_HEADER_BYTES header, then records back to back, each at a
                                multiple of 16 bytes (record layout: csrc/teacher_cache.h)
    shard-RRRRR-of-WWWWW.index  header (+ the layout's integers), then int64 little-endian
                                ids[n], lengths[n], offsets[n], record crc32c[n],
                                token digests[n] (fingerprint.token_digests; 0: not recorded),
                                chunks[k, 4] (start, end, crc32c, first example); trailer:
                                CRC32C of everything before it and b"TBFE"
    shard-RRRRR-of-WWWWW.journal  only while building (tinybert_fast.cache.writer)

Every integer is little-endian.  The layout of a record (CacheLayout) travels to the C++ ops as
`int[] layout`: the integers of LAYOUT_FIELDS, in that order.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .errors import CacheCorruptionError
from ._fields import LAYOUT_FIELDS
from .extension import crc32c, ops

FORMAT_NAME = "tinybert-fast teacher cache"
FORMAT_VERSION = 3  # 2: attention stored as Q and K for long examples (layout of 8 ints)
#                    3: a digest of each example's token ids in the index and the journal
MANIFEST = "cache.json"
BUILD_SPEC = "build.json"
# How to rebuild a cache, for the errors that ask for it.
REBUILD = ("rebuild the cache (TeacherCache.build(..., overwrite=True); `tinybert-fast distill "
           "--rebuild-cache`, `tinybert-fast cache --rebuild`)")
# 8-bit storage: |x_hat - x| <= INT8_BOUND * max|row| (before rounding to the output dtype).
INT8_BOUND = 1.0 / 254.0

_N = len(LAYOUT_FIELDS)
DATA_MAGIC, INDEX_MAGIC, JOURNAL_MAGIC, ENTRY_MAGIC = (b"TBFCDATA", b"TBFCINDX", b"TBFCJRNL",
                                                       b"TBFJ")
DATA_HEADER = struct.Struct("<8sIIII32s8x")          # magic, version, size, rank, world, spec
INDEX_HEADER = struct.Struct(f"<8sIIIIQQQ32s{_N}q")  # + n, chunks, data bytes, layout
INDEX_TRAILER = struct.Struct("<I4s")                # crc32c of everything before, b"TBFE"
JOURNAL_HEADER = struct.Struct(f"<8sIII32s{_N}q")    # magic, version, rank, world, spec, layout
ENTRY_HEADER = struct.Struct("<4sIqqqq")             # magic, n, chunk, start, end, chunk crc
DATA_HEADER_BYTES = DATA_HEADER.size
assert DATA_HEADER_BYTES == 64

# name -> (storage code in csrc/teacher_cache.h, torch dtype of the stored values)
STORAGE = {"fp32": (0, torch.float32), "bf16": (1, torch.bfloat16), "fp16": (2, torch.float16),
           "int8": (3, torch.int8)}
_STORAGE_NAMES = {code: name for name, (code, _) in STORAGE.items()}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
                  "half": "fp16", "8bit": "int8", "8-bit": "int8",
                  torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                  torch.int8: "int8"}
# How a cache stores attention: "scores" (an L x L block per head), "qk" (the head's Q and K,
# 2 x L x d_h, for every example) or "auto" (Q and K for the examples where that is smaller).
ATTENTION_STORAGE = ("auto", "scores", "qk")


# The names of the temp files this package's atomic writes (tinybert_fast._io: ".NAME.XXXXXXXX.tmp",
# and earlier releases' "NAME.tmp-PID-XXXXXXXX") leave in a cache folder when a process dies
# mid-write: those of the files written atomically there (manifest, build spec, indexes).
_ATOMIC = r"(?:cache\.json|build\.json|shard-\d{5}-of-\d{5}\.index)"
TEMP_FILE = re.compile(rf"\.{_ATOMIC}\.[a-z0-9_]{{8}}\.tmp|{_ATOMIC}\.tmp-\d+-[0-9a-f]{{8}}")


def is_temp_file(name: str) -> bool:
    """Whether `name` (a file name in a cache folder) is one of this package's temp files."""
    return TEMP_FILE.fullmatch(name) is not None


def canonical(obj) -> str:
    """The JSON text that fingerprints, specs and manifests are compared and hashed by."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


# --------------------------------------------------------------------------------------------
# The record layout

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

    @property
    def storage(self) -> int:
        """The storage code of `dtype` (csrc/teacher_cache.h: Storage)."""
        return STORAGE[self.dtype][0]

    def ints(self) -> list[int]:
        """The `int[] layout` argument of the ops: the LAYOUT_FIELDS, in order."""
        return [int(getattr(self, f)) for f in LAYOUT_FIELDS]

    @classmethod
    def from_ints(cls, v: Sequence[int]) -> CacheLayout:
        fields = {f: int(x) for f, x in zip(LAYOUT_FIELDS, v, strict=True)}
        return cls(dtype=_STORAGE_NAMES[fields.pop("storage")], **fields)

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
        return ops().record_bytes(t, self.ints()).numpy()

    def padded_bytes(self, length: int) -> int:
        """Bytes of one example stored padded to `length` in the storage dtype (no scales)."""
        return self.element_size * (self.num_logits + self.num_hidden * length * self.hidden_size
                                    + self.num_attention * self.num_heads * length * length)


def qk_min_length(storage: str, dtype: str, head_dim: int) -> int:
    """The shortest example that stores Q and K under attention storage `storage`: 1 for "qk";
    for "auto" the shortest length L whose Q and K take fewer bytes than its scores, per head
    2*L*d_h*e (+ 8*L scale bytes in 8-bit) against L*L*e (+ 4*L), i.e. about L > 2*d_h."""
    if storage == "qk":
        return 1
    e = STORAGE[dtype][1].itemsize
    extra = 4 if dtype == "int8" else 0   # one more fp32 scale per row: 2L rows against L
    return 2 * head_dim + (extra + e - 1) // e + 1


def storage_name(dtype) -> str:
    """"fp32" | "bf16" | "fp16" | "int8" for a storage name, an alias or a torch dtype."""
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in STORAGE:
        raise ValueError(f"dtype must be one of 'fp32', 'bf16', 'fp16', 'int8' (or the torch "
                         f"dtypes float32, bfloat16, float16, int8); got {dtype!r}")
    return name


def scores_from_qk(query: torch.Tensor, key: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """Pre-softmax scores Q K^T / sqrt(d_h) without a mask: [..., L, d_h] x2 -> [..., L, L].

    What the records of examples stored as Q and K stand for.  One batched GEMM with the scale
    applied to the fp32 accumulator and one rounding to `out_dtype` (default: the inputs' dtype);
    rows of Q or K that are 0 (padding) give 0 scores."""
    out_dtype = query.dtype if out_dtype is None else out_dtype
    *lead, L, dh = query.shape
    q = query.reshape(-1, L, dh)
    k = key.reshape(-1, L, dh)
    if q.dtype != out_dtype:
        q, k = q.to(out_dtype), k.to(out_dtype)
    out = torch.empty(q.shape[0], L, L, dtype=out_dtype, device=q.device)
    torch.baddbmm(out, q, k.transpose(1, 2), beta=0.0, alpha=dh ** -0.5, out=out)
    return out.view(*lead, L, L)


# --------------------------------------------------------------------------------------------
# Files

def shard_name(rank: int, world: int, ext: str) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.{ext}"


def read_json(path: str):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheCorruptionError(f"{path}: not valid JSON ({exc}): the file is corrupt") from None


def manifest_checksum(manifest: dict) -> int:
    """CRC32C of the manifest's canonical JSON without its "checksum" key."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return crc32c(canonical(body).encode())


class Index(NamedTuple):
    """A shard's index file, decoded."""
    rank: int
    world: int
    spec: bytes
    layout: CacheLayout | None
    data_bytes: int
    ids: np.ndarray        # int64 [n]
    lengths: np.ndarray    # int64 [n]
    offsets: np.ndarray    # int64 [n]
    crcs: np.ndarray       # int64 [n]
    tokens: np.ndarray     # int64 [n]: digests of the examples' token ids (0: not recorded)
    chunks: np.ndarray     # int64 [k, 4]: start, end, crc, first example
    crc: int               # of the whole file


def encode_index(rank, world, spec: bytes, layout: CacheLayout | None, data_bytes: int, ids,
                 lengths, offsets, crcs, tokens, chunks) -> bytes:
    """The bytes of an index file (module docstring); layout None: every integer -1."""
    n, k = len(ids), len(chunks)
    head = INDEX_HEADER.pack(INDEX_MAGIC, FORMAT_VERSION, rank, world, 0, n, k, data_bytes, spec,
                             *(layout.ints() if layout else [-1] * _N))
    body = b"".join(np.ascontiguousarray(a, dtype="<i8").tobytes()
                    for a in (ids, lengths, offsets, crcs, tokens,
                              np.asarray(chunks).reshape(-1, 4)))
    crc = crc32c(head + body)
    return head + body + INDEX_TRAILER.pack(crc, b"TBFE")


def decode_index(path: str) -> Index:
    """Read and check an index file (CacheCorruptionError if missing, truncated or damaged)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CacheCorruptionError(f"{path}: missing index file (the cache is damaged: rebuild "
                                   f"it, or this shard)") from None
    hs, ts = INDEX_HEADER.size, INDEX_TRAILER.size
    if len(raw) < hs + ts:
        raise CacheCorruptionError(f"{path}: index file truncated ({len(raw)} bytes)")
    crc, end = INDEX_TRAILER.unpack_from(raw, len(raw) - ts)
    if end != b"TBFE" or crc != crc32c(raw[:len(raw) - ts]):
        raise CacheCorruptionError(f"{path}: index checksum mismatch (the file is corrupt or "
                                   f"truncated)")
    magic, version, rank, world, _, n, k, data_bytes, spec, *lay = INDEX_HEADER.unpack_from(raw)
    if magic != INDEX_MAGIC:
        raise CacheCorruptionError(f"{path}: not a format-{FORMAT_VERSION} index file")
    if version != FORMAT_VERSION:
        raise CacheCorruptionError(f"{path}: an index of cache format version {version}; this "
                                   f"tinybert_fast reads version {FORMAT_VERSION}: {REBUILD}")
    if len(raw) != hs + 8 * (5 * n + 4 * k) + ts:
        raise CacheCorruptionError(f"{path}: index size does not match its header")
    arr = np.frombuffer(raw, dtype="<i8", count=5 * n + 4 * k, offset=hs).astype(np.int64)
    layout = CacheLayout.from_ints(lay) if lay[0] >= 0 else None
    return Index(rank, world, spec, layout, data_bytes, arr[:n], arr[n:2 * n], arr[2 * n:3 * n],
                 arr[3 * n:4 * n], arr[4 * n:5 * n], arr[5 * n:].reshape(k, 4), crc)
