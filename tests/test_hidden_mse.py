"""tinybert_fast.hidden_mse and the op tinybert_fast::hidden_mse."""

from __future__ import annotations

import pytest
import torch

import tinybert_fast as tbf
from conftest import (DEVICE, DTYPES, LOSS_SCALE, ON_CUDA, OpCheckError, Tol, assert_fused, assert_rel,
                      check_against_reference, cpu_only, cuda_only,
                      dtype_params, make, needs_triton, opcheck_backends, random_scale, upcast)

ops = torch.ops.tinybert_fast
ref = tbf.reference.hidden_mse

# (B, L, d_s, d_t): odd sizes; d_s=100 takes several K steps and d_t=130 several N tiles of the
# GEMM; (1, 1, 7, 3) is a single token; d_t=1 a single output feature.
SHAPES = [(3, 37, 26, 50), (2, 19, 100, 130), (1, 1, 7, 3), (2, 5, 9, 1)]
SHAPE_IDS = [f"B{b}L{l}ds{ds}dt{dt}" for b, l, ds, dt in SHAPES]
# TinyBERT4 <- BERT-base: 5 mapped states (embeddings + 4 layers), batch 4 at length 128.
REAL_SHAPE = (4, 128, 312, 768)
REAL_STATES = 5
REAL_DTYPES = dtype_params() if ON_CUDA else [
    pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]

def states(n, B, L, d, dtype=torch.float32, requires_grad=True, device=DEVICE):
    return make((n, B, L, d), dtype, device, requires_grad)


def projection(d_s, d_t, dtype=torch.float32, requires_grad=True, bias=True, device=DEVICE):
    w = (torch.randn(d_t, d_s, device=device) / d_s ** 0.5).to(dtype).requires_grad_(requires_grad)
    b = make((d_t,), dtype, device, requires_grad, scale=0.1) if bias else None
    return w, b


def _fn(x, y, w, b=None):
    return tbf.hidden_mse(x, y, w, b)


def _ref(x, y, w, b=None):
    return ref(x, y, w, b)


