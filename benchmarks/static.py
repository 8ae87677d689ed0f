"""Static compile for a GPU target without a GPU: every Triton kernel specialisation the launchers
produce, compiled ahead of time, with its resource usage.

    python -m benchmarks.static                          # sm_90, sm_80, sm_100: the full table
    python -m benchmarks.static --target sm_80 --headline  # every specialisation, real shapes
    python -m benchmarks.static --target sm_90 --quick   # CI: the TinyBERT4 shapes only
    python -m benchmarks.static --target sm_90 --cache-dir DIR   # fill a Triton cache for a GPU

How: the real launchers in `tinybert_fast/kernels/` are called with `device="meta"` tensors (shapes, strides and
storage offsets as on a GPU, no data).  A stand-in driver answers the three questions
`JITFunction.run` asks before compiling (device, stream, target), and `JITFunction._do_compile` is
replaced by a recorder, so Triton's own binder computes each launch's specialisation (dtypes,
ints equal to 1 or divisible by 16, pointer alignment, constexprs, options) exactly as it would on
the GPU, and nothing launches.  Each distinct specialisation is then compiled with
`triton.compiler.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))` -- the same call,
with the same arguments, that `_do_compile` makes -- so the cache entries it writes are the ones
the GPU's first launch looks up.

Per specialisation the table has: kernel, pointer dtypes, constexprs, num_warps, num_stages,
registers and spill bytes (ptxas's own log of the compile), shared memory (Triton's metadata),
blocks per SM (from registers, shared memory and warps against the target's limits), tensor-core
and asynchronous-copy instruction counts in the PTX and SASS (cuobjdump), global-load vector widths
and compile seconds.  Results: benchmarks/results/static/<target>.json.

Exit status 1 when a launcher fails, a kernel does not compile, a kernel needs more shared
memory than one block may have on the target (it would fail to launch), spills registers to local
memory (ptxas's spill stores > 0) or takes more than MAX_COMPILE_S to compile (a GPU's first
launch would wait that long).  CONFIG_NOTES, written into every table, says for the kernels whose
configuration was chosen against these tables why it is what it is.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from tinybert_fast.kernels import (attention_kl, attention_kl_qk, attention_mse, attention_mse_qk,
                                   hidden_mse, kl_divergence, soft_cross_entropy)
from tinybert_fast.kernels import hidden_cosine
from tinybert_fast.kernels import _utils

RESULTS = Path(__file__).resolve().parent / "results" / "static"
META = torch.device("meta")
MAX_COMPILE_S = 60.0

# Why the configurations of the kernels tuned against these tables are what they are (sm_90 figures
# from ptxas; the rows below give every target's).
CONFIG_NOTES = {
    "_hidden_mse_fwd_kernel": "16-bit: 128x64x64 tiles, 8 warps, 3 stages. K_DIV (the power of two "
        "dividing K and the X/W row strides) tells Triton what its own specialisation cannot (it "
        "marks multiples of 16 only): at K = 312 (TinyBERT4) the loads were scalar and unpipelined "
        "(0 cp.async, 255 registers); with K_DIV = 8 they are 16-byte cp.async. 128x128 then "
        "spilled 64-248 B (the epilogue's teacher tile and residual beside the accumulator). fp32: "
        "64x64x32, 4 warps (FMA products). K_DIV = 1 (the tests' K = 7, 9: 2-byte loads, no "
        "cp.async): 64 rows (NARROW_BLOCK_M); 16-bit 128x64 with the residual got 255 registers "
        "and spilled 40 B on sm_80 (64x64: 201-203 registers, 1 block/SM as before); fp32 at K_DIV "
        "= 1 on sm_100: 2 stages (3 spilled 28 B at 255 registers; 2 spilled 12 B on sm_90).",
    "_hidden_cosine_sums_kernel": "16-bit: 128x64x64 tiles, 8 warps, 3 stages, K_DIV as for "
        "hidden_mse; 128x128 spilled 204 B where K's loads are narrow (the tests' K = 7..100). "
        "K_DIV = 1: 64 rows as hidden_mse (128x64 spilled 44 B at 255 registers on sm_80; 64x64: "
        "200 registers).",
    "_hidden_cosine_bwd_kernel": "16-bit: 128x64x64 (one output) / 64x64x64 (G and dY), 8 warps, "
        "K_DIV as for hidden_mse: 128x128 spilled 214-432 B, the two-output epilogue 64-88 B at "
        "128x64 and 52-60 B at 64x64 with 4 warps; fp32 (FMA) 64x64x32, 32x64x32 for G and dY "
        "(4-84 B at 64x64).",
    "_gram_fwd_kernel": "BLOCK_L 64 rows per step with 16-bit tensor-core products; 16 when any "
        "product runs in fp32 (FMA: each thread holds its operand rows over the whole BLOCK_L "
        "reduction; 28-80 B spilled at 64 and 32 for d = 128); with fp32 products on sm_100 2 "
        "pipeline stages (3 spilled 20-36 B at 128-168 registers at d = 64/26 and 64/128; 2 "
        "stages spilled 4 B on sm_90, where 3 do not).",
    "_gram_bwd_kernel": "32 rows per program, [X1 | X2] G as a loop over 16 columns of X at a "
        "time, one gradient's accumulator live at a time. Holding all of X and the [D, D] Gram "
        "in registers spilled 116-276 B at d = 26/64 and 4.6-20 KB at d = 128, with 32 registers "
        "allocated and 31-166 s compiles (the slowest specialisations of the old table). Mixed "
        "dtypes (16-bit student, fp32 teacher): 16 rows (GRAM_BWD_MIXED_BLOCK_L); at 32 the "
        "one-gradient specialisation spilled 4 B on sm_100 (72 registers, 7 blocks/SM; at 16: 48 "
        "registers, 10 blocks/SM). BLOCK_K stays 16, tl.dot's smallest block.",
    "_tiled_fwd_kernel": "qk_tile_meta's 64x64 query/key tiles (16-bit, unchanged on every "
        "target); with fp32 products 1024 / BLOCK_D rows (32 at d <= 32, 16 from d = 64 on) and "
        "2 pipeline stages: the FMA path at 64x64 and d = 64/128 got 32 registers and 11-18 KB "
        "of spills; 2048 / BLOCK_D (32x32 at d = 64) still spilled 8-152 B (sm_80 152 B at 255 "
        "registers, sm_90 8-16 B, the fp32-student/fp16-teacher forward 16 B on sm_90); 16x16 "
        "with 3 stages 4-8 B at 56-128 registers (sm_80, sm_90). Cost: 4x the programs of the "
        "fp32 path at d = 64, each re-reading its key rows (the FMA path is compute bound).",
    "_tiled_bwd_kernel": "as _tiled_fwd_kernel; the backward of both models' gradients with "
        "16-bit products takes 32x32 tiles, 16x16 on heads wider than 64 (qk_bwd_meta): at 64x64 "
        "it got 255 registers and spilled 64 B on sm_80 (2 blocks/SM), and 8 warps instead of 4 "
        "did not help the twin _kl_bwd_kernel (255 registers, 8-24 B); at 32x32: 140-146 "
        "registers, 3 blocks/SM, no spills; on heads wider than 64 on sm_80 16x16 (32x32 with 4 "
        "warps spilled 8 B there; 16x16, 8 warps: 88-106 registers), and on sm_90 (32x32 with 8 "
        "warps spilled 8 B at 128 registers); sm_100 keeps HALF_WIDE_TILE 32x32 with 8 warps. The student-only backward (the distillation step, "
        "the teacher frozen) keeps 64x64 on every target (sm_90: 131-190 registers).",
    "_kl_fwd_kernel": "qk_tile_meta's 64x64 tiles (16-bit, unchanged); fp32 products 1024 / "
        "BLOCK_D rows (2048 / BLOCK_D = 32x32 at d = 64 spilled 4-32 B on sm_80, 12 B on sm_90, "
        "12-32 B on sm_100 with a 16-bit student beside an fp32 teacher); 16-bit products on "
        "heads wider than 64: 32x32 (16x16 on sm_100, HALF_WIDE_FWD_TILE: 32x32 spilled 12 B at 128 "
        "registers there with a mask). The fp32 16x16 tiles take (num_warps, num_stages) per "
        "target, FP32_LAUNCH: sm_80 (8, 3), sm_90 (4, 1), sm_100 (8, 2). Every single choice "
        "tried -- (4, 3), (4, 2), (4, 1), (8, 3), (8, 2), (2, 3) -- left 4-16 B of spills at "
        "32-96 registers on some specialisation of some target ((2, 3): 312-868 B at d = 128).",
    "_kl_bwd_kernel": "as _kl_fwd_kernel: fp32 64x64 spilled 20-34 KB (32 registers), 32x32 "
        "4-32 B; 16-bit products with both gradients take 32x32 tiles, 16x16 on heads wider than "
        "64 (qk_bwd_meta): at 64x64 255 registers and 8-40 B spilled on sm_80, 168 registers / 8 "
        "B on sm_100 with a mask; 8 warps still 255 registers / 8-24 B on sm_80; at 32x32 146-168 "
        "registers, 3 blocks/SM; on heads wider than 64, 32x32 (8 warps) spilled 16 B at 128 "
        "registers on sm_80 (16x16 there: 102-128), 16x16 spilled 16 B on sm_90 (32x32 kept on "
        "sm_90 and sm_100). The student-only backward keeps 64x64 (sm_90: 144-199 "
        "registers, 2-3 blocks/SM).",
    "_logits_loss_kernel": "soft_ce / kl_div: stream_launch's tiles (a row up to 4096 classes "
        "read once); with both gradients of fp32 logits twice the warps: 1x4096 with 8 warps got "
        "80 registers and spilled 8 B on sm_80 (16 warps: 64 registers, 2 blocks = 32 warps per "
        "SM instead of 3 = 24).",
}


# --- targets -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Arch:
    """Per-SM limits of a compute capability (CUDA programming guide, "Technical Specifications
    per Compute Capability"), for the occupancy estimate."""
    name: str
    capability: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256        # registers are allocated per warp in units of 256
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024
    smem_reserved_per_block: int = 1024   # the runtime's own shared memory per resident block

    def blocks_per_sm(self, regs: int | None, smem: int, warps: int) -> dict:
        by_warps = self.max_warps_per_sm // warps
        by_smem = (self.smem_per_sm // (smem + self.smem_reserved_per_block)
                   if smem else self.max_blocks_per_sm)
        if regs is None:
            by_regs = None
        else:
            per_warp = math.ceil(max(regs, 1) * 32 / self.reg_alloc_unit) * self.reg_alloc_unit
            by_regs = (self.regs_per_sm // per_warp) // warps
        limits = {"regs": by_regs, "smem": by_smem, "warps": by_warps,
                  "max": self.max_blocks_per_sm}
        known = {k: v for k, v in limits.items() if v is not None}
        blocks = min(known.values())
        return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
                "limited_by": min(known, key=lambda k: (known[k], k != "regs")),
                "smem_fits": smem <= self.smem_per_block}


ARCHS = {
    "sm_90": Arch("sm_90", 90),                                   # H100 / H200
    "sm_80": Arch("sm_80", 80, smem_per_sm=164 * 1024, smem_per_block=163 * 1024),  # A100
    "sm_100": Arch("sm_100", 100),                                # B200
}


class _OfflineDriver:
    """What JITFunction.run asks of the active driver before it compiles; no GPU behind it."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return META


# --- recording the launches ----------------------------------------------------------------------

@dataclasses.dataclass
class Spec:
    """One specialisation, as JITFunction._do_compile received it."""
    fn: JITFunction
    key: str
    signature: dict
    constexprs: dict
    options: object
    attrs: dict
    cases: list

    @property
    def name(self) -> str:
        return self.fn.fn.__name__

    def code_class(self) -> str:
        """Kernel, pointer dtypes, declared constexprs and options: specialisations of one class
        differ only in which integer arguments are 1 or multiples of 16 and in pointer
        alignment."""
        names = [p.name for p in self.fn.params]
        declared = {p.name for p in self.fn.params if p.is_constexpr}
        consts = sorted((names[p[0]], str(v)) for p, v in self.constexprs.items()
                        if names[p[0]] in declared)
        ptrs = sorted((k, v) for k, v in self.signature.items() if str(v).startswith("*"))
        return repr((self.fn.fn.__qualname__, ptrs, consts, self.options.num_warps,
                     self.options.num_stages))


@contextlib.contextmanager
def recording(target: GPUTarget, specs: dict, case: list):
    """Within: every kernel launch is recorded into `specs` (by kernel and specialisation key,
    `case[0]` naming the launcher call) instead of compiled and launched."""
    original = JITFunction._do_compile

    def record(self, key, signature, device, constexprs, options, attrs, warmup):
        uid = f"{self.fn.__module__}.{self.fn.__qualname__}:{key}"
        if uid in specs:
            specs[uid].cases.append(case[0])
        else:
            specs[uid] = Spec(self, str(key), dict(signature), dict(constexprs), options,
                              dict(attrs), [case[0]])
        return None  # run() returns before launching

    triton.runtime.driver.set_active(_OfflineDriver(target))
    JITFunction._do_compile = record
    try:
        yield
    finally:
        JITFunction._do_compile = original


# --- the launcher calls: shapes and dtypes of tests/ and benchmarks/ ------------------------------

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DT = {F32: "fp32", F16: "fp16", BF16: "bf16"}


def _t(*shape, dtype=F32):
    return torch.empty(shape, dtype=dtype, device=META)


def _hf_heads(n, B, H, L, d, dtype):
    """[n, B, H, L, d] laid out as Hugging Face attention hands Q and K over: a [n, B, L, H*d]
    projection viewed as heads (stride_l = H*d)."""
    return _t(n, B, L, H, d, dtype=dtype).transpose(2, 3)


def _mask(B, L, dtype=torch.bool):
    return _t(B, L, dtype=dtype)


# --headline: only the real and the benchmarks' shapes of each op (the first n of its list), with
# every dtype, mask and gradient specialisation of the full table
_HEADLINE = False


def _headline(shapes: list, n: int) -> list:
    return shapes[:n] if _HEADLINE else shapes


def calls_attention_mse(quick):
    # (B, H, L): the real shape and the benchmark's lengths first, then tests' SHAPES (bf16, fp32)
    real = [(32, 12, 128)]
    shapes = real if quick else real + [(32, 12, 64), (32, 12, 512), (3, 5, 37), (2, 1, 1),
                                        (1, 3, 130), (4, 2, 16)]
    shapes = _headline(shapes, 3)
    for B, H, L in shapes:
        dtypes = [(BF16, BF16)] if quick else (
            [(BF16, BF16), (F32, F32), (F16, F16), (BF16, F32)] if (B, H, L) in real
            else [(BF16, BF16), (F32, F32)])
        for (ds, dt), md in _product(dtypes, [torch.bool] if quick else [torch.bool, None]):
            s, t = _t(4, B, H, L, L, dtype=ds), _t(4, B, H, L, L, dtype=dt)
            m = None if md is None else _mask(B, L, md)
            for mq in ((False,) if m is None or quick else (False, True)):
                name = f"attention_mse B{B}H{H}L{L} {DT[ds]}/{DT[dt]} mask={_mname(md)} mq={mq}"
                # no gradient (evaluation), the student's (training), both (full table)
                needs = [(True, False)] if quick else [(False, False), (True, False), (True, True)]
                yield name, lambda s=s, t=t, m=m, mq=mq, needs=needs: [
                    attention_mse.attention_mse_forward([s], [t], m, 1.0, mq, *need)
                    for need in needs]


def calls_hidden_mse(quick):
    # (M = B*L, d_s, d_t, states): the real TinyBERT4 <- BERT-base shapes, then tests' SHAPES
    real = [(4 * 128, 312, 768, 5), (32 * 128, 312, 768, 5)]
    shapes = real[:1] if quick else real + [
        (3 * 37, 26, 50, 1), (2 * 19, 100, 130, 2), (1, 7, 3, 1), (2 * 5, 9, 1, 1),
        (2 * 16, 32, 48, 2)]
    shapes = _headline(shapes, 2)
    dtypes = [BF16] if quick else [BF16, F32, F16]
    precisions = ["highest"] if quick else ["highest", "high"]
    for (M, ks, kt, n), dt, prec, save, tm in _product(
            shapes, dtypes, precisions, [True] if quick else [True, False],
            [False] if quick else [False, True]):
        if prec == "high" and dt != F32:
            continue
        x, y = _t(n, M, ks, dtype=dt), _t(n, M, kt, dtype=dt)
        w, b = _t(kt, ks, dtype=dt), _t(kt, dtype=dt)
        m = _t(M, dtype=torch.bool) if tm else None
        name = f"hidden_mse M{M}K{ks}N{kt} {DT[dt]} fp32_matmul={prec} residual={save} tm={tm}"

        def call(x=x, y=y, w=w, b=b, save=save, m=m, prec=prec):
            old = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(prec)
            try:
                hidden_mse.hidden_mse_forward([x], [y], w, b, 1.0, save, m)
            finally:
                torch.set_float32_matmul_precision(old)
        yield name, call


def calls_hidden_cosine(quick):
    # (M = B*L, d_s, d_t, states): the real TinyBERT4 <- BERT-base shapes, then tests' SHAPES
    real = [(4 * 128, 312, 768, 5), (32 * 128, 312, 768, 5)]
    shapes = real[:1] if quick else real + [
        (3 * 37, 26, 50, 1), (2 * 19, 100, 130, 3), (1, 7, 3, 1), (2 * 5, 9, 2, 1),
        (4 * 19, 26, 50, 2)]
    shapes = _headline(shapes, 2)
    dtypes = [BF16] if quick else [BF16, F32, F16]
    precisions = ["highest"] if quick else ["highest", "high"]
    for (M, ks, kt, n), dt, prec, save, tm in _product(
            shapes, dtypes, precisions, [True] if quick else [True, False],
            [False] if quick else [False, True]):
        if prec == "high" and dt != F32:
            continue
        x, y = _t(n, M, ks, dtype=dt), _t(n, M, kt, dtype=dt)
        w, b = _t(kt, ks, dtype=dt), _t(kt, dtype=dt)
        m = _t(M, dtype=torch.bool) if tm else None
        name = f"hidden_cosine M{M}K{ks}N{kt} {DT[dt]} fp32_matmul={prec} coef={save} tm={tm}"

        def call(x=x, y=y, w=w, b=b, save=save, m=m, prec=prec, n=n, M=M):
            old = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(prec)
            try:
                hidden_cosine.hidden_cosine_forward([x], [y], w, b, 1.0, 1e-8, save, m)
                if save:  # the backward: (student/weight/bias, teacher) gradients needed
                    coef = _t(n * M, hidden_cosine.N_SUMS)
                    for need in [(True, False)] if quick else [(True, False), (True, True),
                                                              (False, True)]:
                        hidden_cosine.hidden_cosine_backward(_t(), [x], [y], w, b, coef, *need)
            finally:
                torch.set_float32_matmul_precision(old)
        yield name, call


def calls_soft_ce(quick):
    shapes = [(32 * 128, 2), (32 * 128, 30522)] if quick else [
        (32 * 128, 2), (32 * 128, 30522), (32, 3), (6, 1271), (37, 2), (5, 3), (4, 30522),
        (3, 5000)]
    shapes = _headline(shapes, 2)
    dtypes = [(BF16, BF16)] if quick else [(BF16, BF16), (F32, F32), (F16, F16), (BF16, F32)]
    for (N, C), (ds, dt) in _product(shapes, dtypes):
        s, t = _t(N, C, dtype=ds), _t(N, C, dtype=dt)
        needs = [(True, False)] if quick else [(False, False), (True, False), (True, True)]
        yield f"soft_ce N{N}C{C} {DT[ds]}/{DT[dt]}", lambda s=s, t=t, needs=needs: [
            soft_cross_entropy.soft_cross_entropy_forward(s, t, 1.0, 1.0, *need) for need in needs]


def calls_kl_div(quick):
    # the benchmark's shapes first, then tests' SHAPES; the teacher gradient in the full table
    shapes = [(32 * 128, 2), (32 * 128, 30522)] if quick else [
        (32 * 128, 2), (32 * 128, 30522), (32, 30522), (7, 3), (6, 1271), (37, 2), (4, 30522),
        (3, 5000)]
    shapes = _headline(shapes, 2)
    dtypes = [(BF16, BF16)] if quick else [(BF16, BF16), (F32, F32), (F16, F16), (F32, BF16)]
    for (N, C), (ds, dt) in _product(shapes, dtypes):
        s, t = _t(N, C, dtype=ds), _t(N, C, dtype=dt)
        needs = [(True, False)] if quick else [(False, False), (True, False), (True, True)]
        yield f"kl_div N{N}C{C} {DT[ds]}/{DT[dt]}", lambda s=s, t=t, needs=needs: [
            kl_divergence.kl_divergence_forward(s, t, 2.0, 1.0, *need) for need in needs]


# (B, H, L, d_s, d_t): TinyBERT4 <- BERT-base at L = 128 (the real shape), the benchmark's lengths
# (B*L = 8192), tests' SHAPES, and wider heads (d = 64 / 128, the widest the kernels take).
QK_REAL = (32, 12, 128, 26, 64)
QK_SHAPES = [QK_REAL, (16, 12, 512, 26, 64), (4, 12, 2048, 26, 64), (1, 12, 8192, 26, 64),
             (3, 5, 37, 26, 64), (2, 1, 1, 26, 64), (1, 3, 130, 26, 64), (2, 2, 16, 8, 8),
             (1, 2, 33, 64, 26), (2, 12, 128, 64, 64), (2, 12, 128, 64, 128),
             (2, 12, 128, 128, 128)]
QK_DTYPES = [(BF16, BF16), (F32, F32), (F16, F16), (BF16, F32), (F32, F16), (F16, F32),
             (BF16, F16)]
NEED_STUDENT, NEED_ALL = (True, True, False, False), (True, True, True, True)


def _qk_calls(quick, shapes):
    """(shape, dtypes, mask dtype, HF layout, needs): every dtype pair, mask and gradient set at
    the real shape; bf16 and fp32 with a bool mask at the others (as the tests run them)."""
    if quick:
        yield QK_REAL, (BF16, BF16), torch.bool, True, [NEED_STUDENT]
        return
    for shape in shapes:
        if shape == QK_REAL:
            for dts, md, hf in _product(QK_DTYPES, [torch.bool, None], [True, False]):
                yield shape, dts, md, hf, [NEED_STUDENT, NEED_ALL]
        else:
            for dts in [(BF16, BF16), (F32, F32)]:
                yield shape, dts, torch.bool, False, [NEED_STUDENT, NEED_ALL]


def _qk_inputs(B, H, L, d_s, d_t, ds, dt, hf):
    make = _hf_heads if hf else (lambda n, B, H, L, d, dtype: _t(n, B, H, L, d, dtype=dtype))
    return [[make(4, B, H, L, d, dtype)]
            for d, dtype in ((d_s, ds), (d_s, ds), (d_t, dt), (d_t, dt))]


def _qk_name(op, shape, ds, dt, md, hf):
    B, H, L, d_s, d_t = shape
    return f"{op} B{B}H{H}L{L}d{d_s}-{d_t} {DT[ds]}/{DT[dt]} mask={_mname(md)} hf={hf}"


def calls_attention_qk(quick):
    shapes = _headline(QK_SHAPES + [(1, 1, 600, 26, 64)], 4)  # tests: L = 600 splits the Gram
    for shape, (ds, dt), md, hf, needs in _qk_calls(quick, shapes):
        B, H, L, d_s, d_t = shape
        x = _qk_inputs(*shape, ds, dt, hf)
        m = None if md is None else _mask(B, L, md)

        def tiled(x=x, m=m, needs=needs):
            attention_mse_qk.tiled_forward(*x, m, 1.0)
            for need in needs:
                attention_mse_qk.tiled_backward(_t(), *x, m, 1.0, need)

        def gram(x=x, m=m, needs=needs, N=4 * B * H, D=d_s + d_t):
            attention_mse_qk.gram_forward(*x, m, 1.0)
            for need in needs:
                attention_mse_qk.gram_backward(_t(), _t(2, N, D, D), *x, m, 1.0, need)
        yield _qk_name("attention_qk[tiled]", shape, ds, dt, md, hf), tiled
        yield _qk_name("attention_qk[gram]", shape, ds, dt, md, hf), gram
    if quick:  # "auto" takes the Gram path from L = 512: its real shape
        shape = (16, 12, 512, 26, 64)
        x, m = _qk_inputs(*shape, BF16, BF16, True), _mask(16, 512)
        yield _qk_name("attention_qk[gram]", shape, BF16, BF16, torch.bool, True), lambda: (
            attention_mse_qk.gram_forward(*x, m, 1.0),
            attention_mse_qk.gram_backward(_t(), _t(2, 4 * 16 * 12, 90, 90), *x, m, 1.0,
                                       NEED_STUDENT))


def calls_attention_kl(quick):
    for shape, (ds, dt), md, hf, needs in _qk_calls(quick, _headline(QK_SHAPES, 4)):
        B, H, L, d_s, d_t = shape
        x = _qk_inputs(*shape, ds, dt, hf)
        m = None if md is None else _mask(B, L, md)

        def call(x=x, m=m, needs=needs, N=4 * B * H, L=L):
            attention_kl_qk.attention_kl_forward(*x, m)
            for need in needs:
                attention_kl_qk.attention_kl_backward(_t(), _t(3, N, L), *x, m, need)
        yield _qk_name("attention_kl", shape, ds, dt, md, hf), call


def calls_attention_kl_scores(quick):
    # (B, H, L): the real shape and the benchmark's lengths first, then tests' SHAPES (bf16, fp32)
    real = [(32, 12, 128)]
    shapes = real if quick else real + [(32, 12, 64), (32, 12, 512), (3, 5, 37), (2, 1, 1),
                                        (1, 3, 130), (4, 2, 16)]
    shapes = _headline(shapes, 3)
    for B, H, L in shapes:
        dtypes = [(BF16, BF16)] if quick else (
            [(BF16, BF16), (F32, F32), (F16, F16), (F32, BF16)] if (B, H, L) in real
            else [(BF16, BF16), (F32, F32)])
        for (ds, dt), md in _product(dtypes, [torch.bool] if quick else [torch.bool, None]):
            s, t = _t(4, B, H, L, L, dtype=ds), _t(4, B, H, L, L, dtype=dt)
            m = None if md is None else _mask(B, L, md)
            name = f"attention_kl_scores B{B}H{H}L{L} {DT[ds]}/{DT[dt]} mask={_mname(md)}"
            # no gradient (evaluation), the student's (training), both (teacher gradients too)
            needs = [(True, False)] if quick else [(False, False), (True, False), (True, True)]
            yield name, lambda s=s, t=t, m=m, needs=needs: [
                attention_kl.attention_kl_scores_forward([s], [t], m, _t(), *need)
                for need in needs]


def calls_scale_in_place(quick):
    # the backward of the four losses that write their gradient in the forward: one in-place scale
    # of each gradient tensor ([4, 32, 12, 128, 128] scores, [4096, 30522] logits)
    dtypes = [BF16] if quick else [BF16, F32, F16]
    for shape, dtype in _product([(4, 32, 12, 128, 128), (32 * 128, 30522)], dtypes):
        yield f"scale_in_place {'x'.join(map(str, shape))} {DT[dtype]}", \
            lambda x=_t(*shape, dtype=dtype): _utils.scale_in_place([x], _t())


CALLS = (calls_attention_mse, calls_hidden_mse, calls_soft_ce, calls_attention_qk,
         calls_attention_kl, calls_kl_div, calls_attention_kl_scores, calls_hidden_cosine,
         calls_scale_in_place)


def _product(*lists):
    import itertools
    return itertools.product(*lists)


def _mname(dtype):
    return "none" if dtype is None else str(dtype).removeprefix("torch.")


def collect(target: GPUTarget, quick: bool, only: str | None) -> tuple[dict, list]:
    """(specialisations by id, launcher failures) of every launcher call."""
    specs, failures, case = {}, [], [""]
    with recording(target, specs, case):
        for calls in CALLS:
            for name, call in calls(quick):
                if only and not re.search(only, name):
                    continue
                case[0] = name
                try:
                    call()
                except Exception as e:  # a launcher that fails on a GPU too: reported, exit 1
                    failures.append({"case": name, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc(limit=4)})
    return specs, failures


# --- compiling one specialisation ---------------------------------------------------------------

_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}
# PTX: tensor-core and asynchronous-copy instructions, global loads by vector width
_PTX_COUNTS = {
    "wgmma": re.compile(r"^\s*wgmma\.mma_async", re.M),
    "mma_sync": re.compile(r"^\s*mma\.sync", re.M),
    "tcgen05_mma": re.compile(r"^\s*tcgen05\.mma", re.M),
    "cp_async": re.compile(r"^\s*(?:@%p\d+\s+)?cp\.async\.(?:ca|cg)", re.M),
    "cp_async_bulk": re.compile(r"^\s*(?:@%p\d+\s+)?cp\.async\.bulk", re.M),
}
_PTX_LOAD = re.compile(r"ld\.global((?:\.[a-zA-Z0-9_:]+)*)\s")
# SASS opcodes: tensor-core matrix products (HMMA sm_80+, HGMMA sm_90, UTC*MMA sm_100), LDGSTS
# (cp.async), UTMALDG (TMA)
_SASS_COUNTS = {
    "mma": re.compile(r"\b(?:HMMA|HGMMA|UTC[A-Z]*MMA|IMMA|DMMA)\b"),
    "ldgsts": re.compile(r"\bLDGSTS\b"),
    "tma": re.compile(r"\bUTMALDG\b"),
}


def _ptx_loads(ptx: str) -> dict:
    widths = {"v1": 0, "v2": 0, "v4": 0, "v8": 0}
    for m in _PTX_LOAD.finditer(ptx):
        mods = m.group(1)
        v = re.search(r"\.v(\d)", mods)
        widths[f"v{v.group(1)}" if v else "v1"] += 1
    return widths


def _tool(name: str) -> str | None:
    triton_bin = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    for p in (triton_bin, Path("/usr/local/cuda/bin") / name):
        if p.exists():
            return str(p)
    return shutil.which(name)


def _sass(cubin: bytes, tmp: Path) -> tuple[dict | None, dict | None]:
    """(SASS opcode counts, cuobjdump resource usage) of a cubin, or (None, None) without
    cuobjdump."""
    exe = _tool("cuobjdump")
    if exe is None:
        return None, None
    path = tmp / "k.cubin"
    path.write_bytes(cubin)
    sass = subprocess.run([exe, "-sass", str(path)], capture_output=True, text=True).stdout
    res = subprocess.run([exe, "-res-usage", str(path)], capture_output=True, text=True).stdout
    usage = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    return {k: len(r.findall(sass)) for k, r in _SASS_COUNTS.items()}, usage


def _knob_ptxas_log(on: bool):
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.nvidia, "dump_ptxas_log"):
        knobs.nvidia.dump_ptxas_log = on
    else:  # before triton.knobs: the environment variable
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1" if on else "0"


_SPECS: list[Spec] = []
_TARGET: GPUTarget | None = None


def _param_names(fn: JITFunction) -> list[str]:
    return [p.name for p in fn.params]


def compile_one(index: int) -> dict:
    """Compile _SPECS[index] for _TARGET; the table row (or the error)."""
    spec = _SPECS[index]
    fn, names = spec.fn, _param_names(spec.fn)
    declared = {p.name for p in fn.params if p.is_constexpr}
    constexprs = {}
    for path, value in spec.constexprs.items():
        name = names[path[0]] + "".join(f"[{i}]" for i in path[1:])
        constexprs[name] = value if isinstance(value, (bool, int, float, str, type(None))) \
            else str(value)
    row = {
        "kernel": spec.name,
        "dtypes": {n: t for n, t in spec.signature.items() if isinstance(t, str) and
                   t.startswith("*")},
        "constexprs": {k: v for k, v in constexprs.items() if k.split("[")[0] in declared},
        "equal_to_1": sorted(k for k in constexprs if k.split("[")[0] not in declared),
        "divisible_by_16": sorted(names[p[0]] + "".join(f"[{i}]" for i in p[1:])
                                  for p in spec.attrs),
        "num_warps": spec.options.num_warps,
        "num_stages": spec.options.num_stages,
        "cases": spec.cases[:3] + ([f"... {len(spec.cases) - 3} more"] if len(spec.cases) > 3
                                  else []),
    }
    from triton.compiler import ASTSource, compile as triton_compile
    log = io.StringIO()
    _knob_ptxas_log(True)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton_compile(ASTSource(fn, spec.signature, spec.constexprs, spec.attrs),
                                    target=_TARGET, options=spec.options.__dict__)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
        row["compile_s"] = round(time.perf_counter() - start, 2)
        return row
    row["compile_s"] = round(time.perf_counter() - start, 2)
    text = log.getvalue()
    ptxas = {k: int(m.group(1)) for k, r in _PTXAS.items() if (m := r.search(text))}
    row["cache_hit"] = "registers" not in ptxas  # no ptxas run: the cubin came from the cache
    md = kernel.metadata
    row["shared_bytes"] = md.shared
    ptx = kernel.asm.get("ptx", "")
    with tempfile.TemporaryDirectory() as tmp:
        sass, usage = _sass(kernel.asm["cubin"], Path(tmp))
    # registers: ptxas's log of this compile; from a cache hit, the cubin's resource usage
    row["registers"] = ptxas.get("registers", (usage or {}).get("reg"))
    row["spill_stores"] = ptxas.get("spill_stores")
    row["spill_loads"] = ptxas.get("spill_loads")
    row["stack_frame"] = ptxas.get("stack_frame", (usage or {}).get("stack"))
    row.update(ARCHS[f"sm_{_TARGET.arch}"].blocks_per_sm(row["registers"], md.shared,
                                                         md.num_warps))
    row["ptx"] = {k: len(r.findall(ptx)) for k, r in _PTX_COUNTS.items()}
    row["ptx_global_loads"] = _ptx_loads(ptx)
    row["sass"] = sass
    return row


# --- the command ---------------------------------------------------------------------------------

def _ptxas_version(arch: int) -> str:
    exe = _tool("ptxas-blackwell" if arch >= 100 else "ptxas")
    if exe is None:
        return "?"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else "?"


def _short(row: dict) -> str:
    c = row["constexprs"]
    blocks = "x".join(str(v) for k, v in c.items() if k.startswith("BLOCK"))
    flags = ",".join(f"{k}={int(v)}" for k, v in c.items()
                     if isinstance(v, bool) or (k.isupper() and not k.startswith("BLOCK")
                                                and isinstance(v, int)))
    dts = "/".join(sorted({t[1:] for t in row["dtypes"].values()}))
    return f"{row['kernel']}[{dts}|{blocks}|{flags}]"


def _summary_line(row: dict) -> str:
    if "error" in row:
        return f"  FAILED {_short(row)}: {row['error'][:300]}"
    mma = sum(row["ptx"][k] for k in ("wgmma", "mma_sync", "tcgen05_mma"))
    cp = row["ptx"]["cp_async"] + row["ptx"]["cp_async_bulk"]
    spill = row["spill_stores"] if row["spill_stores"] is not None else "?"
    return (f"  {_short(row):<88} w{row['num_warps']} s{row['num_stages']} "
            f"regs {row['registers']!s:>3} spill {spill!s:>6} smem {row['shared_bytes']:>6} "
            f"blk/SM {row['blocks_per_sm']:>2} ({row['limited_by']}) mma {mma:>4} "
            f"cp.async {cp:>3} {row['compile_s']:>6.1f}s")


def run_target(arch: Arch, args) -> tuple[dict, int]:
    global _SPECS, _TARGET
    _TARGET = GPUTarget("cuda", arch.capability, 32)
    t0 = time.perf_counter()
    specs, failures = collect(_TARGET, args.quick, args.only)
    classes: dict[str, list[Spec]] = {}
    for spec in specs.values():
        classes.setdefault(spec.code_class(), []).append(spec)
    if args.every or args.cache_dir:  # a cache for the GPU needs every specialisation
        _SPECS = list(specs.values())
    else:  # one per class: the first launch's (the real shapes come first)
        _SPECS = [members[0] for members in classes.values()]
    variants = {id(s): len(classes[s.code_class()]) for s in specs.values()}
    print(f"{arch.name}: {len(specs)} specialisations from the launcher calls in {len(classes)} "
          f"classes, compiling {len(_SPECS)} ({len(failures)} launcher failures)", flush=True)
    # longest first (from names: the Gram backward at d = 128 and the fp32 tiled kernels)
    order = sorted(range(len(_SPECS)), key=lambda i: -_SPECS[i].options.num_warps)
    rows = [None] * len(_SPECS)
    if args.jobs > 1:
        import multiprocessing
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as ex:
            for i, row in zip(order, ex.map(compile_one, order)):
                rows[i] = row
                print(_summary_line(row), flush=True)
    else:
        for i in order:
            rows[i] = compile_one(i)
            print(_summary_line(rows[i]), flush=True)
    for spec, row in zip(_SPECS, rows):
        row["class_size"] = variants[id(spec)]
    errors = [r for r in rows if "error" in r]
    too_big = [r for r in rows if "error" not in r and not r["smem_fits"]]
    ok = [r for r in rows if "error" not in r]
    summary = {
        "specialisations": len(specs), "classes": len(classes), "compiled": len(rows),
        "compile_errors": len(errors),
        "launcher_failures": len(failures), "smem_over_limit": len(too_big),
        "with_spills": sum(1 for r in ok if (r["spill_stores"] or 0) > 0),
        "compile_over_max_s": sum(1 for r in ok if r["compile_s"] > MAX_COMPILE_S),
        "max_registers": max((r["registers"] or 0 for r in ok), default=0),
        "max_compile_s": max((r["compile_s"] for r in ok), default=0.0),
        "total_compile_s": round(sum(r["compile_s"] for r in rows), 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "cache_hits": sum(1 for r in ok if r.get("cache_hit")),
    }
    result = {
        "target": arch.name, "quick": args.quick, "headline": args.headline, "only": args.only,
        "command": "python -m benchmarks.static " + " ".join(sys.argv[1:]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": triton.__version__, "ptxas": _ptxas_version(arch.capability)},
        "limits": dataclasses.asdict(arch),
        "occupancy_model": "blocks/SM = min(regs: floor(floor(regs_per_sm / (ceil(regs*32/256)*256))"
                           " / warps), smem: floor(smem_per_sm / (shared + 1 KiB)), warps: "
                           "floor(64 / warps), 32)",
        "summary": summary, "launcher_failures": failures, "config_notes": CONFIG_NOTES,
        "kernels": sorted(rows, key=lambda r: (r["kernel"], json.dumps(r["dtypes"]),
                                               json.dumps(r["constexprs"]))),
    }
    spills = [r for r in ok if (r["spill_stores"] or 0) > 0]
    slow = [r for r in ok if r["compile_s"] > MAX_COMPILE_S]
    bad = len(errors) + len(failures) + len(too_big) + len(spills) + len(slow)
    for r in spills:
        print(f"  SPILLS on {arch.name}: {_short(r)} w{r['num_warps']}: {r['spill_stores']} B "
              f"stored, {r['registers']} registers", flush=True)
    for r in slow:
        print(f"  SLOW COMPILE on {arch.name}: {_short(r)}: {r['compile_s']} s > {MAX_COMPILE_S}",
              flush=True)
    for r in too_big:
        print(f"  TOO MUCH SHARED MEMORY for {arch.name}: {_short(r)} needs {r['shared_bytes']} B "
              f"> {arch.smem_per_block}", flush=True)
    for f in failures:
        print(f"  LAUNCHER FAILED: {f['case']}: {f['error']}", flush=True)
    print(f"{arch.name}: {json.dumps(summary)}", flush=True)
    return result, bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__.split("\n")[0])
    p.add_argument("--target", default="sm_90,sm_80,sm_100",
                   help="comma-separated targets from " + ", ".join(ARCHS))
    p.add_argument("--quick", action="store_true",
                   help="only the TinyBERT4 shapes in bf16 (CI)")
    p.add_argument("--headline", action="store_true",
                   help="every specialisation (dtypes, masks, gradients) at the real and the "
                        "benchmarks' shapes only, not the tests' odd ones")
    p.add_argument("--only", default=None, help="regex on the launcher-call names")
    p.add_argument("--out", default=str(RESULTS),
                   help="folder for <target>.json (default benchmarks/results/static; '' = none)")
    p.add_argument("--cache-dir", default=None,
                   help="Triton cache to fill (TRITON_CACHE_DIR for the GPU machine); default: a "
                        "temporary one, so that every kernel is compiled and measured")
    p.add_argument("--every", action="store_true",
                   help="compile every specialisation, not one per class (always with --cache-dir)")
    p.add_argument("--jobs", type=int, default=1, help="parallel compiles (processes)")
    args = p.parse_args(argv)
    global _HEADLINE
    _HEADLINE = args.headline
    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    for t in targets:
        if t not in ARCHS:
            p.error(f"--target: unknown target {t!r}; expected one of {', '.join(ARCHS)}")
    tmp_cache = None
    if args.cache_dir:
        cache = Path(args.cache_dir).resolve()
        cache.mkdir(parents=True, exist_ok=True)
    else:
        cache = tmp_cache = Path(tempfile.mkdtemp(prefix="tbf-static-cache-"))
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "cache"):
        knobs.cache.dir = str(cache)
    status = 0
    try:
        for t in targets:
            result, bad = run_target(ARCHS[t], args)
            status |= bad > 0
            if args.out:
                out = Path(args.out)
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{t}.json").write_text(json.dumps(result, indent=1) + "\n")
                print(f"wrote {out / f'{t}.json'}", flush=True)
    finally:
        if tmp_cache is not None:
            shutil.rmtree(tmp_cache, ignore_errors=True)
    if args.cache_dir:
        size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        print(f"Triton cache {cache}: {size / 2**20:.1f} MiB "
              f"({sum(1 for _ in cache.iterdir())} entries)")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
