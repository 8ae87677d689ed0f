"""The three providers every op is measured with, built the same way for each op."""

from __future__ import annotations

import functools

import torch

import tinybert_fast as tbf


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """torch.compile of an eager reference function (one compiled object per function)."""
    return torch.compile(fn, dynamic=False)


def providers(reference_fn, fused_fn, call):
    """{provider: fn(inputs)}: `call(impl, inputs)` applies an implementation to the inputs."""
    return {
        "eager": lambda inp: call(reference_fn, inp),
        "compile": lambda inp: call(compiled(reference_fn), inp),
        "fused": lambda inp: call(fused_fn, inp),
    }


def fused_backend_for(device: str) -> None:
    """The fused provider runs Triton kernels: on CPU that is the interpreter (smoke mode)."""
    tbf.set_backend("auto" if device == "cuda" else "triton")
