"""tinybert_fast.hidden_cosine and the ops tinybert_fast::hidden_cosine(_backward)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tinybert_fast as tbf
from conftest import (DEVICE, DTYPES, LOSS_SCALE, ON_CUDA, Tol, assert_fused, assert_rel,
                      check_against_reference, cpu_only, cuda_only, dtype_params, make,
                      needs_triton, opcheck_backends, random_scale, upcast)

ops = torch.ops.tinybert_fast
ref = tbf.reference.hidden_cosine
EPS = tbf.reference.HIDDEN_COSINE_EPS

# (B, L, d_s, d_t): odd sizes; M = 3*37 rows is two row blocks of the fp32 tiles, d_s=100 takes
# several K steps and d_t=130 several N tiles, whose row sums the finish kernel adds; (1, 1, 7, 3)
# is a single token; d_t=2 the narrowest non-degenerate feature (d_t=1: test_single_feature).
SHAPES = [(3, 37, 26, 50), (2, 19, 100, 130), (1, 1, 7, 3), (2, 5, 9, 2)]
SHAPE_IDS = [f"B{b}L{l}ds{ds}dt{dt}" for b, l, ds, dt in SHAPES]
# TinyBERT4 <- BERT-base widths (312 -> 768, six 128-wide N tiles); few tokens and states under
# the interpreter to keep CI short, the training batch on CUDA.
REAL_SHAPE = (4, 128, 312, 768) if ON_CUDA else (2, 24, 312, 768)
REAL_STATES = 5 if ON_CUDA else 2
# Under the interpreter bf16 operands are upcast before tl.dot (kernels/_utils.dot_in_fp32; see
# conftest's note on bf16 GEMMs), so the small shapes run in bf16 on CPU too; bf16 tensor-core
# tiles at the real shape are checked by the CUDA run, as in tests/test_hidden_mse.py.
REAL_DTYPES = dtype_params() if ON_CUDA else [
    pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def states(n, B, L, d, dtype=torch.float32, requires_grad=True, device=DEVICE):
    return make((n, B, L, d), dtype, device, requires_grad)


def projection(d_s, d_t, dtype=torch.float32, requires_grad=True, bias=True, device=DEVICE):
    w = (torch.randn(d_t, d_s, device=device) / d_s ** 0.5).to(dtype).requires_grad_(requires_grad)
    b = make((d_t,), dtype, device, requires_grad, scale=0.1) if bias else None
    return w, b


def padding_mask(B, L, device=DEVICE):
    """[B, L] bool: sequence 0 full, sequence 1 fully padded, the others of random lengths >= 1."""
    lengths = torch.randint(1, L + 1, (B,))
    lengths[0] = L
    if B > 1:
        lengths[1] = 0
    return (torch.arange(L)[None, :] < lengths[:, None]).to(device)


def _fn(x, y, w, b=None):
    return tbf.hidden_cosine(x, y, w, b)


def _ref(x, y, w, b=None):
    return ref(x, y, w, b)


# --- exact formula on hand-computed cases ---------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_hand_computed(backend, device):
    tbf.set_backend(backend)
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]], device=device, requires_grad=True)  # [M=2, d_s=2]
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], device=device, requires_grad=True)
    b = torch.tensor([0.0, 0.0, -1.0], device=device, requires_grad=True)
    y = torch.tensor([[2.0, 4.0, 4.0], [0.0, 1.0, 0.0]], device=device, requires_grad=True)
    # p = x W^T + b = [[1, 2, 2], [3, 0, 2]]: token 0 is parallel to y (cos 1), token 1
    # orthogonal (cos 0): per-token losses 0 and 1
    torch.testing.assert_close(tbf.hidden_cosine(x, y, w, b), torch.tensor(0.5, device=device))
    torch.testing.assert_close(tbf.hidden_cosine(x, y, w, b, reduction="sum"),
                               torch.tensor(1.0, device=device))
    torch.testing.assert_close(tbf.hidden_cosine([x, x], [y, y], w, b),
                               torch.tensor(1.0, device=device))
    # the mask drops token 1: a mean over the one kept token
    keep = torch.tensor([1, 0], device=device)
    torch.testing.assert_close(tbf.hidden_cosine(x, y, w, b, token_mask=keep),
                               torch.tensor(0.0, device=device), atol=1e-7, rtol=0)
    loss = tbf.hidden_cosine(x, y, w, b)
    loss.backward()
    # token 0: p || y, gradient 0; token 1: -(1/2) (y - 0 p) / (|p||y|) = -y / (2 sqrt(13))
    dp = torch.tensor([[0.0, 0.0, 0.0], [0.0, -0.5 / math.sqrt(13.0), 0.0]], device=device)
    dy = torch.tensor([[0.0, 0.0, 0.0], [-1.5 / math.sqrt(13.0), 0.0, -1.0 / math.sqrt(13.0)]],
                      device=device)
    torch.testing.assert_close(x.grad, dp @ w.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, dp.T @ x.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.grad, dp.sum(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(y.grad, dy, rtol=1e-5, atol=1e-7)


def test_reference_matches_torch_cosine_similarity(device):
    """The eager reference is 1 - F.cosine_similarity per token (the same eps)."""
    x, y = states(3, 2, 9, 7, torch.float64), states(3, 2, 9, 11, torch.float64)
    w, b = projection(7, 11, torch.float64)
    p = F.linear(x, w, b)
    want = (1.0 - F.cosine_similarity(p, y, dim=-1, eps=EPS)).mean(dim=(1, 2)).sum()
    torch.testing.assert_close(ref(x, y, w, b).double(), want, rtol=1e-6, atol=0)
    want_sum = (1.0 - F.cosine_similarity(p, y, dim=-1, eps=EPS)).sum()
    torch.testing.assert_close(ref(x, y, w, b, reduction="sum").double(), want_sum, rtol=1e-6,
                               atol=0)


# --- forward and gradients against the float64 reference ------------------------------------------

@pytest.mark.parametrize("n_states", [1, 3])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(fused, shape, dtype, n_states, device):
    B, L, d_s, d_t = shape
    x = states(n_states, B, L, d_s, dtype)
    y = states(n_states, B, L, d_t, dtype)
    w, b = projection(d_s, d_t, dtype)
    loss, _ = check_against_reference(_fn, _ref, [x, y, w, b], DTYPES[dtype])
    assert_fused(loss)


def test_single_feature(fused, device):
    """d_t = 1: cos = sign(p y), so each token's loss is 0 or 2 and every gradient is 0 (it is
    y - cos |y|/|p| p = 0 up to fp32 rounding: compared with an absolute tolerance)."""
    x, y = states(2, 2, 5, 9), states(2, 2, 5, 1)
    w, b = projection(9, 1)
    loss = tbf.hidden_cosine(x, y, w, b, reduction="sum")
    p = x.detach().double() @ w.detach().double().T + b.detach().double()
    want = (1.0 - torch.sign(p * y.detach().double())).sum()
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-5)
    for g in torch.autograd.grad(loss, (x, y, w, b)):
        torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", dtype_params())
def test_no_bias(fused, dtype, device):
    x, y = states(2, 3, 37, 26, dtype), states(2, 3, 37, 50, dtype)
    w, _ = projection(26, 50, dtype, bias=False)
    check_against_reference(_fn, _ref, [x, y, w], DTYPES[dtype])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("as_list", [False, True], ids=["stacked", "list"])
@pytest.mark.parametrize("dtype", dtype_params())
def test_token_mask(fused, dtype, as_list, reduction, device):
    """Padded tokens (one sequence fully padded) are excluded; "mean" is over the kept tokens."""
    n, B, L, d_s, d_t = 2, 4, 19, 26, 50
    x, y = states(n, B, L, d_s, dtype), states(n, B, L, d_t, dtype)
    w, b = projection(d_s, d_t, dtype)
    mask = padding_mask(B, L)
    assert not mask[1].any() and mask[0].all()

    def prep(v):
        return list(v.unbind(0)) if as_list else v

    loss, _ = check_against_reference(
        lambda x, y, w, b: tbf.hidden_cosine(prep(x), prep(y), w, b, reduction, token_mask=mask),
        lambda x, y, w, b: ref(prep(x), prep(y), w, b, reduction, token_mask=mask),
        [x, y, w, b], DTYPES[dtype])
    assert_fused(loss)
    # the same as the loss over the kept tokens alone ([M', d] states)
    keep = mask.reshape(-1)
    xk, yk, wk, bk = upcast([x.reshape(n, -1, d_s)[:, keep], y.reshape(n, -1, d_t)[:, keep], w, b])
    kept = ref(list(xk.unbind(0)), list(yk.unbind(0)), wk, bk, reduction=reduction)
    assert_rel("loss vs kept tokens", loss, kept.double(), DTYPES[dtype].loss)
    # padded tokens get no gradient
    x2, y2 = (t.detach().clone().requires_grad_() for t in (x, y))
    tbf.hidden_cosine(prep(x2), prep(y2), w, b, reduction, token_mask=mask).backward()
    assert (x2.grad[:, 1] == 0).all() and (y2.grad[:, 1] == 0).all()
    assert (x2.grad[:, 0] != 0).any()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32],
                         ids=["bool", "int64", "float"])
def test_token_mask_dtypes_and_flat(fused, mask_dtype, device):
    x, y = states(2, 3, 37, 26), states(2, 3, 37, 50)
    w, b = projection(26, 50)
    mask = padding_mask(3, 37)
    want = ref(*upcast([x, y, w, b]), token_mask=mask).double()
    for m in (mask.to(mask_dtype), mask.to(mask_dtype).reshape(-1)):
        assert_rel("loss", tbf.hidden_cosine(x, y, w, b, token_mask=m), want,
                   DTYPES[torch.float32].loss)


def test_token_mask_all_padded(fused, device):
    """No kept token: "mean" is 0 (not 0/0) and no input gets a gradient."""
    x, y = states(2, 3, 5, 26), states(2, 3, 5, 50)
    w, b = projection(26, 50)
    mask = torch.zeros(3, 5, dtype=torch.bool, device=device)
    for reduction in ("mean", "sum"):
        loss = tbf.hidden_cosine(x, y, w, b, reduction, token_mask=mask)
        assert loss.item() == 0.0
        assert ref(x, y, w, b, reduction, token_mask=mask).item() == 0.0
        for g in torch.autograd.grad(loss, (x, y, w, b)):
            assert torch.isfinite(g).all() and (g == 0).all()


def test_zero_vectors_use_eps(fused, device):
    """Zero projections (p = 0) and zero teacher rows: |.| is clamped to eps, cos = 0, every value
    and gradient finite and equal to the reference (no gradient through a clamped norm)."""
    n, B, L, d_s, d_t = 2, 3, 7, 26, 50
    x, y = make((n, B, L, d_s)), make((n, B, L, d_t))
    with torch.no_grad():
        x[:, 0] = 0.0   # sequence 0: p = b = 0 (no bias below)
        y[:, 1] = 0.0   # sequence 1: zero teacher rows
    w, _ = projection(d_s, d_t, bias=False)
    loss, _ = check_against_reference(_fn, _ref, [x, y, w], DTYPES[torch.float32])
    g = torch.autograd.grad(tbf.hidden_cosine(x, y, w), (x, y, w))
    assert all(torch.isfinite(t).all() for t in g)
    # a state of zero projections only: every token's loss is 1 - 0
    zero = torch.zeros(1, 4, d_s, device=device)
    torch.testing.assert_close(tbf.hidden_cosine(zero, make((1, 4, d_t)), w.detach()),
                               torch.tensor(1.0, device=device))


@pytest.mark.parametrize("n_states", [1, 2, 5])
def test_stacked_list_tuple_agree(fused, n_states, device):
    B, L, d_s, d_t = 3, 37, 26, 50
    x, y = states(n_states, B, L, d_s), states(n_states, B, L, d_t)
    w, b = projection(d_s, d_t)
    forms = {
        "stacked": lambda x, y: tbf.hidden_cosine(x, y, w, b),
        "list": lambda x, y: tbf.hidden_cosine(list(x.unbind(0)), list(y.unbind(0)), w, b),
        "tuple": lambda x, y: tbf.hidden_cosine(tuple(x.unbind(0)), tuple(y.unbind(0)), w, b),
        "list-of-[M,d]": lambda x, y: tbf.hidden_cosine([s.reshape(-1, d_s) for s in x],
                                                        [t.reshape(-1, d_t) for t in y], w, b),
        "stacked+list": lambda x, y: tbf.hidden_cosine(x, list(y.unbind(0)), w, b),
    }
    if n_states == 1:
        forms["[B,L,d]"] = lambda x, y: tbf.hidden_cosine(x[0], y[0], w, b)
        forms["[M,d]"] = lambda x, y: tbf.hidden_cosine(x[0].reshape(-1, d_s),
                                                        y[0].reshape(-1, d_t), w, b)
    g = torch.tensor(random_scale(), device=device)
    results = {}
    for name, fn in forms.items():
        x_, y_ = (t.detach().clone().requires_grad_() for t in (x, y))
        loss = fn(x_, y_)
        assert_fused(loss)
        results[name] = (loss,) + torch.autograd.grad(loss, (x_, y_, w, b), g)
    ref_loss = ref(*upcast([x, y, w, b]))
    want = results["stacked"]
    for name, got in results.items():
        assert_rel(f"{name} loss vs reference", got[0], ref_loss.double(),
                   DTYPES[torch.float32].loss)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7, msg=name)
    check_against_reference(
        lambda x, y, w, b: tbf.hidden_cosine(list(x.unbind(0)), list(y.unbind(0)), w, b),
        lambda x, y, w, b: ref(list(x.unbind(0)), list(y.unbind(0)), w, b),
        [x, y, w, b], DTYPES[torch.float32])


NONCONTIGUOUS = {
    # name: (x base shape, x view, y base shape, y view) from (n, B, L, d_s, d_t)
    "feature-step": (lambda n, B, L, ds, dt: (n, B, L, 2 * ds), lambda x: x[..., ::2],
                     lambda n, B, L, ds, dt: (n, B, L, 3 * dt), lambda y: y[..., 1::3]),
    "batch-major": (lambda n, B, L, ds, dt: (n, L, B, ds), lambda x: x.transpose(1, 2),
                    lambda n, B, L, ds, dt: (n, L, B, dt), lambda y: y.transpose(1, 2)),
    "state-minor": (lambda n, B, L, ds, dt: (B, n, L, ds), lambda x: x.transpose(0, 1),
                    lambda n, B, L, ds, dt: (B, L, n, dt), lambda y: y.permute(2, 0, 1, 3)),
}


@pytest.mark.parametrize("as_list", [False, True], ids=["stacked", "list"])
@pytest.mark.parametrize("kind", list(NONCONTIGUOUS))
def test_noncontiguous(fused, kind, as_list, device):
    n, B, L, d_s, d_t = 2, 3, 37, 26, 50
    xs, xv, ys, yv = NONCONTIGUOUS[kind]
    x = make(xs(n, B, L, d_s, d_t))
    y = make(ys(n, B, L, d_s, d_t))
    w_t = make((d_s, d_t), scale=d_s ** -0.5)  # weight as the transposed view of a [d_s, d_t]
    b_base = make((2 * d_t,), scale=0.1)       # a strided bias
    mask = padding_mask(B, L).t().contiguous().t()  # a [B, L] mask with strides (1, B)
    assert not xv(x).is_contiguous() and not yv(y).is_contiguous()
    assert not w_t.t().is_contiguous() and not mask.is_contiguous()

    def prep(v):
        return list(v.unbind(0)) if as_list else v

    check_against_reference(
        lambda x, y, w, b: tbf.hidden_cosine(prep(xv(x)), prep(yv(y)), w.t(), b[::2],
                                             token_mask=mask),
        lambda x, y, w, b: ref(prep(xv(x)), prep(yv(y)), w.t(), b[::2], token_mask=mask),
        [x, y, w_t, b_base], DTYPES[torch.float32])


REQUIRES = {  # which of (x, y, w, b) require grad
    "student": (True, False, False, False),
    "teacher": (False, True, False, False),
    "weight": (False, False, True, False),
    "bias": (False, False, False, True),
    "student+weight+bias": (True, False, True, True),
    "all": (True, True, True, True),
}


@pytest.mark.parametrize("which", list(REQUIRES))
def test_gradients_only_where_required(fused, which, device):
    flags = REQUIRES[which]
    x = states(2, 3, 37, 26, requires_grad=flags[0])
    y = states(2, 3, 37, 50, requires_grad=flags[1])
    w, b = projection(26, 50)
    w.requires_grad_(flags[2])
    b.requires_grad_(flags[3])
    inputs = [x, y, w, b]
    check_against_reference(_fn, _ref, inputs, DTYPES[torch.float32])
    tbf.hidden_cosine(x, y, w, b).backward()
    for t, f in zip(inputs, flags):
        assert (t.grad is not None) == f


def test_gradients_partial_list(fused, device):
    x = [make((3, 37, 26), requires_grad=i != 1) for i in range(3)]
    y = [make((3, 37, 50), requires_grad=i == 0) for i in range(3)]
    w, b = projection(26, 50, requires_grad=False)
    check_against_reference(lambda *a: tbf.hidden_cosine(list(a[:3]), list(a[3:6]), a[6], a[7]),
                            lambda *a: ref(list(a[:3]), list(a[3:6]), a[6], a[7]),
                            x + y + [w, b], DTYPES[torch.float32])
    tbf.hidden_cosine(x, y, w, b).backward()
    assert x[1].grad is None and y[1].grad is None and y[2].grad is None
    assert x[0].grad is not None and x[2].grad is not None and y[0].grad is not None


def test_no_grad_keeps_no_coefficients(fused, device):
    x, y = states(2, 3, 37, 26), states(2, 3, 37, 50)
    w, b = projection(26, 50)
    with torch.no_grad():
        loss = tbf.hidden_cosine(x, y, w, b)
    assert not loss.requires_grad
    assert_rel("loss", loss, ref(*upcast([x, y, w, b])).double(), DTYPES[torch.float32].loss)
    xd, yd, wd, bd = (t.detach() for t in (x, y, w, b))
    assert not tbf.hidden_cosine(xd, yd, wd, bd).requires_grad


@pytest.mark.parametrize("backend", opcheck_backends())
def test_op_coefficient_contract(backend, device):
    """With save_coef the op returns per token (alpha, beta_p, beta_y) = m * (1/(|p||y|),
    cos/|p|^2, cos/|y|^2) in fp32, 0 on padded tokens."""
    tbf.set_backend(backend)
    n, M, d_s, d_t = 2, 41, 26, 50
    x = make((n, M, d_s), requires_grad=False)
    y = make((n, M, d_t), requires_grad=False)
    w, b = projection(d_s, d_t, requires_grad=False)
    mask = torch.rand(M, device=device) < 0.7
    loss, coef = ops.hidden_cosine([x], [y], w, b, False, True, mask)
    p = (x.double() @ w.double().T + b.double()).reshape(-1, d_t)
    yd = y.double().reshape(-1, d_t)
    npn, nyn = p.norm(dim=1), yd.norm(dim=1)
    cos = (p * yd).sum(1) / (npn * nyn)
    keep = mask.repeat(n).double()
    want = torch.stack([1 / (npn * nyn), cos / npn ** 2, cos / nyn ** 2], 1) * keep[:, None]
    assert coef.shape == (n * M, 3) and coef.dtype == torch.float32
    assert_rel("coef", coef, want, 1e-6)
    assert_rel("loss", loss, ((1 - cos) * keep).sum(), 1e-6)
    loss2, coef2 = ops.hidden_cosine([x], [y], w, b, False, False, mask)
    assert coef2.shape == (0, 3)
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", dtype_params())
def test_reductions(fused, reduction, dtype, device):
    B, L, d_s, d_t = 3, 37, 26, 50
    x, y = states(2, B, L, d_s, dtype), states(2, B, L, d_t, dtype)
    w, b = projection(d_s, d_t, dtype)
    check_against_reference(lambda *a: tbf.hidden_cosine(*a, reduction=reduction),
                            lambda *a: ref(*a, reduction=reduction), [x, y, w, b], DTYPES[dtype])
    with torch.no_grad():
        mean = tbf.hidden_cosine(x, y, w, b, reduction="mean")
        total = tbf.hidden_cosine(x, y, w, b, reduction="sum")
    torch.testing.assert_close(total, mean * (B * L), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float16, id="fp16")])
def test_fp32_projection_with_half_states(fused, dtype, device):
    """An fp32 nn.Linear with half-precision states: W is cast to the states' dtype (as autocast
    would) and its gradient comes back in fp32; the fp32 bias is used as is."""
    x, y = states(2, 3, 37, 26, dtype), states(2, 3, 37, 50, dtype)
    w, b = projection(26, 50, torch.float32)
    check_against_reference(_fn, lambda x, y, w, b: ref(x, y, w.to(dtype).double(), b),
                            [x, y, w, b], Tol(DTYPES[dtype].loss, DTYPES[dtype].grad))
    tbf.hidden_cosine(x, y, w, b).backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    assert x.grad.dtype == dtype and y.grad.dtype == dtype


@pytest.mark.parametrize("dtype", REAL_DTYPES)
def test_real_shape(fused, dtype, device):
    B, L, d_s, d_t = REAL_SHAPE
    x, y = states(REAL_STATES, B, L, d_s, dtype), states(REAL_STATES, B, L, d_t, dtype)
    w, b = projection(d_s, d_t, dtype)
    mask = padding_mask(B, L)
    loss, _ = check_against_reference(
        lambda x, y, w, b: tbf.hidden_cosine(x, y, w, b, token_mask=mask),
        lambda x, y, w, b: ref(x, y, w, b, token_mask=mask), [x, y, w, b], DTYPES[dtype],
        grad_scale=random_scale(1.0, 2.0) * LOSS_SCALE[dtype])
    assert_fused(loss)


# --- bad inputs --------------------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(shape, device=device).to(dtype)


W = lambda: _t(6, 4)  # noqa: E731  [d_t=6, d_s=4]

BAD_INPUTS = {
    "d_s-vs-weight": (lambda: (_t(2, 5, 3), _t(2, 5, 6), W(), None), ValueError, r"student.*d_s = 3"),
    "d_t-vs-weight": (lambda: (_t(2, 5, 4), _t(2, 5, 7), W(), None), ValueError, r"teacher.*d_t = 7"),
    "tokens-mismatch": (lambda: (_t(2, 5, 4), _t(2, 6, 6), W(), None), ValueError, r"tokens"),
    "state-count": (lambda: (_t(2, 2, 5, 4), _t(3, 2, 5, 6), W(), None), ValueError,
                    r"student has 2 states but teacher has 3"),
    "weight-rank": (lambda: (_t(2, 5, 4), _t(2, 5, 6), _t(6, 4, 1), None), ValueError, r"weight"),
    "bias-shape": (lambda: (_t(2, 5, 4), _t(2, 5, 6), W(), _t(4)), ValueError, r"bias.*\[6\]"),
    "student-rank-1": (lambda: (_t(4), _t(6), W(), None), ValueError, r"student"),
    "student-rank-5": (lambda: (_t(1, 2, 2, 5, 4), _t(2, 2, 5, 6), W(), None), ValueError,
                       r"student"),
    "list-item-rank": (lambda: ([_t(5, 4), _t(4)], [_t(5, 6)] * 2, W(), None), ValueError,
                       r"student\[1\]"),
    "int-student": (lambda: (torch.ones(2, 5, 4, dtype=torch.int64, device=DEVICE), _t(2, 5, 6),
                             W(), None), TypeError, r"student"),
    "int-teacher": (lambda: (_t(2, 5, 4), torch.ones(2, 5, 6, dtype=torch.int32, device=DEVICE),
                             W(), None), TypeError, r"teacher"),
    "int-weight": (lambda: (_t(2, 5, 4), _t(2, 5, 6), torch.ones(6, 4, dtype=torch.int64,
                                                                 device=DEVICE), None),
                   TypeError, r"weight"),
    "weight-not-tensor": (lambda: (_t(2, 5, 4), _t(2, 5, 6), [[1.0] * 4] * 6, None), TypeError,
                          r"weight"),
    "empty-list": (lambda: ([], [], W(), None), ValueError, r"student"),
    "list-of-non-tensors": (lambda: ([_t(5, 4), "x"], [_t(5, 6)] * 2, W(), None), TypeError,
                            r"student\[1\]"),
    "zero-tokens": (lambda: (_t(0, 4), _t(0, 6), W(), None), ValueError, r"empty"),
}


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(backend, case):
    tbf.set_backend(backend)
    make_args, exc, match = BAD_INPUTS[case]
    with pytest.raises(exc, match=match):
        tbf.hidden_cosine(*make_args())


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
def test_bad_reduction_and_mask(backend):
    tbf.set_backend(backend)
    with pytest.raises(ValueError, match=r"reduction.*'batchmean'"):
        tbf.hidden_cosine(_t(2, 5, 4), _t(2, 5, 6), W(), reduction="batchmean")
    with pytest.raises(ValueError, match=r"token_mask.*10 tokens.*5 tokens"):
        tbf.hidden_cosine(_t(5, 4), _t(5, 6), W(), token_mask=torch.ones(2, 5, device=DEVICE))
    with pytest.raises(TypeError, match=r"token_mask must be a tensor"):
        tbf.hidden_cosine(_t(5, 4), _t(5, 6), W(), token_mask=[1, 1, 1, 1, 1])


@needs_triton
def test_fused_rejects_float64(fused):
    with pytest.raises(TypeError, match=r"student.*float64"):
        tbf.hidden_cosine(_t(2, 5, 4, dtype=torch.float64), _t(2, 5, 6), W())


@cuda_only
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_mixed_devices(backend):
    tbf.set_backend(backend)
    with pytest.raises(ValueError, match=r"teacher.*cpu"):
        tbf.hidden_cosine(_t(2, 5, 4), _t(2, 5, 6, device="cpu"), W())
    with pytest.raises(ValueError, match=r"weight.*cpu"):
        tbf.hidden_cosine(_t(2, 5, 4), _t(2, 5, 6), _t(6, 4, device="cpu"))
    with pytest.raises(ValueError, match=r"token_mask.*cpu"):
        tbf.hidden_cosine(_t(2, 5, 4), _t(2, 5, 6), W(), token_mask=torch.ones(2, 5))


# --- registered ops ----------------------------------------------------------------------------------

def _op_inputs(requires_grad=True, bias=True):
    x = [make((2, 7, 5), requires_grad=requires_grad), make((1, 7, 5), requires_grad=requires_grad)]
    y = [make((2, 7, 6), requires_grad=requires_grad), make((1, 7, 6), requires_grad=requires_grad)]
    w, b = projection(5, 6, requires_grad=requires_grad, bias=bias)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool, device=DEVICE)
    return x, y, w, b, mask


@cpu_only
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_op_cpu_torch_kernel_matches_reference(torch_cpu_kernels, masked):
    x, y, w, b, mask = _op_inputs()
    mask = mask if masked else None
    check_against_reference(
        lambda x0, x1, y0, y1, w, b: ops.hidden_cosine([x0, x1], [y0, y1], w, b, True, True,
                                                       mask)[0],
        lambda x0, x1, y0, y1, w, b: ref([*x0.unbind(0), *x1.unbind(0)],
                                         [*y0.unbind(0), *y1.unbind(0)], w, b, token_mask=mask),
        [*x, *y, w, b], DTYPES[torch.float32])


@pytest.mark.parametrize("backend", opcheck_backends())
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_opcheck_training(backend, bias, masked):
    tbf.set_backend(backend)
    x, y, w, b, mask = _op_inputs(bias=bias)
    torch.library.opcheck(ops.hidden_cosine.default,
                          (x, y, w, b, True, True, mask if masked else None))


@pytest.mark.parametrize("backend", opcheck_backends())
def test_opcheck_inference(backend):
    tbf.set_backend(backend)
    x, y, w, b, mask = _op_inputs(requires_grad=False)
    torch.library.opcheck(ops.hidden_cosine.default, (x, y, w, b, False, False, mask))


@pytest.mark.parametrize("backend", opcheck_backends())
@pytest.mark.parametrize("needs", [(True, True, True, True), (True, False, False, False),
                                   (False, True, False, False), (False, False, True, True)],
                         ids=["all", "student", "teacher", "weight+bias"])
def test_opcheck_backward_op(backend, needs):
    tbf.set_backend(backend)
    x, y, w, b, mask = _op_inputs(requires_grad=False)
    _, coef = ops.hidden_cosine(x, y, w, b, True, True, mask)
    grad = torch.tensor(random_scale(), device=DEVICE)
    torch.library.opcheck(ops.hidden_cosine_backward.default,
                          (grad, x, y, w, b, coef, True, mask, *needs),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", opcheck_backends())
def test_op_backward_without_coefficients_raises(backend):
    tbf.set_backend(backend)
    x, y, w, b, _ = _op_inputs()
    loss, _ = ops.hidden_cosine(x, y, w, b, True, False)
    with pytest.raises(RuntimeError, match=r"save_coef"):
        loss.backward()


# --- torch.compile ------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("as_list", [False, True], ids=["stacked", "list"])
def test_compile_fullgraph(as_list, device):
    tbf.set_backend("auto" if ON_CUDA else "triton")
    torch._dynamo.reset()
    x, y = states(3, 3, 37, 26), states(3, 3, 37, 50)
    w, b = projection(26, 50)
    mask = padding_mask(3, 37)

    def fn(x, y, w, b):
        if as_list:
            x, y = list(x.unbind(0)), list(y.unbind(0))
        return tbf.hidden_cosine(x, y, w, b, token_mask=mask) * 0.5 + 1.0

    compiled = torch.compile(fn, fullgraph=True)
    inputs2 = [t.detach().clone().requires_grad_() for t in (x, y, w, b)]
    got = compiled(*inputs2)
    want = fn(x, y, w, b)
    assert_fused(want)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    g = torch.tensor(random_scale(), device=device)
    for a, e in zip(torch.autograd.grad(got, inputs2, g),
                    torch.autograd.grad(want, (x, y, w, b), g)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)


def test_op_with_defaults_omitted(torch_cpu_kernels):
    """token_mask left at its default (the dispatcher drops it): one gradient per argument passed
    (tinybert_fast.ops._autograd)."""
    x = make((2, 14, 5), device="cpu")
    y = make((2, 14, 6), device="cpu", requires_grad=False)
    w, b = projection(5, 6, device="cpu")
    loss = ops.hidden_cosine([x], [y], w, b, True, True)[0]
    got = torch.autograd.grad(loss * 3.0, [x, w, b])
    r = upcast([x, w, b])
    want = ref(list(r[0]), list(y.double()), r[1], r[2])
    expect = torch.autograd.grad(want * 3.0, r)
    assert_rel("loss", loss, want.double(), 1e-6)
    for a, e in zip(got, expect):
        assert_rel("grad", a, e, 1e-6)


@pytest.mark.parametrize("backend", ["torch", "auto", pytest.param("triton", marks=needs_triton)])
def test_backend_routing(backend, monkeypatch, device):
    """Backend "torch" (and "auto" on CPU tensors) runs the eager reference; otherwise the op."""
    tbf.set_backend(backend)
    calls = []
    original = tbf.reference.hidden_cosine

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tbf.reference, "hidden_cosine", spy)
    x, y = states(1, 2, 5, 4), states(1, 2, 5, 6)
    w, b = projection(4, 6)
    loss = tbf.hidden_cosine(x, y, w, b)
    expect_reference = backend == "torch" or (backend == "auto" and device == "cpu")
    assert bool(calls) == expect_reference
    if not expect_reference:
        assert_fused(loss)
