"""The reduction of the attention-distribution KL losses (attention_kl_qk from Q and K,
attention_kl_scores from score maps), shared by both op families."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks


def row_kl_scale(attention_mask: Tensor | None, groups: list[Tensor], reduction: str):
    """c of the loss for groups [n, B, H, L, ...]: 1 ("sum"), 1/(B*H*L) ("mean", no mask), or
    1/(H * max(T, 1)) with T the tokens of attention_mask, a 0-dim fp32 tensor computed on the
    device ("mean" with a mask: no host synchronisation)."""
    _checks.check_reduction(reduction, "attention")
    _, B, H, L = groups[0].shape[:4]
    if reduction == "sum":
        return 1.0
    if attention_mask is None:
        return 1.0 / (B * H * L)
    return 1.0 / (torch.count_nonzero(attention_mask).clamp_min(1) * H).to(torch.float32)
