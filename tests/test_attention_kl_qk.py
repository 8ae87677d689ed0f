"""tinybert_fast.attention_kl_qk and the ops tinybert_fast::attention_kl_qk(_backward).

The reference is the eager path (tinybert_fast.reference.attention_kl_qk: Q K^T / sqrt(d), log_softmax
over the tokens, KL(P_t || P_s) per valid query row) in float64 on the same (rounded) inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

import tinybert_fast as tbf
from conftest import (DEVICE, DTYPES, LOSS_SCALE, ON_CUDA, Tol, assert_fused, assert_rel,
                      check_against_reference, dtype_params, needs_triton, opcheck_backends,
                      random_scale, upcast)
from test_attention_mse_qk import BAD_INPUTS as QK_BAD_INPUTS
from test_attention_mse_qk import _args, _x, key_mask, qk
from test_attention_mse_qk import _op_inputs as qk_op_inputs

ops = torch.ops.tinybert_fast
ref = tbf.reference.attention_kl_qk

# (B, H, L, d_s, d_t): L=37 odd, L=1 (one key: both distributions are 1, KL 0), L=130 spills past
# a 64-row tile, head dims 26 vs 64 (TinyBERT4 <- BERT-base), equal and below the 16-wide dot
# minimum (8), and a student wider than its teacher.
SHAPES = [(3, 5, 37, 26, 64), (2, 1, 1, 26, 64), (1, 3, 130, 26, 64), (2, 2, 16, 8, 8),
          (1, 2, 33, 64, 26)]
SHAPE_IDS = [f"B{b}H{h}L{l}d{ds}-{dt}" for b, h, l, ds, dt in SHAPES]
# TinyBERT4 <- BERT-base at max length 128 (batch 32 on CUDA; 4 under the interpreter, where the
# forward + backward over 48 heads takes ~5 s).
REAL_SHAPE = (32 if ON_CUDA else 4, 12, 128, 26, 64)


def fused_kl(mask=None, reduction="mean"):
    return lambda *x: tbf.attention_kl_qk(*x, attention_mask=mask, reduction=reduction)


def ref_kl(mask=None, reduction="mean"):
    return lambda *x: ref(*x, attention_mask=mask, reduction=reduction)


def tokens(mask) -> int:
    return int((mask != 0).sum())


# --- exact semantics on a tiny hand-computed case -------------------------------------------------

def _softmax(row):
    e = [math.exp(v - max(row)) for v in row]
    return [v / sum(e) for v in e]


def _kl(p_t, p_s):
    return sum(t * (math.log(t) - math.log(s)) for t, s in zip(p_t, p_s))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_hand_computed(backend, device):
    tbf.set_backend(backend)
    # d = 1 (scale 1), L = 3 with token 2 padded: S_x[i, j] = q_x[i] * k_x[j] on keys 0 and 1
    qs_v, ks_v, qt_v, kt_v = [1.0, 2.0, 5.0], [1.0, 0.0, 3.0], [0.5, 1.0, 7.0], [2.0, 1.0, -1.0]

    def col(v, grad=False):
        return torch.tensor(v, device=device)[None, None, :, None].requires_grad_(grad)

    q_s, k_s, q_t, k_t = col(qs_v, True), col(ks_v, True), col(qt_v), col(kt_v)
    mask = torch.tensor([[1, 1, 0]], device=device)
    p_s = [_softmax([qs_v[i] * ks_v[j] for j in range(2)]) for i in range(2)]
    p_t = [_softmax([qt_v[i] * kt_v[j] for j in range(2)]) for i in range(2)]
    kl = [_kl(p_t[i], p_s[i]) for i in range(2)]
    loss = fused_kl(mask)(q_s, k_s, q_t, k_t)
    # rel 1e-5: the fused KL is lse_s - lse_t + E_t[S_t - S_s], O(|S|) terms for a KL of 0.05
    assert loss.item() == pytest.approx(sum(kl) / 2, rel=1e-5)  # / (H * tokens)
    assert fused_kl(mask, "sum")(q_s, k_s, q_t, k_t).item() == pytest.approx(sum(kl), rel=1e-5)
    loss.backward()
    # dS_s = c (P_s - P_t), c = 1/2: dQ_s[i] = sum_j dS_ij k_s[j], dK_s[j] = sum_i dS_ij q_s[i];
    # the padded row and key get exactly 0
    ds = [[(p_s[i][j] - p_t[i][j]) / 2 for j in range(2)] for i in range(2)]
    want_q = [sum(ds[i][j] * ks_v[j] for j in range(2)) for i in range(2)] + [0.0]
    want_k = [sum(ds[i][j] * qs_v[i] for i in range(2)) for j in range(2)] + [0.0]
    torch.testing.assert_close(q_s.grad, col(want_q), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(k_s.grad, col(want_k), rtol=1e-5, atol=1e-7)
    assert q_s.grad[0, 0, 2].item() == 0.0 and k_s.grad[0, 0, 2].item() == 0.0
    # without a mask every row is valid: (KL over 3 keys) / (B*H*L); layers are summed
    full = sum(_kl(_softmax([qt_v[i] * k for k in kt_v]), _softmax([qs_v[i] * k for k in ks_v]))
               for i in range(3))
    assert fused_kl()(q_s, k_s, q_t, k_t).item() == pytest.approx(full / 3, rel=1e-5)
    two = fused_kl(mask)([q_s, q_s], [k_s, k_s], [q_t, q_t], [k_t, k_t])
    assert two.item() == pytest.approx(sum(kl), rel=1e-5)


# --- agreement with the eager reference (float64) -------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(fused, shape, device):
    B, H, L, d_s, d_t = shape
    mask = key_mask(B, L)
    x = qk(*shape)
    loss, _ = check_against_reference(fused_kl(mask), ref_kl(mask), x, DTYPES[torch.float32])
    assert_fused(loss)
    check_against_reference(fused_kl(), ref_kl(), x, DTYPES[torch.float32])


@pytest.mark.parametrize("dtype", dtype_params())
def test_dtypes(fused, dtype, device):
    B, H, L, d_s, d_t = 3, 5, 37, 26, 64
    mask = key_mask(B, L, dtype=torch.bool)
    check_against_reference(fused_kl(mask), ref_kl(mask), qk(B, H, L, d_s, d_t, dtype, grad="all"),
                            DTYPES[dtype], grad_scale=random_scale(1.0, 2.0) * LOSS_SCALE[dtype])


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.bfloat16, torch.float16)],
                         ids=["fp16-fp32", "bf16-fp16"])
def test_mixed_dtypes(fused, dtypes, device):
    """Student and teacher in different dtypes: each model's products run in its own dtype."""
    B, H, L = 2, 3, 37
    s_dtype, t_dtype = dtypes
    x = qk(B, H, L, 26, 64, s_dtype, t_dtype, grad="all")
    tol = Tol(*(max(getattr(DTYPES[s_dtype], f), getattr(DTYPES[t_dtype], f))
                for f in Tol._fields))
    mask = key_mask(B, L)
    check_against_reference(fused_kl(mask), ref_kl(mask), x, tol,
                            grad_scale=random_scale(1.0, 2.0) * LOSS_SCALE[torch.float16])


