"""Triton kernels for TinyBERT's attention-score MSE, forward and backward.

Shapes: each "group" is a pair of score tensors S (student) and T (teacher) of shape
[n, B, H, L, L] (n mapped layers stacked; any strides).  With s' = 0 if s <= -100 else s (same for
t), and key-padding mask m[b, j] (1 = token; all ones when absent):

    loss = scale * sum over (layer, b, h, i, j) of m[b, j] * (s' - t')^2
           (times m[b, i] too with mask_queries: padded query rows excluded as well)
    dS   = 2 * scale * g * m * (s' - t') * [s > -100]
    dT   = -2 * scale * g * m * (s' - t') * [t > -100]

with scale = 1 / (B*H*L*L) for TinyBERT's per-layer mean (layers summed) or 1 for a sum, and g the
incoming gradient, read on the device (no host synchronisation).

Launches: forward = one kernel per group + one sum over the per-program partials; backward = one
kernel per group.  A stacked tensor is a single group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._semantics import MASK_THRESHOLD
from ._utils import mask_args, stream_num_warps, stream_tile

_THRESHOLD = tl.constexpr(MASK_THRESHOLD)  # kernels read globals only as constexpr


@triton.jit
def _row_offsets(rows, L, H, B, stride_n, stride_b, stride_h, stride_i):
    """int64 element offsets of rows (flattened layer, batch, head, query), their batch index and
    query index."""
    i = rows % L
    q = rows // L
    h = q % H
    q = q // H
    b = q % B
    n = q // B
    off = (n.to(tl.int64) * stride_n + b.to(tl.int64) * stride_b
           + h.to(tl.int64) * stride_h + i.to(tl.int64) * stride_i)
    return off, b, i


@triton.jit
def _apply_mask(d, mask_ptr, b, i, cols, ok, mask_stride_b, mask_stride_j,
                MASK_QUERIES: tl.constexpr):
    """Zero d at padded key columns m[b, j] == 0 (and padded query rows m[b, i] == 0)."""
    row = mask_ptr + b[:, None].to(tl.int64) * mask_stride_b
    keep = tl.load(row + cols[None, :] * mask_stride_j, mask=ok, other=0) != 0
    if MASK_QUERIES:
        keep = keep & (tl.load(row + i[:, None] * mask_stride_j, mask=ok, other=0) != 0)
    return tl.where(keep, d, 0.0)


@triton.jit
def _diff_tile(s_ptr, t_ptr, mask_ptr, s_row, t_row, b, i, cols, ok, s_stride_j, t_stride_j,
               mask_stride_b, mask_stride_j, HAS_MASK: tl.constexpr, MASK_QUERIES: tl.constexpr):
    """One [rows, cols] tile of m * (s' - t') in fp32, with where s and t are above the threshold
    (the entries whose gradient is not zeroed by the rule)."""
    c = cols[None, :].to(tl.int64)
    s = tl.load(s_ptr + s_row[:, None] + c * s_stride_j, mask=ok, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + t_row[:, None] + c * t_stride_j, mask=ok, other=0.0).to(tl.float32)
    s_live = s > _THRESHOLD
    t_live = t > _THRESHOLD
    d = tl.where(s_live, s, 0.0) - tl.where(t_live, t, 0.0)
    if HAS_MASK:
        d = _apply_mask(d, mask_ptr, b, i, cols, ok, mask_stride_b, mask_stride_j, MASK_QUERIES)
    return d, s_live, t_live


@triton.jit
def _attention_mse_fwd_kernel(
    # pointers
    s_ptr, t_ptr, mask_ptr, partial_ptr,
    # sizes
    n_rows, B, H, L,
    # strides
    s_stride_n, s_stride_b, s_stride_h, s_stride_i, s_stride_j,
    t_stride_n, t_stride_b, t_stride_h, t_stride_i, t_stride_j,
    mask_stride_b, mask_stride_j,
    # scalars
    scale,
    # meta-parameters
    HAS_MASK: tl.constexpr, MASK_QUERIES: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    s_row, b, i = _row_offsets(rows, L, H, B, s_stride_n, s_stride_b, s_stride_h, s_stride_i)
    t_row, _, _ = _row_offsets(rows, L, H, B, t_stride_n, t_stride_b, t_stride_h, t_stride_i)
    acc = tl.zeros((BLOCK_ROWS, BLOCK_L), dtype=tl.float32)
    for c0 in range(0, L, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L)
        ok = row_ok[:, None] & (cols < L)[None, :]
        d, s_live, t_live = _diff_tile(s_ptr, t_ptr, mask_ptr, s_row, t_row, b, i, cols, ok,
                                       s_stride_j, t_stride_j, mask_stride_b, mask_stride_j,
                                       HAS_MASK, MASK_QUERIES)
        acc += d * d
    tl.store(partial_ptr + pid, tl.sum(acc) * scale)


@triton.jit
def _attention_mse_bwd_kernel(
    # pointers
    s_ptr, t_ptr, mask_ptr, grad_out_ptr, ds_ptr, dt_ptr,
    # sizes
    n_rows, B, H, L,
    # strides (dS and dT are allocated contiguous: [n, B, H, L, L])
    s_stride_n, s_stride_b, s_stride_h, s_stride_i, s_stride_j,
    t_stride_n, t_stride_b, t_stride_h, t_stride_i, t_stride_j,
    mask_stride_b, mask_stride_j,
    # scalars
    scale,
    # meta-parameters
    HAS_MASK: tl.constexpr, MASK_QUERIES: tl.constexpr, NEED_DS: tl.constexpr,
    NEED_DT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    s_row, b, i = _row_offsets(rows, L, H, B, s_stride_n, s_stride_b, s_stride_h, s_stride_i)
    t_row, _, _ = _row_offsets(rows, L, H, B, t_stride_n, t_stride_b, t_stride_h, t_stride_i)
    g_row = rows.to(tl.int64) * L
    coef = 2.0 * scale * tl.load(grad_out_ptr).to(tl.float32)
    for c0 in range(0, L, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L)
        ok = row_ok[:, None] & (cols < L)[None, :]
        d, s_live, t_live = _diff_tile(s_ptr, t_ptr, mask_ptr, s_row, t_row, b, i, cols, ok,
                                       s_stride_j, t_stride_j, mask_stride_b, mask_stride_j,
                                       HAS_MASK, MASK_QUERIES)
        d = d * coef
        g_off = g_row[:, None] + cols[None, :]
        if NEED_DS:
            tl.store(ds_ptr + g_off, tl.where(s_live, d, 0.0).to(ds_ptr.dtype.element_ty), mask=ok)
        if NEED_DT:
            tl.store(dt_ptr + g_off, tl.where(t_live, -d, 0.0).to(dt_ptr.dtype.element_ty), mask=ok)


def _fwd_tile(L: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_L, num_warps) of the forward's tile."""
    block_rows, block_l = stream_tile(L)
    return block_rows, block_l, stream_num_warps(block_rows * block_l)


