"""pytest-benchmark suites: `pytest benchmarks` (full shapes on CUDA, tiny smoke shapes on CPU
where the fused provider runs the Triton interpreter and needs TRITON_INTERPRET=1)."""

import pytest
import torch

from ._providers import fused_backend_for


@pytest.fixture
def bench_device():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import tinybert_fast as tbf
    previous = tbf.get_backend()
    fused_backend_for(device)
    yield device
    tbf.set_backend(previous)
