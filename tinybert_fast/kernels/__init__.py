"""Triton kernels and their launchers (no autograd): one module per loss family.

No family imports another: what they share is in _utils; the constants of the loss semantics are
tinybert_fast._semantics (import-free), the one module above kernels that they import.
"""
