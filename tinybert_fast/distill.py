"""The thin TinyBERT distillation loop (and the `tinybert-fast distill` subcommand).

Stages (TinyBERT, Jiao et al. 2019):
    general   intermediate losses (attention + hidden, embeddings included) on unlabeled text
    task1     the same losses on (augmented) task data
    task2     prediction loss: soft cross-entropy with temperature on the teacher's logits
              (MSE on the teacher's outputs for regression), optionally mixed with hard labels
    all       task1, then task2 starting from task1's student
    finetune  plain supervised training on labels (a task teacher, or a hard-label baseline)

Where this loop differs from TinyBERT's reference scripts, on purpose:
- the teacher runs in eval mode under no_grad (the scripts left it in training mode, so dropout
  perturbed the targets);
- MNLI labels follow the `datasets` order (see tinybert_fast.data);
- regression (STS-B) step 2 regresses on the teacher's outputs, not on gold labels;
- batches are padded to their longest example unless --pad-to-max-length (the scripts always
  padded to max_seq_length); the losses keep TinyBERT's semantics on whatever padding there is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import capture, data, mapping, reference, train
from . import ops as fused_ops

log = logging.getLogger(__name__)

STAGES = ("general", "task1", "task2", "finetune")
STAGE_DEFAULTS = {
    "general": dict(epochs=3, batch_size=256, lr=5e-5, warmup_ratio=0.1, schedule="linear"),
    "task1": dict(epochs=20, batch_size=32, lr=5e-5, warmup_ratio=0.0, schedule="constant"),
    "task2": dict(epochs=3, batch_size=32, lr=3e-5, warmup_ratio=0.1, schedule="linear"),
    "finetune": dict(epochs=3, batch_size=32, lr=2e-5, warmup_ratio=0.1, schedule="linear"),
}
TASK1_EPOCHS = {"mnli": 10, "qqp": 10, "qnli": 10, "cola": 50}

# Student architectures by name (vocabulary and position sizes come from the teacher).
PRESETS = {
    "tinybert4": dict(num_hidden_layers=4, hidden_size=312, num_attention_heads=12,
                      intermediate_size=1200),
    "tinybert6": dict(num_hidden_layers=6, hidden_size=768, num_attention_heads=12,
                      intermediate_size=3072),
}
PROJECTION_FILE = "projection.pt"
TRAINING_FILE = "tinybert_fast.json"   # in an exported model: {"stage", "task", "head_trained"}


def head_trained(cfg: "DistillConfig", task) -> bool:
    """Whether a stage trains the prediction head: task step 2 (with a prediction or hard-label
    loss) and fine-tuning do; general distillation and task step 1 train the encoder only."""
    return cfg.stage == "finetune" or (cfg.stage == "task2" and (
        cfg.prediction_weight != 0 or cfg.hard_label_weight != 0))


@dataclasses.dataclass
class DistillConfig:
    """Everything a run needs; None means "the stage's default" (STAGE_DEFAULTS)."""
    stage: str
    output_dir: str
    student: str                       # preset name, checkpoint dir, or config.json
    teacher: str | None = None         # checkpoint dir or hub name (all stages but finetune)
    task: str | None = None            # GLUE task (all stages but general)
    data_dir: str | None = None        # local GLUE TSV folder; None -> `datasets`
    train_file: str | None = None      # e.g. an augmented train.tsv
    corpus: str | None = None          # general distillation text, one passage per line
    tokenizer: str | None = None       # default: the teacher's, else the student's
    init: str = "auto"                 # auto | random | teacher-layers
    mapping: str = "uniform"
    mapping_layers: list[int] | None = None
    mapping_seed: int = 0
    attention_weight: float = 1.0
    hidden_weight: float = 1.0
    embedding_weight: float = 1.0
    prediction_weight: float = 1.0
    hard_label_weight: float = 0.0
    temperature: float = 1.0
    losses: str = "fused"              # fused | eager
    teacher_cache: str | None = None   # teacher outputs cached here (built on first use)
    cache_dtype: str = "bf16"          # fp32 | bf16 | fp16 | int8
    mask_padding: bool = False         # exclude padded positions from the intermediate losses
    attention_from: str = "scores"     # scores | qk (attention_mse_qk: both models run SDPA)
    epochs: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup_ratio: float | None = None
    schedule: str | None = None
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_steps: int | None = None
    max_length: int | None = None
    pad_to_max_length: bool = False
    seed: int = 42
    device: str = "auto"
    bf16: str = "auto"                 # auto (on CUDA) | on | off
    save_steps: int = 500
    log_steps: int = 50
    eval_batch_size: int = 128
    eval: bool = True
    resume: bool = False
    keep_checkpoint: bool = False      # keep <output>/checkpoint after a finished run
    limit_train: int | None = None
    limit_eval: int | None = None
    progress: bool = True

    def resolved(self) -> "DistillConfig":
        """A copy with the stage defaults filled in; validates choices."""
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES + ('all',)}; got {self.stage!r}")
        if self.losses not in ("fused", "eager"):
            raise ValueError(f"losses must be 'fused' or 'eager'; got {self.losses!r}")
        if self.init not in ("auto", "random", "teacher-layers"):
            raise ValueError(f"init must be auto, random or teacher-layers; got {self.init!r}")
        if self.attention_from not in ("scores", "qk"):
            raise ValueError(f"attention_from must be 'scores' or 'qk'; got "
                             f"{self.attention_from!r}")
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"bf16 must be auto, on or off; got {self.bf16!r}")
        out = dataclasses.replace(self)
        for key, value in STAGE_DEFAULTS[self.stage].items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        if self.stage == "task1" and self.epochs is None and self.task in TASK1_EPOCHS:
            out.epochs = TASK1_EPOCHS[self.task]
        if out.max_length is None:
            single = self.task is not None and len(data.get_task(self.task).text_columns) == 1
            out.max_length = 64 if single else 128
        for name in ("epochs", "batch_size", "lr", "max_length", "save_steps", "log_steps"):
            if not getattr(out, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(out, name)}")
        return out


def ineffective_settings(cfg: DistillConfig, task: data.Task | None) -> list[str]:
    """What a resolved config sets away from its default that has no effect in this stage or on
    this task (each a sentence naming the flag); the loop logs each as a warning."""
    defaults = DistillConfig(stage=cfg.stage, output_dir="", student="")
    changed = {f.name for f in dataclasses.fields(DistillConfig)
               if getattr(cfg, f.name) != getattr(defaults, f.name)}
    intermediate = cfg.stage in ("general", "task1")
    notes = []
    def note(name, why):
        if name in changed:
            notes.append(f"--{name.replace('_', '-')} has no effect {why}")
    builds_from_teacher = cfg.init == "teacher-layers"   # the mapping picks the copied layers
    for name in ("attention_weight", "hidden_weight", "embedding_weight", "mapping",
                 "mapping_layers", "mapping_seed", "attention_from", "mask_padding"):
        if name.startswith("mapping") and builds_from_teacher:
            continue
        if not intermediate:
            note(name, f"in stage {cfg.stage!r} (it applies to the intermediate-layer losses of "
                       f"stages general and task1)")
    for name in ("prediction_weight", "temperature", "hard_label_weight"):
        if cfg.stage != "task2":
            note(name, f"in stage {cfg.stage!r} (it applies to task step 2's prediction loss)")
    if cfg.stage == "task2" and task is not None and task.is_regression:
        note("temperature", f"on the regression task {task.name!r}: step 2 is the mean squared "
                            f"error of the teacher's outputs there, not a softmax")
    if cfg.teacher_cache is None:
        note("cache_dtype", "without --teacher-cache")
    return notes


# --- models ----------------------------------------------------------------------------------

def _is_checkpoint(path: str) -> bool:
    """A local checkpoint folder (it holds a config.json)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def _is_pretrained(spec: str) -> bool:
    """A local checkpoint folder or a hub model id ("bert-base-uncased", "org/name"): anything
    that is not a preset, a .json config or another local path."""
    return _is_checkpoint(spec) or (spec not in PRESETS and not spec.endswith(".json")
                                    and not os.path.exists(spec))


