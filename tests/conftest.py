"""Shared fixtures and helpers for the tinybert-fast tests.

Where the fused (Triton) path runs:
  * on a CUDA machine: device "cuda", the compiled kernels (TRITON_INTERPRET must be unset);
  * on CPU: device "cpu", backend "triton" and TRITON_INTERPRET=1 set before Triton is imported
    (the CI runs `TRITON_INTERPRET=1 pytest -q tests`).  Without either, every test that needs
    the kernels is skipped with the reason below (`needs_triton`, or the `fused` fixture).

Numerics: a fused op is fed inputs in the test dtype and compared with tinybert_fast.reference fed
with the SAME values (already rounded to the dtype) upcast to float64, so the tolerances in DTYPES
only cover fp32 accumulation in the kernels and the rounding of gradients to the input dtype.
"""

from __future__ import annotations

import collections
import contextlib
import os
import zlib
from typing import NamedTuple

import pytest
import torch

import tinybert_fast as tbf
from tinybert_fast import _backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_CUDA = DEVICE == "cuda"
INTERPRETER = _backend.triton_interpreter_enabled()
TRITON_AVAILABLE = ON_CUDA or INTERPRETER
TRITON_SKIP_REASON = (
    "the fused Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 set before Triton is "
    "imported to run them on CPU in Triton's interpreter (run `TRITON_INTERPRET=1 pytest tests`)")

# Tests that run the Triton kernels (backend "triton" through the `fused` fixture, or the
# registered ops on CUDA) carry this mark.
needs_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason=TRITON_SKIP_REASON)
# The registered ops' PyTorch kernels are registered for CPU only (CUDA always runs Triton).
cpu_only = pytest.mark.skipif(ON_CUDA, reason="the ops' PyTorch (non-Triton) kernels are CPU-only")
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device")
# Triton's interpreter stores bfloat16 as uint16 and its tl.dot multiplies the raw bit patterns
# (triton-lang/triton#11584: "we just don't support it yet"), so a bfloat16 GEMM kernel cannot be
# checked on CPU; the CUDA run checks it.


def require_cache_extension() -> None:
    """Skip the calling test module when the teacher-cache C++ extension is not built, unless
    TBF_REQUIRE_EXTENSION=1 (CI), where its absence is an error."""
    from tinybert_fast import cache
    if cache.HAS_EXTENSION:
        return
    if os.environ.get("TBF_REQUIRE_EXTENSION") == "1":
        raise RuntimeError(f"TBF_REQUIRE_EXTENSION=1 but the extension is missing: "
                           f"{cache.EXTENSION_ERROR}")
    pytest.skip(f"the teacher-cache extension is not built ({cache.EXTENSION_ERROR})",
                allow_module_level=True)


class Tol(NamedTuple):
    """Relative tolerances (rel_err = ||got - want|| / ||want||) for the loss and the gradients."""
    loss: float
    grad: float


# The losses accumulate in fp32 whatever the input dtype, so only fp32 summation error is allowed
# on the loss (a kernel that accumulated in 16 bits would be off by ~1e-3).  Gradients are
# computed in fp32 and rounded once or twice (hidden: the saved residual, then the product) to
# the input dtype: bf16 half-ulp 2^-9 ~ 2e-3, fp16 2^-12 ~ 2.4e-4.
DTYPES: dict[torch.dtype, Tol] = {
    torch.float32: Tol(loss=1e-5, grad=1e-5),
    torch.bfloat16: Tol(loss=1e-4, grad=1.2e-2),
    torch.float16: Tol(loss=1e-4, grad=2e-3),
}
# Gradients of a mean over millions of entries are ~1e-6: subnormal (a few bits) in float16.  As
# AMP's GradScaler does, real-shape tests scale grad_output by 2^16 for float16.
LOSS_SCALE = {torch.float32: 1.0, torch.bfloat16: 1.0, torch.float16: 2.0 ** 16}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_params() -> list:
    """pytest params over DTYPES with readable ids."""
    return [pytest.param(dt, id=DTYPE_IDS[dt]) for dt in DTYPES]


def assert_fused(loss: torch.Tensor) -> None:
    """The loss went through a registered tinybert_fast op (not the eager reference)."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "tinybert_fast" in type(node).__name__:
            return
        stack.extend(n for n, _ in node.next_functions)
    raise AssertionError(f"expected a tinybert_fast op in the autograd graph of the loss "
                         f"(grad_fn {type(loss.grad_fn).__name__})")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (||a - b|| when b is all zeros)."""
    a = a.detach().to(torch.float64)
    b = b.detach().to(device=a.device, dtype=torch.float64)
    num = torch.linalg.vector_norm(a - b).item()
    den = torch.linalg.vector_norm(b).item()
    return num / den if den > 0 else num


