"""tinybert_fast.kl_divergence and the ops tinybert_fast::kl_divergence(_backward)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tinybert_fast as tbf
from conftest import (DEVICE, DTYPES, ON_CUDA, assert_fused, assert_rel,
                      check_against_reference, cpu_only, cuda_only, dtype_params, make,
                      needs_triton, opcheck_backends, random_scale, upcast)

ops = torch.ops.tinybert_fast
ref = tbf.reference.kl_divergence

# (N, C): odd class counts; 30522 (BERT's vocabulary) spans several 4096-wide column tiles of the
# online softmax, 5000 two; 2 and 3 are the GLUE label counts.
SHAPES = [(7, 3), (6, 1271), (37, 2), (4, 30522), (3, 5000)]
SHAPE_IDS = [f"N{n}C{c}" for n, c in SHAPES]
# Task step 2 on a binary task: 32 x 128 rows of 2 classes; and an MLM-style vocabulary
# (DistilBERT's loss).
REAL_SHAPES = [((32 * 128, 2), list(DTYPES)),
               ((32, 30522), list(DTYPES) if ON_CUDA else [torch.float32])]
REAL_PARAMS = [pytest.param(shape, dt, id=f"N{shape[0]}C{shape[1]}-{str(dt)[6:]}")
               for shape, dts in REAL_SHAPES for dt in dts]
TEMPERATURES = [1.0, 2.5]
REDUCTIONS = ["batchmean", "mean", "sum"]
SCALE = {"mean": lambda N, C: 1.0 / (N * C), "batchmean": lambda N, C: 1.0 / N,
         "sum": lambda N, C: 1.0}


def grad_scale(dtype, N, C, reduction="batchmean"):
    """grad_output for a test: random, != 1; for float16 large enough (loss scaling, as AMP does)
    that the gradient entries g * scale * T * (p_s - p_t), with p ~ 1/C, are not fp16
    subnormals: g * scale ~ C."""
    g = random_scale(1.0, 2.0)
    if dtype != torch.float16:
        return g
    return g * C / SCALE[reduction](N, C)


def logits(shape, dtype=torch.float32, requires_grad=True, scale=2.0, device=DEVICE):
    return make(shape, dtype, device, requires_grad, scale=scale)


# --- exact formula on hand-computed cases ------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_hand_computed(backend, device):
    tbf.set_backend(backend)
    ln3 = math.log(3.0)
    # teacher uniform over 2 classes, student softmax = [1/4, 3/4]:
    # kl = 1/2 ln((1/2)/(1/4)) + 1/2 ln((1/2)/(3/4)) = 1/2 ln(4/3)
    zs = torch.tensor([[0.0, ln3]], device=device, requires_grad=True)
    zt = torch.tensor([[1.5, 1.5]], device=device, requires_grad=True)
    kl = 0.5 * math.log(4.0 / 3.0)
    loss = tbf.kl_divergence(zs, zt)  # "batchmean", N = 1
    assert loss.item() == pytest.approx(kl, rel=1e-6)
    assert tbf.kl_divergence(zs, zt, reduction="mean").item() == pytest.approx(kl / 2, rel=1e-6)
    assert tbf.kl_divergence(zs, zt, reduction="sum").item() == pytest.approx(kl, rel=1e-6)
    # temperature 2 on logits twice as large is the same pair of distributions, times T^2 = 4
    loss_t = tbf.kl_divergence(zs.detach() * 2, zt.detach() * 2, temperature=2.0)
    assert loss_t.item() == pytest.approx(4 * kl, rel=1e-6)
    loss.backward()
    # d/dz_s = T (p_s - p_t) / N = [1/4, 3/4] - [1/2, 1/2]
    torch.testing.assert_close(zs.grad, torch.tensor([[-0.25, 0.25]], device=device))
    # d/dz_t = T p_t (log p_t - log p_s - kl) / N
    want_t = torch.tensor([[0.5 * (math.log(2.0) - kl), 0.5 * (math.log(2.0 / 3.0) - kl)]],
                          device=device)
    torch.testing.assert_close(zt.grad, want_t)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_temperature_scales_gradient_by_t(backend, device):
    """The T^2 factor: d/dz_s = T (p_s - p_t) / N, checked on logits T times a fixed pair, where
    p_s and p_t do not depend on T."""
    tbf.set_backend(backend)
    zs0, zt0 = logits((5, 7), requires_grad=False), logits((5, 7), requires_grad=False)
    want = torch.softmax(zs0.double(), -1) - torch.softmax(zt0.double(), -1)
    for T in TEMPERATURES:
        zs = (zs0 * T).requires_grad_()
        (g,) = torch.autograd.grad(tbf.kl_divergence(zs, zt0 * T, T), (zs,))
        assert_rel(f"T={T}", g, T * want / 5, 1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_equal_logits_are_zero(backend, device):
    """p_s = p_t: the loss and both gradients are 0 (C = 1 included: both softmaxes are 1)."""
    tbf.set_backend(backend)
    for shape in [(7, 1), (6, 1271)]:
        zs = logits(shape)
        zt = zs.detach().clone().requires_grad_()
        loss = tbf.kl_divergence(zs, zt, 2.5)
        assert abs(loss.item()) <= 1e-6
        gs, gt = torch.autograd.grad(loss, (zs, zt))
        assert gs.abs().max() <= 1e-6 and gt.abs().max() <= 1e-6


def test_reference_is_torch_kl_div(device):
    """The reference is T^2 * torch's KL (F.kl_div of log p_s against p_t), in float64."""
    zs, zt = logits((9, 1271)).double(), logits((9, 1271)).double()
    for T in TEMPERATURES:
        want = F.kl_div(F.log_softmax(zs / T, -1), F.softmax(zt / T, -1), reduction="sum") * T * T
        for reduction in REDUCTIONS:
            got = ref(zs, zt, T, reduction).double()
            assert_rel(f"T={T} {reduction}", got, want * SCALE[reduction](9, 1271), 1e-6)


