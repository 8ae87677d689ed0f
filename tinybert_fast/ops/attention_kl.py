"""MiniLM's attention-distribution KL from captured score maps: public function -> registered ops
`tinybert_fast::attention_kl_scores(_backward)` -> kernels
`tinybert_fast.kernels.attention_kl`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _checks, reference
from ..kernels import attention_kl as kernels
from ..kernels._utils import split_grad_scale
from ._autograd import check_computed, needs_grad, register_autograd, scaled_gradients
from ._reduction import row_kl_scale


def attention_kl_scores(student, teacher, attention_mask: Tensor | None = None,
                        reduction: str = "mean") -> Tensor:
    """MiniLM's attention-distribution loss from pre-softmax score maps, summed over mapped layers
    (fp32 scalar): KL(P_t || P_s) per query row, one pass over the maps.

    Args:
        student, teacher: pre-softmax attention scores S = QK^T/sqrt(d_head) + mask_bias (the
            inputs of tbf.attention_mse, e.g. from tinybert_fast.capture or the teacher cache),
            as one layer [B, H, L, L], stacked layers [n_layers, B, H, L, L], or a list/tuple of
            [B, H, L, L] (one per mapped layer).  float16 / bfloat16 / float32, any strides;
            student and teacher dtypes may differ.
        attention_mask: optional [B, L], 1 (or True) = token, 0 = padding.  Padded keys are
            excluded from both softmaxes (probability 0, whatever the scores hold there: the
            -10000 or dtype-minimum bias, or anything else); padded query rows are excluded (they
            add nothing and get zero gradient).  A sequence without tokens contributes 0.
            Without a mask every row and key counts.
        reduction: "mean" (MiniLM) or "sum".

    With the key mask m[b, j] and, per (layer, b, h) and query row i,
        P_x,ij = m[b,j] exp(S_x,ij) / sum_k m[b,k] exp(S_x,ik)             (x = s, t)
        KL_i   = sum_j P_t,ij (log P_t,ij - log P_s,ij)
    the loss is
        "mean": sum_layers 1 / (H * T) * sum_{b,h} sum_{i: m[b,i]=1} KL_i
        "sum":  sum_layers sum_{b,h} sum_{i: m[b,i]=1} KL_i
    with T = sum_{b,i} m[b,i] the tokens of the batch (B*L without a mask; counted on the device,
    a batch without tokens gives 0): tbf.attention_kl_qk's reduction, so that
    attention_kl_scores(Q_s K_s^T / sqrt(d_s) + bias, Q_t K_t^T / sqrt(d_t) + bias, m) equals
    attention_kl_qk(q_s, k_s, q_t, k_t, m).

    Gradients flow to whichever of student/teacher require them.  With c the reduction scale and
    g the incoming gradient (read on the device: no host synchronisation), on valid rows and keys
    (0 on padded keys and rows):
        dS_s = g c (P_s - P_t),    dS_t = g c P_t ((log P_t - log P_s) - KL_i)

    Fused path: one kernel launch per stacked tensor (per layer for lists) + one partial-sum
    reduction ("mean" with a mask adds a few scalar ops counting T on the device); the kernel
    also writes the gradients of the inputs that require grad (for an incoming gradient of 1; at
    L <= 1024 from the rows still in registers, so forward + backward reads each map once and
    writes each gradient once), and the backward scales them in place by the incoming gradient
    (one launch per gradient tensor, nothing touched when it is 1).  Saved for backward: those
    gradients.  A graph through the fused op can be backpropagated once (see ops._autograd).
    Accuracy: fp32 accumulation; every term is taken against the row's own maximum, so the
    absolute error of KL_i is ~eps_fp32 * max_j |S_ij - max_k S_ik| (a student equal to its
    teacher gives exactly 0).
    """
    _checks.check_reduction(reduction, "attention")
    s_layers, s_stacked = _checks.attention_layers("student", student)
    t_layers, t_stacked = _checks.attention_layers("teacher", teacher)
    if not _backend.use_fused(s_layers[0]):
        return reference.attention_kl_scores(student, teacher, attention_mask, reduction)
    _checks.check_attention(s_layers, t_layers, attention_mask, fused=True)
    s_groups, t_groups = _checks.launch_groups(s_layers, s_stacked, t_layers, t_stacked)
    loss, _, _ = torch.ops.tinybert_fast.attention_kl_scores(
        s_groups, t_groups, attention_mask, reduction, needs_grad(s_groups), needs_grad(t_groups))
    return loss


# --- registered ops ------------------------------------------------------------------------------
# Groups are [n, B, H, L, L] tensors (one stacked tensor, or one per layer); `reduction` gives the
# scale c (on the device with a mask).  Outputs: the loss and the gradients of the groups for an
# incoming gradient of 1 (divided by the backward factor of kernels._utils.split_grad_scale) when
# need_student / need_teacher, an empty list otherwise.  The default kernel launches Triton; the CPU
# kernel computes the same in PyTorch unless backend "triton" runs the kernels in Triton's
# interpreter.

@torch.library.custom_op("tinybert_fast::attention_kl_scores", mutates_args=())
def _attention_kl_scores_op(student: list[Tensor], teacher: list[Tensor],
                            attention_mask: Optional[Tensor], reduction: str,
                            need_student: bool = False, need_teacher: bool = False
                            ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    return _triton_forward(student, teacher, attention_mask, reduction, need_student,
                           need_teacher)


@_attention_kl_scores_op.register_fake
def _(student, teacher, attention_mask, reduction, need_student=False, need_teacher=False):
    gs = [torch.empty(s.shape, dtype=s.dtype, device=s.device) for s in student] if need_student else []
    gt = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in teacher] if need_teacher else []
    return student[0].new_empty((), dtype=torch.float32), gs, gt


def _split_scale(attention_mask, student, teacher, reduction):
    """(c, forward part of c as a 0-dim fp32 tensor, backward part: a float or a 0-dim tensor)
    with c the reduction scale, split by kernels._utils.split_grad_scale."""
    c = row_kl_scale(attention_mask, student, reduction)
    fwd, bwd = split_grad_scale(c, student[0].dtype, teacher[0].dtype)
    if not isinstance(fwd, Tensor):
        fwd = torch.full((), fwd, dtype=torch.float32, device=student[0].device)
    return c, fwd.reshape(()).to(torch.float32), bwd


def _triton_forward(student, teacher, attention_mask, reduction, need_student, need_teacher):
    c, coef, _ = _split_scale(attention_mask, student, teacher, reduction)
    kl_sum, gs, gt = kernels.attention_kl_scores_forward(
        student, teacher, attention_mask, coef, need_student, need_teacher)
    return kl_sum * c, gs, gt


def _torch_valid(s: Tensor, attention_mask: Tensor | None):
    """(ok, rows) for one [n, B, H, L, L] group: valid (row, key) pairs [n, B, H, L, L] and valid
    rows [n, B, H, L] (None, None without a mask)."""
    if attention_mask is None:
        return None, None
    tok = attention_mask != 0
    rows = tok[None, :, None, :].expand(s.shape[:-1])
    return rows[..., None] & tok[None, :, None, None, :], rows


def _torch_log_probs(x: Tensor, ok: Tensor | None, rows: Tensor | None):
    """(x - mx, mx, c) in fp32 for one side of a group, log P = x - mx - c (see the kernels)."""
    x = x.float()
    if ok is None:
        mx = x.amax(-1)
        a = x - mx[..., None]
        return a, mx, torch.log(a.exp().sum(-1))
    mx = torch.where(rows, torch.where(ok, x, -torch.inf).amax(-1), 0.0)
    a = x - mx[..., None]
    l = torch.where(ok, a.exp(), 0.0).sum(-1)
    return a, mx, torch.log(torch.where(rows, l, 1.0))


@_attention_kl_scores_op.register_kernel("cpu")
def _(student, teacher, attention_mask, reduction, need_student=False, need_teacher=False):
    if _backend.cpu_kernel_runs_triton():
        return _triton_forward(student, teacher, attention_mask, reduction, need_student,
                               need_teacher)
    c, coef, _ = _split_scale(attention_mask, student, teacher, reduction)
    total = torch.zeros((), dtype=torch.float32)
    gs, gt = [], []
    for s, t in zip(student, teacher):
        ok, rows = _torch_valid(s, attention_mask)
        a_s, _, c_s = _torch_log_probs(s, ok, rows)
        a_t, _, c_t = _torch_log_probs(t, ok, rows)
        terms = a_t.exp() * (a_t - a_s)
        if ok is not None:
            terms = torch.where(ok, terms, 0.0)  # padded keys may hold anything
        kl = c_s - c_t + terms.sum(-1) / c_t.exp()
        if rows is not None:
            kl = torch.where(rows, kl, 0.0)
        total = total + kl.sum()
        lp_s, lp_t = a_s - c_s[..., None], a_t - c_t[..., None]
        p_s, p_t = lp_s.exp(), lp_t.exp()
        d_t = p_t * ((lp_t - lp_s) - kl[..., None])
        if ok is not None:
            p_s, p_t = torch.where(ok, p_s, 0.0), torch.where(ok, p_t, 0.0)
            d_t = torch.where(ok, d_t, 0.0)
        if need_student:
            gs.append(((p_s - p_t) * coef).to(s.dtype).contiguous())
        if need_teacher:
            gt.append((d_t * coef).to(t.dtype).contiguous())
    return total * c, gs, gt


def _setup_context(ctx, inputs, output):
    student, teacher, attention_mask, reduction, need_student, need_teacher = inputs
    _, gs, gt = output
    ctx.n_groups = len(student)
    ctx.need = (need_student, need_teacher)
    ctx.mark_non_differentiable(*gs, *gt)
    ctx.set_materialize_grads(False)  # no zero gradients for the gradient outputs
    bwd = _split_scale(attention_mask, student, teacher, reduction)[2] \
        if torch.float16 in (student[0].dtype, teacher[0].dtype) else 1.0
    ctx.factor = bwd if not isinstance(bwd, Tensor) else None
    ctx.save_for_backward(*gs, *gt, *([bwd] if isinstance(bwd, Tensor) else []))


def _backward(ctx, grad, _grad_gs, _grad_gt):
    n, (need_s, need_t) = ctx.n_groups, ctx.need
    check_computed("attention_kl_scores", [any(w) for w in ctx.needs_input_grad[:2]], ctx.need)
    saved = list(ctx.saved_tensors)
    factor = ctx.factor
    if factor is None:  # float16 with a mask: the scale is a tensor, g * c formed on the device
        grad, factor = grad.to(torch.float32) * saved.pop(), 1.0
    gs = scaled_gradients(grad, saved[:n], factor) if need_s else [None] * n
    gt = scaled_gradients(grad, saved[n:] if need_s else saved, factor) if need_t else [None] * n
    # list inputs take a list of gradients (None entries where none is needed)
    return gs, gt, None, None, None, None


register_autograd(_attention_kl_scores_op, _backward, _setup_context)
