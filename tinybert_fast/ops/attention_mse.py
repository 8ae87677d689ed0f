"""Attention-score MSE: public function -> registered op `tinybert_fast::attention_mse` -> kernel
`tinybert_fast.kernels.attention_mse`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _checks, reference
from .._semantics import MASK_THRESHOLD
from ..kernels import attention_mse as kernels
from ..kernels._utils import split_grad_scale
from ._autograd import check_computed, needs_grad, register_autograd, scaled_gradients


def attention_mse(student, teacher, attention_mask: Tensor | None = None,
                  reduction: str = "mean", *, mask_queries: bool = False) -> Tensor:
    """TinyBERT's attention loss, summed over mapped layers (fp32 scalar).

    Args:
        student, teacher: pre-softmax attention scores S = QK^T/sqrt(d_head) + mask_bias, as one
            layer [B, H, L, L], stacked layers [n_layers, B, H, L, L], or a list/tuple of
            [B, H, L, L] (one per mapped layer).  float16 / bfloat16 / float32, any strides;
            student and teacher dtypes may differ.
        attention_mask: optional [B, L], 1 (or True) = token, 0 = padding.  Padded key columns
            then contribute 0 (they still count in the denominator).
        reduction: "mean" (TinyBERT) or "sum".
        mask_queries: also exclude padded query rows (m[b, i] == 0), which TinyBERT keeps.  The
            denominator stays B*H*L*L.  Needed with cached teacher scores, whose padded rows are
            not stored (tinybert_fast.cache).

    With x' = 0 where x <= -100 else x (removes the -10000 / dtype-min mask bias):
        "mean": sum_layers (1 / (B*H*L*L)) * sum_{b,h,i,j} m[b,j] * (s'_bhij - t'_bhij)^2
        "sum":  sum_layers sum_{b,h,i,j} m[b,j] * (s' - t')^2
    Padded query rows are not masked (TinyBERT semantics).

    Gradients flow to whichever of student/teacher require them.  Fused path: one kernel launch
    per stacked tensor (per layer for lists) + one partial-sum reduction, which also writes the
    gradients of the inputs that require grad (for an incoming gradient of 1), so forward +
    backward reads each map once and writes each gradient once; the backward scales them in
    place by the incoming gradient (one launch per gradient tensor, which reads the incoming
    gradient on the device and touches nothing when it is 1).  Saved for backward: those
    gradients only.  A graph through the fused op can be backpropagated once (see ops._autograd).
    """
    _checks.check_reduction(reduction, "attention")
    s_layers, s_stacked = _checks.attention_layers("student", student)
    t_layers, t_stacked = _checks.attention_layers("teacher", teacher)
    if mask_queries and attention_mask is None:
        raise ValueError("mask_queries=True needs attention_mask [B, L]")
    if not _backend.use_fused(s_layers[0]):
        return reference.attention_mse(student, teacher, attention_mask, reduction,
                                       mask_queries=mask_queries)
    _checks.check_attention(s_layers, t_layers, attention_mask, fused=True)
    s_groups, t_groups = _checks.launch_groups(s_layers, s_stacked, t_layers, t_stacked)
    B, H, L, _ = s_layers[0].shape
    scale = 1.0 / (B * H * L * L) if reduction == "mean" else 1.0
    loss, _, _ = torch.ops.tinybert_fast.attention_mse(
        s_groups, t_groups, attention_mask, scale, mask_queries, needs_grad(s_groups),
        needs_grad(t_groups))
    return loss


# --- registered ops ------------------------------------------------------------------------------
# Groups are [n, B, H, L, L] tensors (one stacked tensor, or one per layer); `scale` folds in the
# reduction.  Outputs: the loss and the gradients of the groups (for an incoming gradient of 1) when
# need_student / need_teacher, an empty list otherwise.  The default kernel launches Triton; the CPU
# kernel computes the same in PyTorch unless backend "triton" runs the kernels in Triton's
# interpreter.

@torch.library.custom_op("tinybert_fast::attention_mse", mutates_args=())
def _attention_mse_op(student: list[Tensor], teacher: list[Tensor],
                      attention_mask: Optional[Tensor], scale: float,
                      mask_queries: bool = False, need_student: bool = False,
                      need_teacher: bool = False
                      ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    return kernels.attention_mse_forward(student, teacher, attention_mask, scale, mask_queries,
                                         need_student, need_teacher)


@_attention_mse_op.register_fake
def _(student, teacher, attention_mask, scale, mask_queries=False, need_student=False,
      need_teacher=False):
    gs = [torch.empty(s.shape, dtype=s.dtype, device=s.device) for s in student] if need_student else []
    gt = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in teacher] if need_teacher else []
    return student[0].new_empty((), dtype=torch.float32), gs, gt


def _torch_diff(s: Tensor, t: Tensor, attention_mask: Tensor | None, mask_queries: bool):
    """(m * (s' - t'), s live, t live) in fp32 for one [n, B, H, L, L] group."""
    s, t = s.float(), t.float()
    s_live, t_live = s > MASK_THRESHOLD, t > MASK_THRESHOLD
    d = torch.where(s_live, s, 0.0) - torch.where(t_live, t, 0.0)
    if attention_mask is not None:
        keep = attention_mask != 0
        d = d * keep[None, :, None, None, :]
        if mask_queries:
            d = d * keep[None, :, None, :, None]
    return d, s_live, t_live


@_attention_mse_op.register_kernel("cpu")
def _(student, teacher, attention_mask, scale, mask_queries=False, need_student=False,
      need_teacher=False):
    if _backend.cpu_kernel_runs_triton():
        return kernels.attention_mse_forward(student, teacher, attention_mask, scale,
                                             mask_queries, need_student, need_teacher)
    total = torch.zeros((), dtype=torch.float32)
    gs, gt = [], []
    for s, t in zip(student, teacher):
        d, s_live, t_live = _torch_diff(s, t, attention_mask, mask_queries)
        total = total + d.square().sum()
        d = d * (2.0 * split_grad_scale(scale, s.dtype, t.dtype)[0])
        if need_student:
            gs.append(torch.where(s_live, d, 0.0).to(s.dtype).contiguous())
        if need_teacher:
            gt.append(torch.where(t_live, -d, 0.0).to(t.dtype).contiguous())
    return total * scale, gs, gt


def _setup_context(ctx, inputs, output):
    student, teacher, _, _, _, need_student, need_teacher = inputs
    _, gs, gt = output
    ctx.n_groups = len(student)
    ctx.mark_non_differentiable(*gs, *gt)
    ctx.set_materialize_grads(False)  # no zero gradients for the gradient outputs
    ctx.save_for_backward(*gs, *gt)
    ctx.need = (need_student, need_teacher)
    ctx.factor = split_grad_scale(inputs[3], student[0].dtype, teacher[0].dtype)[1]


def _backward(ctx, grad, _grad_gs, _grad_gt):
    n, (need_s, need_t) = ctx.n_groups, ctx.need
    saved = list(ctx.saved_tensors)
    check_computed("attention_mse", [any(w) for w in ctx.needs_input_grad[:2]], ctx.need)
    gs = scaled_gradients(grad, saved[:n], ctx.factor) if need_s else [None] * n
    gt = scaled_gradients(grad, saved[n:] if need_s else saved, ctx.factor) if need_t \
        else [None] * n
    # list inputs take a list of gradients (None entries where none is needed)
    return gs, gt, None, None, None, None, None


register_autograd(_attention_mse_op, _backward, _setup_context)
