"""Triton kernels for MiniLM's attention-distribution KL computed from Q and K, never forming the
attention maps.

Shapes: a "group" holds n mapped layers stacked, Q_s, K_s [n, B, H, L, d_s] (student) and
Q_t, K_t [n, B, H, L, d_t] (teacher), any strides.  Per (layer, batch, head), with the 1/sqrt(d)
of each model (a_s = d_s^-1/2, a_t = d_t^-1/2) and the token mask m[b] (1 = token, 0 = padding;
all ones when absent), for query rows i and keys j:

    S_x    = a_x Q_x K_x^T                                  [L, L] (x = s, t), never written
    lse_x  = log sum_{j: m[b,j]=1} exp(S_x,ij)               per row
    P_x    = exp(S_x - lse_x) on the tokens j, 0 on padded keys
    KL_i   = sum_j P_t,ij (log P_t,ij - log P_s,ij)
           = lse_s,i - lse_t,i + sum_j P_t,ij (S_t,ij - S_s,ij)
    kl_sum = sum over (layer, b, h) and the rows with m[b, i] = 1 of KL_i

and, with coef = g * c (the incoming gradient times the reduction scale, a 0-dim fp32 tensor the
kernels load: no host synchronisation), on valid rows i and keys j (0 elsewhere):

    dS_s = coef (P_s - P_t)
    dS_t = coef P_t ((log P_t - log P_s) - KL_i)
    dQ_x = a_x dS_x K_x        dK_x = a_x dS_x^T Q_x

Forward: one program per (head, query tile) looping over key tiles, with an online softmax for
both distributions at once: running maxima and sums for s and t, and w = sum_j exp(S_t - m_t) *
(S_t - S_s), rescaled with the teacher's sum whenever m_t grows, so KL_i = lse_s - lse_t + w / l_t
at the end.  fp32 accumulation, base-2 exponentials.  It writes per-row statistics [3, N, L] fp32
(lse_s, lse_t, KL for the N = n*B*H heads of all groups; 0 on padded query rows) and one partial
sum per program, reduced afterwards.  Backward recomputes P from the saved lse: one kernel for
dQ_s / dQ_t (per query tile, looping over key tiles) and one for dK_s / dK_t (per key tile,
looping over query tiles), no atomics: one @triton.jit source, `_kl_bwd_kernel`, specialised by
X_IS_Q (dX = dS Y with X = Q, Y = K, or dS^T with X = K, Y = Q).  Nothing of size L^2 is written.

Strides are passed as one tuple per tensor (5 for an [n, B, H, L, d] tensor, 2 for the mask).

Numerics: the KL of a row is a difference of O(|S|) terms (lse_s - lse_t against w / l_t), so its
absolute error is ~eps_fp32 * max|S| (a student equal to its teacher gives exactly 0).  Products
go through `mm` (kernels._utils): full fp32 ("ieee") for fp32 operands, the tensor cores for two
16-bit operands of one dtype, dS then rounded to that dtype for dS K and dS^T Q (as
flash-attention does).
Padded keys enter the running maxima as -inf and the maxima start at a finite floor, so a key
tile with no token (left padding, holes in the mask) adds nothing and never makes a NaN.  A row
without any token key exists only in a sequence without tokens, whose query rows are all padded:
excluded.

Launches: forward 1 per group + one partial-sum reduction; backward 2 per group (1 when only the
Q or only the K gradients are needed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (LN2, LOG2E, device_arch, head_base, head_index, keep_rows, load_rows,
                     mask_args, mm, qk_bwd_meta, qk_dims, qk_tile_meta, store_rows)

# Start of the running maxima (base-2 units).  Finite, so that a key tile with no token leaves the
# rescaling factors at exp2(0) = 1 instead of exp2(-inf + inf) = NaN; far below any real score.
M_FLOOR = tl.constexpr(-1.0e30)


# Query/key tiles where qk_tile_meta's 64 x 64 spilled (ptxas, sm_90, benchmarks/static.py).
# Full fp32 products (the FMA units, "ieee") hold each thread's operand rows over the whole
# reduction in registers: 32 registers and 20-34 KB of spills at d = 64 and 128, so their tile
# shrinks with the head width, FP32_TILE_ELEMENTS / BLOCK_D rows (16 x 16 from d = 64 on); at
# 2048 / BLOCK_D (32 x 32 at d = 64) they still spilled 4-32 bytes on sm_80, 12 on sm_90 and
# 12-32 on sm_100 (a 16-bit student beside an fp32 teacher).  16-bit products on heads wider
# than 64 with both gradients spilled 40-112 bytes at 64: HALF_WIDE_TILE.
FP32_TILE_ELEMENTS = 1024
HALF_WIDE_TILE = 32
HALF_WIDE_FWD_TILE = 16  # the forward's on sm_100 (see attention_kl_forward)
# (num_warps, num_stages) of the fp32 16 x 16 tiles per target (sm_80, sm_90, sm_100 and up).
# ptxas left 4-16 bytes of spills at 56-96 registers on some of them in every single choice
# tried for all three targets -- (4, 3), (4, 2), (4, 1), (8, 3), (8, 2), (2, 3) -- each on a
# different specialisation (d = 64 or 128, mask, X_IS_Q), so each target takes one without:
# sm_80 (8, 3), sm_90 (4, 1), sm_100 (8, 2) (benchmarks/static.py, the full tables; on sm_90
# (4, 2) spilled 12 bytes at d = 64 / 26, (4, 3) 8 at d = 128, (8, 2) 4 and (8, 3) 8 at
# d = 26 / 64).
FP32_LAUNCH = {80: (8, 3), 90: (4, 1), 100: (8, 2)}


def _fp32_launch(arch: int | None) -> tuple[int, int]:
    """FP32_LAUNCH's (num_warps, num_stages) for a compute capability (sm_90's when unknown)."""
    if arch is None:
        return FP32_LAUNCH[90]
    return FP32_LAUNCH[100 if arch >= 100 else 90 if arch >= 90 else 80]


def _tile_meta(q_s, k_s, q_t, k_t, L: int, d_s: int, d_t: int) -> dict:
    """qk_tile_meta, with smaller query/key tiles for fp32 products and for heads > 64 wide."""
    meta = qk_tile_meta(q_s, k_s, q_t, k_t, L, d_s, d_t)
    if q_s[0].device.type == "cpu":  # Triton's interpreter: no registers to spill
        return meta
    block_d = max(meta["BLOCK_DS"], meta["BLOCK_DT"])
    if meta["FP32_S"] or meta["FP32_T"]:
        tile = FP32_TILE_ELEMENTS // block_d
    else:
        tile = HALF_WIDE_TILE if block_d > 64 else meta["BLOCK_M"]
    tile = max(16, min(meta["BLOCK_M"], tile))  # tl.dot's smallest block
    meta.update(BLOCK_M=tile, BLOCK_N=tile)
    if meta["FP32_S"] or meta["FP32_T"]:
        warps, stages = _fp32_launch(device_arch(q_s[0].device))
        meta.update(num_warps=warps, num_stages=stages)
    return meta


@triton.jit
def _program_tile(B, H, BLOCK: tl.constexpr):
    """(flattened head bh, its layer, batch and head, this program's BLOCK rows) on a
    (head, row tile) grid."""
    bh = tl.program_id(0)
    n, b, h = head_index(bh, B, H)
    return bh, n, b, h, tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _tokens(mask_ptr, mask_strides, b, rows, L, HAS_MASK: tl.constexpr):
    """rows < L, and m[b, row] != 0 (the token mask, strides a 2-tuple)."""
    return keep_rows(mask_ptr, b, rows, L, mask_strides[0], mask_strides[1], HAS_MASK)


@triton.jit
def _head_rows(ptr, strides, n, b, h, rows, ok, D, BLOCK_D: tl.constexpr):
    """[BLOCK_ROWS, BLOCK_D] tile of head (n, b, h) of an [n, B, H, L, D] tensor (strides a
    5-tuple); 0 outside ok and D."""
    base = head_base(n, b, h, strides[0], strides[1], strides[2])
    return load_rows(ptr, base, rows, ok, strides[3], strides[4], D, BLOCK_D)


@triton.jit
def _scores(xs, ys, xt, yt, u_s, u_t, FP32_S: tl.constexpr, FP32_T: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(u_s xs ys^T, u_t xt yt^T) for one [BLOCK_M, BLOCK_N] tile, fp32."""
    zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return mm(xs, tl.trans(ys), zero, FP32_S) * u_s, mm(xt, tl.trans(yt), zero, FP32_T) * u_t


@triton.jit
def _grad_scores(z_s, z_t, lse_s, lse_t, kl, ok):
    """dS_s / coef = P_s - P_t and dS_t / coef = P_t (log P_t - log P_s - KL) on one tile, 0
    outside `ok`.  z_x: scores in base-2 units (S_x * log2 e); lse_x, kl: natural units, shaped to
    broadcast along the key axis."""
    lp_s = z_s - lse_s * LOG2E  # log2 P_s
    lp_t = z_t - lse_t * LOG2E
    p_s = tl.where(ok, tl.exp2(lp_s), 0.0)
    p_t = tl.where(ok, tl.exp2(lp_t), 0.0)
    return p_s - p_t, p_t * ((lp_t - lp_s) * LN2 - kl)


@triton.jit
def _load_stats(stats_ptr, bh, rows, row_ok, L, plane):
    """(lse_s, lse_t, KL) of rows of head bh from the [3, N, L] statistics; 0 outside row_ok."""
    offs = bh.to(tl.int64) * L + rows.to(tl.int64)
    lse_s = tl.load(stats_ptr + offs, mask=row_ok, other=0.0)
    lse_t = tl.load(stats_ptr + plane + offs, mask=row_ok, other=0.0)
    kl = tl.load(stats_ptr + 2 * plane + offs, mask=row_ok, other=0.0)
    return lse_s, lse_t, kl


@triton.jit
def _kl_fwd_kernel(
    # pointers: qs, ks [n, B, H, L, DS]; qt, kt [n, B, H, L, DT]; mask [B, L];
    # stats [3, N, L] fp32 (from this group's first head on); partial fp32
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, mask_ptr, stats_ptr, partial_ptr,
    # sizes (plane = N * L, the distance between two statistics)
    B, H, L, DS, DT, plane,
    # strides (tuples)
    qs_strides, ks_strides, qt_strides, kt_strides, mask_strides,
    # scalars
    a_s, a_t,
    # meta-parameters
    HAS_MASK: tl.constexpr, FP32_S: tl.constexpr, FP32_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    bh, n, b, h, rows = _program_tile(B, H, BLOCK_M)
    # the query mask is the key mask: padded query rows are not even loaded
    row_ok = _tokens(mask_ptr, mask_strides, b, rows, L, HAS_MASK)
    qs = _head_rows(qs_ptr, qs_strides, n, b, h, rows, row_ok, DS, BLOCK_DS)
    qt = _head_rows(qt_ptr, qt_strides, n, b, h, rows, row_ok, DT, BLOCK_DT)
    u_s = a_s * LOG2E  # scores straight into base-2 exponent units
    u_t = a_t * LOG2E
    m_s = tl.full((BLOCK_M,), M_FLOOR, tl.float32)
    m_t = tl.full((BLOCK_M,), M_FLOOR, tl.float32)
    l_s = tl.zeros((BLOCK_M,), tl.float32)
    l_t = tl.zeros((BLOCK_M,), tl.float32)
    w = tl.zeros((BLOCK_M,), tl.float32)  # sum_j exp2(z_t - m_t) * (z_t - z_s), rescaled with l_t
    for n0 in range(0, L, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = _tokens(mask_ptr, mask_strides, b, keys, L, HAS_MASK)
        ks = _head_rows(ks_ptr, ks_strides, n, b, h, keys, key_ok, DS, BLOCK_DS)
        kt = _head_rows(kt_ptr, kt_strides, n, b, h, keys, key_ok, DT, BLOCK_DT)
        z_s, z_t = _scores(qs, ks, qt, kt, u_s, u_t, FP32_S, FP32_T, BLOCK_M, BLOCK_N)
        x_s = tl.where(key_ok[None, :], z_s, float("-inf"))
        x_t = tl.where(key_ok[None, :], z_t, float("-inf"))
        m_s_new = tl.maximum(m_s, tl.max(x_s, axis=1))
        l_s = l_s * tl.exp2(m_s - m_s_new) + tl.sum(tl.exp2(x_s - m_s_new[:, None]), axis=1)
        m_s = m_s_new
        m_t_new = tl.maximum(m_t, tl.max(x_t, axis=1))
        alpha = tl.exp2(m_t - m_t_new)
        e = tl.exp2(x_t - m_t_new[:, None])  # 0 on padded keys, where z_s, z_t are finite (0)
        l_t = l_t * alpha + tl.sum(e, axis=1)
        w = w * alpha + tl.sum(e * (z_t - z_s), axis=1)
        m_t = m_t_new
    # l_x > 0 on every row with a token key; the guard only keeps the (excluded) rows of a
    # sequence without tokens finite
    lse_s = m_s + tl.log2(tl.where(l_s > 0, l_s, 1.0))
    lse_t = m_t + tl.log2(tl.where(l_t > 0, l_t, 1.0))
    kl = (lse_s - lse_t + w / tl.where(l_t > 0, l_t, 1.0)) * LN2
    kl = tl.where(row_ok, kl, 0.0)
    offs = bh.to(tl.int64) * L + rows.to(tl.int64)
    in_range = rows < L
    tl.store(stats_ptr + offs, tl.where(row_ok, lse_s * LN2, 0.0), mask=in_range)
    tl.store(stats_ptr + plane + offs, tl.where(row_ok, lse_t * LN2, 0.0), mask=in_range)
    tl.store(stats_ptr + 2 * plane + offs, kl, mask=in_range)
    tl.store(partial_ptr + bh * tl.num_programs(1) + tl.program_id(1), tl.sum(kl))


@triton.jit
def _kl_bwd_kernel(
    # pointers: xs, xt the student's and teacher's tensor whose gradient this program computes
    # (Q_s, Q_t when X_IS_Q, else K_s, K_t), ys, yt the other one (K or Q); mask, stats as the
    # forward; coef 0-dim fp32; dxs [N*L, DS], dxt [N*L, DT] contiguous, the inputs' dtypes
    xs_ptr, xt_ptr, ys_ptr, yt_ptr, mask_ptr, stats_ptr, coef_ptr, dxs_ptr, dxt_ptr,
    # sizes
    B, H, L, DS, DT, plane,
    # strides (tuples)
    xs_strides, xt_strides, ys_strides, yt_strides, mask_strides,
    # scalars
    a_s, a_t,
    # meta-parameters: BLOCK_M rows of X per program, BLOCK_N rows of Y per step
    HAS_MASK: tl.constexpr, FP32_S: tl.constexpr, FP32_T: tl.constexpr, X_IS_Q: tl.constexpr,
    NEED_S: tl.constexpr, NEED_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    bh, n, b, h, xr = _program_tile(B, H, BLOCK_M)
    x_ok = _tokens(mask_ptr, mask_strides, b, xr, L, HAS_MASK)
    xs = _head_rows(xs_ptr, xs_strides, n, b, h, xr, x_ok, DS, BLOCK_DS)
    xt = _head_rows(xt_ptr, xt_strides, n, b, h, xr, x_ok, DT, BLOCK_DT)
    if X_IS_Q:  # this program's query rows: their statistics once
        lse_s, lse_t, kl = _load_stats(stats_ptr, bh, xr, x_ok, L, plane)
    acc_s = tl.zeros((BLOCK_M, BLOCK_DS), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_M, BLOCK_DT), dtype=tl.float32)
    for y0 in range(0, L, BLOCK_N):
        yr = y0 + tl.arange(0, BLOCK_N)
        y_ok = _tokens(mask_ptr, mask_strides, b, yr, L, HAS_MASK)
        ys = _head_rows(ys_ptr, ys_strides, n, b, h, yr, y_ok, DS, BLOCK_DS)
        yt = _head_rows(yt_ptr, yt_strides, n, b, h, yr, y_ok, DT, BLOCK_DT)
        # the [X, Y] tile: S for dQ, S^T for dK
        z_s, z_t = _scores(xs, ys, xt, yt, a_s * LOG2E, a_t * LOG2E, FP32_S, FP32_T,
                           BLOCK_M, BLOCK_N)
        ok = x_ok[:, None] & y_ok[None, :]
        if X_IS_Q:
            ds_s, ds_t = _grad_scores(z_s, z_t, lse_s[:, None], lse_t[:, None], kl[:, None], ok)
        else:  # the loop's query rows
            q_lse_s, q_lse_t, q_kl = _load_stats(stats_ptr, bh, yr, y_ok, L, plane)
            ds_s, ds_t = _grad_scores(z_s, z_t, q_lse_s[None, :], q_lse_t[None, :],
                                      q_kl[None, :], ok)
        if NEED_S:
            acc_s = mm(ds_s, ys, acc_s, FP32_S)
        if NEED_T:
            acc_t = mm(ds_t, yt, acc_t, FP32_T)
    coef = tl.load(coef_ptr).to(tl.float32)
    out_rows = bh.to(tl.int64) * L + xr
    # padded rows of X (queries or keys): dS is 0 there, so they store 0
    if NEED_S:
        store_rows(dxs_ptr, out_rows, xr < L, DS, acc_s * (coef * a_s), BLOCK_DS)
    if NEED_T:
        store_rows(dxt_ptr, out_rows, xr < L, DT, acc_t * (coef * a_t), BLOCK_DT)


# --- launchers -----------------------------------------------------------------------------------

def stats_shape(q_s: list[torch.Tensor]) -> tuple[int, int, int]:
    """Shape of the per-row statistics (fp32): [3, N, L], N = heads over all groups."""
    _, B, H, L, _ = q_s[0].shape
    return (3, sum(x.shape[0] for x in q_s) * B * H, L)


def attention_kl_forward(q_s, k_s, q_t, k_t, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of KL_i over the valid rows of every head, fp32 scalar; statistics [3, N, L] fp32 =
    lse_s, lse_t, KL per row, 0 on padded query rows).  See the module docstring."""
    B, H, L, d_s, d_t, heads = qk_dims(q_s, q_t)
    meta = _tile_meta(q_s, k_s, q_t, k_t, L, d_s, d_t)
    if ((device_arch(q_s[0].device) or 0) >= 100 and not (meta["FP32_S"] or meta["FP32_T"])
            and max(meta["BLOCK_DS"], meta["BLOCK_DT"]) > 64):
        # sm_100, 16-bit products on heads wider than 64: HALF_WIDE_FWD_TILE (HALF_WIDE_TILE
        # spilled 12 bytes at 128 registers there with a mask; not on sm_80 or sm_90)
        meta = dict(meta, BLOCK_M=HALF_WIDE_FWD_TILE, BLOCK_N=HALF_WIDE_FWD_TILE)
    n_m = triton.cdiv(L, meta["BLOCK_M"])
    device = q_s[0].device
    partials = torch.empty(sum(heads) * n_m, dtype=torch.float32, device=device)
    stats = torch.empty(stats_shape(q_s), dtype=torch.float32, device=device)
    mask_t, msb, msl, has_mask = mask_args(mask, partials)
    start = 0
    for qs, ks, qt, kt, n_heads in zip(q_s, k_s, q_t, k_t, heads):
        _kl_fwd_kernel[(n_heads, n_m)](
            qs, ks, qt, kt, mask_t, stats[:, start:], partials[start * n_m:],
            B, H, L, d_s, d_t, stats[0].numel(),
            qs.stride(), ks.stride(), qt.stride(), kt.stride(), (msb, msl),
            d_s ** -0.5, d_t ** -0.5,
            HAS_MASK=has_mask, **meta,
        )
        start += n_heads
    return partials.sum(), stats


def attention_kl_backward(coef, stats, q_s, k_s, q_t, k_t, mask, need: tuple):
    """Gradients (contiguous, input dtypes) [dq_s, dk_s, dq_t, dk_t], each a list over groups
    (empty where not needed), for coef = g * c a 0-dim fp32 tensor.  need: (q_s, k_s, q_t, k_t)
    flags."""
    B, H, L, d_s, d_t, heads = qk_dims(q_s, q_t)
    meta = _tile_meta(q_s, k_s, q_t, k_t, L, d_s, d_t)
    mask_t, msb, msl, has_mask = mask_args(mask, coef)
    out = [[], [], [], []]
    # dQ then dK: X = (q_s, k_s, q_t, k_t)[slot] (student) and [slot + 2] (teacher), Y = the other
    # of Q and K
    for slot in (0, 1):
        xy = (slot, slot + 2, 1 - slot, 3 - slot)
        if not (need[slot] or need[slot + 2]):
            continue
        launch_meta = qk_bwd_meta(meta, need[slot], need[slot + 2], q_s[0].device,
                                  wide_below=90)
        n_tiles = triton.cdiv(L, launch_meta["BLOCK_M"])
        start = 0
        for group, n_heads in zip(zip(q_s, k_s, q_t, k_t), heads):
            grads = {i: torch.empty(group[i].shape, dtype=group[i].dtype, device=group[i].device)
                     for i in xy[:2] if need[i]}
            _kl_bwd_kernel[(n_heads, n_tiles)](
                *(group[i] for i in xy), mask_t, stats[:, start:], coef,
                grads.get(slot, coef), grads.get(slot + 2, coef),
                B, H, L, d_s, d_t, stats[0].numel(),
                *(group[i].stride() for i in xy), (msb, msl),
                d_s ** -0.5, d_t ** -0.5,
                HAS_MASK=has_mask, X_IS_Q=slot == 0, NEED_S=need[slot], NEED_T=need[slot + 2],
                **launch_meta,
            )
            start += n_heads
            for i, g in grads.items():
                out[i].append(g)
    return out
