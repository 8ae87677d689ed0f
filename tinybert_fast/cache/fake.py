"""Fake (meta) kernels of the cache's ops: output shapes, dtypes and devices without the data.

They let FakeTensorMode, torch.compile and torch.library.opcheck trace through the ops.  The
shapes are those the C++ kernels allocate (csrc/teacher_cache.cpp, cuda/teacher_cache_kernel.cu);
sizes that depend on data (the bytes of the packed records, how many examples of a batch store
Q and K when the caller does not say) are fresh symbolic sizes.  crc32c is not given one: it
returns a Python int computed from the bytes (nothing to trace), as do build_info and
layout_fields (no tensor arguments).

    record_bytes(lengths [B], layout)               -> int64 [B]
    pack(lengths [B], ..., layout)                  -> records uint8 [nbytes], offsets int64
                                                       [B+1], crcs int64 [B]
    gather(..., offsets [B], ..., crcs?, staging!)  -> bad bool [B] ([0] without crcs)
    unpack(..., lengths [B], crcs?, layout, pad_to P, out_dtype, ...)
        -> attention [n_att, Bs, H, P, P], hidden [n_hid, B, P, d], logits [B, C],
           attention_mask int64 [B, P], bad bool [B] ([0] without crcs),
           qk [2, n_att, Bq, H, P, d_h]    (Bs + Bq = B; 0 for H, Bs, Bq when n_att = 0)
"""

from __future__ import annotations

import torch

from .. import _extension
from ._fields import LAYOUT_FIELDS

_NAMESPACE = "tinybert_fast_cache"
_registered = False


def _layout(layout) -> dict:
    return dict(zip(LAYOUT_FIELDS, (int(v) for v in layout), strict=True))


def _record_bytes(lengths, layout):
    return lengths.new_empty(lengths.shape)


def _pack(lengths, logits, hidden, attention, qk, layout, num_threads=1):
    B = lengths.shape[0]
    nbytes = torch.library.get_ctx().new_dynamic_size()
    return (lengths.new_empty((nbytes,), dtype=torch.uint8), lengths.new_empty((B + 1,)),
            lengths.new_empty((B,)))


def _gather(sources, source_index, offsets, nbytes, crcs, staging, staging_offsets,
            num_threads=1):
    return offsets.new_empty((offsets.shape[0] if crcs is not None else 0,), dtype=torch.bool)


def _unpack(sources, source_index, offsets, lengths, crcs, layout, pad_to, out_dtype,
            num_threads=1, score_examples=None, qk_examples=None):
    lay = _layout(layout)
    B, P = lengths.shape[0], pad_to
    n_att, n_hid = lay["num_attention"], lay["num_hidden"]
    with_qk = n_att > 0 and lay["qk_head_dim"] > 0
    if score_examples is not None:
        n_scores = score_examples.shape[0]
    elif with_qk:  # decided by the lengths, which a fake kernel cannot read
        n_scores = torch.library.get_ctx().new_dynamic_size()
    else:
        n_scores = B
    n_qk = qk_examples.shape[0] if qk_examples is not None else B - n_scores
    H = lay["num_heads"] if n_att else 0
    out = lengths.new_empty
    att = out((n_att, n_scores if n_att else 0, H, P, P), dtype=out_dtype)
    qk = out((2, n_att, n_qk if n_att else 0, H, P, lay["qk_head_dim"]), dtype=out_dtype)
    hid = out((n_hid, B, P, lay["hidden_size"] if n_hid else 0), dtype=out_dtype)
    logits = out((B, lay["num_logits"]), dtype=out_dtype)
    mask = out((B, P))
    bad = out((B if crcs is not None else 0,), dtype=torch.bool)
    return att, hid, logits, mask, bad, qk


def register() -> None:
    """Register the fake kernels (once per process; the library must be loaded)."""
    global _registered
    if _registered:
        return
    for name, fn in (("record_bytes", _record_bytes), ("pack", _pack), ("gather", _gather),
                     ("unpack", _unpack)):
        torch.library.register_fake(f"{_NAMESPACE}::{name}", fn)
    _registered = True


# csrc/ names this module as the ops' fake-kernel module (m.set_python_module): importing it
# registers them once the library is loaded, as torch.compile's hint for a missing one says.
if (_state := _extension.loaded_state()) is not None and _state.loaded:
    register()
