"""Which implementation the public loss functions run: fused Triton kernels or eager PyTorch.

    "auto"   (default) Triton kernels on CUDA tensors, the eager reference on CPU tensors.
    "triton" Triton kernels everywhere; on CPU tensors this needs TRITON_INTERPRET=1 (the Triton
             interpreter: slow, meant for tests) and raises a RuntimeError without it.
    "torch"  the eager reference (tinybert_fast.reference) everywhere.

The initial value comes from the environment variable TINYBERT_FAST_BACKEND.
"""

from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "torch")
_ENV = "TINYBERT_FAST_BACKEND"


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}; got {name!r}")
    return name


_backend = _validate(os.environ.get(_ENV, "auto"), _ENV)


def set_backend(name: str) -> str:
    """Select the backend ("auto" | "triton" | "torch"); returns the previous one."""
    global _backend
    previous, _backend = _backend, _validate(name, "backend")
    return previous


@contextlib.contextmanager
def selected(name: str):
    """The backend `name` for the block (the previous one after it)."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def get_backend() -> str:
    """The backend in effect."""
    return _backend


def triton_interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_fused(tensor: torch.Tensor) -> bool:
    """Whether a loss on `tensor`'s device runs the fused ops (True) or the reference (False)."""
    device = tensor.device.type
    if _backend == "torch":
        return False
    if _backend == "auto":
        return device == "cuda"
    if device == "cuda":
        return True
    if device == "cpu":
        if not triton_interpreter_enabled():
            raise RuntimeError(
                "backend 'triton' on CPU tensors runs the Triton kernels in Triton's interpreter, "
                "which needs the environment variable TRITON_INTERPRET=1 set before Triton is "
                "imported; use backend 'auto' or 'torch' for the eager implementation")
        return True
    raise ValueError(f"backend 'triton' supports CUDA tensors (and CPU under TRITON_INTERPRET=1); "
                     f"got a tensor on {tensor.device}")


def cpu_kernel_runs_triton() -> bool:
    """The registered ops' CPU kernels launch the Triton kernels (interpreted) only when the backend
    is "triton" and the interpreter is on; otherwise they compute the same results in PyTorch."""
    return _backend == "triton" and triton_interpreter_enabled()
