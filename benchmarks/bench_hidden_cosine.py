"""Projected hidden-state cosine loss, TinyBERT4 <- BERT-base: 5 mapped states (embeddings + 4
layers), d_s = 312 -> d_t = 768, B=32, L in {64,128,512}, with and without a token mask (the
padding of a batch: a quarter of each sequence padded).

Student states, the projection weight and bias require grad; teacher states do not.  Traffic
model (lower bound, as bench_hidden_mse): forward reads X, Y, W; a full pass also writes dX and
dW.  The fused backward recomputes X W^T (reading X, Y, W again) and writes and reads G
[rows, d_t]: above this bound by design.

    python -m benchmarks.bench_hidden_cosine [--quick] [--out DIR]
(not in `python -m benchmarks`' suites; the same harness, its own results file hidden_cosine.json)
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

import tinybert_fast as tbf

from ._providers import fused_backend_for, providers
from .common import PROVIDERS, Case, add_ratios, benchmark_full_pass, device_info, device_slug, \
    format_table, run_case, write_results

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_hidden_cosine",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions")
    parser.add_argument("--providers", default="eager,compile,fused")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        parser.error("no GPU: the CPU smoke mode runs the Triton interpreter; set TRITON_INTERPRET=1")
    quick = args.quick or device == "cpu"
    fused_backend_for(device)
    info = device_info(device)
    out_dir = os.path.join(args.out, device_slug(info))
    rows, path = [], None
    for c in cases(quick):
        rows += run_case(c, device, args.providers.split(","), quick=quick)
        add_ratios(rows)
        path = write_results(rows, info, out_dir, "hidden_cosine")
        print(f"  done {c.label}", file=sys.stderr, flush=True)
    print(format_table(rows))
    print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
