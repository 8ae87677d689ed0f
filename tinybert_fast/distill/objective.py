"""The stage's objective: the loss terms of a batch, from the student's outputs and the
teacher's (run live, or read from the teacher cache)."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .. import _backend, capture, glue, train
from ..losses import distillation_terms
from .config import DistillConfig
from .targets import TeacherTargets

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


def _mapped(stacked, order, groups):
    """The mapped targets [len(groups), ...] from `stacked` [len(order), ...] (the entries of the
    layers in `order`): `stacked` itself when each group is one layer, in order (a cache's and a
    stacked record's case: no copy), else a stack of each group's entry (the mean for a group of
    several)."""
    position = {layer: i for i, layer in enumerate(order)}
    if [[position[g] for g in group] for group in groups] == [[i] for i in range(len(order))]:
        return stacked
    return torch.stack([_mean([stacked[position[g]] for g in group]) for group in groups])


BALANCED_TERMS = ("attention", "embedding", "hidden")


class Objective:
    """The stage's loss: tinybert_fast.distillation_terms on the student's outputs and the
    teacher's (run live, or read from the teacher cache), the mapped layers stacked so that each
    term launches once.  What is read from the teacher, and in which form, is `targets` (a
    TeacherTargets).  cfg.losses "eager" runs it on backend "torch" (the eager reference).

    Loss balance (cfg.loss_balance "initial", task step 1): on the first training batch each
    intermediate term T (attention, embedding, hidden) and the prediction loss P of the student's
    logits against the teacher's (cfg.prediction_loss at cfg.temperature; it is not trained in
    step 1) are measured, and from then on

        total = sum over T of  weight_T * (P0 / T0) * T

    so every term starts at P0 times its configured weight.  `loss_scales` ({term: P0 / T0,
    "reference": P0, "initial": {term: T0}}) is measured once (averaged over DDP ranks); the
    loop and the Trainer keep it in their checkpoints and set it back on resume.  Before it is
    measured, evaluation (no grad, or the model in eval mode) uses the configured weights."""

    def __init__(self, cfg: DistillConfig, task: glue.Task | None, targets: TeacherTargets,
                 teacher):
        self.cfg, self.task, self.targets, self.teacher = cfg, task, targets, teacher
        self.backend = "torch" if cfg.losses == "eager" else None
        self.loss_scales: dict | None = None

    @property
    def intermediate(self) -> bool:
        return self.targets.intermediate

    def __call__(self, model: nn.Module, inputs: dict, labels, cached=None) -> dict:
        """model: StudentWithProjection (or DDP of it); inputs: the batch's input_ids,
        attention_mask and (for families with token types) token_type_ids; cached: the batch's
        TeacherBatch when the teacher's outputs come from a cache.  Returns the loss terms and
        "total"."""
        with (_backend.selected(self.backend) if self.backend else contextlib.nullcontext()):
            if self.intermediate:
                return self._intermediate(model, inputs, cached)
            return self._prediction(model, inputs, labels, cached)

    def _teacher_inputs(self, inputs: dict) -> dict:
        return {k: v for k, v in inputs.items() if k in train.model_inputs(self.teacher, inputs)}

    def _teacher_intermediates(self, inputs, cached):
        """The teacher's mapped targets: attention as stacked scores [n, B, H, L, L] or as
        stacked (Q, K) [n, B, H, L, d] each, states [n + 1, B, L, d] (state 0 = the
        embeddings) and logits [B, C] (the loss balance's reference); None where not needed."""
        t = self.targets
        order, qk = t.attention_layers, t.attention_form == "qk"
        attention = states = None
        logits = cached.logits if cached is not None and t.logits else None
        if cached is not None:
            if qk:  # a cache of Q and K
                attention = (_mapped(cached.query, order, t.attention_groups),
                             _mapped(cached.key, order, t.attention_groups))
            elif t.attention:
                attention = _mapped(cached.attention, order, t.attention_groups)
            if t.hidden:
                states = _mapped(cached.hidden, t.hidden_states, t.hidden_groups)
            return attention, states, logits
        with torch.no_grad(), self._record(order) as t_rec:
            t_out = self.teacher(**self._teacher_inputs(inputs), output_hidden_states=t.hidden)
            if qk:
                q, k = (torch.stack(x) for x in zip(*t_rec.layers))
                attention = (_mapped(q, order, t.attention_groups),
                             _mapped(k, order, t.attention_groups))
            elif t.attention:
                attention = _mapped(t_rec.stacked, order, t.attention_groups)
            if t.hidden:
                used = t.hidden_states
                states = _mapped(torch.stack([t_out.hidden_states[i] for i in used]), used,
                                 t.hidden_groups)
            if t.logits:
                logits = t_out.logits
        return attention, states, logits

    def _record(self, layers):
        """Record the attention of these layers in the targets' form during the next forward
        (scores into one stacked buffer, or Q and K); nothing without an attention term."""
        if self.targets.attention_form == "qk":
            return capture.record_qk(layers)
        return capture.record_scores(layers if self.targets.attention else [], stacked=True)

    def _intermediate(self, model, inputs, cached):
        cfg, t = self.cfg, self.targets
        t_attention, t_states, t_logits = self._teacher_intermediates(inputs, cached)
        with self._record(t.student_layers) as s_rec:
            s_out, w, b = model(**inputs, output_hidden_states=t.hidden)
        given = {}
        if t.attention_form == "qk":
            q_s, k_s = (torch.stack(x) for x in zip(*s_rec.layers))
            given.update(student_query=q_s, student_key=k_s, teacher_query=t_attention[0],
                         teacher_key=t_attention[1])
        elif t.attention:
            given.update(student_attention=s_rec.stacked, teacher_attention=t_attention)
        if t.hidden:
            s_states = s_out.hidden_states
            given.update(student_embedding=s_states[0], teacher_embedding=t_states[0],
                         student_hidden=torch.stack(s_states[1:]), teacher_hidden=t_states[1:],
                         weight=w, bias=b)
        weights = {"attention": cfg.attention_weight, "embedding": cfg.embedding_weight,
                   "hidden": cfg.hidden_weight}
        if self.loss_scales is not None:
            weights = {k: w * self.loss_scales.get(k, 1.0) for k, w in weights.items()}
        # padded positions: excluded when asked, and always with a cache (it stores none)
        terms = distillation_terms(
            **given, attention_mask=inputs["attention_mask"],
            mask_padding=cfg.mask_padding or cached is not None,
            **{f"{k}_weight": w for k, w in weights.items()},
            attention_loss=cfg.attention_loss, hidden_loss=cfg.hidden_loss)
        if (cfg.loss_balance == "initial" and self.loss_scales is None and model.training
                and torch.is_grad_enabled()):  # a training batch, not an evaluation's
            self.loss_scales = self._measure_scales(terms, s_out.logits, t_logits)
            terms["total"] = sum(w * self.loss_scales[k] * terms[k]
                                 for k, w in weights.items() if k in terms)
        return terms

    def restore_loss_scales(self, scales, source: str) -> None:
        """Set loss_scales from a checkpoint (None: the run had not measured them yet).
        ValueError naming `source` when they are not what _measure_scales gives, or when the run
        has no loss balance to apply them to."""
        if scales is None:
            self.loss_scales = None
            return
        if self.cfg.loss_balance == "none":
            raise ValueError(f"{source} holds loss-balance scales, but this run has loss_balance "
                             f"'none': resume it with the loss balance it was started with")
        ok = (isinstance(scales, dict) and isinstance(scales.get("initial"), dict)
              and set(scales) - {"reference", "initial"} == set(scales["initial"]) and all(
                  isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                  for v in [scales.get("reference"), *scales["initial"].values()]
                  + [scales[k] for k in scales["initial"]]))
        if not ok:
            raise ValueError(f"{source}: the loss-balance scales are not {{term: scale, "
                             f"'reference': P0, 'initial': {{term: T0}}}} with finite, positive "
                             f"numbers; got {scales!r}")
        self.loss_scales = scales

    def _measure_scales(self, terms: dict, student_logits, teacher_logits) -> dict:
        """The loss balance's scales from the first batch's terms (see the class docstring); one
        host sync, once per run."""
        if teacher_logits is None:
            raise ValueError("loss_balance 'initial' needs the teacher's logits (a task teacher "
                             "with a classification head, or a teacher cache that stores them)")
        with torch.no_grad():
            reference = distillation_terms(
                student_logits=student_logits.detach(), teacher_logits=teacher_logits,
                temperature=self.cfg.temperature, regression=self.task.is_regression,
                prediction_loss=self.cfg.prediction_loss)["prediction"]
            names = [k for k in BALANCED_TERMS if k in terms]
            values = torch.stack([terms[k].detach().float() for k in names]
                                 + [reference.float()])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(values)
                values /= torch.distributed.get_world_size()
        *initial, p0 = values.tolist()
        for name, value in [("prediction (the reference)", p0), *zip(names, initial)]:
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"loss_balance 'initial': the {name} loss on the first batch is "
                                 f"{value}; a scale needs a finite, positive size")
        return {**{k: p0 / v for k, v in zip(names, initial)}, "reference": p0,
                "initial": dict(zip(names, initial))}

    def _prediction(self, model, inputs, labels, cached):
        cfg, task = self.cfg, self.task
        s_logits = model(**inputs)[0].logits
        t_logits = None
        if self.targets.logits:
            if cached is not None:
                t_logits = cached.logits
            else:
                with torch.no_grad():
                    t_logits = self.teacher(**self._teacher_inputs(inputs)).logits
        hard_weight = 1.0 if cfg.stage == "finetune" else cfg.hard_label_weight
        if hard_weight != 0 and labels is None:
            raise ValueError("the training data has no labels, which the hard-label loss needs")
        if t_logits is None and hard_weight == 0:
            raise ValueError("the objective is empty: every loss weight is 0")
        return distillation_terms(
            student_logits=s_logits, teacher_logits=t_logits,
            labels=labels if hard_weight != 0 else None, temperature=cfg.temperature,
            regression=task.is_regression, prediction_loss=cfg.prediction_loss,
            prediction_weight=cfg.prediction_weight, hard_label_weight=hard_weight)
