"""MiniLM's attention-distribution KL from captured score maps (tbf.attention_kl_scores),
TinyBERT4 <- BERT-base: 4 mapped layers, 12 heads, B=32, L in {64, 128, 512}, bfloat16, the shapes
of bench_attention_mse (the same inputs, the other loss on them).

Scores ~ N(0, 3^2) with the -10000 bias on padded keys and about 10% of the keys padded (the
mask passed too).  Student scores require grad; teacher scores do not (as in training).

Providers:
    eager    tinybert_fast.reference.attention_kl_scores: masked log_softmax of both maps,
             F.kl_div (several [B, H, L, L] temporaries per layer)
    compile  torch.compile of the same
    fused    tbf.attention_kl_scores: one row-wise kernel per stacked tensor with an online
             softmax of both sides over key tiles, which also writes dS_s (from the row still in
             registers at L <= 1024); backward scales it by grad_output in place

Fused traffic model: forward without grad reads S and T; a full pass reads S and T and writes dS,
3 passes over n*B*H*L*L (benchmarks/traffic.py measures it).  No "bwd" figure: a graph through
the fused op can be backpropagated once, so "bwd" (retain_graph) reports an error for the fused
provider.

`python -m benchmarks --ops attention_kl_scores` times forward, backward and full passes with
peak memory through the common harness (on CPU: tiny shapes in Triton's interpreter, a smoke run
whose timings say nothing about GPUs; it needs TRITON_INTERPRET=1).
"""

from __future__ import annotations


import pytest
import torch

import tinybert_fast as tbf

from ._providers import providers
from .common import Case, benchmark_full_pass

DTYPE = torch.bfloat16
MASK_BIAS = -10000.0


def case(B: int, L: int, layers: int = 4, H: int = 12, dtype=DTYPE) -> Case:
    numel = layers * B * H * L * L
    es = torch.tensor([], dtype=dtype).element_size()

    def make(device):
        g = torch.Generator(device=device).manual_seed(0)
        lengths = torch.randint(int(0.8 * L), L + 1, (B,), generator=g, device=device)
        lengths[0] = L
        mask = torch.arange(L, device=device)[None, :] < lengths[:, None]
        pad = (~mask)[None, :, None, None, :]

        def scores():
            x = torch.randn((layers, B, H, L, L), generator=g, device=device, dtype=dtype) * 3.0
            return x.masked_fill_(pad, MASK_BIAS)
        inputs = {"student": scores().requires_grad_(), "teacher": scores(), "mask": mask}
        call = lambda impl, inp: impl(inp["student"], inp["teacher"], inp["mask"])
        return inputs, providers(tbf.reference.attention_kl_scores, tbf.attention_kl_scores, call)

    return Case("kl_scores", f"B={B} L={L} layers={layers}",
                dict(B=B, L=L, H=H, layers=layers), make,
                {"fwd": 2 * numel * es, "full": 3 * numel * es})


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case(2, 32, layers=2, H=4)]
    return [case(32, L) for L in (64, 128, 512)]


@pytest.mark.parametrize("provider", ("eager", "compile", "fused"))
def test_attention_kl_scores_full(benchmark, bench_device, provider):
    benchmark_full_pass(benchmark, cases(quick=bench_device != "cuda")[0], provider,
                        bench_device)
