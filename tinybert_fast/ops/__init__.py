"""Registered torch ops (torch.library) behind the public losses, with autograd and fake kernels."""

from .attention_kl import attention_kl_scores
from .attention_kl_qk import attention_kl, attention_kl_qk
from .attention_mse import attention_mse
from .attention_mse_qk import attention_mse_qk
from .hidden_cosine import hidden_cosine
from .hidden_mse import hidden_mse
from .kl_divergence import kl_divergence
from .soft_cross_entropy import soft_cross_entropy

__all__ = ["attention_kl", "attention_kl_qk", "attention_kl_scores", "attention_mse",
           "attention_mse_qk", "hidden_cosine", "hidden_mse", "kl_divergence", "soft_cross_entropy"]