STUDENT_ARG = "student (--student; finetune-teacher: --model)"


def pretrained(argument: str, load, name: str, **kwargs):
    """load(name, **kwargs) (a `from_pretrained`), with the OSError that transformers raises for a
    missing folder, an unknown hub id or an unreachable hub turned into a ValueError that names
    the argument."""
    try:
        return load(name, **kwargs)
    except OSError as exc:
        raise ValueError(f"{argument} {name!r}: cannot load it: {exc}") from exc


# Checkpoints load in float32 whatever dtype they were saved in (`from_pretrained` keeps a
# float16 or bfloat16 checkpoint's dtype): a student's weights are what AdamW updates, and bf16
# autocast on a GPU gives the speed; evaluation and the teacher follow the same rule.
LOAD_DTYPE = torch.float32


def load_teacher(name: str, stage: str, task: data.Task | None, device):
    """The teacher in eval mode, in float32 (LOAD_DTYPE), with the capturing attention.  Task
    stages need a fine-tuned sequence-classification head; general distillation takes a bare
    encoder."""
    from transformers import AutoModel, AutoModelForSequenceClassification
    attn = capture.register()
    if stage == "general":
        model = pretrained("teacher", AutoModel.from_pretrained, name,
                           attn_implementation=attn, dtype=LOAD_DTYPE)
    else:
        model, info = pretrained(
            "teacher", AutoModelForSequenceClassification.from_pretrained, name,
            attn_implementation=attn, output_loading_info=True, num_labels=task.num_labels,
            dtype=LOAD_DTYPE)
        if stage == "task2" and any("classifier" in k for k in info["missing_keys"]):
            raise ValueError(f"teacher {name!r} has no trained classification head, which task "
                             f"step 2 distils from: fine-tune it first (tinybert-fast "
                             f"finetune-teacher)")
    return model.to(device).eval().requires_grad_(False)


def build_student(spec: str, stage: str, task: data.Task | None, base_config, init: str,
                  layer_map_for_init=None, teacher=None):
    """The student: a preset name (tinybert4, tinybert6; vocabulary, positions and token types
    from `base_config`, the teacher's), a config.json (random weights) or a checkpoint
    directory (its weights, loaded in float32: a general-distilled or previous-stage student)."""
    from transformers import (AutoConfig, AutoModel, AutoModelForSequenceClassification,
                              BertConfig)
    attn = capture.register()
    head = stage != "general"
    kwargs = dict(num_labels=task.num_labels) if head else {}
    if _is_pretrained(spec):
        if init == "teacher-layers":
            raise ValueError("init 'teacher-layers' builds a new student from the teacher; "
                             "--student is already a checkpoint")
        cls = AutoModelForSequenceClassification if head else AutoModel
        return pretrained(STUDENT_ARG, cls.from_pretrained, spec, attn_implementation=attn,
                          dtype=LOAD_DTYPE, **kwargs)
    if spec in PRESETS:
        config = BertConfig(vocab_size=base_config.vocab_size,
                            max_position_embeddings=base_config.max_position_embeddings,
                            type_vocab_size=base_config.type_vocab_size, **PRESETS[spec],
                            **kwargs)
    elif spec.endswith(".json") and os.path.isfile(spec):
        config = AutoConfig.from_pretrained(spec, **kwargs)
    else:
        raise ValueError(f"student must be a preset {sorted(PRESETS)}, a config.json, a "
                         f"checkpoint directory or a hub model id; got {spec!r}")
    config._attn_implementation = attn
    cls = AutoModelForSequenceClassification if head else AutoModel
    model = cls.from_config(config, attn_implementation=attn)
    if init == "teacher-layers":
        copy_teacher_layers(model, teacher, layer_map_for_init)
    return model


def _encoder(model):
    return model.bert if hasattr(model, "bert") else model


