"""Projected hidden-state MSE, TinyBERT4 <- BERT-base: 5 mapped states (embeddings + 4 layers),
d_s = 312 -> d_t = 768, B=32, L in {64,128,512}.

Student states, the projection weight and bias require grad; teacher states do not.  Traffic
model (lower bound): forward reads X, Y, W; a full pass also writes dX and dW.
"""

from __future__ import annotations

import pytest
import torch

import tinybert_fast as tbf

from .common import PROVIDERS, Case, benchmark_full_pass
from ._providers import providers

DTYPE = torch.bfloat16


def case(B: int, L: int, states: int = 5, d_s: int = 312, d_t: int = 768, dtype=DTYPE) -> Case:
    es = torch.tensor([], dtype=dtype).element_size()
    x_bytes, y_bytes, w_bytes = states * B * L * d_s * es, states * B * L * d_t * es, d_t * d_s * es

    def make(device):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn((states, B, L, d_s), generator=g, device=device, dtype=dtype)
        y = torch.randn((states, B, L, d_t), generator=g, device=device, dtype=dtype)
        w = torch.randn((d_t, d_s), generator=g, device=device, dtype=dtype) * d_s ** -0.5
        b = torch.randn((d_t,), generator=g, device=device, dtype=dtype) * 0.1
        inputs = {"student": x.requires_grad_(), "teacher": y, "weight": w.requires_grad_(),
                  "bias": b.requires_grad_()}
        call = lambda impl, inp: impl(inp["student"], inp["teacher"], inp["weight"], inp["bias"])
        return inputs, providers(tbf.reference.hidden_mse, tbf.hidden_mse, call)

    return Case("hidden", f"B={B} L={L} states={states}",
                dict(B=B, L=L, states=states, d_s=d_s, d_t=d_t), make,
                {"fwd": x_bytes + y_bytes + w_bytes, "full": 2 * x_bytes + y_bytes + 2 * w_bytes})


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case(2, 16, states=2, d_s=32, d_t=48)]
    return [case(32, L) for L in (64, 128, 512)]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_hidden_mse_full(benchmark, bench_device, provider):
    benchmark_full_pass(benchmark, cases(quick=bench_device != "cuda")[0], provider,
                        bench_device)
