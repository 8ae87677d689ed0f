"""Turn committed benchmark results into the README's tables (and PNG plots).

    python -m benchmarks.report [--results benchmarks/results] [--plots]

Reads results/<device>/ops.json (python -m benchmarks) and step.json (benchmarks.bench_step) and
prints Markdown tables, one per device, each headed by the device, versions and commit.  With
--plots it also writes results/<device>/<op>.png (speed-up over eager per case; needs matplotlib).
CPU results (the interpreter smoke mode) are skipped: they are not performance figures.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _header(info: dict) -> str:
    return (f"**{info['device']}** (driver {info.get('driver', '?')}, torch {info['torch']}, "
            f"triton {info['triton']}, commit {info['git_commit'][:10]}, "
            f"copy bandwidth {info.get('copy_bandwidth_gbs') or float('nan'):.0f} GB/s)")


def ops_table(doc: dict) -> str:
    # timed rows only: not a provider that failed ("error") or did not run ("skipped")
    rows = [r for r in doc["results"] if r.get("mode") == "full" and "median_ms" in r]
    lines = [_header(doc["device_info"]), "",
             "| op | case | provider | median ms (p20–p80) | × eager | GB/s | % copy | peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = r.get("peak_mem_bytes")
        x_eager = r.get("speedup_vs_eager", float("nan"))  # nan: no eager row (skipped there)
        lines.append(
            f"| {r['op']} | {r['case']} | {r['provider']} | {r['median_ms']:.3f} "
            f"({r['p20_ms']:.3f}–{r['p80_ms']:.3f}) | {x_eager:.2f} | "
            f"{r.get('gbs', float('nan')):.0f} | {r.get('pct_copy_bw') or float('nan'):.0f} | "
            f"{mem / 2**20 if mem else float('nan'):.0f} |")
    return "\n".join(lines)


def step_table(doc: dict) -> str:
    lines = [_header(doc["device_info"]), "",
             "| step | examples/s | tokens/s | median ms (p20–p80) | × eager |",
             "|---|---|---|---|---|"]
    for r in doc["results"]:
        if r["provider"] == "summary":
            continue
        lines.append(f"| {r['provider']} | {r['examples_per_s']:.0f} | {r['tokens_per_s']:.0f} | "
                     f"{r['median_ms']:.1f} ({r['p20_ms']:.1f}–{r['p80_ms']:.1f}) | "
                     f"{r['vs_eager']:.2f} |")
    return "\n".join(lines)


def plot_ops(doc: dict, out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    rows = [r for r in doc["results"] if r.get("mode") == "full" and "median_ms" in r]
    for op in sorted({r["op"] for r in rows}):
        cases = sorted({r["case"] for r in rows if r["op"] == op})
        fig, ax = plt.subplots(figsize=(7, 3.5))
        providers = ["eager", "compile", "fused"]
        width = 0.8 / len(providers)
        for k, p in enumerate(providers):
            vals = [next((r.get("speedup_vs_eager", 0) for r in rows if r["op"] == op and
                          r["case"] == c and r["provider"] == p), 0) for c in cases]
            ax.bar([i + k * width for i in range(len(cases))], vals, width, label=p)
        ax.set_xticks([i + width for i in range(len(cases))], cases, fontsize=8)
        ax.set_ylabel("speed-up over eager (full pass)")
        ax.set_title(f"{op} on {doc['device_info']['device']}")
        ax.legend()
        path = os.path.join(out_dir, f"{op}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--plots", action="store_true")
    args = parser.parse_args(argv)
    found = False
    for device_dir in sorted(glob.glob(os.path.join(args.results, "*"))):
        if os.path.basename(device_dir).startswith("cpu"):
            continue
        for name, table in (("ops.json", ops_table), ("step.json", step_table)):
            path = os.path.join(device_dir, name)
            if os.path.isfile(path):
                found = True
                doc = _load(path)
                print(table(doc), end="\n\n")
                if args.plots and name == "ops.json":
                    for png in plot_ops(doc, device_dir):
                        print(f"<!-- wrote {png} -->")
    if not found:
        print(f"no GPU results under {args.results} yet (run python -m benchmarks on a GPU)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