def copy_teacher_layers(student, teacher, layer_map: mapping.LayerMap) -> None:
    """Initialise a student of the teacher's width from the teacher's embeddings and the
    teacher layers it is mapped to (the last of each attention group)."""
    s, t = _encoder(student), _encoder(teacher)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads"):
        if getattr(s.config, key) != getattr(t.config, key):
            raise ValueError(f"init 'teacher-layers' needs student and teacher of equal {key}; "
                             f"got {getattr(s.config, key)} and {getattr(t.config, key)}")
    s.embeddings.load_state_dict(t.embeddings.state_dict())
    for i, group in enumerate(layer_map.attention):
        s.encoder.layer[i].load_state_dict(t.encoder.layer[group[-1]].state_dict())


def check_pair(student_config, teacher_config, cfg: DistillConfig) -> None:
    """Errors a student/teacher pair must raise before any training starts."""
    if cfg.stage in ("general", "task1") and cfg.attention_weight != 0:
        hs, ht = student_config.num_attention_heads, teacher_config.num_attention_heads
        if hs != ht:
            raise ValueError(f"the attention loss pairs heads one to one, but the student has "
                             f"{hs} heads and the teacher {ht}; use models with equal head "
                             f"counts or --attention-weight 0")


# --- the objective ---------------------------------------------------------------------------

class StudentWithProjection(nn.Module):
    """What the optimizer (and DDP) trains: the student and, for the hidden loss, the shared
    projection d_s -> d_t (nn.Linear layout: weight [d_t, d_s])."""

    def __init__(self, student, projection: nn.Linear | None):
        super().__init__()
        self.student = student
        self.projection = projection

    def forward(self, **inputs):
        """(student outputs, projection weight, bias).  The projection goes through forward (as
        views) so that DDP sees it used in the graph, although the loss applies it."""
        out = self.student(**inputs)
        if self.projection is None:
            return out, None, None
        w, b = self.projection.weight, self.projection.bias
        return out, w.view_as(w), None if b is None else b.view_as(b)


def _mean(tensors):
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors).mean(0)


class Objective:
    """The stage's loss.  `losses` picks the implementation: the fused ops (tinybert_fast, which
    follow tbf.set_backend) or the eager reference (tinybert_fast.reference)."""

    def __init__(self, cfg: DistillConfig, task: data.Task | None, layer_map, teacher):
        self.cfg, self.task, self.layer_map, self.teacher = cfg, task, layer_map, teacher
        self.impl = fused_ops if cfg.losses == "fused" else reference
        self.intermediate = cfg.stage in ("general", "task1")
        self.need_att = self.intermediate and cfg.attention_weight != 0
        self.need_hid = self.intermediate and (cfg.hidden_weight != 0 or
                                               cfg.embedding_weight != 0)

    def __call__(self, model: nn.Module, inputs: dict, labels, cached=None) -> dict:
        """model: StudentWithProjection (or DDP of it); cached: the batch's TeacherBatch when the
        teacher's outputs come from a cache.  Returns the loss terms and "total"."""
        if self.intermediate:
            return self._intermediate(model, inputs, cached)
        return self._prediction(model, inputs, labels, cached)

    def _teacher_intermediates(self, inputs, cached):
        """{teacher layer: scores [B, H, L, L] (or (Q, K))} and {state index: hidden state}."""
        lm = self.layer_map
        if cached is not None:
            scores = {}
            if self.need_att and self.cfg.attention_from == "qk":  # a cache of Q and K
                scores = dict(zip(lm.teacher_attention_layers,
                                  zip(cached.query.unbind(0), cached.key.unbind(0))))
            elif self.need_att:
                scores = dict(zip(lm.teacher_attention_layers, cached.attention.unbind(0)))
            states = dict(zip(lm.teacher_hidden_states, cached.hidden.unbind(0))) \
                if self.need_hid else {}
            return scores, states
        with torch.no_grad(), self._record(lm.teacher_attention_layers) as t_rec:
            t_out = self.teacher(**inputs, output_hidden_states=self.need_hid)
        scores = dict(zip(lm.teacher_attention_layers, t_rec.layers)) if self.need_att else {}
        return scores, (dict(enumerate(t_out.hidden_states)) if self.need_hid else {})

    def _record(self, layers):
        """Record scores (or Q and K) of these layers during the next forward, when needed."""
        layers = layers if self.need_att else []
        if self.cfg.attention_from == "qk":
            return capture.record_qk(layers)
        return capture.record_scores(layers)

    def _attention_from_qk(self, s_pairs, t_pairs, inputs, mask):
        """attention_mse_qk over the mapped layers.  Padded keys are excluded as the score path's
        mask bias excludes them; with mask_padding, padded query rows too (their Q rows are
        zeroed in both models, which zeroes those rows of both score maps)."""
        key_mask = inputs["attention_mask"]
        q_s, k_s = zip(*s_pairs)
        q_t, k_t = zip(*(t_pairs[group[0]] for group in self.layer_map.attention))
        if mask is not None:
            rows = mask[:, None, :, None].to(q_s[0].dtype)
            q_s = [q * rows for q in q_s]
            q_t = [q * rows.to(q.dtype) for q in q_t]
        return self.impl.attention_mse_qk(list(q_s), list(k_s), list(q_t), list(k_t), key_mask)

    def _intermediate(self, model, inputs, cached):
        cfg, lm = self.cfg, self.layer_map
        t_scores, t_hidden = self._teacher_intermediates(inputs, cached)
        # padded positions: excluded when asked, and always with a cache (it stores none)
        mask = inputs["attention_mask"] if (cfg.mask_padding or cached is not None) else None
        n_student = len(lm.attention)
        with self._record(range(n_student)) as s_rec:
            s_out, w, b = model(**inputs, output_hidden_states=self.need_hid)
        terms = {}
        total = 0.0
        if self.need_att and cfg.attention_from == "qk":
            terms["attention"] = self._attention_from_qk(s_rec.layers, t_scores, inputs, mask)
            total = total + cfg.attention_weight * terms["attention"]
        elif self.need_att:
            target = [_mean([t_scores[i] for i in group]) for group in lm.attention]
            terms["attention"] = self.impl.attention_mse(s_rec.layers, target, mask,
                                                         mask_queries=mask is not None)
            total = total + cfg.attention_weight * terms["attention"]
        if self.need_hid:
            t_states = [_mean([t_hidden[i] for i in group]) for group in lm.hidden]
            s_states = list(s_out.hidden_states)
            tm = {"token_mask": mask}
            # each term under its own name (the log shows them apart whatever the weights)
            terms["embedding"] = self.impl.hidden_mse(s_states[0], t_states[0], w, b, **tm)
            terms["hidden"] = self.impl.hidden_mse(s_states[1:], t_states[1:], w, b, **tm)
            total = (total + cfg.embedding_weight * terms["embedding"]
                     + cfg.hidden_weight * terms["hidden"])
        terms["total"] = total
        return terms

    def _prediction(self, model, inputs, labels, cached):
        cfg, task = self.cfg, self.task
        s_logits = model(**inputs)[0].logits
        terms = {}
        total = 0.0
        if cfg.stage == "task2" and cfg.prediction_weight != 0:
            if cached is not None:
                t_logits = cached.logits
            else:
                with torch.no_grad():
                    t_logits = self.teacher(**inputs).logits
            if task.is_regression:
                terms["prediction"] = F.mse_loss(s_logits.float(), t_logits.float())
            else:
                terms["prediction"] = self.impl.soft_cross_entropy(s_logits, t_logits,
                                                                   cfg.temperature)
            total = total + cfg.prediction_weight * terms["prediction"]
        hard_weight = 1.0 if cfg.stage == "finetune" else cfg.hard_label_weight
        if hard_weight != 0:
            if labels is None:
                raise ValueError("the training data has no labels, which the hard-label loss "
                                 "needs")
            if task.is_regression:
                terms["hard"] = F.mse_loss(s_logits.float()[:, 0], labels.float())
            else:
                terms["hard"] = F.cross_entropy(s_logits.float(), labels)
            total = total + hard_weight * terms["hard"]
        if not terms:
            raise ValueError("the objective is empty: every loss weight is 0")
        terms["total"] = total
        return terms


