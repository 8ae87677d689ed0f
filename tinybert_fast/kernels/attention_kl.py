"""Triton kernels for MiniLM's attention-distribution KL computed from captured pre-softmax score
maps, forward and backward.

Shapes: each "group" is a pair of score tensors S_s (student) and S_t (teacher) of shape
[n, B, H, L, L] (n mapped layers stacked; any strides, dtypes may differ).  A row r is one query
row (layer, b, h, i) of the R = n*B*H*L rows of a group.  With the key-padding mask m[b, j]
(1 = token; all ones when absent), a row is valid when m[b, i] = 1, and on a valid row, over the
keys j with m[b, j] = 1 (padded keys take part in neither softmax, whatever the scores hold there):

    mx_x  = max_j S_x,ij                                   (x = s, t)
    c_x   = log sum_j exp(S_x,ij - mx_x)                   so log P_x,ij = S_x,ij - mx_x - c_x
    KL_i  = sum_j P_t,ij (log P_t,ij - log P_s,ij)
          = c_s - c_t + sum_j P_t,ij ((S_t,ij - mx_t) - (S_s,ij - mx_s))
    kl_sum = sum over the valid rows of KL_i

and, with coef = c (the reduction scale: a 0-dim fp32 tensor the kernel loads, counted on the
device with a mask: no host synchronisation), on valid rows and keys (0 elsewhere, padded rows
included), the gradients for an incoming gradient of 1:

    dS_s = coef (P_s - P_t)
    dS_t = coef P_t ((log P_t - log P_s) - KL_i)

One kernel computes the loss and, when asked for, these gradients; the backward multiplies them by
the incoming gradient in place (kernels._utils.scale_in_place: no pass at all when it is 1).  One
program takes BLOCK_ROWS rows and loops over key tiles of BLOCK_L with an online softmax of both
sides at once in fp32 (kernels._utils.online_softmax_step): running maxima and sums for s and t,
and w = sum_j exp(S_t - mx_t) ((S_t - mx_t) - (S_s - mx_s)) kept relative to the running maxima
(when they grow by d_s, d_t, w becomes alpha_t (w + l_t (d_s - d_t)) with alpha_t = exp(-d_t)), so
that KL_i = c_s - c_t + w / l_t at the end.  Every term is a difference taken against the row's
own maximum: a row that holds only the -10000 or dtype-minimum bias (a padded sequence without a
mask) keeps its uniform distribution and gives KL 0, where lse_s - lse_t would lose every digit.
A row that fits one key tile (L <= MAX_BLOCK_L) gets its gradients from the tile still in
registers, so forward + backward reads each map once and writes each gradient once; a longer row
is read a second time for them.  Each program writes one partial sum of KL_i, reduced afterwards.
Nothing of size L^2 but the inputs and the gradients.

Padded keys enter the running maxima as -inf and the maxima start at the most negative finite
fp32 (not -inf), so a key tile without a token (left padding, holes) rescales by exp(0) = 1, never
by exp(-inf + inf) = NaN, and a row of dtype-minimum scores still lifts its maximum.  Exponentials
are base 2 (exp2 of a natural-unit difference times log2 e: one MUFU instruction each); the
maxima stay in natural units, since the dtype minimum times log2 e overflows fp32.

Launches: one kernel per group + one sum over the partials.  A stacked tensor is one group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (LN2, LOG2E, byte_mask, mask_args, online_softmax_step, score_row_offsets,
                     stream_launch)

# Start of the running maxima: the most negative finite fp32 (see the module docstring).
M_FLOOR = tl.constexpr(-3.4028234663852886e38)
# Widest key tile.  A longer row takes several tiles through the online softmax; a whole-row tile
# would only trade rows of the block for columns.
MAX_BLOCK_L = 1024


@triton.jit
def _valid_rows(mask_ptr, rows, n_rows, b, i, mask_strides, HAS_MASK: tl.constexpr):
    """rows < n_rows, and m[b, i] != 0 (a token's query row)."""
    ok = rows < n_rows
    if HAS_MASK:
        m = tl.load(mask_ptr + b.to(tl.int64) * mask_strides[0] + i.to(tl.int64) * mask_strides[1],
                    mask=ok, other=0)
        ok = ok & (m != 0)
    return ok


@triton.jit
def _load_tile(s_ptr, t_ptr, mask_ptr, s_row, t_row, b, row_ok, cols, L, s_strides, t_strides,
               mask_strides, HAS_MASK: tl.constexpr):
    """One [rows, cols] tile of S_s and S_t in fp32 (0 outside `ok`) and `ok`: a valid row and a
    token key j < L.  The scores are loaded under the tile's bounds alone (a mask that is constant
    along contiguous keys keeps the loads vectorised; a mask loaded from memory would make them
    scalar) and zeroed on padded keys, so that what those hold (anything, NaN) never enters."""
    inb = row_ok[:, None] & (cols < L)[None, :]
    c = cols[None, :].to(tl.int64)
    s = tl.load(s_ptr + s_row[:, None] + c * s_strides[4], mask=inb, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + t_row[:, None] + c * t_strides[4], mask=inb, other=0.0).to(tl.float32)
    ok = inb
    if HAS_MASK:
        keep = tl.load(mask_ptr + b[:, None].to(tl.int64) * mask_strides[0] + c * mask_strides[1],
                       mask=inb, other=0)
        ok = inb & (keep != 0)
        s = tl.where(ok, s, 0.0)
        t = tl.where(ok, t, 0.0)
    return s, t, ok


@triton.jit
def _kl_scores_grads(s, t, ok, out, mx_s, c_s, mx_t, c_t, kl, coef, ds_ptr, dt_ptr, g_off,
                     NEED_DS: tl.constexpr, NEED_DT: tl.constexpr):
    """Store one tile of dS_s and dS_t (see the module docstring)."""
    # log P_x = S_x - (mx_x + c_x), the two added after subtracting mx_x
    lp_s = (s - mx_s[:, None]) - c_s[:, None]
    lp_t = (t - mx_t[:, None]) - c_t[:, None]
    p_s = tl.where(ok, tl.exp2(lp_s * LOG2E), 0.0)
    p_t = tl.where(ok, tl.exp2(lp_t * LOG2E), 0.0)
    if NEED_DS:
        tl.store(ds_ptr + g_off, (coef * (p_s - p_t)).to(ds_ptr.dtype.element_ty), mask=out)
    if NEED_DT:
        d_t = coef * p_t * ((lp_t - lp_s) - kl[:, None])
        tl.store(dt_ptr + g_off, tl.where(ok, d_t, 0.0).to(dt_ptr.dtype.element_ty), mask=out)


@triton.jit
def _kl_scores_step(s, t, ok, mx_s, l_s, mx_t, l_t, w):
    """The online softmaxes of both sides and w (module docstring) after one key tile."""
    new_s, l_s, _, _ = online_softmax_step(mx_s, l_s, tl.where(ok, s, float("-inf")), LOG2E)
    l_t_old = l_t
    new_t, l_t, alpha_t, e_t = online_softmax_step(mx_t, l_t, tl.where(ok, t, float("-inf")),
                                                   LOG2E)
    # the earlier terms of w against the new maxima, then this tile's (s, t are 0 off `ok`)
    w = alpha_t * (w + l_t_old * ((new_s - mx_s) - (new_t - mx_t)))
    w += tl.sum(e_t * ((t - new_t[:, None]) - (s - new_s[:, None])), axis=1)
    return new_s, l_s, new_t, l_t, w


@triton.jit
def _kl_scores_kernel(
    # pointers: s, t [n, B, H, L, L]; mask [B, L]; partial fp32 (from this group's first program
    # on); coef 0-dim fp32; ds, dt [n, B, H, L, L] contiguous, the inputs' dtypes
    s_ptr, t_ptr, mask_ptr, partial_ptr, coef_ptr, ds_ptr, dt_ptr,
    # sizes
    n_rows, B, H, L,
    # strides (tuples)
    s_strides, t_strides, mask_strides,
    # meta-parameters
    HAS_MASK: tl.constexpr, NEED_DS: tl.constexpr, NEED_DT: tl.constexpr,
    ONE_TILE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    s_row, b, i = score_row_offsets(rows, L, H, B, s_strides)
    t_row, _, _ = score_row_offsets(rows, L, H, B, t_strides)
    row_ok = _valid_rows(mask_ptr, rows, n_rows, b, i, mask_strides, HAS_MASK)
    mx_s = tl.full((BLOCK_ROWS,), M_FLOOR, tl.float32)
    mx_t = tl.full((BLOCK_ROWS,), M_FLOOR, tl.float32)
    l_s = tl.zeros((BLOCK_ROWS,), tl.float32)
    l_t = tl.zeros((BLOCK_ROWS,), tl.float32)
    w = tl.zeros((BLOCK_ROWS,), tl.float32)  # sum_j e_t ((S_t - mx_t) - (S_s - mx_s))
    if ONE_TILE:
        cols = tl.arange(0, BLOCK_L)
        s, t, ok = _load_tile(s_ptr, t_ptr, mask_ptr, s_row, t_row, b, row_ok, cols, L,
                              s_strides, t_strides, mask_strides, HAS_MASK)
        mx_s, l_s, mx_t, l_t, w = _kl_scores_step(s, t, ok, mx_s, l_s, mx_t, l_t, w)
    else:
        for c0 in range(0, L, BLOCK_L):
            cols = c0 + tl.arange(0, BLOCK_L)
            s, t, ok = _load_tile(s_ptr, t_ptr, mask_ptr, s_row, t_row, b, row_ok, cols, L,
                                  s_strides, t_strides, mask_strides, HAS_MASK)
            mx_s, l_s, mx_t, l_t, w = _kl_scores_step(s, t, ok, mx_s, l_s, mx_t, l_t, w)
    # l_x >= 1 on a valid row (its maximum's own term); the guard keeps padded rows finite
    l_s = tl.where(row_ok, l_s, 1.0)
    l_t = tl.where(row_ok, l_t, 1.0)
    c_s = tl.log2(l_s) * LN2
    c_t = tl.log2(l_t) * LN2
    kl = tl.where(row_ok, c_s - c_t + w / l_t, 0.0)
    tl.store(partial_ptr + pid, tl.sum(kl))
    if NEED_DS or NEED_DT:
        coef = tl.load(coef_ptr).to(tl.float32)
        in_range = rows < n_rows
        g_row = rows.to(tl.int64)[:, None] * L
        if ONE_TILE:
            _kl_scores_grads(s, t, ok, in_range[:, None] & (cols < L)[None, :], mx_s, c_s, mx_t,
                             c_t, kl, coef, ds_ptr, dt_ptr, g_row + cols[None, :], NEED_DS,
                             NEED_DT)
        else:
            for c0 in range(0, L, BLOCK_L):
                cols = c0 + tl.arange(0, BLOCK_L)
                s, t, ok = _load_tile(s_ptr, t_ptr, mask_ptr, s_row, t_row, b, row_ok, cols, L,
                                      s_strides, t_strides, mask_strides, HAS_MASK)
                _kl_scores_grads(s, t, ok, in_range[:, None] & (cols < L)[None, :], mx_s, c_s,
                                 mx_t, c_t, kl, coef, ds_ptr, dt_ptr, g_row + cols[None, :],
                                 NEED_DS, NEED_DT)


# --- launcher ------------------------------------------------------------------------------------

def tile(L: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_L, num_warps) of the kernel's [rows, keys] tile."""
    return stream_launch(L, MAX_BLOCK_L)


def attention_kl_scores_forward(student: list[torch.Tensor], teacher: list[torch.Tensor],
                                mask: torch.Tensor | None, coef: torch.Tensor | None = None,
                                need_student: bool = False, need_teacher: bool = False
                                ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(sum of KL_i over the valid rows of every group, fp32 scalar; dS_s per group; dS_t per
    group), the gradients contiguous in the inputs' dtypes for coef = c a 0-dim fp32 tensor (an
    incoming gradient of 1), only where asked for (an empty list otherwise; coef may then be
    None).  See the module docstring."""
    _, B, H, L, _ = student[0].shape
    block_rows, block_l, num_warps = tile(L)
    n_rows = [s.shape[0] * B * H * L for s in student]
    grids = [triton.cdiv(r, block_rows) for r in n_rows]
    device = student[0].device
    partials = torch.empty(sum(grids), dtype=torch.float32, device=device)
    mask_t, msb, msj, has_mask = mask_args(byte_mask(mask), partials)
    grads_s = [torch.empty(s.shape, dtype=s.dtype, device=device) for s in student] \
        if need_student else []
    grads_t = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in teacher] \
        if need_teacher else []
    p0 = 0
    for k, (s, t, rows, grid) in enumerate(zip(student, teacher, n_rows, grids)):
        _kl_scores_kernel[(grid,)](
            s, t, mask_t, partials[p0:], partials if coef is None else coef,
            grads_s[k] if need_student else partials, grads_t[k] if need_teacher else partials,
            rows, B, H, L,
            s.stride(), t.stride(), (msb, msj),
            HAS_MASK=has_mask, NEED_DS=need_student, NEED_DT=need_teacher,
            ONE_TILE=L <= block_l, BLOCK_ROWS=block_rows, BLOCK_L=block_l, num_warps=num_warps,
        )
        p0 += grid
    return partials.sum(), grads_s, grads_t