def _bwd_tile(L: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_L, num_warps) of the backward's tile."""
    block_rows, block_l = stream_tile(L)
    return block_rows, block_l, stream_num_warps(block_rows * block_l)


def attention_mse_forward(student: list[torch.Tensor], teacher: list[torch.Tensor],
                          mask: torch.Tensor | None, scale: float,
                          mask_queries: bool = False) -> torch.Tensor:
    """Loss (fp32 scalar) over groups of [n, B, H, L, L] scores; see the module docstring."""
    _, B, H, L, _ = student[0].shape
    block_rows, block_l, num_warps = _fwd_tile(L)
    grids = [triton.cdiv(s.shape[0] * B * H * L, block_rows) for s in student]
    partials = torch.empty(sum(grids), dtype=torch.float32, device=student[0].device)
    mask_t, msb, msj, has_mask = mask_args(mask, partials)
    start = 0
    for s, t, grid in zip(student, teacher, grids):
        _attention_mse_fwd_kernel[(grid,)](
            s, t, mask_t, partials[start:],
            s.shape[0] * B * H * L, B, H, L,
            *s.stride(), *t.stride(), msb, msj,
            scale,
            HAS_MASK=has_mask, MASK_QUERIES=mask_queries and has_mask, BLOCK_ROWS=block_rows,
            BLOCK_L=block_l, num_warps=num_warps,
        )
        start += grid
    return partials.sum()


def attention_mse_backward(grad_out: torch.Tensor, student: list[torch.Tensor],
                           teacher: list[torch.Tensor], mask: torch.Tensor | None, scale: float,
                           need_student: bool, need_teacher: bool, mask_queries: bool = False
                           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients (contiguous, input dtypes) for each group; an empty list where not needed."""
    _, B, H, L, _ = student[0].shape
    block_rows, block_l, num_warps = _bwd_tile(L)
    mask_t, msb, msj, has_mask = mask_args(mask, grad_out)
    grads_s, grads_t = [], []
    for s, t in zip(student, teacher):
        ds = torch.empty(s.shape, dtype=s.dtype, device=s.device) if need_student else grad_out
        dt = torch.empty(t.shape, dtype=t.dtype, device=t.device) if need_teacher else grad_out
        n_rows = s.shape[0] * B * H * L
        _attention_mse_bwd_kernel[(triton.cdiv(n_rows, block_rows),)](
            s, t, mask_t, grad_out, ds, dt,
            n_rows, B, H, L,
            *s.stride(), *t.stride(), msb, msj,
            scale,
            HAS_MASK=has_mask, MASK_QUERIES=mask_queries and has_mask, NEED_DS=need_student,
            NEED_DT=need_teacher,
            BLOCK_ROWS=block_rows, BLOCK_L=block_l, num_warps=num_warps,
        )
        if need_student:
            grads_s.append(ds)
        if need_teacher:
            grads_t.append(dt)
    return grads_s, grads_t