def test_real_shape(fused, device):
    """TinyBERT4 <- BERT-base with padding, scores at a realistic scale (|S| up to ~15), student
    and teacher gradients."""
    B, H, L, d_s, d_t = REAL_SHAPE
    mask = key_mask(B, L, lengths=[L] + torch.randint(16, L + 1, (B - 1,)).tolist())
    x = [(2.0 * t).requires_grad_() for t in qk(B, H, L, d_s, d_t, grad="none")]
    loss, _ = check_against_reference(fused_kl(mask), ref_kl(mask), x, DTYPES[torch.float32])
    assert_fused(loss)


def test_peaked_distributions(fused, device):
    """Scores of std 25, |S| up to ~100 (near one-hot rows): the online softmax's rescaling keeps
    every exp finite, where a naive exp(S) would overflow fp32 (e^88.7)."""
    B, H, L = 2, 2, 100
    x = qk(B, H, L, 26, 64)
    with torch.no_grad():
        for t in x:
            t.mul_(5.0)
    mask = key_mask(B, L, lengths=[L, 61])
    loss, _ = check_against_reference(fused_kl(mask), ref_kl(mask), x, DTYPES[torch.float32])
    assert torch.isfinite(loss)


# --- masks: padded queries, fully padded sequences, holes -----------------------------------------

def test_padding(fused, device):
    """Padded query rows and padded keys get exactly zero gradients, for student and teacher; a
    fully padded sequence adds nothing (no NaN anywhere), whatever it holds."""
    B, H, L = 3, 2, 37
    mask = key_mask(B, L, lengths=[37, 0, 20])
    x = qk(B, H, L, 26, 64, grad="all")
    check_against_reference(fused_kl(mask), ref_kl(mask), x, DTYPES[torch.float32])
    loss = fused_kl(mask)(*x)
    g = torch.autograd.grad(loss, x)
    for gi in g:
        assert torch.isfinite(gi).all()
        assert (gi[1] == 0).all() and (gi[2, :, 20:] == 0).all()  # padded rows (Q) / keys (K)
        assert (gi[2, :, :20] != 0).any()
    # padded positions of any input leave the loss unchanged
    with torch.no_grad():
        y = [t.detach().clone() for t in x]
        for t in y:
            t[1].normal_()
            t[2, :, 20:].normal_()
        assert_rel("loss", fused_kl(mask)(*y), loss.detach(), 1e-6)


