"""Excluding padded positions: attention_mse(mask_queries=True), hidden_mse(token_mask=...),
distillation_loss(mask_padding=True).  TinyBERT keeps padded query rows and padded tokens; cached
teacher outputs don't store them, so losses on a cache exclude them."""

import pytest
import torch

import tinybert_fast as tbf

from conftest import DEVICE, needs_triton, rel_err

B, H, L, D_S, D_T = 3, 4, 19, 20, 30


def _mask(device=DEVICE):
    m = torch.ones(B, L, device=device)
    m[1, 11:] = 0
    m[2, 3:] = 0
    return m


def _up(*xs):
    return [x.detach().double().requires_grad_(x.requires_grad) for x in xs]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("path", [pytest.param("fused", marks=needs_triton), "reference"])
def test_attention_mask_queries(path, dtype, tol):
    if path == "fused":
        tbf.set_backend("triton" if DEVICE == "cpu" else "auto")
    mask = _mask()
    s = torch.randn(2, B, H, L, L, device=DEVICE).to(dtype).requires_grad_()
    t = torch.randn(2, B, H, L, L, device=DEVICE).to(dtype)
    fn = tbf.attention_mse if path == "fused" else tbf.reference.attention_mse
    loss = fn(s, t, mask, mask_queries=True)
    g, = torch.autograd.grad(loss * 0.7, [s])
    s64, t64 = _up(s, t)
    keep = (mask[:, None, :, None] * mask[:, None, None, :]).double()
    want = ((s64 - t64) * keep).square().mean(dim=(1, 2, 3, 4)).sum()
    gw, = torch.autograd.grad(want * 0.7, [s64])
    assert rel_err(loss, want) < tol and rel_err(g, gw) < tol
    padded_rows = g[:, 2, :, 3:, :]
    assert torch.count_nonzero(padded_rows) == 0
    # without mask_queries the padded query rows contribute
    assert float(fn(s, t, mask).detach()) > float(loss.detach())


@pytest.mark.parametrize("path", [pytest.param("fused", marks=needs_triton), "reference"])
def test_hidden_token_mask(path):
    if path == "fused":
        tbf.set_backend("triton" if DEVICE == "cpu" else "auto")
    mask = _mask()
    x = torch.randn(3, B, L, D_S, device=DEVICE, requires_grad=True)
    y = torch.randn(3, B, L, D_T, device=DEVICE)
    w = (torch.randn(D_T, D_S, device=DEVICE) * D_S ** -0.5).requires_grad_()
    b = torch.randn(D_T, device=DEVICE, requires_grad=True)
    fn = tbf.hidden_mse if path == "fused" else tbf.reference.hidden_mse
    loss = fn(x, y, w, b, token_mask=mask)
    grads = torch.autograd.grad(loss * 1.3, [x, w, b])
    x64, y64, w64, b64 = _up(x, y, w, b)
    r = (x64 @ w64.T + b64 - y64) * mask[..., None].double()
    want = r.square().mean(dim=(1, 2, 3)).sum()
    wants = torch.autograd.grad(want * 1.3, [x64, w64, b64])
    assert rel_err(loss, want) < 1e-5
    for got, exp in zip(grads, wants):
        assert rel_err(got, exp) < 1e-5
    assert torch.count_nonzero(grads[0][:, 2, 3:]) == 0
    with pytest.raises(ValueError, match="token_mask"):
        fn(x, y, w, b, token_mask=mask[:, :5])


def test_cpu_kernels_take_the_new_arguments():
    """The registered ops' PyTorch CPU kernels (backend "auto") agree with the reference."""
    tbf.set_backend("auto")
    mask = _mask("cpu")
    s, t = torch.randn(1, B, H, L, L), torch.randn(1, B, H, L, L)
    got = torch.ops.tinybert_fast.attention_mse([s], [t], mask, 1 / (B * H * L * L), True)[0]
    want = tbf.reference.attention_mse(s[0], t[0], mask, mask_queries=True)
    assert rel_err(got, want) < 1e-6
    x, y, w = torch.randn(2, B * L, D_S), torch.randn(2, B * L, D_T), torch.randn(D_T, D_S)
    got = torch.ops.tinybert_fast.hidden_mse([x], [y], w, None, 1 / (B * L * D_T), False,
                                        mask.reshape(-1))[0]
    want = tbf.reference.hidden_mse(list(x), list(y), w, None, token_mask=mask.reshape(-1))
    assert rel_err(got, want) < 1e-6
    torch.library.opcheck(torch.ops.tinybert_fast.attention_mse.default,
                          ([s.requires_grad_()], [t], mask, 0.5, True, True, False))
    torch.library.opcheck(torch.ops.tinybert_fast.hidden_mse.default,
                          ([x.requires_grad_()], [y], w, None, 0.5, True, mask.reshape(-1)))


def test_distillation_loss_mask_padding():
    mask = _mask("cpu")
    s, t = torch.randn(2, B, H, L, L), torch.randn(2, B, H, L, L)
    x, y, w = torch.randn(3, B, L, D_S), torch.randn(3, B, L, D_T), torch.randn(D_T, D_S)
    out = tbf.distillation_loss(student_attention=s, teacher_attention=t, attention_mask=mask,
                                student_hidden=x, teacher_hidden=y, weight=w, mask_padding=True)
    assert rel_err(out.attention, tbf.reference.attention_mse(s, t, mask, mask_queries=True)) < 1e-6
    assert rel_err(out.hidden, tbf.reference.hidden_mse(x, y, w, token_mask=mask)) < 1e-6
    with pytest.raises(ValueError, match="mask_padding"):
        tbf.distillation_loss(student_attention=s, teacher_attention=t, mask_padding=True)
    with pytest.raises(ValueError, match="mask_queries"):
        tbf.attention_mse(s, t, mask_queries=True)
