"""TinyBERT distillation inside a Hugging Face `transformers.Trainer`.

    from tinybert_fast.distill import DistillConfig
    from tinybert_fast.hf import DistillationTrainer

    cfg = DistillConfig(stage="task1", task="sst2", output_dir="out", student="-",
                        mapping="uniform")
    trainer = DistillationTrainer(model=student, teacher=teacher, distill_config=cfg,
                                  args=TrainingArguments("out", bf16=True, ...),
                                  train_dataset=train, data_collator=collator)
    trainer.train()
    trainer.save_student("out/student")

`compute_loss` runs the `distill` loop's objective (tinybert_fast.distill.Objective, which calls
tbf.distillation_terms with the mapped layers stacked) with score capture; the config's stage,
mapping, loss weights, temperature and `attention_form` apply as in `tinybert-fast distill`
(its data, schedule and run fields are the Trainer's business: use TrainingArguments).  The
hidden projection d_s -> d_t is trained with the student: the Trainer's model is
`StudentWithProjection(student, projection)` (the module the loop trains), so the optimizer, DDP
through accelerate/torchrun, gradient accumulation, bf16/fp16 autocast, checkpoints and resume
all see one model.  `trainer.student` is the Hugging Face student; `save_student` writes it (and
the projection) for `--student` of a later stage.

With `teacher_cache` (a tbf.TeacherCache built for the training set, e.g. by `tinybert-fast
cache`), the batches must carry "example_id" (the example's index in the cached training set)
and the teacher does not run in training; evaluation runs it live.
"""

from __future__ import annotations

import inspect
import json
import os

import torch
from torch import nn

from . import capture, glue, mapping, train
from .distill.config import PROJECTION_FILE, DistillConfig, is_intermediate
from .distill.models import check_pair
from .distill.objective import Objective, StudentWithProjection
from .distill.targets import TeacherTargets

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - transformers is a dependency
    raise ImportError("tinybert_fast.hf needs transformers (and accelerate for its Trainer)") \
        from exc

LOSS_SCALES_FILE = "loss_scales.json"   # in a Trainer checkpoint: Objective.loss_scales


class _KeepLossScales(TrainerCallback):
    """Writes the objective's loss-balance scales into each checkpoint the Trainer saves."""

    def __init__(self, objective: Objective):
        self.objective = objective

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            train.write_json_atomic(os.path.join(folder, LOSS_SCALES_FILE),
                                    self.objective.loss_scales)