def test_mask_with_holes(fused, device):
    """Non-prefix masks: left padding that leaves a whole 64-key tile without a token (the running
    maxima start at a finite floor), holes, one sequence without tokens; float mask values."""
    B, H, L = 3, 2, 130
    mask = torch.ones(B, L, device=device)
    mask[0, :70] = 0  # left padding: the first key tile has no token
    mask[1] = 0
    mask[2, ::3] = 0
    x = qk(B, H, L, 26, 64, grad="all")
    loss, _ = check_against_reference(fused_kl(mask), ref_kl(mask), x, DTYPES[torch.float32])
    assert torch.isfinite(loss)


def test_no_token_at_all(fused, device):
    """A batch without any token gives a loss of 0 and zero gradients (mean and sum)."""
    B, H, L = 2, 2, 20
    mask = torch.zeros(B, L, dtype=torch.int64, device=device)
    x = qk(B, H, L, 26, 64, grad="all")
    for reduction in ("mean", "sum"):
        loss = fused_kl(mask, reduction)(*x)
        assert loss.item() == 0.0 and ref_kl(mask, reduction)(*x).item() == 0.0
        for gi in torch.autograd.grad(loss, x):
            assert (gi == 0).all()


# --- student == teacher, value relations ----------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_student_equals_teacher(backend, device):
    """Equal distributions: loss exactly 0 and zero gradients (both dS vanish term by term)."""
    tbf.set_backend(backend)
    B, H, L, d = 2, 3, 37, 32
    q, k = qk(B, H, L, d, d, grad="none")[:2]
    q.requires_grad_()
    mask = key_mask(B, L, lengths=[37, 11])
    loss = fused_kl(mask)(q, k, q, k)
    assert loss.item() == 0.0
    assert (torch.autograd.grad(loss, q)[0] == 0).all()


def test_value_relation(fused, device):
    """MiniLM's value relation: attention_kl_qk(v_s, v_s, v_t, v_t), V standing for Q and K (the
    gradient of v_s sums both roles)."""
    B, H, L = 2, 3, 37
    v_s, _, v_t, _ = qk(B, H, L, 26, 64, grad="all")
    mask = key_mask(B, L)
    check_against_reference(lambda s, t: tbf.attention_kl_qk(s, s, t, t, mask),
                            lambda s, t: ref(s, s, t, t, mask), [v_s, v_t], DTYPES[torch.float32])


# --- gradients, layer forms, strides, reductions --------------------------------------------------

@pytest.mark.parametrize("which", ["student", "teacher", "all"])
def test_gradients_where_required(fused, which, device):
    """Teacher gradients are supported; inputs that do not require grad get none."""
    B, H, L = 3, 2, 37
    mask = key_mask(B, L)
    x = qk(B, H, L, 26, 64, grad=which)
    check_against_reference(fused_kl(mask), ref_kl(mask), x, DTYPES[torch.float32])
    fused_kl(mask)(*x).backward()
    for i, t in enumerate(x):
        assert (t.grad is None) == (not t.requires_grad), i
    # only k_t: one of the four gradients (the dK kernel alone, teacher side)
    y = [t.detach().requires_grad_(i == 3) for i, t in enumerate(x)]
    check_against_reference(fused_kl(mask), ref_kl(mask), y, DTYPES[torch.float32])


@pytest.mark.parametrize("n", [1, 3])
def test_layer_forms_agree(fused, n, device):
    """Lists, tuples and a mix of forms (one per input) give the stacked [n, B, H, L, d] loss and
    gradients (the list path launches per layer); the layers are summed."""
    mask = key_mask(2, 37)
    x = qk(2, 2, 37, 26, 64, layers=n, grad="all")
    g = torch.tensor(random_scale(), device=device)
    want = tbf.attention_kl_qk(*x, mask)
    want_g = torch.autograd.grad(want, x, g)
    per_layer = sum(ref(*[t[i] for t in upcast(x)], mask) for i in range(n))
    assert_rel("sum over layers", want, per_layer, DTYPES[torch.float32].loss)
    variants = {"list": [list] * 4, "tuple": [tuple] * 4, "mixed": [None, list, tuple, None]}
    for name, forms in variants.items():
        y = [t.detach().clone().requires_grad_() for t in x]
        args = [t if form is None else form(t.unbind(0)) for form, t in zip(forms, y)]
        loss = tbf.attention_kl_qk(*args, mask)
        assert_rel(f"{name} loss", loss, want, 1e-6)
        for i, (a, b) in enumerate(zip(torch.autograd.grad(loss, y, g), want_g)):
            assert_rel(f"{name} grad {i}", a, b, 1e-6)


