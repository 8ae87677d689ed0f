"""Knowledge-distillation KL divergence (Hinton et al., DistilBERT): public function -> registered
op `tinybert_fast::kl_divergence` -> kernel `tinybert_fast.kernels.kl_divergence`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _checks, reference
from ..kernels import kl_divergence as kernels
from ..kernels._utils import split_grad_scale
from ._autograd import fused_logits_loss, logits_grad_autograd


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                  reduction: str = "batchmean") -> Tensor:
    """T^2-scaled KL(p_t || p_s) of teacher and student logits, p = softmax(z / T) (fp32 scalar).

    Args:
        student_logits, teacher_logits: [..., C] (N rows of C classes; C from 1 to any vocabulary
            size), float16 / bfloat16 / float32, any strides.
        temperature: T > 0 (a Python float).
        reduction: "batchmean" (/N: DistilBERT's, the mathematically proper KL mean),
            "mean" (over all N*C entries) or "sum".

        per row: kl = sum_c p_t,c * (log p_t,c - log p_s,c)
        "batchmean": T^2 * sum_rows kl / N;  "mean": T^2 * sum_rows kl / (N*C);
        "sum": T^2 * sum_rows kl
    The T^2 factor (Hinton et al.) keeps the gradients' magnitude independent of T:
    dloss/dz_s = T * (p_s - p_t) * (reduction scale).  Classes where the teacher's logit is -inf
    contribute 0.

    Fused path: soft_cross_entropy's kernel (kernels._utils.logits_loss) with the KL's row
    value and teacher gradient; the same single pass, gradients written in the forward and
    scaled in place by the backward, and the same once-only backward (see soft_cross_entropy).
    """
    temperature = _checks.logits_arguments(student_logits, temperature, reduction)
    if not _backend.use_fused(student_logits):
        return reference.kl_divergence(student_logits, teacher_logits, temperature, reduction)
    return fused_logits_loss(torch.ops.tinybert_fast.kl_divergence, student_logits, teacher_logits,
                             temperature, reduction)


# --- registered ops ------------------------------------------------------------------------------
# [N, C] logits; `scale` folds in the reduction (the op multiplies T^2 in).  Outputs (loss, dZ_s,
# dZ_t): the gradients for an incoming gradient of 1 when need_student / need_teacher, an empty [0]
# tensor otherwise.

@torch.library.custom_op("tinybert_fast::kl_divergence", mutates_args=())
def _kl_div_op(student: Tensor, teacher: Tensor, temperature: float, scale: float,
               need_student: bool = False, need_teacher: bool = False
               ) -> tuple[Tensor, Tensor, Tensor]:
    return kernels.kl_divergence_forward(student, teacher, temperature, scale, need_student,
                                         need_teacher)


def _log_softmax(z: Tensor, temperature: float) -> Tensor:
    """log softmax(z/T) of [N, C] logits in fp32, the maximum subtracted before the scaling (as
    the kernel does: see kernels/kl_divergence.py)."""
    z = z.float()
    x = (z - z.amax(1, keepdim=True)) / temperature
    return x - torch.logsumexp(x, dim=1, keepdim=True)


@_kl_div_op.register_kernel("cpu")
def _(student, teacher, temperature, scale, need_student=False, need_teacher=False):
    if _backend.cpu_kernel_runs_triton():
        return kernels.kl_divergence_forward(student, teacher, temperature, scale, need_student,
                                             need_teacher)
    log_p_s, log_p_t = _log_softmax(student, temperature), _log_softmax(teacher, temperature)
    p_t = log_p_t.exp()
    # p_t = 0 (z_t = -inf): no term, and no -inf - -inf
    kl = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0).sum(1)
    coef = split_grad_scale(scale, student.dtype, teacher.dtype)[0] * temperature
    ds = (coef * (log_p_s.exp() - p_t)).to(student.dtype) if need_student \
        else student.new_empty((0,))
    dt = torch.where(p_t > 0, coef * p_t * (log_p_t - log_p_s - kl[:, None]),
                     0.0).to(teacher.dtype) if need_teacher else teacher.new_empty((0,))
    return kl.sum() * (scale * temperature * temperature), ds, dt


logits_grad_autograd(_kl_div_op, "kl_divergence")
