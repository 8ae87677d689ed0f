"""Triton kernel for the temperature-scaled soft cross-entropy: the loss and, in the same pass,
its gradients.

Shapes: student logits Z_s and teacher logits Z_t, [N, C] (any strides).  With x = Z_s / T,
u = Z_t / T, p_t = softmax(u), per row

    ce     = -sum_c p_t[c] * log_softmax(x)[c] = lse(x) - sum_c p_t[c] * x[c]
    loss   = scale * sum_rows ce            (scale = 1/(N*C) "mean", 1/N "batchmean", 1 "sum")
    dZ_s   = scale / T * (softmax(x) - p_t)
    dZ_t   = -scale / T * p_t * (log_softmax(x) + ce)

(float16 gradients are written without `scale`, which the backward then applies:
kernels._utils.split_grad_scale).

dZ_s and dZ_t are the gradients for an incoming gradient of 1, written (when asked for) by the
kernel that computes the loss; the backward multiplies them by the incoming gradient in place
(kernels._utils.scale_in_place: no pass at all when it is 1).

The kernel is the one the KL divergence runs too (kernels._utils.logits_loss: the two losses
differ only in the per-row value and the teacher's gradient).  One program holds BLOCK_N rows.
The row statistics come from an online softmax of both logit sets over column tiles (fp32,
base-2 exponentials, maxima in logit units: kernels._utils.logits_row_stats); when a row fits one
tile (C <= MAX_BLOCK_C) the gradients are computed from the tile still in registers, so forward +
backward reads each logit once and writes each gradient once; a longer row is read a second time
for its gradients.

Launches: one kernel + one sum over per-program partials.
"""

from __future__ import annotations

import torch

from ._utils import logits_loss, split_grad_scale

# Widest column tile: a row up to this many classes is read once.
MAX_BLOCK_C = 4096


def soft_cross_entropy_forward(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                               scale: float, need_student: bool = False,
                               need_teacher: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss fp32 scalar, dZ_s, dZ_t) for [N, C] logits: the gradients contiguous [N, C] in the
    logits' dtypes for an incoming gradient of 1 (divided by the backward factor of
    split_grad_scale: 1, or `scale` for float16), an empty [0] tensor where not asked for."""
    grad_scale = split_grad_scale(scale, student.dtype, teacher.dtype)[0]
    return logits_loss(student, teacher, temperature, scale, grad_scale / temperature, False,
                       need_student, need_teacher, MAX_BLOCK_C)
