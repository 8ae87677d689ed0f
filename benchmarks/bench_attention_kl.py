"""MiniLM's attention-distribution KL from Q and K (tbf.attention_kl_qk) against the eager reference.

Shapes: those of benchmarks.bench_attention_qk, one mapped layer of TinyBERT4 <- BERT-base heads:
H = 12, d_s = 26 (312 / 12), d_t = 64, bfloat16, B*L = 8192 tokens fixed (so the Q/K inputs are
the same size at every L), L in {128, 512, 2048, 8192} (B = 64, 16, 4, 1), about 10% of the keys
padded.  Student Q, K require grad, the teacher's do not (as in training).  More mapped layers
scale every figure linearly.

Providers:
    eager    tinybert_fast.reference.attention_kl_qk: torch.matmul scores, masked log_softmax,
             F.kl_div (6 [B, H, L, L] maps at its peak: analytic_peak_bytes)
    compile  torch.compile of the same
    fused    tbf.attention_kl_qk: an online softmax over key tiles for both models, nothing of size
             L^2 written; backward recomputes P from 3 fp32 statistics per query row

GB/s counts the bytes a loss that writes no L x L map must move (bench_attention_qk.qk_traffic):
Q and K of both models (forward); them again and dQ_s, dK_s (backward).  The fused path's per-row
statistics (12 bytes per query row and head, written and read once) are not counted.

On a GPU: `python -m benchmarks.bench_attention_kl` times forward, backward and full passes and
measures peak memory (torch.cuda.max_memory_allocated over a full pass, above what was allocated
before it) through the common harness, and writes results/<device>/attention_kl.json.  `python -m
benchmarks --ops attention_kl` does the same into ops.json.  eager and compile are reported as
skipped, not run, at a length where eager's analytic peak passes 90% of the free device memory
(compile is taken to hold no more than eager; that is not measured): at L = 8192 eager holds 9 GiB.

Without a GPU (TRITON_INTERPRET=1) it reports peak memory only, at the full shapes, as
bench_attention_qk does:
  * measured: every CPU allocation and free of a full pass (forward + backward) recorded by
    torch.profiler(profile_memory=True); the peak of their running sum is the figure.  The fused
    path runs its real launchers (the same torch allocations as on a GPU) with the @triton.jit
    launches skipped.  The eager path is computed for real, up to --max-measure-gb.
  * analytic: the model in `analytic_peak_bytes`.
compile is left out there: what inductor's CPU code allocates says nothing about its GPU code.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import tinybert_fast as tbf

from .bench_attention_qk import D_S, D_T, DTYPE, HEADS, LENGTHS, TOKENS, bench_parser, \
    call_qk, make_qk_inputs, memory_rows, print_ratios, qk_traffic, start_device, time_lengths, \
    write_memory
from .common import Case, Skipped, benchmark_full_pass, device_slug, format_table, \
    write_results
from ._providers import providers

PROVIDERS = ("eager", "compile", "fused")


def analytic_peak_bytes(provider: str, B: int, L: int, H: int = HEADS, d_s: int = D_S,
                        es: int = 2) -> int | None:
    """Bytes a full pass (forward + backward, student gradients) holds at its peak, above its inputs
    (None for compile).

    eager: 6 [B, H, L, L] maps in the inputs' dtype, inside F.kl_div's forward: the student's
           log-probabilities (kept by log_softmax for backward) and their masked copy, the
           teacher's masked log-probabilities, and kl_div's lp_t - lp_s, exp(lp_t) and product.
           Backward holds at most 3 maps.  Measured on CPU at L = 128, 512 and 2048: 6 maps +
           24 KiB (the masks, O(B*L)).
    fused: the statistics [3, B*H, L] fp32 (lse_s, lse_t, KL per query row, kept for backward)
           + dQ_s, dK_s.  Forward adds one fp32 per 64-query tile, freed before backward.
           Measured on CPU (kernels skipped): this + 12 bytes (scalars) at every L.
    """
    if provider == "eager":
        return 6 * B * H * L * L * es
    if provider == "fused":
        return 12 * B * H * L + 2 * B * H * L * d_s * es
    return None


def case(L: int, tokens: int = TOKENS, H: int = HEADS, d_s: int = D_S, d_t: int = D_T,
         dtype=DTYPE) -> Case:
    B = max(1, tokens // L)

    def make(device):
        inputs = make_qk_inputs(B, L, H, d_s, d_t, dtype, device)
        fns = providers(tbf.reference.attention_kl_qk, tbf.attention_kl_qk, call_qk)
        if device == "cuda":
            need = analytic_peak_bytes("eager", B, L, H, d_s, inputs["q_s"].element_size())
            free = torch.cuda.mem_get_info()[0]
            if need > 0.9 * free:
                for p in ("eager", "compile"):
                    fns[p] = Skipped(f"its L x L maps need {need / 2**30:.1f} GiB, "
                                     f"{free / 2**30:.1f} GiB free")
        return inputs, fns

    return Case("attn_kl", f"B={B} L={L} H={H}", dict(B=B, L=L, H=H, d_s=d_s, d_t=d_t),
                make, qk_traffic(B, L, H, d_s, d_t, dtype))


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case(L, tokens=128, H=2) for L in (32, 64)]
    return [case(L) for L in LENGTHS]


def cpu_memory_rows(max_measure_gb: float, lengths=LENGTHS, tokens=TOKENS, H=HEADS) -> list[dict]:
    """memory_rows of eager and fused (the analytic figure decides what is measured)."""
    from tinybert_fast.kernels import attention_kl_qk as k_kl

    def peak_bytes(provider, B, L, H):
        analytic = analytic_peak_bytes(provider, B, L, H)
        return analytic, analytic
    return memory_rows(case, ("eager", "fused"), peak_bytes, (k_kl,), max_measure_gb, lengths,
                       tokens, H)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention_kl_full(benchmark, bench_device, provider):
    # L = 2048 on CUDA; a tiny smoke case on CPU
    c = case(2048) if bench_device == "cuda" else cases(quick=True)[0]
    benchmark_full_pass(benchmark, c, provider, bench_device)


def main(argv=None) -> int:
    parser = bench_parser("python -m benchmarks.bench_attention_kl", __doc__, PROVIDERS)
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    device, info = start_device(parser)
    if device == "cpu":
        path = write_memory(cpu_memory_rows(args.max_measure_gb, lengths), info, args.out,
                            "attention_kl_memory", "eager")
    else:
        rows = time_lengths(case, lengths, device, args.providers.split(","),
                            args.modes.split(","))
        print(format_table(rows))
        print_ratios(rows, "eager")
        path = write_results(rows, info, os.path.join(args.out, device_slug(info)),
                             "attention_kl")
    print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
