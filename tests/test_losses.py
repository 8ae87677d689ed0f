"""distillation_loss / DistillLoss and the nn.Module wrappers."""

from __future__ import annotations

import pytest
import torch

import tinybert_fast as tbf
from conftest import (DEVICE, DTYPES, ON_CUDA, assert_fused, assert_rel, check_against_reference,
                      make, needs_triton, random_scale, upcast)

R = tbf.reference
# "auto" is the eager reference on CPU and the fused kernels on CUDA; "triton" the fused kernels
# (interpreted on CPU).
BACKENDS = ["auto", pytest.param("triton", marks=needs_triton)]

B, H, L, D_S, D_T, C = 3, 4, 37, 26, 50, 3
N_LAYERS = 2


def stage_inputs(device=DEVICE):
    mask = (torch.arange(L)[None, :] < torch.tensor([L, 0, 20])[:, None]).long().to(device)
    bias = (mask == 0)[None, :, None, None, :] * -10000.0
    return dict(
        student_attention=(torch.randn(N_LAYERS, B, H, L, L, device=device) * 3 + bias).requires_grad_(),
        teacher_attention=torch.randn(N_LAYERS, B, H, L, L, device=device) * 3 + bias,
        attention_mask=mask,
        student_hidden=make((N_LAYERS + 1, B, L, D_S)),
        teacher_hidden=make((N_LAYERS + 1, B, L, D_T), requires_grad=False),
        weight=make((D_T, D_S), scale=D_S ** -0.5),
        bias=make((D_T,), scale=0.1),
        student_logits=make((B, C), scale=2.0),
        teacher_logits=make((B, C), scale=2.0, requires_grad=False),
    )


def _uses_fused(backend):
    return backend == "triton" or ON_CUDA


@pytest.mark.parametrize("backend", BACKENDS)
def test_distillation_loss_all_terms(backend):
    tbf.set_backend(backend)
    x = stage_inputs()
    out = tbf.distillation_loss(**x, temperature=2.0)
    assert isinstance(out, tbf.DistillLoss) and isinstance(out, tuple)
    assert out._fields == ("total", "attention", "hidden", "prediction")
    att = R.attention_mse(*upcast([x["student_attention"], x["teacher_attention"]]),
                          x["attention_mask"])
    hid = R.hidden_mse(*upcast([x["student_hidden"], x["teacher_hidden"], x["weight"], x["bias"]]))
    pred = R.soft_cross_entropy(*upcast([x["student_logits"], x["teacher_logits"]]), 2.0)
    for name, got, want in [("attention", out.attention, att), ("hidden", out.hidden, hid),
                            ("prediction", out.prediction, pred)]:
        assert got.dtype == torch.float32 and got.dim() == 0
        assert_rel(name, got, want.double(), 1e-5)
    torch.testing.assert_close(out.total, out.attention + out.hidden + out.prediction)
    if _uses_fused(backend):
        for term in (out.attention, out.hidden, out.prediction):
            assert_fused(term)


