"""MiniLM's attention-distribution KL from Q and K, without the attention maps: public function ->
registered ops `tinybert_fast::attention_kl_qk(_backward)` -> kernels
`tinybert_fast.kernels.attention_kl_qk`.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _checks, reference
from ..kernels import attention_kl_qk as kernels
from ._qk import empty_grads, first_layer, qk_inputs, register_qk_autograd
from ._reduction import row_kl_scale


def attention_kl_qk(q_s, k_s, q_t, k_t, attention_mask: Tensor | None = None,
                    reduction: str = "mean") -> Tensor:
    """MiniLM's attention-distribution loss from the queries and keys, summed over layers (fp32
    scalar): KL(P_t || P_s) per query row, flash-attention style, O(L) memory.

    Args:
        q_s, k_s: student queries and keys, unscaled as Hugging Face attention receives them: one
            layer [B, H, L, d_s], stacked layers [n_layers, B, H, L, d_s], or a list/tuple of
            [B, H, L, d_s] (one per mapped layer).
        q_t, k_t: the teacher's, the same with d_t (d_s != d_t is fine, e.g. 26 vs 64; B, H and
            L must match: heads are paired one to one).  float16 / bfloat16 / float32, any
            strides, dtypes may differ between tensors; d_s, d_t <= 128 on the fused path.
        attention_mask: optional [B, L], 1 (or True) = token, 0 = padding.  Padded keys get
            probability 0 in both distributions; padded query rows are excluded (they add nothing
            and get zero gradient).  A sequence without any token contributes 0.
        reduction: "mean" (MiniLM) or "sum".

    With S_x = Q_x K_x^T / sqrt(d_x) (each model's own d_x), the key mask m[b, j] and, per
    (layer, b, h) and query row i,
        P_x,ij = m[b,j] exp(S_x,ij) / sum_k m[b,k] exp(S_x,ik)             (x = s, t)
        KL_i   = sum_j P_t,ij (log P_t,ij - log P_s,ij)
    the loss is
        "mean": sum_layers 1 / (H * T) * sum_{b,h} sum_{i: m[b,i]=1} KL_i
        "sum":  sum_layers sum_{b,h} sum_{i: m[b,i]=1} KL_i
    with T = sum_{b,i} m[b,i] the tokens of the batch (B*L without a mask; T is counted on the
    device, and a batch without tokens gives 0).  This is MiniLM's self-attention distribution
    transfer (Wang et al., 2020, arXiv 2002.10957: per example the KL summed over heads and
    query positions, divided by heads * length): a named deviation from TinyBERT's attention MSE
    on the scores (tinybert_fast.attention_mse_qk).  Unlike that loss, padded query rows are
    excluded here on purpose, from the sum and from the count T.

    MiniLM's value-relation loss is the same op with V in place of both Q and K,
    `attention_kl_qk(v_s, v_s, v_t, v_t, attention_mask)`: softmax(V V^T / sqrt(d)) per head.

    Gradients flow to whichever of the four inputs require them (the teacher's too).  With c the
    reduction scale, g the incoming gradient (read on the device: no host synchronisation):
        dS_s = g c (P_s - P_t),    dS_t = g c P_t ((log P_t - log P_s) - KL_i)
        dQ_x = d_x^-1/2 dS_x K_x,  dK_x = d_x^-1/2 dS_x^T Q_x
    on the rows of valid queries (0 on padded ones).

    Fused path, stacked inputs: forward 1 launch (an online softmax over key tiles for both
    distributions; nothing of size L^2 is written) + a partial-sum reduction; backward 2 (dQ per
    query tile, dK per key tile, recomputing P from the saved log-sum-exps; 1 when only Q's or
    only K's gradients are needed); with a mask, "mean" adds a few scalar ops counting T on the
    device; lists of layers cost the kernels per layer.  Saved for backward: the inputs and 3
    fp32 per query row, lse_s, lse_t and KL_i ([3, n*B*H, L]).  Accuracy: fp32 accumulation; the
    per-row KL is a difference of O(|S|) terms, so its absolute error is
    ~eps_fp32 * max|S| (a student equal to its teacher gives exactly 0).
    """
    _checks.check_reduction(reduction, "attention")
    if not _backend.use_fused(first_layer(q_s)):
        return reference.attention_kl_qk(q_s, k_s, q_t, k_t, attention_mask, reduction)
    _, groups, _ = qk_inputs(q_s, k_s, q_t, k_t, attention_mask)
    loss, _ = torch.ops.tinybert_fast.attention_kl_qk(*groups, attention_mask, reduction)
    return loss


def attention_kl(q_s, k_s, q_t, k_t, attention_mask: Tensor | None = None,
                 reduction: str = "mean") -> Tensor:
    """Deprecated name of attention_kl_qk (the same loss from Q and K; warns FutureWarning).

    In the next release `attention_kl` takes pre-softmax score maps, as attention_kl_scores does
    now, so that the names follow one pattern: attention_mse / attention_mse_qk and
    attention_kl / attention_kl_qk (the `_qk` ops take queries and keys).  Call attention_kl_qk.
    """
    warnings.warn("tinybert_fast.attention_kl(q_s, k_s, q_t, k_t, ...) is deprecated: call "
                  "attention_kl_qk (the same loss); in the next release attention_kl takes score "
                  "maps, as attention_kl_scores does now", FutureWarning, stacklevel=2)
    return attention_kl_qk(q_s, k_s, q_t, k_t, attention_mask, reduction)


# --- registered ops ------------------------------------------------------------------------------
# Groups are [n, B, H, L, d] tensors (one stacked tensor, or one per layer).  Outputs: the loss and
# the per-row statistics [3, N, L] fp32 (lse_s, lse_t, KL_i for the N = sum(n)*B*H heads; 0 on
# padded query rows) that backward reuses.  The default kernel launches Triton; the CPU kernel
# computes the same in PyTorch unless backend "triton" runs the kernels in Triton's interpreter.

@torch.library.custom_op("tinybert_fast::attention_kl_qk", mutates_args=())
def _attention_kl_qk_op(q_s: list[Tensor], k_s: list[Tensor], q_t: list[Tensor], k_t: list[Tensor],
                     attention_mask: Optional[Tensor], reduction: str) -> tuple[Tensor, Tensor]:
    return _triton_forward(q_s, k_s, q_t, k_t, attention_mask, reduction)


@_attention_kl_qk_op.register_fake
def _(q_s, k_s, q_t, k_t, attention_mask, reduction):
    return (q_s[0].new_empty((), dtype=torch.float32),
            q_s[0].new_empty(kernels.stats_shape(q_s), dtype=torch.float32))


def _triton_forward(q_s, k_s, q_t, k_t, attention_mask, reduction):
    scale = row_kl_scale(attention_mask, q_s, reduction)
    kl_sum, stats = kernels.attention_kl_forward(q_s, k_s, q_t, k_t, attention_mask)
    return kl_sum * scale, stats


def _torch_groups(q_s, k_s, q_t, k_t, attention_mask):
    """Per group: (z_s, z_t) the fp32 scores [n*B*H, L, L] and `ok` [n*B*H, L, L], valid query row
    and key (None without a mask)."""
    a_s, a_t = q_s[0].shape[-1] ** -0.5, q_t[0].shape[-1] ** -0.5
    tok = None if attention_mask is None else attention_mask != 0
    for qs, ks, qt, kt in zip(q_s, k_s, q_t, k_t):
        n, B, H, L, _ = qs.shape
        z_s = reference.attention_scores(qs.float(), ks.float(), scaling=a_s).reshape(-1, L, L)
        z_t = reference.attention_scores(qt.float(), kt.float(), scaling=a_t).reshape(-1, L, L)
        ok = None
        if tok is not None:
            ok = (tok[:, None, :] & tok[:, :, None])[None, :, None].expand(n, B, H, L, L)
            ok = ok.reshape(-1, L, L)
        yield z_s, z_t, ok


@_attention_kl_qk_op.register_kernel("cpu")
def _(q_s, k_s, q_t, k_t, attention_mask, reduction):
    if _backend.cpu_kernel_runs_triton():
        return _triton_forward(q_s, k_s, q_t, k_t, attention_mask, reduction)
    scale = row_kl_scale(attention_mask, q_s, reduction)
    stats = []
    for z_s, z_t, ok in _torch_groups(q_s, k_s, q_t, k_t, attention_mask):
        if ok is None:
            lse_s, lse_t = torch.logsumexp(z_s, -1), torch.logsumexp(z_t, -1)
        else:
            # rows of a sequence without tokens are all -inf (lse -inf): excluded, set to 0
            rows = ok.any(-1)
            lse_s = torch.where(rows, torch.logsumexp(z_s.masked_fill(~ok, -torch.inf), -1), 0.0)
            lse_t = torch.where(rows, torch.logsumexp(z_t.masked_fill(~ok, -torch.inf), -1), 0.0)
        lp_s, lp_t = z_s - lse_s[..., None], z_t - lse_t[..., None]
        p_t = lp_t.exp() if ok is None else torch.where(ok, lp_t.exp(), 0.0)
        stats.append(torch.stack([lse_s, lse_t, (p_t * (lp_t - lp_s)).sum(-1)]))
    stats = torch.cat(stats, 1)
    return stats[2].sum() * scale, stats


@torch.library.custom_op("tinybert_fast::attention_kl_qk_backward", mutates_args=())
def _attention_kl_qk_backward_op(
        grad: Tensor, stats: Tensor, q_s: list[Tensor], k_s: list[Tensor], q_t: list[Tensor],
        k_t: list[Tensor], attention_mask: Optional[Tensor], reduction: str,
        need_q_s: bool, need_k_s: bool, need_q_t: bool, need_k_t: bool
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    return _triton_backward(grad, stats, q_s, k_s, q_t, k_t, attention_mask, reduction,
                            (need_q_s, need_k_s, need_q_t, need_k_t))


def _coef(grad: Tensor, attention_mask, q_s, reduction) -> Tensor:
    """g * c as a 0-dim fp32 tensor on the device (no host synchronisation)."""
    return (grad.to(torch.float32) * row_kl_scale(attention_mask, q_s, reduction)).reshape(())


def _triton_backward(grad, stats, q_s, k_s, q_t, k_t, attention_mask, reduction, need):
    coef = _coef(grad, attention_mask, q_s, reduction).contiguous()
    return tuple(kernels.attention_kl_backward(coef, stats, q_s, k_s, q_t, k_t, attention_mask,
                                               need))


@_attention_kl_qk_backward_op.register_fake
def _(grad, stats, q_s, k_s, q_t, k_t, attention_mask, reduction, need_q_s, need_k_s, need_q_t,
      need_k_t):
    return empty_grads((q_s, k_s, q_t, k_t), (need_q_s, need_k_s, need_q_t, need_k_t))


@_attention_kl_qk_backward_op.register_kernel("cpu")
def _(grad, stats, q_s, k_s, q_t, k_t, attention_mask, reduction, need_q_s, need_k_s, need_q_t,
      need_k_t):
    need = (need_q_s, need_k_s, need_q_t, need_k_t)
    if _backend.cpu_kernel_runs_triton():
        return _triton_backward(grad, stats, q_s, k_s, q_t, k_t, attention_mask, reduction, need)
    coef = _coef(grad, attention_mask, q_s, reduction)
    a = (q_s[0].shape[-1] ** -0.5, q_t[0].shape[-1] ** -0.5)
    out = ([], [], [], [])
    start = 0
    for group, (z_s, z_t, ok) in zip(zip(q_s, k_s, q_t, k_t),
                                     _torch_groups(q_s, k_s, q_t, k_t, attention_mask)):
        lse_s, lse_t, kl = stats[:, start:start + z_s.shape[0], :, None]
        start += z_s.shape[0]
        lp_s, lp_t = z_s - lse_s, z_t - lse_t
        p_s, p_t = lp_s.exp(), lp_t.exp()
        if ok is not None:
            p_s, p_t = torch.where(ok, p_s, 0.0), torch.where(ok, p_t, 0.0)
        ds = ((p_s - p_t) * coef, p_t * (lp_t - lp_s - kl) * coef)
        for slot, x in enumerate(group):
            if not need[slot]:
                continue
            who = slot // 2  # 0 student, 1 teacher
            other = group[slot ^ 1].float().reshape(ds[who].shape[0], -1, x.shape[-1])
            d = ds[who] if slot % 2 == 0 else ds[who].transpose(1, 2)  # dQ = dS K, dK = dS^T Q
            out[slot].append((d @ other * a[who]).reshape(x.shape).to(x.dtype))
    return out


register_qk_autograd(_attention_kl_qk_op, _attention_kl_qk_backward_op)
