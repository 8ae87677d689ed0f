"""Triton kernel for TinyBERT's attention-score MSE: the loss and, in the same pass, its gradients.

Shapes: each "group" is a pair of score tensors S (student) and T (teacher) of shape
[n, B, H, L, L] (n mapped layers stacked; any strides).  With s' = 0 if s <= -100 else s (same for
t), and key-padding mask m[b, j] (1 = token; all ones when absent):

    loss = scale * sum over (layer, b, h, i, j) of m[b, j] * (s' - t')^2
           (times m[b, i] too with mask_queries: padded query rows excluded as well)
    dS   = 2 * scale * m * (s' - t') * [s > -100]
    dT   = -2 * scale * m * (s' - t') * [t > -100]

with scale = 1 / (B*H*L*L) for TinyBERT's per-layer mean (layers summed) or 1 for a sum (float16
gradients are written without `scale`, which the backward applies: _utils.split_grad_scale).  dS and
dT are the gradients for an incoming gradient of 1: the kernel writes them while it reads the
scores for the loss (when they are asked for), so forward + backward reads each map once and
writes each gradient once; the backward multiplies them by the incoming gradient in place
(kernels._utils.scale_in_place: no pass at all when it is 1).

Launches: one kernel per group + one sum over the per-program partials.  A stacked tensor is a
single group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._semantics import MASK_THRESHOLD
from ._utils import byte_mask, mask_args, score_row_offsets, split_grad_scale, stream_launch

_THRESHOLD = tl.constexpr(MASK_THRESHOLD)  # kernels read globals only as constexpr


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
    # pointers (dS and dT are allocated contiguous: [n, B, H, L, L])
    s_ptr, t_ptr, mask_ptr, partial_ptr, ds_ptr, dt_ptr,
    # sizes
    n_rows, B, H, L,
    # strides (tuples)
    s_strides, t_strides, mask_stride_b, mask_stride_j,
    # scalars
    scale, grad_scale,
    # meta-parameters
    HAS_MASK: tl.constexpr, MASK_QUERIES: tl.constexpr, NEED_DS: tl.constexpr,
    NEED_DT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    s_row, b, i = score_row_offsets(rows, L, H, B, s_strides)
    t_row, _, _ = score_row_offsets(rows, L, H, B, t_strides)
    g_row = rows.to(tl.int64) * L
    acc = tl.zeros((BLOCK_ROWS, BLOCK_L), dtype=tl.float32)
    for c0 in range(0, L, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L)
        ok = row_ok[:, None] & (cols < L)[None, :]
        d, s_live, t_live = _diff_tile(s_ptr, t_ptr, mask_ptr, s_row, t_row, b, i, cols, ok,
                                       s_strides[4], t_strides[4], mask_stride_b, mask_stride_j,
                                       HAS_MASK, MASK_QUERIES)
        acc += d * d
        g_off = g_row[:, None] + cols[None, :]
        if NEED_DS:
            tl.store(ds_ptr + g_off, tl.where(s_live, 2.0 * grad_scale * d, 0.0)
                     .to(ds_ptr.dtype.element_ty), mask=ok)
        if NEED_DT:
            tl.store(dt_ptr + g_off, tl.where(t_live, -2.0 * grad_scale * d, 0.0)
                     .to(dt_ptr.dtype.element_ty), mask=ok)
    tl.store(partial_ptr + pid, tl.sum(acc) * scale)


def attention_mse_forward(student: list[torch.Tensor], teacher: list[torch.Tensor],
                          mask: torch.Tensor | None, scale: float, mask_queries: bool = False,
                          need_student: bool = False, need_teacher: bool = False
                          ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(loss fp32 scalar, dS per group, dT per group) over groups of [n, B, H, L, L] scores; the
    gradients (contiguous, the inputs' dtypes, for an incoming gradient of 1 divided by the
    backward factor of split_grad_scale: 1, or `scale` for float16) only where asked for, an
    empty list otherwise.  See the module docstring."""
    _, B, H, L, _ = student[0].shape
    block_rows, block_l, num_warps = stream_launch(L)
    grids = [triton.cdiv(s.shape[0] * B * H * L, block_rows) for s in student]
    partials = torch.empty(sum(grids), dtype=torch.float32, device=student[0].device)
    mask_t, msb, msj, has_mask = mask_args(byte_mask(mask), partials)
    grads_s = [torch.empty(s.shape, dtype=s.dtype, device=s.device) for s in student] \
        if need_student else []
    grads_t = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in teacher] \
        if need_teacher else []
    grad_scale = split_grad_scale(scale, student[0].dtype, teacher[0].dtype)[0]
    start = 0
    for k, (s, t, grid) in enumerate(zip(student, teacher, grids)):
        _attention_mse_fwd_kernel[(grid,)](
            s, t, mask_t, partials[start:],
            grads_s[k] if need_student else partials, grads_t[k] if need_teacher else partials,
            s.shape[0] * B * H * L, B, H, L,
            s.stride(), t.stride(), msb, msj,
            scale, grad_scale,
            HAS_MASK=has_mask, MASK_QUERIES=mask_queries and has_mask, NEED_DS=need_student,
            NEED_DT=need_teacher, BLOCK_ROWS=block_rows, BLOCK_L=block_l, num_warps=num_warps,
        )
        start += grid
    return partials.sum(), grads_s, grads_t