def test_noncontiguous(fused, device):
    """Q/K as Hugging Face makes them: [B, L, H, d] viewed as [B, H, L, d]; a strided mask."""
    B, H, L, d_s, d_t = 2, 3, 37, 26, 64
    x = [t.transpose(1, 2) for t in qk(B, L, H, d_s, d_t, grad="none")]
    x = [t.detach().requires_grad_() for t in x]
    assert not any(t.is_contiguous() for t in x)
    mask = key_mask(B, L)
    mask_t = mask.t().contiguous().t()
    assert not mask_t.is_contiguous()
    check_against_reference(fused_kl(mask_t), ref_kl(mask), x, DTYPES[torch.float32])


def test_reductions_and_no_grad(fused, device):
    B, H, L = 3, 2, 37
    mask = key_mask(B, L, dtype=torch.float32)
    x = qk(B, H, L, 26, 64)
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
    check_against_reference(fused_kl(mask), ref_kl(mask), qk(3, 2, 37, 26, 64),
                            DTYPES[torch.float32])


# --- bad inputs ----------------------------------------------------------------------------------

# the argument checks are attention_mse_qk's (qk_inputs), so are its bad inputs, less `method`
BAD_INPUTS = {name: case for name, case in QK_BAD_INPUTS.items() if name != "method"}
BAD_INPUTS.update({
    # name: (lambda -> kwargs, exception, regex the message must match)
    "k_s-layer-count": (lambda: _args(k_s=[_x(2, 3, 5, 4)] * 3), ValueError,
                        r"k_s has 3 layers but q_s has 1"),
    "int-teacher": (lambda: _args(q_t=torch.ones(2, 3, 5, 8, dtype=torch.int64, device=DEVICE)),
                    TypeError, r"q_t must be a floating-point tensor"),
    "mask-complex": (lambda: _args(attention_mask=torch.ones(2, 5, dtype=torch.complex64,
                                                             device=DEVICE)),
                     TypeError, r"attention_mask"),
    "reduction-none": (lambda: _args(reduction="none"), ValueError, r"reduction must be one of"),
    "k_t-not-a-tensor": (lambda: _args(k_t="keys"), TypeError, r"k_t"),
})


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(backend, case):
    tbf.set_backend(backend)
    make_args, exc, match = BAD_INPUTS[case]
    for fn in (tbf.attention_kl_qk, ref):  # the public function and the reference check alike
        with pytest.raises(exc, match=match):
            fn(**make_args())


FUSED_ONLY_BAD_INPUTS = {
    "float64": (lambda: _args(k_s=_x(2, 3, 5, 4, dtype=torch.float64)), TypeError,
                r"k_s.*float64"),
    "wide-heads": (lambda: _args(t=(2, 3, 5, 160)), ValueError, r"head dims.*128"),
}


@needs_triton
@pytest.mark.parametrize("case", list(FUSED_ONLY_BAD_INPUTS))
def test_fused_only_limits(fused, case):
    """float64 and heads wider than 128: refused by the fused path, taken by the reference."""
    make_args, exc, match = FUSED_ONLY_BAD_INPUTS[case]
    with pytest.raises(exc, match=match):
        tbf.attention_kl_qk(**make_args())
    assert torch.isfinite(ref(**make_args()))


# --- registered ops -------------------------------------------------------------------------------

def _op_inputs(requires_grad=True, with_mask=True):
    """attention_mse_qk's op inputs: two groups (2 stacked layers, then 1) over B=2, H=2, L=7,
    the mask padding half of row 1."""
    groups, mask, _ = qk_op_inputs(requires_grad, with_mask)
    return groups, mask


@pytest.mark.parametrize("backend", opcheck_backends())
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_opcheck_forward(backend, reduction, with_mask):
    tbf.set_backend(backend)
    groups, mask = _op_inputs(with_mask=with_mask)
    torch.library.opcheck(ops.attention_kl_qk.default, (*groups, mask, reduction))


@pytest.mark.parametrize("backend", opcheck_backends())
@pytest.mark.parametrize("need", [(True, True, False, False), (True, False, True, True),
                                  (False, True, False, True)], ids=["student", "q", "k"])
