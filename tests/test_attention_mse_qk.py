"""tinybert_fast.attention_mse_qk and the ops tinybert_fast::attention_mse_qk(_backward).

The reference is the score path (tinybert_fast.reference.attention_mse_qk: Q K^T / sqrt(d) with the
-10000 mask bias, then attention_mse) in float64 on the same (rounded) inputs.
"""

from __future__ import annotations

import pytest
import torch

import tinybert_fast as tbf
from conftest import (DEVICE, DTYPES, LOSS_SCALE, ON_CUDA, Tol, assert_fused, assert_rel,
                      check_against_reference, dtype_params, needs_triton, opcheck_backends,
                      random_scale, rel_err, upcast)
from tinybert_fast.ops.attention_mse_qk import AUTO_GRAM_MIN_L, resolve_method

ops = torch.ops.tinybert_fast
ref = tbf.reference.attention_mse_qk
METHODS = ["gram", "tiled"]

# (B, H, L, d_s, d_t): L=37 odd, L=1, L=130 spills past a 64-row tile, L=600 splits the Gram
# reduction over two programs per head; head dims 26 vs 64 (TinyBERT4 <- BERT-base), equal and
# below the 16-wide dot minimum (8), and a student wider than its teacher.
SHAPES = [(3, 5, 37, 26, 64), (2, 1, 1, 26, 64), (1, 3, 130, 26, 64), (2, 2, 16, 8, 8),
          (1, 2, 33, 64, 26), (1, 1, 600, 26, 64)]
SHAPE_IDS = [f"B{b}H{h}L{l}d{ds}-{dt}" for b, h, l, ds, dt in SHAPES]
# TinyBERT4 <- BERT-base at max length 128 (batch 32 on CUDA; 4 under the interpreter, where one
# pass over 96 heads takes ~10 s).
REAL_SHAPE = (32 if ON_CUDA else 2, 12, 128, 26, 64)


def qk(B, H, L, d_s, d_t, dtype=torch.float32, teacher_dtype=None, grad="student", layers=None,
       device=DEVICE):
    """[q_s, k_s, q_t, k_t] ~ N(0, 1) ([layers, ...] when layers is given); `grad`: which require
    grad ("student", "teacher", "all", "none")."""
    teacher_dtype = teacher_dtype or dtype
    lead = (B, H, L) if layers is None else (layers, B, H, L)
    out = []
    for i, (d, dt) in enumerate(((d_s, dtype), (d_s, dtype), (d_t, teacher_dtype),
                                 (d_t, teacher_dtype))):
        x = torch.randn((*lead, d), device=device).to(dt)
        needs = grad == "all" or (grad == "student" and i < 2) or (grad == "teacher" and i >= 2)
        out.append(x.requires_grad_(needs))
    return out


def key_mask(B, L, lengths=None, dtype=torch.int64, device=DEVICE):
    """[B, L] key-padding mask, 1 = token; default lengths random with batch row 1 fully padded."""
    if lengths is None:
        lengths = torch.randint(1, L + 1, (B,)).tolist()
        if B > 1:
            lengths[1] = 0
    m = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    return m.to(device=device, dtype=dtype)


def close_pair(B, H, L, d_s, d_t, eps, device=DEVICE):
    """Student/teacher Q, K (fp32) whose scores differ by a relative r ~ 0.77 * eps: the teacher
    carries the student's scores in its first d_s dims (rescaled for 1/sqrt(d_t)) plus eps-sized
    scores from the other d_t - d_s dims."""
    s = (d_t / d_s) ** 0.25
    q_s, k_s = (torch.randn(B, H, L, d_s, device=device) for _ in range(2))
    q_r, k_r = (torch.randn(B, H, L, d_t - d_s, device=device) for _ in range(2))
    q_t = torch.cat([q_s * s, q_r], -1)
    k_t = torch.cat([k_s * s, k_r * eps], -1)
    return [q_s.requires_grad_(), k_s.requires_grad_(), q_t, k_t]


def fused_qk(method, mask=None, reduction="mean"):
    def fn(*x):
        return tbf.attention_mse_qk(*x, attention_mask=mask, reduction=reduction, method=method)
    return fn


def ref_qk(mask=None, reduction="mean"):
    return lambda *x: ref(*x, attention_mask=mask, reduction=reduction)


# --- exact semantics on tiny hand-computed cases --------------------------------------------------

