"""The thin TinyBERT distillation loop (the `tinybert-fast distill` subcommand is
tinybert_fast.commands.distill).

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
- MNLI labels follow the `datasets` order (see tinybert_fast.glue);
- regression (STS-B) step 2 regresses on the teacher's outputs, not on gold labels;
- batches are padded to their longest example unless --pad-to-max-length (the scripts always
  padded to max_seq_length); the losses keep TinyBERT's semantics on whatever padding there is.

Modules (the arrows point one way: config <- targets <- models, objective, cache_glue <- loop):
    config      DistillConfig, the stages' defaults, the student presets (no torch)
    targets     TeacherTargets: what a run needs from the teacher, in which form (decided once)
    models      load_teacher, build_student, student_config, copy_teacher_layers, check_pair
    objective   StudentWithProjection, Objective (the stage's loss terms of a batch)
    cache_glue  open_teacher_cache (explicit arguments), teacher_cache (from a DistillConfig)
    loop        distill (one stage or "all"), training_examples (explicit arguments),
                load_training_examples (from a DistillConfig)

The names below are imported from their module on first use, so that importing
tinybert_fast.distill.config (the command line does) does not load the loop.
"""

from __future__ import annotations

import importlib

# public name -> the module (relative to this package, or to tinybert_fast) that defines it
_NAMES = {
    **dict.fromkeys(("STAGES", "STAGE_DEFAULTS", "TASK1_EPOCHS", "PRESETS", "PROJECTION_FILE",
                     "TRAINING_FILE", "DistillConfig", "head_trained", "ineffective_settings",
                     "stage_defaults_table", "default_max_length", "INTERMEDIATE_STAGES",
                     "is_intermediate", "STUDENT_FAMILIES", "PREDICTIONS_FILE", "LOSS_BALANCES"),
                    ".config"),
    **dict.fromkeys(("STUDENT_ARG", "LOAD_DTYPE", "pretrained", "load_teacher", "build_student",
                     "student_config", "preset_config", "copy_teacher_layers", "check_pair",
                     "encoder_layers"), ".models"),
    **dict.fromkeys(("StudentWithProjection", "Objective"), ".objective"),
    **dict.fromkeys(("TeacherTargets",), ".targets"),
    **dict.fromkeys(("dataset_fingerprint", "open_teacher_cache",
                     "teacher_cache", "training_source", "training_tokens"), ".cache_glue"),
    **dict.fromkeys(("distill", "train_step", "load_training_examples", "training_examples"),
                    ".loop"),
    # the package modules the loop is built on, reachable as before (distill.data.get_task)
    **dict.fromkeys(("data", "train", "mapping", "capture"), ".."),
}

__all__ = sorted(name for name, where in _NAMES.items() if where != "..")


def __getattr__(name: str):
    where = _NAMES.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if where == "..":
        value = importlib.import_module(f"..{name}", __name__)
    else:
        value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value  # the next look-up is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
