"""Attention loss from Q and K (tbf.attention_mse_qk) against the score-based path.

Shapes: one mapped layer of TinyBERT4 <- BERT-base heads: H = 12, d_s = 26 (312 / 12), d_t = 64,
bfloat16, B*L = 8192 tokens fixed (so the Q/K inputs are the same size at every L), L in
{128, 512, 2048, 8192} (B = 64, 16, 4, 1), about 10% of the keys padded.  Student Q, K require grad,
the teacher's do not (as in training).  More mapped layers scale every figure linearly.

Providers:
    eager    tinybert_fast.reference.attention_mse_qk: torch.matmul scores + mask bias, then the
             eager TinyBERT loss (what a TinyBERT trainer does)
    compile  torch.compile of the same
    score    the score-based fused path: cuBLAS scores (scale and bias applied in place), then the
             fused tbf.attention_mse; the baseline the QK path has to beat
    fused    tbf.attention_mse_qk(method="auto")  ("tiled" below L = 512, "gram" from there)
    gram     tbf.attention_mse_qk(method="gram")
    tiled    tbf.attention_mse_qk(method="tiled")

On a GPU: `python -m benchmarks.bench_attention_qk` times forward, backward and full passes and
measures peak memory (torch.cuda.max_memory_allocated over a full pass, above what was allocated
before it), and writes results/<device>/attention_qk.json.  `python -m benchmarks --ops
attention_qk --providers eager,score,fused,gram,tiled` does the same through the common harness.

Without a GPU (TRITON_INTERPRET=1) it reports peak memory only, at the full shapes:
  * measured: every CPU allocation and free of a full pass (forward + backward) recorded by
    torch.profiler(profile_memory=True); the peak of their running sum is the figure.  The
    fused paths run their real launchers (the same torch allocations as on a GPU) with the
    @triton.jit launches skipped: a kernel allocates nothing on a GPU, and in Triton's
    interpreter only numpy scratch, which would say nothing about a GPU.  The score path's
    torch.matmul scores are computed for real; its bytes are measured up to --max-measure-gb.
  * analytic: the model in `analytic_peak_bytes` (what each path must hold at its peak).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys

import pytest
import torch

import tinybert_fast as tbf

from .common import Case, add_ratios, benchmark_full_pass, device_info, device_slug, \
    format_table, run_case, trainable, write_results
from ._providers import fused_backend_for, providers

DTYPE = torch.bfloat16
HEADS, D_S, D_T = 12, 26, 64
TOKENS = 8192
LENGTHS = (128, 512, 2048, 8192)
PROVIDERS = ("eager", "compile", "score", "fused", "gram", "tiled")


def score_path(q_s, k_s, q_t, k_t, attention_mask=None):
    """Scores from Q and K by cuBLAS, scale and mask bias applied in place (the fewest bytes a
    score-based loss can move), then the fused TinyBERT loss tbf.attention_mse."""
    bias = None
    if attention_mask is not None:
        bias = torch.where((attention_mask != 0)[:, None, None, :], 0.0, -10000.0)

    def scores(q, k):
        s = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
        return s if bias is None else s.add_(bias.to(s.dtype))

    return tbf.attention_mse(scores(q_s, k_s), scores(q_t, k_t), attention_mask)


def make_qk_inputs(B: int, L: int, H: int, d_s: int, d_t: int, dtype, device) -> dict:
    """q_s, k_s [B, H, L, d_s] requiring grad, q_t, k_t [B, H, L, d_t], and a bool mask [B, L]
    with about 10% of the keys padded, varying over the batch (seeded)."""
    g = torch.Generator(device=device).manual_seed(0)
    x = [torch.randn((B, H, L, d), generator=g, device=device, dtype=dtype)
         for d in (d_s, d_s, d_t, d_t)]
    pad = (torch.arange(B) * 37 + 11) % max(1, math.ceil(0.2 * L))
    mask = (torch.arange(L)[None, :] < (L - pad)[:, None]).to(device)
    return {"q_s": x[0].requires_grad_(), "k_s": x[1].requires_grad_(), "q_t": x[2], "k_t": x[3],
            "mask": mask}


def call_qk(impl, inp):
    """impl(q_s, k_s, q_t, k_t, mask) on the inputs of make_qk_inputs."""
    return impl(inp["q_s"], inp["k_s"], inp["q_t"], inp["k_t"], inp["mask"])


def qk_traffic(B: int, L: int, H: int, d_s: int, d_t: int, dtype) -> dict:
    """Bytes per mode of a loss from Q and K that never writes an L x L map: read Q, K (forward);
    read them again, write dQ_s, dK_s (backward)."""
    es = torch.tensor([], dtype=dtype).element_size()
    qk_bytes = B * H * L * 2 * (d_s + d_t) * es
    grads = B * H * L * 2 * d_s * es
    return {"fwd": qk_bytes, "bwd": qk_bytes + grads, "full": 2 * qk_bytes + grads}


def case(L: int, tokens: int = TOKENS, H: int = HEADS, d_s: int = D_S, d_t: int = D_T,
         dtype=DTYPE) -> Case:
    B = max(1, tokens // L)

    def make(device):
        inputs = make_qk_inputs(B, L, H, d_s, d_t, dtype, device)
        fns = providers(tbf.reference.attention_mse_qk, tbf.attention_mse_qk, call_qk)
        fns["score"] = lambda inp: call_qk(score_path, inp)
        for method in ("gram", "tiled"):
            fns[method] = lambda inp, m=method: call_qk(
                functools.partial(tbf.attention_mse_qk, method=m), inp)
        return inputs, fns

    return Case("attn_qk", f"B={B} L={L} H={H}", dict(B=B, L=L, H=H, d_s=d_s, d_t=d_t),
                make, qk_traffic(B, L, H, d_s, d_t, dtype))


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case(L, tokens=128, H=2) for L in (32, 64)]
    return [case(L) for L in LENGTHS]


def analytic_peak_bytes(provider: str, B: int, L: int, H: int = HEADS, d_s: int = D_S,
                        d_t: int = D_T, es: int = 2) -> int | None:
    """Bytes a full pass (forward + backward, student gradients) holds at its peak, above its inputs
    (None for eager / compile, which hold more temporaries: measured 2.8x the score path on CPU).

    score: S_s and S_t [B, H, L, L] (kept for backward) + dS; autograd frees S_s and S_t once
           the loss's backward has run, before the matmuls' backward allocates dQ_s, dK_s.
    gram:  partial Grams 2 N ceil(L/512) D^2 fp32 (+ the summed Grams 2 N D^2 when L > 512) in
           forward; the Grams (kept) + dQ_s, dK_s in backward.  N = B*H heads, D = d_s + d_t.
    tiled: one fp32 partial per (head, 64-query tile) + dQ_s, dK_s.
    """
    N, D = B * H, d_s + d_t
    grads = 2 * B * H * L * d_s * es
    if provider in ("eager", "compile"):
        return None
    if provider == "score":
        return max(3 * B * H * L * L * es, B * H * L * L * es + grads)
    if provider == "fused":
        provider = "gram" if L >= 512 else "tiled"
    if provider == "gram":
        splits = math.ceil(L / 512)
        fwd = 8 * N * splits * D * D + (8 * N * D * D if splits > 1 else 0) + 8 * N
        return max(fwd, 8 * N * D * D + grads)
    return N * math.ceil(L / 64) * 4 + grads


@contextlib.contextmanager
def kernels_skipped(*modules):
    """Replace every @triton.jit function in `modules` by a launch that does nothing (for
    measuring the launchers' own allocations on CPU)."""
    from triton.runtime.jit import KernelInterface

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    saved = [(m, name, obj) for m in modules for name, obj in vars(m).items()
             if isinstance(obj, KernelInterface)]
    for m, name, _ in saved:
        setattr(m, name, _NoLaunch())
    try:
        yield
    finally:
        for m, name, obj in saved:
            setattr(m, name, obj)


def cpu_peak_bytes(fn) -> int:
    """Peak of the running sum of CPU allocations minus frees during fn() (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    peak = cur = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def memory_rows(make_case, providers, peak_bytes, kernel_modules, max_measure_gb: float,
                lengths, tokens: int, H: int) -> list[dict]:
    """Measured and analytic peak bytes of a full pass (forward + backward of the trainable
    inputs) per length and provider, on CPU.  make_case(L, tokens=, H=) -> Case;
    peak_bytes(provider, B, L, H) -> (analytic bytes or None, an estimate: measured only where it
    is below max_measure_gb, by cpu_peak_bytes with the launches of kernel_modules skipped)."""
    rows = []
    for L in lengths:
        c = make_case(L, tokens=tokens, H=H)
        inputs, fns = c.make("cpu")
        grads = trainable(inputs)
        for provider in providers:
            analytic, estimate = peak_bytes(provider, c.params["B"], L, H)
            row = {"op": c.op, "case": c.label, **c.params, "provider": provider, "mode": "full",
                   "analytic_peak_bytes": analytic, "peak_mem_bytes": None}
            if estimate <= max_measure_gb * 2 ** 30:
                with kernels_skipped(*kernel_modules):
                    row["peak_mem_bytes"] = cpu_peak_bytes(
                        lambda: torch.autograd.grad(fns[provider](inputs), grads))
            rows.append(row)
            print(f"  L={L} {provider}", file=sys.stderr, flush=True)
    return rows


def cpu_memory_rows(max_measure_gb: float, lengths=LENGTHS, tokens=TOKENS, H=HEADS) -> list[dict]:
    """memory_rows of every provider but compile."""
    from tinybert_fast.kernels import attention_mse as k_mse, attention_mse_qk as k_qk

    def peak_bytes(provider, B, L, H):
        analytic = analytic_peak_bytes(provider, B, L, H)
        # eager holds about 3x the score path's bytes (measured)
        return analytic, analytic if analytic is not None else \
            3 * analytic_peak_bytes("score", B, L, H)
    return memory_rows(case, ("eager", "score", "fused", "gram", "tiled"), peak_bytes,
                       (k_mse, k_qk), max_measure_gb, lengths, tokens, H)


def format_memory(rows: list[dict], baseline: str = "score") -> str:
    """Table of memory_rows, with each peak over the baseline provider's at the same L."""
    ref_rows = {r["L"]: r for r in rows if r["provider"] == baseline}
    head = (f"{'L':>6}{'B':>5}  {'provider':<9}{'measured MiB':>13}{'analytic MiB':>13}"
            f"{'x ' + baseline:>9}")
    lines = [head, "-" * len(head)]
    nan = float("nan")
    for r in rows:
        m, a = r["peak_mem_bytes"], r["analytic_peak_bytes"]
        ref = ref_rows[r["L"]]["peak_mem_bytes"] or ref_rows[r["L"]]["analytic_peak_bytes"]
        mine = m if m is not None else a
        lines.append(f"{r['L']:>6}{r['B']:>5}  {r['provider']:<9}"
                     f"{(m / 2**20 if m is not None else nan):>13.1f}"
                     f"{(a / 2**20 if a is not None else nan):>13.1f}"
                     f"{(mine / ref if mine is not None else nan):>9.3f}")
    return "\n".join(lines)


def write_memory(rows: list[dict], info: dict, out: str, name: str, baseline: str) -> str:
    """Print memory_rows (full shapes, CPU) and write them to <out>/<device>/<name>.json."""
    print("# peak memory of a full pass (fwd + bwd), one layer, H=12, d 26/64, bf16, "
          "B*L=8192; measured = CPU allocations (torch.profiler), fused kernels skipped")
    print(format_memory(rows, baseline))
    info["memory_method"] = ("torch.profiler(profile_memory=True) running sum of CPU "
                             "allocations during a full pass; @triton.jit launches skipped")
    return write_results(rows, info, os.path.join(out, device_slug(info)), name)


def time_lengths(make_case, lengths, device: str, providers, modes) -> list[dict]:
    """run_case of make_case(L) for every length, with the ratios to eager."""
    rows = []
    for L in lengths:
        rows += run_case(make_case(L), device, providers, modes)
        print(f"  done L={L}", file=sys.stderr, flush=True)
    add_ratios(rows)
    return rows


def print_ratios(rows: list[dict], baseline: str) -> None:
    """Full-pass time and memory of each provider against the baseline's (speedup_vs_<baseline>,
    mem_vs_<baseline> of the rows)."""
    for r in rows:
        if r.get(f"speedup_vs_{baseline}") and r["mode"] == "full":
            print(f"  {r['case']:<22}{r['provider']:<9} {r[f'speedup_vs_{baseline}']:6.2f}x "
                  f"{baseline} (time)  {r.get(f'mem_vs_{baseline}', float('nan')):8.4f}x "
                  f"{baseline} (memory)")


def add_score_ratios(rows: list[dict]) -> None:
    """speedup_vs_score = score median / provider median, per (case, mode), from one run."""
    score = {(r["case"], r["mode"]): r for r in rows if r["provider"] == "score"}
    for r in rows:
        s = score.get((r["case"], r["mode"]))
        if s and r.get("median_ms") and s.get("median_ms"):
            r["speedup_vs_score"] = s["median_ms"] / r["median_ms"]
        if s and r.get("peak_mem_bytes") and s.get("peak_mem_bytes"):
            r["mem_vs_score"] = r["peak_mem_bytes"] / s["peak_mem_bytes"]


def accuracy_rows(device: str, dtype=torch.float32, B: int = 2, H: int = 4, L: int = 128,
                  d_s: int = D_S, d_t: int = D_T, eps=(1.0, 1e-1, 1e-2, 1e-3, 1e-4),
                  grad_scale: float = 1.0) -> list[dict]:
    """Relative errors against float64 as the student approaches the teacher.

    The teacher carries the student's scores in its first d_s head dims (rescaled for its
    1/sqrt(d_t)) plus eps-sized scores from the other d_t - d_s, so r = ||S_s - S_t|| / ||S_t||
    ~ 0.77 eps.  Errors of the loss and of dQ_s / dK_s for the score path in the input dtype
    (tinybert_fast.reference: scores by torch.matmul, then the loss), "gram" and "tiled", all
    against the score path in float64 on the same (rounded) inputs; 25% of one sequence padded.
    grad_scale: grad_output of the backward (2^16 keeps float16 gradients out of the subnormals).
    """
    g = torch.Generator(device=device).manual_seed(0)
    randn = lambda *shape: torch.randn(shape, generator=g, device=device)
    mask = torch.ones(B, L, dtype=torch.int64, device=device)
    mask[-1, 3 * L // 4:] = 0
    s = (d_t / d_s) ** 0.25
    q_s, k_s, q_r, k_r = randn(B, H, L, d_s), randn(B, H, L, d_s), randn(B, H, L, d_t - d_s), \
        randn(B, H, L, d_t - d_s)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    rows = []
    for e in eps:
        x = [t.to(dtype) for t in (q_s, k_s, torch.cat([q_s * s, q_r], -1),
                                    torch.cat([k_s * s, k_r * e], -1))]
        x64 = [t.double().requires_grad_(i < 2) for i, t in enumerate(x)]
        want = tbf.reference.attention_mse_qk(*x64, mask)
        want_g = torch.autograd.grad(want, x64[:2], torch.tensor(grad_scale, device=device,
                                                                 dtype=torch.float64))
        with torch.no_grad():
            keep = mask[:, None, None, :].double()
            s_s = x64[0] @ x64[1].transpose(-1, -2) / d_s ** 0.5 * keep
            s_t = x64[2] @ x64[3].transpose(-1, -2) / d_t ** 0.5 * keep
        row = {"dtype": str(dtype)[6:], "eps": e, "r": ((s_s - s_t).norm() / s_t.norm()).item()}
        impls = {"score": tbf.reference.attention_mse_qk,
                 "gram": functools.partial(tbf.attention_mse_qk, method="gram"),
                 "tiled": functools.partial(tbf.attention_mse_qk, method="tiled")}
        for name, fn in impls.items():
            y = [t.clone().requires_grad_(i < 2) for i, t in enumerate(x)]
            loss = fn(*y, mask)
            dq, dk = torch.autograd.grad(loss, y[:2], torch.tensor(grad_scale, device=device))
            row.update({f"{name}_loss": rel(loss, want), f"{name}_dq": rel(dq, want_g[0]),
                        f"{name}_dk": rel(dk, want_g[1])})
        rows.append(row)
    return rows


def format_accuracy(rows: list[dict]) -> str:
    cols = [f"{n}_{q}" for q in ("loss", "dq", "dk") for n in ("score", "gram", "tiled")]
    head = f"{'r':>9}" + "".join(f"{c:>12}" for c in cols)
    return "\n".join([head, "-" * len(head)] + [
        f"{r['r']:>9.1e}" + "".join(f"{r[c]:>12.1e}" for c in cols) for r in rows])


@pytest.mark.parametrize("provider", ["score", "gram", "tiled"])
def test_attention_qk_full(benchmark, bench_device, provider):
    # L = 2048 on CUDA (the target: >= 4x the score path); a tiny smoke case on CPU
    benchmark_full_pass(benchmark, cases(quick=bench_device != "cuda")[2 if bench_device == "cuda"
                                                                        else 0],
                        provider, bench_device)


def bench_parser(prog: str, doc: str, providers) -> argparse.ArgumentParser:
    """The options of the Q/K benchmarks (this file and bench_attention_kl)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", default=",".join(providers))
    parser.add_argument("--modes", default="fwd,bwd,full")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--max-measure-gb", type=float, default=2.0,
                        help="CPU: measure a provider only where its analytic peak is below this")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    return parser


def start_device(parser: argparse.ArgumentParser) -> tuple[str, dict]:
    """(device, device_info) with the fused backend set for the device; prints the header.  The
    CPU mode runs the fused launchers, so without a GPU TRITON_INTERPRET=1 is required."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        parser.error("no GPU: the CPU mode runs the fused launchers; set TRITON_INTERPRET=1")
    fused_backend_for(device)
    info = device_info(device)
    print(f"# {info['device']}  torch {info['torch']}  triton {info['triton']}", flush=True)
    return device, info


def main(argv=None) -> int:
    parser = bench_parser("python -m benchmarks.bench_attention_qk", __doc__, PROVIDERS)
    parser.add_argument("--accuracy", action="store_true",
                        help="only the accuracy sweep (student -> teacher), fp32 inputs")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    device, info = start_device(parser)
    if args.accuracy:
        rows = accuracy_rows(device)
        print("# relative error vs float64 as the student approaches the teacher, "
              "r = ||S_s - S_t|| / ||S_t||; fp32 inputs, B=2 H=4 L=128 d 26/64")
        print(format_accuracy(rows))
        path = write_results(rows, info, os.path.join(args.out, device_slug(info)),
                             "attention_qk_accuracy")
    elif device == "cpu":
        path = write_memory(cpu_memory_rows(args.max_measure_gb, lengths), info, args.out,
                            "attention_qk_memory", "score")
    else:
        rows = time_lengths(case, lengths, device, args.providers.split(","),
                            args.modes.split(","))
        add_score_ratios(rows)
        print(format_table(rows))
        print_ratios(rows, "score")
        path = write_results(rows, info, os.path.join(args.out, device_slug(info)),
                             "attention_qk")
    print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