BACKEND_METHODS = [pytest.param("torch", "auto", id="torch"),
                   pytest.param("triton", "gram", id="triton-gram", marks=needs_triton),
                   pytest.param("triton", "tiled", id="triton-tiled", marks=needs_triton)]


@pytest.mark.parametrize("backend,method", BACKEND_METHODS)
def test_hand_computed(backend, method, device):
    tbf.set_backend(backend)
    # d = 1 (scale 1): S_s = [[1, 0], [2, 0]], S_t = [[1, .5], [2, 1]], D = [[0, -.5], [0, -1]]
    q_s = torch.tensor([[[[1.0], [2.0]]]], device=device, requires_grad=True)
    k_s = torch.tensor([[[[1.0], [0.0]]]], device=device, requires_grad=True)
    q_t = torch.tensor([[[[0.5], [1.0]]]], device=device)
    k_t = torch.tensor([[[[2.0], [1.0]]]], device=device)
    fn = fused_qk(method)
    assert fn(q_s, k_s, q_t, k_t).item() == 1.25 / 4
    assert fused_qk(method, reduction="sum")(q_s, k_s, q_t, k_t).item() == 1.25
    # key 1 padded: D's column 1 removed, still divided by B*H*L*L = 4
    mask = torch.tensor([[1, 0]], device=device)
    assert fused_qk(method, mask)(q_s, k_s, q_t, k_t).item() == 0.0
    # key 0 padded: query row 0 is NOT masked, column 1 (0.25 + 1) survives
    mask0 = torch.tensor([[0, 1]], device=device)
    loss = fused_qk(method, mask0)(q_s, k_s, q_t, k_t)
    assert loss.item() == 1.25 / 4
    loss.backward()
    # dQ_s = 2/4 D M K_s = .5 * [[-.5], [-1]] * k_s[1] = 0;  dK_s = .5 M D^T Q_s: row 0 masked,
    # row 1 = .5 * (-.5 * 1 + -1 * 2) = -1.25
    torch.testing.assert_close(q_s.grad, torch.zeros_like(q_s), rtol=0, atol=0)
    torch.testing.assert_close(k_s.grad, torch.tensor([[[[0.0], [-1.25]]]], device=device),
                               rtol=0, atol=0)
    # layers are summed
    two = fn([q_s, q_s], [k_s, k_s], [q_t, q_t], [k_t, k_t])
    assert two.item() == 2 * 1.25 / 4


# --- agreement with the score path (float64) ------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_score_path(fused, shape, method, device):
    B, H, L, d_s, d_t = shape
    mask = key_mask(B, L)
    x = qk(*shape)
    loss, _ = check_against_reference(fused_qk(method, mask), ref_qk(mask), x,
                                      score_path_tol(method, x, mask))
    assert_fused(loss)
    check_against_reference(fused_qk(method), ref_qk(), x, score_path_tol(method, x, None))


def score_path_tol(method, x, mask, tol=DTYPES[torch.float32]):
    """fp32 tolerance, with the Gram form's documented cancellation bound on the loss: its three
    traces cancel, so its relative error grows like eps_fp32 * kappa, kappa = (||S_s||^2 +
    ||S_t||^2) / ||S_s - S_t||^2 over the valid entries (the constant 16 covers the rounding of
    the d-term products; e.g. B2H1L1 with one valid score, kappa = 800, errs 2.7 eps * kappa)."""
    if method != "gram":
        return tol
    q_s, k_s, q_t, k_t = (t.detach().double() for t in x)
    s = q_s @ k_s.transpose(-1, -2) * q_s.shape[-1] ** -0.5
    t = q_t @ k_t.transpose(-1, -2) * q_t.shape[-1] ** -0.5
    if mask is not None:
        m = mask.double()
        w = m[:, None, :, None] * m[:, None, None, :]
        s, t = s * w, t * w
    diff = (s - t).square().sum()
    if diff == 0:
        return tol
    kappa = float((s.square().sum() + t.square().sum()) / diff)
    return Tol(max(tol.loss, 16 * torch.finfo(torch.float32).eps * kappa), tol.grad)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", dtype_params())
