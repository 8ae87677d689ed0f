"""What the two ops from Q and K (attention_mse_qk, attention_kl_qk) share: their input checks on
the fused path, their fake gradients and their autograd registration.

Kept apart so that neither op's module imports the other's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..kernels._utils import MAX_HEAD_DIM
from ._autograd import register_autograd


def first_layer(q_s) -> Tensor:
    """The first [B, H, L, d_s] layer of q_s (checked): the backend choice looks at it."""
    layers, _ = reference.qk_layers("q_s", q_s)
    return layers[0]


def qk_inputs(q_s, k_s, q_t, k_t, attention_mask: Tensor | None):
    """reference.qk_inputs for the fused path: the fused dtypes and head dims up to the kernels'
    MAX_HEAD_DIM (128).  Returns (layers, groups, (B, H, L, d_s, d_t)) as that function does."""
    return reference.qk_inputs(q_s, k_s, q_t, k_t, attention_mask, fused=True,
                               max_head_dim=MAX_HEAD_DIM)


def empty_grads(inputs, needs) -> tuple[list[Tensor], ...]:
    """Fake gradients of the four input lists (q_s, k_s, q_t, k_t): empties like each list's
    tensors where needed, [] where not."""
    return tuple([torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in xs] if need else []
                 for xs, need in zip(inputs, needs))


def register_qk_autograd(op, backward_op) -> None:
    """Autograd for an op from Q and K (attention_mse_qk, attention_kl_qk):
    op(q_s, k_s, q_t, k_t, attention_mask, *options) -> (loss, extra), `extra` non-differentiable
    (Grams, row statistics) and kept for backward with the inputs; backward_op(grad, extra, q_s,
    k_s, q_t, k_t, attention_mask, *options, need_q_s, need_k_s, need_q_t, need_k_t) -> the four
    lists of gradients."""

    def setup_context(ctx, inputs, output):
        *groups, attention_mask = inputs[:5]
        _, extra = output
        ctx.options = inputs[5:]
        ctx.n_groups = len(groups[0])
        ctx.has_mask = attention_mask is not None
        ctx.mark_non_differentiable(extra)
        # no zeros_like(extra) for its (absent) gradient: it would double its memory
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(extra, *(x for xs in groups for x in xs),
                              *([attention_mask] if ctx.has_mask else []))

    def backward(ctx, grad, _grad_extra):
        extra, *saved = ctx.saved_tensors
        n = ctx.n_groups
        groups = [saved[i * n:(i + 1) * n] for i in range(4)]
        attention_mask = saved[4 * n] if ctx.has_mask else None
        need = [any(ctx.needs_input_grad[i]) for i in range(4)]
        grads = backward_op(grad, extra, *groups, attention_mask, *ctx.options, *need)
        # list inputs take a list of gradients (None entries where none is needed)
        return (*(g if needed else [None] * n for g, needed in zip(grads, need)),
                None, *(None for _ in ctx.options))

    register_autograd(op, backward, setup_context)
