"""nn.Module wrappers over the fused ops, and one call for a whole stage's objective."""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from .ops import (attention_kl_qk, attention_kl_scores, attention_mse, attention_mse_qk,
                  hidden_cosine, hidden_mse, kl_divergence, soft_cross_entropy)

ATTENTION_LOSSES = ("mse", "kl", "none")
HIDDEN_LOSSES = ("mse", "cosine", "none")
PREDICTION_LOSSES = ("soft_ce", "kl", "mse")


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


def _query_rows_zeroed(q: Tensor, attention_mask: Tensor) -> Tensor:
    """q [B, H, L, d] (or stacked [n, B, H, L, d]) with padded query rows set to 0: their rows of
    Q K^T are then 0 in both models, which excludes them from the loss from Q and K."""
    rows = (attention_mask != 0)[:, None, :, None].to(q.dtype)
    return q * rows


def distillation_terms(*, student_attention=None, teacher_attention=None, student_query=None,
                       student_key=None, teacher_query=None, teacher_key=None,
                       attention_mask: Tensor | None = None, student_embedding=None,
                       teacher_embedding=None, student_hidden=None, teacher_hidden=None,
                       weight: Tensor | None = None, bias: Tensor | None = None,
                       student_logits: Tensor | None = None, teacher_logits: Tensor | None = None,
                       labels: Tensor | None = None, temperature: float = 1.0,
                       regression: bool = False, attention_weight: float = 1.0,
                       embedding_weight: float = 1.0, hidden_weight: float = 1.0,
                       prediction_weight: float = 1.0, hard_label_weight: float = 1.0,
                       mask_padding: bool = False, attention_loss: str = "mse",
                       hidden_loss: str = "mse", prediction_loss: str = "soft_ce"
                       ) -> dict[str, Tensor]:
    """Every term of a TinyBERT stage's objective, and their weighted sum (the training loop's
    objective; distillation_loss is its four-term form):

        total = attention_weight  * attention    attention_mse(S_s, S_t, attention_mask), or
                                                 attention_mse_qk(Q_s, K_s, Q_t, K_t, ...)
              + embedding_weight  * embedding    hidden_mse(E_s, E_t, weight, bias)
              + hidden_weight     * hidden       hidden_mse(H_s, H_t, weight, bias)
              + prediction_weight * prediction   soft_cross_entropy(z_s, z_t, temperature);
                                                 regression: mean((z_s - z_t)^2)
              + hard_label_weight * hard         cross_entropy(z_s, labels);
                                                 regression: mean((z_s[:, 0] - labels)^2)

    The loss of each term can be another than TinyBERT's (the study's variants):
        attention_loss "kl": MiniLM's KL(softmax(S_t) || softmax(S_s)) per query row over the
            unpadded keys, padded rows excluded (attention_kl_scores; from Q and K,
            attention_kl_qk); "none": no attention term.
        hidden_loss "cosine": 1 - cos(X W^T + b, Y) per token (hidden_cosine), for the
            embedding and hidden terms; "none": neither term.
        prediction_loss "kl": T^2 KL(p_t || p_s) / N (kl_divergence); "mse": mean((z_s -
            z_t)^2) on the logits (what a regression task always uses).

    A term is computed when its inputs are given (student and teacher; labels for "hard") and
    returned under its name with "total" last; a term with weight 0 is still computed and
    reported (it adds 0 to the total).  Attention comes from scores or from Q and K, not both.
    Shapes are those of the loss functions: pass stacked scores [n_layers, B, H, L, L] and states
    [n_states, B, L, d] to get one kernel launch per term (lists launch once per layer).
    attention_mask [B, L] (1 = token) masks padded keys; mask_padding=True also excludes padded
    query rows (for Q/K by zeroing those rows of Q) and padded tokens' states (needed with cached
    teacher outputs, which store no padding).  Logits are [B, C] (regression: [B, 1], labels [B]).
    """
    if mask_padding and attention_mask is None:
        raise ValueError("mask_padding=True needs attention_mask [B, L]")
    for name, value, choices in (("attention_loss", attention_loss, ATTENTION_LOSSES),
                                 ("hidden_loss", hidden_loss, HIDDEN_LOSSES),
                                 ("prediction_loss", prediction_loss, PREDICTION_LOSSES)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    terms: dict[str, Tensor] = {}
    by_scores = _pair("student_attention", student_attention, "teacher_attention",
                      teacher_attention)
    qk = {"student_query": student_query, "student_key": student_key,
          "teacher_query": teacher_query, "teacher_key": teacher_key}
    given = [name for name, value in qk.items() if value is not None]
    if given and len(given) != 4:
        missing = [name for name in qk if name not in given]
        raise ValueError(f"{', '.join(given)} given without {', '.join(missing)}: the loss from "
                         f"Q and K needs all four")
    if by_scores and given:
        raise ValueError("pass the attention as scores (student_attention/teacher_attention) or "
                         "as Q and K (student_query/...), not both")
    if attention_loss == "none":
        pass
    elif by_scores and attention_loss == "kl":
        terms["attention"] = attention_kl_scores(student_attention, teacher_attention,
                                                 attention_mask)
    elif by_scores:
        terms["attention"] = attention_mse(student_attention, teacher_attention, attention_mask,
                                           mask_queries=mask_padding)
    elif given and attention_loss == "kl":
        terms["attention"] = attention_kl_qk(student_query, student_key, teacher_query,
                                          teacher_key, attention_mask)
    elif given:
        q_s, q_t = student_query, teacher_query
        if mask_padding:
            q_s = [_query_rows_zeroed(q, attention_mask) for q in q_s] \
                if isinstance(q_s, (list, tuple)) else _query_rows_zeroed(q_s, attention_mask)
            q_t = [_query_rows_zeroed(q, attention_mask) for q in q_t] \
                if isinstance(q_t, (list, tuple)) else _query_rows_zeroed(q_t, attention_mask)
        terms["attention"] = attention_mse_qk(q_s, student_key, q_t, teacher_key, attention_mask)
    token_mask = attention_mask if mask_padding else None
    for name, s, t in (("embedding", student_embedding, teacher_embedding),
                       ("hidden", student_hidden, teacher_hidden)):
        if _pair(f"student_{name}", s, f"teacher_{name}", t) and hidden_loss != "none":
            if weight is None:
                raise ValueError(f"weight [d_t, d_s] is required with student_{name}/"
                                 f"teacher_{name}")
            state_loss = hidden_cosine if hidden_loss == "cosine" else hidden_mse
            terms[name] = state_loss(s, t, weight, bias, token_mask=token_mask)
    if teacher_logits is not None and student_logits is None:
        raise ValueError("teacher_logits was given without student_logits; pass both or neither")
    if student_logits is not None and teacher_logits is None and labels is None:
        raise ValueError("student_logits was given without teacher_logits (or labels); pass "
                         "teacher_logits for the prediction loss and/or labels for the "
                         "hard-label loss")
    if teacher_logits is not None:
        if regression or prediction_loss == "mse":
            terms["prediction"] = F.mse_loss(student_logits.float(), teacher_logits.float())
        elif prediction_loss == "kl":
            terms["prediction"] = kl_divergence(student_logits, teacher_logits, temperature)
        else:
            terms["prediction"] = soft_cross_entropy(student_logits, teacher_logits, temperature)
    if labels is not None:
        if student_logits is None:
            raise ValueError("labels were given without student_logits")
        terms["hard"] = (F.mse_loss(student_logits.float()[:, 0], labels.float()) if regression
                         else F.cross_entropy(student_logits.float(), labels))
    weights = {"attention": attention_weight, "embedding": embedding_weight,
               "hidden": hidden_weight, "prediction": prediction_weight,
               "hard": hard_label_weight}
    total = None
    for name, value in terms.items():
        weighted = value if weights[name] == 1.0 else value * weights[name]
        total = weighted if total is None else total + weighted
    if total is None:
        raise ValueError("distillation_loss got no inputs: pass attention scores, hidden states "
                         "and/or logits (student and teacher)")
    terms["total"] = total
    return terms


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
    [n_states, B, L, d] states) to get one kernel per term.  The terms are computed by
    distillation_terms, which adds the embedding term apart from the states, attention from Q and
    K, hard labels and regression (the training loop's objective).

    Kernel launches on the fused path, forward: per term one fused kernel + one partial-sum
    reduction (hidden adds one column-sum reduction when training), then at most five scalar
    operations for the weighted sum; backward: one kernel for each of attention and prediction,
    and two to four cuBLAS products + scalar scalings for hidden.  No host synchronisation.
    """
    if student_logits is not None and teacher_logits is None:
        raise ValueError("student_logits was given without teacher_logits; pass both or neither")
    terms = distillation_terms(
        student_attention=student_attention, teacher_attention=teacher_attention,
        attention_mask=attention_mask, student_hidden=student_hidden,
        teacher_hidden=teacher_hidden, weight=weight, bias=bias, student_logits=student_logits,
        teacher_logits=teacher_logits, temperature=temperature,
        attention_weight=attention_weight, hidden_weight=hidden_weight,
        prediction_weight=prediction_weight, mask_padding=mask_padding)
    return DistillLoss(terms["total"], terms.get("attention"), terms.get("hidden"),
                       terms.get("prediction"))


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
