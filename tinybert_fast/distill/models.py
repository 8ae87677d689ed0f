"""Models of a run: loading the teacher, building the student (a preset, a config.json or a
checkpoint; optionally initialised from the teacher's mapped layers), and the checks a
student/teacher pair must pass before training starts."""

from __future__ import annotations

import os

import torch

from .. import capture, glue, mapping
from .config import PRESETS, DistillConfig

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
    """load(name, **kwargs) (a `from_pretrained`).  A local folder is checked first
    (tinybert_fast.checkpoints: missing or truncated weights, a config that does not match them,
    a tokenizer too large for the vocabulary; a local path that does not exist), each an
    InputError naming the argument and the file; the OSError that transformers raises for an
    unknown hub id or an unreachable hub becomes a ValueError that names the argument."""
    from ..checkpoints import check_model_argument
    owner = getattr(getattr(load, "__self__", None), "__name__", "")
    what = "tokenizer" if "Tokenizer" in owner else "config" if "Config" in owner else "model"
    check_model_argument(str(name), argument, what)
    try:
        return load(name, **kwargs)
    except OSError as exc:
        raise ValueError(f"{argument} {name!r}: cannot load it: {exc}") from exc


# Checkpoints load in float32 whatever dtype they were saved in (`from_pretrained` keeps a
# float16 or bfloat16 checkpoint's dtype): a student's weights are what AdamW updates, and bf16
# autocast on a GPU gives the speed; evaluation and the teacher follow the same rule.
LOAD_DTYPE = torch.float32


def load_teacher(name: str, stage: str, task: glue.Task | None, device):
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


def build_student(spec: str, stage: str, task: glue.Task | None, base_config, init: str,
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



def student_config(spec: str, base_config):
    """The student's config without loading its weights (a preset takes the vocabulary size from
    `base_config`, the teacher's), for the checks that run before the models load."""
    from transformers import AutoConfig, BertConfig
    if _is_pretrained(spec) or (spec.endswith(".json") and os.path.isfile(spec)):
        return pretrained(STUDENT_ARG, AutoConfig.from_pretrained, spec)
    if spec in PRESETS:
        return BertConfig(vocab_size=base_config.vocab_size, **PRESETS[spec])
    raise ValueError(f"student must be a preset {sorted(PRESETS)}, a config.json, a "
                     f"checkpoint directory or a hub model id; got {spec!r}")


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

