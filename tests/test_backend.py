"""Backend selection: set_backend/get_backend, TINYBERT_FAST_BACKEND, and where each backend routes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tinybert_fast as tbf
from conftest import DEVICE, ON_CUDA, assert_fused, cpu_only, cuda_only, make, needs_triton


def _run(code: str, **env_overrides) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (the backend is read at import).  TRITON_INTERPRET and
    TINYBERT_FAST_BACKEND are removed from the environment unless given."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TINYBERT_FAST_BACKEND")}
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)


# --- set_backend / get_backend --------------------------------------------------------------------

def test_set_backend_returns_previous():
    start = tbf.get_backend()
    assert tbf.set_backend("torch") == start
    assert tbf.get_backend() == "torch"
    assert tbf.set_backend("auto") == "torch"
    assert tbf.set_backend("triton") == "auto"
    assert tbf.get_backend() == "triton"


@pytest.mark.parametrize("bad", ["cuda", "Triton", "", "eager", None, 1])
def test_set_backend_rejects_unknown(bad):
    tbf.set_backend("torch")
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\)"):
        tbf.set_backend(bad)
    assert tbf.get_backend() == "torch", "a rejected name must leave the backend unchanged"


# --- TINYBERT_FAST_BACKEND, read at import -----------------------------------------------------------

@pytest.mark.parametrize("value, expected", [(None, "auto"), ("auto", "auto"), ("torch", "torch"),
                                             ("triton", "triton")])
def test_env_var_sets_initial_backend(value, expected):
    env = {} if value is None else {"TINYBERT_FAST_BACKEND": value}
    proc = _run("import tinybert_fast as t; print(t.get_backend())", **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


def test_env_var_invalid_fails_at_first_use():
    """The import succeeds (the command line must be able to turn the mistake into its one-line
    error); the first use of the backend raises, naming the variable and its value, until
    set_backend picks one."""
    proc = _run("""
        import torch, tinybert_fast as tbf
        for use in (tbf.get_backend, lambda: tbf.attention_mse(torch.zeros(1, 1, 2, 2),
                                                               torch.zeros(1, 1, 2, 2))):
            try:
                use()
            except ValueError as exc:
                print(type(exc).__name__, exc)
        tbf.set_backend("torch")
        print(tbf.get_backend())
    """, TINYBERT_FAST_BACKEND="gpu")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[2] == "torch", lines
    for line in lines[:2]:
        assert line.startswith("InputError environment variable TINYBERT_FAST_BACKEND"), line
        assert "must be one of ('auto', 'triton', 'torch')" in line and "'gpu'" in line


# --- backend "triton" on CPU without the interpreter ------------------------------------------------

def test_triton_on_cpu_without_interpreter_raises():
    code = """
        import json, torch, tinybert_fast as tbf
        tbf.set_backend("triton")
        s, t = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
        x, y, w = torch.randn(2, 5, 4), torch.randn(2, 5, 6), torch.randn(6, 4)
        zs, zt = torch.randn(4, 7), torch.randn(4, 7)
        calls = {
            "attention_mse": lambda: tbf.attention_mse(s, t),
            "hidden_mse": lambda: tbf.hidden_mse(x, y, w),
            "soft_cross_entropy": lambda: tbf.soft_cross_entropy(zs, zt),
            "distillation_loss": lambda: tbf.distillation_loss(student_logits=zs,
                                                               teacher_logits=zt),
        }
        out = {}
        for name, call in calls.items():
            try:
                call()
                out[name] = None
            except Exception as e:
                out[name] = [type(e).__name__, str(e)]
        # the registered ops' CPU kernels fall back to PyTorch (they launch Triton only when the
        # interpreter is on), so calling an op directly still works
        loss = torch.ops.tinybert_fast.soft_cross_entropy(zs, zt, 1.0, 1.0 / 28)[0]
        ref = tbf.reference.soft_cross_entropy(zs, zt)
        out["op_fallback_close"] = abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
        print(json.dumps(out))
    """
    proc = _run(code, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("attention_mse", "hidden_mse", "soft_cross_entropy", "distillation_loss"):
        assert out[name] is not None, f"{name} ran Triton on CPU without TRITON_INTERPRET"
        kind, message = out[name]
        assert kind == "RuntimeError", (name, kind, message)
        assert "TRITON_INTERPRET=1" in message and "'auto' or 'torch'" in message, message
    assert out["op_fallback_close"]


# --- where each backend routes ---------------------------------------------------------------------

def _inputs(device=DEVICE):
    return {
        "attention_mse": (make((2, 3, 5, 5), device=device), make((2, 3, 5, 5), device=device)),
        "hidden_mse": (make((2, 5, 4), device=device), make((2, 5, 6), device=device),
                       make((6, 4), device=device)),
        "soft_cross_entropy": (make((4, 7), device=device), make((4, 7), device=device)),
    }


@pytest.fixture
def reference_spy(monkeypatch):
    """Records calls of tinybert_fast.reference.<loss> (the ops call it through the module)."""
    calls = []
    for name in ("attention_mse", "hidden_mse", "soft_cross_entropy"):
        original = getattr(tbf.reference, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(tbf.reference, name, spy)
    return calls


@pytest.mark.parametrize("name", ["attention_mse", "hidden_mse", "soft_cross_entropy"])
def test_torch_backend_routes_to_reference(reference_spy, name, device):
    tbf.set_backend("torch")
    args = _inputs()[name]
    loss = getattr(tbf, name)(*args)
    assert reference_spy == [name]
    with pytest.raises(AssertionError):
        assert_fused(loss)
    torch.testing.assert_close(loss, getattr(tbf.reference, name)(*args))


@cpu_only
@pytest.mark.parametrize("name", ["attention_mse", "hidden_mse", "soft_cross_entropy"])
def test_auto_backend_on_cpu_routes_to_reference(reference_spy, name):
    tbf.set_backend("auto")
    loss = getattr(tbf, name)(*_inputs("cpu")[name])
    assert reference_spy == [name]
    with pytest.raises(AssertionError):
        assert_fused(loss)


@cuda_only
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("name", ["attention_mse", "hidden_mse", "soft_cross_entropy"])
def test_cuda_routes_to_fused(reference_spy, backend, name):
    tbf.set_backend(backend)
    loss = getattr(tbf, name)(*_inputs("cuda")[name])
    assert reference_spy == []
    assert_fused(loss)


@needs_triton
@pytest.mark.parametrize("name", ["attention_mse", "hidden_mse", "soft_cross_entropy"])
def test_triton_backend_routes_to_fused(reference_spy, fused, name, device):
    args = _inputs()[name]
    loss = getattr(tbf, name)(*args)
    assert reference_spy == []
    assert_fused(loss)
    torch.testing.assert_close(loss, getattr(tbf.reference, name)(*args), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["attention_mse", "hidden_mse", "soft_cross_entropy"])
def test_triton_backend_rejects_other_devices(name):
    tbf.set_backend("triton")
    args = [a.detach().to("meta") for a in _inputs("cpu")[name]]
    with pytest.raises(ValueError, match=r"backend 'triton' supports CUDA tensors.*meta"):
        getattr(tbf, name)(*args)


def test_reference_on_meta_is_shape_only():
    """The eager path runs on any device, e.g. meta tensors under backend "torch"."""
    tbf.set_backend("torch")
    out = tbf.attention_mse(torch.empty(2, 3, 5, 5, device="meta"),
                            torch.empty(2, 3, 5, 5, device="meta"))
    assert out.device.type == "meta" and out.shape == ()
