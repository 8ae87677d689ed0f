"""Timing, memory and device helpers shared by every benchmark.

Timings are medians with 20th/80th percentiles: on CUDA from triton.testing.do_bench (CUDA events,
L2 flushed between repetitions); on CPU (smoke mode only) from time.perf_counter.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

PROVIDERS = ("eager", "compile", "fused", "liger")  # liger: soft CE only, when installed
MODES = ("fwd", "bwd", "full")


@dataclasses.dataclass
class Case:
    """One benchmark point: an op at one shape, with a traffic model for GB/s."""
    op: str
    label: str          # e.g. "B=32 L=128 layers=4"
    params: dict
    make: Callable      # (device) -> (inputs dict, {provider: fn(inputs) -> loss})
    bytes: dict         # {mode: bytes the fused implementation must move}


@dataclasses.dataclass(frozen=True)
class Skipped:
    """In place of a provider's fn in Case.make's dict: it does not run this case on this device
    (e.g. its L x L maps would not fit), and why.  Reported as skipped, never run."""
    reason: str


def timeit(fn: Callable[[], object], device: str, quick: bool = False) -> dict:
    """median / p20 / p80 in milliseconds."""
    if device == "cuda":
        import triton.testing
        q = triton.testing.do_bench(fn, warmup=10 if quick else 50, rep=20 if quick else 200,
                                    quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}
    fn()
    times = []
    for _ in range(2 if quick else 5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p20_ms": times[len(times) // 5],
            "p80_ms": times[min(len(times) - 1, (4 * len(times)) // 5)]}


def peak_memory(fn: Callable[[], object], device: str) -> int | None:
    """Bytes allocated at the peak of fn() above what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device: str) -> float | None:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus written."""
    if device != "cuda":
        return None
    n = 1 << 28  # 256 Mi floats = 1 GiB per buffer
    a = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    ms = timeit(lambda: b.copy_(a), device)["median_ms"]
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def git_commit() -> str:
    if os.environ.get("TBF_GIT_COMMIT"):
        return os.environ["TBF_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_info(device: str) -> dict:
    import triton
    info = {"torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "git_commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, copy_bandwidth_gbs=copy_bandwidth(device))
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            info["driver"] = "unknown"
    else:
        info.update(device=f"cpu ({platform.processor() or platform.machine()}, "
                           f"{os.cpu_count()} cores)")
    return info


def device_slug(info: dict) -> str:
    return "".join(c if c.isalnum() else "-" for c in info["device"].lower()).strip("-")


def run_case(case: Case, device: str, providers=PROVIDERS, modes=MODES, quick=False) -> list[dict]:
    """Time every provider and mode of one case; rows of results."""
    inputs, fns = case.make(device)
    rows = []
    for provider in providers:
        if provider not in fns:
            continue
        fn = fns[provider]
        for mode in modes:
            row = {"op": case.op, "case": case.label, **case.params, "provider": provider,
                   "mode": mode}
            if isinstance(fn, Skipped):
                rows.append({**row, "skipped": fn.reason})
                continue
            try:
                if mode == "fwd":
                    with torch.no_grad():
                        t = timeit(lambda: fn(inputs), device, quick)
                    mem = None
                elif mode == "bwd":
                    loss = fn(inputs)
                    grads = trainable(inputs)
                    t = timeit(lambda: torch.autograd.grad(loss, grads, retain_graph=True),
                               device, quick)
                    del loss
                    mem = None
                else:
                    grads = trainable(inputs)

                    def full():
                        return torch.autograd.grad(fn(inputs), grads)
                    t = timeit(full, device, quick)
                    mem = peak_memory(full, device)
            except Exception as exc:  # a provider that cannot run a case is reported, not fatal
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                rows.append(row)
                continue
            row.update(t)
            row["peak_mem_bytes"] = mem
            nbytes = case.bytes.get(mode)
            if nbytes:
                row["bytes"] = nbytes
                row["gbs"] = nbytes / (t["median_ms"] * 1e-3) / 1e9
                bw = copy_bandwidth(device)
                row["pct_copy_bw"] = 100 * row["gbs"] / bw if bw else None
            rows.append(row)
    del inputs, fns
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def add_ratios(rows: list[dict]) -> None:
    """speedup = eager median / provider median, for each (op, case, mode), measured in one run."""
    eager = {(r["op"], r["case"], r["mode"]): r.get("median_ms") for r in rows
             if r["provider"] == "eager"}
    mem = {(r["op"], r["case"], r["mode"]): r.get("peak_mem_bytes") for r in rows
           if r["provider"] == "eager"}
    for r in rows:
        key = (r["op"], r["case"], r["mode"])
        if r.get("median_ms") and eager.get(key):
            r["speedup_vs_eager"] = eager[key] / r["median_ms"]
        if r.get("peak_mem_bytes") and mem.get(key):
            r["mem_vs_eager"] = r["peak_mem_bytes"] / mem[key]


def write_results(rows: list[dict], info: dict, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"device_info": info, "results": rows}, f, indent=1)
    os.replace(tmp, path)
    return path


def format_table(rows: list[dict]) -> str:
    head = f"{'op':<12}{'case':<26}{'mode':<5}{'provider':<9}{'median ms':>10}{'p20-p80':>16}" \
           f"{'x eager':>8}{'GB/s':>8}{'%copy':>6}{'peak MB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r or "skipped" in r:
            what = f"ERROR {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"{r['op']:<12}{r['case']:<26}{r['mode']:<5}{r['provider']:<9}  "
                         f"{what[:66]}")
            continue
        mem = r.get("peak_mem_bytes")
        lines.append(
            f"{r['op']:<12}{r['case']:<26}{r['mode']:<5}{r['provider']:<9}"
            f"{r['median_ms']:>10.4f}{r['p20_ms']:>8.4f}-{r['p80_ms']:<7.4f}"
            f"{r.get('speedup_vs_eager', float('nan')):>8.2f}{r.get('gbs', float('nan')):>8.0f}"
            f"{(r.get('pct_copy_bw') or float('nan')):>6.0f}"
            f"{(mem / 2**20 if mem else float('nan')):>9.1f}")
    return "\n".join(lines)


def trainable(inputs: dict) -> list[torch.Tensor]:
    return [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]


def benchmark_full_pass(benchmark, case: Case, provider: str, device: str) -> None:
    """pytest-benchmark body: forward + backward of one provider on one case."""
    inputs, fns = case.make(device)
    if provider not in fns:
        import pytest
        pytest.skip(f"provider {provider!r} does not run {case.op} here (not installed, or no GPU)")
    if isinstance(fns[provider], Skipped):
        import pytest
        pytest.skip(f"provider {provider!r} skips {case.op} {case.label}: {fns[provider].reason}")
    fn, grads = fns[provider], trainable(inputs)

    def step():
        out = torch.autograd.grad(fn(inputs), grads)
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    benchmark.extra_info.update(op=case.op, case=case.label, provider=provider)
    benchmark(step)
