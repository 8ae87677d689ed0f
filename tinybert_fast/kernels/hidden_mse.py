"""Triton kernel for TinyBERT's projected hidden-state MSE: a GEMM with the loss in its epilogue.

Shapes: a group holds n stacked states, student X [n, M, K] (K = d_s), teacher Y [n, M, N]
(N = d_t), one projection W [N, K] (nn.Linear layout) and bias b [N] shared by all states:

    R    = m * (X W^T + b - Y)                            (fp32 in registers, never in memory
                                                           unless needed for backward)
    loss = scale * sum R^2                               (scale = 1/(M*N) per state for "mean")

with m the optional token mask (1 everywhere by default; 0 excludes a padded token).

Each program computes one [BLOCK_M, BLOCK_N] tile of X W^T with fp32 accumulation, adds the bias,
subtracts the teacher tile and reduces the squared error to one partial.  When a gradient is needed
it also writes R (in the student's dtype) and the tile's column sums of R (fp32), which are all the
backward needs: dX = s R W, dW = s R^T X, db = s * colsum(R), dY = -s R with s = 2 * scale * g.
The backward is three cuBLAS products over the saved R (see tinybert_fast/ops/hidden_mse.py).

Launches: forward = one kernel per group + one sum over the per-program partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (NARROW_BLOCK_M, as_loadable_mask, device_arch, dot_in_fp32, dot_precision,
                     k_div)


@triton.jit
def _hidden_mse_fwd_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, y_ptr, tm_ptr, res_ptr, partial_ptr, colsum_ptr,
    # sizes: rows = n * M (all states of the group), N = d_t, K = d_s
    n_rows, M, N, K,
    # strides
    x_stride_s, x_stride_m, x_stride_k,
    w_stride_n, w_stride_k, b_stride,
    y_stride_s, y_stride_m, y_stride_n, tm_stride,
    # scalars
    scale,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_TOKEN_MASK: tl.constexpr, SAVE_RESIDUAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_DIV: tl.constexpr,
):
    # K and the row strides of X and W are multiples of K_DIV (the launcher checks): written so,
    # Triton knows it and keeps 16-byte loads and cp.async at K = 312 (its own specialisation
    # only marks multiples of 16).
    if K_DIV > 1:
        K = K // K_DIV * K_DIV
        x_stride_s = x_stride_s // K_DIV * K_DIV
        x_stride_m = x_stride_m // K_DIV * K_DIV
        w_stride_n = w_stride_n // K_DIV * K_DIV
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    # Consecutive programs share an X tile (all N tiles of one row block): X is read from L2.
    pid_m = pid // num_n
    pid_n = pid % num_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < N
    state = (rows // M).to(tl.int64)
    tok = (rows % M).to(tl.int64)
    x_row = x_ptr + state * x_stride_s + tok * x_stride_m
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        x = tl.load(x_row[:, None] + (k0 + ks)[None, :] * x_stride_k,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * w_stride_n + (k0 + ks)[:, None] * w_stride_k,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols * b_stride, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    in_bounds = row_ok[:, None] & col_ok[None, :]
    if HAS_TOKEN_MASK:  # padded tokens (mask 0) contribute nothing: their residual rows are 0
        row_ok = row_ok & (tl.load(tm_ptr + tok * tm_stride, mask=row_ok, other=0) != 0)
    ok = row_ok[:, None] & col_ok[None, :]
    y = tl.load(y_ptr + (state * y_stride_s + tok * y_stride_m)[:, None] + cols[None, :] * y_stride_n,
                mask=ok, other=0.0).to(tl.float32)
    r = tl.where(ok, acc - y, 0.0)
    tl.store(partial_ptr + pid, tl.sum(r * r) * scale)
    if SAVE_RESIDUAL:
        tl.store(res_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
                 r.to(res_ptr.dtype.element_ty), mask=in_bounds)
        tl.store(colsum_ptr + pid_m.to(tl.int64) * N + cols, tl.sum(r, axis=0), mask=col_ok)


def gemm_config(n_rows: int, N: int, K: int, dtype: torch.dtype) -> dict:
    """Tile sizes for the fused projection: 16-bit operands feed the tensor cores in 128x64 tiles;
    full fp32 ("ieee") products run on the FMA units and take smaller tiles.  128x128 spilled
    (ptxas, sm_90: 255 registers + 64-248 bytes) once the pipelined loads (K_DIV) and the epilogue
    (teacher tile, residual, column sums) share the registers; at 128x64: 78-189, no spill.  The
    operation is memory-bound (K = 312 products per output), so the narrower tile costs only a
    second L2 read of the X rows."""
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)


def hidden_mse_forward(student: list[torch.Tensor], teacher: list[torch.Tensor],
                       weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
                       save_residual: bool, token_mask: torch.Tensor | None = None):
    """Fused projection + MSE over groups of states.

    student: groups [n_g, M, d_s]; teacher: groups [n_g, M, d_t]; weight [d_t, d_s] in the
    student's dtype; bias [d_t] or None; token_mask [M] (0 = padded token, excluded) or None.
    Returns (loss fp32 scalar, residual [sum n_g * M, d_t] in the student's dtype,
    colsum partials fp32 [row blocks, d_t]); the last two are empty unless save_residual.
    """
    M = student[0].shape[1]
    N, K = weight.shape
    device = student[0].device
    residual_dtype = student[0].dtype
    dot_fp32 = dot_in_fp32(residual_dtype, weight.dtype, device)
    rows_per_group = [s.shape[0] * M for s in student]
    cfg = gemm_config(sum(rows_per_group), N, K, torch.float32 if dot_fp32 else residual_dtype)
    if min(k_div(K, x, weight) for x in student) == 1:
        cfg = dict(cfg, BLOCK_M=min(cfg["BLOCK_M"], NARROW_BLOCK_M))
        if dot_fp32 and (device_arch(device) or 0) >= 100:
            # sm_100, FMA products: 3 stages spilled 28 bytes at 255 registers (2 stages spilled
            # 12 bytes on sm_90, where 3 do not)
            cfg = dict(cfg, num_stages=2)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    m_blocks = [triton.cdiv(r, bm) for r in rows_per_group]
    num_n = triton.cdiv(N, bn)
    partials = torch.empty(sum(m_blocks) * num_n, dtype=torch.float32, device=device)
    if save_residual:
        residual = torch.empty((sum(rows_per_group), N), dtype=residual_dtype, device=device)
        colsum = torch.empty((sum(m_blocks), N), dtype=torch.float32, device=device)
    else:
        residual = torch.empty((0, N), dtype=residual_dtype, device=device)
        colsum = torch.empty((0, N), dtype=torch.float32, device=device)
    tm = None if token_mask is None else as_loadable_mask(token_mask)
    precision = dot_precision(torch.float32 if dot_fp32 else residual_dtype)
    row0 = mblk0 = 0
    for x, y, rows, mb in zip(student, teacher, rows_per_group, m_blocks):
        _hidden_mse_fwd_kernel[(mb * num_n,)](
            x, weight, bias if bias is not None else weight, y,
            tm if tm is not None else partials,
            residual[row0:] if save_residual else partials,  # placeholder: never written
            partials[mblk0 * num_n:],
            colsum[mblk0:] if save_residual else partials,
            rows, M, N, K,
            *x.stride(), *weight.stride(), 0 if bias is None else bias.stride(0), *y.stride(),
            0 if tm is None else tm.stride(0),
            scale,
            HAS_BIAS=bias is not None, HAS_TOKEN_MASK=tm is not None,
            SAVE_RESIDUAL=save_residual, DOT_FP32=dot_fp32,
            INPUT_PRECISION=precision, K_DIV=k_div(K, x, weight),
            **cfg,
        )
        row0 += rows
        mblk0 += mb
    return partials.sum(), residual, colsum
