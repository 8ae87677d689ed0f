"""tinybert_fast.attention_kl_scores and the ops tinybert_fast::attention_kl_scores(_backward).

The reference is the eager path (tinybert_fast.reference.attention_kl_scores: masked log_softmax
of the given scores, KL(P_t || P_s) per valid query row) in float64 on the same (rounded) inputs;
tbf.attention_kl_qk on the Q and K the scores are formed from is the second reference.
"""

from __future__ import annotations

import math

import pytest
import torch

import tinybert_fast as tbf
from conftest import (DEVICE, DTYPES, INTERPRETER, LOSS_SCALE, ON_CUDA, Tol, assert_fused,
                      assert_rel, check_against_reference, count_launches, dtype_params,
                      needs_triton, opcheck_backends, random_scale, upcast)
from test_attention_mse import BAD_INPUTS as MSE_BAD_INPUTS
from test_attention_mse import NONCONTIGUOUS, _t, key_mask, scores
from test_attention_mse_qk import qk
from tinybert_fast.kernels import attention_kl as kernels

ops = torch.ops.tinybert_fast
ref = tbf.reference.attention_kl_scores

# (B, H, L): L=37 odd, L=1 (one key: both distributions are 1, KL 0), L=130 spills past a
# 128-wide block, L=16 a power of two.
SHAPES = [(3, 5, 37), (2, 1, 1), (1, 3, 130), (4, 2, 16)]
SHAPE_IDS = [f"B{b}H{h}L{l}" for b, h, l in SHAPES]
# BERT-base / TinyBERT4 at max length 128: batch 32 and the four mapped layers on CUDA; batch 4
# and one layer under the interpreter (about 10 s for the forward and both gradients there).
REAL_SHAPE = (32 if ON_CUDA else 4, 12, 128)
REAL_LAYERS = 4 if ON_CUDA else 1


def fused_kl(mask=None, reduction="mean"):
    return lambda s, t: tbf.attention_kl_scores(s, t, attention_mask=mask, reduction=reduction)


def ref_kl(mask=None, reduction="mean"):
    return lambda s, t: ref(s, t, attention_mask=mask, reduction=reduction)


def tokens(mask) -> int:
    return int((mask != 0).sum())


def pair(shape, dtype=torch.float32, mask=None, bias=-10000.0, teacher_dtype=None, grad="both"):
    """Student and teacher scores ~ N(0, 3^2) with `bias` on padded keys of `mask`."""
    return [scores(shape, dt, mask=mask, bias=bias, requires_grad=grad in (who, "both"))
            for who, dt in (("student", dtype), ("teacher", teacher_dtype or dtype))]


# --- exact semantics on a tiny hand-computed case -------------------------------------------------

def _softmax(row):
    e = [math.exp(v - max(row)) for v in row]
    return [v / sum(e) for v in e]


def _kl(p_t, p_s):
    return sum(t * (math.log(t) - math.log(s)) for t, s in zip(p_t, p_s))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_hand_computed(backend, device):
    tbf.set_backend(backend)
    # L = 3 with token 2 padded: its key column holds a score that would dominate if it counted
    # (the explicit mask must drop it), and its query row whatever
    s_v = [[1.0, 2.0, 50.0], [0.5, -1.0, 50.0], [3.0, 3.0, 3.0]]
    t_v = [[2.0, 1.0, -50.0], [0.0, 1.5, 9.0], [1.0, 2.0, 3.0]]
    s = torch.tensor([[s_v]], device=device, requires_grad=True)
    t = torch.tensor([[t_v]], device=device, requires_grad=True)
    mask = torch.tensor([[1, 1, 0]], device=device)
    p_s = [_softmax(s_v[i][:2]) for i in range(2)]
    p_t = [_softmax(t_v[i][:2]) for i in range(2)]
    kl = [_kl(p_t[i], p_s[i]) for i in range(2)]
    loss = fused_kl(mask)(s, t)
    assert loss.item() == pytest.approx(sum(kl) / 2, rel=1e-6)  # / (H * tokens)
    assert fused_kl(mask, "sum")(s, t).item() == pytest.approx(sum(kl), rel=1e-6)
    gs, gt = torch.autograd.grad(loss, (s, t))
    # dS_s = c (P_s - P_t), dS_t = c P_t (log P_t - log P_s - KL), c = 1/2; 0 on the padded
    # key column and query row
    want_s = [[(p_s[i][j] - p_t[i][j]) / 2 for j in range(2)] + [0.0] for i in range(2)]
    want_t = [[p_t[i][j] * (math.log(p_t[i][j] / p_s[i][j]) - kl[i]) / 2 for j in range(2)]
              + [0.0] for i in range(2)]
    torch.testing.assert_close(gs, torch.tensor([[want_s + [[0.0] * 3]]], device=device),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gt, torch.tensor([[want_t + [[0.0] * 3]]], device=device),
                               rtol=1e-5, atol=1e-6)
    assert (gs[0, 0, :, 2] == 0).all() and (gs[0, 0, 2] == 0).all() and (gt[0, 0, 2] == 0).all()
    # without a mask every row and key counts: (KL over 3 keys) / (B*H*L); layers are summed
    full = sum(_kl(_softmax(t_v[i]), _softmax(s_v[i])) for i in range(3))
    assert fused_kl()(s, t).item() == pytest.approx(full / 3, rel=1e-6)
    assert fused_kl(mask)([s, s], [t, t]).item() == pytest.approx(sum(kl), rel=1e-6)


