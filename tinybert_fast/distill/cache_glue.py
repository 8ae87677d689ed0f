"""Teacher-cache glue: open the teacher cache of a run, or build it first (tinybert_fast.cache
stores; this module decides what a run needs stored and checks that a cache holds it).

`open_teacher_cache` takes explicit arguments (what `tinybert-fast cache` and the loop pass);
`teacher_cache(cfg, ...)` reads them from a DistillConfig.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from .. import data, mapping
from ..train import Distributed
from .config import DistillConfig
from .targets import TeacherTargets

log = logging.getLogger("tinybert_fast.distill")

def dataset_fingerprint(train_set: data.TokenizedDataset, *, task: str | None,
                        train_file: str | None, data_dir: str | None,
                        split: str | None = None) -> dict:
    """Where the data a cache was built from came from: task, training file or corpus, GLUE
    folder, and for a dev cache its split.  What the teacher saw of it, the examples' token ids,
    is checked on its own (training_tokens, TeacherCache.open(expect_tokens=...))."""
    source = {"task": task, "train_file": train_file, "data_dir": data_dir}
    return source if split is None else {**source, "split": split}


def training_tokens(train_set: data.TokenizedDataset):
    """(example ids [n], token digests [n]) of a training set: example i's digest is
    tinybert_fast.cache.fingerprint.sequence_digests of its input_ids and token_type_ids, the
    digest the cache build stores for it (its batches come from this set, example_id i).
    Computed once per run (blake2b over each example's token-id bytes)."""
    from ..cache.fingerprint import sequence_digests
    return (np.arange(len(train_set), dtype=np.int64),
            sequence_digests(train_set.input_ids, train_set.token_type_ids))


class _Sized:
    """An iterable of known length (the cache build's progress bar shows a total and an ETA)."""

    def __init__(self, iterable, length: int):
        self.iterable, self.length = iterable, length

    def __iter__(self):
        return iter(self.iterable)

    def __len__(self) -> int:
        return self.length


def open_teacher_cache(path: str, teacher, tokenizer, train_set: data.TokenizedDataset,
                       targets: TeacherTargets, *, device, dist_state: Distributed,
                       source: dict, max_length: int, dtype: str = "bf16",
                       batch_size: int = 128, progress: bool = True, rebuild: bool = False,
                       teacher_weights: str | None = None):
    """(cache, info): open the teacher cache at `path`, building it first if there is none (each
    DDP rank builds its shard, in batches of `batch_size` examples of similar lengths).

    What it stores is what `targets` (the run's TeacherTargets) reads: in the intermediate
    stages the mapped teacher layers' attention (in targets.cache_attention_storage: the
    scores, Q and K, or per example the smaller of the two) and hidden states; the logits
    always, so that `--stage all` builds it once.
    source: {"task", "train_file", "data_dir"} of the training data (dataset_fingerprint).
    A cache without logits is refused when the targets read them (step 2); a cache built for
    other layers, another attention storage, another teacher or other data is refused with the
    differences listed (CacheMismatchError): the training set's token ids (training_tokens) must
    be those the cache was built from, example by example, so a changed, reordered, augmented or
    shrunk training set is refused, saying which.
    rebuild: remove the cache at `path` (complete or interrupted) and build it afresh (in DDP the
    main rank removes it, then every rank builds its shard).
    teacher_weights: cache.hash_state_dict(teacher), when the caller has it (hashing reads every
    weight).
    info = {"path", "built" (this call built it), "seconds" (building or opening it, the
    teacher's pass included), "bytes" (on disk)}.
    """
    from .. import cache as cache_mod
    if not cache_mod.HAS_EXTENSION:
        raise RuntimeError(f"--teacher-cache needs the teacher-cache extension, which is not "
                           f"available: {cache_mod.EXTENSION_ERROR}")
    att, hid = list(targets.attention_layers), list(targets.hidden_states)
    dataset = dataset_fingerprint(train_set, **source)
    tokens = training_tokens(train_set)
    expect = {"dataset": dataset, "max_length": max_length,
              "teacher_weights": teacher_weights or cache_mod.hash_state_dict(teacher)}
    if targets.intermediate:
        expect.update(attention_layers=att, hidden_states=hid)
    storage = targets.cache_attention_storage
    if att:
        expect.update(attention_storage=storage)
    t0 = time.perf_counter()
    if rebuild:
        if dist_state.is_main:
            removed = cache_mod.clear_cache(path)
            log.info("rebuilding the teacher cache at %s (removed %d files)", path, len(removed))
        dist_state.barrier()
    built = not os.path.isfile(os.path.join(path, cache_mod.MANIFEST))
    if not built:
        opened = cache_mod.TeacherCache.open(path, expect_fingerprint=expect, expect_tokens=tokens)
    else:
        # batches of similar lengths: the teacher runs once, on as little padding as possible
        by_length = sorted(range(len(train_set)), key=lambda i: len(train_set.input_ids[i]))
        order = [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
        mine = order[dist_state.rank::dist_state.world_size]
        loader = _Sized(({k: v.to(device) if k != "example_id" else v for k, v in b.items()}
                         for b in data.iterate_batches(train_set, mine, tokenizer.pad_token_id,
                                                       None, False)), len(mine))
        log.info("building the teacher cache at %s (%d examples)", path, len(train_set))
        opened = cache_mod.TeacherCache.build(
            path, teacher, loader, attention_layers=att, hidden_states=hid,
            dtype=dtype, tokenizer=tokenizer, max_length=max_length,
            dataset=dataset, shard=(dist_state.rank, dist_state.world_size),
            progress=dist_state.is_main and progress, attention_storage=storage,
            teacher_weights=expect["teacher_weights"])  # hashed once, above
        dist_state.barrier()
        if opened is None:
            opened = cache_mod.TeacherCache.open(path, expect_fingerprint=expect,
                                                 expect_tokens=tokens)
    fields = opened.layout.fields if opened.layout else []
    if targets.logits and "logits" not in fields:
        raise ValueError(f"teacher cache {path} stores no logits, which step 2 distils from")
    info = {"path": path, "built": built, "seconds": time.perf_counter() - t0,
            "bytes": opened.nbytes}
    log.info("teacher cache %s: %s in %.1f s, %.1f MB", path, "built" if built else "opened",
             info["seconds"], info["bytes"] / 1e6)
    return opened, info


def teacher_cache(cfg: DistillConfig, teacher, tokenizer, train_set, targets: TeacherTargets,
                  device, dist_state: Distributed, teacher_weights: str | None = None):
    """open_teacher_cache with the arguments a resolved DistillConfig gives (the cache at
    cfg.teacher_cache; the loop calls this)."""
    return open_teacher_cache(
        cfg.teacher_cache, teacher, tokenizer, train_set, targets, device=device,
        dist_state=dist_state, source=training_source(cfg), max_length=cfg.max_length,
        dtype=cfg.cache_dtype, batch_size=cfg.eval_batch_size, progress=cfg.progress,
        rebuild=cfg.rebuild_cache, teacher_weights=teacher_weights)


DEV_CACHE = "dev-{split}"   # a dev set's teacher cache, a folder inside the run's teacher cache


class _MainRankAlone:
    """The Distributed state of work the main rank does alone (the dev evaluation)."""
    rank, world_size, enabled, is_main = 0, 1, False, True

    def barrier(self) -> None:
        pass


def dev_teacher_caches(cfg: DistillConfig, teacher, tokenizer, dev_sets: dict,
                       targets: TeacherTargets, device,
                       teacher_weights: str | None = None) -> dict:
    """{split: TeacherCache} of the dev sets, for the intermediate stages' dev losses: the
    teacher runs over each dev set once (cfg.teacher_cache/DEV_CACHE), not at every evaluation.
    Built and read by the main rank alone; checked like the training cache (teacher weights,
    layers, the dev examples' token ids); removed and rebuilt with cfg.rebuild_cache."""
    source = {**training_source(cfg), "train_file": None}
    caches = {}
    for split, dataset in dev_sets.items():
        caches[split], _ = open_teacher_cache(
            os.path.join(cfg.teacher_cache, DEV_CACHE.format(split=split)), teacher, tokenizer,
            dataset, targets, device=device, dist_state=_MainRankAlone(),
            source={**source, "split": split}, max_length=cfg.max_length,
            dtype=cfg.cache_dtype, batch_size=cfg.eval_batch_size, progress=False,
            rebuild=cfg.rebuild_cache, teacher_weights=teacher_weights)
    return caches


def training_source(cfg: DistillConfig) -> dict:
    """The `source` of open_teacher_cache for a run: its task, training file (or corpus) and GLUE
    folder."""
    return {"task": cfg.task, "train_file": cfg.train_file or cfg.corpus,
            "data_dir": cfg.data_dir}
