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

`record_scores(layers, stacked=True)` writes the layers' scores into one [n, B, H, L, L] buffer as
they are computed (no copy): `scores.stacked` is that buffer, differentiable, which the losses
take in one kernel launch for all layers (a list launches once per layer).

`record_qk(layers)` records each layer's (Q, K) [B, H, L, d] instead and leaves the attention
itself to SDPA on every layer: the input of `tinybert_fast.attention_mse_qk`, which computes the
same loss without the L x L scores.

Encoder families (`family(config)` says what each needs; `FAMILIES` lists them):
- BERT, RoBERTa, ELECTRA, ModernBERT call the registered function with their layer index.
- DistilBERT calls it without one: `register()` wraps its `Transformer.forward` so that each
  layer's attention module carries its index before the layers run.
- MPNet computes attention inline (no AttentionInterface), with a relative position bias:
  S = Q K^T / sqrt(d) + position_bias + mask, position_bias [B, H, L, L] computed once per
  forward from a [32 buckets, H] table and added in every layer.  `register()` wraps
  `MPNetEncoder.forward` (layer indices) and `MPNetSelfAttention.forward`: a layer being recorded
  computes its scores as above, bias included, exactly as the model does, and finishes attention
  from them; every other layer runs the model's own code.  The Q/K form cannot carry the bias:
  `record_qk` on an MPNet layer raises ValueError (use the scores).
- DeBERTa(-v2) is not supported: its disentangled attention adds content-to-position and
  position-to-content terms computed inside its attention module, outside any hook;
  `family()` refuses it, and every other model type, by name.
The wrappers change nothing while no record is active (they call the model's own forward).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .reference import attention_scores

ATTN_IMPLEMENTATION = "tinybert_fast"


class _ScoresIntoSlot(torch.autograd.Function):
    """attention_scores(query, key, bias, scaling) written into `slot` (a tensor of its own that
    shares the record's buffer) instead of a new tensor; backward as the eager formula's."""

    @staticmethod
    def forward(ctx, query, key, bias, slot, scaling):
        scores = torch.matmul(query, key.transpose(-1, -2))
        if bias is None:
            torch.mul(scores, scaling, out=slot)
        else:  # the same operations, in the same order, as reference.attention_scores
            torch.add(scores.mul_(scaling), bias, out=slot)
        ctx.mark_dirty(slot)
        ctx.save_for_backward(query, key)
        ctx.scaling = scaling
        ctx.bias_shape = None if bias is None else bias.shape
        return slot

    @staticmethod
    def backward(ctx, grad):
        query, key = ctx.saved_tensors
        g = grad.to(query.dtype) * ctx.scaling
        d_query = torch.matmul(g, key) if ctx.needs_input_grad[0] else None
        # (Q^T g)^T, not g^T Q: the product autograd takes for matmul(query, key^T), so the
        # gradients are bitwise the eager formula's (the two differ in the BLAS's last bits)
        d_key = (torch.matmul(query.transpose(-1, -2), g).transpose(-1, -2)
                 if ctx.needs_input_grad[1] else None)
        # a learned bias (an MPNet student's relative position bias) takes the scores' gradient,
        # summed over the dimensions it was broadcast along
        d_bias = grad.sum_to_size(ctx.bias_shape) if ctx.needs_input_grad[2] else None
        return d_query, d_key, d_bias, None, None


class _StackedSlots(torch.autograd.Function):
    """The buffer under n consecutive slots as one [n, ...] tensor, without a copy; its gradient
    goes back to the slots as views (grad.unbind(0)), also without a copy."""

    @staticmethod
    def forward(ctx, *slots):
        first = slots[0]
        return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(),
                                       (len(slots), *first.shape))

    @staticmethod
    def backward(ctx, grad):
        return grad.unbind(0)


