"""Triton kernels for the knowledge-distillation KL divergence (Hinton et al., DistilBERT), forward
and backward.

Shapes: student logits Z_s and teacher logits Z_t, [N, C] (any strides).  With x = Z_s / T,
u = Z_t / T, p_s = softmax(x), p_t = softmax(u), per row

    kl     = sum_c p_t[c] * (log p_t[c] - log p_s[c])
           = sum_c p_t[c] * (u[c] - x[c]) + lse(x) - lse(u)
    loss   = scale * T^2 * sum_rows kl      (scale = 1/N "batchmean", 1/(N*C) "mean", 1 "sum")
    dZ_s   = g * scale * T * (p_s - p_t)
    dZ_t   = g * scale * T * p_t * (log p_t - log p_s - kl)

(dkl/du_j = sum_c dp_t[c]/du_j * (log p_t[c] - log p_s[c]) + sum_c p_t[c] * dlog p_t[c]/du_j; the
second sum is p_t[j] - p_t[j] * sum_c p_t[c] = 0 and dp_t[c]/du_j = p_t[c] (d_cj - p_t[j]), which
leaves p_t[j] * (log p_t[j] - log p_s[j] - kl); the chain rule through u = Z_t / T and the T^2
factor give g * scale * T.)  Classes where the teacher gives no mass (p_t = 0: logit -inf) add 0
to kl and get a zero teacher gradient.

The forward makes one pass over C per row with an online softmax for both logit sets (fp32
accumulation, base-2 exponentials) and keeps per-row statistics [5, N] = (m_s, r_s, m_t, r_t, kl),
with m = max_c Z[c] and r = ln sum_c exp((Z[c] - m) / T), so lse(Z / T) = m / T + r; the backward
is a single fully parallel pass: nothing of size N*C is saved.

Why the maximum in logit units: log p = (Z - m) / T - r subtracts the maximum before any scaling,
as torch.log_softmax does, so the scaling's rounding acts on Z - m (small near the top of the
distribution, where p matters) and not on Z itself.  Scaling first (x = Z / T * log2(e), then
x - lse) rounds numbers as large as the logits: at |Z / T| ~ 600 that is ~3e-5 absolute error in
log p, 1e-5 relative in the gradient, against ~3e-8 for torch in fp32.

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
# Rows of the forward's statistics: (m_s, r_s, m_t, r_t, kl).
N_STATS = 5


@triton.jit
def _finite_or_zero(m):
    """A running maximum that is -inf (every logit so far -inf) -> 0, so that exp2(x - m) is
    exp2(-inf) = 0 and not exp2(-inf + inf) = NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _kl_div_fwd_kernel(
    # pointers
    s_ptr, t_ptr, partial_ptr, stats_ptr,
    # sizes
    N, C,
    # strides
    s_stride_n, s_stride_c, t_stride_n, t_stride_c,
    # scalars
    inv_temp, loss_scale,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    s_row = rows.to(tl.int64) * s_stride_n
    t_row = rows.to(tl.int64) * t_stride_n
    k = inv_temp * LOG2E  # logit differences -> base-2 exponent units
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running maxima, logit units
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_N,), tl.float32)  # sum_c exp2((Z[c] - m) * k)
    l_t = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float32)  # sum_c exp2((Z_t - m_t) * k) * (Z_t - Z_s), rescaled
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = (cols < C)[None, :]
        ok = row_ok[:, None] & col_ok
        c_off = cols[None, :].to(tl.int64)
        zs = tl.load(s_ptr + s_row[:, None] + c_off * s_stride_c, mask=ok, other=0.0).to(tl.float32)
        zt = tl.load(t_ptr + t_row[:, None] + c_off * t_stride_c, mask=ok, other=0.0).to(tl.float32)
        zs = tl.where(col_ok, zs, float("-inf"))
        zt = tl.where(col_ok, zt, float("-inf"))
        m_s_new = tl.maximum(m_s, tl.max(zs, axis=1))
        ref_s = _finite_or_zero(m_s_new)
        l_s = (l_s * tl.exp2((m_s - ref_s) * k)
               + tl.sum(tl.exp2((zs - ref_s[:, None]) * k), axis=1))
        m_s = m_s_new
        m_t_new = tl.maximum(m_t, tl.max(zt, axis=1))
        ref_t = _finite_or_zero(m_t_new)
        alpha = tl.exp2((m_t - ref_t) * k)
        e = tl.exp2((zt - ref_t[:, None]) * k)
        l_t = l_t * alpha + tl.sum(e, axis=1)
        # e == 0 where the teacher gives no mass: skip Z_t - Z_s there (Z_t = -inf, Z_s may be)
        w = w * alpha + tl.sum(tl.where(e > 0, e * (zt - zs), 0.0), axis=1)
        m_t = m_t_new
    r_s = tl.log2(l_s) * LN2
    r_t = tl.log2(l_t) * LN2
    # kl = E_t[u - x] + lse(x) - lse(u), with lse(x) - lse(u) = (m_s - m_t) / T + r_s - r_t
    kl = (w / l_t - (m_t - m_s)) * inv_temp + (r_s - r_t)
    tl.store(stats_ptr + rows, m_s, mask=row_ok)
    tl.store(stats_ptr + N + rows, r_s, mask=row_ok)
    tl.store(stats_ptr + 2 * N + rows, m_t, mask=row_ok)
    tl.store(stats_ptr + 3 * N + rows, r_t, mask=row_ok)
    tl.store(stats_ptr + 4 * N + rows, kl, mask=row_ok)
    tl.store(partial_ptr + pid, tl.sum(tl.where(row_ok, kl, 0.0)) * loss_scale)


