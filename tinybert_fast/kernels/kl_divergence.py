"""Triton kernel for the knowledge-distillation KL divergence (Hinton et al., DistilBERT): the
loss and, in the same pass, its gradients.

Shapes: student logits Z_s and teacher logits Z_t, [N, C] (any strides).  With x = Z_s / T,
u = Z_t / T, p_s = softmax(x), p_t = softmax(u), per row

    kl     = sum_c p_t[c] * (log p_t[c] - log p_s[c])
           = sum_c p_t[c] * (u[c] - x[c]) + lse(x) - lse(u)
    loss   = scale * T^2 * sum_rows kl      (scale = 1/N "batchmean", 1/(N*C) "mean", 1 "sum")
    dZ_s   = scale * T * (p_s - p_t)
    dZ_t   = scale * T * p_t * (log p_t - log p_s - kl)

(dkl/du_j = sum_c dp_t[c]/du_j * (log p_t[c] - log p_s[c]) + sum_c p_t[c] * dlog p_t[c]/du_j; the
second sum is p_t[j] - p_t[j] * sum_c p_t[c] = 0 and dp_t[c]/du_j = p_t[c] (d_cj - p_t[j]), which
leaves p_t[j] * (log p_t[j] - log p_s[j] - kl); the chain rule through u = Z_t / T and the T^2
factor give scale * T.)  Classes where the teacher gives no mass (p_t = 0: logit -inf) add 0 to
kl and get a zero teacher gradient.  float16 gradients are written without `scale`, which the
backward then applies (kernels._utils.split_grad_scale).

dZ_s and dZ_t are the gradients for an incoming gradient of 1, written (when asked for) by the
kernel that computes the loss; the backward multiplies them by the incoming gradient in place
(kernels._utils.scale_in_place: no pass at all when it is 1).  The kernel is the one soft
cross-entropy runs too (kernels._utils.logits_loss).  The row statistics come from an online
softmax of both logit sets over column tiles (fp32, base-2 exponentials:
kernels._utils.logits_row_stats) with m = max_c Z[c] and r = ln sum_c exp((Z[c] - m) / T), so
lse(Z / T) = m / T + r; when a row fits one tile (C <= MAX_BLOCK_C) the gradients come from the
tile still in registers (each logit read once), a longer row is read a second time for them.

Why the maximum in logit units: log p = (Z - m) / T - r subtracts the maximum before any scaling,
as torch.log_softmax does, so the scaling's rounding acts on Z - m (small near the top of the
distribution, where p matters) and not on Z itself.  Scaling first (x = Z / T * log2(e), then
x - lse) rounds numbers as large as the logits: at |Z / T| ~ 600 that is ~3e-5 absolute error in
log p, 1e-5 relative in the gradient, against ~3e-8 for torch in fp32.

Launches: one kernel + one sum over per-program partials.
"""

from __future__ import annotations

import torch

from ._utils import logits_loss, split_grad_scale

# Widest column tile: a row up to this many classes is read once.
MAX_BLOCK_C = 4096


def kl_divergence_forward(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                          scale: float, need_student: bool = False, need_teacher: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss = scale * T^2 * sum_rows kl fp32 scalar, dZ_s, dZ_t) for [N, C] logits: the
    gradients contiguous [N, C] in the logits' dtypes for an incoming gradient of 1 (divided by
    the backward factor of split_grad_scale: 1, or `scale` for float16), an empty [0] tensor where
    not asked for.  See the module docstring."""
    grad_scale = split_grad_scale(scale, student.dtype, teacher.dtype)[0]
    return logits_loss(student, teacher, temperature, scale * temperature * temperature,
                       grad_scale * temperature, True, need_student, need_teacher, MAX_BLOCK_C)
