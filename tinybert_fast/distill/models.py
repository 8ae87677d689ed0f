"""Models of a run: loading the teacher, building the student (a preset, a config.json or a
checkpoint; optionally initialised from the teacher's mapped layers), and the checks a
student/teacher pair must pass before training starts."""

from __future__ import annotations

import os

import torch

from .. import capture, glue, mapping
from .config import PRESETS

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


# a preset's keys (BERT names) -> the config attribute of families that name them otherwise
_CONFIG_NAMES = {"distilbert": {"num_hidden_layers": "n_layers", "hidden_size": "dim",
                                "num_attention_heads": "n_heads",
                                "intermediate_size": "hidden_dim"}}


def preset_config(preset: str, base_config, family: str = "teacher", **kwargs):
    """The config of a preset student (PRESETS: layers, width, heads, FFN) that shares the
    teacher's tokenizer: family "teacher" copies `base_config` (the teacher's: its family,
    vocabulary, positions, padding id, position bias) and sets the preset's sizes; "bert" is a
    BertConfig on the teacher's vocabulary, positions and padding id (an MPNet teacher's pad id
    is 1: with BERT's default 0 the <s> row would be the padding row and never train).
    kwargs (e.g. num_labels) go to the config."""
    from transformers import BertConfig
    sizes = PRESETS[preset]
    if family == "bert" or base_config is None or base_config.model_type == "bert":
        if base_config is None:
            raise ValueError(f"student preset {preset!r} needs a teacher (or a tokenizer) for "
                             f"its vocabulary")
        return BertConfig(vocab_size=base_config.vocab_size,
                          max_position_embeddings=base_config.max_position_embeddings,
                          type_vocab_size=getattr(base_config, "type_vocab_size", 2),
                          pad_token_id=base_config.pad_token_id
                          if base_config.pad_token_id is not None else 0,
                          **sizes, **kwargs)
    capture.family(base_config, "teacher")
    config = type(base_config).from_dict({
        k: v for k, v in base_config.to_dict().items()
        if k not in ("architectures", "_name_or_path", "id2label", "label2id", "num_labels",
                     "_attn_implementation_autoset", "transformers_version")})
    names = _CONFIG_NAMES.get(base_config.model_type, {})
    for key, value in sizes.items():
        setattr(config, names.get(key, key), value)
    if hasattr(config, "embedding_size"):  # ELECTRA: embeddings as wide as the layers
        config.embedding_size = sizes["hidden_size"]
    for key, value in kwargs.items():
        setattr(config, key, value)
    return config


def build_student(spec: str, stage: str, task: glue.Task | None, base_config, init: str,
                  layer_map_for_init=None, teacher=None, family: str = "teacher"):
    """The student: a preset name (tinybert4, tinybert6; preset_config: the teacher's family
    or BERT, sharing its tokenizer), a config.json (random weights) or a checkpoint directory
    (its weights, loaded in float32: a general-distilled or previous-stage student)."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
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
        config = preset_config(spec, base_config, family, **kwargs)
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


def student_config(spec: str, base_config, family: str = "teacher"):
    """The student's config without loading its weights (a preset: preset_config from
    `base_config`, the teacher's), for the checks that run before the models load."""
    from transformers import AutoConfig
    if _is_pretrained(spec) or (spec.endswith(".json") and os.path.isfile(spec)):
        return pretrained(STUDENT_ARG, AutoConfig.from_pretrained, spec)
    if spec in PRESETS:
        return preset_config(spec, base_config, family)
    raise ValueError(f"student must be a preset {sorted(PRESETS)}, a config.json, a "
                     f"checkpoint directory or a hub model id; got {spec!r}")


def _encoder(model):
    """The bare encoder of a model with or without a task head (BertModel of a
    BertForSequenceClassification, MPNetModel of an MPNetFor..., ...)."""
    return getattr(model, "base_model", model)


def encoder_layers(model):
    """The encoder's list of layers (encoder.layer; DistilBERT: transformer.layer)."""
    enc = _encoder(model)
    return enc.transformer.layer if hasattr(enc, "transformer") else enc.encoder.layer


def copy_teacher_layers(student, teacher, layer_map: mapping.LayerMap) -> None:
    """Initialise a student of the teacher's family and width from the teacher's embeddings,
    its position-bias table if it has one (MPNet's sits on the encoder, not on a layer), and
    the teacher layers it is mapped to (the last of each attention group)."""
    s, t = _encoder(student), _encoder(teacher)
    if s.config.model_type != t.config.model_type:
        raise ValueError(f"init 'teacher-layers' needs student and teacher of one family; got "
                         f"{s.config.model_type} and {t.config.model_type}")
    for key in ("hidden_size", "intermediate_size", "num_attention_heads"):
        if getattr(s.config, key) != getattr(t.config, key):
            raise ValueError(f"init 'teacher-layers' needs student and teacher of equal {key}; "
                             f"got {getattr(s.config, key)} and {getattr(t.config, key)}")
    s.embeddings.load_state_dict(t.embeddings.state_dict())
    if hasattr(t, "encoder") and hasattr(t.encoder, "relative_attention_bias"):
        s.encoder.relative_attention_bias.load_state_dict(
            t.encoder.relative_attention_bias.state_dict())
    s_layers, t_layers = encoder_layers(s), encoder_layers(t)
    for i, group in enumerate(layer_map.attention):
        s_layers[i].load_state_dict(t_layers[group[-1]].state_dict())


def check_pair(student_config, teacher_config, targets, tokenizer=None) -> None:
    """Errors a student/teacher pair must raise before any work starts, naming what differs:
    a family whose attention cannot be captured (when an attention term is on), vocabularies of
    different sizes or padding ids (the two models read the same token ids), a tokenizer whose
    ids do not fit the models, and head counts (when an attention term is on: heads are paired
    one to one).  targets: the run's TeacherTargets."""
    if targets.attention:
        capture.family(teacher_config, "teacher")
        capture.family(student_config, "student")
    vs, vt = student_config.vocab_size, teacher_config.vocab_size
    if vs != vt:
        raise ValueError(f"student and teacher read the same token ids, but their vocabularies "
                         f"differ: the student's has {vs} entries and the teacher's {vt}; build "
                         f"the student on the teacher's tokenizer (a preset does)")
    ps, pt = student_config.pad_token_id, teacher_config.pad_token_id
    if ps is not None and pt is not None and ps != pt:
        raise ValueError(f"student and teacher pad with different ids ({ps} and {pt}): the "
                         f"student would treat the teacher's padding id as a token")
    if tokenizer is not None and len(tokenizer) > vt:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the models' "
                         f"vocabulary {vt}: it is not the teacher's tokenizer")
    if targets.attention:
        hs, ht = student_config.num_attention_heads, teacher_config.num_attention_heads
        if hs != ht:
            raise ValueError(f"the attention loss pairs heads one to one, but the student has "
                             f"{hs} heads and the teacher {ht}; use models with equal head "
                             f"counts or --attention-loss none")
