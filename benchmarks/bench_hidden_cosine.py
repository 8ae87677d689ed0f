"""Projected hidden-state cosine loss, TinyBERT4 <- BERT-base: 5 mapped states (embeddings + 4
layers), d_s = 312 -> d_t = 768, B=32, L in {64,128,512}, with and without a token mask (the
padding of a batch: a quarter of each sequence padded).

Student states, the projection weight and bias require grad; teacher states do not.  Traffic
model (lower bound, as bench_hidden_mse): forward reads X, Y, W; a full pass also writes dX and
dW.  The fused backward recomputes X W^T (reading X, Y, W again) and writes and reads G
[rows, d_t]: above this bound by design.

    python -m benchmarks --ops hidden_cosine
"""

from __future__ import annotations


import pytest
import torch

import tinybert_fast as tbf

from ._providers import providers
from .common import PROVIDERS, Case, benchmark_full_pass

DTYPE = torch.bfloat16


def case(B: int, L: int, states: int = 5, d_s: int = 312, d_t: int = 768, dtype=DTYPE,
         masked: bool = False) -> Case:
    es = torch.tensor([], dtype=dtype).element_size()
    x_bytes, y_bytes, w_bytes = states * B * L * d_s * es, states * B * L * d_t * es, d_t * d_s * es

    def make(device):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn((states, B, L, d_s), generator=g, device=device, dtype=dtype)
        y = torch.randn((states, B, L, d_t), generator=g, device=device, dtype=dtype)
        w = torch.randn((d_t, d_s), generator=g, device=device, dtype=dtype) * d_s ** -0.5
        b = torch.randn((d_t,), generator=g, device=device, dtype=dtype) * 0.1
        mask = None
        if masked:
            mask = torch.arange(L, device=device)[None, :] < (3 * L) // 4
            mask = mask.expand(B, L).contiguous()
        inputs = {"student": x.requires_grad_(), "teacher": y, "weight": w.requires_grad_(),
                  "bias": b.requires_grad_(), "token_mask": mask}
        call = lambda impl, inp: impl(inp["student"], inp["teacher"], inp["weight"], inp["bias"],
                                      token_mask=inp["token_mask"])
        return inputs, providers(tbf.reference.hidden_cosine, tbf.hidden_cosine, call)

    return Case("hidden_cos", f"B={B} L={L} states={states}" + (" mask" if masked else ""),
                dict(B=B, L=L, states=states, d_s=d_s, d_t=d_t, masked=masked), make,
                {"fwd": x_bytes + y_bytes + w_bytes, "full": 2 * x_bytes + y_bytes + 2 * w_bytes})


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case(2, 16, states=2, d_s=32, d_t=48), case(2, 16, states=2, d_s=32, d_t=48,
                                                             masked=True)]
    return [case(32, L, masked=m) for L in (64, 128, 512) for m in (False, True)]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_hidden_cosine_full(benchmark, bench_device, provider):
    benchmark_full_pass(benchmark, cases(quick=bench_device != "cuda")[0], provider,
                        bench_device)
