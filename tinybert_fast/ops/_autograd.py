"""How every op here registers its autograd formula (one way, for every torch release admitted).

The dispatcher drops trailing arguments that equal their schema default (e.g. `mask_queries=False`,
`token_mask=None`) before autograd sees a call: `setup_context` gets them back (torch fills the
defaults in), but the backward must return exactly one gradient per argument *passed*.  torch 2.14
also accepts one per schema argument; torch 2.11-2.13 raise "Expected the return from backward to
be of the same structure as the inputs".  So each backward returns one entry per schema argument,
and this wrapper trims it to the arguments of the call (ctx.needs_input_grad has one entry each).
"""

from __future__ import annotations


def register_autograd(op, backward, setup_context) -> None:
    """op.register_autograd(backward, setup_context=setup_context), where `backward` returns one
    gradient (or None) per schema argument of `op`, in order."""

    def backward_for_passed_arguments(ctx, *grads):
        return tuple(backward(ctx, *grads))[:len(ctx.needs_input_grad)]

    op.register_autograd(backward_for_passed_arguments, setup_context=setup_context)