class ScoreRecord:
    """The attention of chosen layers in one attention form, filled during a forward pass:
    pre-softmax scores (form "scores") or (Q, K) pairs (form "qk").  stacked=True (scores
    only): the scores are written into one [n_layers, B, H, L, L] buffer, given by
    `.stacked`."""

    def __init__(self, layer_indices: Iterable[int], form: str = "scores", stacked: bool = False):
        if form not in ("scores", "qk"):
            raise ValueError(f"form must be 'scores' or 'qk'; got {form!r}")
        if stacked and form != "scores":
            raise ValueError("stacked=True records scores (form 'scores'); Q and K stay per layer")
        self.form = form
        self.stacked_buffer = stacked
        self._buffer: torch.Tensor | None = None
        self.layer_indices = [int(i) for i in layer_indices]
        if len(set(self.layer_indices)) != len(self.layer_indices):
            raise ValueError(f"layer indices must be distinct; got {self.layer_indices}")
        self._wanted = set(self.layer_indices)
        self._scores: dict[int, torch.Tensor] = {}

    @property
    def kind(self) -> str:
        """Deprecated name of `form` (0.1.0); removed in the next release."""
        warnings.warn("ScoreRecord.kind is deprecated: use ScoreRecord.form", DeprecationWarning,
                      stacklevel=2)
        return self.form

    def wants(self, layer_idx) -> bool:
        return layer_idx in self._wanted

    def put(self, layer_idx: int, scores) -> None:
        if layer_idx in self._scores:
            raise RuntimeError(f"layer {layer_idx} was recorded twice in one record_scores block: "
                               f"run one forward pass per block")
        self._scores[layer_idx] = scores

    def scores_into_buffer(self, layer_idx: int, query, key, bias, scaling: float
                           ) -> torch.Tensor:
        """Compute this layer's scores (reference.attention_scores) into its slot of the buffer,
        allocated at the first layer: [n_layers, B, H, L, L] in the scores' dtype."""
        shape = (*query.shape[:-1], key.shape[-2])
        dtype = query.dtype if bias is None else torch.promote_types(query.dtype, bias.dtype)
        if self._buffer is None:
            self._buffer = torch.empty((len(self.layer_indices), *shape), dtype=dtype,
                                       device=query.device)
        elif tuple(self._buffer.shape[1:]) != shape or self._buffer.dtype != dtype:
            raise RuntimeError(f"layer {layer_idx}'s scores are {list(shape)} {dtype}, the "
                               f"record's buffer holds {list(self._buffer.shape[1:])} "
                               f"{self._buffer.dtype}: a stacked record needs equal layers")
        i = self.layer_indices.index(layer_idx)
        numel = self._buffer[0].numel()
        slot = query.new_empty(0, dtype=dtype).set_(
            self._buffer.untyped_storage(), self._buffer.storage_offset() + i * numel, shape)
        scores = _ScoresIntoSlot.apply(query, key, bias, slot, scaling)
        self.put(layer_idx, scores)
        return scores

    @property
    def stacked(self) -> torch.Tensor:
        """The recorded scores as one [n_layers, B, H, L, L] tensor (stacked=True: the buffer
        itself, differentiable, no copy)."""
        if not self.stacked_buffer:
            raise RuntimeError("this record was not made with stacked=True")
        return _StackedSlots.apply(*self.layers)

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


def record_scores(layer_indices: Iterable[int], *, stacked: bool = False):
    """Record the pre-softmax attention scores of these layers (0-based) in the block's forward;
    stacked=True writes them into one buffer (ScoreRecord.stacked)."""
    return _recording(ScoreRecord(layer_indices, "scores", stacked))


def record_qk(layer_indices: Iterable[int]):
    """Record (Q, K), each [B, H, L, d], of these layers (0-based); attention runs on SDPA."""
    return _recording(ScoreRecord(layer_indices, "qk"))


