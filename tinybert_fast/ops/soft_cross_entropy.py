"""Temperature-scaled soft cross-entropy: public function -> registered op
`tinybert_fast::soft_cross_entropy` -> kernel `tinybert_fast.kernels.soft_cross_entropy`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _checks, reference
from ..kernels import soft_cross_entropy as kernels
from ..kernels._utils import split_grad_scale
from ._autograd import fused_logits_loss, logits_grad_autograd


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

    Fused path: one kernel, one pass over C per row (online softmax over C tiles, fp32) that
    also writes the gradients of the logits that require grad (for an incoming gradient of 1;
    with C <= 4096 from the row still in registers, so forward + backward reads each logit once
    and writes each gradient once); the backward scales them in place by the incoming gradient,
    read on the device (nothing touched when it is 1).  Saved for backward: those gradients.  A
    graph through the fused op can be backpropagated once (see ops._autograd).
    """
    temperature = _checks.logits_arguments(student_logits, temperature, reduction)
    if not _backend.use_fused(student_logits):
        return reference.soft_cross_entropy(student_logits, teacher_logits, temperature, reduction)
    return fused_logits_loss(torch.ops.tinybert_fast.soft_cross_entropy, student_logits,
                             teacher_logits, temperature, reduction)


# --- registered ops ------------------------------------------------------------------------------
# [N, C] logits; `scale` folds in the reduction.  Outputs (loss, dZ_s, dZ_t): the gradients for an
# incoming gradient of 1 when need_student / need_teacher, an empty [0] tensor otherwise.

@torch.library.custom_op("tinybert_fast::soft_cross_entropy", mutates_args=())
def _soft_ce_op(student: Tensor, teacher: Tensor, temperature: float, scale: float,
                need_student: bool = False, need_teacher: bool = False
                ) -> tuple[Tensor, Tensor, Tensor]:
    return kernels.soft_cross_entropy_forward(student, teacher, temperature, scale, need_student,
                                              need_teacher)


@_soft_ce_op.register_kernel("cpu")
def _(student, teacher, temperature, scale, need_student=False, need_teacher=False):
    if _backend.cpu_kernel_runs_triton():
        return kernels.soft_cross_entropy_forward(student, teacher, temperature, scale,
                                                  need_student, need_teacher)
    x, u = student.float() / temperature, teacher.float() / temperature
    log_p_s = torch.log_softmax(x, dim=1)
    p_t = torch.softmax(u, dim=1)
    ce = -torch.where(p_t > 0, p_t * log_p_s, 0.0).sum(1)
    coef = split_grad_scale(scale, student.dtype, teacher.dtype)[0] / temperature
    ds = (coef * (log_p_s.exp() - p_t)).to(student.dtype) if need_student \
        else student.new_empty((0,))
    dt = torch.where(p_t > 0, -coef * p_t * (log_p_s + ce[:, None]), 0.0).to(teacher.dtype) \
        if need_teacher else teacher.new_empty((0,))
    return ce.sum() * scale, ds, dt


logits_grad_autograd(_soft_ce_op, "soft_cross_entropy")
