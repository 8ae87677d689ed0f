"""tinybert_fast.soft_cross_entropy and the ops tinybert_fast::soft_cross_entropy(_backward)."""

from __future__ import annotations

import math

import pytest
import torch

import tinybert_fast as tbf
from conftest import (DEVICE, DTYPES, ON_CUDA, Tol, assert_fused, assert_rel,
                      check_against_reference, cpu_only, cuda_only, dtype_params, make,
                      needs_triton, opcheck_backends, random_scale, upcast)

ops = torch.ops.tinybert_fast
ref = tbf.reference.soft_cross_entropy

# (N, C): odd class counts; 30522 (BERT's vocabulary) spans several 4096-wide column tiles of the
# online softmax, 5000 two; 2 and 3 are the GLUE label counts.
SHAPES = [(6, 1271), (37, 2), (5, 3), (4, 30522), (3, 5000)]
SHAPE_IDS = [f"N{n}C{c}" for n, c in SHAPES]
# Task step 2 on a binary task: 32 x 128 rows of 2 classes; and an MLM-style vocabulary.
REAL_SHAPES = [((32 * 128, 2), list(DTYPES)),
               ((64, 30522), list(DTYPES) if ON_CUDA else [torch.float32])]
REAL_PARAMS = [pytest.param(shape, dt, id=f"N{shape[0]}C{shape[1]}-{str(dt)[6:]}")
               for shape, dts in REAL_SHAPES for dt in dts]
TEMPERATURES = [1.0, 2.0, 0.5]


def grad_scale(dtype, N, C, reduction="mean"):
    """grad_output for a test: random, != 1; for float16 large enough (loss scaling, as AMP does)
    that the gradient entries g * scale / T * (p_s - p_t), with p ~ 1/C, are not fp16
    subnormals: g * scale ~ C."""
    g = random_scale(1.0, 2.0)
    if dtype != torch.float16:
        return g
    scale = {"mean": 1.0 / (N * C), "batchmean": 1.0 / N, "sum": 1.0}[reduction]
    return g * C / scale


def logits(shape, dtype=torch.float32, requires_grad=True, scale=2.0, device=DEVICE):
    return make(shape, dtype, device, requires_grad, scale=scale)


# --- exact formula on hand-computed cases ------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_hand_computed(backend, device):
    tbf.set_backend(backend)
    ln3 = math.log(3.0)
    # teacher uniform over 2 classes, student softmax = [1/4, 3/4]:
    # ce = -(1/2)(ln 1/4 + ln 3/4); TinyBERT's "mean" divides by N*C = 2
    zs = torch.tensor([[0.0, ln3]], device=device, requires_grad=True)
    zt = torch.tensor([[1.5, 1.5]], device=device, requires_grad=True)
    ce = -0.5 * (math.log(0.25) + math.log(0.75))
    loss = tbf.soft_cross_entropy(zs, zt)
    assert loss.item() == pytest.approx(ce / 2, rel=1e-6)
    assert tbf.soft_cross_entropy(zs, zt, reduction="batchmean").item() == pytest.approx(ce, rel=1e-6)
    assert tbf.soft_cross_entropy(zs, zt, reduction="sum").item() == pytest.approx(ce, rel=1e-6)
    # temperature 2 on logits twice as large is the same distribution; no T^2 factor
    loss_t = tbf.soft_cross_entropy(zs.detach() * 2, zt.detach() * 2, temperature=2.0)
    assert loss_t.item() == pytest.approx(ce / 2, rel=1e-6)
    loss.backward()
    # d/dz_s = (softmax(z_s) - p_t) / (N*C) = ([1/4, 3/4] - [1/2, 1/2]) / 2
    torch.testing.assert_close(zs.grad, torch.tensor([[-0.125, 0.125]], device=device))
    # d/dz_t = -p_t (log_softmax(z_s) + ce) / (N*C)
    want_t = torch.tensor([[-0.5 * (math.log(0.25) + ce) / 2, -0.5 * (math.log(0.75) + ce) / 2]],
                          device=device)
    torch.testing.assert_close(zt.grad, want_t)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_single_class_is_zero(backend, device):
    """C = 1: both softmaxes are 1, log_softmax is 0, so the loss and its gradients are 0."""
    tbf.set_backend(backend)
    zs, zt = logits((7, 1)), logits((7, 1))
    loss = tbf.soft_cross_entropy(zs, zt)
    assert loss.item() == 0.0
    gs, gt = torch.autograd.grad(loss, (zs, zt))
    # fp32 rounding of lse(x) vs x leaves ~1e-8 (log_softmax computed as x - lse)
    assert gs.abs().max() <= 1e-6 and gt.abs().max() <= 1e-6


