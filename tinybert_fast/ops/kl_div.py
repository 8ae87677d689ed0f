"""Knowledge-distillation KL divergence (Hinton et al., DistilBERT): public function -> registered
op `tinybert_fast::kl_divergence` -> kernel `tinybert_fast.kernels.kl_div`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _checks, reference
from ..kernels import kl_div as kernels
from ._autograd import register_autograd


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

    Fused path: one pass over C per row (online softmax over C tiles, fp32) that keeps five fp32
    numbers per row; the backward is one pass that writes the gradient(s).  No N*C intermediate is
    materialised or saved.
    """
    temperature = _checks.logits_arguments(student_logits, temperature, reduction)
    if not _backend.use_fused(student_logits):
        return reference.kl_divergence(student_logits, teacher_logits, temperature, reduction)
    z_s, z_t = _checks.logits_2d(student_logits, teacher_logits, fused=True)
    scale = _checks.logits_scale(z_s, reduction)
    loss, _ = torch.ops.tinybert_fast.kl_divergence(z_s, z_t, temperature, scale)
    return loss


# --- registered ops ------------------------------------------------------------------------------
# [N, C] logits; `scale` folds in the reduction (the op multiplies T^2 in).  Forward outputs (loss,
# row statistics fp32 [5, N] = (m_s, r_s, m_t, r_t, kl)): m = max_c z, r = ln sum_c exp((z - m)/T),
# so log p = (z - m)/T - r (the maximum subtracted before the scaling, as torch.log_softmax does;
# see kernels/kl_div.py), and kl the row's KL without T^2.

@torch.library.custom_op("tinybert_fast::kl_divergence", mutates_args=())
def _kl_div_op(student: Tensor, teacher: Tensor, temperature: float, scale: float
               ) -> tuple[Tensor, Tensor]:
    return kernels.kl_divergence_forward(student, teacher, temperature, scale)


@_kl_div_op.register_fake
def _(student, teacher, temperature, scale):
    return (student.new_empty((), dtype=torch.float32),
            student.new_empty((kernels.N_STATS, student.shape[0]), dtype=torch.float32))


@_kl_div_op.register_kernel("cpu")
def _(student, teacher, temperature, scale):
    if _backend.cpu_kernel_runs_triton():
        return kernels.kl_divergence_forward(student, teacher, temperature, scale)
    (m_s, r_s, log_p_s), (m_t, r_t, log_p_t) = (_log_softmax_parts(z, temperature)
                                                  for z in (student, teacher))
    p_t = log_p_t.exp()
    # p_t = 0 (z_t = -inf): no term, and no -inf - -inf
    kl = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0).sum(1)
    return (kl.sum() * (scale * temperature * temperature),
            torch.stack([m_s, r_s, m_t, r_t, kl]))


def _log_softmax_parts(z: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(m, r, log p) of [N, C] logits in fp32: m = max_c z, r = ln sum_c exp((z - m)/T),
    log p = (z - m)/T - r."""
    z = z.float()
    m = z.amax(1)
    x = (z - m[:, None]) / temperature
    r = torch.logsumexp(x, dim=1)
    return m, r, x - r[:, None]


def _log_probs(z: Tensor, m: Tensor, r: Tensor, temperature: float) -> Tensor:
    """log softmax(z/T) [N, C] fp32 from the forward's statistics m, r [N]."""
    return (z.float() - m[:, None]) / temperature - r[:, None]


@torch.library.custom_op("tinybert_fast::kl_divergence_backward", mutates_args=())
def _kl_div_backward_op(grad: Tensor, student: Tensor, teacher: Tensor, stats: Tensor,
                        temperature: float, scale: float, need_student: bool,
                        need_teacher: bool) -> tuple[Tensor, Tensor]:
    ds, dt = kernels.kl_divergence_backward(grad, student, teacher, stats, temperature, scale,
                                            need_student, need_teacher)
    return _or_empty(ds, student), _or_empty(dt, teacher)


def _or_empty(grad: Tensor | None, like: Tensor) -> Tensor:
    """Ops return tensors, not None: a gradient that was not asked for is an empty [0] tensor."""
    return grad if grad is not None else like.new_empty((0,))


@_kl_div_backward_op.register_fake
def _(grad, student, teacher, stats, temperature, scale, need_student, need_teacher):
    return (student.new_empty(student.shape if need_student else (0,)),
            teacher.new_empty(teacher.shape if need_teacher else (0,)))


@_kl_div_backward_op.register_kernel("cpu")
def _(grad, student, teacher, stats, temperature, scale, need_student, need_teacher):
    if _backend.cpu_kernel_runs_triton():
        ds, dt = kernels.kl_divergence_backward(grad, student, teacher, stats, temperature, scale,
                                                need_student, need_teacher)
        return _or_empty(ds, student), _or_empty(dt, teacher)
    coef = grad.float() * (scale * temperature)
    m_s, r_s, m_t, r_t, kl = stats
    log_p_s = _log_probs(student, m_s, r_s, temperature)
    log_p_t = _log_probs(teacher, m_t, r_t, temperature)
    p_t = torch.exp(log_p_t)
    ds = (coef * (log_p_s.exp() - p_t)).to(student.dtype) if need_student else None
    dt = None
    if need_teacher:
        dt = torch.where(p_t > 0, coef * p_t * (log_p_t - log_p_s - kl[:, None]),
                         0.0).to(teacher.dtype)
    return _or_empty(ds, student), _or_empty(dt, teacher)


def _setup_context(ctx, inputs, output):
    student, teacher, temperature, scale = inputs
    ctx.temperature, ctx.scale = temperature, scale
    ctx.save_for_backward(student, teacher, output[1])


def _backward(ctx, grad, _grad_stats):
    student, teacher, stats = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ds, dt = torch.ops.tinybert_fast.kl_divergence_backward(
        grad, student, teacher, stats, ctx.temperature, ctx.scale, need_s, need_t)
    return (ds if need_s else None), (dt if need_t else None), None, None


register_autograd(_kl_div_op, _backward, _setup_context)
