"""Triton kernels for the temperature-scaled soft cross-entropy, forward and backward.

Shapes: student logits Z_s and teacher logits Z_t, [N, C] (any strides).  With x = Z_s / T,
u = Z_t / T, p_t = softmax(u), per row

    ce     = -sum_c p_t[c] * log_softmax(x)[c] = lse(x) - sum_c p_t[c] * x[c]
    loss   = scale * sum_rows ce            (scale = 1/(N*C) "mean", 1/N "batchmean", 1 "sum")
    dZ_s   = g * scale / T * (softmax(x) - p_t)
    dZ_t   = -g * scale / T * p_t * (log_softmax(x) + ce)

The forward makes one pass over C per row with an online softmax for both logit sets (fp32
accumulation, base-2 exponentials) and keeps per-row statistics [3, N] = (lse(x), lse(u), ce), so
the backward is a single fully parallel pass: nothing of size N*C is saved.

Launches: forward = one kernel + one sum over per-program partials; backward = one kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import LN2, LOG2E, stream_num_warps, stream_tile

# A row is streamed in column blocks of at most this width; the online softmax joins them.
MAX_BLOCK_C_FWD = 4096
MAX_BLOCK_C_BWD = 4096


@triton.jit
def _soft_ce_fwd_kernel(
    # pointers
    s_ptr, t_ptr, partial_ptr, stats_ptr,
    # sizes
    N, C,
    # strides
    s_stride_n, s_stride_c, t_stride_n, t_stride_c,
    # scalars
    inv_temp, scale,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    s_row = rows.to(tl.int64) * s_stride_n
    t_row = rows.to(tl.int64) * t_stride_n
    k = inv_temp * LOG2E  # logits -> base-2 exponent units
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_N,), tl.float32)
    l_t = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float32)  # sum_c exp2(u - m_t) * x, rescaled as m_t grows
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = (cols < C)[None, :]
        ok = row_ok[:, None] & col_ok
        c_off = cols[None, :].to(tl.int64)
        x = tl.load(s_ptr + s_row[:, None] + c_off * s_stride_c, mask=ok, other=0.0).to(tl.float32) * k
        u = tl.load(t_ptr + t_row[:, None] + c_off * t_stride_c, mask=ok, other=0.0).to(tl.float32) * k
        x = tl.where(col_ok, x, float("-inf"))
        u = tl.where(col_ok, u, float("-inf"))
        m_s_new = tl.maximum(m_s, tl.max(x, axis=1))
        l_s = l_s * tl.exp2(m_s - m_s_new) + tl.sum(tl.exp2(x - m_s_new[:, None]), axis=1)
        m_s = m_s_new
        m_t_new = tl.maximum(m_t, tl.max(u, axis=1))
        alpha = tl.exp2(m_t - m_t_new)
        e = tl.exp2(u - m_t_new[:, None])
        l_t = l_t * alpha + tl.sum(e, axis=1)
        # e == 0 where the teacher gives no mass: skip x there (it may be -inf).
        w = w * alpha + tl.sum(tl.where(e > 0, e * x, 0.0), axis=1)
        m_t = m_t_new
    lse_s = (m_s + tl.log2(l_s)) * LN2
    lse_t = (m_t + tl.log2(l_t)) * LN2
    ce = lse_s - (w / l_t) * LN2
    tl.store(stats_ptr + rows, lse_s, mask=row_ok)
    tl.store(stats_ptr + N + rows, lse_t, mask=row_ok)
    tl.store(stats_ptr + 2 * N + rows, ce, mask=row_ok)
    tl.store(partial_ptr + pid, tl.sum(tl.where(row_ok, ce, 0.0)) * scale)


@triton.jit
def _soft_ce_bwd_kernel(
    # pointers
    s_ptr, t_ptr, stats_ptr, grad_out_ptr, ds_ptr, dt_ptr,
    # sizes
    N, C,
    # strides (dZ_s and dZ_t are allocated contiguous [N, C])
    s_stride_n, s_stride_c, t_stride_n, t_stride_c,
    # scalars
    inv_temp, scale,
    # meta-parameters
    NEED_DS: tl.constexpr, NEED_DT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols < C)[None, :]
    c_off = cols[None, :].to(tl.int64)
    coef = tl.load(grad_out_ptr).to(tl.float32) * scale * inv_temp
    lse_s = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(stats_ptr + N + rows, mask=row_ok, other=0.0)
    x = tl.load(s_ptr + rows[:, None].to(tl.int64) * s_stride_n + c_off * s_stride_c,
                mask=ok, other=0.0).to(tl.float32) * inv_temp
    u = tl.load(t_ptr + rows[:, None].to(tl.int64) * t_stride_n + c_off * t_stride_c,
                mask=ok, other=0.0).to(tl.float32) * inv_temp
    log_p_s = x - lse_s[:, None]
    p_t = tl.exp(u - lse_t[:, None])
    g_off = rows[:, None].to(tl.int64) * C + c_off
    if NEED_DS:
        ds = coef * (tl.exp(log_p_s) - p_t)
        tl.store(ds_ptr + g_off, ds.to(ds_ptr.dtype.element_ty), mask=ok)
    if NEED_DT:
        ce = tl.load(stats_ptr + 2 * N + rows, mask=row_ok, other=0.0)
        dt = tl.where(p_t > 0, -coef * p_t * (log_p_s + ce[:, None]), 0.0)
        tl.store(dt_ptr + g_off, dt.to(dt_ptr.dtype.element_ty), mask=ok)


def _fwd_tile(C: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps) of the forward's row-streaming tile."""
    block_n, block_c = stream_tile(C, MAX_BLOCK_C_FWD)
    return block_n, block_c, stream_num_warps(block_n * block_c)


def _bwd_tile(C: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps) of the backward's 2-D tile."""
    block_n, block_c = stream_tile(C, MAX_BLOCK_C_BWD)
    return block_n, block_c, stream_num_warps(block_n * block_c)


def soft_cross_entropy_forward(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss fp32 scalar, row statistics fp32 [3, N]) for [N, C] logits."""
    N, C = student.shape
    block_n, block_c, num_warps = _fwd_tile(C)
    grid = triton.cdiv(N, block_n)
    partials = torch.empty(grid, dtype=torch.float32, device=student.device)
    stats = torch.empty((3, N), dtype=torch.float32, device=student.device)
    _soft_ce_fwd_kernel[(grid,)](
        student, teacher, partials, stats,
        N, C,
        *student.stride(), *teacher.stride(),
        1.0 / temperature, scale,
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps,
    )
    return partials.sum(), stats


def soft_cross_entropy_backward(grad_out: torch.Tensor, student: torch.Tensor,
                                teacher: torch.Tensor, stats: torch.Tensor, temperature: float,
                                scale: float, need_student: bool, need_teacher: bool
                                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dZ_s, dZ_t), contiguous [N, C] in the logits' dtypes; None where not needed."""
    N, C = student.shape
    block_n, block_c, num_warps = _bwd_tile(C)
    ds = torch.empty((N, C), dtype=student.dtype, device=student.device) if need_student else None
    dt = torch.empty((N, C), dtype=teacher.dtype, device=teacher.device) if need_teacher else None
    _soft_ce_bwd_kernel[(triton.cdiv(N, block_n), triton.cdiv(C, block_c))](
        student, teacher, stats, grad_out,
        ds if need_student else grad_out, dt if need_teacher else grad_out,
        N, C,
        *student.stride(), *teacher.stride(),
        1.0 / temperature, scale,
        NEED_DS=need_student, NEED_DT=need_teacher,
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps,
    )
    return ds, dt
