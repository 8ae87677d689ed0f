"""The stage's objective: the loss terms of a batch, from the student's outputs and the
teacher's (run live, or read from the teacher cache)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import _backend, capture, glue
from ..losses import distillation_terms
from .config import DistillConfig

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


class Objective:
    """The stage's loss: tinybert_fast.distillation_terms on the student's outputs and the
    teacher's (run live, or read from the teacher cache), the mapped layers stacked so that each
    term launches once.  cfg.losses "eager" runs it on backend "torch" (the eager reference)."""

    def __init__(self, cfg: DistillConfig, task: glue.Task | None, layer_map, teacher):
        self.cfg, self.task, self.layer_map, self.teacher = cfg, task, layer_map, teacher
        self.backend = "torch" if cfg.losses == "eager" else None
        self.intermediate = cfg.stage in ("general", "task1")
        self.need_att = (self.intermediate and cfg.attention_weight != 0
                         and cfg.attention_loss != "none")
        self.need_hid = (self.intermediate and (cfg.hidden_weight != 0 or
                                                cfg.embedding_weight != 0)
                         and cfg.hidden_loss != "none")

    def __call__(self, model: nn.Module, inputs: dict, labels, cached=None) -> dict:
        """model: StudentWithProjection (or DDP of it); cached: the batch's TeacherBatch when the
        teacher's outputs come from a cache.  Returns the loss terms and "total"."""
        with (_backend.selected(self.backend) if self.backend else contextlib.nullcontext()):
            if self.intermediate:
                return self._intermediate(model, inputs, cached)
            return self._prediction(model, inputs, labels, cached)

    def _teacher_intermediates(self, inputs, cached):
        """The teacher's mapped targets: attention as stacked scores [n, B, H, L, L] or as
        stacked (Q, K) [n, B, H, L, d] each, and states [n + 1, B, L, d] (state 0 = the
        embeddings); None where not needed."""
        lm, qk = self.layer_map, self.cfg.attention_from == "qk"
        order = lm.teacher_attention_layers
        attention = states = None
        if cached is not None:
            if self.need_att and qk:  # a cache of Q and K
                attention = (_mapped(cached.query, order, lm.attention),
                             _mapped(cached.key, order, lm.attention))
            elif self.need_att:
                attention = _mapped(cached.attention, order, lm.attention)
            if self.need_hid:
                states = _mapped(cached.hidden, lm.teacher_hidden_states, lm.hidden)
            return attention, states
        with torch.no_grad(), self._record(order) as t_rec:
            t_out = self.teacher(**inputs, output_hidden_states=self.need_hid)
            if self.need_att and qk:
                q, k = (torch.stack(x) for x in zip(*t_rec.layers))
                attention = (_mapped(q, order, lm.attention), _mapped(k, order, lm.attention))
            elif self.need_att:
                attention = _mapped(t_rec.stacked, order, lm.attention)
            if self.need_hid:
                used = lm.teacher_hidden_states
                states = _mapped(torch.stack([t_out.hidden_states[i] for i in used]), used,
                                 lm.hidden)
        return attention, states

    def _record(self, layers):
        """Record scores (into one stacked buffer) or Q and K of these layers during the next
        forward, when needed."""
        layers = layers if self.need_att else []
        if self.cfg.attention_from == "qk":
            return capture.record_qk(layers)
        return capture.record_scores(layers, stacked=True)

    def _intermediate(self, model, inputs, cached):
        cfg, lm = self.cfg, self.layer_map
        t_attention, t_states = self._teacher_intermediates(inputs, cached)
        n_student = len(lm.attention)
        with self._record(range(n_student)) as s_rec:
            s_out, w, b = model(**inputs, output_hidden_states=self.need_hid)
        given = {}
        if self.need_att and cfg.attention_from == "qk":
            q_s, k_s = (torch.stack(x) for x in zip(*s_rec.layers))
            given.update(student_query=q_s, student_key=k_s, teacher_query=t_attention[0],
                         teacher_key=t_attention[1])
        elif self.need_att:
            given.update(student_attention=s_rec.stacked, teacher_attention=t_attention)
        if self.need_hid:
            s_states = s_out.hidden_states
            given.update(student_embedding=s_states[0], teacher_embedding=t_states[0],
                         student_hidden=torch.stack(s_states[1:]), teacher_hidden=t_states[1:],
                         weight=w, bias=b)
        # padded positions: excluded when asked, and always with a cache (it stores none)
        return distillation_terms(
            **given, attention_mask=inputs["attention_mask"],
            mask_padding=cfg.mask_padding or cached is not None,
            attention_weight=cfg.attention_weight, embedding_weight=cfg.embedding_weight,
            hidden_weight=cfg.hidden_weight, attention_loss=cfg.attention_loss,
            hidden_loss=cfg.hidden_loss)

    def _prediction(self, model, inputs, labels, cached):
        cfg, task = self.cfg, self.task
        s_logits = model(**inputs)[0].logits
        t_logits = None
        if cfg.stage == "task2" and cfg.prediction_weight != 0:
            if cached is not None:
                t_logits = cached.logits
            else:
                with torch.no_grad():
                    t_logits = self.teacher(**inputs).logits
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
