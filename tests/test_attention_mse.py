"""tinybert_fast.attention_mse and the ops tinybert_fast::attention_mse and scale_gradients_."""

from __future__ import annotations

import pytest
import torch

import tinybert_fast as tbf
from conftest import (DEVICE, DTYPES, LOSS_SCALE, ON_CUDA, OpCheckError, Tol, assert_fused, assert_rel,
                      check_against_reference, cpu_only, cuda_only, dtype_params, make,
                      needs_triton, opcheck_backends, random_scale, upcast)

ops = torch.ops.tinybert_fast
ref = tbf.reference.attention_mse

# (B, H, L): odd sizes (L=37 is not a power of two, L=130 spills past a 128-wide block, L=1).
SHAPES = [(3, 5, 37), (2, 1, 1), (1, 3, 130), (4, 2, 16)]
SHAPE_IDS = [f"B{b}H{h}L{l}" for b, h, l in SHAPES]
# BERT-base / TinyBERT4 at max length 128, batch 32.  One mapped layer under the interpreter
# (about 20 s per dtype there), the four TinyBERT4 layers in every dtype on CUDA.
REAL_SHAPE = (32, 12, 128)
REAL_LAYERS = 4 if ON_CUDA else 1
REAL_DTYPES = list(DTYPES) if ON_CUDA else [torch.float32]

def scores(shape, dtype=torch.float32, device=DEVICE, requires_grad=True, mask=None,
           bias=-10000.0):
    """Pre-softmax scores QK^T/sqrt(d) ~ N(0, 3^2), plus `bias` on padded key columns of `mask`."""
    x = torch.randn(shape, device=device) * 3.0
    if mask is not None:
        x = x.masked_fill((mask == 0)[:, None, None, :], bias)
    return x.to(dtype).requires_grad_(requires_grad)


def key_mask(B, L, lengths=None, dtype=torch.int64, device=DEVICE):
    """[B, L] key-padding mask, 1 = token; `lengths` default: random, and batch row 1 (if any)
    fully padded."""
    if lengths is None:
        lengths = torch.randint(1, L + 1, (B,)).tolist()
        if B > 1:
            lengths[1] = 0
    m = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    return m.to(device=device, dtype=dtype)


# --- exact TinyBERT formula on tiny hand-computed cases ----------------------------------------------

BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_threshold(backend, device):
    tbf.set_backend(backend)
    # s' = [1, 0, 2, -99.5] (-10000 -> 0; -99.5 > -100 is kept), t' = [0.5, 0, 0, 4] (-100 -> 0)
    s = torch.tensor([[[[1.0, -10000.0], [2.0, -99.5]]]], device=device, requires_grad=True)
    t = torch.tensor([[[[0.5, -10000.0], [-100.0, 4.0]]]], device=device, requires_grad=True)
    # d = s' - t' = [0.5, 0, 2, -103.5]; sum d^2 = 0.25 + 4 + 10712.25 = 10716.5 over 4 entries
    loss = tbf.attention_mse(s, t)
    assert loss.item() == 10716.5 / 4
    assert tbf.attention_mse(s, t, reduction="sum").item() == 10716.5
    loss.backward()
    # dS = 2/4 * d where s > -100; dT = -2/4 * d where t > -100
    torch.testing.assert_close(s.grad, torch.tensor([[[[0.25, 0.0], [1.0, -51.75]]]],
                                                    device=device), rtol=0, atol=0)
    torch.testing.assert_close(t.grad, torch.tensor([[[[-0.25, 0.0], [0.0, 51.75]]]],
                                                    device=device), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_mask(backend, device):
    tbf.set_backend(backend)
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], device=device)
    t = torch.tensor([[[[0.5, 1.0], [1.0, 2.0]]]], device=device)
    mask = torch.tensor([[1, 0]], device=device)
    # key column 1 padded: only (0.5)^2 + 2^2 survive, still divided by B*H*L*L = 4
    assert tbf.attention_mse(s, t, mask).item() == (0.25 + 4.0) / 4
    # padded query rows are NOT masked: masking token 0 removes key column 0 only
    mask0 = torch.tensor([[0, 1]], device=device)
    assert tbf.attention_mse(s, t, mask0).item() == (1.0 + 4.0) / 4
    # two layers are summed, not averaged
    assert tbf.attention_mse([s, s], [t, t], mask).item() == 2 * (0.25 + 4.0) / 4


