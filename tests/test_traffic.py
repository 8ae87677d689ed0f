"""The traffic counter of benchmarks/traffic.py: Triton loads and stores counted lane by lane under
the interpreter (masked-off lanes excluded), and the aten dispatch counter on known ops."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from benchmarks import traffic
from conftest import needs_triton


@triton.jit
def _copy_scaled_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    tl.store(y_ptr + offs, (x * 2).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sum_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # unmasked: every lane of the block counts
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr, tl.sum(tl.load(x_ptr + offs).to(tl.float32)))


@needs_triton
@pytest.mark.parametrize("n, block", [(256, 64), (100, 64), (1, 32)], ids=["full", "tail", "one"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_copy_counts_live_lanes(n, block, dtype):
    x = torch.randn(n).to(dtype)
    y = torch.empty(n, dtype=torch.float32)
    with traffic.TrafficCounter() as c:
        _copy_scaled_kernel[(triton.cdiv(n, block),)](x, y, n, BLOCK=block)
    assert torch.equal(y, x.float() * 2)
    # the tail's masked-off lanes (up to block - 1 of them) count nothing
    assert c.launches == [{"kernel": "_copy_scaled_kernel", "loaded": n * x.element_size(),
                           "stored": n * 4}]
    assert c.total == n * (x.element_size() + 4)


@needs_triton
def test_unmasked_loads_and_launches_are_separate():
    x = torch.randn(64)
    out = torch.empty(1)
    with traffic.TrafficCounter() as c:
        _sum_kernel[(1,)](x, out, BLOCK=64)
        _copy_scaled_kernel[(2,)](x, x.clone(), 64, BLOCK=32)
    assert [r["kernel"] for r in c.launches] == ["_sum_kernel", "_copy_scaled_kernel"]
    assert (c.launches[0]["loaded"], c.launches[0]["stored"]) == (64 * 4, 4)
    assert (c.launches[1]["loaded"], c.launches[1]["stored"]) == (64 * 4, 64 * 4)
    # outside the block nothing is counted and the interpreter is restored
    _sum_kernel[(1,)](x, out, BLOCK=64)
    assert len(c.launches) == 2


def test_dispatch_counter_on_known_ops():
    a = torch.randn(10, 20)
    b = torch.randn(10, 20, dtype=torch.float64)
    with traffic.AtenTraffic() as mode:
        c = a + 1.0                    # read 800, write 800
        d = b.sum()                    # read 1600, write 8
        v = a.view(20, 10).t()         # a view: nothing
        e = torch.empty(5)             # an allocation: nothing
        f = a * torch.ones(20).expand(10, 20)  # ones: write 80; mul: 800 + 80 (broadcast) + 800
    assert [name for name, _ in mode.ops] == ["add", "sum", "ones", "mul"]
    assert [n for _, n in mode.ops] == [1600, 1608, 80, 1680]
    assert mode.total == 1600 + 1608 + 80 + 1680
    del c, d, v, e, f


def test_dispatch_counter_sees_autograd_backward():
    x = torch.randn(8, 4, requires_grad=True)
    loss = (x * x).sum()
    with traffic.AtenTraffic() as mode:
        loss.backward()
    names = [name for name, _ in mode.ops]
    assert "mul" in names and mode.total > 0
    assert x.grad is not None


def test_compulsory_and_affine_fit():
    inputs = {"s": torch.empty(3, 4, dtype=torch.bfloat16), "t": torch.empty(3, 4)}
    assert traffic.compulsory(inputs, ("s",)) == {"fwd": 24 + 48 + 4, "bwd": 24,
                                                   "fwd+bwd": 24 + 48 + 4 + 24}
    assert traffic._affine(10, 16, 1, 2, 32) == 10 + 6 * 31
    with pytest.raises(ValueError, match="affine"):
        traffic._affine(10, 17, 1, 3, 5)


def test_markdown_labels_prediction():
    row = {"op": "x", "shape": "s", "dtype": "bfloat16", "pass": "fwd+bwd",
           "measured_bytes": 3_000_000, "compulsory_bytes": 2_000_000, "eager_bytes": 9_000_000,
           "launches": 2}
    text = traffic.markdown([row])
    assert "PREDICTION" in text
    # 3 MB at 3.0 TB/s is 1 us; ratios 1.50 and 3.00
    assert "| x | s | fwd+bwd | 2.9 | 1.9 | 8.6 | 1.50 | 3.00 | 2 | 1 | 1 | 3 |" in text


def _score_inputs():
    g = torch.Generator().manual_seed(0)
    shape = (2, 2, 3, 32, 32)  # [n, B, H, L, L]
    return {"student": torch.randn(shape, generator=g) * 3,
            "teacher": torch.randn(shape, generator=g) * 3}


def _logit_inputs():
    g = torch.Generator().manual_seed(0)
    return {"student_logits": torch.randn(8, 100, generator=g) * 2,
            "teacher_logits": torch.randn(8, 100, generator=g) * 2}


@needs_triton
@pytest.mark.parametrize("op, inputs", [
    ("attention_mse", _score_inputs), ("attention_kl_scores", _score_inputs),
    ("soft_cross_entropy", _logit_inputs), ("kl_divergence", _logit_inputs)])
def test_score_and_logit_ops_move_the_compulsory_bytes(op, inputs):
    """#26's bar at a small shape: forward + backward within 1.5x of the compulsory bytes (each
    input read once, the gradient written once) and at least 3x less than eager; the forward
    writes the student's gradient, so the backward (grad_output = 1) moves almost nothing."""
    import tinybert_fast as tbf
    x = inputs()
    needs = (next(iter(x)),)  # the student's input
    fused = traffic.measure(getattr(tbf, op), x, needs, fused=True)
    eager = traffic.measure(getattr(tbf.reference, op), x, needs, fused=False)
    need = traffic.compulsory(x, needs)
    total = fused["fwd+bwd"]["bytes"]
    assert total <= 1.5 * need["fwd+bwd"], (total, need)
    assert eager["fwd+bwd"]["bytes"] >= 3 * total, (eager["fwd+bwd"]["bytes"], total)
    assert fused["bwd"]["bytes"] < 0.01 * need["bwd"], fused["bwd"]


@needs_triton
@pytest.mark.parametrize("op", ["attention_mse", "attention_kl_scores"])
def test_an_int64_mask_costs_one_byte_per_score(op):
    """Hugging Face's int64 attention mask: the kernels load the key mask with every tile, as one
    byte per entry (kernels._utils.byte_mask), so a masked pass stays within the bar."""
    import tinybert_fast as tbf
    x = _score_inputs()
    mask = torch.ones(2, 32, dtype=torch.int64)
    mask[1, 20:] = 0
    fn = lambda student, teacher: getattr(tbf, op)(student, teacher, mask)
    fused = traffic.measure(fn, x, ("student",), fused=True)
    need = traffic.compulsory(x, ("student",))
    assert fused["fwd+bwd"]["bytes"] <= 1.5 * need["fwd+bwd"], (fused["fwd+bwd"], need)
