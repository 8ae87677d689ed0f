"""Capture what the distillation losses need from Hugging Face BERT models, without editing them.

`transformers` (5.x) routes every self-attention layer through a function looked up by name in
`AttentionInterface`.  `register()` adds one, "tinybert_fast", that

- for the layers being recorded, computes the pre-softmax scores S = Q K^T * scaling + mask (the
  tensor TinyBERT's attention loss takes; tinybert_fast.reference.attention_scores), stores them,
  and finishes attention eagerly from them;
- for every other layer (and whenever nothing is recorded) hands the attention to PyTorch's SDPA,
  so layers the losses don't use cost what they cost without distillation.

It also registers the eager mask function under the same name: without a mask function of its own,
a custom attention implementation receives no padding mask.  The mask it receives is additive
(0 or the dtype's minimum on padded keys); TinyBERT's "<= -100 -> 0" rule removes it in the loss.

    model = BertModel.from_pretrained(path, attn_implementation=capture.register())
    with capture.record_scores([2, 5, 8, 11]) as scores:      # 0-based layer indices
        out = model(**batch, output_hidden_states=True)
    scores.layers   # list of [B, H, L, L], in the order the indices were given

`record_qk(layers)` records each layer's (Q, K) [B, H, L, d] instead and leaves the attention
itself to SDPA on every layer: the input of `tinybert_fast.attention_mse_qk`, which computes the
same loss without the L x L scores.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .reference import attention_scores

ATTN_IMPLEMENTATION = "tinybert_fast"


class ScoreRecord:
    """Pre-softmax scores (kind "scores") or (Q, K) pairs (kind "qk") of chosen layers, filled
    during a forward pass."""

    def __init__(self, layer_indices: Iterable[int], kind: str = "scores"):
        if kind not in ("scores", "qk"):
            raise ValueError(f"kind must be 'scores' or 'qk'; got {kind!r}")
        self.kind = kind
        self.layer_indices = [int(i) for i in layer_indices]
        if len(set(self.layer_indices)) != len(self.layer_indices):
            raise ValueError(f"layer indices must be distinct; got {self.layer_indices}")
        self._wanted = set(self.layer_indices)
        self._scores: dict[int, torch.Tensor] = {}

    def wants(self, layer_idx) -> bool:
        return layer_idx in self._wanted

    def put(self, layer_idx: int, scores) -> None:
        if layer_idx in self._scores:
            raise RuntimeError(f"layer {layer_idx} was recorded twice in one record_scores block: "
                               f"run one forward pass per block")
        self._scores[layer_idx] = scores

    @property
    def layers(self) -> list:
        """Scores [B, H, L, L] (or (Q, K) pairs) in the order of the requested layer indices."""
        missing = [i for i in self.layer_indices if i not in self._scores]
        if missing:
            raise RuntimeError(
                f"no scores were recorded for layers {missing}: is the model running with "
                f"attn_implementation={ATTN_IMPLEMENTATION!r} (tinybert_fast.capture.register()) "
                f"and does it have that many layers?")
        return [self._scores[i] for i in self.layer_indices]


_ACTIVE: contextvars.ContextVar[ScoreRecord | None] = contextvars.ContextVar(
    "tinybert_fast_score_record", default=None)


@contextlib.contextmanager
def _recording(record: ScoreRecord):
    token = _ACTIVE.set(record)
    try:
        yield record
    finally:
        _ACTIVE.reset(token)


def record_scores(layer_indices: Iterable[int]):
    """Record the pre-softmax attention scores of these layers (0-based) in the block's forward."""
    return _recording(ScoreRecord(layer_indices, "scores"))


def record_qk(layer_indices: Iterable[int]):
    """Record (Q, K), each [B, H, L, d], of these layers (0-based); attention runs on SDPA."""
    return _recording(ScoreRecord(layer_indices, "qk"))


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: query/key/value [B, H, L, d]; returns ([B, L, H, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    record = _ACTIVE.get()
    layer_idx = getattr(module, "layer_idx", None)
    if record is not None and record.kind == "qk" and record.wants(layer_idx):
        record.put(layer_idx, (query, key))
        record = None
    if record is None or not record.wants(layer_idx):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    # the model's own scaling, multiplied, and its additive mask as given: what its eager
    # attention computes
    scores = attention_scores(query, key, attention_mask, scaling=scaling)
    record.put(layer_idx, scores)
    probs = F.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the capturing attention (and the eager mask) with transformers; returns its name.

    Idempotent.  Pass the name as `attn_implementation=` to `from_pretrained`, or to
    `model.set_attn_implementation(...)` for a model already built.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, eager_mask)
    return ATTN_IMPLEMENTATION
