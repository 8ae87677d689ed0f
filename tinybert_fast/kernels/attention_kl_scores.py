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

and, with coef = g * c (the incoming gradient times the reduction scale, a 0-dim fp32 tensor the
kernel loads: no host synchronisation), on valid rows and keys (0 elsewhere, padded rows
included):

    dS_s = coef (P_s - P_t)
    dS_t = coef P_t ((log P_t - log P_s) - KL_i)

Forward: one program per block of BLOCK_ROWS rows, looping over key tiles of BLOCK_L with an
online softmax of both sides at once in fp32: running maxima and sums for s and t, and
w = sum_j exp(S_t - mx_t) ((S_t - mx_t) - (S_s - mx_s)) kept relative to the running maxima (when
they grow by d_s, d_t, w becomes alpha_t (w + l_t (d_s - d_t)) with alpha_t = exp(-d_t)), so that
KL_i = c_s - c_t + w / l_t at the end.  Every term is a difference taken against the row's own
maximum: a row that holds only the -10000 or dtype-minimum bias (a padded sequence without a mask)
keeps its uniform distribution and gives KL 0, where lse_s - lse_t would lose every digit.  It
writes per-row statistics [5, R_total] fp32 (mx_s, c_s, mx_t, c_t, KL; 0 on padded rows) and one
partial sum per program, reduced afterwards.  Backward: one program per block of rows, the same
tiles, P_s and P_t recomputed from the saved statistics, dS_s (and dS_t when needed) written
contiguous in the inputs' dtypes.  Nothing of size L^2 but the inputs and the gradients.

Padded keys enter the running maxima as -inf and the maxima start at the most negative finite
fp32 (not -inf), so a key tile without a token (left padding, holes) rescales by exp(0) = 1, never
by exp(-inf + inf) = NaN, and a row of dtype-minimum scores still lifts its maximum.  Exponentials
are base 2 (exp2 of a natural-unit difference times log2 e: one MUFU instruction each); the
maxima stay in natural units, since the dtype minimum times log2 e overflows fp32.

Launches: forward one kernel per group + one sum over the partials; backward one kernel per group.
A stacked tensor is one group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import LN2, LOG2E, mask_args, stream_num_warps, stream_tile

# Start of the running maxima: the most negative finite fp32 (see the module docstring).
M_FLOOR = tl.constexpr(-3.4028234663852886e38)
# Widest key tile.  A longer row takes several tiles through the online softmax; a whole-row tile
# would only trade rows of the block for columns.
MAX_BLOCK_L = 1024
# Statistics per row: mx_s, c_s, mx_t, c_t, KL.
N_STATS = 5


