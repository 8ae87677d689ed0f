"""Projected hidden-state MSE: public function -> registered op `tinybert_fast::hidden_mse` ->
kernel `tinybert_fast.kernels.hidden_mse` (backward: cuBLAS products over the saved residual).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _checks, reference
from ..kernels import hidden_mse as kernels
from ._autograd import register_autograd


def hidden_mse(student, teacher, weight: Tensor, bias: Tensor | None = None,
               reduction: str = "mean", *, token_mask: Tensor | None = None) -> Tensor:
    """TinyBERT's hidden-state loss with one shared projection, summed over states (fp32 scalar).

    Args:
        student: [M, d_s] or [B, L, d_s] (one state), [n_states, B, L, d_s] (stacked), or a
            list/tuple of [..., d_s] tensors (one per mapped state; state 0 = embeddings).
        teacher: the same structure with d_t features.
        weight: [d_t, d_s] (nn.Linear layout), cast to the student's dtype as autocast would.
        bias: [d_t] or None.
        reduction: "mean" (TinyBERT) or "sum".
        token_mask: optional [B, L] (or [M]) mask of each state's tokens, 0 = padding: padded
            tokens are excluded (TinyBERT includes them; the denominator stays M*d_t).  Needed
            with cached teacher states, whose padded rows are not stored (tinybert_fast.cache).

        "mean": sum_states (1 / (M*d_t)) * sum_{m,n} (X W^T + b - Y)_{mn}^2,  M tokens per state
        "sum":  sum_states sum_{m,n} (X W^T + b - Y)^2
    Padded tokens are included unless token_mask is given (TinyBERT semantics).

    Fused path: one GEMM kernel per stacked tensor (per state for lists) with the squared error
    in its epilogue; X W^T is never written to memory.  When a gradient is needed the kernel also
    writes the residual R = X W^T + b - Y (student dtype, d_t per token per state) and its
    column sums: that is all the backward keeps (plus X and W); the teacher states are not kept.
    Backward: dX = s R W, dW = s R^T X, db = s colsum(R), dY = -s R (s = 2 * scale * grad).
    """
    _checks.check_reduction(reduction, "hidden")
    s_states, s_stacked = _checks.hidden_states("student", student)
    t_states, t_stacked = _checks.hidden_states("teacher", teacher)
    if not _backend.use_fused(s_states[0]):
        return reference.hidden_mse(student, teacher, weight, bias, reduction,
                                    token_mask=token_mask)
    _checks.check_hidden(s_states, t_states, weight, bias, fused=True)
    token_mask = _checks.token_mask(token_mask, s_states[0])
    s_groups, t_groups = _checks.launch_groups(s_states, s_stacked, t_states, t_stacked)
    weight = weight.to(s_states[0].dtype)
    M, d_t = t_states[0].shape
    scale = 1.0 / (M * d_t) if reduction == "mean" else 1.0
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (*s_groups, *t_groups, weight, bias) if t is not None)
    loss, _, _ = torch.ops.tinybert_fast.hidden_mse(s_groups, t_groups, weight, bias, scale,
                                                    needs_grad, token_mask)
    return loss


# --- registered op -------------------------------------------------------------------------------
# Groups are [n, M, d] tensors; token_mask is [M] or None.  Outputs: (loss, residual [sum n*M, d_t] in the student's dtype,
# colsum fp32 [d_t]); the last two are empty ([0, d_t] and [0]) unless save_residual.

@torch.library.custom_op("tinybert_fast::hidden_mse", mutates_args=())
def _hidden_mse_op(student: list[Tensor], teacher: list[Tensor], weight: Tensor,
                   bias: Optional[Tensor], scale: float, save_residual: bool,
                   token_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    return _triton_forward(student, teacher, weight, bias, scale, save_residual, token_mask)


def _triton_forward(student, teacher, weight, bias, scale, save_residual, token_mask):
    loss, residual, colsum = kernels.hidden_mse_forward(student, teacher, weight, bias, scale,
                                                        save_residual, token_mask)
    return loss, residual, (colsum.sum(0) if save_residual else colsum.new_empty((0,)))


@_hidden_mse_op.register_fake
def _(student, teacher, weight, bias, scale, save_residual, token_mask=None):
    x = student[0]
    d_t = weight.shape[0]
    rows = sum(s.shape[0] * s.shape[1] for s in student) if save_residual else 0
    return (x.new_empty((), dtype=torch.float32), x.new_empty((rows, d_t)),
            x.new_empty((d_t if save_residual else 0,), dtype=torch.float32))


@_hidden_mse_op.register_kernel("cpu")
def _(student, teacher, weight, bias, scale, save_residual, token_mask=None):
    if _backend.cpu_kernel_runs_triton():
        return _triton_forward(student, teacher, weight, bias, scale, save_residual, token_mask)
    d_t = weight.shape[0]
    r = torch.cat([(x.float() @ weight.float().T - y.float()
                    + (0.0 if bias is None else bias.float())) for x, y in zip(student, teacher)])
    if token_mask is not None:  # [n, M, d_t] per group * [M, 1]
        r = r * (token_mask != 0)[:, None]
    r = r.reshape(-1, d_t)
    loss = r.square().sum() * scale
    if not save_residual:
        return loss, student[0].new_empty((0, d_t)), r.new_empty((0,))
    return loss, r.to(student[0].dtype), r.sum(0)


def _setup_context(ctx, inputs, output):
    student, teacher, weight, bias, scale, save_residual, _token_mask = inputs
    _, residual, colsum = output
    ctx.n_groups = len(student)
    ctx.group_sizes = [(t.shape[0], t.shape[1]) for t in teacher]
    ctx.scale = scale
    ctx.saved_residual = save_residual
    ctx.set_materialize_grads(False)  # residual/colsum get no gradient: don't allocate zeros
    ctx.teacher_dtype = teacher[0].dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(residual, colsum, weight, *student)


def _backward(ctx, grad, _grad_residual, _grad_colsum):
    if not ctx.saved_residual:
        raise RuntimeError("tinybert_fast::hidden_mse was called with save_residual=False, so it "
                           "kept nothing for backward; call it with save_residual=True (the public "
                           "tinybert_fast.hidden_mse decides this from requires_grad)")
    residual, colsum, weight, *student = ctx.saved_tensors
    if grad is None:
        return [None] * ctx.n_groups, [None] * ctx.n_groups, None, None, None, None, None
    need_x, need_y, need_w, need_b = (any(ctx.needs_input_grad[0]), any(ctx.needs_input_grad[1]),
                                      ctx.needs_input_grad[2], ctx.needs_input_grad[3])
    s = grad.float() * (2.0 * ctx.scale)  # 0-dim on the device: no host synchronisation
    r_groups = [r.view(n, m, -1) for r, (n, m) in
                zip(residual.split([n * m for n, m in ctx.group_sizes]), ctx.group_sizes)]
    none = [None] * ctx.n_groups  # list inputs take a list of gradients
    dx = [torch.matmul(r, weight) * s for r in r_groups] if need_x else none
    dy = [(r * -s).to(ctx.teacher_dtype) for r in r_groups] if need_y else none
    dw = None
    if need_w:
        x_all = torch.cat([x.reshape(-1, x.shape[-1]) for x in student]) if len(student) > 1 \
            else student[0].reshape(-1, student[0].shape[-1])
        dw = (residual.T @ x_all) * s
    db = (colsum * s).to(ctx.bias_dtype) if need_b else None
    return dx, dy, dw, db, None, None, None


register_autograd(_hidden_mse_op, _backward, _setup_context)