# --- exact formula on a hand-computed case --------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_hand_computed(backend, device):
    tbf.set_backend(backend)
    x = torch.tensor([[1.0, 2.0]], device=device, requires_grad=True)          # [M=1, d_s=2]
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], device=device, requires_grad=True)
    b = torch.tensor([0.5, 0.0, -1.0], device=device, requires_grad=True)
    y = torch.tensor([[1.0, 1.0, 1.0]], device=device, requires_grad=True)
    # x W^T = [1, 2, 3]; + b = [1.5, 2, 2]; - y: R = [0.5, 1, 1]; sum R^2 = 2.25 over M*d_t = 3
    loss = tbf.hidden_mse(x, y, w, b)
    assert loss.item() == 0.75
    assert tbf.hidden_mse(x, y, w, b, reduction="sum").item() == 2.25
    # two states are summed
    assert tbf.hidden_mse([x, x], [y, y], w, b).item() == 1.5
    # no bias: R = [0, 1, 2] -> 5 / 3
    torch.testing.assert_close(tbf.hidden_mse(x, y, w), torch.tensor(5.0 / 3, device=device))
    loss.backward()
    s = 2.0 / 3  # 2 * scale * grad_output
    r = torch.tensor([[0.5, 1.0, 1.0]], device=device)
    torch.testing.assert_close(x.grad, s * r @ w.detach(), rtol=1e-6, atol=0)  # [1, 4/3]
    torch.testing.assert_close(w.grad, s * r.T @ x.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(b.grad, s * r[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(y.grad, -s * r, rtol=1e-6, atol=0)


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


@pytest.mark.parametrize("dtype", dtype_params())
def test_no_bias(fused, dtype, device):
    x, y = states(2, 3, 37, 26, dtype), states(2, 3, 37, 50, dtype)
    w, _ = projection(26, 50, dtype, bias=False)
    check_against_reference(_fn, _ref, [x, y, w], DTYPES[dtype])


@pytest.mark.parametrize("n_states", [1, 2, 3, 4, 5])
def test_stacked_list_tuple_agree(fused, n_states, device):
    B, L, d_s, d_t = 3, 37, 26, 50
    x, y = states(n_states, B, L, d_s), states(n_states, B, L, d_t)
    w, b = projection(d_s, d_t)
    forms = {
        "stacked": lambda x, y: tbf.hidden_mse(x, y, w, b),
        "list": lambda x, y: tbf.hidden_mse(list(x.unbind(0)), list(y.unbind(0)), w, b),
        "tuple": lambda x, y: tbf.hidden_mse(tuple(x.unbind(0)), tuple(y.unbind(0)), w, b),
        "list-of-[M,d]": lambda x, y: tbf.hidden_mse([s.reshape(-1, d_s) for s in x],
                                                     [t.reshape(-1, d_t) for t in y], w, b),
        "stacked+list": lambda x, y: tbf.hidden_mse(x, list(y.unbind(0)), w, b),
    }
    if n_states == 1:
        forms["[B,L,d]"] = lambda x, y: tbf.hidden_mse(x[0], y[0], w, b)
        forms["[M,d]"] = lambda x, y: tbf.hidden_mse(x[0].reshape(-1, d_s),
                                                     y[0].reshape(-1, d_t), w, b)
    g = torch.tensor(random_scale(), device=device)
    results = {}
    for name, fn in forms.items():
        x_, y_ = (t.detach().clone().requires_grad_() for t in (x, y))
        loss = fn(x_, y_)
        results[name] = (loss,) + torch.autograd.grad(loss, (x_, y_, w, b), g)
    ref_loss = ref(*upcast([x, y, w, b]))
    want = results["stacked"]
    for name, got in results.items():
        assert_rel(f"{name} loss vs reference", got[0], ref_loss.double(), DTYPES[torch.float32].loss)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7, msg=name)
    check_against_reference(
        lambda x, y, w, b: tbf.hidden_mse(list(x.unbind(0)), list(y.unbind(0)), w, b),
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
    b = make((d_t,), scale=0.1)
    assert not xv(x).is_contiguous() and not yv(y).is_contiguous()
    assert not w_t.t().is_contiguous()

    def prep(v):
        return list(v.unbind(0)) if as_list else v

    check_against_reference(lambda x, y, w, b: tbf.hidden_mse(prep(xv(x)), prep(yv(y)), w.t(), b),
                            lambda x, y, w, b: ref(prep(xv(x)), prep(yv(y)), w.t(), b),
                            [x, y, w_t, b], DTYPES[torch.float32])


def test_strided_bias(fused, device):
    x, y = states(2, 3, 37, 26), states(2, 3, 37, 50)
    w, _ = projection(26, 50)
    b_base = make((100,), scale=0.5)
    check_against_reference(lambda x, y, w, b: tbf.hidden_mse(x, y, w, b[::2]),
                            lambda x, y, w, b: ref(x, y, w, b[::2]), [x, y, w, b_base],
                            DTYPES[torch.float32])


@cpu_only
def test_strided_bias_reference_path(device):
    """The same strided bias through the registered op's CPU kernel."""
    tbf.set_backend("auto")
    x, y = states(2, 3, 37, 26), states(2, 3, 37, 50)
    w, _ = projection(26, 50)
    b = make((100,), scale=0.5)[::2]
    want = ref(*upcast([x, y, w]), b.detach().double())
    assert_rel("loss", ops.hidden_mse([x.reshape(2, -1, 26)], [y.reshape(2, -1, 50)], w, b,
                                      1.0 / (3 * 37 * 50), False)[0], want.double(), 1e-6)


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
    tbf.hidden_mse(x, y, w, b).backward()
    for t, f in zip(inputs, flags):
        assert (t.grad is not None) == f


def test_gradients_partial_list(fused, device):
    x = [make((3, 37, 26), requires_grad=i != 1) for i in range(3)]
    y = [make((3, 37, 50), requires_grad=i == 0) for i in range(3)]
    w, b = projection(26, 50, requires_grad=False)
    check_against_reference(lambda *a: tbf.hidden_mse(list(a[:3]), list(a[3:6]), a[6], a[7]),
                            lambda *a: ref(list(a[:3]), list(a[3:6]), a[6], a[7]),
                            x + y + [w, b], DTYPES[torch.float32])
    tbf.hidden_mse(x, y, w, b).backward()
    assert x[1].grad is None and y[1].grad is None and y[2].grad is None
    assert x[0].grad is not None and x[2].grad is not None and y[0].grad is not None


def test_no_grad_keeps_no_residual(fused, device):
    x, y = states(2, 3, 37, 26), states(2, 3, 37, 50)
    w, b = projection(26, 50)
    with torch.no_grad():
        loss = tbf.hidden_mse(x, y, w, b)
    assert not loss.requires_grad
    assert_rel("loss", loss, ref(*upcast([x, y, w, b])).double(), DTYPES[torch.float32].loss)
    # nothing requires grad: the public function asks the op to keep no residual
    xd, yd, wd, bd = (t.detach() for t in (x, y, w, b))
    assert not tbf.hidden_mse(xd, yd, wd, bd).requires_grad


@needs_triton
def test_op_residual_contract(fused, device):
    """With save_residual the op returns R = X W^T + b - Y (student dtype) and colsum(R)."""
    n, M, d_s, d_t = 2, 41, 26, 50
    x = make((n, M, d_s), requires_grad=False)
    y = make((n, M, d_t), requires_grad=False)
    w, b = projection(d_s, d_t, requires_grad=False)
    loss, residual, colsum = ops.hidden_mse([x], [y], w, b, 0.5, True)
    r = (x.double() @ w.double().T + b.double() - y.double()).reshape(-1, d_t)
    assert residual.shape == (n * M, d_t) and residual.dtype == x.dtype
    assert colsum.shape == (d_t,) and colsum.dtype == torch.float32
    assert_rel("residual", residual, r, 1e-6)
    assert_rel("colsum", colsum, r.sum(0), 1e-5)
    assert_rel("loss", loss, 0.5 * r.square().sum(), 1e-6)
    loss2, residual2, _ = ops.hidden_mse([x], [y], w, b, 0.5, False)
    assert residual2.numel() == 0
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", dtype_params())
def test_reductions(fused, reduction, dtype, device):
    B, L, d_s, d_t = 3, 37, 26, 50
    x, y = states(2, B, L, d_s, dtype), states(2, B, L, d_t, dtype)
    w, b = projection(d_s, d_t, dtype)
    check_against_reference(lambda *a: tbf.hidden_mse(*a, reduction=reduction),
                            lambda *a: ref(*a, reduction=reduction), [x, y, w, b], DTYPES[dtype])
    with torch.no_grad():
        mean = tbf.hidden_mse(x, y, w, b, reduction="mean")
        total = tbf.hidden_mse(x, y, w, b, reduction="sum")
    torch.testing.assert_close(total, mean * (B * L * d_t), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float16, id="fp16")])
def test_fp32_projection_with_half_states(fused, dtype, device):
    """An fp32 nn.Linear with half-precision states: W is cast to the states' dtype (as autocast
    would) and its gradient comes back in fp32; the fp32 bias is used as is."""
    x, y = states(2, 3, 37, 26, dtype), states(2, 3, 37, 50, dtype)
    w, b = projection(26, 50, torch.float32)
    check_against_reference(_fn, lambda x, y, w, b: ref(x, y, w.to(dtype).double(), b),
                            [x, y, w, b], Tol(DTYPES[dtype].loss, DTYPES[dtype].grad))
    tbf.hidden_mse(x, y, w, b).backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    assert x.grad.dtype == dtype


@pytest.mark.parametrize("dtype", REAL_DTYPES)
def test_real_shape(fused, dtype, device):
    B, L, d_s, d_t = REAL_SHAPE
    x, y = states(REAL_STATES, B, L, d_s, dtype), states(REAL_STATES, B, L, d_t, dtype)
    w, b = projection(d_s, d_t, dtype)
    loss, _ = check_against_reference(_fn, _ref, [x, y, w, b], DTYPES[dtype],
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
    "student-rank-5": (lambda: (_t(1, 2, 2, 5, 4), _t(2, 2, 5, 6), W(), None), ValueError, r"student"),
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
    "empty-teacher-list": (lambda: (_t(2, 5, 4), [], W(), None), ValueError, r"teacher"),
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
        tbf.hidden_mse(*make_args())


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
def test_bad_reduction(backend):
    tbf.set_backend(backend)
    with pytest.raises(ValueError, match=r"reduction.*'batchmean'"):
        tbf.hidden_mse(_t(2, 5, 4), _t(2, 5, 6), W(), reduction="batchmean")


@needs_triton
def test_fused_rejects_float64(fused):
    with pytest.raises(TypeError, match=r"student.*float64"):
        tbf.hidden_mse(_t(2, 5, 4, dtype=torch.float64), _t(2, 5, 6), W())


@cuda_only
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_mixed_devices(backend):
    tbf.set_backend(backend)
    with pytest.raises(ValueError, match=r"teacher.*cpu"):
        tbf.hidden_mse(_t(2, 5, 4), _t(2, 5, 6, device="cpu"), W())
    with pytest.raises(ValueError, match=r"weight.*cpu"):
        tbf.hidden_mse(_t(2, 5, 4), _t(2, 5, 6), _t(6, 4, device="cpu"))
    with pytest.raises(ValueError, match=r"bias.*cpu"):
        tbf.hidden_mse(_t(2, 5, 4), _t(2, 5, 6), W(), _t(6, device="cpu"))


# --- registered op -----------------------------------------------------------------------------------

def _op_inputs(requires_grad=True, bias=True):
    x = [make((2, 7, 5), requires_grad=requires_grad), make((1, 7, 5), requires_grad=requires_grad)]
    y = [make((2, 7, 6), requires_grad=requires_grad), make((1, 7, 6), requires_grad=requires_grad)]
    w, b = projection(5, 6, requires_grad=requires_grad, bias=bias)
    return x, y, w, b, 1.0 / (7 * 6)


@cpu_only
def test_op_cpu_torch_kernel_matches_reference(torch_cpu_kernels):
    x, y, w, b, scale = _op_inputs()
    inputs = [*x, *y, w, b]
    check_against_reference(
        lambda x0, x1, y0, y1, w, b: ops.hidden_mse([x0, x1], [y0, y1], w, b, scale, True)[0],
        lambda x0, x1, y0, y1, w, b: ref([*x0.unbind(0), *x1.unbind(0)],
                                         [*y0.unbind(0), *y1.unbind(0)], w, b),
        inputs, DTYPES[torch.float32])


@pytest.mark.parametrize("backend", opcheck_backends())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_opcheck_training(backend, bias):
    tbf.set_backend(backend)
    x, y, w, b, scale = _op_inputs(bias=bias)
    torch.library.opcheck(ops.hidden_mse.default, (x, y, w, b, scale, True))


def _no_residual_params():
    return opcheck_backends()


@pytest.mark.parametrize("backend", _no_residual_params())
def test_opcheck_inference(backend):
    tbf.set_backend(backend)
    x, y, w, b, scale = _op_inputs(requires_grad=False)
    torch.library.opcheck(ops.hidden_mse.default, (x, y, w, b, scale, False))


@pytest.mark.parametrize("backend", opcheck_backends())
def test_op_backward_without_residual_raises(backend):
    tbf.set_backend(backend)
    x, y, w, b, scale = _op_inputs()
    loss, _, _ = ops.hidden_mse(x, y, w, b, scale, False)
    with pytest.raises(RuntimeError, match=r"save_residual"):
        loss.backward()


# --- torch.compile ------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("as_list", [False, True], ids=["stacked", "list"])
def test_compile_fullgraph(as_list, device):
    tbf.set_backend("auto" if ON_CUDA else "triton")
    torch._dynamo.reset()
    x, y = states(3, 3, 37, 26), states(3, 3, 37, 50)
    w, b = projection(26, 50)

    def fn(x, y, w, b):
        if as_list:
            x, y = list(x.unbind(0)), list(y.unbind(0))
        return tbf.hidden_mse(x, y, w, b) * 0.5 + 1.0

    compiled = torch.compile(fn, fullgraph=True)
    inputs2 = [t.detach().clone().requires_grad_() for t in (x, y, w, b)]
    got = compiled(*inputs2)
    want = fn(x, y, w, b)
    assert_fused(want)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    g = torch.tensor(random_scale(), device=device)
    for a, e in zip(torch.autograd.grad(got, inputs2, g), torch.autograd.grad(want, (x, y, w, b), g)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)
