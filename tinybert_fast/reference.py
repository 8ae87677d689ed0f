"""Eager PyTorch implementations with TinyBERT's exact loss semantics.

These are the baseline that tests and benchmarks compare the fused ops with, and what the public
functions run under backend "torch" (or "auto" on CPU tensors).  They are written the way a
TinyBERT trainer writes them (one layer at a time, autograd for the gradients) and compute in the
inputs' dtype, as that trainer does; upcast the inputs for a high-precision reference.

Inputs take the same forms as the public functions (tinybert_fast.ops); the semantics are
TinyBERT's (README, "Loss semantics"), their constants in tinybert_fast._semantics.  This module
imports no op and no kernel: the ops import it (for the torch backend, the attention-score formula
and the checks of inputs from Q and K), never the other way round.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from . import _checks
from ._semantics import MASK_BIAS, MASK_THRESHOLD

_QK_NAMES = ("q_s", "k_s", "q_t", "k_t")


def attention_scores(query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None = None,
                     *, scaling: float | None = None) -> torch.Tensor:
    """Pre-softmax attention scores S = Q K^T / sqrt(d) + bias: [..., L, d] x2 -> [..., L, L].

    The one statement of the formula (the reference, the ops' CPU kernels and
    tinybert_fast.capture use it).  scaling: the factor in place of 1 / sqrt(d), multiplied (a
    model's own, e.g. Hugging Face's `scaling`); None divides by sqrt(d), as TinyBERT's trainer
    does (the two differ in the last bit).  bias: broadcast over [..., L, L] and added as is
    (torch's type promotion), e.g. key_mask_bias(m) or Hugging Face's additive mask; None adds
    nothing.  Computes in the inputs' dtype (query and key must share it).
    """
    scores = torch.matmul(query, key.transpose(-1, -2))
    scores = scores / math.sqrt(query.shape[-1]) if scaling is None else scores * scaling
    return scores if bias is None else scores + bias


def key_mask_bias(attention_mask: torch.Tensor) -> torch.Tensor:
    """The additive bias of padded keys: [B, L] mask (1 = token) -> [B, 1, 1, L] fp32, 0 on
    tokens and MASK_BIAS (-10000) on padding, broadcast over heads and query rows."""
    return torch.where((attention_mask != 0)[:, None, None, :], 0.0, MASK_BIAS)


def qk_layers(name: str, x) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A list of [B, H, L, d] layers (views) and x as [n, B, H, L, d] when x was one tensor."""
    return _checks.layers_4d(name, x, "[B, H, L, d_head]")


def qk_inputs(q_s, k_s, q_t, k_t, attention_mask: torch.Tensor | None, fused: bool,
              max_head_dim: int | None = None):
    """Check the inputs of the losses from Q and K, attention_mse_qk and attention_kl_qk (shapes,
    dtypes, devices; never values), for this module and the fused ops alike.

    fused: the dtypes the fused path takes (_checks.check_float); max_head_dim: the widest head
    dim the caller's kernels take (None: any).  Returns (layers, groups, (B, H, L, d_s, d_t)):
    layers = four lists of [B, H, L, d] views (q_s, k_s, q_t, k_t); groups = four lists of
    [n, B, H, L, d] views, one stacked tensor each when all four came stacked, else one per layer.
    """
    named = [(name, *qk_layers(name, x)) for name, x in zip(_QK_NAMES, (q_s, k_s, q_t, k_t))]
    n = len(named[0][1])
    for name, layers, _ in named[1:]:
        if len(layers) != n:
            raise ValueError(f"{name} has {len(layers)} layers but q_s has {n}; pass one tensor "
                             f"per mapped layer for each of q_s, k_s, q_t, k_t")
    B, H, L, d_s = named[0][1][0].shape
    d_t = named[2][1][0].shape[-1]
    for name, layers, _ in named:
        who, d = ("student", d_s) if name.endswith("_s") else ("teacher", d_t)
        for i, t in enumerate(layers):
            label = f"{name}[{i}]" if n > 1 else name
            _checks.check_float(label, t, fused)
            if tuple(t.shape) != (B, H, L, d):
                raise ValueError(
                    f"{label} has shape {tuple(t.shape)}; expected [B, H, L, d] = "
                    f"{[B, H, L, d]} (B, H, L from q_s layer 0, the {who}'s head dim from "
                    f"{'q_s' if who == 'student' else 'q_t'}): student and teacher pair heads one "
                    f"to one over the same tokens, and a model's Q and K share its head dim")
    if B * H * L * d_s * d_t == 0:
        raise ValueError(f"q_s / q_t are empty: shapes {tuple(named[0][1][0].shape)} and "
                         f"{tuple(named[2][1][0].shape)}")
    if max_head_dim is not None and max(d_s, d_t) > max_head_dim:
        raise ValueError(f"head dims d_s = {d_s}, d_t = {d_t}: the fused kernels take head dims up "
                         f"to {max_head_dim} (use backend 'torch' for wider heads)")
    if attention_mask is not None:
        _checks.check_mask(attention_mask, B, L)
    _checks.check_same_device(**{(f"{name}[{i}]" if i else name): t
                                 for name, layers, _ in named for i, t in enumerate(layers)},
                              attention_mask=attention_mask)
    if all(stacked is not None for _, _, stacked in named):
        groups = [[stacked] for _, _, stacked in named]
    else:
        groups = [[x.unsqueeze(0) for x in layers] for _, layers, _ in named]
    return [layers for _, layers, _ in named], groups, (B, H, L, d_s, d_t)


def attention_mse(student, teacher, attention_mask: torch.Tensor | None = None,
                  reduction: str = "mean", *, mask_queries: bool = False) -> torch.Tensor:
    """sum over layers of mean_{b,h,i,j} (s' - t')^2 with x' = 0 where x <= -100.

    student, teacher: [B, H, L, L], [n_layers, B, H, L, L] or a list of [B, H, L, L].
    attention_mask: optional [B, L] (1 = token); padded key columns then contribute 0 but still
    count in the B*H*L*L denominator; mask_queries excludes padded query rows too.
    reduction: "mean" (per layer, summed) or "sum".
    """
    _checks.check_reduction(reduction, "attention")
    s_layers, _ = _checks.attention_layers("student", student)
    t_layers, _ = _checks.attention_layers("teacher", teacher)
    _checks.check_attention(s_layers, t_layers, attention_mask, fused=False)
    if mask_queries and attention_mask is None:
        raise ValueError("mask_queries=True needs attention_mask [B, L]")
    keep = None
    if attention_mask is not None:
        keep = (attention_mask != 0)[:, None, None, :]
        if mask_queries:
            keep = keep & (attention_mask != 0)[:, None, :, None]
    total = None
    for s, t in zip(s_layers, t_layers):
        # one where per side, with a scalar zero: no [B, H, L, L] zeros tensor and no second
        # masked copy (this is the CPU path of the loop's attention term)
        drop_s, drop_t = s <= MASK_THRESHOLD, t <= MASK_THRESHOLD
        if keep is not None:
            drop_s, drop_t = drop_s | ~keep, drop_t | ~keep
        s = torch.where(drop_s, 0.0, s)
        t = torch.where(drop_t, 0.0, t)
        layer = F.mse_loss(s, t.to(s.dtype), reduction=reduction).float()
        total = layer if total is None else total + layer
    return total


def hidden_mse(student, teacher, weight: torch.Tensor, bias: torch.Tensor | None = None,
               reduction: str = "mean", *, token_mask: torch.Tensor | None = None
               ) -> torch.Tensor:
    """sum over states of mean((student @ weight.T + bias - teacher)^2).

    student [..., d_s] / teacher [..., d_t] per state (rank 4 = stacked states, or a list);
    weight [d_t, d_s]; bias [d_t] or None.  reduction: "mean" (per state, summed) or "sum".
    token_mask: optional [B, L] / [M], 0 = padded token, excluded (the denominator stays M*d_t).
    """
    _checks.check_reduction(reduction, "hidden")
    s_states, _ = _checks.hidden_states("student", student)
    t_states, _ = _checks.hidden_states("teacher", teacher)
    _checks.check_hidden(s_states, t_states, weight, bias, fused=False)
    keep = _checks.token_mask(token_mask, s_states[0])
    total = None
    for s, t in zip(s_states, t_states):
        p = F.linear(s, weight.to(s.dtype), None if bias is None else bias.to(s.dtype))
        if keep is not None:
            p = torch.where(keep[:, None] != 0, p, t.to(p.dtype))
        state = F.mse_loss(p, t.to(p.dtype), reduction=reduction).float()
        total = state if total is None else total + state
    return total


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """-softmax(z_t/T) * log_softmax(z_s/T), reduced over [..., C] logits.

    "mean": over all N*C entries (TinyBERT's soft_cross_entropy); "batchmean": summed over C,
    averaged over the N rows; "sum": over everything.  No T^2 factor.
    """
    _checks.check_reduction(reduction, "soft_ce")
    temperature = _checks.check_temperature(temperature)
    z_s, z_t = _checks.logits_2d(student_logits, teacher_logits, fused=False)
    terms = -F.softmax(z_t / temperature, dim=-1) * F.log_softmax(z_s / temperature, dim=-1)
    if reduction == "mean":
        return terms.mean().float()
    if reduction == "batchmean":
        return terms.sum().float() / z_s.shape[0]
    return terms.sum().float()


def attention_mse_qk(q_s, k_s, q_t, k_t, attention_mask: torch.Tensor | None = None,
                     reduction: str = "mean") -> torch.Tensor:
    """The score path of tinybert_fast.attention_mse_qk: form each model's scores, then
    attention_mse.

    S_s = Q_s K_s^T / sqrt(d_s) + bias and S_t = Q_t K_t^T / sqrt(d_t) + bias, bias = -10000 on
    padded keys of attention_mask [B, L] (1 = token) (key_mask_bias), then
    attention_mse(S_s, S_t, attention_mask,
    reduction).  q_s, k_s: [B, H, L, d_s], [n_layers, B, H, L, d_s] or a list of [B, H, L, d_s];
    q_t, k_t: the same with d_t.  Materialises two [B, H, L, L] tensors per layer.
    """
    _checks.check_reduction(reduction, "attention")
    (qs, ks, qt, kt), _, _ = qk_inputs(q_s, k_s, q_t, k_t, attention_mask, fused=False)
    bias = None if attention_mask is None else key_mask_bias(attention_mask)

    def scores(q, k):
        # the bias in the scores' dtype (q's: matmul keeps it), as BERT adds its mask
        return attention_scores(q, k, None if bias is None else bias.to(q.dtype))

    return attention_mse([scores(q, k) for q, k in zip(qs, ks)],
                         [scores(q, k) for q, k in zip(qt, kt)], attention_mask, reduction)


def attention_kl_qk(q_s, k_s, q_t, k_t, attention_mask: torch.Tensor | None = None,
                    reduction: str = "mean") -> torch.Tensor:
    """The eager form of tinybert_fast.attention_kl_qk (MiniLM's attention-distribution KL): form
    each model's scores, log_softmax over the tokens, KL(P_t || P_s) per query row.

    S_x = Q_x K_x^T / sqrt(d_x); padded keys of attention_mask [B, L] (1 = token) are -inf before
    the softmax (probability exactly 0); KL_i = sum_j P_t (log P_t - log P_s); padded query rows
    are excluded.  "mean": per layer sum_{b,h,i valid} KL_i / (H * T), T = tokens of the batch
    (B*L without a mask; a batch without tokens gives 0), summed over layers; "sum": no division.
    q_s, k_s: [B, H, L, d_s], [n_layers, B, H, L, d_s] or a list of [B, H, L, d_s]; q_t, k_t: the
    same with d_t.  Materialises four [B, H, L, L] tensors per layer; computes in the inputs'
    dtype (promoted to a common one where they differ).
    """
    _checks.check_reduction(reduction, "attention")
    (qs, ks, qt, kt), _, (B, H, L, _, _) = qk_inputs(q_s, k_s, q_t, k_t, attention_mask,
                                                      fused=False)
    keys = tokens = None
    if attention_mask is not None:
        tokens = attention_mask != 0
        # a sequence without tokens keeps all its keys, so that no softmax row is empty (NaN):
        # its query rows are all excluded below
        keys = (tokens | ~tokens.any(-1, keepdim=True))[:, None, None, :]
    denom = B * H * L if tokens is None else H * tokens.sum().clamp_min(1)

    def log_probs(q, k):
        dtype = torch.promote_types(q.dtype, k.dtype)
        s = attention_scores(q.to(dtype), k.to(dtype))
        return F.log_softmax(s if keys is None else s.masked_fill(~keys, -math.inf), dim=-1)

    total = None
    for q_s_, k_s_, q_t_, k_t_ in zip(qs, ks, qt, kt):
        lp_s, lp_t = log_probs(q_s_, k_s_), log_probs(q_t_, k_t_)
        dtype = torch.promote_types(lp_s.dtype, lp_t.dtype)
        lp_s, lp_t = lp_s.to(dtype), lp_t.to(dtype)
        if keys is not None:
            # -inf -> 0 on padded keys, where P_t = 0: no NaN in 0 * (-inf + inf), nor in its
            # gradient; the KL term there is exp(0) * (0 - 0) = 0
            lp_s = torch.where(keys, lp_s, 0.0)
            lp_t = torch.where(keys, lp_t, 0.0)
        kl = F.kl_div(lp_s, lp_t, reduction="none", log_target=True).sum(-1)  # [B, H, L]
        if tokens is not None:
            kl = torch.where(tokens[:, None, :], kl, 0.0)
        layer = kl.sum() if reduction == "sum" else kl.sum() / denom
        layer = layer.float()
        total = layer if total is None else total + layer
    return total


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float = 1.0, reduction: str = "batchmean") -> torch.Tensor:
    """Knowledge-distillation KL (Hinton et al.; DistilBERT): T^2 * KL(p_t || p_s) per row of
    [..., C] logits, p = softmax(z / T), reduced.

    per row: kl = sum_c p_t,c * (log p_t,c - log p_s,c)
    "batchmean": T^2 * sum_rows kl / N;  "mean": T^2 * sum_rows kl / (N*C);  "sum": T^2 * sum_rows kl
    Classes where the teacher's logit is -inf (p_t = 0) contribute 0.  Computes in the inputs'
    dtype (promoted to a common one where they differ); returns an fp32 scalar.
    """
    _checks.check_reduction(reduction, "soft_ce")
    temperature = _checks.check_temperature(temperature)
    z_s, z_t = _checks.logits_2d(student_logits, teacher_logits, fused=False)
    dtype = torch.promote_types(z_s.dtype, z_t.dtype)
    lp_s = F.log_softmax(z_s.to(dtype) / temperature, dim=-1)
    lp_t = F.log_softmax(z_t.to(dtype) / temperature, dim=-1)
    # p_t = 0 (teacher logit -inf): both log-probabilities -> 0 before the product, so that
    # neither 0 * (-inf) in the forward nor its gradient is NaN; the term there is 0
    has_mass = lp_t > -math.inf
    lp_t = torch.where(has_mass, lp_t, 0.0)
    lp_s = torch.where(has_mass, lp_s, 0.0)
    terms = torch.where(has_mass, lp_t.exp() * (lp_t - lp_s), 0.0)
    total = terms.sum() * (temperature * temperature)
    if reduction == "mean":
        total = total / terms.numel()
    elif reduction == "batchmean":
        total = total / z_s.shape[0]
    return total.float()
