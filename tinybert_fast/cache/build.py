"""The build step: run a Hugging Face teacher over a loader once and store its outputs.

TeacherCache.build is this function (tinybert_fast.cache.reader binds it as a classmethod): it
fingerprints the teacher, opens a complete cache of the same fingerprint without running the
teacher, else streams every batch's outputs (captured by tinybert_fast.capture) into a CacheWriter
and opens the result.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import CacheMismatchError
from .fingerprint import make_fingerprint, token_digests
from .format import MANIFEST
from .folder import finalize, resolve_shard
from .writer import CacheWriter

if TYPE_CHECKING:
    from .reader import TeacherCache

logger = logging.getLogger(__name__)

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def _teacher_outputs(teacher, inputs: dict, record, att_layers, hid_states,
                     store_logits: bool) -> dict:
    """One batch's stored outputs: {logits [B, C] | None, hidden [n_hid, B, L, d] | None,
    attention [n_att, B, H, L, L] | None, query / key [n_att, B, H, L, d_h] | None}.

    A function of its own for memory: the model output and the per-layer records die when it
    returns, so only the stacked tensors reach the writer, and nothing of this batch is alive
    while the next batch's forward runs (as loop locals, the previous batch's records, stacks and
    output all were: about 3x one batch's score bytes at the peak).
    """
    with torch.inference_mode(), record(att_layers) as rec:
        out = teacher(**inputs, output_hidden_states=bool(hid_states))
    result = {"logits": None, "hidden": None, "attention": None, "query": None, "key": None}
    if hid_states:
        result["hidden"] = torch.stack([out.hidden_states[i] for i in hid_states])
    layers, is_qk = (rec.layers if att_layers else []), rec.form == "qk"
    del rec
    if layers and is_qk:
        result["query"] = torch.stack([q for q, _ in layers])
        result["key"] = torch.stack([k for _, k in layers])
    elif layers:
        result["attention"] = torch.stack(layers)
    del layers
    if store_logits:
        result["logits"] = getattr(out, "logits", None)
        if result["logits"] is None:
            raise ValueError("logits=True but the teacher's output has no logits")
    return result


def build(cls, path: str | os.PathLike, teacher: torch.nn.Module, loader: Iterable[dict], *,
          attention_layers: Sequence[int], hidden_states: Sequence[int], dtype="bf16",
          logits: bool | None = None, tokenizer=None, max_length: int | None = None,
          dataset=None, fingerprint_extra=None, shard: tuple[int, int] | None = None,
          chunk_examples: int = 1024, overwrite: bool = False, fsync: bool = True,
          num_threads: int | None = None, progress: bool = False,
          attention_storage: str = "auto",
          teacher_weights: str | None = None) -> TeacherCache | None:
    """Run the teacher over `loader` once and store its outputs at `path`.

    cls: TeacherCache (or a subclass): what opens the result.
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
    dtype: "fp32" | "bf16" | "fp16" | "int8" (error bounds: tinybert_fast.cache).
    attention_storage: "auto" (Q and K for the examples where they are smaller than the
        scores, about L > 2*d_h; scores, from Q and K, for the others), "qk" (Q and K for every
        example: what fetch(..., attention_form="qk") and attention_mse_qk read), "scores".
    tokenizer, max_length, dataset, fingerprint_extra: go into the fingerprint.
    teacher_weights: hash_state_dict(teacher), when the caller has computed it already (else
        computed here: it reads all the weights).
    shard: (rank, world_size) (default: from torch.distributed, else (0, 1)); each rank
        builds its shard from its own loader; the last rank to finish writes the manifest.
        With torch.distributed initialised, ranks wait for each other at the end.
    chunk_examples: examples per commit (fsync + journal entry): what a crash can lose.

    The digests of every example's token ids (input_ids and token_type_ids, the first
    L_i = attention_mask.sum() of them: fingerprint.token_digests) go into the index and the
    manifest's fingerprint["tokens"].  An interrupted build with the same arguments resumes,
    after checking the committed chunks' checksums and that the loader's committed examples have
    the token ids stored (CacheCorruptionError / CacheMismatchError otherwise).  A complete cache
    with the same fingerprint is opened without running the teacher, once every example the
    loader yields is found in it with the same token ids (the loader is iterated for that; a
    different fingerprint or other examples: CacheMismatchError, unless overwrite=True).
    Returns the open cache, or None on a rank whose cache is not complete yet (other shards
    still building, without torch.distributed).
    """
    from .. import capture

    path = os.fspath(path)
    rank, world = resolve_shard(shard)
    fp = make_fingerprint(teacher, attention_layers=attention_layers,
                          hidden_states=hidden_states, dtype=dtype, logits=logits,
                          tokenizer=tokenizer, max_length=max_length, dataset=dataset,
                          fingerprint_extra=fingerprint_extra, attention_storage=attention_storage,
                          teacher_weights=teacher_weights)
    store_logits = "logits" in fp["fields"]
    if os.path.exists(os.path.join(path, MANIFEST)) and not overwrite:
        logger.info("%s: a complete cache exists; checking its fingerprint", path)
        cache = cls.open(path, expect_fingerprint=fp, num_threads=num_threads)
        ids, digests = _loader_tokens(loader)
        try:
            cache.check_tokens(ids, digests, complete=False)  # this rank's loader: a part
        except CacheMismatchError:
            cache.close()
            raise
        return cache
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
            if "attention_mask" not in batch:
                raise KeyError("loader batches must carry 'attention_mask' [B, L]")
            lengths = right_padded_lengths(batch["attention_mask"], ids)
            tokens = {"input_ids": batch["input_ids"],
                      "token_type_ids": batch.get("token_type_ids")}
            if writer.all_committed(ids):
                writer.check_committed(ids, lengths, **tokens)
                continue
            inputs = {k: batch[k].to(device) for k in _MODEL_INPUTS if k in batch}
            writer.append(ids, lengths, **_teacher_outputs(teacher, inputs, record, att_layers,
                                                           hid_states, store_logits), **tokens)
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
        complete = finalize(path, fsync)
    if not complete:
        logger.info("%s: shard %d of %d done; the cache completes when every shard is", path,
                    rank, world)
        return None
    return cls.open(path, num_threads=num_threads)


def _loader_tokens(loader: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(example ids, token digests) of every example a loader yields (fingerprint.token_digests
    of its input_ids and token_type_ids over the attention mask's tokens)."""
    ids, digests = [], []
    for batch in loader:
        b_ids = torch.as_tensor(batch["example_id"]).reshape(-1)
        lengths = right_padded_lengths(batch["attention_mask"], b_ids)
        ids.append(b_ids.cpu().numpy().astype(np.int64))
        digests.append(token_digests(batch["input_ids"], lengths, batch.get("token_type_ids")))
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
    return cat(ids), cat(digests)


def right_padded_lengths(mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Tokens per example, int64 [B] on the CPU, from an attention mask [B, L] that must be
    right-padded (1 for the first L_i positions, then 0) with L_i >= 1: the cache stores tokens
    0..L_i-1.  ValueError naming the first example (by id) that is not."""
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
