"""Triton kernels for the projected hidden-state cosine loss: a GEMM whose epilogue keeps three
row sums per token, and a backward GEMM that recomputes the projection.

Shapes: a group holds n stacked states, student X [n, M, K] (K = d_s), teacher Y [n, M, N]
(N = d_t), one projection W [N, K] (nn.Linear layout) and bias b [N] shared by all states.  Per
token (row) of P = X W^T + b (fp32 in registers, never in memory):

    py = <p, y>,  pp = |p|^2,  yy = |y|^2                       (fp32, summed over all N)
    np = max(sqrt(pp), eps),  ny = max(sqrt(yy), eps),  cos = py / (np * ny)
    loss = scale * sum_rows m * (1 - cos)

with m the optional token mask (1 everywhere by default; 0 excludes a padded token) and scale the
reduction's (1/M or 1/#kept tokens per state for "mean", 1 for "sum").

Forward, two kernels: `_hidden_cosine_sums_kernel` computes one [BLOCK_M, BLOCK_N] tile of P with
fp32 accumulation and writes the tile's partial (py, pp, yy) of each row to an fp32 buffer
[N tiles, rows, 3] (a 2-D grid keeps every SM busy: the real 5 x 512 rows are only 20 row blocks);
`_hidden_cosine_finish_kernel` adds the partials of each row over the N tiles, forms the loss
partials and, when a gradient is needed, the per-token coefficients (fp32 [rows, 3])

    alpha = m / (np ny),  beta_p = m [|p| > eps] cos / np^2,  beta_y = m [|y| > eps] cos / ny^2

which is all the backward keeps besides its inputs.  d(1 - cos)/dp = -(alpha y - beta_p p) and
d(1 - cos)/dy = -(alpha p - beta_y y) (the clamped norms are constants below eps).

Backward: `_hidden_cosine_bwd_kernel` recomputes the tiles of P (the same GEMM) and writes
G = alpha y - beta_p p (student dtype, unscaled so that 16-bit values stay normal), its column sums
per row block (fp32) and dY = -s (alpha p - beta_y y) (teacher dtype, s = scale * grad read from
a device scalar: no host synchronisation).  Then dX = -s G W, dW = -s G^T X, db = -s colsum(G)
are cuBLAS products (tinybert_fast/ops/hidden_cosine.py).

Launches: forward = one sums kernel per group + one finish kernel for all groups + one sum over
the loss partials; backward = one kernel per group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (NARROW_BLOCK_M, as_loadable_mask, dot_in_fp32, dot_precision, k_div,
                     next_power_of_2)

# Row sums kept per token: <p, y>, |p|^2, |y|^2 (the sums buffer), and the per-token coefficients
# alpha, beta_p, beta_y (the saved coefficients).
N_SUMS = 3
# Rows per program of the finish kernel (a streaming pass over [N tiles, rows, 3] fp32).
FINISH_ROWS = 1024


@triton.jit
def _projection_tile(x_ptr, w_ptr, b_ptr, state, tok, rows_ok, cols, col_ok, K,
                     x_stride_s, x_stride_m, x_stride_k, w_stride_n, w_stride_k, b_stride,
                     HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     K_DIV: tl.constexpr):
    """[BLOCK_M, BLOCK_N] tile of X W^T + b in fp32 (0 outside rows_ok x col_ok).  K and the row
    strides of X and W are multiples of K_DIV (the launcher checks, k_div): written so, Triton
    knows it and keeps 16-byte loads and cp.async at K = 312 (its own specialisation only marks
    multiples of 16)."""
    if K_DIV > 1:
        K = K // K_DIV * K_DIV
        x_stride_s = x_stride_s // K_DIV * K_DIV
        x_stride_m = x_stride_m // K_DIV * K_DIV
        w_stride_n = w_stride_n // K_DIV * K_DIV
    x_row = x_ptr + state * x_stride_s + tok * x_stride_m
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        x = tl.load(x_row[:, None] + (k0 + ks)[None, :] * x_stride_k,
                    mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * w_stride_n + (k0 + ks)[:, None] * w_stride_k,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols * b_stride, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(rows_ok[:, None] & col_ok[None, :], acc, 0.0)


@triton.jit
def _hidden_cosine_sums_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, y_ptr, sums_ptr,
    # sizes: rows = n * M (all states of the group), N = d_t, K = d_s
    n_rows, M, N, K,
    # strides
    x_stride_s, x_stride_m, x_stride_k,
    w_stride_n, w_stride_k, b_stride,
    y_stride_s, y_stride_m, y_stride_n,
    sums_stride_tile,
    # meta-parameters
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_DIV: tl.constexpr,
):
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
    p = _projection_tile(x_ptr, w_ptr, b_ptr, state, tok, row_ok, cols, col_ok, K,
                         x_stride_s, x_stride_m, x_stride_k, w_stride_n, w_stride_k, b_stride,
                         HAS_BIAS, DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                         K_DIV)
    y = tl.load(y_ptr + (state * y_stride_s + tok * y_stride_m)[:, None] + cols[None, :] * y_stride_n,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    out = sums_ptr + pid_n.to(tl.int64) * sums_stride_tile + rows.to(tl.int64) * 3
    tl.store(out, tl.sum(p * y, axis=1), mask=row_ok)
    tl.store(out + 1, tl.sum(p * p, axis=1), mask=row_ok)
    tl.store(out + 2, tl.sum(y * y, axis=1), mask=row_ok)


@triton.jit
def _hidden_cosine_finish_kernel(
    # pointers
    sums_ptr, tm_ptr, coef_ptr, partial_ptr,
    # sizes: rows over all groups (token = row % M), N tiles of the sums buffer
    n_rows, M, num_tiles,
    # strides
    sums_stride_tile, tm_stride,
    # scalars
    eps, scale,
    # meta-parameters
    HAS_TOKEN_MASK: tl.constexpr, SAVE_COEF: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    r3 = rows.to(tl.int64) * 3
    py = tl.zeros((BLOCK_R,), dtype=tl.float32)
    pp = tl.zeros((BLOCK_R,), dtype=tl.float32)
    yy = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for j in range(0, num_tiles):
        base = sums_ptr + j * sums_stride_tile + r3
        py += tl.load(base, mask=row_ok, other=0.0)
        pp += tl.load(base + 1, mask=row_ok, other=0.0)
        yy += tl.load(base + 2, mask=row_ok, other=0.0)
    keep = row_ok
    if HAS_TOKEN_MASK:  # padded tokens (mask 0) contribute nothing: loss and coefficients 0
        tok = (rows % M).to(tl.int64)
        keep = keep & (tl.load(tm_ptr + tok * tm_stride, mask=row_ok, other=0) != 0)
    norm_p = tl.sqrt(pp)
    norm_y = tl.sqrt(yy)
    np_ = tl.maximum(norm_p, eps)
    ny_ = tl.maximum(norm_y, eps)
    alpha = 1.0 / (np_ * ny_)
    cos = py * alpha
    tl.store(partial_ptr + pid, tl.sum(tl.where(keep, 1.0 - cos, 0.0)) * scale)
    if SAVE_COEF:
        # below eps the clamped norm is a constant: no gradient through it
        beta_p = tl.where(norm_p > eps, cos / (np_ * np_), 0.0)
        beta_y = tl.where(norm_y > eps, cos / (ny_ * ny_), 0.0)
        tl.store(coef_ptr + r3, tl.where(keep, alpha, 0.0), mask=row_ok)
        tl.store(coef_ptr + r3 + 1, tl.where(keep, beta_p, 0.0), mask=row_ok)
        tl.store(coef_ptr + r3 + 2, tl.where(keep, beta_y, 0.0), mask=row_ok)


@triton.jit
def _hidden_cosine_bwd_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, y_ptr, coef_ptr, s_ptr, g_ptr, colsum_ptr, dy_ptr,
    # sizes: rows = n * M (all states of the group), N = d_t, K = d_s
    n_rows, M, N, K,
    # strides
    x_stride_s, x_stride_m, x_stride_k,
    w_stride_n, w_stride_k, b_stride,
    y_stride_s, y_stride_m, y_stride_n,
    # meta-parameters
    HAS_BIAS: tl.constexpr, NEED_G: tl.constexpr, NEED_DY: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_DIV: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < N
    in_bounds = row_ok[:, None] & col_ok[None, :]
    state = (rows // M).to(tl.int64)
    tok = (rows % M).to(tl.int64)
    p = _projection_tile(x_ptr, w_ptr, b_ptr, state, tok, row_ok, cols, col_ok, K,
                         x_stride_s, x_stride_m, x_stride_k, w_stride_n, w_stride_k, b_stride,
                         HAS_BIAS, DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                         K_DIV)
    y = tl.load(y_ptr + (state * y_stride_s + tok * y_stride_m)[:, None] + cols[None, :] * y_stride_n,
                mask=in_bounds, other=0.0).to(tl.float32)
    r3 = rows.to(tl.int64) * 3
    alpha = tl.load(coef_ptr + r3, mask=row_ok, other=0.0)[:, None]
    out = rows[:, None].to(tl.int64) * N + cols[None, :]
    if NEED_G:
        beta_p = tl.load(coef_ptr + r3 + 1, mask=row_ok, other=0.0)[:, None]
        g = alpha * y - beta_p * p  # 0 on padded tokens and outside the tile (coefficients 0)
        tl.store(g_ptr + out, g.to(g_ptr.dtype.element_ty), mask=in_bounds)
        tl.store(colsum_ptr + pid_m.to(tl.int64) * N + cols, tl.sum(g, axis=0), mask=col_ok)
    if NEED_DY:
        beta_y = tl.load(coef_ptr + r3 + 2, mask=row_ok, other=0.0)[:, None]
        s = tl.load(s_ptr)
        tl.store(dy_ptr + out, ((alpha * p - beta_y * y) * -s).to(dy_ptr.dtype.element_ty),
                 mask=in_bounds)


def gemm_config(dtype: torch.dtype, two_outputs: bool = False) -> dict:
    """Tile sizes for the projection: 16-bit operands feed the tensor cores in 128x64 tiles (64x64
    for the backward writing both G and dY); full fp32 ("ieee") products run on the FMA units and
    take smaller tiles.  Chosen against ptxas (sm_90, benchmarks/static.py): 128x128 spilled
    (255 registers + 204-432 bytes) at the tests' narrow K, where the loads are 2-8 bytes wide, and
    the two-output epilogue spilled 64-88 bytes at 128x64 and 52-60 at 64x64 with 4 warps; at these
    tiles nothing spills; fp32 (FMA) two-output tiles 32x64 (64x64 spilled 4-84 bytes)."""
    if dtype == torch.float32:
        return dict(BLOCK_M=32 if two_outputs else 64, BLOCK_N=64, BLOCK_K=32, num_warps=4,
                    num_stages=3)
    return dict(BLOCK_M=64 if two_outputs else 128, BLOCK_N=64, BLOCK_K=64, num_warps=8,
                num_stages=3)


def _gemm_setup(student, weight, two_outputs: bool = False):
    """(M, N, K, dot_fp32, config, input precision, rows per group) of a launch."""
    M = student[0].shape[1]
    N, K = weight.shape
    dot_fp32 = dot_in_fp32(student[0].dtype, weight.dtype, student[0].device)
    dot_dtype = torch.float32 if dot_fp32 else student[0].dtype
    cfg = gemm_config(dot_dtype, two_outputs)
    if min(k_div(K, x, weight) for x in student) == 1:  # as hidden_mse: 2-byte loads
        cfg = dict(cfg, BLOCK_M=min(cfg["BLOCK_M"], NARROW_BLOCK_M))
    return (M, N, K, dot_fp32, cfg, dot_precision(dot_dtype),
            [s.shape[0] * M for s in student])


def hidden_cosine_forward(student: list[torch.Tensor], teacher: list[torch.Tensor],
                          weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
                          eps: float, save_coef: bool, token_mask: torch.Tensor | None = None):
    """Fused projection + cosine loss over groups of states.

    student: groups [n_g, M, d_s]; teacher: groups [n_g, M, d_t]; weight [d_t, d_s] in the
    student's dtype; bias [d_t] or None; token_mask [M] (0 = padded token, excluded) or None.
    Returns (scale * sum over kept tokens of (1 - cos) as an fp32 scalar, coefficients fp32
    [sum n_g * M, 3] = (alpha, beta_p, beta_y) per token, empty [0, 3] unless save_coef).
    """
    M, N, K, dot_fp32, cfg, precision, rows_per_group = _gemm_setup(student, weight)
    device = student[0].device
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    num_n = triton.cdiv(N, bn)
    total_rows = sum(rows_per_group)
    sums = torch.empty((num_n, total_rows, N_SUMS), dtype=torch.float32, device=device)
    row0 = 0
    for x, y, rows in zip(student, teacher, rows_per_group):
        _hidden_cosine_sums_kernel[(triton.cdiv(rows, bm) * num_n,)](
            x, weight, bias if bias is not None else weight, y, sums[:, row0:],
            rows, M, N, K,
            *x.stride(), *weight.stride(), 0 if bias is None else bias.stride(0), *y.stride(),
            sums.stride(0),
            HAS_BIAS=bias is not None, DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
            K_DIV=k_div(K, x, weight), **cfg,
        )
        row0 += rows
    block_r = min(FINISH_ROWS, next_power_of_2(total_rows))
    n_prog = triton.cdiv(total_rows, block_r)
    partials = torch.empty(n_prog, dtype=torch.float32, device=device)
    coef = torch.empty((total_rows if save_coef else 0, N_SUMS), dtype=torch.float32,
                       device=device)
    tm = None if token_mask is None else as_loadable_mask(token_mask)
    _hidden_cosine_finish_kernel[(n_prog,)](
        sums, tm if tm is not None else partials, coef if save_coef else partials, partials,
        total_rows, M, num_n, sums.stride(0), 0 if tm is None else tm.stride(0),
        eps, scale,
        HAS_TOKEN_MASK=tm is not None, SAVE_COEF=save_coef, BLOCK_R=block_r,
        num_warps=4,
    )
    return partials.sum(), coef


def hidden_cosine_backward(s: torch.Tensor, student: list[torch.Tensor],
                           teacher: list[torch.Tensor], weight: torch.Tensor,
                           bias: torch.Tensor | None, coef: torch.Tensor, need_g: bool,
                           need_dy: bool):
    """The elementwise part of the backward over groups of states.

    s: fp32 0-dim tensor, scale * grad_output; coef: the forward's [sum n_g * M, 3].
    Returns (G = alpha y - beta_p p in the student's dtype [sum n_g * M, d_t], its column-sum
    partials fp32 [row blocks, d_t], dY = -s (alpha p - beta_y y) per group [n_g, M, d_t] in the
    teacher's dtype); G and its column sums are empty unless need_g, dY [] unless need_dy.
    """
    M, N, K, dot_fp32, cfg, precision, rows_per_group = _gemm_setup(student, weight,
                                                                    need_g and need_dy)
    device = student[0].device
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    num_n = triton.cdiv(N, bn)
    m_blocks = [triton.cdiv(r, bm) for r in rows_per_group]
    g = torch.empty((sum(rows_per_group) if need_g else 0, N), dtype=student[0].dtype,
                    device=device)
    colsum = torch.empty((sum(m_blocks) if need_g else 0, N), dtype=torch.float32, device=device)
    dys = []
    row0 = mblk0 = 0
    for x, y, rows, mb in zip(student, teacher, rows_per_group, m_blocks):
        dy = torch.empty(y.shape, dtype=y.dtype, device=device) if need_dy else None
        _hidden_cosine_bwd_kernel[(mb * num_n,)](
            x, weight, bias if bias is not None else weight, y, coef[row0:], s,
            g[row0:] if need_g else coef,  # placeholders: never written
            colsum[mblk0:] if need_g else coef,
            dy if need_dy else coef,
            rows, M, N, K,
            *x.stride(), *weight.stride(), 0 if bias is None else bias.stride(0), *y.stride(),
            HAS_BIAS=bias is not None, NEED_G=need_g, NEED_DY=need_dy, DOT_FP32=dot_fp32,
            INPUT_PRECISION=precision, K_DIV=k_div(K, x, weight),
            **cfg,
        )
        if need_dy:
            dys.append(dy)
        row0 += rows
        mblk0 += mb
    return g, colsum, dys
