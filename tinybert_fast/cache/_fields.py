"""The `int[] layout` argument of the cache ops, field by field, in order: the one Python copy of
csrc/teacher_cache.h's TBF_LAYOUT_FIELDS (the extension reports its own through layout_fields(),
checked against this on load).  Import-free, so the extension loader, the fake kernels and the
format all take it from here without importing one another."""

LAYOUT_FIELDS = ("num_logits", "num_hidden", "hidden_size", "num_attention", "num_heads",
                 "storage", "qk_head_dim", "qk_min_length")