def test_opcheck_backward(backend, need):
    tbf.set_backend(backend)
    groups, mask = _op_inputs(requires_grad=False)
    _, stats = ops.attention_kl_qk(*groups, mask, "mean")
    grad = torch.tensor(random_scale(), device=DEVICE)
    torch.library.opcheck(ops.attention_kl_qk_backward.default,
                          (grad, stats, *groups, mask, "mean", *need))


@pytest.mark.parametrize("backend", opcheck_backends())
def test_op_values(backend):
    """The ops on every backend (PyTorch CPU kernels included) against the float64 reference,
    the saved statistics against their definitions."""
    tbf.set_backend(backend)
    groups, mask = _op_inputs()
    loss, stats = ops.attention_kl_qk(*groups, mask, "mean")
    assert stats.shape == (3, (2 + 1) * 2 * 2, 7) and stats.dtype == torch.float32
    flat = [list(t for g in grp for t in g.unbind(0)) for grp in groups]
    flat64 = [[t.detach().double().requires_grad_() for t in lst] for lst in flat]
    want = ref(*flat64, mask)
    assert_rel("loss", loss, want, 1e-5)
    # lse_s, lse_t and KL per row over the heads of all groups; 0 on padded query rows
    with torch.no_grad():
        tok = mask != 0
        keys = tok[:, None, None, :]
        z = [torch.stack(lst) @ torch.stack(k).transpose(-1, -2) / lst[0].shape[-1] ** 0.5
             for lst, k in ((flat64[0], flat64[1]), (flat64[2], flat64[3]))]
        lse = [torch.logsumexp(s.masked_fill(~keys, -torch.inf), -1) for s in z]
        lp = [s - l[..., None] for s, l in zip(z, lse)]
        kl = torch.where(keys, lp[1].exp() * (lp[1] - lp[0]), 0.0).sum(-1)
        rows = tok[:, None, :].expand_as(kl)
        for i, value in enumerate((*lse, kl)):
            want_i = torch.where(rows, value, 0.0).reshape(-1, 7)
            assert_rel(f"stats[{i}]", stats[i], want_i, 1e-5)
    g = random_scale()
    got = torch.autograd.grad(loss, [t for grp in groups for t in grp],
                              torch.tensor(g, device=DEVICE))
    want_g = iter(torch.autograd.grad(want, [t for lst in flat64 for t in lst],
                                      torch.tensor(g, dtype=torch.float64, device=DEVICE)))
    for grp_i, grp in enumerate(groups):
        for t, gt in zip(grp, got[2 * grp_i:2 * grp_i + 2]):
            w = torch.stack([next(want_g) for _ in range(t.shape[0])])
            assert_rel(f"grad {grp_i}", gt, w, 1e-5)


# --- torch.compile --------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("as_list,with_mask", [(False, True), (True, True), (False, False)],
                         ids=["stacked", "list", "stacked-no-mask"])
def test_compile_fullgraph(as_list, with_mask, device):
    # "auto" runs the compiled kernels on CUDA; on CPU "triton" runs them interpreted
    tbf.set_backend("auto" if ON_CUDA else "triton")
    torch._dynamo.reset()
    mask = key_mask(3, 37) if with_mask else None

    def fn(q_s, k_s, q_t, k_t):
        x = [q_s, k_s, q_t, k_t]
        if as_list:
            x = [list(t.unbind(0)) for t in x]
        return tbf.attention_kl_qk(*x, mask) * 0.5 + 1.0

    x = qk(3, 2, 37, 26, 64, layers=2, grad="all")
    compiled = torch.compile(fn, fullgraph=True)
    y = [t.detach().clone().requires_grad_() for t in x]
    got = compiled(*y)
    want = fn(*x)
    assert_fused(want)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    g = torch.tensor(random_scale(), device=device)
    for a, b in zip(torch.autograd.grad(got, y, g), torch.autograd.grad(want, x, g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_deprecated_name_warns_and_is_the_same_loss():
    """attention_kl (0.1.0's name of this loss; it takes score maps in the next release) and its
    reference warn FutureWarning, naming attention_kl_qk, and return attention_kl_qk's value."""
    torch.manual_seed(0)
    x = [torch.randn(2, 3, 9, d) for d in (8, 8, 16, 16)]
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    for old, new in ((tbf.attention_kl, tbf.attention_kl_qk),
                     (tbf.reference.attention_kl, tbf.reference.attention_kl_qk)):
        with pytest.warns(FutureWarning, match="attention_kl_qk"):
            got = old(*x, mask, "sum")
        torch.testing.assert_close(got, new(*x, mask, "sum"), rtol=0, atol=0)