def attention_kl(q_s, k_s, q_t, k_t, attention_mask: torch.Tensor | None = None,
                 reduction: str = "mean") -> torch.Tensor:
    """Deprecated name of attention_kl_qk (warns FutureWarning; in the next release it takes
    score maps, as attention_kl_scores does now)."""
    warnings.warn("tinybert_fast.reference.attention_kl(q_s, k_s, q_t, k_t, ...) is deprecated: "
                  "call reference.attention_kl_qk (the same loss); in the next release "
                  "attention_kl takes score maps, as attention_kl_scores does now", FutureWarning,
                  stacklevel=2)
    return attention_kl_qk(q_s, k_s, q_t, k_t, attention_mask, reduction)


def attention_kl_scores(student, teacher, attention_mask: torch.Tensor | None = None,
                        reduction: str = "mean") -> torch.Tensor:
    """The eager form of tinybert_fast.attention_kl_scores: MiniLM's attention-distribution KL
    from captured pre-softmax scores, log_softmax over the tokens, KL(P_t || P_s) per query row.

    student, teacher: scores S = Q K^T / sqrt(d) + mask_bias, [B, H, L, L], [n_layers, B, H, L, L]
    or a list of [B, H, L, L].  Keys j with attention_mask[b, j] == 0 are -inf before the softmax
    (probability exactly 0, whatever the scores hold there), padded query rows are excluded.
    "mean": per layer sum_{b,h,i valid} KL_i / (H * T), T = tokens of the batch (B*L without a
    mask; a batch without tokens gives 0), summed over layers; "sum": no division.  Without a
    mask every row and key counts.  Materialises four [B, H, L, L] tensors per layer; computes
    in the inputs' dtype (promoted to a common one where they differ).
    """
    _checks.check_reduction(reduction, "attention")
    s_layers, _ = _checks.attention_layers("student", student)
    t_layers, _ = _checks.attention_layers("teacher", teacher)
    _checks.check_attention(s_layers, t_layers, attention_mask, fused=False)
    B, H, L, _ = s_layers[0].shape
    keys = tokens = None
    if attention_mask is not None:
        tokens = attention_mask != 0
        # a sequence without tokens keeps all its keys, so that no softmax row is empty (NaN):
        # its query rows are all excluded below
        keys = (tokens | ~tokens.any(-1, keepdim=True))[:, None, None, :]
    denom = B * H * L if tokens is None else H * tokens.sum().clamp_min(1)
    total = None
    for s, t in zip(s_layers, t_layers):
        dtype = torch.promote_types(s.dtype, t.dtype)
        s, t = s.to(dtype), t.to(dtype)
        if keys is not None:
            s, t = s.masked_fill(~keys, -math.inf), t.masked_fill(~keys, -math.inf)
        lp_s, lp_t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
        if keys is not None:
            # -inf -> 0 on padded keys, where P_t = 0: no NaN in 0 * (-inf + inf), nor in its
            # gradient; the KL term there is exp(0) * (0 - 0) = 0
            lp_s = torch.where(keys, lp_s, 0.0)
            lp_t = torch.where(keys, lp_t, 0.0)
        kl = F.kl_div(lp_s, lp_t, reduction="none", log_target=True).sum(-1)  # [B, H, L]
        if tokens is not None:
            kl = torch.where(tokens[:, None, :], kl, 0.0)
        layer = kl.sum() if reduction == "sum" else kl.sum() / denom
        layer = layer.float()
        total = layer if total is None else total + layer
    return total