def test_dtypes(fused, dtype, method, device):
    B, H, L, d_s, d_t = 3, 5, 37, 26, 64
    mask = key_mask(B, L, dtype=torch.bool)
    check_against_reference(fused_qk(method, mask), ref_qk(mask), qk(B, H, L, d_s, d_t, dtype),
                            DTYPES[dtype], grad_scale=random_scale(1.0, 2.0) * LOSS_SCALE[dtype])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16), (torch.float16, torch.float32)],
                         ids=["fp32-fp16", "fp16-fp32"])
def test_mixed_student_teacher_dtypes(fused, dtypes, method, device):
    """Student and teacher in different dtypes: the Gram form's cross products run in fp32."""
    B, H, L = 2, 3, 37
    s_dtype, t_dtype = dtypes
    x = qk(B, H, L, 26, 64, s_dtype, t_dtype, grad="all")
    tol = Tol(DTYPES[torch.float32].loss, max(DTYPES[s_dtype].grad, DTYPES[t_dtype].grad))
    mask = key_mask(B, L)
    check_against_reference(fused_qk(method, mask), ref_qk(mask), x, tol,
                            grad_scale=random_scale(1.0, 2.0) * LOSS_SCALE[torch.float16])


@pytest.mark.parametrize("method", METHODS)
def test_real_shape(fused, method, device):
    """TinyBERT4 <- BERT-base with padding, scores at a realistic scale (|S| up to ~15)."""
    B, H, L, d_s, d_t = REAL_SHAPE
    lengths = torch.randint(16, L + 1, (B,)).tolist()
    lengths[0] = L
    mask = key_mask(B, L, lengths=lengths)
    x = qk(B, H, L, d_s, d_t)
    with torch.no_grad():
        for t in x:
            t.mul_(2.0)
    loss, want = check_against_reference(fused_qk(method, mask), ref_qk(mask), x,
                                         DTYPES[torch.float32])
    assert_fused(loss)


# --- student -> teacher: cancellation -------------------------------------------------------------

@pytest.mark.parametrize("eps", [1e-2, 1e-3])
def test_student_close_to_teacher(fused, eps, device):
    """The tiled path keeps the score path's accuracy as the student approaches the teacher; the
    Gram form's loss error grows like eps_fp32 * (||S|| / ||S_s - S_t||)^2 (documented bound 1e-6
    / r^2, measured ~1e-7 / r^2) and its gradients' like eps_fp32 * ||S|| / ||S_s - S_t||."""
    B, H, L, d_s, d_t = 2, 3, 96, 26, 64
    mask = key_mask(B, L, lengths=[L, 70])
    x = close_pair(B, H, L, d_s, d_t, eps)
    x64 = upcast(x)
    want = ref(*x64, mask)
    want_g = torch.autograd.grad(want, x64[:2])
    with torch.no_grad():
        keep = mask[:, None, None, :].double()
        s_s = x64[0] @ x64[1].transpose(-1, -2) / d_s ** 0.5 * keep
        s_t = x64[2] @ x64[3].transpose(-1, -2) / d_t ** 0.5 * keep
        r = (torch.linalg.vector_norm(s_s - s_t) / torch.linalg.vector_norm(s_t)).item()
    assert 0.3 * eps < r < 3 * eps
    errors = {}
    for method in METHODS:
        loss = fused_qk(method, mask)(*x)
        got_g = torch.autograd.grad(loss, x[:2])
        errors[method] = (rel_err(loss, want), *(rel_err(g, w) for g, w in zip(got_g, want_g)))
    loss_t, *grad_t = errors["tiled"]
    assert loss_t <= 1e-5, errors
    assert max(grad_t) <= 1e-5 / r, errors
    loss_g, *grad_g = errors["gram"]
    assert loss_g <= 1e-6 / r ** 2, errors
    assert max(grad_g) <= 1e-5 / r, errors


