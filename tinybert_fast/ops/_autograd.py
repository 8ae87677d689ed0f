"""How every op here registers its autograd formula (one way, for every torch release admitted),
and the pieces shared by the ops whose forward writes their gradients.

The dispatcher drops trailing arguments that equal their schema default (e.g. `mask_queries=False`,
`token_mask=None`) before autograd sees a call: `setup_context` gets them back (torch fills the
defaults in), but the backward must return exactly one gradient per argument *passed*.  torch 2.14
also accepts one per schema argument; torch 2.11-2.13 raise "Expected the return from backward to
be of the same structure as the inputs".  So each backward returns one entry per schema argument,
and this wrapper trims it to the arguments of the call (ctx.needs_input_grad has one entry each).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _checks
from ..kernels._utils import scale_in_place, split_grad_scale


def register_autograd(op, backward, setup_context) -> None:
    """op.register_autograd(backward, setup_context=setup_context), where `backward` returns one
    gradient (or None) per schema argument of `op`, in order."""

    def backward_for_passed_arguments(ctx, *grads):
        return tuple(backward(ctx, *grads))[:len(ctx.needs_input_grad)]

    op.register_autograd(backward_for_passed_arguments, setup_context=setup_context)


# --- gradients computed in the forward pass -----------------------------------------------------
# attention_mse, attention_kl_scores, soft_cross_entropy and kl_divergence write d(loss)/d(input)
# in their forward kernel (for an incoming gradient of 1) when an input requires grad, and return
# it as an output marked non-differentiable; their backward scales it by the incoming gradient in
# place and hands it over.  That saves the second read of the inputs (student and teacher) that a
# separate backward needs: forward + backward moves the compulsory bytes (inputs once, gradients
# once).  The price: a graph through them can be backpropagated once (a second backward with
# retain_graph=True finds the saved gradient modified in place and autograd raises).


@torch.library.custom_op("tinybert_fast::scale_gradients_", mutates_args=("grads",))
def _scale_gradients_op(grads: list[Tensor], grad: Tensor, factor: float = 1.0) -> None:
    scale_in_place(grads, grad, factor)


@_scale_gradients_op.register_fake
def _(grads, grad, factor=1.0):
    return None


@_scale_gradients_op.register_kernel("cpu")
def _(grads, grad, factor=1.0):
    if _backend.cpu_kernel_runs_triton():
        scale_in_place(grads, grad, factor)
        return
    for x in grads:
        x.mul_(grad.to(torch.float32).reshape(()) * factor)


def scaled_gradients(grad: Tensor, grads: list[Tensor], factor: float = 1.0) -> list[Tensor]:
    """`grads` (contiguous gradients the forward wrote for an incoming gradient of 1, divided by
    `factor`: kernels._utils.split_grad_scale) multiplied in place by g * factor, g the incoming
    gradient `grad` (0-dim, read on the device; g * factor == 1 costs no pass).

    While torch.compile / AOTAutograd traces the backward (the tensors are fakes or functional
    wrappers, not plain tensors) the product is out of place instead: a traced graph may also
    return the forward's gradient outputs, which an in-place backward must not change."""
    if not grads:
        return grads
    if type(grad) is not torch.Tensor or torch.compiler.is_compiling():
        return [x * (grad.to(torch.float32).reshape(()) * factor) for x in grads]
    torch.ops.tinybert_fast.scale_gradients_(grads, grad, factor)
    return grads


def needs_grad(x) -> bool:
    """Whether autograd will ask for the gradient of x (a tensor or a list of them)."""
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in x) if isinstance(x, (list, tuple)) else x.requires_grad


def fused_logits_loss(op, student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                      reduction: str) -> Tensor:
    """The fused path of a loss on [..., C] logits (soft_cross_entropy, kl_divergence): checks,
    [N, C] views, the reduction as a scale, and the registered op told which gradients to write."""
    z_s, z_t = _checks.logits_2d(student_logits, teacher_logits, fused=True)
    scale = _checks.logits_scale(z_s, reduction)
    return op(z_s, z_t, temperature, scale, needs_grad(z_s), needs_grad(z_t))[0]


def logits_grad_autograd(op, name: str) -> None:
    """Fake kernel and autograd of a logits op (student, teacher, temperature, scale,
    need_student, need_teacher) -> (loss, dZ_s, dZ_t) whose forward wrote the gradients (an empty
    [0] tensor where not asked for): the backward scales them."""

    @op.register_fake
    def _(student, teacher, temperature, scale, need_student=False, need_teacher=False):
        return (student.new_empty((), dtype=torch.float32),
                student.new_empty(student.shape if need_student else (0,)),
                teacher.new_empty(teacher.shape if need_teacher else (0,)))

    def setup_context(ctx, inputs, output):
        ctx.need = tuple(inputs[4:6]) + (False,) * (6 - len(inputs))
        ctx.factor = split_grad_scale(inputs[3], inputs[0].dtype, inputs[1].dtype)[1]
        _, ds, dt = output
        ctx.mark_non_differentiable(ds, dt)
        ctx.set_materialize_grads(False)  # no zero gradients for the gradient outputs
        ctx.save_for_backward(ds, dt)

    def backward(ctx, grad, _grad_ds, _grad_dt):
        ds, dt = ctx.saved_tensors
        check_computed(name, ctx.needs_input_grad[:2], ctx.need)
        ds, dt = (scaled_gradients(grad, [x], ctx.factor)[0] if need else None
                  for x, need in zip((ds, dt), ctx.need))
        return ds, dt, None, None, None, None

    register_autograd(op, backward, setup_context)


def check_computed(name: str, wanted, computed) -> None:
    """Raise if autograd asks for a gradient the forward was not told to write."""
    if any(w and not c for w, c in zip(wanted, computed)):
        raise RuntimeError(f"{name}: a gradient was asked for that the forward did not compute "
                           "(pass need_student / need_teacher to the op, or call the public "
                           "function, which does)")
