"""Projected hidden-state cosine loss: public function -> registered ops
`tinybert_fast::hidden_cosine` / `tinybert_fast::hidden_cosine_backward` -> kernels
`tinybert_fast.kernels.hidden_cosine` (backward: one kernel that recomputes the projection, then
cuBLAS products).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _checks, reference
from ..kernels import hidden_cosine as kernels
from ._autograd import register_autograd

EPS = reference.HIDDEN_COSINE_EPS


def hidden_cosine(student, teacher, weight: Tensor, bias: Tensor | None = None,
                  reduction: str = "mean", *, token_mask: Tensor | None = None) -> Tensor:
    """Hidden-state cosine loss with one shared projection, summed over states (fp32 scalar).

    Args:
        student: [M, d_s] or [B, L, d_s] (one state), [n_states, B, L, d_s] (stacked), or a
            list/tuple of [..., d_s] tensors (one per mapped state).  float16 / bfloat16 / float32.
        teacher: the same structure with d_t features.
        weight: [d_t, d_s] (nn.Linear layout), cast to the student's dtype as autocast would.
        bias: [d_t] or None.
        reduction: "mean" or "sum".
        token_mask: optional [B, L] (or [M]) mask of each state's tokens, 0 = padding: padded
            tokens are excluded, and "mean" averages over the unmasked tokens (a loss of 0 when
            there are none).

    Per token, with p = x W^T + b (x a student row [d_s]) and y the teacher's row [d_t]:
        cos = <p, y> / (max(|p|, eps) * max(|y|, eps)),  eps = 1e-8
    (as torch.nn.functional.cosine_similarity), and
        "mean": sum_states (1 / M') * sum_m m_m * (1 - cos_m),  M' = M, or sum_m m_m with a mask
        "sum":  sum_states sum_m m_m * (1 - cos_m)
    (m = token_mask != 0, 1 everywhere without one).

    Fused path: one GEMM kernel per stacked tensor (per state for lists) that keeps the row sums
    <p, y>, |p|^2, |y|^2 of each token over the d_t column tiles (X W^T is never written), then
    one small kernel for the loss.  When a gradient is needed it also writes three fp32
    coefficients per token; the backward keeps them, X, Y, W and b.  Backward: one kernel per
    group recomputes P tile by tile (the same GEMM) and writes
    G = d cos / dp = (y - (<p,y>/|p|^2) p) / (|p||y|) and dY, then
    dX = -s G W, dW = -s G^T X, db = -s colsum(G) (s = scale * grad, read on the device).
    """
    _checks.check_reduction(reduction, "hidden")
    s_states, s_stacked = _checks.hidden_states("student", student)
    t_states, t_stacked = _checks.hidden_states("teacher", teacher)
    if not _backend.use_fused(s_states[0]):
        return reference.hidden_cosine(student, teacher, weight, bias, reduction,
                                       token_mask=token_mask)
    _checks.check_hidden(s_states, t_states, weight, bias, fused=True)
    token_mask = _checks.token_mask(token_mask, s_states[0])
    s_groups, t_groups = _checks.launch_groups(s_states, s_stacked, t_states, t_stacked)
    weight = weight.to(s_states[0].dtype)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (*s_groups, *t_groups, weight, bias) if t is not None)
    loss, _ = torch.ops.tinybert_fast.hidden_cosine(s_groups, t_groups, weight, bias,
                                                    reduction == "mean", needs_grad, token_mask)
    return loss


# --- registered ops ------------------------------------------------------------------------------
# Groups are [n, M, d] tensors; token_mask is [M] or None; `mean` selects the reduction's scale
# (1/M, or 1/#kept tokens with a mask, computed on the device; 1 for "sum").  Forward outputs:
# (loss, coef fp32 [sum n*M, 3] = (alpha, beta_p, beta_y) per token, see the kernels' module),
# coef empty [0, 3] unless save_coef.

def _scale(mean: bool, M: int, token_mask: Tensor | None):
    """The reduction's scale: a Python float, or a 0-dim device tensor for a masked mean."""
    if not mean:
        return 1.0
    if token_mask is None:
        return 1.0 / M
    return 1.0 / (token_mask != 0).sum().clamp_min(1).float()


@torch.library.custom_op("tinybert_fast::hidden_cosine", mutates_args=())
def _hidden_cosine_op(student: list[Tensor], teacher: list[Tensor], weight: Tensor,
                      bias: Optional[Tensor], mean: bool, save_coef: bool,
                      token_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    return _triton_forward(student, teacher, weight, bias, mean, save_coef, token_mask)


def _triton_forward(student, teacher, weight, bias, mean, save_coef, token_mask):
    scale = _scale(mean, student[0].shape[1], token_mask)
    in_kernel = scale if isinstance(scale, float) else 1.0
    loss, coef = kernels.hidden_cosine_forward(student, teacher, weight, bias, in_kernel, EPS,
                                               save_coef, token_mask)
    return (loss if isinstance(scale, float) else loss * scale), coef


@_hidden_cosine_op.register_fake
def _(student, teacher, weight, bias, mean, save_coef, token_mask=None):
    x = student[0]
    rows = sum(s.shape[0] * s.shape[1] for s in student) if save_coef else 0
    return (x.new_empty((), dtype=torch.float32),
            x.new_empty((rows, kernels.N_SUMS), dtype=torch.float32))


def _torch_terms(student, teacher, weight, bias, token_mask):
    """(P, Y, per-token (<p,y>, |p|, |y|), keep) in fp32 over all groups' rows, for the CPU
    kernels: P [rows, d_t], Y [rows, d_t]; keep [rows] bool or None."""
    p = torch.cat([(x.float() @ weight.float().T
                    + (0.0 if bias is None else bias.float())).reshape(-1, weight.shape[0])
                   for x in student])
    y = torch.cat([t.float().reshape(-1, weight.shape[0]) for t in teacher])
    keep = None
    if token_mask is not None:
        keep = torch.cat([(token_mask != 0).repeat(t.shape[0]) for t in teacher])
    return p, y, keep


def _torch_coef(p, y, keep):
    norm_p, norm_y = p.norm(dim=1), y.norm(dim=1)
    np_, ny_ = norm_p.clamp_min(EPS), norm_y.clamp_min(EPS)
    alpha = 1.0 / (np_ * ny_)
    cos = (p * y).sum(1) * alpha
    beta_p = torch.where(norm_p > EPS, cos / np_.square(), 0.0)
    beta_y = torch.where(norm_y > EPS, cos / ny_.square(), 0.0)
    coef = torch.stack([alpha, beta_p, beta_y], dim=1)
    if keep is not None:
        coef = coef * keep[:, None]
    return cos, coef


@_hidden_cosine_op.register_kernel("cpu")
def _(student, teacher, weight, bias, mean, save_coef, token_mask=None):
    if _backend.cpu_kernel_runs_triton():
        return _triton_forward(student, teacher, weight, bias, mean, save_coef, token_mask)
    p, y, keep = _torch_terms(student, teacher, weight, bias, token_mask)
    cos, coef = _torch_coef(p, y, keep)
    per_token = 1.0 - cos
    if keep is not None:
        per_token = torch.where(keep, per_token, 0.0)
    loss = per_token.sum() * _scale(mean, student[0].shape[1], token_mask)
    return loss, (coef if save_coef else coef.new_empty((0, kernels.N_SUMS)))


@torch.library.custom_op("tinybert_fast::hidden_cosine_backward", mutates_args=())
def _hidden_cosine_backward_op(grad: Tensor, student: list[Tensor], teacher: list[Tensor],
                               weight: Tensor, bias: Optional[Tensor], coef: Tensor, mean: bool,
                               token_mask: Optional[Tensor], need_student: bool,
                               need_teacher: bool, need_weight: bool, need_bias: bool
                               ) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    return _triton_backward(grad, student, teacher, weight, bias, coef, mean, token_mask,
                            need_student, need_teacher, need_weight, need_bias)


def _flat_student(student):
    return (torch.cat([x.reshape(-1, x.shape[-1]) for x in student]) if len(student) > 1
            else student[0].reshape(-1, student[0].shape[-1]))


def _grads_from_g(g, s, student, weight, bias, group_rows, need_x, need_w, need_b, colsum):
    """dX = -s G W per group, dW = -s G^T X, db = -s colsum (empty tensors where not needed)."""
    neg = -s
    dx = []
    if need_x:
        for gi, x in zip(g.split(group_rows), student):
            dx.append((torch.matmul(gi.view(x.shape[0], x.shape[1], -1), weight) * neg)
                      .to(x.dtype))
    dw = ((g.T @ _flat_student(student)) * neg).to(weight.dtype) if need_w \
        else weight.new_empty((0,))
    db = (colsum * neg).to(bias.dtype) if need_b else weight.new_empty((0,))
    return dx, dw, db


def _triton_backward(grad, student, teacher, weight, bias, coef, mean, token_mask,
                     need_x, need_y, need_w, need_b):
    s = (grad.float() * _scale(mean, student[0].shape[1], token_mask)).reshape(())
    need_g = need_x or need_w or need_b
    g, colsum, dy = kernels.hidden_cosine_backward(s, student, teacher, weight, bias, coef,
                                                   need_g, need_y)
    group_rows = [x.shape[0] * x.shape[1] for x in student]
    dx, dw, db = _grads_from_g(g, s, student, weight, bias, group_rows, need_x, need_w, need_b,
                               colsum.sum(0) if need_b else None)
    return dx, dy, dw, db


@_hidden_cosine_backward_op.register_fake
def _(grad, student, teacher, weight, bias, coef, mean, token_mask, need_student, need_teacher,
      need_weight, need_bias):
    dx = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in student] \
        if need_student else []
    dy = [torch.empty(y.shape, dtype=y.dtype, device=y.device) for y in teacher] \
        if need_teacher else []
    dw = weight.new_empty(weight.shape) if need_weight else weight.new_empty((0,))
    db = bias.new_empty(bias.shape) if need_bias else weight.new_empty((0,))
    return dx, dy, dw, db


@_hidden_cosine_backward_op.register_kernel("cpu")
def _(grad, student, teacher, weight, bias, coef, mean, token_mask, need_student, need_teacher,
      need_weight, need_bias):
    if _backend.cpu_kernel_runs_triton():
        return _triton_backward(grad, student, teacher, weight, bias, coef, mean, token_mask,
                                need_student, need_teacher, need_weight, need_bias)
    s = (grad.float() * _scale(mean, student[0].shape[1], token_mask)).reshape(())
    p, y, _ = _torch_terms(student, teacher, weight, bias, None)
    alpha, beta_p, beta_y = coef.unbind(1)
    g = alpha[:, None] * y - beta_p[:, None] * p
    group_rows = [x.shape[0] * x.shape[1] for x in student]
    dx, dw, db = _grads_from_g(g, s, [x.float() for x in student], weight.float(), bias,
                               group_rows, need_student,
                               need_weight, need_bias, g.sum(0) if need_bias else None)
    dw = dw.to(weight.dtype)
    dx = [d.to(x.dtype) for d, x in zip(dx, student)]
    dy = []
    if need_teacher:
        d = (alpha[:, None] * p - beta_y[:, None] * y) * -s
        # copy=True: the groups' gradients must not be views of one tensor (op outputs alias)
        dy = [di.view(t.shape).to(t.dtype, copy=True)
              for di, t in zip(d.split(group_rows), teacher)]
    return dx, dy, dw, db


def _setup_context(ctx, inputs, output):
    student, teacher, weight, bias, mean, save_coef, token_mask = inputs
    _, coef = output
    ctx.n_groups = len(student)
    ctx.mean = mean
    ctx.saved_coef = save_coef
    ctx.has_bias = bias is not None
    ctx.has_mask = token_mask is not None
    ctx.set_materialize_grads(False)  # coef gets no gradient: don't allocate zeros
    ctx.save_for_backward(coef, weight, *student, *teacher,
                          *([bias] if ctx.has_bias else []),
                          *([token_mask] if ctx.has_mask else []))


def _backward(ctx, grad, _grad_coef):
    if not ctx.saved_coef:
        raise RuntimeError("tinybert_fast::hidden_cosine was called with save_coef=False, so it "
                           "kept nothing for backward; call it with save_coef=True (the public "
                           "tinybert_fast.hidden_cosine decides this from requires_grad)")
    n = ctx.n_groups
    coef, weight, *rest = ctx.saved_tensors
    student, teacher, rest = rest[:n], rest[n:2 * n], rest[2 * n:]
    bias = rest.pop(0) if ctx.has_bias else None
    token_mask = rest.pop(0) if ctx.has_mask else None
    none = [None] * n  # list inputs take a list of gradients
    if grad is None:
        return none, none, None, None, None, None, None
    need_x, need_y, need_w = (any(ctx.needs_input_grad[0]), any(ctx.needs_input_grad[1]),
                              ctx.needs_input_grad[2])
    need_b = ctx.has_bias and ctx.needs_input_grad[3]
    dx, dy, dw, db = torch.ops.tinybert_fast.hidden_cosine_backward(
        grad, student, teacher, weight, bias, coef, ctx.mean, token_mask,
        need_x, need_y, need_w, need_b)
    return (dx if need_x else none, dy if need_y else none, dw if need_w else None,
            db if need_b else None, None, None, None)


register_autograd(_hidden_cosine_op, _backward, _setup_context)
