"""The registered ops' autograd on every torch release admitted (tinybert_fast.ops._autograd).

The dispatcher drops trailing arguments equal to their schema default before autograd sees a
call, and torch 2.11-2.13 require the backward to return one gradient per argument passed (torch
2.14 accepts either): these calls, with the defaults omitted as the dispatcher does, failed there
with "Expected the return from backward to be of the same structure as the inputs"."""

import pytest
import torch

import tinybert_fast as tbf

from conftest import rel_err

ops = torch.ops.tinybert_fast
B, H, L, D_S, D_T = 2, 3, 7, 5, 6


@pytest.fixture(autouse=True)
def _auto_backend():
    previous = tbf.set_backend("auto")  # the registered ops' PyTorch CPU kernels
    yield
    tbf.set_backend(previous)


def test_attention_mse_op_with_defaults_omitted():
    s = torch.randn(1, B, H, L, L, requires_grad=True)
    t = torch.randn(1, B, H, L, L)
    scale = 1 / (B * H * L * L)
    # need_teacher left at its default (the student's gradient is written by the forward)
    loss = ops.attention_mse([s], [t], None, scale, False, True)[0]
    (g,) = torch.autograd.grad(loss * 3.0, [s])
    s_ref = s.detach().double().requires_grad_()
    want = tbf.reference.attention_mse(s_ref[0], t[0].double())
    (g_ref,) = torch.autograd.grad(want * 3.0, [s_ref])
    assert rel_err(loss, want) < 1e-6 and rel_err(g, g_ref) < 1e-6


def test_hidden_mse_op_with_defaults_omitted():
    x = torch.randn(2, B * L, D_S, requires_grad=True)
    y = torch.randn(2, B * L, D_T)
    w = torch.randn(D_T, D_S, requires_grad=True)
    b = torch.randn(D_T, requires_grad=True)
    scale = 1 / (B * L * D_T)
    loss = ops.hidden_mse([x], [y], w, b, scale, True)[0]  # token_mask left at its default
    got = torch.autograd.grad(loss * 3.0, [x, w, b])
    ref = [v.detach().double().requires_grad_() for v in (x, w, b)]
    want = tbf.reference.hidden_mse(list(ref[0]), list(y.double()), ref[1], ref[2])
    expect = torch.autograd.grad(want * 3.0, ref)
    assert rel_err(loss, want) < 1e-6
    for a, e in zip(got, expect):
        assert rel_err(a, e) < 1e-6