# --- forward and gradients against the float64 reference ------------------------------------------------

@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(fused, shape, dtype, device):
    zs, zt = logits(shape, dtype), logits(shape, dtype)
    loss, _ = check_against_reference(tbf.kl_divergence, ref, [zs, zt], DTYPES[dtype],
                                      grad_scale=grad_scale(dtype, *shape))
    assert_fused(loss)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", dtype_params())
def test_temperature_and_reduction(fused, dtype, temperature, reduction, device):
    zs, zt = logits((9, 1271), dtype, scale=4.0), logits((9, 1271), dtype, scale=4.0)
    check_against_reference(
        lambda a, b: tbf.kl_divergence(a, b, temperature, reduction),
        lambda a, b: ref(a, b, temperature, reduction), [zs, zt], DTYPES[dtype],
        grad_scale=grad_scale(dtype, 9, 1271, reduction))


def test_reductions_relate(fused, device):
    N, C = 9, 1271
    zs, zt = logits((N, C)), logits((N, C))
    with torch.no_grad():
        batchmean = tbf.kl_divergence(zs, zt, 2.5)
        mean = tbf.kl_divergence(zs, zt, 2.5, reduction="mean")
        total = tbf.kl_divergence(zs, zt, 2.5, reduction="sum")
    torch.testing.assert_close(mean, batchmean / C, rtol=1e-6, atol=0)
    torch.testing.assert_close(total, batchmean * N, rtol=1e-6, atol=0)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_is_cross_entropy_minus_teacher_entropy(fused, temperature, device):
    """KL(p_t || p_s) = CE(p_t, p_s) - H(p_t): T^2 * (soft_ce(z_s, z_t) - soft_ce(z_t, z_t)),
    through the other fused op."""
    zs, zt = logits((6, 5000), requires_grad=False), logits((6, 5000), requires_grad=False)
    ce = tbf.soft_cross_entropy(zs, zt, temperature, "batchmean")
    h = tbf.soft_cross_entropy(zt, zt, temperature, "batchmean")
    want = temperature ** 2 * (ce.double() - h.double())
    assert_rel("kl", tbf.kl_divergence(zs, zt, temperature), want, 1e-5)