@pytest.mark.parametrize("backend", BACKENDS)
def test_distillation_loss_gradients(backend):
    """Gradient of the weighted total (grad_output != 1) for every input that requires grad."""
    tbf.set_backend(backend)
    x = stage_inputs()
    x["teacher_logits"].requires_grad_()  # the teacher can be trained too
    names = [k for k, v in x.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    fixed = {k: v for k, v in x.items() if k not in names}
    weights = dict(attention_weight=0.5, hidden_weight=2.0, prediction_weight=3.0)

    def fn(*tensors):
        return tbf.distillation_loss(**dict(zip(names, tensors)), **fixed, temperature=0.5,
                                     **weights).total

    def ref_fn(*tensors):
        t = dict(zip(names, tensors), **fixed)
        return (0.5 * R.attention_mse(t["student_attention"], t["teacher_attention"],
                                      t["attention_mask"])
                + 2.0 * R.hidden_mse(t["student_hidden"], t["teacher_hidden"], t["weight"],
                                     t["bias"])
                + 3.0 * R.soft_cross_entropy(t["student_logits"], t["teacher_logits"], 0.5))

    check_against_reference(fn, ref_fn, [x[k] for k in names], DTYPES[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_distillation_loss_weights(backend):
    tbf.set_backend(backend)
    x = stage_inputs()
    plain = tbf.distillation_loss(**x)
    weighted = tbf.distillation_loss(**x, attention_weight=0.25, hidden_weight=4.0,
                                     prediction_weight=0.0)
    # the terms are reported unweighted; only the total is weighted
    torch.testing.assert_close(weighted.attention, plain.attention)
    torch.testing.assert_close(weighted.total, 0.25 * plain.attention + 4.0 * plain.hidden)


@pytest.mark.parametrize("backend", BACKENDS)
def test_distillation_loss_stages(backend):
    """General distillation / task step 1: scores + states; task step 2: logits alone."""
    tbf.set_backend(backend)
    x = stage_inputs()
    step1 = tbf.distillation_loss(**{k: v for k, v in x.items() if "logits" not in k})
    assert step1.prediction is None and step1.attention is not None and step1.hidden is not None
    torch.testing.assert_close(step1.total, step1.attention + step1.hidden)
    step2 = tbf.distillation_loss(student_logits=x["student_logits"],
                                  teacher_logits=x["teacher_logits"], temperature=2.0)
    assert step2.attention is None and step2.hidden is None
    torch.testing.assert_close(step2.total, tbf.soft_cross_entropy(x["student_logits"],
                                                                   x["teacher_logits"], 2.0))
    att_only = tbf.distillation_loss(student_attention=x["student_attention"],
                                     teacher_attention=x["teacher_attention"])
    assert att_only.hidden is None and att_only.prediction is None
    torch.testing.assert_close(att_only.total, tbf.attention_mse(x["student_attention"],
                                                                 x["teacher_attention"]))
    # the lists the layer mapping produces work as well as stacked tensors
    as_lists = tbf.distillation_loss(
        student_attention=list(x["student_attention"].unbind(0)),
        teacher_attention=list(x["teacher_attention"].unbind(0)),
        attention_mask=x["attention_mask"],
        student_hidden=list(x["student_hidden"].unbind(0)),
        teacher_hidden=list(x["teacher_hidden"].unbind(0)), weight=x["weight"], bias=x["bias"])
    torch.testing.assert_close(as_lists.total, step1.total, rtol=1e-5, atol=0)


@pytest.mark.parametrize("given, missing", [
    ("student_attention", "teacher_attention"), ("teacher_attention", "student_attention"),
    ("student_hidden", "teacher_hidden"), ("teacher_hidden", "student_hidden"),
    ("student_logits", "teacher_logits"), ("teacher_logits", "student_logits")])
def test_distillation_loss_unpaired(given, missing):
    x = stage_inputs()
    with pytest.raises(ValueError, match=rf"{given} was given without {missing}"):
        tbf.distillation_loss(**{given: x[given]}, weight=x["weight"])


def test_distillation_loss_needs_weight_and_inputs():
    x = stage_inputs()
    with pytest.raises(ValueError, match=r"weight"):
        tbf.distillation_loss(student_hidden=x["student_hidden"], teacher_hidden=x["teacher_hidden"])
    with pytest.raises(ValueError, match=r"no inputs"):
        tbf.distillation_loss()
    with pytest.raises(ValueError, match=r"no inputs"):
        tbf.distillation_loss(weight=x["weight"], temperature=2.0)


def test_distillation_loss_is_keyword_only():
    x = stage_inputs()
    with pytest.raises(TypeError):
        tbf.distillation_loss(x["student_attention"], x["teacher_attention"])


def test_distillation_loss_propagates_argument_errors():
    x = stage_inputs()
    with pytest.raises(ValueError, match=r"temperature"):
        tbf.distillation_loss(student_logits=x["student_logits"],
                              teacher_logits=x["teacher_logits"], temperature=0.0)
    with pytest.raises(ValueError, match=r"teacher"):
        tbf.distillation_loss(student_attention=x["student_attention"],
                              teacher_attention=x["teacher_attention"][:, :, :2])


# --- nn.Module wrappers -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_attention_module(backend, reduction):
    tbf.set_backend(backend)
    x = stage_inputs()
    module = tbf.AttentionMSELoss(reduction=reduction)
    assert list(module.parameters()) == []
    s, t, m = x["student_attention"], x["teacher_attention"], x["attention_mask"]
    got = module(s, t, m)
    torch.testing.assert_close(got, tbf.attention_mse(s, t, m, reduction))
    assert_rel("module vs reference", got, R.attention_mse(*upcast([s, t]), m, reduction).double(),
               1e-5)
    gs, = torch.autograd.grad(got, s)
    assert gs.shape == s.shape
    if _uses_fused(backend):
        assert_fused(got)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_hidden_module(backend, bias):
    tbf.set_backend(backend)
    module = tbf.HiddenMSELoss(D_S, D_T, bias=bias, device=DEVICE)
    assert module.proj.weight.shape == (D_T, D_S)
    assert (module.proj.bias is None) == (not bias)
    assert set(dict(module.named_parameters())) == ({"proj.weight", "proj.bias"} if bias
                                                   else {"proj.weight"})
    xs, xt = make((N_LAYERS + 1, B, L, D_S)), make((N_LAYERS + 1, B, L, D_T), requires_grad=False)
    loss = module(xs, xt)
    want = R.hidden_mse(*upcast([xs, xt, module.proj.weight]),
                        None if module.proj.bias is None else module.proj.bias.detach().double())
    assert_rel("module vs reference", loss, want.double(), 1e-5)
    g = random_scale()
    (loss * g).backward()
    w64 = module.proj.weight.detach().double().requires_grad_()
    want_w, = torch.autograd.grad(
        R.hidden_mse(xs.detach().double(), xt.double(), w64,
                     None if module.proj.bias is None else module.proj.bias.detach().double()) * g,
        w64)
    assert_rel("proj.weight grad", module.proj.weight.grad, want_w, 1e-5)
    assert xs.grad is not None
    if _uses_fused(backend):
        assert_fused(loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_module_dtype(backend):
    tbf.set_backend(backend)
    module = tbf.HiddenMSELoss(D_S, D_T, device=DEVICE, dtype=torch.float16)
    assert module.proj.weight.dtype == torch.float16
    xs = make((B, L, D_S), torch.float16)
    xt = make((B, L, D_T), torch.float16, requires_grad=False)
    loss = module(xs, xt)
    assert loss.dtype == torch.float32
    want = R.hidden_mse(*upcast([xs, xt, module.proj.weight, module.proj.bias]))
    # the fused op accumulates in fp32; the CPU reference path computes in fp16
    assert_rel("fp16 module", loss, want.double(), 1e-4 if _uses_fused(backend) else 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature, reduction", [(1.0, "mean"), (2.0, "batchmean"),
                                                    (0.5, "sum")])
def test_soft_ce_module(backend, temperature, reduction):
    tbf.set_backend(backend)
    module = tbf.SoftCrossEntropyLoss(temperature=temperature, reduction=reduction)
    zs, zt = make((7, 1271), scale=2.0), make((7, 1271), scale=2.0, requires_grad=False)
    got = module(zs, zt)
    torch.testing.assert_close(got, tbf.soft_cross_entropy(zs, zt, temperature, reduction))
    assert_rel("module vs reference", got,
               R.soft_cross_entropy(*upcast([zs, zt]), temperature, reduction).double(), 1e-5)


@pytest.mark.parametrize("module", [lambda: tbf.AttentionMSELoss(reduction="none"),
                                    lambda: tbf.HiddenMSELoss(D_S, D_T, reduction="batchmean"),
                                    lambda: tbf.SoftCrossEntropyLoss(reduction="avg")],
                         ids=["attention", "hidden", "soft_ce"])
def test_module_bad_reduction(module):
    x = stage_inputs()
    m = module()
    args = {tbf.AttentionMSELoss: (x["student_attention"], x["teacher_attention"]),
            tbf.HiddenMSELoss: (x["student_hidden"].cpu(), x["teacher_hidden"].cpu()),
            tbf.SoftCrossEntropyLoss: (x["student_logits"], x["teacher_logits"])}[type(m)]
    with pytest.raises(ValueError, match=r"reduction"):
        m(*args)


def test_soft_ce_module_bad_temperature():
    with pytest.raises(ValueError, match=r"temperature"):
        tbf.SoftCrossEntropyLoss(temperature=-1.0)(make((2, 3)), make((2, 3)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tinybert_loss(backend):
    tbf.set_backend(backend)
    module = tbf.TinyBertLoss(D_S, D_T, temperature=2.0, attention_weight=0.5, hidden_weight=2.0,
                              prediction_weight=3.0, device=DEVICE)
    assert module.proj.weight.shape == (D_T, D_S) and module.proj.bias.shape == (D_T,)
    x = stage_inputs()
    del x["weight"], x["bias"]
    out = module(**x)
    assert isinstance(out, tbf.DistillLoss)
    want = tbf.distillation_loss(**x, weight=module.proj.weight, bias=module.proj.bias,
                                 temperature=2.0, attention_weight=0.5, hidden_weight=2.0,
                                 prediction_weight=3.0)
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b)
    # per-call temperature overrides the module's
    out_t1 = module(student_logits=x["student_logits"], teacher_logits=x["teacher_logits"],
                    temperature=1.0)
    torch.testing.assert_close(out_t1.total, 3.0 * tbf.soft_cross_entropy(
        x["student_logits"], x["teacher_logits"], 1.0))
    # the projection is trained through the hidden term
    g = random_scale()
    (out.total * g).backward()
    w64 = module.proj.weight.detach().double().requires_grad_()
    b64 = module.proj.bias.detach().double().requires_grad_()
    hs, ht = upcast([x["student_hidden"], x["teacher_hidden"]])
    want_w, want_b = torch.autograd.grad(2.0 * g * R.hidden_mse(hs, ht, w64, b64), (w64, b64))
    assert_rel("proj.weight grad", module.proj.weight.grad, want_w, 1e-5)
    assert_rel("proj.bias grad", module.proj.bias.grad, want_b, 1e-5)
    if _uses_fused(backend):
        assert_fused(out.total)


def test_tinybert_loss_rejects_weight_argument():
    module = tbf.TinyBertLoss(D_S, D_T, device=DEVICE)
    x = stage_inputs()
    with pytest.raises(TypeError):
        module(student_hidden=x["student_hidden"], teacher_hidden=x["teacher_hidden"],
               weight=x["weight"])


def test_tinybert4_dimensions():
    module = tbf.TinyBertLoss(312, 768)
    assert module.proj.in_features == 312 and module.proj.out_features == 768
    assert sum(p.numel() for p in module.parameters()) == 312 * 768 + 768


# --- distillation_terms: the loop's objective -------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_distillation_terms_every_term(backend):
    """Each term equals its loss function; the total is the weighted sum in the documented order;
    distillation_loss is its four-term form."""
    tbf.set_backend(backend)
    x = stage_inputs()
    labels = torch.tensor([0, 2, 1], device=DEVICE)
    emb_s, emb_t = x["student_hidden"][0], x["teacher_hidden"][0]
    w = dict(attention_weight=0.5, embedding_weight=3.0, hidden_weight=2.0,
             prediction_weight=0.25, hard_label_weight=4.0)
    terms = tbf.distillation_terms(
        **{k: v for k, v in x.items() if k not in ("student_hidden", "teacher_hidden")},
        student_embedding=emb_s, teacher_embedding=emb_t, student_hidden=x["student_hidden"][1:],
        teacher_hidden=x["teacher_hidden"][1:], labels=labels, temperature=2.0, **w)
    assert list(terms) == ["attention", "embedding", "hidden", "prediction", "hard", "total"]
    want = {
        "attention": tbf.attention_mse(x["student_attention"], x["teacher_attention"],
                                       x["attention_mask"]),
        "embedding": tbf.hidden_mse(emb_s, emb_t, x["weight"], x["bias"]),
        "hidden": tbf.hidden_mse(x["student_hidden"][1:], x["teacher_hidden"][1:], x["weight"],
                                 x["bias"]),
        "prediction": tbf.soft_cross_entropy(x["student_logits"], x["teacher_logits"], 2.0),
        "hard": torch.nn.functional.cross_entropy(x["student_logits"], labels),
    }
    for name, value in want.items():
        torch.testing.assert_close(terms[name], value, msg=name)
    total = sum(w[f"{n}_weight" if n != "hard" else "hard_label_weight"] * v
                for n, v in want.items())
    torch.testing.assert_close(terms["total"], total)
    four = tbf.distillation_loss(**x, temperature=2.0)
    same = tbf.distillation_terms(**x, temperature=2.0)
    for name in ("total", "attention", "hidden", "prediction"):
        torch.testing.assert_close(getattr(four, name), same[name], rtol=0, atol=0)


@pytest.mark.parametrize("mask_padding", [False, True])
def test_distillation_terms_attention_from_qk(mask_padding):
    """Q and K give attention_mse_qk; mask_padding also drops padded query rows, which equals the
    score path's mask_queries on the scores Q K^T / sqrt(d) + bias."""
    x = stage_inputs()
    mask = x["attention_mask"]
    q_s, k_s = make((N_LAYERS, B, H, L, 8)), make((N_LAYERS, B, H, L, 8))
    q_t, k_t = (make((N_LAYERS, B, H, L, 16), requires_grad=False) for _ in range(2))
    terms = tbf.distillation_terms(student_query=q_s, student_key=k_s, teacher_query=q_t,
                                   teacher_key=k_t, attention_mask=mask,
                                   mask_padding=mask_padding)
    bias = R.key_mask_bias(mask)
    scores = [R.attention_scores(q.double(), k.double(), bias.double())
              for q, k in ((q_s, k_s), (q_t, k_t))]
    want = R.attention_mse(*scores, mask, mask_queries=mask_padding)
    assert_rel("attention from Q, K", terms["attention"], want, 1e-5)
    if not mask_padding:
        torch.testing.assert_close(terms["attention"],
                                   tbf.attention_mse_qk(q_s, k_s, q_t, k_t, mask))
    with pytest.raises(ValueError, match="needs all four"):
        tbf.distillation_terms(student_query=q_s, student_key=k_s, teacher_query=q_t)
    with pytest.raises(ValueError, match="not both"):
        tbf.distillation_terms(student_query=q_s, student_key=k_s, teacher_query=q_t,
                               teacher_key=k_t, student_attention=x["student_attention"],
                               teacher_attention=x["teacher_attention"])


def test_distillation_terms_labels_and_regression():
    z_s, z_t = make((5, 3)), make((5, 3), requires_grad=False)
    labels = torch.tensor([0, 1, 2, 1, 0], device=DEVICE)
    hard = tbf.distillation_terms(student_logits=z_s, labels=labels)
    assert list(hard) == ["hard", "total"]
    torch.testing.assert_close(hard["total"], torch.nn.functional.cross_entropy(z_s, labels))
    r_s, r_t = make((5, 1)), make((5, 1), requires_grad=False)
    y = torch.randn(5, device=DEVICE)
    reg = tbf.distillation_terms(student_logits=r_s, teacher_logits=r_t, labels=y,
                                 regression=True, hard_label_weight=0.5)
    torch.testing.assert_close(reg["prediction"], (r_s - r_t).square().mean())
    torch.testing.assert_close(reg["hard"], (r_s[:, 0] - y).square().mean())
    torch.testing.assert_close(reg["total"], reg["prediction"] + 0.5 * reg["hard"])
    with pytest.raises(ValueError, match="student_logits was given without teacher_logits"):
        tbf.distillation_terms(student_logits=z_s)
    with pytest.raises(ValueError, match="labels were given without student_logits"):
        tbf.distillation_terms(labels=labels)
    with pytest.raises(ValueError, match="no inputs"):
        tbf.distillation_terms()
    with pytest.raises(ValueError, match="weight"):
        tbf.distillation_terms(student_embedding=z_s, teacher_embedding=z_t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_distillation_terms_loss_variants(backend):
    """attention_loss / hidden_loss / prediction_loss pick the study's variants: each term is
    the named loss function's value, "none" drops the term(s)."""
    tbf.set_backend(backend)
    x = stage_inputs()
    mask = x["attention_mask"]
    emb_s, emb_t = x["student_hidden"][0], x["teacher_hidden"][0]
    states = dict(student_embedding=emb_s, teacher_embedding=emb_t,
                  student_hidden=x["student_hidden"][1:], teacher_hidden=x["teacher_hidden"][1:],
                  weight=x["weight"], bias=x["bias"])
    kl = tbf.distillation_terms(student_attention=x["student_attention"],
                                teacher_attention=x["teacher_attention"], attention_mask=mask,
                                attention_loss="kl", hidden_loss="cosine", **states)
    torch.testing.assert_close(kl["attention"], tbf.attention_kl_scores(
        x["student_attention"], x["teacher_attention"], mask))
    torch.testing.assert_close(kl["embedding"], tbf.hidden_cosine(emb_s, emb_t, x["weight"],
                                                                  x["bias"]))
    torch.testing.assert_close(kl["hidden"], tbf.hidden_cosine(
        x["student_hidden"][1:], x["teacher_hidden"][1:], x["weight"], x["bias"]))
    masked = tbf.distillation_terms(**states, attention_mask=mask, mask_padding=True,
                                    hidden_loss="cosine")
    torch.testing.assert_close(masked["hidden"], tbf.hidden_cosine(
        x["student_hidden"][1:], x["teacher_hidden"][1:], x["weight"], x["bias"],
        token_mask=mask))
    only_att = tbf.distillation_terms(student_attention=x["student_attention"],
                                      teacher_attention=x["teacher_attention"], hidden_loss="none",
                                      **states)
    assert list(only_att) == ["attention", "total"]
    z_s, z_t = x["student_logits"], x["teacher_logits"]
    pred_kl = tbf.distillation_terms(student_logits=z_s, teacher_logits=z_t, temperature=2.0,
                                     prediction_loss="kl")
    torch.testing.assert_close(pred_kl["prediction"], tbf.kl_divergence(z_s, z_t, 2.0))
    pred_mse = tbf.distillation_terms(student_logits=z_s, teacher_logits=z_t,
                                      prediction_loss="mse")
    torch.testing.assert_close(pred_mse["prediction"], (z_s - z_t).square().mean())
    for name, bad in (("attention_loss", "cosine"), ("hidden_loss", "kl"),
                      ("prediction_loss", "ce")):
        with pytest.raises(ValueError, match=rf"{name} must be one of"):
            tbf.distillation_terms(student_logits=z_s, teacher_logits=z_t, **{name: bad})


def test_distillation_terms_attention_kl_from_qk():
    x = stage_inputs()
    mask = x["attention_mask"]
    q_s, k_s = make((N_LAYERS, B, H, L, 8)), make((N_LAYERS, B, H, L, 8))
    q_t, k_t = (make((N_LAYERS, B, H, L, 16), requires_grad=False) for _ in range(2))
    terms = tbf.distillation_terms(student_query=q_s, student_key=k_s, teacher_query=q_t,
                                   teacher_key=k_t, attention_mask=mask, attention_loss="kl")
    torch.testing.assert_close(terms["attention"], tbf.attention_kl_qk(q_s, k_s, q_t, k_t, mask))