# Norm floor of tbf.hidden_cosine, as torch.nn.functional.cosine_similarity's default eps.
HIDDEN_COSINE_EPS = 1e-8


def hidden_cosine(student, teacher, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  reduction: str = "mean", *, token_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Projected hidden-state cosine loss: sum over states of the per-token 1 - cos(p, y).

    p = student @ weight.T + bias ([M, d_t] per state), y = teacher ([M, d_t]);
    cos = <p, y> / (max(|p|, eps) * max(|y|, eps)), eps = HIDDEN_COSINE_EPS (1e-8).
    student [..., d_s] / teacher [..., d_t] per state (rank 4 = stacked states, or a list);
    weight [d_t, d_s]; bias [d_t] or None.  reduction "mean": per state the mean over its tokens
    (over the unmasked tokens when token_mask [B, L] / [M], 0 = padding, is given; 0 when none
    is), summed over states; "sum": summed over tokens and states.
    """
    _checks.check_reduction(reduction, "hidden")
    s_states, _ = _checks.hidden_states("student", student)
    t_states, _ = _checks.hidden_states("teacher", teacher)
    _checks.check_hidden(s_states, t_states, weight, bias, fused=False)
    keep = _checks.token_mask(token_mask, s_states[0])
    if keep is not None:
        keep = keep != 0
    total = None
    for s, t in zip(s_states, t_states):
        p = F.linear(s, weight.to(s.dtype), None if bias is None else bias.to(s.dtype))
        y = t.to(p.dtype)
        # clamp_min: below eps the norm is the constant eps (no gradient through it)
        denom = (torch.linalg.vector_norm(p, dim=-1).clamp_min(HIDDEN_COSINE_EPS)
                 * torch.linalg.vector_norm(y, dim=-1).clamp_min(HIDDEN_COSINE_EPS))
        per_token = 1.0 - (p * y).sum(-1) / denom
        if keep is not None:
            per_token = torch.where(keep, per_token, 0.0)
        if reduction == "sum":
            state = per_token.sum()
        elif keep is None:
            state = per_token.mean()
        else:
            state = per_token.sum() / keep.sum().clamp_min(1)
        state = state.float()
        total = state if total is None else total + state
    return total