# --- semantics: masks, the -100 rule, gradients ---------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_padding_gradients(fused, method, device):
    """Padded keys get exactly zero K gradients; padded queries are not masked (nonzero Q grads);
    a fully padded batch row contributes nothing."""
    B, H, L = 3, 2, 37
    mask = key_mask(B, L, lengths=[37, 0, 20])
    x = qk(B, H, L, 26, 64, grad="all")
    loss = fused_qk(method, mask)(*x)
    g = torch.autograd.grad(loss, x)
    for gk in (g[1], g[3]):
        assert (gk[1] == 0).all() and (gk[2, :, 20:] == 0).all()
        assert (gk[2, :, :20] != 0).any()
    assert (g[0][2, :, 20:] != 0).any() and (g[2][2, :, 20:] != 0).any()
    assert (g[0][1] == 0).all()  # no live key at all in batch row 1
    # batch row 1 adds nothing, whatever it holds
    with torch.no_grad():
        y = [t.detach().clone() for t in x]
        for t in y:
            t[1].normal_()
        assert_rel("loss", fused_qk(method, mask)(*y), loss.detach(), 1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_threshold_rule_difference(backend, device):
    """The documented difference: an unmasked score <= -100 is zeroed by the score path only."""
    tbf.set_backend(backend)
    q_s = torch.tensor([[[[1.0], [2.0]]]], device=device)
    k_s = torch.tensor([[[[-150.0], [1.0]]]], device=device)  # S_s[0, 0] = -150, S_s[1, 0] = -300
    q_t = torch.tensor([[[[1.0], [1.0]]]], device=device)
    k_t = torch.tensor([[[[1.0], [1.0]]]], device=device)
    # score path: s' = [[0, 1], [0, 2]], t = 1 everywhere -> (1 + 0 + 1 + 1) / 4
    score = ref(q_s, k_s, q_t, k_t)
    assert score.item() == 3.0 / 4
    if backend == "triton":
        for method in METHODS:  # the identity keeps -150 and -300: 151^2 + 0 + 301^2 + 1
            got = fused_qk(method)(q_s, k_s, q_t, k_t)
            assert got.item() == pytest.approx((151.0 ** 2 + 301.0 ** 2 + 1.0) / 4, rel=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", ["student", "teacher", "all"])
def test_gradients_where_required(fused, method, which, device):
    """Teacher gradients are supported (the loss is symmetric); inputs that do not require grad
    get none."""
    B, H, L = 3, 2, 37
    mask = key_mask(B, L)
    x = qk(B, H, L, 26, 64, grad=which)
    check_against_reference(fused_qk(method, mask), ref_qk(mask), x, DTYPES[torch.float32])
    fused_qk(method, mask)(*x).backward()
    for i, t in enumerate(x):
        assert (t.grad is None) == (not t.requires_grad), i
    # only q_s: one of the four gradients
    y = [t.detach().requires_grad_(i == 0) for i, t in enumerate(x)]
    check_against_reference(fused_qk(method, mask), ref_qk(mask), y, DTYPES[torch.float32])


@pytest.mark.parametrize("method", ["auto", *METHODS])
def test_layer_forms_agree(fused, method, device):
    """Stacked [n, B, H, L, d], lists, tuples and mixed forms give the same loss and gradients."""
    B, H, L, n = 2, 2, 37, 2
    mask = key_mask(B, L)
    x = qk(B, H, L, 26, 64, layers=n)
    want = ref(*upcast(x), mask)
    forms = {
        "stacked": lambda *x: x,
        "list": lambda *x: [list(t.unbind(0)) for t in x],
        "tuple": lambda *x: [tuple(t.unbind(0)) for t in x],
        "mixed": lambda *x: [x[0], list(x[1].unbind(0)), x[2], x[3]],
    }
    g = random_scale()
    results = {}
    for name, form in forms.items():
        y = [t.detach().clone().requires_grad_(t.requires_grad) for t in x]
        loss = tbf.attention_mse_qk(*form(*y), mask, method=method)
        assert_rel(f"{name} loss", loss, want, DTYPES[torch.float32].loss)
        results[name] = torch.autograd.grad(loss, y[:2], torch.tensor(g, device=device))
    for name, grads in results.items():
        for a, b in zip(grads, results["stacked"]):
            assert_rel(f"{name} grad", a, b, 1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_noncontiguous(fused, method, device):
    """Q/K as Hugging Face makes them: [B, L, H, d] viewed as [B, H, L, d]; a strided mask."""
    B, H, L, d_s, d_t = 2, 3, 37, 26, 64
    x = [t.transpose(1, 2) for t in qk(B, L, H, d_s, d_t, grad="none")]
    x = [t.detach().requires_grad_(i < 2) for i, t in enumerate(x)]
    assert not any(t.is_contiguous() for t in x)
    mask = key_mask(B, L)
    mask_t = mask.t().contiguous().t()
    assert not mask_t.is_contiguous()
    check_against_reference(fused_qk(method, mask_t), ref_qk(mask), x, DTYPES[torch.float32])


@pytest.mark.parametrize("method", METHODS)
def test_reductions_and_no_grad(fused, method, device):
    B, H, L = 3, 2, 37
    mask = key_mask(B, L, dtype=torch.float32)
    x = qk(B, H, L, 26, 64)
    check_against_reference(fused_qk(method, mask, "sum"), ref_qk(mask, "sum"), x,
                            DTYPES[torch.float32])
    with torch.no_grad():
        mean = fused_qk(method, mask)(*x)
        total = fused_qk(method, mask, "sum")(*x)
    assert not mean.requires_grad
    torch.testing.assert_close(total, mean * (B * H * L * L), rtol=1e-5, atol=0)


def test_auto_chooses_by_shape(fused, device):
    assert resolve_method("auto", AUTO_GRAM_MIN_L - 1) == "tiled"
    assert resolve_method("auto", AUTO_GRAM_MIN_L) == "gram"
    assert resolve_method("gram", 8) == "gram" and resolve_method("tiled", 4096) == "tiled"
    x = qk(2, 2, 37, 26, 64)
    with torch.no_grad():
        assert fused_qk("auto")(*x).item() == fused_qk("tiled")(*x).item()


def test_torch_backend_is_the_score_path(device):
    tbf.set_backend("torch")
    mask = key_mask(3, 37)
    check_against_reference(fused_qk("gram", mask), ref_qk(mask), qk(3, 2, 37, 26, 64),
                            DTYPES[torch.float32])


# --- bad inputs ----------------------------------------------------------------------------------

def _x(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(shape, device=device).to(dtype)


def _args(s=(2, 3, 5, 4), t=(2, 3, 5, 8), **over):
    args = {"q_s": _x(*s), "k_s": _x(*s), "q_t": _x(*t), "k_t": _x(*t)}
    args.update(over)
    return args


BAD_INPUTS = {
    # name: (lambda -> kwargs, exception, regex the message must match)
    "H-mismatch": (lambda: _args(t=(2, 4, 5, 8)), ValueError, r"q_t has shape \(2, 4, 5, 8\)"),
    "L-mismatch": (lambda: _args(t=(2, 3, 6, 8)), ValueError, r"q_t"),
    "B-mismatch": (lambda: _args(t=(3, 3, 5, 8)), ValueError, r"q_t"),
    "d-qs-ks": (lambda: _args(k_s=_x(2, 3, 5, 6)), ValueError, r"k_s has shape \(2, 3, 5, 6\)"),
    "d-qt-kt": (lambda: _args(k_t=_x(2, 3, 5, 4)), ValueError, r"k_t has shape"),
    "rank-3": (lambda: _args(q_s=_x(3, 5, 4)), ValueError, r"q_s must be"),
    "rank-6": (lambda: _args(k_t=_x(1, 1, 2, 3, 5, 8)), ValueError, r"k_t must be"),
    "layer-count": (lambda: _args(q_t=[_x(2, 3, 5, 8)] * 2), ValueError,
                    r"q_t has 2 layers but q_s has 1"),
    "int": (lambda: _args(k_s=torch.ones(2, 3, 5, 4, dtype=torch.int64, device=DEVICE)),
            TypeError, r"k_s"),
    "mask-shape": (lambda: _args(attention_mask=torch.ones(2, 6, device=DEVICE)), ValueError,
                   r"attention_mask.*\[2, 5\]"),
    "mask-not-tensor": (lambda: _args(attention_mask=[[1] * 5] * 2), TypeError,
                        r"attention_mask"),
    "reduction": (lambda: _args(reduction="batchmean"), ValueError, r"reduction"),
    "method": (lambda: _args(method="flash"), ValueError, r"method"),
    "empty-list": (lambda: _args(q_s=[]), ValueError, r"q_s"),
    "not-a-tensor": (lambda: _args(q_s="queries"), TypeError, r"q_s"),
    "empty": (lambda: _args(s=(2, 3, 0, 4), t=(2, 3, 0, 8)), ValueError, r"empty"),
}


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(backend, case):
    tbf.set_backend(backend)
    make_args, exc, match = BAD_INPUTS[case]
    with pytest.raises(exc, match=match):
        tbf.attention_mse_qk(**make_args())


@needs_triton
def test_fused_rejects_float64_and_wide_heads(fused):
    with pytest.raises(TypeError, match=r"q_s.*float64"):
        tbf.attention_mse_qk(**_args(q_s=_x(2, 3, 5, 4, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"head dims.*128"):
        tbf.attention_mse_qk(**_args(t=(2, 3, 5, 192)))


# --- registered ops -------------------------------------------------------------------------------

def _op_inputs(requires_grad=True, with_mask=True):
    B, H, L = 2, 2, 7
    mask = key_mask(B, L, lengths=[7, 3]) if with_mask else None
    stacked = qk(B, H, L, 5, 9, layers=2, grad="all" if requires_grad else "none")
    single = qk(B, H, L, 5, 9, layers=1, grad="all" if requires_grad else "none")
    groups = [[a, b] for a, b in zip(stacked, single)]
    return groups, mask, 1.0 / (B * H * L * L)


@pytest.mark.parametrize("backend", opcheck_backends())
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_opcheck_forward(backend, method, with_mask):
    tbf.set_backend(backend)
    groups, mask, scale = _op_inputs(with_mask=with_mask)
    torch.library.opcheck(ops.attention_mse_qk.default, (*groups, mask, scale, method))


@pytest.mark.parametrize("backend", opcheck_backends())
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("need", [(True, True, False, False), (True, False, True, True),
                                  (False, True, False, True)], ids=["student", "q", "k"])
def test_opcheck_backward(backend, method, need):
    tbf.set_backend(backend)
    groups, mask, scale = _op_inputs(requires_grad=False)
    _, grams = ops.attention_mse_qk(*groups, mask, scale, method)
    grad = torch.tensor(random_scale(), device=DEVICE)
    torch.library.opcheck(ops.attention_mse_qk_backward.default,
                          (grad, grams, *groups, mask, scale, method, *need))


@pytest.mark.parametrize("backend", opcheck_backends())
@pytest.mark.parametrize("method", METHODS)
def test_op_values(backend, method):
    """The ops on every backend (PyTorch CPU kernels included) against the float64 reference."""
    tbf.set_backend(backend)
    groups, mask, scale = _op_inputs()
    loss, grams = ops.attention_mse_qk(*groups, mask, scale, method)
    assert grams.shape[1] == ((2 + 1) * 2 * 2 if method == "gram" else 0)
    flat = [list(t for g in grp for t in g.unbind(0)) for grp in groups]
    flat64 = [[t.detach().double().requires_grad_() for t in lst] for lst in flat]
    want = ref(*flat64, mask)
    assert_rel("loss", loss, want, 1e-5)
    g = random_scale()
    got = torch.autograd.grad(loss, [t for grp in groups for t in grp],
                              torch.tensor(g, device=DEVICE))
    want_g = torch.autograd.grad(want, [t for lst in flat64 for t in lst],
                                 torch.tensor(g, dtype=torch.float64, device=DEVICE))
    want_g = iter(want_g)
    for grp_i, grp in enumerate(groups):
        for t, gt in zip(grp, got[2 * grp_i:2 * grp_i + 2]):
            w = torch.stack([next(want_g) for _ in range(t.shape[0])])
            assert_rel(f"grad {grp_i}", gt, w, 1e-5)


# --- torch.compile --------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("as_list", [False, True], ids=["stacked", "list"])
def test_compile_fullgraph(method, as_list, device):
    # "auto" runs the compiled kernels on CUDA; on CPU "triton" runs them interpreted
    tbf.set_backend("auto" if ON_CUDA else "triton")
    torch._dynamo.reset()
    B, H, L = 3, 2, 37
    mask = key_mask(B, L)

    def fn(q_s, k_s, q_t, k_t):
        x = [q_s, k_s, q_t, k_t]
        if as_list:
            x = [list(t.unbind(0)) for t in x]
        return tbf.attention_mse_qk(*x, mask, method=method) * 0.5 + 1.0

    x = qk(B, H, L, 26, 64, layers=2)
    compiled = torch.compile(fn, fullgraph=True)
    y = [t.detach().clone().requires_grad_(t.requires_grad) for t in x]
    got = compiled(*y)
    want = fn(*x)
    assert_fused(want)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    g = torch.tensor(random_scale(), device=device)
    for a, b in zip(torch.autograd.grad(got, y[:2], g), torch.autograd.grad(want, x[:2], g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