# --- agreement with the eager reference (float64) -------------------------------------------------

@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(fused, shape, n_layers, device):
    B, H, L = shape
    mask = key_mask(B, L)  # batch row 1 (if any) fully padded
    x = pair((n_layers, B, H, L, L), mask=mask)
    loss, _ = check_against_reference(fused_kl(mask), ref_kl(mask), x, DTYPES[torch.float32])
    assert_fused(loss)
    check_against_reference(fused_kl(), ref_kl(), x, DTYPES[torch.float32])


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_dtypes(fused, dtype, with_mask, device):
    B, H, L = 3, 5, 37
    mask = key_mask(B, L, dtype=torch.bool) if with_mask else None
    x = pair((2, B, H, L, L), dtype, mask=mask)
    check_against_reference(fused_kl(mask), ref_kl(mask), x, DTYPES[dtype],
                            grad_scale=random_scale(1.0, 2.0) * LOSS_SCALE[dtype])


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                    (torch.float16, torch.float32)],
                         ids=["fp32-bf16", "bf16-fp16", "fp16-fp32"])
def test_mixed_dtypes(fused, dtypes, device):
    B, H, L = 2, 3, 37
    s_dtype, t_dtype = dtypes
    mask = key_mask(B, L)
    x = pair((2, B, H, L, L), s_dtype, mask=mask, teacher_dtype=t_dtype)
    tol = Tol(*(max(getattr(DTYPES[s_dtype], f), getattr(DTYPES[t_dtype], f))
                for f in Tol._fields))
    check_against_reference(fused_kl(mask), ref_kl(mask), x, tol,
                            grad_scale=random_scale(1.0, 2.0) * LOSS_SCALE[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_real_shape(fused, dtype, device):
    """TinyBERT4 at L = 128 with padding (the -10000 bias and the mask, as captured)."""
    B, H, L = REAL_SHAPE
    mask = key_mask(B, L, lengths=[L] + torch.randint(16, L + 1, (B - 1,)).tolist())
    x = pair((REAL_LAYERS, B, H, L, L), dtype, mask=mask)
    loss, _ = check_against_reference(fused_kl(mask), ref_kl(mask), x, DTYPES[dtype],
                                      grad_scale=random_scale(1.0, 2.0) * LOSS_SCALE[dtype])
    assert_fused(loss)


def test_peaked_distributions(fused, device):
    """Scores of std 75, |S| up to ~300 (one-hot rows): the online softmax keeps every exp
    finite, where a naive exp(S) would overflow fp32 (e^88.7)."""
    B, H, L = 2, 2, 100
    mask = key_mask(B, L, lengths=[L, 61])
    x = pair((B, H, L, L), mask=mask, grad="none")
    x = [(25.0 * v).requires_grad_() for v in x]
    loss, _ = check_against_reference(fused_kl(mask), ref_kl(mask), x, DTYPES[torch.float32])
    assert torch.isfinite(loss)


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_many_key_tiles(fused, with_mask, monkeypatch, device):
    """16-key tiles (3 per row at L = 37, the last partial): the online softmax across tiles,
    a first tile without a token (left padding), holes, a sequence without tokens, and a row
    maximum that grows in a later tile."""
    monkeypatch.setattr(kernels, "MAX_BLOCK_L", 16)
    B, H, L = 4, 3, 37
    assert kernels.tile(L)[1] == 16
    mask = None
    if with_mask:
        mask = torch.ones(B, L, device=device)
        mask[0, :20] = 0
        mask[1] = 0
        mask[2, ::3] = 0
    x = pair((2, B, H, L, L), mask=mask, grad="none")
    with torch.no_grad():
        for v in x:
            v[..., 30:] += 6.0  # the maximum moves into the last tile
    x = [v.requires_grad_() for v in x]
    loss, _ = check_against_reference(fused_kl(mask), ref_kl(mask), x, DTYPES[torch.float32])
    assert torch.isfinite(loss)


# --- masks and mask biases ------------------------------------------------------------------------

@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.float32],
                         ids=["bool", "int64", "int32", "float32"])