# --- the teacher cache -------------------------------------------------------------------------

def dataset_fingerprint(cfg: DistillConfig, train_set: data.TokenizedDataset) -> dict:
    """What identifies the training data a cache was built from: its source and the sha256 of
    its token ids (which also pins the tokenizer and max_length)."""
    import hashlib
    h = hashlib.sha256()
    for ids in train_set.input_ids:
        h.update(len(ids).to_bytes(4, "little"))
        h.update(b"".join(int(i).to_bytes(4, "little") for i in ids))
    return {"task": cfg.task, "train_file": cfg.train_file or cfg.corpus,
            "data_dir": cfg.data_dir, "examples": len(train_set), "input_ids": h.hexdigest()}


def cache_attention_storage(cfg: DistillConfig) -> str:
    """How the teacher cache stores attention for this run: the queries and keys of every example
    when the loss takes them (--attention-from qk), else "auto" (Q and K where they are smaller
    than the scores, the scores elsewhere; fetched as scores either way)."""
    return "qk" if cfg.attention_from == "qk" else "auto"


class _Sized:
    """An iterable of known length (the cache build's progress bar shows a total and an ETA)."""

    def __init__(self, iterable, length: int):
        self.iterable, self.length = iterable, length

    def __iter__(self):
        return iter(self.iterable)

    def __len__(self) -> int:
        return self.length


def teacher_cache(cfg: DistillConfig, teacher, tokenizer, train_set, layer_map, device,
                  dist_state: "train.Distributed"):
    """(cache, info): open the teacher cache at cfg.teacher_cache, building it first if needed
    (each DDP rank builds its shard); info = {"path", "built" (this run built it), "seconds"
    (building or opening it, the teacher's pass included), "bytes" (on disk)}.  A cache stores what step 1 needs (mapped scores, or Q and K, and states)
    and the logits step 2 needs, so `--stage all` builds it once; a cache built for other layers,
    another attention storage, another teacher or other data is refused with the differences
    listed."""
    from . import cache as cache_mod
    if not cache_mod.HAS_EXTENSION:
        raise RuntimeError(f"--teacher-cache needs the teacher-cache extension, which is not "
                           f"available: {cache_mod.EXTENSION_ERROR}")
    att = layer_map.teacher_attention_layers if layer_map and cfg.attention_weight else []
    hid = layer_map.teacher_hidden_states if layer_map and (cfg.hidden_weight or
                                                            cfg.embedding_weight) else []
    dataset = dataset_fingerprint(cfg, train_set)
    expect = {"dataset": dataset, "max_length": cfg.max_length,
              "teacher_weights": cache_mod.hash_state_dict(teacher)}
    if layer_map is not None:
        expect.update(attention_layers=att, hidden_states=hid)
    storage = cache_attention_storage(cfg)
    if att:
        expect.update(attention_storage=storage)
    path = cfg.teacher_cache
    t0 = time.perf_counter()
    built = not os.path.isfile(os.path.join(path, cache_mod.MANIFEST))
    if not built:
        opened = cache_mod.TeacherCache.open(path, expect_fingerprint=expect)
    else:
        # batches of similar lengths: the teacher runs once, on as little padding as possible
        by_length = sorted(range(len(train_set)), key=lambda i: len(train_set.input_ids[i]))
        size = cfg.eval_batch_size
        order = [by_length[i:i + size] for i in range(0, len(by_length), size)]
        mine = order[dist_state.rank::dist_state.world_size]
        loader = _Sized(({k: v.to(device) if k != "example_id" else v for k, v in b.items()}
                         for b in data.iterate_batches(train_set, mine, tokenizer.pad_token_id,
                                                       None, False)), len(mine))
        log.info("building the teacher cache at %s (%d examples)", path, len(train_set))
        opened = cache_mod.TeacherCache.build(
            path, teacher, loader, attention_layers=att, hidden_states=hid,
            dtype=cfg.cache_dtype, tokenizer=tokenizer, max_length=cfg.max_length,
            dataset=dataset, shard=(dist_state.rank, dist_state.world_size),
            progress=dist_state.is_main and cfg.progress, attention_storage=storage)
        dist_state.barrier()
        if opened is None:
            opened = cache_mod.TeacherCache.open(path, expect_fingerprint=expect)
    fields = opened.layout.fields if opened.layout else []
    if cfg.stage == "task2" and "logits" not in fields:
        raise ValueError(f"teacher cache {path} stores no logits, which step 2 distils from")
    info = {"path": path, "built": built, "seconds": time.perf_counter() - t0,
            "bytes": opened.nbytes}
    log.info("teacher cache %s: %s in %.1f s, %.1f MB", path, "built" if built else "opened",
             info["seconds"], info["bytes"] / 1e6)
    return opened, info