# --- forward and gradients against the float64 reference ---------------------------------------------

@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(fused, shape, dtype, n_layers, device):
    B, H, L = shape
    s = scores((n_layers, B, H, L, L), dtype)
    t = scores((n_layers, B, H, L, L), dtype)
    loss, _ = check_against_reference(tbf.attention_mse, ref, [s, t], DTYPES[dtype])
    assert_fused(loss)


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4, 5])
def test_stacked_list_tuple_agree(fused, n_layers, device):
    B, H, L = 3, 5, 37
    s = scores((n_layers, B, H, L, L))
    t = scores((n_layers, B, H, L, L))
    mask = key_mask(B, L)
    forms = {
        "stacked": lambda s, t: tbf.attention_mse(s, t, mask),
        "list": lambda s, t: tbf.attention_mse(list(s.unbind(0)), list(t.unbind(0)), mask),
        "tuple": lambda s, t: tbf.attention_mse(tuple(s.unbind(0)), tuple(t.unbind(0)), mask),
        "stacked+list": lambda s, t: tbf.attention_mse(s, list(t.unbind(0)), mask),
    }
    if n_layers == 1:
        forms["4-D"] = lambda s, t: tbf.attention_mse(s[0], t[0], mask)
    g = random_scale()
    results = {}
    for name, fn in forms.items():
        s_, t_ = (x.detach().clone().requires_grad_() for x in (s, t))
        loss = fn(s_, t_)
        results[name] = (loss,) + torch.autograd.grad(loss, (s_, t_), torch.tensor(g, device=device))
    ref_loss = ref(*upcast([s, t]), mask)
    for name, (loss, gs, gt) in results.items():
        assert_rel(f"{name} loss vs reference", loss, ref_loss.double(), DTYPES[torch.float32].loss)
        want = results["stacked"]
        torch.testing.assert_close(loss, want[0], rtol=1e-6, atol=0, msg=name)
        torch.testing.assert_close(gs, want[1], rtol=1e-6, atol=1e-9, msg=name)
        torch.testing.assert_close(gt, want[2], rtol=1e-6, atol=1e-9, msg=name)
    check_against_reference(lambda s, t: tbf.attention_mse(list(s.unbind(0)), list(t.unbind(0)),
                                                           mask),
                            lambda s, t: ref(list(s.unbind(0)), list(t.unbind(0)), mask),
                            [s, t], DTYPES[torch.float32])


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.float32],
                         ids=["bool", "int64", "int32", "float32"])
@pytest.mark.parametrize("dtype", dtype_params())
def test_key_padding_mask(fused, dtype, mask_dtype, device):
    B, H, L = 3, 5, 37
    mask = key_mask(B, L, lengths=[37, 0, 11], dtype=mask_dtype)  # batch row 1 fully padded
    s = scores((2, B, H, L, L), dtype, mask=mask)  # -10000 on padded key columns, as BERT adds
    t = scores((2, B, H, L, L), dtype, mask=mask)
    tol = DTYPES[dtype]
    check_against_reference(lambda s, t: tbf.attention_mse(s, t, mask),
                            lambda s, t: ref(s, t, mask), [s, t], tol)
    # the -10000 bias alone already removes padded keys: mask or no mask, the same loss
    torch.testing.assert_close(tbf.attention_mse(s, t, mask), tbf.attention_mse(s, t),
                               rtol=1e-6, atol=0)
    # without the bias in the scores the mask has to do it
    s2 = scores((2, B, H, L, L), dtype)
    t2 = scores((2, B, H, L, L), dtype)
    check_against_reference(lambda s, t: tbf.attention_mse(s, t, mask),
                            lambda s, t: ref(s, t, mask), [s2, t2], tol)
    loss = tbf.attention_mse(s2, t2, mask)
    gs, gt = torch.autograd.grad(loss, (s2, t2))
    padded = (mask == 0)[None, :, None, None, :].expand_as(gs)
    assert (gs[padded] == 0).all() and (gt[padded] == 0).all()
    assert (gs[:, 1] == 0).all(), "a fully padded batch row must get zero gradient"
    assert gs[~padded].ne(0).float().mean() > 0.99
    # padded keys contribute 0 but count in the denominator: the loss is below the unmasked one
    keep = (mask != 0).to(torch.float64)[None, :, None, None, :]
    d = (s2.double() - t2.double()) * keep
    expected = d.square().sum() / (B * H * L * L)
    assert_rel("masked loss by hand", loss, expected, tol.loss)


