"""Soft cross-entropy over N = B*L = 4096 rows at C = 2 (classification) and C = 30522 (the MLM
vocabulary), temperature 1.

Student logits require grad; teacher logits do not.  Traffic model of the fused path: forward
without grad reads both logit sets; a full pass reads both once and writes dZ_s (the forward
writes it; with C <= 4096 from the row in registers, above that the forward reads each row twice,
5 passes in all: benchmarks/traffic.py measures it).  No "bwd" figure: the fused backward only
scales the saved gradient by grad_output in place (nothing at 1), and a graph can be
backpropagated once, so "bwd" (retain_graph) reports an error for the fused provider.
"""

from __future__ import annotations

import pytest
import torch

import tinybert_fast as tbf

from .common import PROVIDERS, Case, benchmark_full_pass
from ._providers import providers

DTYPE = torch.bfloat16


def case(N: int, C: int, dtype=DTYPE) -> Case:
    es = torch.tensor([], dtype=dtype).element_size()
    nbytes = N * C * es

    def make(device):
        g = torch.Generator(device=device).manual_seed(0)
        zs = torch.randn((N, C), generator=g, device=device, dtype=dtype) * 2
        zt = torch.randn((N, C), generator=g, device=device, dtype=dtype) * 2
        inputs = {"student": zs.requires_grad_(), "teacher": zt}
        call = lambda impl, inp: impl(inp["student"], inp["teacher"])
        fns = providers(tbf.reference.soft_cross_entropy, tbf.soft_cross_entropy, call)
        liger = liger_kl(device)
        if liger is not None:
            fns["liger"] = lambda inp: liger(inp["student"], inp["teacher"])
        return inputs, fns

    return Case("soft_ce", f"N={N} C={C}", dict(N=N, C=C), make,
                {"fwd": 2 * nbytes, "full": 3 * nbytes})


def liger_kl(device: str):
    """Liger-Kernel's closest loss, when installed (CUDA only): its fused KL divergence
    KL(p_t || q_s) on log-probabilities, whose gradient in z_s, (softmax(z_s) - p_t) / N, is soft
    CE's ("batchmean", T = 1); the log_softmax calls are what a user of it would add."""
    if device != "cuda":
        return None
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except ImportError:
        return None
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    return lambda zs, zt: kl(torch.log_softmax(zs.float(), -1), torch.log_softmax(zt.float(), -1))


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case(8, 2), case(4, 1000)]
    return [case(32 * 128, 2), case(32 * 128, 30522)]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("which", [0, 1], ids=["C=2", "C=large"])
def test_soft_ce_full(benchmark, bench_device, provider, which):
    benchmark_full_pass(benchmark, cases(quick=bench_device != "cuda")[which], provider,
                        bench_device)
