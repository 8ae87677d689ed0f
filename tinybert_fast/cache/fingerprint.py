"""Fingerprints: what a cache was built from, stored in its manifest and compared on open.

make_fingerprint assembles the dict `TeacherCache.build` stores (teacher weights and config,
tokenizer, layers, dtype, attention storage, data); `TeacherCache.open(expect_fingerprint=...)`
compares every key the caller gives and lists each difference (diff).
"""

from __future__ import annotations

import hashlib
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