# --- forward and gradients against the float64 reference ------------------------------------------------

@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(fused, shape, dtype, device):
    zs, zt = logits(shape, dtype), logits(shape, dtype)
    loss, _ = check_against_reference(tbf.soft_cross_entropy, ref, [zs, zt], DTYPES[dtype],
                                      grad_scale=grad_scale(dtype, *shape))
    assert_fused(loss)


@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", dtype_params())
def test_temperature_and_reduction(fused, dtype, temperature, reduction, device):
    zs, zt = logits((9, 1271), dtype, scale=4.0), logits((9, 1271), dtype, scale=4.0)
    check_against_reference(
        lambda a, b: tbf.soft_cross_entropy(a, b, temperature, reduction),
        lambda a, b: ref(a, b, temperature, reduction), [zs, zt], DTYPES[dtype],
        grad_scale=grad_scale(dtype, 9, 1271, reduction))


def test_reductions_relate(fused, device):
    N, C = 9, 1271
    zs, zt = logits((N, C)), logits((N, C))
    with torch.no_grad():
        mean = tbf.soft_cross_entropy(zs, zt, reduction="mean")
        batchmean = tbf.soft_cross_entropy(zs, zt, reduction="batchmean")
        total = tbf.soft_cross_entropy(zs, zt, reduction="sum")
    torch.testing.assert_close(batchmean, mean * C, rtol=1e-6, atol=0)
    torch.testing.assert_close(total, mean * (N * C), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", dtype_params())
def test_large_logits_are_stable(fused, dtype, device):
    """Logits in the hundreds must not overflow the softmaxes (exp(600) overflows fp32).

    Only the student's gradient is checked: the teacher's, -p_t (log_softmax(z_s) + ce), is a
    difference of two numbers in the hundreds whose true value is tiny when p_t is one-hot, so
    it is ill-conditioned in fp32 (the fp32 reference has the same error)."""
    big = 300.0
    zs = logits((5, 3000), dtype, scale=big / 4)
    zt = logits((5, 3000), dtype, scale=big / 4, requires_grad=False)
    tol = DTYPES[dtype]
    if dtype == torch.bfloat16:
        # grad_output != 1: the gradient is rounded to bf16 twice (written by the forward for
        # g = 1, then scaled by g in place), up to twice the error of one rounding
        tol = Tol(tol.loss, 1.6e-2)
    loss, _ = check_against_reference(lambda a, b: tbf.soft_cross_entropy(a, b, 0.5),
                                      lambda a, b: ref(a, b, 0.5), [zs, zt], tol,
                                      grad_scale=grad_scale(dtype, 5, 3000))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("rank", [1, 3, 4])
def test_leading_dims(fused, rank, device):
    """[..., C] logits are flattened to rows: [C], [B, L, C], [2, B, L, C]."""
    shape = {1: (1271,), 3: (3, 5, 1271), 4: (2, 3, 5, 7)}[rank]
    zs, zt = logits(shape), logits(shape)
    check_against_reference(tbf.soft_cross_entropy, ref, [zs, zt], DTYPES[torch.float32])
    flat = tbf.soft_cross_entropy(zs.reshape(-1, shape[-1]), zt.reshape(-1, shape[-1]))
    torch.testing.assert_close(tbf.soft_cross_entropy(zs, zt), flat, rtol=1e-6, atol=0)


NONCONTIGUOUS = {
    # name: (base shape from (N, C), view)
    "transposed": (lambda N, C: (C, N), lambda x: x.t()),
    "class-step": (lambda N, C: (N, 2 * C), lambda x: x[:, ::2]),
    "row-step": (lambda N, C: (3 * N, C), lambda x: x[1::3]),
    "3d-permuted": (lambda N, C: (C, N, 1), lambda x: x.permute(2, 1, 0)),
}


@pytest.mark.parametrize("shape", [(6, 1271), (37, 2), (3, 5000)], ids=["C1271", "C2", "C5000"])
@pytest.mark.parametrize("kind", list(NONCONTIGUOUS))
def test_noncontiguous(fused, kind, shape, device):
    base, view = NONCONTIGUOUS[kind]
    zs, zt = logits(base(*shape)), logits(base(*shape))
    assert not view(zs).is_contiguous() or shape[0] == 1
    check_against_reference(lambda a, b: tbf.soft_cross_entropy(view(a), view(b), 2.0),
                            lambda a, b: ref(view(a), view(b), 2.0), [zs, zt],
                            DTYPES[torch.float32])


@pytest.mark.parametrize("which", ["student", "teacher", "both"])
def test_gradients_only_where_required(fused, which, device):
    zs = logits((6, 1271), requires_grad=which in ("student", "both"))
    zt = logits((6, 1271), requires_grad=which in ("teacher", "both"))
    check_against_reference(lambda a, b: tbf.soft_cross_entropy(a, b, 2.0),
                            lambda a, b: ref(a, b, 2.0), [zs, zt], DTYPES[torch.float32])
    tbf.soft_cross_entropy(zs, zt, 2.0).backward()
    assert (zs.grad is None) == (which == "teacher")
    assert (zt.grad is None) == (which == "student")


def test_mixed_student_teacher_dtypes(fused, device):
    zs = logits((6, 1271), torch.float32)
    zt = logits((6, 1271), torch.bfloat16)
    check_against_reference(tbf.soft_cross_entropy, ref, [zs, zt], DTYPES[torch.bfloat16])


@pytest.mark.parametrize("shape, dtype", REAL_PARAMS)
def test_real_shape(fused, shape, dtype, device):
    zs, zt = logits(shape, dtype), logits(shape, dtype)
    loss, _ = check_against_reference(tbf.soft_cross_entropy, ref, [zs, zt], DTYPES[dtype],
                                      grad_scale=grad_scale(dtype, *shape))
    assert_fused(loss)


# --- bad inputs --------------------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(shape, device=device).to(dtype)


BAD_INPUTS = {
    # name: (lambda -> (args, kwargs), exception, regex)
    "C-mismatch": (lambda: ((_t(4, 5), _t(4, 6)), {}), ValueError, r"student_logits.*teacher_logits"),
    "N-mismatch": (lambda: ((_t(4, 5), _t(3, 5)), {}), ValueError, r"same shape"),
    "rank-mismatch": (lambda: ((_t(4, 5), _t(1, 4, 5)), {}), ValueError, r"same shape"),
    "scalar": (lambda: ((_t(), _t()), {}), ValueError, r"non-empty"),
    "empty": (lambda: ((_t(0, 5), _t(0, 5)), {}), ValueError, r"non-empty"),
    "int-student": (lambda: ((torch.ones(4, 5, dtype=torch.int64, device=DEVICE), _t(4, 5)), {}),
                    TypeError, r"student_logits"),
    "int-teacher": (lambda: ((_t(4, 5), torch.ones(4, 5, dtype=torch.int64, device=DEVICE)), {}),
                    TypeError, r"teacher_logits"),
    "student-not-tensor": (lambda: (([[1.0, 2.0]], _t(1, 2)), {}), TypeError, r"student_logits"),
    "teacher-not-tensor": (lambda: ((_t(1, 2), [[1.0, 2.0]]), {}), TypeError, r"teacher_logits"),
    "temperature-0": (lambda: ((_t(4, 5), _t(4, 5)), {"temperature": 0.0}), ValueError,
                      r"temperature must be > 0"),
    "temperature-negative": (lambda: ((_t(4, 5), _t(4, 5)), {"temperature": -2.0}), ValueError,
                             r"temperature must be > 0; got -2.0"),
    "temperature-nan": (lambda: ((_t(4, 5), _t(4, 5)), {"temperature": float("nan")}), ValueError,
                        r"temperature"),
    "temperature-tensor": (lambda: ((_t(4, 5), _t(4, 5)), {"temperature": torch.tensor(2.0)}),
                           TypeError, r"temperature"),
    "temperature-str": (lambda: ((_t(4, 5), _t(4, 5)), {"temperature": "2"}), TypeError,
                        r"temperature"),
    "reduction": (lambda: ((_t(4, 5), _t(4, 5)), {"reduction": "none"}), ValueError,
                  r"reduction.*'none'"),
}


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(backend, case):
    tbf.set_backend(backend)
    make_args, exc, match = BAD_INPUTS[case]
    args, kwargs = make_args()
    with pytest.raises(exc, match=match):
        tbf.soft_cross_entropy(*args, **kwargs)


def test_integer_temperature_accepted(device):
    zs, zt = _t(4, 5), _t(4, 5)
    torch.testing.assert_close(tbf.soft_cross_entropy(zs, zt, 2), tbf.soft_cross_entropy(zs, zt, 2.0))


@needs_triton
def test_fused_rejects_float64(fused):
    with pytest.raises(TypeError, match=r"student_logits.*float64"):
        tbf.soft_cross_entropy(_t(4, 5, dtype=torch.float64), _t(4, 5, dtype=torch.float64))


@cuda_only
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_mixed_devices(backend):
    tbf.set_backend(backend)
    with pytest.raises(ValueError, match=r"teacher_logits.*cpu"):
        tbf.soft_cross_entropy(_t(4, 5), _t(4, 5, device="cpu"))


# --- registered ops ----------------------------------------------------------------------------------

@cpu_only
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_op_cpu_torch_kernel_matches_reference(torch_cpu_kernels, temperature):
    zs, zt = logits((6, 1271)), logits((6, 1271))
    N, C = zs.shape
    check_against_reference(
        lambda a, b: ops.soft_cross_entropy(a, b, temperature, 1.0 / (N * C), True, True)[0],
        lambda a, b: ref(a, b, temperature), [zs, zt], DTYPES[torch.float32])


def _op_inputs(requires_grad=True, N=5, C=37):
    return logits((N, C), requires_grad=requires_grad), logits((N, C), requires_grad=requires_grad)


@pytest.mark.parametrize("backend", opcheck_backends())
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_opcheck_forward(backend, temperature):
    tbf.set_backend(backend)
    zs, zt = _op_inputs()
    # the inputs require grad: the op is told to write their gradients (as the public function does)
    torch.library.opcheck(ops.soft_cross_entropy.default, (zs, zt, temperature, 0.1, True, True))


@pytest.mark.parametrize("backend", opcheck_backends())
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["ds+dt", "ds", "dt", "none"])
@pytest.mark.parametrize("C", [37, 5000], ids=["one-tile", "two-tiles"])
def test_opcheck_forward_with_gradients(backend, need, C):
    tbf.set_backend(backend)
    zs, zt = _op_inputs(requires_grad=False, C=C)
    torch.library.opcheck(ops.soft_cross_entropy.default, (zs, zt, 2.0, 0.1, *need))


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("C", [1271, 5000], ids=["one-tile", "two-tiles"])
def test_op_gradient_outputs(backend, C, device):
    """The forward's gradient outputs (incoming gradient 1) against float64 autograd of the
    reference; an empty tensor where a gradient is not requested; through autograd with
    grad_output != 1 they are scaled in place."""
    tbf.set_backend(backend)
    T, N = 0.5, 5
    zs, zt = _op_inputs(requires_grad=False, N=N, C=C)
    loss, ds, dt = ops.soft_cross_entropy(zs, zt, T, 1.0 / N, True, True)
    a, b = upcast([zs, zt])
    a.requires_grad_(), b.requires_grad_()
    want_loss = ref(a, b, T, "batchmean")
    want = torch.autograd.grad(want_loss, (a, b))
    assert_rel("loss", loss, want_loss, 1e-5)
    assert_rel("d student", ds, want[0], 1e-5)
    assert_rel("d teacher", dt, want[1], 1e-5)
    _, ds, dt = ops.soft_cross_entropy(zs, zt, T, 1.0 / N, False, True)
    assert ds.numel() == 0 and dt.shape == (N, C)
    _, ds, dt = ops.soft_cross_entropy(zs, zt, T, 1.0 / N, True, False)
    assert dt.numel() == 0 and ds.shape == (N, C)
    # autograd, g != 1: the saved gradient scaled in place
    g = random_scale()
    a32, b32 = zs.clone().requires_grad_(), zt.clone().requires_grad_()
    got = torch.autograd.grad(tbf.soft_cross_entropy(a32, b32, T, "batchmean"), (a32, b32),
                              torch.tensor(g, device=device))
    want = torch.autograd.grad(ref(a, b, T, "batchmean"), (a, b), torch.tensor(g, device=device))
    assert_rel("d student, g", got[0], want[0], 1e-5)
    assert_rel("d teacher, g", got[1], want[1], 1e-5)


# --- torch.compile ------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("shape", [(6, 1271), (8, 2)], ids=["C1271", "C2"])
def test_compile_fullgraph(shape, device):
    tbf.set_backend("auto" if ON_CUDA else "triton")
    torch._dynamo.reset()

    def fn(a, b):
        return tbf.soft_cross_entropy(a, b, temperature=2.0) * 3.0 - 1.0

    zs, zt = logits(shape), logits(shape)
    compiled = torch.compile(fn, fullgraph=True)
    zs2, zt2 = (t.detach().clone().requires_grad_() for t in (zs, zt))
    got, want = compiled(zs2, zt2), fn(zs, zt)
    assert_fused(want)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    g = torch.tensor(random_scale(), device=device)
    for a, e in zip(torch.autograd.grad(got, (zs2, zt2), g), torch.autograd.grad(want, (zs, zt), g)):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-9)
