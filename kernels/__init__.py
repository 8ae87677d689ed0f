"""Triton kernels and their launchers (no autograd): one module per loss family."""