class DistillationTrainer(Trainer):
    """A Trainer whose loss is a TinyBERT stage's objective.

    model: the student (a Hugging Face encoder of a supported family, capture.FAMILIES; a
        sequence-classification model for the task stages).  teacher: the teacher, any
        supported family on the same vocabulary (fine-tuned for task2); the pair is checked
        (distill.check_pair) before anything runs.
    distill_config: the `distill` command's config; its stage must be general, task1 or task2.
    layer_map: the mapping (default: distill_config's mapping for the two models' depths).
    projection: the hidden projection nn.Linear(d_s, d_t) (default: a new one, the identity when
        d_s == d_t); used in general/task1 when a hidden or embedding weight is set.
    teacher_cache: an opened tbf.TeacherCache of the training set (see the module docstring).
    Every other argument is the Trainer's.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, distill_config: DistillConfig,
                 *args, layer_map: mapping.LayerMap | None = None,
                 projection: nn.Linear | None = None, teacher_cache=None, **kwargs):
        cfg = distill_config.resolved()
        if cfg.stage not in ("general", "task1", "task2"):
            raise ValueError(f"distill_config.stage must be general, task1 or task2 for "
                             f"DistillationTrainer; got {cfg.stage!r}")
        task = glue.get_task(cfg.task) if cfg.task else None
        if cfg.stage != "general" and task is None:
            raise ValueError(f"distill_config.task is required in stage {cfg.stage!r}")
        attn = capture.register()
        for name, m in (("model", model), ("teacher", teacher)):
            if not hasattr(m, "set_attn_implementation"):
                raise TypeError(f"{name} must be a transformers model; got {type(m).__name__}")
            m.set_attn_implementation(attn)
        s_cfg, t_cfg = model.config, teacher.config
        intermediate = is_intermediate(cfg.stage)
        if intermediate and layer_map is None:
            layer_map = mapping.layer_map(cfg.mapping, s_cfg.num_hidden_layers,
                                          t_cfg.num_hidden_layers, seed=cfg.mapping_seed,
                                          layers=cfg.mapping_layers)
        targets = TeacherTargets.of(cfg, layer_map if intermediate else None, t_cfg)
        check_pair(s_cfg, t_cfg, targets)
        if targets.hidden and projection is None:
            projection = nn.Linear(s_cfg.hidden_size, t_cfg.hidden_size)
            if s_cfg.hidden_size == t_cfg.hidden_size:
                with torch.no_grad():
                    projection.weight.copy_(torch.eye(t_cfg.hidden_size))
                    projection.bias.zero_()
        if not targets.hidden:
            projection = None
        super().__init__(StudentWithProjection(model, projection), *args, **kwargs)
        # the objective is a mean over the batch: the Trainer divides it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self.student = model
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.distill_config = cfg
        self.targets = targets
        self.objective = Objective(cfg, task, targets, self.teacher)
        self.teacher_cache = teacher_cache
        if cfg.loss_balance != "none":
            self.add_callback(_KeepLossScales(self.objective))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer.train; on resume, the loss balance's scales come back from the checkpoint
        (LOSS_SCALES_FILE) instead of being measured again on a later batch."""
        if resume_from_checkpoint and self.distill_config.loss_balance != "none":
            path = resume_from_checkpoint
            if path is True:
                from transformers.trainer_utils import get_last_checkpoint
                path = get_last_checkpoint(self.args.output_dir)
            saved = os.path.join(path, LOSS_SCALES_FILE) if path else None
            if saved and os.path.isfile(saved):
                with open(saved, encoding="utf-8") as f:
                    try:
                        scales = json.load(f)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{saved}:{exc.lineno}:{exc.colno}: not valid JSON "
                                         f"({exc.msg})") from None
                self.objective.restore_loss_scales(scales, saved)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            names = list(inspect.signature(self.student.forward).parameters)
            self._signature_columns = names + ["label", "label_ids", "labels", "example_id"]

    def _cached(self, inputs, example_id):
        if self.teacher_cache is None or not self.model.training:
            return None
        if example_id is None:
            raise ValueError("DistillationTrainer with a teacher_cache needs 'example_id' in each "
                             "batch (the example's index in the cached training set)")
        return self.teacher_cache.fetch(
            example_id.tolist(), device=inputs["input_ids"].device,
            pad_to=inputs["input_ids"].shape[1],
            attention_form=self.targets.attention_form or "scores")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The stage's objective on one batch: its "total" (and with return_outputs, every
        term)."""
        labels = inputs.get("labels")
        model_inputs = {k: inputs[k] for k in train.model_inputs(self.student, inputs)}
        terms = self.objective(model, model_inputs, labels, self._cached(model_inputs,
                                                                         inputs.get("example_id")))
        return (terms["total"], terms) if return_outputs else terms["total"]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """(loss, student logits, labels) on an evaluation batch: the loss is the stage's
        objective (the teacher runs live); logits for compute_metrics in the task stages."""
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs).detach()
            if prediction_loss_only or self.distill_config.stage == "general":
                return loss, None, None
            logits = self.student(**{k: inputs[k]
                                     for k in train.model_inputs(self.student, inputs)}).logits
        return loss, logits.detach(), labels

    def save_student(self, output_dir: str) -> None:
        """The student (save_pretrained) and, when there is one, the projection
        (PROJECTION_FILE, the file `tinybert-fast distill --student DIR` loads)."""
        os.makedirs(output_dir, exist_ok=True)
        self.student.save_pretrained(output_dir)
        projection = self.model.projection
        if projection is not None:
            torch.save(projection.state_dict(), os.path.join(output_dir, PROJECTION_FILE))
