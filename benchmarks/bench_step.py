"""End-to-end TinyBERT task-distillation step (step 1: attention + hidden losses).

    python -m benchmarks.bench_step [--steps 30] [--quick]

TinyBERT4 student (4 layers, hidden 312, 12 heads, FFN 1200) <- a BERT-base-sized teacher
(12 layers, hidden 768; random weights), B=32, L=128, uniform mapping, bf16 autocast on CUDA:

    (a) eager   the eager reference losses + the teacher's forward every step
    (b) fused   the fused losses + the teacher's forward every step
    (c) cache   the fused losses + teacher outputs read from a teacher cache (prefetched)
    (d) limit   the student's forward + backward alone (same capture, a trivial loss)

Reports examples/s and tokens/s (median and 20/80 percentiles of per-step times, measured side
by side in one run), (c)/(a) and (d)/(c).  Without a GPU it runs tiny models as a smoke test.
Results: benchmarks/results/<device>/step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

import pytest
import torch

import tinybert_fast as tbf
from tinybert_fast import capture, mapping
from tinybert_fast import cache as tc

from .common import device_info, device_slug, write_results

FULL = dict(teacher=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072),
            student=dict(hidden_size=312, num_hidden_layers=4, num_attention_heads=12,
                         intermediate_size=1200), B=32, L=128, vocab=30522)
QUICK = dict(teacher=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=128),
             student=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64), B=4, L=16, vocab=1000)
PROVIDERS = ("eager", "fused", "cache", "limit")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _quantiles(times):
    times = sorted(times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    return {"median_ms": 1e3 * pick(0.5), "p20_ms": 1e3 * pick(0.2), "p80_ms": 1e3 * pick(0.8)}


def run(steps: int, quick: bool, device: torch.device) -> list[dict]:
    from transformers import BertConfig, BertForSequenceClassification, BertModel
    spec = QUICK if quick else FULL
    B, L = spec["B"], spec["L"]
    attn = capture.register()
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(
        vocab_size=spec["vocab"], attn_implementation=attn, **spec["teacher"])).eval().to(device)
    if device.type == "cuda":
        teacher = teacher.to(torch.bfloat16)
    lm = mapping.layer_map("uniform", spec["student"]["num_hidden_layers"],
                           spec["teacher"]["num_hidden_layers"])
    n_batches = min(steps, 16)
    batches = [{"input_ids": torch.randint(1000 if not quick else 5, spec["vocab"], (B, L)),
                "attention_mask": torch.ones(B, L, dtype=torch.long),
                "token_type_ids": torch.zeros(B, L, dtype=torch.long),
                "example_id": torch.arange(i * B, (i + 1) * B)} for i in range(n_batches)]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def teacher_targets(inputs):
        with torch.no_grad(), capture.record_scores(lm.teacher_attention_layers) as rec:
            out = teacher(**inputs, output_hidden_states=True)
        return rec.layers, [out.hidden_states[i] for i in lm.teacher_hidden_states]

    root = tempfile.mkdtemp(prefix="tbf-step-")
    t0 = time.perf_counter()
    cache = tc.TeacherCache.build(
        os.path.join(root, "cache"), teacher,
        ({k: v.to(device) if k != "example_id" else v for k, v in b.items()} for b in batches),
        attention_layers=lm.teacher_attention_layers, hidden_states=lm.teacher_hidden_states,
        dtype="bf16")
    build_s = time.perf_counter() - t0

    rows = []
    for provider in PROVIDERS:
        torch.manual_seed(1)
        student = BertModel(BertConfig(vocab_size=spec["vocab"], attn_implementation=attn,
                                       **spec["student"])).to(device).train()
        proj = torch.nn.Linear(spec["student"]["hidden_size"],
                               spec["teacher"]["hidden_size"]).to(device)
        opt = torch.optim.AdamW([*student.parameters(), *proj.parameters()], lr=5e-5)
        impl = tbf.reference if provider == "eager" else tbf
        ids = [batches[i % n_batches]["example_id"] for i in range(steps)]
        fetched = iter(cache.prefetch(ids, device)) if provider == "cache" else None
        times = []
        for i in range(steps):
            batch = batches[i % n_batches]
            _sync(device)
            t = time.perf_counter()
            inputs = {k: batch[k].to(device, non_blocking=True)
                      for k in ("input_ids", "attention_mask", "token_type_ids")}
            with autocast:
                if provider in ("eager", "fused"):
                    t_att, t_hid = teacher_targets(inputs)
                elif provider == "cache":
                    got = next(fetched)
                    t_att, t_hid = list(got.attention), list(got.hidden)
                with capture.record_scores(range(len(lm.attention))) as rec:
                    s = student(**inputs, output_hidden_states=True)
                if provider == "limit":
                    loss = sum(x.float().mean() for x in rec.layers) + \
                        s.last_hidden_state.float().mean()
                else:
                    mask = inputs["attention_mask"] if provider == "cache" else None
                    loss = (impl.attention_mse(rec.layers, t_att, mask,
                                               mask_queries=mask is not None)
                            + impl.hidden_mse(list(s.hidden_states), t_hid, proj.weight,
                                              proj.bias, token_mask=mask))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - t)
        times = times[min(3, steps - 1):]  # warm-up (autotuning, allocator, caches)
        q = _quantiles(times)
        per_s = 1e3 / q["median_ms"]
        rows.append({"provider": provider, "B": B, "L": L, "steps_timed": len(times), **q,
                     "examples_per_s": B * per_s, "tokens_per_s": B * L * per_s})
    by = {r["provider"]: r for r in rows}
    for r in rows:
        r["vs_eager"] = r["examples_per_s"] / by["eager"]["examples_per_s"]
    rows.append({"provider": "summary", "cache_over_eager": by["cache"]["vs_eager"],
                 "limit_over_cache": by["limit"]["examples_per_s"] / by["cache"]["examples_per_s"],
                 "cache_build_s": build_s, "cache_bytes": cache.nbytes})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="tiny models (forced without a GPU)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if not tc.HAS_EXTENSION:
        parser.error(f"the teacher-cache extension is not built: {tc.EXTENSION_ERROR}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type != "cuda"
    if device.type == "cpu":
        tbf.set_backend("triton" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
                        else "torch")
    rows = run(args.steps, quick, device)
    info = device_info(device.type)
    info["mode"] = "quick (tiny models: a smoke test)" if quick else "full"
    info["backend"] = tbf.get_backend()
    for r in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    print("# wrote", write_results(rows, info, os.path.join(args.out, device_slug(info)),
                                  "step" if not quick else "step_quick"))
    return 0


def test_step_smoke(tmp_path):
    """The four providers run end to end (tiny models; CPU or GPU)."""
    if not tc.HAS_EXTENSION:
        pytest.skip(f"teacher-cache extension not built: {tc.EXTENSION_ERROR}")
    rows = run(4, True, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert {r["provider"] for r in rows} == set(PROVIDERS) | {"summary"}
    assert all(r["examples_per_s"] > 0 for r in rows if r["provider"] != "summary")


if __name__ == "__main__":
    sys.exit(main())
