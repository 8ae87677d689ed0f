"""Measured memory traffic of every op, forward and backward, under Triton's interpreter.

    TRITON_INTERPRET=1 python -m benchmarks.traffic [--quick] [--out benchmarks/results/traffic]

For each op (the public API's names) at its headline shape, student inputs requiring grad and the
teacher's not, this runs the fused op forward (`fwd`) and `loss.backward()` (`bwd`) on CPU tensors
with backend "triton" (the kernels interpreted) and counts:

- measured_bytes: the bytes every Triton kernel launch loads and stores, lane by lane: each
  `tl.load` / `tl.store` (and atomic) adds (lanes whose mask is true) x (element size), so
  masked-off lanes count nothing (TrafficCounter wraps the interpreter's load/store builders);
  plus the input + output bytes of the aten ops the fused path itself dispatches (partial sums,
  the reduction scale, ...), counted as the eager ones are.
- eager_bytes: the input + output bytes of every aten op the eager reference
  (tinybert_fast.reference) dispatches, forward and autograd backward (AtenTraffic, a
  TorchDispatchMode; views and allocations move nothing; a broadcast input counts its distinct
  elements only).
- compulsory_bytes: each input read once and the loss written (fwd); each gradient written once
  (bwd); their sum (fwd+bwd).
- launches: Triton kernel launches + aten ops that move bytes.

The interpreter is slow, so the tool measures at batch sizes 1, 2 and 3 of the headline shape,
fits bytes = a + b * B on the first two, checks that the third matches the fit (every count, per
launch too; exactly, or within FIT_SLACK_BYTES where a grid rounds up) and reports the headline
batch by the fit: those rows say "scaled from B=1,2 (checked at B=3: ...)".  Output: ops.json
({"rows": [...]}) and ops.md, whose time columns are a PREDICTION (bytes / copy bandwidth: H100
3.0 TB/s, H200 4.3 TB/s), not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# bytes per second of a device-to-device copy (read + write), for the predicted times
BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}
PASSES = ("fwd", "bwd", "fwd+bwd")


# --- counting ------------------------------------------------------------------------------------

def _elem_bytes(ptrs) -> int:
    """Bytes per element of the tensor a block of interpreter pointers points into."""
    return ptrs.get_element_ty().primitive_bitwidth // 8


def _lanes(mask) -> int:
    return int(mask.data.astype(bool).sum())


class TrafficCounter:
    """Counts what Triton kernels load and store under the interpreter (TRITON_INTERPRET=1).

    Inside `with TrafficCounter() as c:`, every kernel launch appends a record
    {"kernel": name, "loaded": bytes, "stored": bytes} to c.launches; each masked load/store
    adds (mask-true lanes) x (element size), an unmasked one every lane; an atomic counts as a
    load and a store of its active lanes.  c.in_kernel is True while a kernel runs (the
    interpreter's own host copies are not traffic: AtenTraffic skips them).
    """

    def __init__(self):
        self.launches: list[dict] = []
        self.in_kernel = False
        self._saved = []

    def _patch(self, owner, name, wrapper, required=True):
        if not required and not hasattr(owner, name):
            return  # an interpreter without it (atomics): nothing of that kind to count
        original = getattr(owner, name)
        self._saved.append((owner, name, original))
        setattr(owner, name, wrapper(original))

    def __enter__(self):
        from triton.runtime import interpreter as ti

        counter = self

        def count(kind):
            def wrap(original):
                def run(builder, ptrs, *args):
                    out = original(builder, ptrs, *args)
                    if counter.launches:
                        mask = args[1] if kind == "stored" else args[0]
                        counter.launches[-1][kind] += _lanes(mask) * _elem_bytes(ptrs)
                    return out
                return run
            return wrap

        def atomic(mask_index):
            def wrap(original):
                def run(builder, *args):
                    out = original(builder, *args)
                    ptrs = args[1] if mask_index == 3 else args[0]
                    lanes = (_lanes(args[mask_index]) if mask_index is not None
                             else int(ptrs.data.size))
                    if counter.launches:
                        nbytes = lanes * _elem_bytes(ptrs)
                        counter.launches[-1]["loaded"] += nbytes
                        counter.launches[-1]["stored"] += nbytes
                    return out
                return run
            return wrap

        def launch(original):
            def run(executor, *args, **kwargs):
                counter.launches.append({"kernel": executor.fn.__name__, "loaded": 0, "stored": 0})
                counter.in_kernel = True
                try:
                    return original(executor, *args, **kwargs)
                finally:
                    counter.in_kernel = False
            return run

        B = ti.InterpreterBuilder
        self._patch(B, "create_masked_load", count("loaded"))    # (ptrs, mask, other, ...)
        self._patch(B, "create_masked_store", count("stored"))   # (ptrs, value, mask, ...)
        self._patch(B, "create_atomic_rmw", atomic(3), False)    # (op, ptr, val, mask, ...)
        self._patch(B, "create_atomic_cas", atomic(None), False)  # (ptr, cmp, val, ...)
        self._patch(ti.GridExecutor, "__call__", launch)
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    @property
    def total(self) -> int:
        return sum(r["loaded"] + r["stored"] for r in self.launches)


# ops that move no bytes: views (func.is_view) and these allocations / metadata queries
_NO_TRAFFIC = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
               "detach", "alias", "lift_fresh", "set_", "resize_", "_reshape_alias",
               "_unsafe_view", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
               "is_same_size", "is_nonzero"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a view addresses (a broadcast dimension, stride 0, counts
    once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


class AtenTraffic(TorchDispatchMode):
    """Input + output bytes of every aten op dispatched in the block (records in .ops as
    (name, bytes)).  Ops of other namespaces (the project's registered ops) are entered, so the
    aten ops inside their kernels count; nothing is counted while `counter.in_kernel` (the Triton
    interpreter's host copies)."""

    def __init__(self, counter: TrafficCounter | None = None):
        super().__init__()
        self.counter = counter
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in ("aten", "prims"):
            # a registered op of this project: run its CPU kernel with this mode back on the
            # stack, so that the aten ops inside it are seen
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
                                       *args, **kwargs)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if (self.counter is not None and self.counter.in_kernel) or func.is_view \
                or name in _NO_TRAFFIC:
            return out
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        self.ops.append((name, sum(map(tensor_bytes, ins)) + sum(map(tensor_bytes, outs))))
        return out

    @property
    def total(self) -> int:
        return sum(b for _, b in self.ops)


@contextlib.contextmanager
def counting():
    """(TrafficCounter, AtenTraffic) over the block: Triton kernels and aten ops."""
    with TrafficCounter() as kernels, AtenTraffic(kernels) as aten:
        yield kernels, aten


# --- the ops at their shapes ---------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    """One op at one shape: `make(batch)` -> (fused fn, eager fn, inputs dict, names of the
    inputs that require grad).  `shape(batch)` is the shape's label."""
    op: str
    make: Callable
    shape: Callable[[int], str]
    batch: int              # the headline batch
    dtype: torch.dtype = torch.bfloat16
    headline: bool = True   # the op's headline shape (False: an extra shape beside it)


def _randn(gen, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _cases(dtype=torch.bfloat16) -> list[Case]:
    import tinybert_fast as tbf
    ref = tbf.reference
    n, H, L = 4, 12, 128          # TinyBERT4: 4 mapped attention layers, 12 heads, length 128
    d_s, d_t = 26, 64             # head dims of TinyBERT4 and BERT-base
    D_S, D_T, n_hid = 312, 768, 5  # hidden widths, 5 mapped states
    C = 1000                      # logits: the C = 1000, N = B*L = 4096 rows
    VOCAB = 30522                 # BERT's vocabulary: an MLM-logit KL (DistilBERT)

    def scores(fused, eager, scale):
        def make(B):
            g = torch.Generator().manual_seed(B)
            s = _randn(g, n, B, H, L, L, dtype=dtype, scale=scale)
            t = _randn(g, n, B, H, L, L, dtype=dtype, scale=scale)
            return fused, eager, {"student": s, "teacher": t}, ("student",)
        return make

    def qk(fused, eager):
        def make(B):
            g = torch.Generator().manual_seed(B)
            x = {"q_s": _randn(g, n, B, H, L, d_s, dtype=dtype),
                 "k_s": _randn(g, n, B, H, L, d_s, dtype=dtype),
                 "q_t": _randn(g, n, B, H, L, d_t, dtype=dtype),
                 "k_t": _randn(g, n, B, H, L, d_t, dtype=dtype)}
            return fused, eager, x, ("q_s", "k_s")
        return make

    def hidden(fused, eager):
        def make(B):
            g = torch.Generator().manual_seed(B)
            x = {"student": _randn(g, n_hid, B, L, D_S, dtype=dtype),
                 "teacher": _randn(g, n_hid, B, L, D_T, dtype=dtype),
                 "weight": _randn(g, D_T, D_S, dtype=dtype, scale=D_S ** -0.5),
                 "bias": _randn(g, D_T, dtype=dtype)}
            return fused, eager, x, ("student", "weight", "bias")
        return make

    def logits(fused, eager, C=C):
        def make(B):
            g = torch.Generator().manual_seed(B)
            x = {"student_logits": _randn(g, B, C, dtype=dtype, scale=2.0),
                 "teacher_logits": _randn(g, B, C, dtype=dtype, scale=2.0)}
            return fused, eager, x, ("student_logits",)
        return make

    score_shape = lambda B: f"n={n} B={B} H={H} L={L}"
    qk_shape = lambda B: f"n={n} B={B} H={H} L={L} d_s={d_s} d_t={d_t}"
    hid_shape = lambda B: f"n={n_hid} B={B} L={L} d_s={D_S} d_t={D_T}"
    logit_shape = lambda N: f"N={N} C={C}"
    vocab_shape = lambda N: f"N={N} C={VOCAB}"
    return [
        Case("attention_mse", scores(tbf.attention_mse, ref.attention_mse, 3.0), score_shape, 32,
             dtype),
        Case("attention_kl_scores", scores(tbf.attention_kl_scores, ref.attention_kl_scores, 3.0),
             score_shape, 32, dtype),
        Case("attention_mse_qk", qk(tbf.attention_mse_qk, ref.attention_mse_qk), qk_shape, 32,
             dtype),
        Case("attention_kl_qk", qk(tbf.attention_kl_qk, ref.attention_kl_qk), qk_shape, 32, dtype),
        Case("hidden_mse", hidden(tbf.hidden_mse, ref.hidden_mse), hid_shape, 32, dtype),
        Case("hidden_cosine", hidden(tbf.hidden_cosine, ref.hidden_cosine), hid_shape, 32, dtype),
        Case("soft_cross_entropy", logits(tbf.soft_cross_entropy, ref.soft_cross_entropy),
             logit_shape, 4096, dtype),
        Case("kl_divergence", logits(tbf.kl_divergence, ref.kl_divergence), logit_shape, 4096,
             dtype),
        # beside the headline: the MLM vocabulary (DistilBERT's KL), rows wider than one tile
        Case("soft_cross_entropy", logits(tbf.soft_cross_entropy, ref.soft_cross_entropy, VOCAB),
             vocab_shape, 4096, dtype, headline=False),
        Case("kl_divergence", logits(tbf.kl_divergence, ref.kl_divergence, VOCAB), vocab_shape,
             4096, dtype, headline=False),
    ]


def measure(fn, inputs: dict, needs_grad, fused: bool) -> dict:
    """{pass: {"bytes", "launches", "per_launch"}} of one forward + backward of fn(**inputs)."""
    import tinybert_fast as tbf
    x = {k: v.detach().clone().requires_grad_(k in needs_grad) for k, v in inputs.items()}
    out = {}
    with tbf._backend.selected("triton" if fused else "torch"):
        with counting() as (kern, aten):
            loss = fn(**x)
        out["fwd"] = _summary(kern, aten)
        with counting() as (kern, aten):
            loss.backward()
        out["bwd"] = _summary(kern, aten)
    out["fwd+bwd"] = {k: out["fwd"][k] + out["bwd"][k] for k in out["fwd"]}
    return out


def _summary(kern: TrafficCounter, aten: AtenTraffic) -> dict:
    per = [(r["kernel"], r["loaded"] + r["stored"]) for r in kern.launches] + list(aten.ops)
    return {"bytes": kern.total + aten.total, "launches": len(per), "per_launch": per}


def compulsory(inputs: dict, needs_grad) -> dict:
    """Each input read once + the fp32 loss written (fwd); each gradient written once (bwd)."""
    fwd = sum(tensor_bytes(v) for v in inputs.values()) + 4
    bwd = sum(tensor_bytes(inputs[k]) for k in needs_grad)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _affine(y1, y2, b1, b2, b):
    """The line through (b1, y1), (b2, y2) at b (exact integers)."""
    slope, rem = divmod(y2 - y1, b2 - b1)
    if rem:
        raise ValueError("not affine in the batch")
    return y1 + slope * (b - b1)


# Largest difference between a count measured at the third batch size and the fit on the first
# two that still counts as linear: a kernel whose grid rounds up (cdiv) may store a few partial
# sums more or less than the line says (hidden_cosine: 4 to 8 bytes).
FIT_SLACK_BYTES = 64


def _counts(case: Case, B: int) -> dict:
    fused, eager, inputs, needs = case.make(B)
    return {"measured": measure(fused, inputs, needs, True),
            "eager": measure(eager, inputs, needs, False),
            "compulsory": compulsory(inputs, needs)}


def _flat(c: dict) -> dict:
    """Every count of one size as {key: int} (per launch too), for the linearity check."""
    flat = {}
    for p in PASSES:
        for src in ("measured", "eager"):
            flat[(src, p, "bytes")] = c[src][p]["bytes"]
            flat[(src, p, "launches")] = c[src][p]["launches"]
        flat[("compulsory", p)] = c["compulsory"][p]
        for i, (name, nbytes) in enumerate(c["measured"][p]["per_launch"]):
            flat[("launch", p, i, name)] = nbytes
    return flat


def run_case(case: Case, sizes=(1, 2, 3), log=print) -> list[dict]:
    """Rows of one op (three passes) at its headline batch, by the fit described above."""
    b1, b2, b3 = sizes
    counts = [_flat(_counts(case, b)) for b in sizes]
    if not (counts[0].keys() == counts[1].keys() == counts[2].keys()):
        raise RuntimeError(f"{case.op}: the launches differ between batch sizes {sizes}")
    fit, worst = {}, 0
    for key in counts[0]:
        pred3 = _affine(counts[0][key], counts[1][key], b1, b2, b3)
        dev = abs(pred3 - counts[2][key])
        if dev > FIT_SLACK_BYTES:
            raise RuntimeError(f"{case.op}: {key} is {counts[2][key]} at B={b3}, the fit on "
                               f"B={b1},{b2} predicts {pred3}")
        worst = max(worst, dev)
        fit[key] = _affine(counts[0][key], counts[1][key], b1, b2, case.batch)
    rows = []
    for p in PASSES:
        launches = sorted((k[2], k[3], v) for k, v in fit.items()
                          if k[0] == "launch" and k[1] == p)
        rows.append({
            "op": case.op, "shape": case.shape(case.batch), "headline": case.headline,
            "dtype": str(case.dtype).replace("torch.", ""), "pass": p,
            "measured_bytes": fit[("measured", p, "bytes")],
            "compulsory_bytes": fit[("compulsory", p)],
            "eager_bytes": fit[("eager", p, "bytes")],
            "launches": fit[("measured", p, "launches")],
            "eager_launches": fit[("eager", p, "launches")],
            "per_launch": [{"kernel": name, "bytes": v} for _, name, v in launches],
            "method": (f"scaled from B={b1},{b2} (checked at B={b3}: "
                       + ("exact)" if worst == 0 else f"within {worst} bytes)")),
        })
        log(f"{case.op:20s} {p:8s} measured {rows[-1]['measured_bytes'] / 2**20:10.2f} MiB  "
            f"compulsory {rows[-1]['compulsory_bytes'] / 2**20:10.2f}  "
            f"eager {rows[-1]['eager_bytes'] / 2**20:10.2f}")
    return rows


# the ops whose forward + backward #26 asks at <= 1.5x compulsory and >= 3x less than eager
AT_THE_MINIMUM = ("attention_mse", "attention_kl_scores", "soft_cross_entropy", "kl_divergence")


def _ratio(a: float, b: float) -> str:
    """a / b for a table cell; '>999' for a backward that moves next to nothing."""
    if b == 0:
        return "-"
    return ">999" if a / b > 999 else f"{a / b:.2f}"


def _table(rows: list[dict]) -> list[str]:
    mib = lambda b: f"{b / 2**20:.1f}"
    us = lambda b, bw: f"{b / bw * 1e6:.0f}"
    lines = [
        "| op | shape | pass | measured MiB | compulsory MiB | eager MiB | measured / compulsory "
        "| eager / measured | launches | H100 µs (pred.) | H200 µs (pred.) "
        "| eager H100 µs (pred.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, c, e = r["measured_bytes"], r["compulsory_bytes"], r["eager_bytes"]
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['pass']} | {mib(m)} | {mib(c)} | {mib(e)} | "
            f"{_ratio(m, c)} | {_ratio(e, m)} | {r['launches']} | {us(m, BANDWIDTH['H100'])} | "
            f"{us(m, BANDWIDTH['H200'])} | {us(e, BANDWIDTH['H100'])} |")
    return lines


def markdown(rows: list[dict]) -> str:
    """ops.md: the bar of #26 for the four ops at the minimum, then every row."""
    both = [r for r in rows if r["pass"] == "fwd+bwd" and r.get("headline", True)
            and r["op"] in AT_THE_MINIMUM]
    lines = [
        "# Memory traffic per op (measured in Triton's interpreter)",
        "",
        "Written by `python -m benchmarks.traffic`.  Bytes every kernel launch loads and stores "
        "(mask-true lanes only) plus the fused path's own aten ops; compulsory = each input read "
        "once + each output and gradient written once; eager = input + output bytes of every "
        "aten op of `tinybert_fast.reference`.  Student inputs require grad, the teacher's do "
        "not; grad_output = 1; bf16; no attention mask; headline shapes scaled from measured "
        "batches (see `method` in ops.json).",
        "",
        "**The µs columns are a PREDICTION** (bytes / copy bandwidth: H100 3.0 TB/s, H200 "
        "4.3 TB/s), not a measurement: no GPU has timed these ops yet.",
        "",
        "Forward + backward at the headline shapes (#26: <= 1.5x compulsory, >= 3x less than "
        "eager): " + "; ".join(
            f"{r['op']} {_ratio(r['measured_bytes'], r['compulsory_bytes'])}x compulsory, "
            f"eager {_ratio(r['eager_bytes'], r['measured_bytes'])}x" for r in both) + ".",
        "",
        "## Headline shapes",
        "",
        *_table([r for r in rows if r.get("headline", True)]),
    ]
    extra = [r for r in rows if not r.get("headline", True)]
    if extra:
        lines += ["", "## Beside the headline", "",
                  "Logits over BERT's vocabulary: a row of 30,522 classes is wider than one tile "
                  "(4,096), so the forward reads it twice (the second time for the gradients).",
                  "", *_table(extra)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.traffic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "traffic"),
                        help="folder for ops.json and ops.md")
    parser.add_argument("--ops", nargs="*", help="only these ops (default: all)")
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite ops.md from the ops.json in --out, measuring nothing")
    args = parser.parse_args(argv)
    if args.markdown_only:
        with open(os.path.join(args.out, "ops.json")) as f:
            rows = json.load(f)["rows"]
        with open(os.path.join(args.out, "ops.md"), "w") as f:
            f.write(markdown(rows))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        parser.error("set TRITON_INTERPRET=1 (the counts come from Triton's interpreter)")
    torch.manual_seed(0)
    rows = []
    for case in _cases():
        if args.ops and case.op not in args.ops:
            continue
        rows += run_case(case)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ops.json"), "w") as f:
        json.dump({"rows": rows}, f, indent=1)
        f.write("\n")
    with open(os.path.join(args.out, "ops.md"), "w") as f:
        f.write(markdown(rows))
    print(f"wrote {args.out}/ops.json and ops.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
