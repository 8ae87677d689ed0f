"""Masked-LM proposals: the top-K replacement tokens of many (sentence, masked word) queries,
batched, with the prediction head run only on the masked positions and the allowed tokens."""

from __future__ import annotations

import os

from ._cpu import cpu_has_bf16_dot

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
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16_dot() else None
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
