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

Modules: words (splitting, candidate words), glove (vectors, neighbour search), mlm (masked-LM
proposals), core (the augment loop); the TSV layouts are tinybert_fast.glue's and the command
line is tinybert_fast.commands.augment.  The package itself can be called:
`tinybert_fast.augment(...)` is `tinybert_fast.augment.augment(...)`, so `tbf.augment` is both
the documented function and this package.
"""

from __future__ import annotations

import sys
import types

from ..glue import TsvLayout, detect_layout
from ._cpu import cpu_has_bf16_dot
from .core import AugmentResult, augment
from .glove import GloVe, _GloveNeighbours, _topk_by_blocks, load_glove
from .mlm import MLM_DTYPES, _MaskedLM, _resolve_mlm_dtype
from .words import STOP_WORDS, is_candidate, split_words

# the private pieces that tests and benchmarks/bench_augment.py reach as augment._<name>
_cpu_has_bf16_dot = cpu_has_bf16_dot

__all__ = ["augment", "AugmentResult", "GloVe", "load_glove", "STOP_WORDS", "split_words",
           "is_candidate", "detect_layout", "TsvLayout", "MLM_DTYPES"]


class _CallableModule(types.ModuleType):
    """This package as a function: tbf.augment(input, output, ...) runs `augment`."""

    def __call__(self, *args, **kwargs) -> AugmentResult:
        return augment(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