# --- the loop ---------------------------------------------------------------------------------

def load_training_examples(cfg: DistillConfig, task):
    if cfg.stage == "general":
        if cfg.corpus:
            examples = data.read_corpus(cfg.corpus)
        elif task is not None:  # task text without labels
            examples = [dataclasses.replace(e, label=None) for e in
                        data.load_examples(task, "train", cfg.data_dir, cfg.train_file)]
        else:
            raise ValueError("general distillation needs --corpus (or --task for its text)")
    else:
        examples = data.load_examples(task, "train", cfg.data_dir, cfg.train_file)
    return examples[:cfg.limit_train] if cfg.limit_train else examples


def distill(cfg: DistillConfig) -> dict:
    """Run one stage (or "all": task1 then task2); returns the summary written to
    <output_dir>/summary.json."""
    if cfg.stage == "all":
        step1 = dataclasses.replace(cfg, stage="task1",
                                    output_dir=os.path.join(cfg.output_dir, "task1"))
        s1 = distill(step1)
        step2 = dataclasses.replace(cfg, stage="task2", student=s1["model_dir"], init="auto",
                                    output_dir=os.path.join(cfg.output_dir, "task2"))
        s2 = distill(step2)
        return {"stage": "all", "task1": s1, "task2": s2, "model_dir": s2["model_dir"]}
    cfg = cfg.resolved()
    summary_path = os.path.join(cfg.output_dir, "summary.json")
    if cfg.resume and os.path.isfile(summary_path):
        log.info("%s already finished (%s); nothing to resume", cfg.output_dir, summary_path)
        with open(summary_path, encoding="utf-8") as f:
            return json.load(f)
    return _Run(cfg).train()