@pytest.mark.parametrize("dtype", dtype_params())
def test_dtype_min_mask_bias(fused, dtype, device):
    """Hugging Face adds the dtype's minimum, not -10000, on padded keys: also removed."""
    B, H, L = 2, 3, 37
    mask = key_mask(B, L, lengths=[30, 5])
    s = scores((B, H, L, L), dtype, mask=mask, bias=torch.finfo(dtype).min)
    t = scores((B, H, L, L), dtype, mask=mask, bias=-10000.0)
    loss, _ = check_against_reference(tbf.attention_mse, ref, [s, t], DTYPES[dtype])
    assert torch.isfinite(loss)
    check_against_reference(lambda s, t: tbf.attention_mse(s, t, mask),
                            lambda s, t: ref(s, t, mask), [s, t], DTYPES[dtype])


def test_scores_at_threshold(fused, device):
    """Entries <= -100 are zeroed in student and teacher independently, > -100 kept."""
    B, H, L = 2, 3, 37
    s = scores((B, H, L, L))
    t = scores((B, H, L, L))
    with torch.no_grad():
        s.view(-1)[::7] = -100.0
        s.view(-1)[1::11] = -99.0
        t.view(-1)[::5] = -150.0
        t.view(-1)[2::13] = -100.0
    check_against_reference(tbf.attention_mse, ref, [s, t], DTYPES[torch.float32])
    gs, gt = torch.autograd.grad(tbf.attention_mse(s, t), (s, t))
    assert (gs[s <= -100] == 0).all() and (gt[t <= -100] == 0).all()
    assert (gs[s == -99.0] != 0).all()


# --- strides, requires_grad, reductions, dtypes -----------------------------------------------------

NONCONTIGUOUS = {
    # name: (base shape from (n, B, H, L), view applied to the base)
    "transposed": (lambda n, B, H, L: (n, B, H, L, L), lambda x: x.transpose(-1, -2)),
    "step-slice": (lambda n, B, H, L: (n, B, H, L, 2 * L), lambda x: x[..., ::2]),
    "layer-minor": (lambda n, B, H, L: (B, n, H, L, L), lambda x: x.transpose(0, 1)),
    "head-slice": (lambda n, B, H, L: (n, B, 2 * H, L, L), lambda x: x[:, :, 1::2]),
}


@pytest.mark.parametrize("as_list", [False, True], ids=["stacked", "list"])
@pytest.mark.parametrize("kind", list(NONCONTIGUOUS))
def test_noncontiguous(fused, kind, as_list, device):
    n, B, H, L = 2, 3, 5, 37
    base_shape, view = NONCONTIGUOUS[kind]
    s = scores(base_shape(n, B, H, L))
    t = scores(base_shape(n, B, H, L))
    mask = key_mask(B, L)
    mask_t = mask.t().contiguous().t()  # the same [B, L] values with strides (1, B)
    assert not mask_t.is_contiguous()
    assert not view(s).is_contiguous()

    def prep(x):
        v = view(x)
        return list(v.unbind(0)) if as_list else v

    check_against_reference(lambda s, t: tbf.attention_mse(prep(s), prep(t), mask_t),
                            lambda s, t: ref(prep(s), prep(t), mask), [s, t], DTYPES[torch.float32])


@pytest.mark.parametrize("which", ["student", "teacher", "both"])
def test_gradients_only_where_required(fused, which, device):
    B, H, L = 3, 5, 37
    s = scores((2, B, H, L, L), requires_grad=which in ("student", "both"))
    t = scores((2, B, H, L, L), requires_grad=which in ("teacher", "both"))
    mask = key_mask(B, L)
    check_against_reference(lambda s, t: tbf.attention_mse(s, t, mask),
                            lambda s, t: ref(s, t, mask), [s, t], DTYPES[torch.float32])
    tbf.attention_mse(s, t, mask).backward()
    assert (s.grad is None) == (which == "teacher")
    assert (t.grad is None) == (which == "student")


def test_gradients_partial_list(fused, device):
    """A list where only some layers require grad: those get the right gradient, others none."""
    B, H, L = 3, 5, 37
    s = [scores((B, H, L, L), requires_grad=i != 1) for i in range(3)]
    t = [scores((B, H, L, L), requires_grad=i == 2) for i in range(3)]
    check_against_reference(lambda *x: tbf.attention_mse(list(x[:3]), list(x[3:])),
                            lambda *x: ref(list(x[:3]), list(x[3:])), s + t,
                            DTYPES[torch.float32])
    tbf.attention_mse(s, t).backward()
    assert s[1].grad is None and t[0].grad is None and t[1].grad is None
    assert s[0].grad is not None and t[2].grad is not None


