"""Attention-score MSE, TinyBERT4 <- BERT-base: 4 mapped layers, 12 heads, B=32, L in {64,128,512}.

Student scores require grad; teacher scores do not (as in training).  Fused traffic model:
forward without grad reads S and T; a full pass reads S and T and writes dS, 3 passes over
n*B*H*L*L (the forward writes dS; the backward only scales it by grad_output in place, nothing at
1: benchmarks/traffic.py measures it).  No "bwd" figure: a graph through the fused op can be
backpropagated once, so "bwd" (retain_graph) reports an error for the fused provider.
"""

from __future__ import annotations

import pytest
import torch

import tinybert_fast as tbf

from .common import PROVIDERS, Case, benchmark_full_pass
from ._providers import providers

DTYPE = torch.bfloat16


def case(B: int, L: int, layers: int = 4, H: int = 12, dtype=DTYPE) -> Case:
    numel = layers * B * H * L * L
    es = torch.tensor([], dtype=dtype).element_size()

    def make(device):
        g = torch.Generator(device=device).manual_seed(0)
        s = torch.randn((layers, B, H, L, L), generator=g, device=device, dtype=dtype)
        t = torch.randn((layers, B, H, L, L), generator=g, device=device, dtype=dtype)
        inputs = {"student": s.requires_grad_(), "teacher": t}
        call = lambda impl, inp: impl(inp["student"], inp["teacher"])
        return inputs, providers(tbf.reference.attention_mse, tbf.attention_mse, call)

    return Case("attention", f"B={B} L={L} layers={layers}", dict(B=B, L=L, H=H, layers=layers),
                make, {"fwd": 2 * numel * es, "full": 3 * numel * es})


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case(2, 32, layers=2, H=4)]
    return [case(32, L) for L in (64, 128, 512)]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention_mse_full(benchmark, bench_device, provider):
    benchmark_full_pass(benchmark, cases(quick=bench_device != "cuda")[0], provider,
                        bench_device)