class _Run:
    def __init__(self, cfg: DistillConfig):
        from transformers import AutoConfig, AutoTokenizer, BertConfig
        self.cfg = cfg
        self.device = train.resolve_device(cfg.device)
        self.dist = train.Distributed(self.device)
        self.bf16 = cfg.bf16 == "on" or (cfg.bf16 == "auto" and self.device.type == "cuda")
        train.seed_everything(cfg.seed)
        if cfg.stage != "general" and cfg.task is None:
            raise ValueError(f"stage {cfg.stage!r} needs --task")
        self.task = data.get_task(cfg.task) if cfg.task else None
        if cfg.stage != "finetune" and not cfg.teacher:
            raise ValueError(f"stage {cfg.stage!r} needs --teacher")

        # Everything a bad argument can break is checked before the data and models load fully.
        teacher_config = pretrained("teacher", AutoConfig.from_pretrained, cfg.teacher) \
            if cfg.teacher else None
        # the tokenizer: --tokenizer, else the teacher's, else a pretrained student's
        if cfg.tokenizer:
            tok_arg, tok_source = "tokenizer (--tokenizer)", cfg.tokenizer
        elif cfg.teacher:
            tok_arg, tok_source = "teacher", cfg.teacher
        elif _is_pretrained(cfg.student):
            tok_arg, tok_source = STUDENT_ARG, cfg.student
        else:
            raise ValueError("no tokenizer: pass --tokenizer (or a --teacher / checkpoint "
                             "--student that has one)")
        self.tokenizer = pretrained(tok_arg, AutoTokenizer.from_pretrained, tok_source)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {tok_source!r} has no pad token")
        # presets take vocabulary and position sizes from the teacher (or the tokenizer)
        self.base_config = teacher_config or BertConfig(vocab_size=len(self.tokenizer))
        student_config = self._student_config()
        self.layer_map = None
        if cfg.stage in ("general", "task1"):
            n_t = teacher_config.num_hidden_layers
            self.layer_map = mapping.layer_map(cfg.mapping, student_config.num_hidden_layers,
                                               n_t, seed=cfg.mapping_seed,
                                               layers=cfg.mapping_layers)
            check_pair(student_config, teacher_config, cfg)
            if cfg.attention_from == "qk" and any(len(g) > 1 for g in self.layer_map.attention):
                raise ValueError(f"mapping {cfg.mapping!r} averages teacher score maps, which "
                                 f"attention_from 'qk' does not form; use --attention-from "
                                 f"scores with it")

        # the teacher layers a new student is built from (--init teacher-layers): the stage's
        # mapping, or in task step 2 (no intermediate losses) the mapping the flags give
        self.init_map = self.layer_map
        if cfg.init == "teacher-layers" and self.init_map is None and teacher_config is not None:
            self.init_map = mapping.layer_map(cfg.mapping, student_config.num_hidden_layers,
                                              teacher_config.num_hidden_layers,
                                              seed=cfg.mapping_seed, layers=cfg.mapping_layers)

        examples = load_training_examples(cfg, self.task)
        self.train_set = data.TokenizedDataset(examples, self.tokenizer, cfg.max_length)
        self.dev_sets = {}
        if cfg.eval and self.task is not None:
            for split in self.task.dev_splits:
                dev = data.load_examples(self.task, split, cfg.data_dir)
                dev = dev[:cfg.limit_eval] if cfg.limit_eval else dev
                self.dev_sets[split] = data.TokenizedDataset(dev, self.tokenizer, cfg.max_length)

        self.teacher = (load_teacher(cfg.teacher, cfg.stage, self.task, self.device)
                        if cfg.stage != "finetune" else None)
        init = "random" if cfg.init == "auto" else cfg.init
        self.student = build_student(cfg.student, cfg.stage, self.task, self.base_config, init,
                                     self.init_map, self.teacher).to(self.device).train()
        projection = None
        if self.layer_map is not None and (cfg.hidden_weight or cfg.embedding_weight):
            d_s, d_t = self.student.config.hidden_size, teacher_config.hidden_size
            projection = nn.Linear(d_s, d_t)
            saved = os.path.join(cfg.student, PROJECTION_FILE)
            if _is_checkpoint(cfg.student) and os.path.isfile(saved):
                projection.load_state_dict(torch.load(saved, map_location="cpu"))
            elif init == "teacher-layers":
                # The student's layers are the teacher's: start the projection at the identity,
                # so the hidden loss starts at what the copied layers give (a random W would make
                # step 1's first updates pull the copied layers away from the teacher's).
                with torch.no_grad():
                    projection.weight.copy_(torch.eye(d_t, d_s))
                    projection.bias.zero_()
            projection = projection.to(self.device)
        self.model = StudentWithProjection(self.student, projection)
        self.objective = Objective(cfg, self.task, self.layer_map, self.teacher)
        self.cache, self.cache_info = None, None
        if cfg.teacher_cache:
            self.cache, self.cache_info = teacher_cache(cfg, self.teacher, self.tokenizer,
                                                        self.train_set, self.layer_map,
                                                        self.device, self.dist)
        self.ddp = self.model
        if self.dist.enabled:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                else None, find_unused_parameters=True)

        self.steps_per_epoch = len(data.batch_indices(
            len(self.train_set), cfg.batch_size, 0, cfg.seed, rank=self.dist.rank,
            world_size=self.dist.world_size))
        total = math.ceil(cfg.epochs * self.steps_per_epoch)
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.optimizer = train.make_optimizer(self.model.named_parameters(), cfg.lr,
                                              cfg.weight_decay)
        self.scheduler = train.make_schedule(self.optimizer, cfg.schedule, self.total_steps,
                                             cfg.warmup_ratio)
        self.step = 0
        self.examples_seen = 0
        self.train_seconds = 0.0
        self.checkpoint_dir = os.path.join(cfg.output_dir, "checkpoint")
        self.log = train.JsonlLog(os.path.join(cfg.output_dir, "log.jsonl")
                                  if self.dist.is_main else None)
        if self.cache_info is not None:
            self.log.write(event="teacher_cache", stage=cfg.stage, **self.cache_info)
        for note in ineffective_settings(cfg, self.task):
            log.warning("%s", note)

    def _student_config(self):
        from transformers import AutoConfig, BertConfig
        spec = self.cfg.student
        if _is_pretrained(spec) or (spec.endswith(".json") and os.path.isfile(spec)):
            return pretrained(STUDENT_ARG, AutoConfig.from_pretrained, spec)
        if spec in PRESETS:
            return BertConfig(vocab_size=self.base_config.vocab_size, **PRESETS[spec])
        raise ValueError(f"student must be a preset {sorted(PRESETS)}, a config.json, a "
                         f"checkpoint directory or a hub model id; got {spec!r}")

    # checkpoints
    def save_checkpoint(self) -> None:
        if self.dist.is_main:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "step": self.step,
                     "examples_seen": self.examples_seen, "train_seconds": self.train_seconds,
                     "rng": train.rng_state(), "config": dataclasses.asdict(self.cfg)}
            train.atomic_save_dir(self.checkpoint_dir,
                                  lambda d: torch.save(state, os.path.join(d, "trainer_state.pt")))
        self.dist.barrier()

    def maybe_resume(self) -> None:
        path = train.latest_dir(self.checkpoint_dir) if self.cfg.resume else None
        if path is None:
            if self.cfg.resume:
                log.info("no checkpoint under %s: starting from scratch", self.checkpoint_dir)
            return
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu",
                           weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.examples_seen = state["step"], state["examples_seen"]
        self.train_seconds = state["train_seconds"]
        train.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", path, self.step)

    def export(self) -> str:
        """The trained student (save_pretrained + tokenizer + projection) in <output>/model, with
        TRAINING_FILE saying which stage trained it and whether its prediction head was trained
        (step 1 and general distillation train the encoder only; `eval` warns on such a model)."""
        model_dir = os.path.join(self.cfg.output_dir, "model")
        if self.dist.is_main:
            def write(d):
                self.student.save_pretrained(d)
                self.tokenizer.save_pretrained(d)
                if self.model.projection is not None:
                    torch.save(self.model.projection.state_dict(), os.path.join(d, PROJECTION_FILE))
                train.write_json_atomic(os.path.join(d, TRAINING_FILE), {
                    "stage": self.cfg.stage, "task": self.cfg.task,
                    "head_trained": head_trained(self.cfg, self.task)})
            train.atomic_save_dir(model_dir, write)
        self.dist.barrier()
        return model_dir

    def evaluate(self) -> dict:
        """{split: metrics} on the dev sets: the task's metrics once the head is trained; in the
        intermediate stages (task1), whose head is untrained, the stage's loss terms on dev
        ("dev_attention", "dev_hidden", ...; the teacher runs on the dev batches)."""
        if not self.dist.is_main or not self.dev_sets:
            return {}
        if self.objective.intermediate:
            return {split: self._dev_losses(ds) for split, ds in self.dev_sets.items()}
        return {split: train.evaluate(self.student, ds, self.task, self.cfg.eval_batch_size,
                                      self.device, self.tokenizer.pad_token_id, self.bf16)
                for split, ds in self.dev_sets.items()}

    @torch.no_grad()
    def _dev_losses(self, dataset) -> dict:
        """The mean over dev batches of each loss term of the stage's objective."""
        was_training = self.student.training
        self.student.eval()
        sums, n = {}, 0
        batches = data.batch_indices(len(dataset), self.cfg.eval_batch_size, 0, 0, shuffle=False)
        for batch in data.iterate_batches(dataset, batches, self.tokenizer.pad_token_id, None,
                                          False):
            inputs = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask",
                                                            "token_type_ids")}
            with train.autocast(self.device, self.bf16):
                terms = self.objective(self.model, inputs, None)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            n += 1
        self.student.train(was_training)
        return {f"dev_{k}": float(v) / max(n, 1) for k, v in sums.items()}

    def train(self) -> dict:
        cfg = self.cfg
        self.maybe_resume()
        pad_to = cfg.max_length if cfg.pad_to_max_length else None
        regression = self.task is not None and self.task.is_regression
        bar = None
        if self.dist.is_main and cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{cfg.stage}",
                       dynamic_ncols=True)
        evals = []
        window = {"loss": 0.0, "n": 0, "examples": 0, "tokens": 0, "t0": time.perf_counter()}
        window_start = self.step
        while self.step < self.total_steps:
            epoch, done_in_epoch = divmod(self.step, self.steps_per_epoch)
            batches = data.batch_indices(len(self.train_set), cfg.batch_size, epoch, cfg.seed,
                                         rank=self.dist.rank, world_size=self.dist.world_size)
            todo = batches[done_in_epoch:]
            cached = (self.cache.prefetch(todo, self.device, pad_to=pad_to,
                                          attention="qk" if cfg.attention_from == "qk"
                                          else "scores")
                      if self.cache is not None else None)
            for batch in data.iterate_batches(self.train_set, todo,
                                              self.tokenizer.pad_token_id, pad_to, regression):
                t_step = time.perf_counter()
                terms = self._train_step(batch, next(cached) if cached is not None else None)
                self.step += 1
                n_ex = int(batch["input_ids"].shape[0]) * self.dist.world_size
                self.examples_seen += n_ex
                self.train_seconds += time.perf_counter() - t_step
                window["loss"] = window["loss"] + terms["total"]  # on device: no sync per step
                window["n"] += 1
                window["examples"] += n_ex
                window["tokens"] += int(batch["attention_mask"].sum()) * self.dist.world_size
                if bar is not None:
                    bar.update(1)
                    if self.step % cfg.log_steps and self.step - window_start <= cfg.log_steps:
                        # before the first log step: the throughput so far (no device sync)
                        elapsed = time.perf_counter() - window["t0"]
                        bar.set_postfix(ex_s=f"{window['examples'] / max(elapsed, 1e-9):.0f}")
                if self.step % cfg.log_steps == 0 or self.step == self.total_steps:
                    self._log_window(window, terms, epoch, bar)
                if self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                if self.step >= self.total_steps:
                    break
            if self.step % self.steps_per_epoch == 0 or self.step >= self.total_steps:
                metrics = self.evaluate()
                if metrics:
                    evals.append({"epoch": self.step / self.steps_per_epoch, **metrics})
                    self.log.write(event="eval", stage=cfg.stage, step=self.step, metrics=metrics)
                    log.info("%s step %d dev %s", cfg.stage, self.step, metrics)
                if self.step < self.total_steps:
                    self.save_checkpoint()
        if bar is not None:
            bar.close()
        model_dir = self.export()
        summary = {"stage": cfg.stage, "task": cfg.task, "steps": self.step,
                   "examples_seen": self.examples_seen,
                   "train_seconds": self.train_seconds,
                   "examples_per_second": self.examples_seen / max(self.train_seconds, 1e-9),
                   "dev": evals[-1] if evals else None, "evals": evals, "model_dir": model_dir,
                   "losses": cfg.losses, "device": str(self.device),
                   "world_size": self.dist.world_size, "teacher_cache": self.cache_info}
        if self.dist.is_main:
            train.write_json_atomic(os.path.join(cfg.output_dir, "summary.json"), summary)
            self.log.write(event="summary", **summary)
            if not cfg.keep_checkpoint:  # the model is exported: the resume state has done its job
                for path in (self.checkpoint_dir, f"{self.checkpoint_dir}.old"):
                    shutil.rmtree(path, ignore_errors=True)
        return summary

    def _train_step(self, batch, cached) -> dict:
        inputs = {k: batch[k].to(self.device, non_blocking=True)
                  for k in ("input_ids", "attention_mask", "token_type_ids")}
        labels = batch["labels"].to(self.device) if "labels" in batch else None
        with train.autocast(self.device, self.bf16):
            terms = self.objective(self.ddp, inputs, labels, cached)
        terms["total"].backward()
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {k: v.detach() for k, v in terms.items()}

    def _log_window(self, window, terms, epoch, bar) -> None:
        elapsed = time.perf_counter() - window["t0"]
        means = self.dist.mean(torch.stack([t.float() for t in terms.values()])).cpu()
        record = {"event": "train", "stage": self.cfg.stage, "step": self.step, "epoch": epoch,
                  **{k: float(v) for k, v in zip(terms, means)},
                  "mean_loss": float(window["loss"]) / max(window["n"], 1),
                  "lr": self.scheduler.get_last_lr()[0],
                  "examples_per_second": window["examples"] / max(elapsed, 1e-9),
                  "tokens_per_second": window["tokens"] / max(elapsed, 1e-9)}
        self.log.write(**record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['mean_loss']:.4f}",
                            ex_s=f"{record['examples_per_second']:.0f}")
        window.update(loss=0.0, n=0, examples=0, tokens=0, t0=time.perf_counter())