def test_no_grad_mode(fused, device):
    s, t = scores((3, 5, 37, 37)), scores((3, 5, 37, 37))
    with torch.no_grad():
        loss = tbf.attention_mse(s, t)
    assert not loss.requires_grad
    assert_rel("loss", loss, ref(*upcast([s, t])).double(), DTYPES[torch.float32].loss)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", dtype_params())
def test_reductions(fused, reduction, dtype, device):
    B, H, L = 3, 5, 37
    mask = key_mask(B, L, dtype=torch.bool)
    s = scores((2, B, H, L, L), dtype)
    t = scores((2, B, H, L, L), dtype)
    check_against_reference(lambda s, t: tbf.attention_mse(s, t, mask, reduction=reduction),
                            lambda s, t: ref(s, t, mask, reduction=reduction), [s, t],
                            DTYPES[dtype])
    with torch.no_grad():
        mean = tbf.attention_mse(s, t, mask, reduction="mean")
        total = tbf.attention_mse(s, t, mask, reduction="sum")
    torch.testing.assert_close(total, mean * (B * H * L * L), rtol=1e-5, atol=0)


@pytest.mark.parametrize("t_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_student_teacher_dtypes(fused, t_dtype, device):
    s = scores((2, 3, 5, 37, 37), torch.float32)
    t = scores((2, 3, 5, 37, 37), t_dtype)
    tol = Tol(DTYPES[torch.float32].loss, DTYPES[t_dtype].grad)
    check_against_reference(tbf.attention_mse, ref, [s, t], tol)


@pytest.mark.parametrize("dtype", REAL_DTYPES, ids=[str(d)[6:] for d in REAL_DTYPES])
def test_real_shape(fused, dtype, device):
    B, H, L = REAL_SHAPE
    lengths = torch.randint(16, L + 1, (B,)).tolist()
    lengths[0] = L
    mask = key_mask(B, L, lengths=lengths)
    s = scores((REAL_LAYERS, B, H, L, L), dtype, mask=mask)
    t = scores((REAL_LAYERS, B, H, L, L), dtype, mask=mask)
    loss, _ = check_against_reference(lambda s, t: tbf.attention_mse(s, t, mask),
                                      lambda s, t: ref(s, t, mask), [s, t], DTYPES[dtype],
                                      grad_scale=random_scale(1.0, 2.0) * LOSS_SCALE[dtype])
    assert_fused(loss)


# --- bad inputs ----------------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(shape, device=device).to(dtype)


BAD_INPUTS = {
    # name: (lambda -> (args, kwargs), exception, regex the message must match)
    "H-mismatch": (lambda: ((_t(2, 3, 5, 5), _t(2, 4, 5, 5)), {}), ValueError, r"teacher.*\(2, 4, 5, 5\)"),
    "B-mismatch": (lambda: ((_t(2, 3, 5, 5), _t(3, 3, 5, 5)), {}), ValueError, r"teacher"),
    "L-mismatch": (lambda: ((_t(2, 3, 5, 5), _t(2, 3, 6, 6)), {}), ValueError, r"teacher"),
    "not-square": (lambda: ((_t(2, 3, 5, 6), _t(2, 3, 5, 6)), {}), ValueError, r"square"),
    "rank-3": (lambda: ((_t(3, 5, 5), _t(3, 5, 5)), {}), ValueError, r"student must be"),
    "teacher-rank-6": (lambda: ((_t(2, 3, 5, 5), _t(1, 1, 2, 3, 5, 5)), {}), ValueError, r"teacher"),
    "list-item-rank": (lambda: (([_t(2, 3, 5, 5), _t(3, 5, 5)], [_t(2, 3, 5, 5)] * 2), {}),
                       ValueError, r"student\[1\]"),
    "layer-count": (lambda: ((_t(2, 2, 3, 5, 5), _t(3, 2, 3, 5, 5)), {}), ValueError,
                    r"student has 2 layers but teacher has 3"),
    "int-student": (lambda: ((torch.ones(2, 3, 5, 5, dtype=torch.int64, device=DEVICE),
                              _t(2, 3, 5, 5)), {}), TypeError, r"student"),
    "int-teacher": (lambda: ((_t(2, 3, 5, 5),
                              torch.ones(2, 3, 5, 5, dtype=torch.int32, device=DEVICE)), {}),
                    TypeError, r"teacher"),
    "mask-shape-L": (lambda: ((_t(2, 3, 5, 5), _t(2, 3, 5, 5)),
                              {"attention_mask": torch.ones(2, 6, device=DEVICE)}),
                     ValueError, r"attention_mask.*\[2, 5\]"),
    "mask-shape-B": (lambda: ((_t(2, 3, 5, 5), _t(2, 3, 5, 5)),
                              {"attention_mask": torch.ones(3, 5, device=DEVICE)}),
                     ValueError, r"attention_mask"),
    "mask-rank": (lambda: ((_t(2, 3, 5, 5), _t(2, 3, 5, 5)),
                           {"attention_mask": torch.ones(2, 1, 1, 5, device=DEVICE)}),
                  ValueError, r"attention_mask"),
    "reduction": (lambda: ((_t(2, 3, 5, 5), _t(2, 3, 5, 5)), {"reduction": "batchmean"}),
                  ValueError, r"reduction"),
    "empty-list": (lambda: (([], []), {}), ValueError, r"student"),
    "empty-teacher-list": (lambda: ((_t(2, 3, 5, 5), []), {}), ValueError, r"teacher"),
    "not-a-tensor": (lambda: (("scores", _t(2, 3, 5, 5)), {}), TypeError, r"student"),
    "list-of-non-tensors": (lambda: (([_t(2, 3, 5, 5), 1.0], [_t(2, 3, 5, 5)] * 2), {}),
                            TypeError, r"student\[1\]"),
}


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(backend, case):
    tbf.set_backend(backend)
    make_args, exc, match = BAD_INPUTS[case]
    args, kwargs = make_args()
    with pytest.raises(exc, match=match):
        tbf.attention_mse(*args, **kwargs)


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
def test_mask_not_a_tensor(backend):
    tbf.set_backend(backend)
    with pytest.raises(TypeError, match=r"attention_mask"):
        tbf.attention_mse(_t(2, 3, 5, 5), _t(2, 3, 5, 5), [[1] * 5] * 2)


@needs_triton
def test_fused_rejects_float64(fused):
    with pytest.raises(TypeError, match=r"student.*float64"):
        tbf.attention_mse(_t(2, 3, 5, 5, dtype=torch.float64), _t(2, 3, 5, 5))
    # the reference computes in any float dtype
    tbf.set_backend("torch")
    assert torch.isfinite(tbf.attention_mse(_t(2, 3, 5, 5, dtype=torch.float64),
                                            _t(2, 3, 5, 5, dtype=torch.float64)))


@cuda_only
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_mixed_devices(backend):
    tbf.set_backend(backend)
    with pytest.raises(ValueError, match=r"teacher.*cpu"):
        tbf.attention_mse(_t(2, 3, 5, 5), _t(2, 3, 5, 5, device="cpu"))
    with pytest.raises(ValueError, match=r"attention_mask"):
        tbf.attention_mse(_t(2, 3, 5, 5), _t(2, 3, 5, 5),
                          torch.ones(2, 5, device="cpu"))


# --- registered ops --------------------------------------------------------------------------------

def _op_inputs(device=DEVICE, requires_grad=True):
    B, H, L = 2, 3, 7
    mask = key_mask(B, L, lengths=[7, 0], device=device)
    s = [scores((2, B, H, L, L), requires_grad=requires_grad, mask=mask),
         scores((1, B, H, L, L), requires_grad=requires_grad)]
    t = [scores((2, B, H, L, L), requires_grad=requires_grad),
         scores((1, B, H, L, L), requires_grad=requires_grad, mask=mask)]
    return s, t, mask, 1.0 / (B * H * L * L)


@cpu_only
def test_op_cpu_torch_kernel_matches_reference(torch_cpu_kernels):
    s, t, mask, scale = _op_inputs()
    loss, gs, gt = ops.attention_mse(s, t, mask, scale)
    assert gs == [] and gt == []
    want = ref([x[i] for x in s for i in range(x.shape[0])],
               [x[i] for x in t for i in range(x.shape[0])], mask)
    assert_rel("loss", loss, want, 1e-6)


@pytest.mark.parametrize("backend", opcheck_backends())
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_opcheck_forward(backend, with_mask):
    tbf.set_backend(backend)
    s, t, mask, scale = _op_inputs()
    # the inputs require grad: the op is told to write their gradients (as the public function does)
    torch.library.opcheck(ops.attention_mse.default,
                          (s, t, mask if with_mask else None, scale, False, True, True))


@pytest.mark.parametrize("backend", opcheck_backends())
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)],
                         ids=["ds+dt", "ds", "dt"])