def assert_rel(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = rel_err(got, want)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def random_scale(lo: float = 0.3, hi: float = 3.0) -> float:
    """A random gradient scale in [lo, hi) with a random sign (so grad_output != 1)."""
    u = torch.rand(2)
    g = lo + (hi - lo) * u[0].item()
    return -g if u[1].item() < 0.5 else g


def make(shape, dtype=torch.float32, device=DEVICE, requires_grad=True, scale=1.0):
    """A fresh random leaf tensor (drawn in fp32, then rounded to dtype)."""
    x = torch.randn(shape, device=device) * scale
    return x.to(dtype).requires_grad_(requires_grad)


def upcast(inputs):
    """float64 leaf copies of the same (rounded) values, keeping requires_grad."""
    return [x.detach().to(torch.float64).requires_grad_(x.requires_grad) for x in inputs]


def check_against_reference(fn, ref_fn, inputs, tol: Tol, grad_scale: float | None = None):
    """fn(*inputs) vs ref_fn(*float64 copies): the loss and the gradient of every input that
    requires grad, with grad_output = grad_scale (random when None).  Returns (loss, ref_loss)."""
    ref_inputs = upcast(inputs)
    loss = fn(*inputs)
    ref = ref_fn(*ref_inputs)
    assert loss.dim() == 0 and loss.dtype == torch.float32, (loss.shape, loss.dtype)
    assert loss.device == inputs[0].device
    assert_rel("loss", loss, ref.to(torch.float64), tol.loss)
    idx = [i for i, x in enumerate(inputs) if x.requires_grad]
    if not idx:
        return loss, ref
    g = random_scale() if grad_scale is None else grad_scale
    got = torch.autograd.grad(loss, [inputs[i] for i in idx],
                              grad_outputs=torch.full((), g, device=loss.device))
    want = torch.autograd.grad(ref, [ref_inputs[i] for i in idx],
                               grad_outputs=torch.full((), g, dtype=ref.dtype, device=ref.device))
    for i, gi, wi in zip(idx, got, want):
        assert gi is not None, f"input {i}: no gradient"
        assert gi.dtype == inputs[i].dtype, f"input {i}: gradient dtype {gi.dtype}"
        assert_rel(f"grad of input {i}", gi, wi, tol.grad)
    return loss, ref


def pytest_configure(config):
    # Triton's interpreter is noisy (numpy deprecations, overflow in masked-out lanes).
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:triton.*")
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.*")
    # raised inside torch.library.opcheck's own machinery, not by this package
    config.addinivalue_line("filterwarnings",
                            "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed_and_restore_backend(request):
    """A fresh, reproducible seed per test (from its id), and the backend restored afterwards."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    previous = tbf.get_backend()
    yield
    tbf.set_backend(previous)


@pytest.fixture
def fused():
    """Backend "triton" for one test (the fused kernels on CUDA, or interpreted on CPU)."""
    if not TRITON_AVAILABLE:
        pytest.skip(TRITON_SKIP_REASON)
    previous = tbf.set_backend("triton")
    try:
        yield "triton"
    finally:
        tbf.set_backend(previous)


@pytest.fixture
def torch_cpu_kernels():
    """Backend "auto": on CPU the registered ops run their PyTorch kernels, not Triton."""
    previous = tbf.set_backend("auto")
    try:
        yield "auto"
    finally:
        tbf.set_backend(previous)


def opcheck_backends() -> list:
    """Backends to run torch.library.opcheck under: on CPU, "auto" (PyTorch CPU kernels) and
    "triton" (interpreted Triton kernels, only with TRITON_INTERPRET=1); on CUDA, "auto" (the
    compiled Triton kernels: the ops' CUDA kernel is always Triton)."""
    if ON_CUDA:
        return [pytest.param("auto", id="cuda-triton")]
    return [pytest.param("auto", id="cpu-torch"),
            pytest.param("triton", id="cpu-triton-interpreted", marks=needs_triton)]


try:  # the exception torch.library.opcheck raises
    from torch.testing._internal.optests.generate_tests import OpCheckError
except ImportError:  # pragma: no cover - older/newer torch layouts
    OpCheckError = Exception


@contextlib.contextmanager
def count_launches():
    """{kernel name: launches} of the Triton kernels launched in the block (Triton's interpreter,
    where every launch of a @triton.jit kernel goes through InterpretedFunction.run)."""
    from triton.runtime.interpreter import InterpretedFunction

    counts: collections.Counter = collections.Counter()
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        return original(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        yield counts
    finally:
        InterpretedFunction.run = original