@pytest.mark.parametrize("dtype", dtype_params())
def test_large_logits_are_stable(fused, dtype, device):
    """Logits in the hundreds must not overflow the softmaxes (exp(600) overflows fp32).

    Only the student's gradient is checked: the teacher's, p_t (log p_t - log p_s - kl), is a
    difference of numbers in the hundreds whose true value is tiny when p_t is one-hot, so it is
    ill-conditioned in fp32 (the fp32 reference has the same error)."""
    big = 300.0
    zs = logits((5, 3000), dtype, scale=big / 4)
    zt = logits((5, 3000), dtype, scale=big / 4, requires_grad=False)
    loss, _ = check_against_reference(lambda a, b: tbf.kl_divergence(a, b, 0.5),
                                      lambda a, b: ref(a, b, 0.5), [zs, zt], DTYPES[dtype],
                                      grad_scale=grad_scale(dtype, 5, 3000))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_masked_classes(backend, device):
    """Classes with logit -inf in both models (a vocabulary mask) carry no mass and get zero
    gradients; the first 4096-wide column tile wholly masked (a running maximum of -inf) included.
    Classes where only the teacher is -inf add nothing either."""
    tbf.set_backend(backend)
    N, C = 3, 5000
    zs, zt = logits((N, C), requires_grad=False), logits((N, C), requires_grad=False)
    both = torch.zeros(N, C, dtype=torch.bool, device=device)
    both[0, :4500] = True
    both[1, ::3] = True
    teacher_only = torch.zeros_like(both)
    teacher_only[2, 1::2] = True
    zs = zs.masked_fill(both, -math.inf).requires_grad_()
    zt = zt.masked_fill(both | teacher_only, -math.inf).requires_grad_()
    loss, _ = check_against_reference(lambda a, b: tbf.kl_divergence(a, b, 2.5),
                                      lambda a, b: ref(a, b, 2.5), [zs, zt],
                                      DTYPES[torch.float32])
    assert torch.isfinite(loss)
    gs, gt = torch.autograd.grad(tbf.kl_divergence(zs, zt, 2.5), (zs, zt))
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert (gs[both] == 0).all() and (gt[both | teacher_only] == 0).all()


@pytest.mark.parametrize("rank", [1, 3, 4])
def test_leading_dims(fused, rank, device):
    """[..., C] logits are flattened to rows: [C], [B, L, C], [2, B, L, C]."""
    shape = {1: (1271,), 3: (3, 5, 1271), 4: (2, 3, 5, 7)}[rank]
    zs, zt = logits(shape), logits(shape)
    check_against_reference(tbf.kl_divergence, ref, [zs, zt], DTYPES[torch.float32])
    flat = tbf.kl_divergence(zs.reshape(-1, shape[-1]), zt.reshape(-1, shape[-1]))
    torch.testing.assert_close(tbf.kl_divergence(zs, zt), flat, rtol=1e-6, atol=0)


NONCONTIGUOUS = {
    # name: (base shape from (N, C), view)
    "transposed": (lambda N, C: (C, N), lambda x: x.t()),
    "class-step": (lambda N, C: (N, 2 * C), lambda x: x[:, ::2]),
    "row-step": (lambda N, C: (3 * N, C), lambda x: x[1::3]),
    "3d-permuted": (lambda N, C: (C, N, 1), lambda x: x.permute(2, 1, 0)),
}