def test_opcheck_forward_with_gradients(backend, need):
    tbf.set_backend(backend)
    s, t, mask, scale = _op_inputs(requires_grad=False)
    torch.library.opcheck(ops.attention_mse.default, (s, t, mask, scale, False, *need))


@pytest.mark.parametrize("backend", opcheck_backends())
def test_opcheck_scale_gradients(backend):
    tbf.set_backend(backend)
    s, _, _, _ = _op_inputs(requires_grad=False)
    grad = torch.tensor(random_scale(), device=DEVICE)
    torch.library.opcheck(ops.scale_gradients_.default, ([x.clone() for x in s], grad))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("g", [1.0, 0.37], ids=["g=1", "g!=1"])
def test_scale_gradients_in_place(backend, g):
    """x *= g in place; with g == 1 the kernel reads the incoming gradient and nothing else."""
    tbf.set_backend(backend)
    x = [torch.randn(3, 37, device=DEVICE), torch.randn(5, device=DEVICE).half()]
    want = [v.float() * g for v in x]
    ptrs = [v.data_ptr() for v in x]
    ops.scale_gradients_(x, torch.tensor(g, device=DEVICE))
    assert [v.data_ptr() for v in x] == ptrs
    for got, w in zip(x, want):
        assert_rel("scaled", got.float(), w, 1e-3 if got.dtype == torch.half else 1e-7)