@triton.jit
def _row_offsets(rows, L, H, B, strides):
    """int64 element offsets of rows (flattened layer, batch, head, query) of an [n, B, H, L, L]
    tensor with strides (a 5-tuple), their batch index and query index."""
    i = rows % L
    q = rows // L
    h = q % H
    q = q // H
    b = q % B
    n = q // B
    off = (n.to(tl.int64) * strides[0] + b.to(tl.int64) * strides[1]
           + h.to(tl.int64) * strides[2] + i.to(tl.int64) * strides[3])
    return off, b, i


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
def _kl_scores_fwd_kernel(
    # pointers: s, t [n, B, H, L, L]; mask [B, L]; stats [5, R_total] fp32 (from this group's
    # first row on); partial fp32 (from this group's first program on)
    s_ptr, t_ptr, mask_ptr, stats_ptr, partial_ptr,
    # sizes (plane = R_total, the distance between two statistics)
    n_rows, B, H, L, plane,
    # strides (tuples)
    s_strides, t_strides, mask_strides,
    # meta-parameters
    HAS_MASK: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    s_row, b, i = _row_offsets(rows, L, H, B, s_strides)
    t_row, _, _ = _row_offsets(rows, L, H, B, t_strides)
    row_ok = _valid_rows(mask_ptr, rows, n_rows, b, i, mask_strides, HAS_MASK)
    mx_s = tl.full((BLOCK_ROWS,), M_FLOOR, tl.float32)
    mx_t = tl.full((BLOCK_ROWS,), M_FLOOR, tl.float32)
    l_s = tl.zeros((BLOCK_ROWS,), tl.float32)
    l_t = tl.zeros((BLOCK_ROWS,), tl.float32)
    w = tl.zeros((BLOCK_ROWS,), tl.float32)  # sum_j e_t ((S_t - mx_t) - (S_s - mx_s))
    for c0 in range(0, L, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L)
        s, t, ok = _load_tile(s_ptr, t_ptr, mask_ptr, s_row, t_row, b, row_ok, cols, L,
                              s_strides, t_strides, mask_strides, HAS_MASK)
        new_s = tl.maximum(mx_s, tl.max(tl.where(ok, s, float("-inf")), axis=1))
        new_t = tl.maximum(mx_t, tl.max(tl.where(ok, t, float("-inf")), axis=1))
        d_s = new_s - mx_s
        d_t = new_t - mx_t
        alpha_t = tl.exp2(-d_t * LOG2E)
        # the earlier terms of w against the new maxima, before any of this tile's
        w = alpha_t * (w + l_t * (d_s - d_t))
        l_s = l_s * tl.exp2(-d_s * LOG2E)
        l_t = l_t * alpha_t
        a_s = s - new_s[:, None]
        a_t = t - new_t[:, None]
        e_s = tl.where(ok, tl.exp2(a_s * LOG2E), 0.0)
        e_t = tl.where(ok, tl.exp2(a_t * LOG2E), 0.0)
        l_s += tl.sum(e_s, axis=1)
        l_t += tl.sum(e_t, axis=1)
        w += tl.sum(e_t * (a_t - a_s), axis=1)
        mx_s = new_s
        mx_t = new_t
    # l_x >= 1 on a valid row (its maximum's own term); the guard keeps padded rows finite
    l_s = tl.where(row_ok, l_s, 1.0)
    l_t = tl.where(row_ok, l_t, 1.0)
    c_s = tl.log2(l_s) * LN2
    c_t = tl.log2(l_t) * LN2
    kl = tl.where(row_ok, c_s - c_t + w / l_t, 0.0)
    offs = rows.to(tl.int64)
    in_range = rows < n_rows
    tl.store(stats_ptr + offs, tl.where(row_ok, mx_s, 0.0), mask=in_range)
    tl.store(stats_ptr + plane + offs, tl.where(row_ok, c_s, 0.0), mask=in_range)
    tl.store(stats_ptr + 2 * plane + offs, tl.where(row_ok, mx_t, 0.0), mask=in_range)
    tl.store(stats_ptr + 3 * plane + offs, tl.where(row_ok, c_t, 0.0), mask=in_range)
    tl.store(stats_ptr + 4 * plane + offs, kl, mask=in_range)
    tl.store(partial_ptr + pid, tl.sum(kl))


@triton.jit
def _kl_scores_bwd_kernel(
    # pointers: s, t, mask, stats as the forward; coef 0-dim fp32; ds, dt [n, B, H, L, L]
    # contiguous, the inputs' dtypes
    s_ptr, t_ptr, mask_ptr, stats_ptr, coef_ptr, ds_ptr, dt_ptr,
    # sizes
    n_rows, B, H, L, plane,
    # strides (tuples)
    s_strides, t_strides, mask_strides,
    # meta-parameters
    HAS_MASK: tl.constexpr, NEED_DS: tl.constexpr, NEED_DT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    s_row, b, i = _row_offsets(rows, L, H, B, s_strides)
    t_row, _, _ = _row_offsets(rows, L, H, B, t_strides)
    row_ok = _valid_rows(mask_ptr, rows, n_rows, b, i, mask_strides, HAS_MASK)
    offs = rows.to(tl.int64)
    # log P_x = S_x - (mx_x + c_x), the two added after subtracting mx_x (see the forward)
    mx_s = tl.load(stats_ptr + offs, mask=row_ok, other=0.0)
    c_s = tl.load(stats_ptr + plane + offs, mask=row_ok, other=0.0)
    mx_t = tl.load(stats_ptr + 2 * plane + offs, mask=row_ok, other=0.0)
    c_t = tl.load(stats_ptr + 3 * plane + offs, mask=row_ok, other=0.0)
    kl = tl.load(stats_ptr + 4 * plane + offs, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr).to(tl.float32)
    in_range = rows < n_rows
    g_row = offs * L
    for c0 in range(0, L, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L)
        s, t, ok = _load_tile(s_ptr, t_ptr, mask_ptr, s_row, t_row, b, row_ok, cols, L,
                              s_strides, t_strides, mask_strides, HAS_MASK)
        lp_s = (s - mx_s[:, None]) - c_s[:, None]
        lp_t = (t - mx_t[:, None]) - c_t[:, None]
        p_s = tl.where(ok, tl.exp2(lp_s * LOG2E), 0.0)
        p_t = tl.where(ok, tl.exp2(lp_t * LOG2E), 0.0)
        g_off = g_row[:, None] + cols[None, :]
        out = in_range[:, None] & (cols < L)[None, :]
        if NEED_DS:
            tl.store(ds_ptr + g_off, (coef * (p_s - p_t)).to(ds_ptr.dtype.element_ty), mask=out)
        if NEED_DT:
            d_t = coef * p_t * ((lp_t - lp_s) - kl[:, None])
            tl.store(dt_ptr + g_off, tl.where(ok, d_t, 0.0).to(dt_ptr.dtype.element_ty), mask=out)


# --- launchers -----------------------------------------------------------------------------------

def tile(L: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_L, num_warps) of both kernels' [rows, keys] tile."""
    block_rows, block_l = stream_tile(L, max_cols=MAX_BLOCK_L)
    return block_rows, block_l, stream_num_warps(block_rows * block_l)


def stats_shape(student: list[torch.Tensor]) -> tuple[int, int]:
    """Shape of the per-row statistics (fp32): [5, R_total], R_total = query rows of all groups."""
    _, B, H, L, _ = student[0].shape
    return (N_STATS, sum(s.shape[0] for s in student) * B * H * L)


def attention_kl_scores_forward(student: list[torch.Tensor], teacher: list[torch.Tensor],
                                mask: torch.Tensor | None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of KL_i over the valid rows of every group, fp32 scalar; statistics [5, R_total] fp32
    = mx_s, c_s, mx_t, c_t, KL per row, 0 on padded rows).  See the module docstring."""
    _, B, H, L, _ = student[0].shape
    block_rows, block_l, num_warps = tile(L)
    n_rows = [s.shape[0] * B * H * L for s in student]
    grids = [triton.cdiv(r, block_rows) for r in n_rows]
    device = student[0].device
    partials = torch.empty(sum(grids), dtype=torch.float32, device=device)
    stats = torch.empty(stats_shape(student), dtype=torch.float32, device=device)
    mask_t, msb, msj, has_mask = mask_args(mask, partials)
    row0 = p0 = 0
    for s, t, rows, grid in zip(student, teacher, n_rows, grids):
        _kl_scores_fwd_kernel[(grid,)](
            s, t, mask_t, stats[:, row0:], partials[p0:],
            rows, B, H, L, stats.stride(0),
            s.stride(), t.stride(), (msb, msj),
            HAS_MASK=has_mask, BLOCK_ROWS=block_rows, BLOCK_L=block_l, num_warps=num_warps,
        )
        row0 += rows
        p0 += grid
    return partials.sum(), stats


def attention_kl_scores_backward(coef: torch.Tensor, stats: torch.Tensor,
                                 student: list[torch.Tensor], teacher: list[torch.Tensor],
                                 mask: torch.Tensor | None, need_student: bool,
                                 need_teacher: bool
                                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients (contiguous, input dtypes) for each group, for coef = g * c a 0-dim fp32 tensor;
    an empty list where not needed."""
    _, B, H, L, _ = student[0].shape
    block_rows, block_l, num_warps = tile(L)
    mask_t, msb, msj, has_mask = mask_args(mask, coef)
    grads_s, grads_t = [], []
    row0 = 0
    for s, t in zip(student, teacher):
        ds = torch.empty(s.shape, dtype=s.dtype, device=s.device) if need_student else coef
        dt = torch.empty(t.shape, dtype=t.dtype, device=t.device) if need_teacher else coef
        rows = s.shape[0] * B * H * L
        _kl_scores_bwd_kernel[(triton.cdiv(rows, block_rows),)](
            s, t, mask_t, stats[:, row0:], coef, ds, dt,
            rows, B, H, L, stats.stride(0),
            s.stride(), t.stride(), (msb, msj),
            HAS_MASK=has_mask, NEED_DS=need_student, NEED_DT=need_teacher,
            BLOCK_ROWS=block_rows, BLOCK_L=block_l, num_warps=num_warps,
        )
        row0 += rows
        if need_student:
            grads_s.append(ds)
        if need_teacher:
            grads_t.append(dt)
    return grads_s, grads_t