def _record_scores(record: ScoreRecord, layer_idx: int, query, key, bias, scaling: float):
    """This layer's pre-softmax scores Q K^T * scaling + bias (reference.attention_scores),
    recorded (into the stacked buffer when the record has one); returns them."""
    if record.stacked_buffer:
        return record.scores_into_buffer(layer_idx, query, key, bias, scaling)
    scores = attention_scores(query, key, bias, scaling=scaling)
    record.put(layer_idx, scores)
    return scores


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: query/key/value [B, H, L, d]; returns ([B, L, H, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    record = _ACTIVE.get()
    layer_idx = getattr(module, "layer_idx", None)
    if record is not None and record.form == "qk" and record.wants(layer_idx):
        record.put(layer_idx, (query, key))
        record = None
    if record is None or not record.wants(layer_idx):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    # the model's own scaling, multiplied, and its additive mask as given: what its eager
    # attention computes
    scores = _record_scores(record, layer_idx, query, key, attention_mask, scaling)
    probs = F.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


# --- encoder families ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Family:
    """What capture and the distillation loop need to know of an encoder family.

    position_bias: the pre-softmax scores carry a position bias shared by every layer (MPNet):
        recorded with the scores; the Q/K form, which cannot carry it, is refused.
    token_types: the model takes token_type_ids.
    """
    model_type: str
    position_bias: bool = False
    token_types: bool = True


FAMILIES = {f.model_type: f for f in (
    Family("bert"), Family("roberta"), Family("electra"), Family("modernbert", token_types=False),
    Family("distilbert", token_types=False),
    Family("mpnet", position_bias=True, token_types=False))}

_UNSUPPORTED = {
    "deberta": "its disentangled attention adds content-to-position and position-to-content "
               "terms inside its attention module, which no capture hook sees",
    "deberta-v2": "its disentangled attention adds content-to-position and position-to-content "
                  "terms inside its attention module, which no capture hook sees",
}


def family(config, argument: str = "model") -> Family:
    """The Family of a model's config (config.model_type); ValueError naming `argument` for a
    family whose attention cannot be captured exactly."""
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    why = _UNSUPPORTED.get(model_type, "it is not one of the supported families")
    raise ValueError(f"{argument}: model type {model_type!r} is not supported for attention "
                     f"capture: {why}; supported: {', '.join(sorted(FAMILIES))}")


MPNET_QK_ERROR = ("MPNet adds a relative position bias to every layer's scores, which the Q/K form "
                  "of the attention loss does not form: record the scores (capture.record_scores; "
                  "--attention-form scores)")


def _numbering_layers(forward, attention_of):
    """An encoder's forward that first gives each layer's attention module its index
    (layer_idx), which the family's layers do not pass on."""
    @functools.wraps(forward)
    def numbered(self, *args, **kwargs):
        for i, layer in enumerate(self.layer):
            attention_of(layer).layer_idx = i
        return forward(self, *args, **kwargs)
    numbered.tinybert_fast_wrapped = forward
    return numbered


def _mpnet_self_attention(forward):
    """MPNetSelfAttention.forward that, for a layer being recorded, computes the scores
    Q K^T / sqrt(d) + position_bias + mask (recorded) and attention from them, as the model
    does; other layers run `forward`, the model's own."""
    @functools.wraps(forward)
    def capturing(self, hidden_states, attention_mask=None, position_bias=None,
                  output_attentions=False, **kwargs):
        record = _ACTIVE.get()
        layer_idx = getattr(self, "layer_idx", None)
        if record is None or not record.wants(layer_idx):
            return forward(self, hidden_states, attention_mask, position_bias,
                           output_attentions=output_attentions, **kwargs)
        if record.form == "qk":
            raise ValueError(MPNET_QK_ERROR)
        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        query, key, value = (lin(hidden_states).view(shape).transpose(1, 2)
                             for lin in (self.q, self.k, self.v))
        bias = position_bias
        if attention_mask is not None:
            bias = attention_mask if bias is None else bias + attention_mask
        scores = _record_scores(record, layer_idx, query, key, bias,
                                self.attention_head_size ** -0.5)
        probs = F.softmax(scores, dim=-1)
        context = torch.matmul(self.dropout(probs), value).permute(0, 2, 1, 3).contiguous()
        out = self.o(context.view(*context.shape[:-2], self.all_head_size))
        return (out, probs) if output_attentions else (out,)
    capturing.tinybert_fast_wrapped = forward
    return capturing


def _wrap(cls, name: str, wrapper, *args) -> None:
    current = getattr(cls, name)
    if not hasattr(current, "tinybert_fast_wrapped"):  # once per process
        setattr(cls, name, wrapper(current, *args))


def _wrap_families() -> None:
    """The family wrappers (module docstring): DistilBERT's layer indices, MPNet's layer indices
    and its inline attention.  A transformers release that moved one of these classes leaves
    that family unwrapped, with a warning: its layers then record nothing, and the record's
    `layers` says so."""
    import importlib
    for module, cls, wrapper, *args in (
            ("distilbert", "Transformer", _numbering_layers, lambda layer: layer.attention),
            ("mpnet", "MPNetEncoder", _numbering_layers, lambda layer: layer.attention.attn),
            ("mpnet", "MPNetSelfAttention", _mpnet_self_attention)):
        try:
            found = getattr(importlib.import_module(f"transformers.models.{module}.modeling_"
                                                    f"{module}"), cls)
        except (ImportError, AttributeError) as exc:
            logging.getLogger(__name__).warning("capture: cannot wrap %s.%s (%s): %s models "
                                                "will record no attention", module, cls, exc,
                                                module)
            continue
        _wrap(found, "forward", wrapper, *args)


def register() -> str:
    """Register the capturing attention (and the eager mask) with transformers, and wrap the
    families that do not call it with a layer index (see the module docstring); returns its name.

    Idempotent.  Pass the name as `attn_implementation=` to `from_pretrained`, or to
    `model.set_attn_implementation(...)` for a model already built.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, eager_mask)
    _wrap_families()
    return ATTN_IMPLEMENTATION
