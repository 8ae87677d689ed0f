"""Fingerprints: what a cache was built from, stored in its manifest and compared on open.

make_fingerprint assembles the dict `TeacherCache.build` stores (teacher weights and config,
tokenizer, layers, dtype, attention storage, data); `TeacherCache.open(expect_fingerprint=...)`
compares every key the caller gives and lists each difference (diff).

What the teacher saw: token_digests (a padded batch) and sequence_digests (unpadded examples)
give one 64-bit digest per example of its token ids; the index stores them, the manifest's
fingerprint holds tokens_fingerprint of all of them, and tokens_difference says how a training
set differs from what a cache was built from (other token ids, other order, more or fewer
examples).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence

import numpy as np
import torch

from .format import ATTENTION_STORAGE, FORMAT_VERSION, canonical, storage_name


def sha256_json(obj) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()


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


def config_dict(teacher) -> dict | None:
    """The teacher's config as JSON-able data, without the keys that do not change outputs."""
    config = getattr(teacher, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return json.loads(canonical(d))


def tokenizer_fingerprint(tokenizer) -> str | None:
    """sha256 of the tokenizer's class, vocabulary, lower-casing and special tokens (a string is
    taken as given)."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, str):
        return tokenizer
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else None
    return sha256_json({"class": type(tokenizer).__name__, "vocab": vocab,
                        "lower": getattr(tokenizer, "do_lower_case", None),
                        "special": getattr(tokenizer, "special_tokens_map", None)})


def example_ids_fingerprint(example_ids) -> dict:
    """{"count", "sha256" of the sorted int64 ids}."""
    ids = np.sort(np.asarray(torch.as_tensor(example_ids).cpu(), dtype="<i8").reshape(-1))
    return {"count": int(ids.size), "sha256": hashlib.sha256(ids.tobytes()).hexdigest()}


def _digest(ids: bytes, types: bytes) -> int:
    d = int.from_bytes(hashlib.blake2b(ids + b"|" + types, digest_size=8).digest(), "little",
                       signed=True)
    return d or 1  # 0 stands for "not recorded"


def token_digests(input_ids, lengths, token_type_ids=None) -> np.ndarray:
    """int64 [B]: a digest of each example's token ids in a right-padded batch.

    input_ids, token_type_ids: [B, Lp] (any integer dtype, any device; token_type_ids None: all
    0, BERT's default); lengths: [B] tokens per example (the attention mask's sum).  Example b's
    digest is the first 8 bytes of blake2b(int64 input_ids[b, :L_b] | int64
    token_type_ids[b, :L_b]) (never 0), so it covers what the teacher saw and what the cache
    stores of the mask (L_b), and not the padding."""
    ids = np.asarray(torch.as_tensor(input_ids).detach().cpu(), dtype="<i8")
    lens = np.asarray(torch.as_tensor(lengths).detach().cpu(), dtype=np.int64).reshape(-1)
    if ids.ndim != 2 or ids.shape[0] != lens.size:
        raise ValueError(f"input_ids: expected [B={lens.size}, L], got {tuple(ids.shape)}")
    if token_type_ids is None:
        types = np.zeros_like(ids)
    else:
        types = np.asarray(torch.as_tensor(token_type_ids).detach().cpu(), dtype="<i8")
        if types.shape != ids.shape:
            raise ValueError(f"token_type_ids: expected the shape of input_ids "
                             f"{tuple(ids.shape)}, got {tuple(types.shape)}")
    if lens.size and (lens.min() < 0 or lens.max() > ids.shape[1]):
        raise ValueError(f"lengths must be in [0, {ids.shape[1]}]; got {lens.tolist()[:10]}")
    return np.array([_digest(ids[b, :n].tobytes(), types[b, :n].tobytes())
                     for b, n in enumerate(lens.tolist())], dtype=np.int64)


def sequence_digests(input_ids, token_type_ids=None) -> np.ndarray:
    """int64 [n]: token_digests of unpadded examples (a list of token-id lists, as
    tinybert_fast.data.TokenizedDataset holds them; token_type_ids: lists of the same lengths,
    or None for all 0)."""
    lens = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
    flat = np.fromiter(itertools.chain.from_iterable(input_ids), dtype="<i8",
                       count=int(lens.sum()))
    if token_type_ids is None:
        types = np.zeros_like(flat)
    else:
        if len(token_type_ids) != len(input_ids) or any(
                len(t) != n for t, n in zip(token_type_ids, lens.tolist())):
            raise ValueError("token_type_ids: expected one list per example, as long as its "
                             "input_ids")
        types = np.fromiter(itertools.chain.from_iterable(token_type_ids), dtype="<i8",
                            count=int(lens.sum()))
    ends = (8 * np.cumsum(lens)).tolist()
    starts = [0] + ends[:-1]
    ids_b, types_b = flat.tobytes(), types.tobytes()
    return np.fromiter((_digest(ids_b[a:b], types_b[a:b]) for a, b in zip(starts, ends)),
                       dtype=np.int64, count=len(ends))


def tokens_fingerprint(example_ids, digests) -> dict | None:
    """{"count", "blake2b" of the (example id, digest) pairs in example-id order}: what the
    manifest stores of the examples' token ids; None when some digest was not recorded (0)."""
    ids = np.asarray(example_ids, dtype=np.int64).reshape(-1)
    digests = np.asarray(digests, dtype=np.int64).reshape(-1)
    if ids.size != digests.size:
        raise ValueError(f"example_ids has {ids.size} entries but digests has {digests.size}")
    if (digests == 0).any():
        return None
    order = np.argsort(ids, kind="stable")
    h = hashlib.blake2b(digest_size=16)
    h.update(ids[order].astype("<i8").tobytes())
    h.update(digests[order].astype("<i8").tobytes())
    return {"count": int(ids.size), "blake2b": h.hexdigest()}


def tokens_difference(have_ids, have_digests, want_ids, want_digests,
                      complete: bool = True) -> str | None:
    """How the examples (want: e.g. a training set's) differ from a cache's (have), or None.

    complete: want is the whole training set (its count and every id must match); False: want
    may be a part of it (one DDP rank's shard), only its own examples are compared."""
    def ids_list(a):
        a = np.sort(a)
        return f"{a[:8].tolist()}{' ...' if len(a) > 8 else ''}"
    hi = np.asarray(have_ids, np.int64).reshape(-1)
    hd = np.asarray(have_digests, np.int64).reshape(-1)
    wi = np.asarray(want_ids, np.int64).reshape(-1)
    wd = np.asarray(want_digests, np.int64).reshape(-1)
    u, c = np.unique(wi, return_counts=True)
    if (c > 1).any():
        raise ValueError(f"example ids repeated in the training data: {u[c > 1][:8].tolist()}")
    if (hd == 0).any():
        return ("the cache records no token ids of its examples (written without input_ids), "
                "so it cannot be checked against the training data")
    fp_have, fp_want = tokens_fingerprint(hi, hd), tokens_fingerprint(wi, wd)
    if complete and fp_have == fp_want:
        return None
    problems = []
    extra = np.setdiff1d(wi, hi)
    missing = np.setdiff1d(hi, wi) if complete else wi[:0]
    if complete and hi.size != wi.size:
        problems.append(f"example count {hi.size} vs {wi.size}")
    if extra.size:
        problems.append(f"{extra.size} examples are not in the cache (ids {ids_list(extra)})")
    if missing.size:
        problems.append(f"{missing.size} cached examples are not in the training data (ids "
                        f"{ids_list(missing)})")
    common, ih, iw = np.intersect1d(hi, wi, assume_unique=True, return_indices=True)
    bad = hd[ih] != wd[iw]
    if bad.any():
        reordered = np.array_equal(np.sort(hd[ih][bad]), np.sort(wd[iw][bad]))
        what = ("the examples are in another order: " if reordered else "")
        problems.append(f"{what}{int(bad.sum())} of {common.size} example ids hold other token "
                        f"ids (ids {ids_list(common[bad])})")
    if not problems:
        return None
    head = "the training examples' token ids differ"
    if complete:
        head += f" (hash {fp_have['blake2b']} vs {fp_want['blake2b']}, the cache's vs the data's)"
    return head + ": " + "; ".join(problems)


def probe_logits(teacher) -> bool:
    """Whether the teacher's output has logits (one forward over one token)."""
    try:
        device = next(teacher.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.inference_mode():
        out = teacher(input_ids=ids, attention_mask=torch.ones_like(ids))
    return getattr(out, "logits", None) is not None


def diff(have, want, path: str = "") -> list[str]:
    """Human-readable differences of `want` (expected) against `have` (the cache's); keys that
    `want` lacks are not compared."""
    def short(v):
        s = canonical(v)
        return s if len(s) <= 80 else s[:77] + "..."
    if isinstance(want, dict) and isinstance(have, dict):
        out = []
        for k in sorted(set(want)):
            p = f"{path}.{k}" if path else k
            if k not in have:
                out.append(f"{p}: not in the cache (expected {short(want[k])})")
            else:
                out += diff(have[k], want[k], p)
        return out
    if canonical(have) != canonical(want):
        return [f"{path}: cache has {short(have)}, expected {short(want)}"]
    return []


def make_fingerprint(teacher=None, *, attention_layers: Sequence[int],
                     hidden_states: Sequence[int], dtype="bf16", logits: bool | None = None,
                     tokenizer=None, max_length: int | None = None, dataset=None,
                     example_ids=None, fingerprint_extra=None,
                     attention_storage: str = "auto", teacher_weights: str | None = None) -> dict:
    """The fingerprint `build` stores, for `open(..., expect_fingerprint=...)`.

    teacher_weights: sha256 of the state dict; teacher_config: the config (minus keys that
    do not change outputs); tokenizer: sha256 of its class, vocabulary and special tokens (or
    the string given); max_length, attention_layers, hidden_states, fields, dtype,
    attention_storage; dataset:
    whatever identifies the data (a name, a path and a checksum...); example_ids: count and
    sha256 of the sorted ids (only when given); extra: fingerprint_extra.
    teacher_weights: hash_state_dict(teacher) when the caller already has it (hashing a
    teacher's weights reads every byte of them once more); None: computed here.
    """
    if attention_storage not in ATTENTION_STORAGE:
        raise ValueError(f"attention_storage must be one of {ATTENTION_STORAGE}; got "
                         f"{attention_storage!r}")
    if logits is None:
        logits = probe_logits(teacher) if teacher is not None else False
    fp = {"format_version": FORMAT_VERSION,
          "teacher_weights": (teacher_weights if teacher_weights is not None
                              else hash_state_dict(teacher) if teacher is not None else None),
          "teacher_config": config_dict(teacher) if teacher is not None else None,
          "tokenizer": tokenizer_fingerprint(tokenizer),
          "max_length": max_length,
          "attention_layers": [int(i) for i in attention_layers],
          "hidden_states": [int(i) for i in hidden_states],
          "fields": [f for f, on in (("logits", logits), ("hidden", len(hidden_states)),
                                     ("attention", len(attention_layers))) if on],
          "dtype": storage_name(dtype),
          "attention_storage": attention_storage if len(attention_layers) else None,
          "dataset": dataset,
          "extra": fingerprint_extra}
    if example_ids is not None:
        fp["example_ids"] = example_ids_fingerprint(example_ids)
    return json.loads(canonical(fp))
