"""Temperature-scaled soft cross-entropy: public function -> registered op
`tinybert_fast::soft_cross_entropy` -> kernel `tinybert_fast.kernels.soft_ce`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _checks, reference
from ..kernels import soft_ce as kernels
from ._autograd import register_autograd


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                       reduction: str = "mean") -> Tensor:
    """Soft cross-entropy of student logits against teacher logits (fp32 scalar).

    Args:
        student_logits, teacher_logits: [..., C] (N rows of C classes; C from 1 to any vocabulary
            size), float16 / bfloat16 / float32, any strides.
        temperature: T > 0 (a Python float).
        reduction: "mean" (TinyBERT: over all N*C entries), "batchmean" (/N) or "sum".

        per row: ce = -sum_c softmax(z_t/T)_c * log_softmax(z_s/T)_c
        "mean": sum_rows ce / (N*C);  "batchmean": sum_rows ce / N;  "sum": sum_rows ce
    No T^2 factor (multiply it in if you want DistilBERT's scaling).

    Fused path: one pass over C per row (online softmax over C tiles, fp32) that keeps three fp32
    numbers per row; the backward is one pass that writes the gradient.  No N*C intermediate is
    materialised or saved.
    """
    temperature = _checks.logits_arguments(student_logits, temperature, reduction)
    if not _backend.use_fused(student_logits):
        return reference.soft_cross_entropy(student_logits, teacher_logits, temperature, reduction)
    z_s, z_t = _checks.logits_2d(student_logits, teacher_logits, fused=True)
    scale = _checks.logits_scale(z_s, reduction)
    loss, _ = torch.ops.tinybert_fast.soft_cross_entropy(z_s, z_t, temperature, scale)
    return loss


# --- registered ops ------------------------------------------------------------------------------
# [N, C] logits; `scale` folds in the reduction.  Forward outputs (loss, row statistics fp32 [3, N]
# = (lse(z_s/T), lse(z_t/T), ce)).

@torch.library.custom_op("tinybert_fast::soft_cross_entropy", mutates_args=())
def _soft_ce_op(student: Tensor, teacher: Tensor, temperature: float, scale: float
                ) -> tuple[Tensor, Tensor]:
    return kernels.soft_cross_entropy_forward(student, teacher, temperature, scale)


@_soft_ce_op.register_fake
def _(student, teacher, temperature, scale):
    return (student.new_empty((), dtype=torch.float32),
            student.new_empty((3, student.shape[0]), dtype=torch.float32))


@_soft_ce_op.register_kernel("cpu")
def _(student, teacher, temperature, scale):
    if _backend.cpu_kernel_runs_triton():
        return kernels.soft_cross_entropy_forward(student, teacher, temperature, scale)
    x, u = student.float() / temperature, teacher.float() / temperature
    lse_s, lse_t = torch.logsumexp(x, dim=1), torch.logsumexp(u, dim=1)
    p_t = torch.exp(u - lse_t[:, None])
    ce = lse_s - torch.where(p_t > 0, p_t * x, 0.0).sum(1)
    return ce.sum() * scale, torch.stack([lse_s, lse_t, ce])


@torch.library.custom_op("tinybert_fast::soft_cross_entropy_backward", mutates_args=())
def _soft_ce_backward_op(grad: Tensor, student: Tensor, teacher: Tensor, stats: Tensor,
                         temperature: float, scale: float, need_student: bool,
                         need_teacher: bool) -> tuple[Tensor, Tensor]:
    ds, dt = kernels.soft_cross_entropy_backward(grad, student, teacher, stats, temperature,
                                                 scale, need_student, need_teacher)
    return _or_empty(ds, student), _or_empty(dt, teacher)


def _or_empty(grad: Tensor | None, like: Tensor) -> Tensor:
    """Ops return tensors, not None: a gradient that was not asked for is an empty [0] tensor."""
    return grad if grad is not None else like.new_empty((0,))


@_soft_ce_backward_op.register_fake
def _(grad, student, teacher, stats, temperature, scale, need_student, need_teacher):
    return (student.new_empty(student.shape if need_student else (0,)),
            teacher.new_empty(teacher.shape if need_teacher else (0,)))


@_soft_ce_backward_op.register_kernel("cpu")
def _(grad, student, teacher, stats, temperature, scale, need_student, need_teacher):
    if _backend.cpu_kernel_runs_triton():
        ds, dt = kernels.soft_cross_entropy_backward(grad, student, teacher, stats, temperature,
                                                     scale, need_student, need_teacher)
        return _or_empty(ds, student), _or_empty(dt, teacher)
    coef = grad.float() * scale / temperature
    lse_s, lse_t, ce = stats
    log_p_s = student.float() / temperature - lse_s[:, None]
    p_t = torch.exp(teacher.float() / temperature - lse_t[:, None])
    ds = (coef * (log_p_s.exp() - p_t)).to(student.dtype) if need_student else None
    dt = None
    if need_teacher:
        dt = torch.where(p_t > 0, -coef * p_t * (log_p_s + ce[:, None]), 0.0).to(teacher.dtype)
    return _or_empty(ds, student), _or_empty(dt, teacher)


def _setup_context(ctx, inputs, output):
    student, teacher, temperature, scale = inputs
    ctx.temperature, ctx.scale = temperature, scale
    ctx.save_for_backward(student, teacher, output[1])


def _backward(ctx, grad, _grad_stats):
    student, teacher, stats = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ds, dt = torch.ops.tinybert_fast.soft_cross_entropy_backward(
        grad, student, teacher, stats, ctx.temperature, ctx.scale, need_s, need_t)
    return (ds if need_s else None), (dt if need_t else None), None, None


register_autograd(_soft_ce_op, _backward, _setup_context)