def test_padding(fused, mask_dtype, device):
    """Padded keys and query rows get exactly zero gradients (student and teacher); what the
    scores hold there (the bias, anything, NaN) leaves the loss unchanged: the mask is applied."""
    B, H, L = 3, 2, 37
    mask = key_mask(B, L, lengths=[37, 0, 20], dtype=mask_dtype)
    x = pair((2, B, H, L, L), mask=mask)
    check_against_reference(fused_kl(mask), ref_kl(mask), x, DTYPES[torch.float32])
    loss = fused_kl(mask)(*x)
    keep = (mask != 0)
    pad = ~(keep[:, None, :, None] & keep[:, None, None, :])[None].expand_as(x[0])
    for g in torch.autograd.grad(loss, x):
        assert torch.isfinite(g).all()
        assert (g[pad] == 0).all() and (g[:, 1] == 0).all()
        assert g[~pad].ne(0).float().mean() > 0.99
    for fill in (lambda v: v.normal_(), lambda v: v.fill_(math.nan), lambda v: v.fill_(1e4)):
        with torch.no_grad():
            y = [v.detach().clone() for v in x]
            for v in y:
                v[pad] = fill(v[pad].clone())
            assert_rel("loss", fused_kl(mask)(*y), loss.detach(), 1e-6)


@pytest.mark.parametrize("dtype", dtype_params())
def test_dtype_min_bias_without_mask(fused, dtype, device):
    """Without a mask every row counts, the padded sequence's too: rows that hold only the bias
    (the dtype's minimum for the teacher, as Hugging Face adds it, -10000 for the student) are
    uniform on both sides, KL 0: the kernel's terms are taken against each row's maximum, where
    lse_s - lse_t would lose every digit (the exact 0 below)."""
    B, H, L = 3, 2, 37
    mask = key_mask(B, L, lengths=[37, 0, 20])
    s = scores((2, B, H, L, L), dtype, mask=mask, bias=-10000.0)
    t = scores((2, B, H, L, L), dtype, mask=mask, bias=torch.finfo(dtype).min)
    loss, _ = check_against_reference(fused_kl(), ref_kl(), [s, t], DTYPES[dtype],
                                      grad_scale=random_scale(1.0, 2.0) * LOSS_SCALE[dtype])
    with torch.no_grad():
        alone = fused_kl()(s[:, 1:2], t[:, 1:2])  # the padded sequence by itself
    assert torch.isfinite(loss) and alone.item() == 0.0


def test_no_token_at_all(fused, device):
    """A batch without any token gives a loss of 0 and zero gradients (mean and sum)."""
    B, H, L = 2, 2, 20
    mask = torch.zeros(B, L, dtype=torch.int64, device=device)
    x = pair((B, H, L, L), mask=mask)
    for reduction in ("mean", "sum"):
        loss = fused_kl(mask, reduction)(*x)
        assert loss.item() == 0.0 and ref_kl(mask, reduction)(*x).item() == 0.0
        for g in torch.autograd.grad(loss, x):
            assert (g == 0).all()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_student_equals_teacher(backend, device):
    """Equal distributions: loss exactly 0; the fused gradients exactly 0 (both dS vanish term by
    term), the reference's (autograd through log_softmax and kl_div) to rounding."""
    tbf.set_backend(backend)
    B, H, L = 2, 3, 37
    mask = key_mask(B, L, lengths=[37, 11])
    s = scores((B, H, L, L), mask=mask)
    t = s.detach().clone().requires_grad_()
    loss = fused_kl(mask)(s, t)
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, (s, t)):
        if backend == "triton":
            assert (g == 0).all()
        else:
            # fp32 rounding of P_s - P_t times the scale c = 1 / (H * T), far below c
            assert g.abs().max().item() < 1e-6 / (H * tokens(mask))


# --- the same loss as attention_kl_qk from Q and K ---------------------------------------------------

