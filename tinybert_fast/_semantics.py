"""The numbers that define TinyBERT's loss semantics (README, "Loss semantics"), in one place.

The eager reference (tinybert_fast.reference), the registered ops (tinybert_fast.ops) and the
Triton kernels (tinybert_fast.kernels) all take them from here.  This module imports nothing, on
purpose: the kernels may depend on it without depending on the package above them, and the
reference without depending on torch.library or Triton.
"""

# Attention scores at or below this are the additive mask bias (or have absorbed it) and count as
# 0 in the attention loss: TinyBERT's `torch.where(s <= -1e2, 0, s)`.  Real scores of a trained
# BERT stay far above it; the bias (MASK_BIAS, or a dtype's minimum from Hugging Face) far below.
MASK_THRESHOLD = -100.0

# The additive bias on padded keys of scores formed from Q and K, BERT's extended attention mask
# (1 - m) * -10000: scores = Q K^T / sqrt(d) + MASK_BIAS * (1 - m[b, j]).  Below MASK_THRESHOLD by
# two orders of magnitude, so the attention loss removes it again whatever the unmasked score.
MASK_BIAS = -10000.0
