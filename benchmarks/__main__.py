"""python -m benchmarks [--ops attention,hidden,soft_ce] [--quick] [--out benchmarks/results]

Times every op with the providers eager (tinybert_fast.reference), compile (torch.compile of the
reference) and fused (tinybert_fast), in forward, backward and full (forward + backward) modes,
side by side in one run; prints a table and writes results/<device>/<name>.json.  Without a GPU it
runs tiny shapes with the Triton interpreter (a smoke test: CPU timings say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import bench_attention_kl, bench_attention_mse, bench_attention_qk, bench_hidden_mse, \
    bench_soft_ce
from ._providers import fused_backend_for
from .common import MODES, PROVIDERS, add_ratios, device_info, device_slug, format_table, \
    run_case, write_results

SUITES = {"attention": bench_attention_mse, "hidden": bench_hidden_mse, "soft_ce": bench_soft_ce,
          "attention_qk": bench_attention_qk, "attention_kl": bench_attention_kl}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(SUITES), help="comma-separated: "
                        + ", ".join(SUITES))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions")
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
    rows = []
    for op in ops:
        for case in SUITES[op].cases(quick):
            rows += run_case(case, device, args.providers.split(","), args.modes.split(","), quick)
            print(f"  done {op} {case.label}", file=sys.stderr, flush=True)
    add_ratios(rows)
    print(format_table(rows))
    path = write_results(rows, info, os.path.join(args.out, device_slug(info)), args.name)
    print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
