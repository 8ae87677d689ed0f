"""nn.Module wrappers over the fused ops, and one call for a whole stage's objective."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .ops import attention_mse, hidden_mse, soft_cross_entropy


class DistillLoss(NamedTuple):
    """A stage's objective and its terms (fp32 scalars; a term not computed is None)."""
    total: Tensor
    attention: Tensor | None
    hidden: Tensor | None
    prediction: Tensor | None


def _pair(name_s: str, s, name_t: str, t) -> bool:
    if (s is None) != (t is None):
        given, missing = (name_s, name_t) if t is None else (name_t, name_s)
        raise ValueError(f"{given} was given without {missing}; pass both or neither")
    return s is not None


def distillation_loss(*, student_attention=None, teacher_attention=None, attention_mask=None,
                      student_hidden=None, teacher_hidden=None, weight: Tensor | None = None,
                      bias: Tensor | None = None, student_logits: Tensor | None = None,
                      teacher_logits: Tensor | None = None, temperature: float = 1.0,
                      attention_weight: float = 1.0, hidden_weight: float = 1.0,
                      prediction_weight: float = 1.0, mask_padding: bool = False) -> DistillLoss:
    """TinyBERT's objective for one stage, over all mapped layers:

        total = attention_weight * attention_mse(S_s, S_t, attention_mask)
              + hidden_weight * hidden_mse(H_s, H_t, weight, bias)
              + prediction_weight * soft_cross_entropy(z_s, z_t, temperature)

    with the "mean" reductions (TinyBERT's).  attention_mask [B, L] excludes padded key columns;
    mask_padding=True also excludes padded query rows and padded tokens' hidden states (which
    TinyBERT keeps; cached teacher outputs need it).  A term whose inputs are not given is skipped: general
    distillation and task step 1 pass scores and states; task step 2 passes logits.  Shapes are
    those of the three functions; pass stacked tensors ([n_layers, B, H, L, L] scores,
    [n_states, B, L, d] states) to get one kernel per term.

    Kernel launches on the fused path, forward: per term one fused kernel + one partial-sum
    reduction (hidden adds one column-sum reduction when training), then at most five scalar
    operations for the weighted sum; backward: one kernel for each of attention and prediction,
    and two to four cuBLAS products + scalar scalings for hidden.  No host synchronisation.
    """
    if mask_padding and attention_mask is None:
        raise ValueError("mask_padding=True needs attention_mask [B, L]")
    terms: dict[str, Tensor | None] = {"attention": None, "hidden": None, "prediction": None}
    if _pair("student_attention", student_attention, "teacher_attention", teacher_attention):
        terms["attention"] = attention_mse(student_attention, teacher_attention, attention_mask,
                                           mask_queries=mask_padding)
    if _pair("student_hidden", student_hidden, "teacher_hidden", teacher_hidden):
        if weight is None:
            raise ValueError("weight [d_t, d_s] is required with student_hidden/teacher_hidden")
        terms["hidden"] = hidden_mse(student_hidden, teacher_hidden, weight, bias,
                                     token_mask=attention_mask if mask_padding else None)
    if _pair("student_logits", student_logits, "teacher_logits", teacher_logits):
        terms["prediction"] = soft_cross_entropy(student_logits, teacher_logits, temperature)
    weights = {"attention": attention_weight, "hidden": hidden_weight,
               "prediction": prediction_weight}
    total = None
    for name, value in terms.items():
        if value is not None:
            weighted = value if weights[name] == 1.0 else value * weights[name]
            total = weighted if total is None else total + weighted
    if total is None:
        raise ValueError("distillation_loss got no inputs: pass attention scores, hidden states "
                         "and/or logits (student and teacher)")
    return DistillLoss(total, **terms)


class AttentionMSELoss(nn.Module):
    """Module form of tinybert_fast.attention_mse (no parameters)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, student, teacher, attention_mask: Tensor | None = None) -> Tensor:
        return attention_mse(student, teacher, attention_mask, self.reduction)


class HiddenMSELoss(nn.Module):
    """Module form of tinybert_fast.hidden_mse; owns the shared projection d_s -> d_t.

    weight [d_t, d_s] and bias [d_t] are initialised as nn.Linear's.
    """

    def __init__(self, student_dim: int, teacher_dim: int, bias: bool = True,
                 reduction: str = "mean", device=None, dtype=None):
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim, bias=bias, device=device, dtype=dtype)
        self.reduction = reduction

    def forward(self, student, teacher) -> Tensor:
        return hidden_mse(student, teacher, self.proj.weight, self.proj.bias, self.reduction)


class SoftCrossEntropyLoss(nn.Module):
    """Module form of tinybert_fast.soft_cross_entropy (no parameters)."""

    def __init__(self, temperature: float = 1.0, reduction: str = "mean"):
        super().__init__()
        self.temperature = temperature
        self.reduction = reduction

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return soft_cross_entropy(student_logits, teacher_logits, self.temperature,
                                  self.reduction)


class TinyBertLoss(nn.Module):
    """A stage's objective (tinybert_fast.distillation_loss) with the hidden projection owned.

    TinyBertLoss(312, 768) for TinyBERT4 <- BERT-base.  forward(...) takes the keyword arguments
    of distillation_loss except weight/bias and returns a DistillLoss.
    """

    def __init__(self, student_dim: int, teacher_dim: int, temperature: float = 1.0,
                 attention_weight: float = 1.0, hidden_weight: float = 1.0,
                 prediction_weight: float = 1.0, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim, device=device, dtype=dtype)
        self.temperature = temperature
        self.weights = dict(attention_weight=attention_weight, hidden_weight=hidden_weight,
                            prediction_weight=prediction_weight)

    def forward(self, **inputs) -> DistillLoss:
        return distillation_loss(weight=self.proj.weight, bias=self.proj.bias,
                                 temperature=inputs.pop("temperature", self.temperature),
                                 **self.weights, **inputs)
