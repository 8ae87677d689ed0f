"""The stage's objective: the loss terms of a batch, from the student's outputs and the
teacher's (run live, or read from the teacher cache)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import capture, glue, reference
from .. import ops as fused_ops
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


class Objective:
    """The stage's loss.  `losses` picks the implementation: the fused ops (tinybert_fast, which
    follow tbf.set_backend) or the eager reference (tinybert_fast.reference)."""

    def __init__(self, cfg: DistillConfig, task: glue.Task | None, layer_map, teacher):
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