@pytest.mark.parametrize("mask_kind,reduction", [("mask", "mean"), ("mask", "sum"),
                                                  ("none", "mean")])
@pytest.mark.parametrize("layers", [None, 2], ids=["4-D", "stacked"])
def test_equals_attention_kl_qk(fused, mask_kind, reduction, layers, device):
    """attention_kl_scores(Q_s K_s^T / sqrt(d_s) + bias, Q_t K_t^T / sqrt(d_t) + bias, m) equals
    attention_kl_qk(q_s, k_s, q_t, k_t, m), the loss and the four gradients (through the scores)."""
    B, H, L, d_s, d_t = 3, 2, 37, 26, 64
    mask = key_mask(B, L) if mask_kind == "mask" else None  # batch row 1 fully padded
    x = qk(B, H, L, d_s, d_t, grad="all", layers=layers)
    y = [v.detach().clone().requires_grad_() for v in x]
    bias = None if mask is None else tbf.reference.key_mask_bias(mask)
    s_s = tbf.reference.attention_scores(y[0], y[1], bias, scaling=d_s ** -0.5)
    s_t = tbf.reference.attention_scores(y[2], y[3], bias, scaling=d_t ** -0.5)
    got = tbf.attention_kl_scores(s_s, s_t, mask, reduction)
    want = tbf.attention_kl_qk(*x, mask, reduction)
    assert_fused(got)
    assert_rel("loss", got, want, 1e-5)
    g = torch.tensor(random_scale(), device=device)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(got, y, g), torch.autograd.grad(want, x, g))):
        assert_rel(f"grad {i}", a, b, 1e-5)


# --- strides, layer forms, gradients, reductions --------------------------------------------------

@pytest.mark.parametrize("as_list", [False, True], ids=["stacked", "list"])
@pytest.mark.parametrize("kind", list(NONCONTIGUOUS))
def test_noncontiguous(fused, kind, as_list, device):
    n, B, H, L = 2, 3, 5, 37
    base_shape, view = NONCONTIGUOUS[kind]
    x = pair(base_shape(n, B, H, L))
    mask = key_mask(B, L)
    mask_t = mask.t().contiguous().t()  # the same [B, L] values with strides (1, B)
    assert not mask_t.is_contiguous() and not view(x[0]).is_contiguous()

    def prep(v):
        v = view(v)
        return list(v.unbind(0)) if as_list else v

    check_against_reference(lambda s, t: tbf.attention_kl_scores(prep(s), prep(t), mask_t),
                            lambda s, t: ref(prep(s), prep(t), mask), x, DTYPES[torch.float32])


@pytest.mark.parametrize("n", [1, 3])
def test_layer_forms_agree(fused, n, device):
    """Lists, tuples and a mix of forms give the stacked loss and gradients (the list path launches
    per layer); the layers are summed."""
    B, H, L = 3, 2, 37
    mask = key_mask(B, L)
    x = pair((n, B, H, L, L), mask=mask)
    g = torch.tensor(random_scale(), device=device)
    want = tbf.attention_kl_scores(*x, mask)
    want_g = torch.autograd.grad(want, x, g)
    per_layer = sum(ref(*[v[i] for v in upcast(x)], mask) for i in range(n))
    assert_rel("sum over layers", want, per_layer, DTYPES[torch.float32].loss)
    as_list, as_tuple = (lambda v: list(v.unbind(0))), (lambda v: tuple(v.unbind(0)))
    forms = {"list": (as_list, as_list), "tuple": (as_tuple, as_tuple),
             "stacked+list": (lambda v: v, as_list)}
    if n == 1:
        forms["4-D"] = (lambda v: v[0], lambda v: v[0])
    for name, (form_s, form_t) in forms.items():
        y = [v.detach().clone().requires_grad_() for v in x]
        args = [form_s(y[0]), form_t(y[1])]
        loss = tbf.attention_kl_scores(*args, mask)
        assert_rel(f"{name} loss", loss, want, 1e-6)
        for i, (a, b) in enumerate(zip(torch.autograd.grad(loss, y, g), want_g)):
            assert_rel(f"{name} grad {i}", a, b, 1e-6)


@pytest.mark.parametrize("which", ["student", "teacher", "both"])
def test_gradients_where_required(fused, which, device):
    B, H, L = 3, 2, 37
    mask = key_mask(B, L)
    s, t = pair((2, B, H, L, L), mask=mask, grad=which)
    check_against_reference(fused_kl(mask), ref_kl(mask), [s, t], DTYPES[torch.float32])
    fused_kl(mask)(s, t).backward()
    assert (s.grad is None) == (which == "teacher")
    assert (t.grad is None) == (which == "student")


