"""Which implementation the public loss functions run: fused Triton kernels or eager PyTorch.

    "auto"   (default) Triton kernels on CUDA tensors, the eager reference on CPU tensors.
    "triton" Triton kernels everywhere; on CPU tensors this needs TRITON_INTERPRET=1 (the Triton
             interpreter: slow, meant for tests) and raises a RuntimeError without it.
    "torch"  the eager reference (tinybert_fast.reference) everywhere.

The initial value comes from the environment variable TINYBERT_FAST_BACKEND; a value that is not
a backend fails at its first use (get_backend, a loss), not at import, with an InputError naming
the variable (the command line checks it before it runs anything).
"""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import InputError

BACKENDS = ("auto", "triton", "torch")
_ENV = "TINYBERT_FAST_BACKEND"


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}; got {name!r}")
    return name


def _from_environment() -> str | None:
    """TINYBERT_FAST_BACKEND's value, or None when it is not a backend: importing the package
    never fails for it (the command line could not turn a failed import into its one-line
    error), and every use of the backend raises environment_error() until set_backend picks
    one."""
    value = os.environ.get(_ENV, "auto")
    return value if value in BACKENDS else None


def environment_error() -> InputError:
    """The error for an invalid TINYBERT_FAST_BACKEND (names the variable and its value)."""
    return InputError(f"{_ENV} must be one of {BACKENDS}", argument=f"environment variable {_ENV}",
                      found=repr(os.environ.get(_ENV)), expected=f"one of {BACKENDS}, or unset")


_backend = _from_environment()


def set_backend(name: str) -> str | None:
    """Select the backend ("auto" | "triton" | "torch"); returns the previous one (None when the
    previous one was an invalid TINYBERT_FAST_BACKEND)."""
    global _backend
    previous, _backend = _backend, _validate(name, "backend")
    return previous


@contextlib.contextmanager
def selected(name: str):
    """The backend `name` for the block (the previous one after it)."""
    global _backend
    previous = set_backend(name)
    try:
        yield
    finally:
        _backend = previous


def get_backend() -> str:
    """The backend in effect.  Raises InputError (a ValueError) naming TINYBERT_FAST_BACKEND when
    it holds no backend and none was set since."""
    if _backend is None:
        raise environment_error()
    return _backend


def triton_interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_fused(tensor: torch.Tensor) -> bool:
    """Whether a loss on `tensor`'s device runs the fused ops (True) or the reference (False)."""
    device = tensor.device.type
    backend = _backend if _backend is not None else get_backend()
    if backend == "torch":
        return False
    if backend == "auto":
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
    backend = _backend if _backend is not None else get_backend()
    return backend == "triton" and triton_interpreter_enabled()