@triton.jit
def _kl_div_bwd_kernel(
    # pointers
    s_ptr, t_ptr, stats_ptr, grad_out_ptr, ds_ptr, dt_ptr,
    # sizes
    N, C,
    # strides (dZ_s and dZ_t are allocated contiguous [N, C])
    s_stride_n, s_stride_c, t_stride_n, t_stride_c,
    # scalars
    inv_temp, grad_scale,
    # meta-parameters
    NEED_DS: tl.constexpr, NEED_DT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols < C)[None, :]
    c_off = cols[None, :].to(tl.int64)
    # g * scale * T, read on the device (no host synchronisation on grad_output)
    coef = tl.load(grad_out_ptr).to(tl.float32) * grad_scale
    m_s = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
    r_s = tl.load(stats_ptr + N + rows, mask=row_ok, other=0.0)
    m_t = tl.load(stats_ptr + 2 * N + rows, mask=row_ok, other=0.0)
    r_t = tl.load(stats_ptr + 3 * N + rows, mask=row_ok, other=0.0)
    zs = tl.load(s_ptr + rows[:, None].to(tl.int64) * s_stride_n + c_off * s_stride_c,
                 mask=ok, other=0.0).to(tl.float32)
    zt = tl.load(t_ptr + rows[:, None].to(tl.int64) * t_stride_n + c_off * t_stride_c,
                 mask=ok, other=0.0).to(tl.float32)
    log_p_s = (zs - m_s[:, None]) * inv_temp - r_s[:, None]
    log_p_t = (zt - m_t[:, None]) * inv_temp - r_t[:, None]
    p_t = tl.exp(log_p_t)
    g_off = rows[:, None].to(tl.int64) * C + c_off
    if NEED_DS:
        ds = coef * (tl.exp(log_p_s) - p_t)
        tl.store(ds_ptr + g_off, ds.to(ds_ptr.dtype.element_ty), mask=ok)
    if NEED_DT:
        kl = tl.load(stats_ptr + 4 * N + rows, mask=row_ok, other=0.0)
        dt = tl.where(p_t > 0, coef * p_t * (log_p_t - log_p_s - kl[:, None]), 0.0)
        tl.store(dt_ptr + g_off, dt.to(dt_ptr.dtype.element_ty), mask=ok)


def _fwd_tile(C: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps) of the forward's row-streaming tile."""
    block_n, block_c = stream_tile(C, MAX_BLOCK_C_FWD)
    return block_n, block_c, stream_num_warps(block_n * block_c)


def _bwd_tile(C: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps) of the backward's 2-D tile."""
    block_n, block_c = stream_tile(C, MAX_BLOCK_C_BWD)
    return block_n, block_c, stream_num_warps(block_n * block_c)


def kl_divergence_forward(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss = scale * T^2 * sum_rows kl, fp32 scalar; row statistics fp32 [5, N] =
    (m_s, r_s, m_t, r_t, kl), see the module docstring) for [N, C] logits."""
    N, C = student.shape
    block_n, block_c, num_warps = _fwd_tile(C)
    grid = triton.cdiv(N, block_n)
    partials = torch.empty(grid, dtype=torch.float32, device=student.device)
    stats = torch.empty((N_STATS, N), dtype=torch.float32, device=student.device)
    _kl_div_fwd_kernel[(grid,)](
        student, teacher, partials, stats,
        N, C,
        *student.stride(), *teacher.stride(),
        1.0 / temperature, scale * temperature * temperature,
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps,
    )
    return partials.sum(), stats


def kl_divergence_backward(grad_out: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                           stats: torch.Tensor, temperature: float, scale: float,
                           need_student: bool, need_teacher: bool
                           ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dZ_s, dZ_t), contiguous [N, C] in the logits' dtypes; None where not needed."""
    N, C = student.shape
    block_n, block_c, num_warps = _bwd_tile(C)
    ds = torch.empty((N, C), dtype=student.dtype, device=student.device) if need_student else None
    dt = torch.empty((N, C), dtype=teacher.dtype, device=teacher.device) if need_teacher else None
    _kl_div_bwd_kernel[(triton.cdiv(N, block_n), triton.cdiv(C, block_c))](
        student, teacher, stats, grad_out,
        ds if need_student else grad_out, dt if need_teacher else grad_out,
        N, C,
        *student.stride(), *teacher.stride(),
        1.0 / temperature, scale * temperature,
        NEED_DS=need_student, NEED_DT=need_teacher,
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps,
    )
    return ds, dt