def test_gradients_partial_list(fused, device):
    """A list where only some layers require grad: those get the right gradient, others none."""
    B, H, L = 3, 2, 37
    s = [scores((B, H, L, L), requires_grad=i != 1) for i in range(3)]
    t = [scores((B, H, L, L), requires_grad=i == 2) for i in range(3)]
    check_against_reference(lambda *v: tbf.attention_kl_scores(list(v[:3]), list(v[3:])),
                            lambda *v: ref(list(v[:3]), list(v[3:])), s + t,
                            DTYPES[torch.float32])
    tbf.attention_kl_scores(s, t).backward()
    assert s[1].grad is None and t[0].grad is None and t[1].grad is None
    assert s[0].grad is not None and t[2].grad is not None


def test_reductions_and_no_grad(fused, device):
    B, H, L = 3, 2, 37
    mask = key_mask(B, L, dtype=torch.float32)
    x = pair((2, B, H, L, L), mask=mask)
    check_against_reference(fused_kl(mask, "sum"), ref_kl(mask, "sum"), x, DTYPES[torch.float32])
    with torch.no_grad():
        mean = fused_kl(mask)(*x)
        total = fused_kl(mask, "sum")(*x)
        unmasked = (fused_kl()(*x), fused_kl(reduction="sum")(*x))
    assert not mean.requires_grad
    torch.testing.assert_close(total, mean * (H * tokens(mask)), rtol=1e-5, atol=0)
    torch.testing.assert_close(unmasked[1], unmasked[0] * (B * H * L), rtol=1e-5, atol=0)


def test_torch_backend_is_the_reference(device):
    tbf.set_backend("torch")
    mask = key_mask(3, 37)
    loss, want = check_against_reference(fused_kl(mask), ref_kl(mask),
                                         pair((3, 2, 37, 37), mask=mask), DTYPES[torch.float32])
    assert "tinybert_fast" not in type(loss.grad_fn).__name__


@pytest.mark.skipif(not INTERPRETER, reason="counts launches in Triton's interpreter")
@pytest.mark.parametrize("as_list", [False, True], ids=["stacked", "list"])
def test_launches(fused, as_list, device):
    """One forward launch per stacked tensor (one per layer for lists), and one in-place scale of
    each gradient tensor in backward."""
    B, H, L, n = 2, 2, 9, 3
    mask = key_mask(B, L)
    s, t = pair((n, B, H, L, L), mask=mask)
    with count_launches() as forward:
        loss = tbf.attention_kl_scores(list(s.unbind(0)) if as_list else s, t, mask)
    with count_launches() as backward:
        loss.backward()
    per = n if as_list else 1
    # the forward kernel writes the gradients; backward scales them in place (one launch per
    # gradient tensor, which finds grad_output == 1 and moves nothing else)
    assert forward == {"_kl_scores_kernel": per}
    assert backward == {"_scale_in_place_kernel": per * 2}


# --- bad inputs ----------------------------------------------------------------------------------

# the argument checks are attention_mse's (_checks.attention_layers / check_attention)
BAD_INPUTS = dict(MSE_BAD_INPUTS)
BAD_INPUTS.update({
    "reduction-none": (lambda: ((_t(2, 3, 5, 5), _t(2, 3, 5, 5)), {"reduction": "none"}),
                       ValueError, r"reduction must be one of"),
    "mask-complex": (lambda: ((_t(2, 3, 5, 5), _t(2, 3, 5, 5)),
                              {"attention_mask": torch.ones(2, 5, dtype=torch.complex64,
                                                            device=DEVICE)}),
                     TypeError, r"attention_mask"),
    "mask-not-a-tensor": (lambda: ((_t(2, 3, 5, 5), _t(2, 3, 5, 5)),
                                   {"attention_mask": [[1] * 5] * 2}), TypeError,
                          r"attention_mask"),
})


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(backend, case):
    tbf.set_backend(backend)
    make_args, exc, match = BAD_INPUTS[case]
    for fn in (tbf.attention_kl_scores, ref):  # the public function and the reference alike
        args, kwargs = make_args()
        with pytest.raises(exc, match=match):
            fn(*args, **kwargs)