@pytest.mark.parametrize("shape", [(7, 3), (6, 1271), (3, 5000)], ids=["C3", "C1271", "C5000"])
@pytest.mark.parametrize("kind", list(NONCONTIGUOUS))
def test_noncontiguous(fused, kind, shape, device):
    base, view = NONCONTIGUOUS[kind]
    zs, zt = logits(base(*shape)), logits(base(*shape))
    assert not view(zs).is_contiguous()
    check_against_reference(lambda a, b: tbf.kl_divergence(view(a), view(b), 2.5),
                            lambda a, b: ref(view(a), view(b), 2.5), [zs, zt],
                            DTYPES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_noncontiguous_half(fused, dtype, device):
    """Strided 16-bit logits: a class step on the student, a transposed teacher."""
    N, C = 6, 1271
    zs, zt = logits((N, 2 * C), dtype), logits((C, N), dtype)
    check_against_reference(lambda a, b: tbf.kl_divergence(a[:, ::2], b.t(), 2.5),
                            lambda a, b: ref(a[:, ::2], b.t(), 2.5), [zs, zt], DTYPES[dtype],
                            grad_scale=grad_scale(dtype, N, C))


@pytest.mark.parametrize("which", ["student", "teacher", "both"])
def test_gradients_only_where_required(fused, which, device):
    zs = logits((6, 1271), requires_grad=which in ("student", "both"))
    zt = logits((6, 1271), requires_grad=which in ("teacher", "both"))
    check_against_reference(lambda a, b: tbf.kl_divergence(a, b, 2.5),
                            lambda a, b: ref(a, b, 2.5), [zs, zt], DTYPES[torch.float32])
    tbf.kl_divergence(zs, zt, 2.5).backward()
    assert (zs.grad is None) == (which == "teacher")
    assert (zt.grad is None) == (which == "student")


def test_mixed_student_teacher_dtypes(fused, device):
    zs = logits((6, 1271), torch.float32)
    zt = logits((6, 1271), torch.bfloat16)
    check_against_reference(tbf.kl_divergence, ref, [zs, zt], DTYPES[torch.bfloat16])


@pytest.mark.parametrize("shape, dtype", REAL_PARAMS)
def test_real_shape(fused, shape, dtype, device):
    zs, zt = logits(shape, dtype), logits(shape, dtype)
    loss, _ = check_against_reference(tbf.kl_divergence, ref, [zs, zt], DTYPES[dtype],
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
    "reduction-none": (lambda: ((_t(4, 5), _t(4, 5)), {"reduction": "none"}), ValueError,
                       r"reduction.*'none'"),
    "reduction-typo": (lambda: ((_t(4, 5), _t(4, 5)), {"reduction": "batch_mean"}), ValueError,
                       r"reduction.*'batch_mean'"),
}


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(backend, case):
    tbf.set_backend(backend)
    make_args, exc, match = BAD_INPUTS[case]
    args, kwargs = make_args()
    with pytest.raises(exc, match=match):
        tbf.kl_divergence(*args, **kwargs)


def test_defaults(device):
    """temperature=1.0, reduction="batchmean"; an integer temperature is a float."""
    zs, zt = _t(4, 5), _t(4, 5)
    torch.testing.assert_close(tbf.kl_divergence(zs, zt), tbf.kl_divergence(zs, zt, 1.0, "batchmean"))
    torch.testing.assert_close(tbf.kl_divergence(zs, zt, 2), tbf.kl_divergence(zs, zt, 2.0))


@needs_triton
def test_fused_rejects_float64(fused):
    with pytest.raises(TypeError, match=r"student_logits.*float64"):
        tbf.kl_divergence(_t(4, 5, dtype=torch.float64), _t(4, 5, dtype=torch.float64))


@cuda_only
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_mixed_devices(backend):
    tbf.set_backend(backend)
    with pytest.raises(ValueError, match=r"teacher_logits.*cpu"):
        tbf.kl_divergence(_t(4, 5), _t(4, 5, device="cpu"))


# --- backends ----------------------------------------------------------------------------------------

@pytest.fixture
def reference_calls(monkeypatch):
    """Records calls of tinybert_fast.reference.kl_divergence (the op module calls it through the
    module)."""
    calls, original = [], tbf.reference.kl_divergence

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(tbf.reference, "kl_divergence", spy)
    return calls


@pytest.mark.parametrize("backend", ["torch", pytest.param("auto", marks=cpu_only)])
def test_routes_to_reference(reference_calls, backend, device):
    """Backend "torch" (and "auto" on CPU tensors) runs the eager reference, no registered op."""
    tbf.set_backend(backend)
    zs, zt = logits((4, 7)), logits((4, 7))
    loss = tbf.kl_divergence(zs, zt, 2.5)
    assert len(reference_calls) == 1
    with pytest.raises(AssertionError):
        assert_fused(loss)


def test_triton_routes_to_fused(reference_calls, fused, device):
    loss = tbf.kl_divergence(logits((4, 7)), logits((4, 7)), 2.5)
    assert reference_calls == []
    assert_fused(loss)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    """Backend "triton" on CPU tensors without TRITON_INTERPRET=1: a RuntimeError saying so; the
    registered op itself still runs (its CPU kernel is PyTorch then)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tbf.set_backend("triton")
    zs, zt = torch.randn(4, 7), torch.randn(4, 7)
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1"):
        tbf.kl_divergence(zs, zt)
    loss = ops.kl_divergence(zs, zt, 1.0, 0.25)[0]
    assert_rel("op", loss, ref(zs.double(), zt.double()), 1e-5)


# --- registered ops ----------------------------------------------------------------------------------

@cpu_only
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_op_cpu_torch_kernel_matches_reference(torch_cpu_kernels, temperature):
    zs, zt = logits((6, 1271)), logits((6, 1271))
    N, C = zs.shape
    check_against_reference(
        lambda a, b: ops.kl_divergence(a, b, temperature, 1.0 / (N * C), True, True)[0],
        lambda a, b: ref(a, b, temperature, "mean"), [zs, zt], DTYPES[torch.float32])


def _op_inputs(requires_grad=True, N=5, C=37):
    return logits((N, C), requires_grad=requires_grad), logits((N, C), requires_grad=requires_grad)


@pytest.mark.parametrize("backend", opcheck_backends())
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_opcheck_forward(backend, temperature):
    tbf.set_backend(backend)
    zs, zt = _op_inputs()
    # the inputs require grad: the op is told to write their gradients (as the public function does)
    torch.library.opcheck(ops.kl_divergence.default, (zs, zt, temperature, 0.1, True, True))


@pytest.mark.parametrize("backend", opcheck_backends())
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["ds+dt", "ds", "dt", "none"])
@pytest.mark.parametrize("C", [37, 5000], ids=["one-tile", "two-tiles"])
def test_opcheck_forward_with_gradients(backend, need, C):
    tbf.set_backend(backend)
    zs, zt = _op_inputs(requires_grad=False, C=C)
    torch.library.opcheck(ops.kl_divergence.default, (zs, zt, 2.0, 0.1, *need))


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("C", [1271, 5000], ids=["one-tile", "two-tiles"])
def test_op_gradient_outputs(backend, C, device):
    """The forward's gradient outputs (incoming gradient 1) against float64 autograd of the
    reference; an empty tensor where a gradient is not requested; through autograd with
    grad_output != 1 they are scaled in place."""
    tbf.set_backend(backend)
    T, N = 2.5, 5
    zs, zt = _op_inputs(requires_grad=False, N=N, C=C)
    loss, ds, dt = ops.kl_divergence(zs, zt, T, 1.0 / N, True, True)
    a, b = upcast([zs, zt])
    a.requires_grad_(), b.requires_grad_()
    want_loss = ref(a, b, T, "batchmean")
    want = torch.autograd.grad(want_loss, (a, b))
    assert_rel("loss", loss, want_loss, 1e-5)
    assert_rel("d student", ds, want[0], 1e-5)
    assert_rel("d teacher", dt, want[1], 1e-5)
    _, ds, dt = ops.kl_divergence(zs, zt, T, 1.0 / N, False, True)
    assert ds.numel() == 0 and dt.shape == (N, C)
    _, ds, dt = ops.kl_divergence(zs, zt, T, 1.0 / N, True, False)
    assert dt.numel() == 0 and ds.shape == (N, C)
    # autograd, g != 1: the saved gradient scaled in place
    g = random_scale()
    a32, b32 = zs.clone().requires_grad_(), zt.clone().requires_grad_()
    got = torch.autograd.grad(tbf.kl_divergence(a32, b32, T, "batchmean"), (a32, b32),
                              torch.tensor(g, device=device))
    want = torch.autograd.grad(ref(a, b, T, "batchmean"), (a, b), torch.tensor(g, device=device))
    assert_rel("d student, g", got[0], want[0], 1e-5)
    assert_rel("d teacher, g", got[1], want[1], 1e-5)


# --- torch.compile ------------------------------------------------------------------------------------

def _check_compiled(fn, shape, device):
    zs, zt = logits(shape), logits(shape)
    compiled = torch.compile(fn, fullgraph=True)
    zs2, zt2 = (t.detach().clone().requires_grad_() for t in (zs, zt))
    got, want = compiled(zs2, zt2), fn(zs, zt)
    assert_fused(want)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    g = torch.tensor(random_scale(), device=device)
    for a, e in zip(torch.autograd.grad(got, (zs2, zt2), g), torch.autograd.grad(want, (zs, zt), g)):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-9)


@needs_triton
@pytest.mark.parametrize("shape", [(6, 1271), (7, 3)], ids=["C1271", "C3"])
def test_compile_fullgraph(shape, device):
    """The public function under torch.compile: the Triton kernels (interpreted on CPU)."""
    tbf.set_backend("auto" if ON_CUDA else "triton")
    torch._dynamo.reset()
    _check_compiled(lambda a, b: tbf.kl_divergence(a, b, temperature=2.5) * 3.0 - 1.0, shape,
                    device)


@cpu_only
@pytest.mark.parametrize("shape", [(6, 1271), (7, 3)], ids=["C1271", "C3"])
def test_compile_fullgraph_cpu_kernel(torch_cpu_kernels, shape):
    """The registered op under torch.compile on CPU with its PyTorch CPU kernel (forward and
    backward ops; no Triton needed)."""
    torch._dynamo.reset()
    N = shape[0]
    _check_compiled(lambda a, b: ops.kl_divergence(a, b, 2.5, 1.0 / N, True, True)[0] * 3.0 - 1.0,
                    shape,
                    "cpu")