@needs_triton
def test_op_gradient_outputs(fused):
    """The forward's gradient outputs (incoming gradient 1) against the float64 reference's
    autograd; through autograd with grad_output != 1 they are scaled in place."""
    s, t, mask, scale = _op_inputs(requires_grad=False)
    _, gs, gt = ops.attention_mse(s, t, mask, scale, False, True, True)
    s64, t64 = upcast(s), upcast(t)
    for x in (*s64, *t64):
        x.requires_grad_()
    loss = ref([x[i] for x in s64 for i in range(x.shape[0])],
               [x[i] for x in t64 for i in range(x.shape[0])], mask)
    want = torch.autograd.grad(loss, (*s64, *t64))
    for got, w in zip((*gs, *gt), want):
        assert got.is_contiguous()
        assert_rel("grad", got, w, 1e-5)
    _, gs, gt = ops.attention_mse(s, t, mask, scale, False, False, True)
    assert gs == [] and len(gt) == 2


@needs_triton
def test_backward_twice_is_refused(fused):
    """The saved gradient is scaled in place: a second backward through the graph is an error,
    never a wrong gradient."""
    s = scores((2, 3, 2, 8, 8))
    loss = tbf.attention_mse(s, scores((2, 3, 2, 8, 8), requires_grad=False))
    loss.backward(torch.tensor(0.5, device=DEVICE), retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward(torch.tensor(0.5, device=DEVICE))


# --- torch.compile ----------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("as_list", [False, True], ids=["stacked", "list"])
def test_compile_fullgraph(as_list, device):
    # "auto" runs the compiled kernels on CUDA; on CPU "triton" runs them interpreted
    tbf.set_backend("auto" if ON_CUDA else "triton")
    torch._dynamo.reset()
    B, H, L = 3, 5, 37
    mask = key_mask(B, L)

    def fn(s, t):
        if as_list:
            s, t = list(s.unbind(0)), list(t.unbind(0))
        return tbf.attention_mse(s, t, mask) * 0.5 + 1.0

    s = scores((2, B, H, L, L), mask=mask)
    t = scores((2, B, H, L, L))
    compiled = torch.compile(fn, fullgraph=True)
    s2, t2 = (x.detach().clone().requires_grad_() for x in (s, t))
    got = compiled(s2, t2)
    want = fn(s, t)
    assert_fused(want)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    g = torch.tensor(random_scale(), device=device)
    got_g = torch.autograd.grad(got, (s2, t2), g)
    want_g = torch.autograd.grad(want, (s, t), g)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
