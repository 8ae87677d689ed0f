"""tinybert-fast: fused Triton kernels for TinyBERT knowledge distillation.

    import tinybert_fast as tbf
    loss = tbf.attention_mse(student_scores, teacher_scores, attention_mask)

Public losses: attention_mse, hidden_mse, soft_cross_entropy, distillation_loss, distillation_terms
(every term of a stage's objective, the training loop's; and the modules
AttentionMSELoss, HiddenMSELoss, SoftCrossEntropyLoss, TinyBertLoss); from queries and keys,
attention_mse_qk (TinyBERT's loss) and attention_kl_qk (MiniLM's); attention_kl_scores (MiniLM's
from captured score maps, attention_mse's inputs).  tbf.reference holds the
eager implementations; tbf.set_backend picks "auto" | "triton" | "torch".
kl_divergence: the T^2-scaled logit KL of Hinton et al. and DistilBERT (beside soft_cross_entropy).
tbf.TeacherCache stores a teacher's outputs once and serves them every epoch (tinybert_fast.cache;
imported on first use of these names, and its C++ extension compiled or loaded on first use of the
cache, so importing tinybert_fast builds and loads nothing).
tbf.augment(input, output, ...) runs TinyBERT's data augmentation (the package
tinybert_fast.augment, which can be called; imported on first use).
tbf.hidden_cosine is the projected hidden-state cosine loss (1 - cos per token), beside hidden_mse.
"""

from . import reference
from ._backend import get_backend, set_backend
from .losses import (AttentionMSELoss, DistillLoss, HiddenMSELoss, SoftCrossEntropyLoss,
                     TinyBertLoss, distillation_loss, distillation_terms)
from .ops import (attention_kl, attention_kl_qk, attention_kl_scores, attention_mse, attention_mse_qk,
                  hidden_cosine, hidden_mse, kl_divergence, soft_cross_entropy)

__version__ = "0.1.0"

__all__ = [
    "attention_mse", "hidden_mse", "soft_cross_entropy", "distillation_loss", "distillation_terms",
    "DistillLoss",
    "attention_mse_qk", "attention_kl_qk", "attention_kl",
    "kl_divergence",
    "attention_kl_scores",
    "hidden_cosine",
    "AttentionMSELoss", "HiddenMSELoss", "SoftCrossEntropyLoss", "TinyBertLoss",
    "reference", "set_backend", "get_backend", "TeacherCache", "CacheWriter", "TeacherBatch",
    "augment",
]

_CACHE_NAMES = ("TeacherCache", "CacheWriter", "TeacherBatch")


def __getattr__(name: str):
    if name in _CACHE_NAMES:
        from . import cache
        return getattr(cache, name)
    if name == "augment":  # the package, callable as the function (tinybert_fast.augment)
        import importlib  # not `from . import augment`: that would ask this __getattr__ again
        return importlib.import_module(".augment", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