@needs_triton
def test_fused_rejects_float64(fused):
    with pytest.raises(TypeError, match=r"teacher.*float64"):
        tbf.attention_kl_scores(_t(2, 3, 5, 5), _t(2, 3, 5, 5, dtype=torch.float64))
    # the reference computes in any float dtype
    assert torch.isfinite(ref(_t(2, 3, 5, 5, dtype=torch.float64),
                              _t(2, 3, 5, 5, dtype=torch.float64)))


# --- registered ops -------------------------------------------------------------------------------

def _op_inputs(requires_grad=True, with_mask=True):
    """Two groups (2 stacked layers, then 1) over B=2, H=3, L=7, sequence 1 fully padded."""
    B, H, L = 2, 3, 7
    mask = key_mask(B, L, lengths=[7, 0]) if with_mask else None
    grad = "both" if requires_grad else "none"
    stacked = pair((2, B, H, L, L), mask=mask, grad=grad)
    single = pair((1, B, H, L, L), mask=mask, grad=grad)
    return [stacked[0], single[0]], [stacked[1], single[1]], mask


@pytest.mark.parametrize("backend", opcheck_backends())
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_opcheck_forward(backend, reduction, with_mask):
    tbf.set_backend(backend)
    s, t, mask = _op_inputs(with_mask=with_mask)
    # the inputs require grad: the op is told to write their gradients (as the public function does)
    torch.library.opcheck(ops.attention_kl_scores.default, (s, t, mask, reduction, True, True))


@pytest.mark.parametrize("backend", opcheck_backends())
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["ds+dt", "ds", "dt", "none"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_opcheck_forward_with_gradients(backend, need, with_mask):
    tbf.set_backend(backend)
    s, t, mask = _op_inputs(requires_grad=False, with_mask=with_mask)
    torch.library.opcheck(ops.attention_kl_scores.default, (s, t, mask, "mean", *need))


@pytest.mark.parametrize("backend", opcheck_backends())
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_op_values(backend, with_mask):
    """The ops on every backend (the PyTorch CPU kernels included) against the float64 reference:
    the loss, the forward's gradient outputs (incoming gradient 1), and the gradients through
    autograd with grad_output != 1."""
    tbf.set_backend(backend)
    s, t, mask = _op_inputs(with_mask=with_mask)
    loss, gs, gt = ops.attention_kl_scores(s, t, mask, "mean", True, True)
    flat = [[v for g in x for v in g.unbind(0)] for x in (s, t)]
    flat64 = [[v.detach().double().requires_grad_() for v in lst] for lst in flat]
    want = ref(*flat64, mask)
    assert_rel("loss", loss, want, 1e-5)
    for g in (1.0, random_scale()):
        if g == 1.0:
            got = gs + gt
        else:
            loss = ops.attention_kl_scores(s, t, mask, "mean", True, True)[0]
            got = torch.autograd.grad(loss, s + t, torch.tensor(g, device=DEVICE))
        want_g = torch.autograd.grad(want, flat64[0] + flat64[1],
                                     torch.tensor(g, dtype=torch.float64, device=DEVICE),
                                     retain_graph=True)
        want_g = [torch.stack(want_g[0:2]), want_g[2][None], torch.stack(want_g[3:5]),
                  want_g[5][None]]
        for i, (a, b) in enumerate(zip(got, want_g)):
            assert a.is_contiguous()
            assert_rel(f"grad {i}, g={g}", a, b, 1e-5)
    loss, gs, gt = ops.attention_kl_scores(s, t, mask, "mean", False, True)
    assert gs == [] and len(gt) == 2


# --- torch.compile --------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("as_list,with_mask", [(False, True), (True, True), (False, False)],
                         ids=["stacked", "list", "stacked-no-mask"])
def test_compile_fullgraph(as_list, with_mask, device):
    # "auto" runs the compiled kernels on CUDA; on CPU "triton" runs them interpreted
    tbf.set_backend("auto" if ON_CUDA else "triton")
    torch._dynamo.reset()
    B, H, L = 3, 2, 37
    mask = key_mask(B, L) if with_mask else None

    def fn(s, t):
        if as_list:
            s, t = list(s.unbind(0)), list(t.unbind(0))
        return tbf.attention_kl_scores(s, t, mask) * 0.5 + 1.0

    x = pair((2, B, H, L, L), mask=mask)
    compiled = torch.compile(fn, fullgraph=True)
    y = [v.detach().clone().requires_grad_() for v in x]
    got = compiled(*y)
    want = fn(*x)
    assert_fused(want)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    g = torch.tensor(random_scale(), device=device)
    for a, b in zip(torch.autograd.grad(got, y, g), torch.autograd.grad(want, x, g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