# --- CLI -----------------------------------------------------------------------------------------

HELP = "distil a student from a teacher (TinyBERT general / task step 1 / step 2)"


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Data, optimisation and run flags shared by distill and finetune-teacher (whose --help
    ends with the table of the per-stage defaults)."""
    p.epilog = stage_defaults_table()
    g = p.add_argument_group("data")
    g.add_argument("--task", choices=sorted(data.TASKS))
    g.add_argument("--data-dir", help="local GLUE TSV folder (default: `datasets` by task name)")
    g.add_argument("--train-file", help="training TSV in the task's GLUE layout (e.g. augmented)")
    g.add_argument("--max-length", type=int, help="default 64 single-sentence, 128 pairs")
    g.add_argument("--pad-to-max-length", action="store_true")
    g.add_argument("--limit-train", type=int, help="use the first N training examples")
    g.add_argument("--limit-eval", type=int, help="use the first N dev examples")
    g = p.add_argument_group("optimisation", "The first five default per stage (table below).")
    per_stage = "default: per stage, see the table below"
    g.add_argument("--epochs", type=float, help=f"passes over the training data ({per_stage})")
    g.add_argument("--batch-size", type=int, help=f"examples per step over all ranks ({per_stage})")
    g.add_argument("--lr", type=float, help=f"peak AdamW learning rate ({per_stage})")
    g.add_argument("--warmup-ratio", type=float,
                   help=f"fraction of the steps with a linear warm-up ({per_stage})")
    g.add_argument("--schedule", choices=["linear", "constant"],
                   help=f"after the warm-up: linear decay to 0, or constant ({per_stage})")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay (none on biases and LayerNorm weights)")
    g.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip the gradient norm to this (0: no clipping)")
    g.add_argument("--max-steps", type=int, help="stop after this many steps (default: epochs)")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", required=True,
                   help="model/, summary.json, log.jsonl and the resume checkpoint go here")
    g.add_argument("--seed", type=int, default=42, help="data order, initialisation, dropout")
    g.add_argument("--device", default="auto", help="auto: this rank's GPU if any, else CPU")
    g.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bfloat16 autocast (auto: on CUDA only)")
    g.add_argument("--save-steps", type=int, default=500,
                   help="write the resume checkpoint every N steps (and at each epoch's end)")
    g.add_argument("--log-steps", type=int, default=50, help="log.jsonl record every N steps")
    g.add_argument("--eval-batch-size", type=int, default=128,
                   help="batch size of evaluation and of the teacher-cache build")
    g.add_argument("--no-eval", dest="eval", action="store_false",
                   help="skip the dev evaluation at each epoch's end")
    g.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint")
    g.add_argument("--keep-checkpoint", action="store_true",
                   help="keep <output-dir>/checkpoint (optimizer state) after a finished run; by "
                        "default it is deleted once the model is exported")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")


def stage_defaults_table() -> str:
    """The optimisation defaults of every stage, as `--help` prints them."""
    keys = ("epochs", "batch_size", "lr", "warmup_ratio", "schedule")
    rows = [("stage", "--epochs", "--batch-size", "--lr", "--warmup-ratio", "--schedule")]
    for stage, values in STAGE_DEFAULTS.items():
        rows.append((stage, *(f"{values[k]:g}" if isinstance(values[k], float) else
                              str(values[k]) for k in keys)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    special = ", ".join(f"{t} {n:g}" for t, n in TASK1_EPOCHS.items())
    return ("defaults per stage (finetune-teacher: the finetune row):\n  "
            + "\n  ".join(lines)
            + f"\n  task1 --epochs by task: {special}"
            + "\n  --max-length: 64 for single-sentence tasks, 128 for sentence pairs")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", required=True, choices=["general", "task1", "task2", "all"],
                   help="general: intermediate losses on a corpus; task1: the same on task data; "
                        "task2: the prediction loss; all: task1 then task2")
    p.add_argument("--teacher", required=True, help="teacher checkpoint dir or hub name")
    p.add_argument("--student", required=True,
                   help=f"preset {sorted(PRESETS)}, a config.json, a checkpoint dir or a hub name")
    p.add_argument("--tokenizer", help="default: the teacher's")
    p.add_argument("--init", choices=["auto", "random", "teacher-layers"], default="auto",
                   help="a new student's weights: random, or the teacher's embeddings and mapped "
                        "layers (teacher-layers: equal widths); auto = random")
    p.add_argument("--corpus", help="general distillation text (one passage per line)")
    g = p.add_argument_group("mapping and losses (intermediate losses: stages general and task1; "
                             "prediction loss: task2)")
    g.add_argument("--mapping", choices=mapping.STRATEGIES, default="uniform",
                   help="which teacher layers each student layer learns from")
    g.add_argument("--mapping-layers", type=lambda s: [int(x) for x in s.split(",")],
                   help="for --mapping list: teacher layers g(1..M), counted from 1, e.g. 3,6,9,12")
    g.add_argument("--mapping-seed", type=int, default=0, help="for --mapping random")
    g.add_argument("--attention-weight", type=float, default=1.0,
                   help="weight of the attention-score loss")
    g.add_argument("--hidden-weight", type=float, default=1.0,
                   help="weight of the hidden-state loss of the layers")
    g.add_argument("--embedding-weight", type=float, default=1.0,
                   help="weight of the embedding-layer loss")
    g.add_argument("--prediction-weight", type=float, default=1.0,
                   help="weight of step 2's loss on the teacher's outputs (soft cross-entropy; "
                        "MSE on a regression task)")
    g.add_argument("--hard-label-weight", type=float, default=0.0,
                   help="mix hard-label cross-entropy into step 2 (classic soft+hard KD)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature of step 2's soft cross-entropy (no effect on a "
                        "regression task)")
    g.add_argument("--losses", choices=["fused", "eager"], default="fused",
                   help="fused: the registered ops (Triton on CUDA tensors; on CPU tensors the "
                        "eager reference, as backend 'auto' does); eager: tinybert_fast.reference")
    g.add_argument("--attention-from", choices=["scores", "qk"], default="scores",
                   help="qk: the attention loss from Q and K (tbf.attention_mse_qk); student and "
                        "teacher then run SDPA attention on every layer (with --teacher-cache, "
                        "the cache stores the teacher's Q and K)")
    g.add_argument("--mask-padding", action="store_true",
                   help="exclude padded query rows and tokens from the intermediate losses "
                        "(TinyBERT keeps them; always on with --teacher-cache)")
    g = p.add_argument_group("teacher cache")
    g.add_argument("--teacher-cache", help="folder of cached teacher outputs: built on first "
                   "use, then the teacher runs no more (see tinybert_fast.cache)")
    g.add_argument("--cache-dtype", choices=["fp32", "bf16", "fp16", "int8"], default="bf16",
                   help="storage of the cached outputs (int8: per-row scales)")
    add_common_arguments(p)


def config_from_args(args: argparse.Namespace, **overrides) -> DistillConfig:
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values.update(overrides)
    return DistillConfig(**values)


def run(args: argparse.Namespace) -> int:
    summary = distill(config_from_args(args))
    log.info("summary: %s", json.dumps(summary))
    return 0
