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
K for every example, which `fetch(..., attention_form="qk")` returns as TeacherBatch.query / .key for
`tbf.attention_mse_qk`; "scores" stores scores only.  When Q and K are stored, the teacher runs
SDPA attention on every layer while the cache is built.

    cache = tbf.TeacherCache.build("cache/sst2", teacher, loader,
                                   attention_layers=[2, 5, 8, 11], hidden_states=[0, 3, 6, 9, 12])
    cache = tbf.TeacherCache.open("cache/sst2")
    t = cache.fetch(batch["example_id"], device="cuda")
    t.attention        # [n_att, B, H, L, L]   (L = longest example of the batch, or pad_to)
    t.query, t.key     # [n_att, B, H, L, d_h]  with fetch(..., attention_form="qk") instead
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

What the teacher saw: the build stores a digest of every example's token ids (input_ids and
token_type_ids over its L tokens; blake2b) in the index, and their hash in the manifest's
fingerprint["tokens"]; `open(path, expect_tokens=(example_ids, digests))` (fingerprint.
sequence_digests of the training set) refuses a cache built from other examples, saying what
changed: other token ids, another order, more or fewer examples.  `clear_cache(path)` removes a
cache to rebuild it.  Leftover temp files of a killed write are removed by the next build or open.

Integrity: the manifest and every index carry a CRC32C, checked on open, where the data files'
sizes and headers are checked too (a truncated or swapped file is refused), and a resumed build
checks its committed chunks' CRC32C before appending; every record's
CRC32C is checked when it is read (fetch, prefetch), so a flipped byte raises
`CacheCorruptionError` naming the file and the example; `cache.verify()` checks every chunk.

Writing is crash-safe: records stream into the data file and are committed a chunk at a time
(data fsync'd, then a checksummed journal entry), the index is written atomically when the shard
is done, and the manifest last.  A build killed at any point leaves no manifest (open refuses it)
and `TeacherCache.build` with the same arguments resumes after the last committed chunk, giving
files identical to an uninterrupted build.  DDP ranks build shards in parallel
(`shard=(rank, world_size)`, or taken from torch.distributed); whichever finishes last writes the
manifest.  Readers (any number of processes) map the files read-only.

Modules: format (layout, file headers, index codec, manifest checksum), fingerprint, writer
(CacheWriter, journaled), reader (TeacherCache), prefetch (background staging), build (the step
that drives the teacher), extension (the ops, loaded on first use), fake (the ops' fake
kernels), errors.

The C++ extension (csrc/) does the byte work: packing, a multithreaded gather from the mapped
files (into a pinned staging buffer for CUDA), CRC32C, and unpacking (C++ on the CPU; a CUDA
kernel after an asynchronous host-to-device copy on a side stream).  It is compiled on the first
use of the cache, not at install or import (tinybert_fast._extension: cached per torch release,
CUDA version and source hash; `tinybert-fast build-extension` builds it ahead).  `HAS_EXTENSION`
and `HAS_CUDA_KERNELS` say what was built (reading them builds or loads it); without the extension
the cache API raises RuntimeError and the rest of tinybert_fast works.
"""

from __future__ import annotations

from .errors import CacheCorruptionError, CacheError, CacheIncompleteError, CacheMismatchError
from .extension import build_info, crc32c, flag
from .fingerprint import example_ids_fingerprint, hash_state_dict
from .format import (ATTENTION_STORAGE, BUILD_SPEC, DATA_HEADER_BYTES, FORMAT_NAME,
                     FORMAT_VERSION, INT8_BOUND, LAYOUT_FIELDS, MANIFEST, CacheLayout,
                     scores_from_qk)
from .reader import TeacherBatch, TeacherCache
from .writer import CacheWriter
from .folder import clear as clear_cache

# Private names that tests and benchmarks reach through this package (tests/test_cache.py sets
# _crash_point here to kill a build at a given point: tinybert_fast.cache.writer looks it up).
from .extension import default_threads as _default_threads  # noqa: E402,F401
from .format import qk_min_length as _qk_min_length  # noqa: E402,F401
from .prefetch import Staging as _Staging  # noqa: E402,F401
from .writer import _crash_point  # noqa: E402,F401

__all__ = ["TeacherCache", "CacheWriter", "TeacherBatch", "CacheLayout", "CacheError",
           "CacheCorruptionError", "CacheMismatchError", "CacheIncompleteError", "HAS_EXTENSION",
           "HAS_CUDA_KERNELS", "EXTENSION_ERROR", "FORMAT_VERSION", "FORMAT_NAME", "INT8_BOUND",
           "ATTENTION_STORAGE", "LAYOUT_FIELDS", "MANIFEST", "BUILD_SPEC", "DATA_HEADER_BYTES",
           "build_info", "crc32c", "hash_state_dict", "example_ids_fingerprint",
           "scores_from_qk", "clear_cache"]


def __getattr__(name: str):
    """HAS_EXTENSION, HAS_CUDA_KERNELS, EXTENSION_ERROR: the first access builds (or loads from
    the cache) and loads the extension."""
    if name in ("HAS_EXTENSION", "HAS_CUDA_KERNELS", "EXTENSION_ERROR"):
        return flag(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
