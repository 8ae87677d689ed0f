"""python -m benchmarks [--ops attention,hidden,soft_ce] [--headline] [--quick] [--out DIR]

Times every op with the providers eager (tinybert_fast.reference), compile (torch.compile of the
reference) and fused (tinybert_fast), in forward, backward and full (forward + backward) modes,
side by side in one run; prints a table and writes results/<device>/<name>.json, rewritten after
every case (a run stopped at a time limit keeps the cases it finished).  --headline runs one
TinyBERT4 <- BERT-base shape per op (HEADLINE below), the first GPU session's figures.  Without a
GPU it runs tiny shapes with the Triton interpreter (a smoke test: CPU timings say nothing about
GPUs).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import (bench_attention_kl, bench_attention_kl_scores, bench_attention_mse,
               bench_attention_qk, bench_hidden_cosine, bench_hidden_mse, bench_kl_div,
               bench_soft_ce)
from ._providers import fused_backend_for
from .common import MODES, PROVIDERS, add_ratios, device_info, device_slug, format_table, \
    run_case, write_results

SUITES = {"attention": bench_attention_mse, "hidden": bench_hidden_mse, "soft_ce": bench_soft_ce,
          "attention_qk": bench_attention_qk, "attention_kl": bench_attention_kl,
          "kl_div": bench_kl_div, "attention_kl_scores": bench_attention_kl_scores,
          "hidden_cosine": bench_hidden_cosine}
# --headline: the full-size cases kept per op (by their params), in the order they run.  L = 128
# is GLUE's usual length; soft CE both at 2 classes and at BERT's 30,522-word MLM vocabulary;
# the Q/K losses at L = 2048, where the Q/K path's target (>= 4x the score path) is set.
HEADLINE = {"attention": {"L": 128}, "hidden": {"L": 128}, "soft_ce": {},
            "attention_qk": {"L": 2048}, "attention_kl": {"L": 2048}, "kl_div": {},
            "attention_kl_scores": {"L": 128}, "hidden_cosine": {"L": 128}}


def headline(suite: str, case) -> bool:
    """Whether a full-size case of SUITES[suite] is one of the --headline cases."""
    return all(case.params.get(k) == v for k, v in HEADLINE[suite].items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(SUITES), help="comma-separated: "
                        + ", ".join(SUITES))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions")
    parser.add_argument("--headline", action="store_true",
                        help="one TinyBERT4 <- BERT-base shape per op (see HEADLINE)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--name", default="ops", help="results file name (without .json)")
    args = parser.parse_args(argv)
    ops = args.ops.split(",")
    unknown = [o for o in ops if o not in SUITES]
    if unknown:
        parser.error(f"--ops: unknown {unknown}; choose from {list(SUITES)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        parser.error("no GPU: the CPU smoke mode runs the Triton interpreter; set TRITON_INTERPRET=1")
    quick = args.quick or device == "cpu"
    fused_backend_for(device)
    info = device_info(device)
    print(f"# {info['device']}  torch {info['torch']}  triton {info['triton']}  "
          f"copy bandwidth {info.get('copy_bandwidth_gbs') or float('nan'):.0f} GB/s", flush=True)
    out_dir = os.path.join(args.out, device_slug(info))
    rows, path = [], None
    for op in ops:
        for case in SUITES[op].cases(quick):
            if args.headline and not quick and not headline(op, case):
                continue
            rows += run_case(case, device, args.providers.split(","), args.modes.split(","), quick)
            add_ratios(rows)
            path = write_results(rows, info, out_dir, args.name)
            print(f"  done {op} {case.label}", file=sys.stderr, flush=True)
    print(format_table(rows))
    print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
