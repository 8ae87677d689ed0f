"""Triton kernels for TinyBERT's attention loss computed from Q and K, never forming the scores.

Shapes: a "group" holds n mapped layers stacked, Q_s, K_s [n, B, H, L, d_s] (student) and
Q_t, K_t [n, B, H, L, d_t] (teacher), any strides.  Per (layer, batch, head), with the 1/sqrt(d)
of each model folded in (a_s = d_s^-1/2, a_t = d_t^-1/2) and the key-padding mask M = diag(m[b])
(m = 1 for a token, 0 for padding; all ones when absent):

    D    = a_s Q_s K_s^T M - a_t Q_t K_t^T M                  [L, L], the score difference
    loss = scale * sum over (layer, b, h) of ||D||_F^2
    dQ_s =  2 scale g a_s D M K_s      dK_s =  2 scale g a_s M D^T Q_s
    dQ_t = -2 scale g a_t D M K_t      dK_t = -2 scale g a_t M D^T Q_t

with g the incoming gradient, read on the device (no host synchronisation).  Zeroing the padded key
rows of K_s and K_t on load is the whole of the masking; padded query rows are not masked.

Two ways to get there:

"gram"  O(L d^2) work and O(d^2) memory per head.  With X = [a_s Q_s | a_t Q_t] and
        Y = [K_s | -K_t] (both [L, d_s + d_t]), D = X Y^T M, so
            ||D||_F^2 = <G_Q, G_K>_F,   G_Q = X^T X,   G_K = Y^T M Y      ([d_s+d_t]^2 each)
            dX = 2 scale g X G_K,       dY = 2 scale g M Y G_Q
        (dQ_s = a_s dX[:, :d_s], dQ_t = a_t dX[:, d_s:], dK_s = dY[:, :d_s], dK_t = -dY[:, d_s:]).
        Forward: one Gram kernel per side (Q, K) and group, each program reducing a chunk of
        GRAM_ROWS_PER_PROGRAM rows of one head (fp32 accumulation; two operands of one 16-bit
        dtype go through the tensor cores, whose products are exact in fp32), then one kernel that
        sums the chunks and takes the inner product per head in fp64.  Backward: one kernel per
        side and group, [BLOCK_L, d] x [d, d] products in fp32.
        Numerics: the three traces of <G_Q, G_K> cancel when student ~ teacher, so the relative
        error grows like eps_fp32 * ||S||^2 / ||D||^2 (measured figures in
        tinybert_fast/ops/attention_mse_qk.py).
"tiled" O(L^2 d) work and O(L d) memory: flash-attention style, one program per (head, query
        tile) looping over key tiles, D formed tile by tile in registers (two products with fp32
        accumulation, then the difference), never written.  Backward recomputes the tiles: one
        @triton.jit source, `_tiled_bwd_kernel`, specialised by X_IS_Q and launched for dQ (per
        query tile, looping over key tiles) and for dK (per key tile, looping over query tiles),
        no atomics.  Its error is that of the scores themselves, eps_fp32 * ||S|| / ||D||, like
        the score-based path.

Launches: gram forward 2 per group + 1, backward 2 per group; tiled forward 1 per group + one
partial-sum reduction, backward 2 per group (1 when only the Q or only the K gradients are needed).

The tile pieces (head indexing, masked row loads and stores, the fp32 product) are shared with
kernels.attention_kl_qk through kernels._utils.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (MAX_HEAD_DIM, device_arch, dot_block, dot_in_fp32, head_base, head_index,
                     keep_rows, load_rows, mask_args, mm, next_power_of_2, qk_bwd_meta, qk_dims,
                     qk_num_warps, qk_tile_meta, store_rows)

# Rows of one head a Gram program reduces.  Splitting L keeps the grid large when B*H is small
# (B*L fixed, long L); the partial Grams cost n*B*H*ceil(L/512)*(d_s+d_t)^2 fp32.
GRAM_ROWS_PER_PROGRAM = 512
GRAM_BLOCK_L = 64
# ... and when a product runs in full fp32 (FMA units, "ieee"): each thread then holds its operand
# rows over the whole BLOCK_L reduction, which spilled at 64 and 32 rows for d = 128 (ptxas, sm_90:
# 28-80 bytes).
GRAM_FP32_BLOCK_L = 16
# ... with 2 pipeline stages on sm_100: with 3, the fp32 forward spilled 20-36 bytes at 128-168
# registers there (d = 64 beside 26 and 128; ptxas, benchmarks/static.py); 2 stages spilled 4
# bytes on sm_90, where 3 do not.
GRAM_FP32_NUM_STAGES = 2
# Backward: rows per program and the columns of [X1 | X2] (rows of the Gram) per step of its
# fp32 products (on the FMA units: "ieee"), sized so that nothing spills (benchmarks/static.py).
GRAM_BWD_BLOCK_L = 32
GRAM_BWD_BLOCK_K = 16
# ... and when the inputs mix dtypes (a 16-bit student beside an fp32 teacher: each X column
# converted to fp32 in registers before its product): at 32 rows the one-gradient specialisation
# got 72 registers and spilled 4 bytes on sm_100 (ptxas); 16 rows: 48 registers, no spills, 10
# blocks/SM instead of 7.  (BLOCK_K cannot shrink instead: tl.dot's smallest block is 16.)
GRAM_BWD_MIXED_BLOCK_L = 16


# Query/key tiles when a product runs in full fp32 (the FMA units, "ieee"): the FMA path holds
# each thread's operand rows over the whole reduction in registers, and at qk_tile_meta's 64 x 64
# ptxas (sm_90) gave these kernels 32 registers and 11-18 KB of spills at d = 64/128, so the tile
# shrinks with the head width: FP32_TILE_ELEMENTS / BLOCK_D rows (16 x 16 from d = 64 on).  At
# 2048 / BLOCK_D (32 x 32 at d = 64) the backward still spilled 152 bytes on sm_80 and 8-16 on
# sm_90 with a mask, the forward 16 on sm_90 (fp32 student, fp16 teacher).
FP32_TILE_ELEMENTS = 1024
# ... with 2 pipeline stages instead of 3: at 16 x 16 with 3, ptxas left 4-8 bytes of spills at
# 56-128 registers (sm_80: both gradients with a mask; sm_90: the dQ-only backward with a mask).
FP32_NUM_STAGES = 2


def _tile_meta(q_s, k_s, q_t, k_t, L: int, d_s: int, d_t: int) -> dict:
    """qk_tile_meta, with FP32_TILE_ELEMENTS / BLOCK_D query/key tiles for fp32 products."""
    meta = qk_tile_meta(q_s, k_s, q_t, k_t, L, d_s, d_t)
    if q_s[0].device.type == "cpu":  # Triton's interpreter: no registers to spill
        return meta
    if meta["FP32_S"] or meta["FP32_T"]:
        tile = FP32_TILE_ELEMENTS // max(meta["BLOCK_DS"], meta["BLOCK_DT"])
        tile = max(16, min(meta["BLOCK_M"], tile))  # tl.dot's smallest block
        meta.update(BLOCK_M=tile, BLOCK_N=tile, num_stages=FP32_NUM_STAGES)
    return meta


# --- gram path -----------------------------------------------------------------------------------

@triton.jit
def _gram_fwd_kernel(
    # pointers: x1 (student) [n, B, H, L, D1], x2 (teacher) [n, B, H, L, D2], key mask [B, L],
    # out: partial Grams [n*B*H, n_splits, D1+D2, D1+D2] fp32, contiguous
    x1_ptr, x2_ptr, mask_ptr, out_ptr,
    # sizes
    B, H, L, D1, D2, rows_per_split,
    # strides
    x1_stride_n, x1_stride_b, x1_stride_h, x1_stride_l, x1_stride_d,
    x2_stride_n, x2_stride_b, x2_stride_h, x2_stride_l, x2_stride_d,
    mask_stride_b, mask_stride_l,
    # scalars: the column scales of [u1 x1 | u2 x2]
    u1, u2,
    # meta-parameters
    HAS_MASK: tl.constexpr, FP32_11: tl.constexpr, FP32_12: tl.constexpr, FP32_22: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    n, b, h = head_index(bh, B, H)
    x1_base = head_base(n, b, h, x1_stride_n, x1_stride_b, x1_stride_h)
    x2_base = head_base(n, b, h, x2_stride_n, x2_stride_b, x2_stride_h)
    D = D1 + D2
    out = out_ptr + (bh.to(tl.int64) * tl.num_programs(1) + split) * D * D
    row0 = split * rows_per_split
    row_end = tl.minimum(row0 + rows_per_split, L)
    r = tl.arange(0, BLOCK_L)
    c1 = tl.arange(0, BLOCK_D1)
    c2 = tl.arange(0, BLOCK_D2)
    # One block at a time (re-reading the rows, O(L d) traffic) keeps one accumulator live.
    acc11 = tl.zeros((BLOCK_D1, BLOCK_D1), dtype=tl.float32)
    for l0 in range(row0, row_end, BLOCK_L):
        ok = keep_rows(mask_ptr, b, l0 + r, row_end, mask_stride_b, mask_stride_l, HAS_MASK)
        x1 = load_rows(x1_ptr, x1_base, l0 + r, ok, x1_stride_l, x1_stride_d, D1, BLOCK_D1)
        acc11 = mm(tl.trans(x1), x1, acc11, FP32_11)
    tl.store(out + c1[:, None] * D + c1[None, :], acc11 * (u1 * u1),
             mask=(c1 < D1)[:, None] & (c1 < D1)[None, :])
    acc12 = tl.zeros((BLOCK_D1, BLOCK_D2), dtype=tl.float32)
    for l0 in range(row0, row_end, BLOCK_L):
        ok = keep_rows(mask_ptr, b, l0 + r, row_end, mask_stride_b, mask_stride_l, HAS_MASK)
        x1 = load_rows(x1_ptr, x1_base, l0 + r, ok, x1_stride_l, x1_stride_d, D1, BLOCK_D1)
        x2 = load_rows(x2_ptr, x2_base, l0 + r, ok, x2_stride_l, x2_stride_d, D2, BLOCK_D2)
        acc12 = mm(tl.trans(x1), x2, acc12, FP32_12)
    acc12 = acc12 * (u1 * u2)
    ok12 = (c1 < D1)[:, None] & (c2 < D2)[None, :]
    tl.store(out + c1[:, None] * D + (D1 + c2)[None, :], acc12, mask=ok12)
    tl.store(out + (D1 + c2)[None, :] * D + c1[:, None], acc12, mask=ok12)  # the symmetric block
    acc22 = tl.zeros((BLOCK_D2, BLOCK_D2), dtype=tl.float32)
    for l0 in range(row0, row_end, BLOCK_L):
        ok = keep_rows(mask_ptr, b, l0 + r, row_end, mask_stride_b, mask_stride_l, HAS_MASK)
        x2 = load_rows(x2_ptr, x2_base, l0 + r, ok, x2_stride_l, x2_stride_d, D2, BLOCK_D2)
        acc22 = mm(tl.trans(x2), x2, acc22, FP32_22)
    tl.store(out + (D1 + c2)[:, None] * D + (D1 + c2)[None, :], acc22 * (u2 * u2),
             mask=(c2 < D2)[:, None] & (c2 < D2)[None, :])


@triton.jit
def _gram_combine_kernel(
    # pointers: partial [2, N, n_splits, D, D] fp32 (Q side, K side), grams [2, N, D, D] fp32,
    # per_head [N] fp64
    partial_ptr, grams_ptr, per_head_ptr,
    # sizes
    N, n_splits, D,
    # meta-parameters
    WRITE_GRAMS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    DD = D * D
    q_part = partial_ptr + bh.to(tl.int64) * n_splits * DD
    k_part = partial_ptr + (bh.to(tl.int64) + N) * n_splits * DD
    cols = tl.arange(0, BLOCK_D)
    # <G_Q, G_K> is a difference of nearly equal traces when student ~ teacher: fp64 here costs
    # nothing (d^2 products per head) and leaves only the Grams' own rounding.
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float64)
    for r0 in range(0, D, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows < D)[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        gq = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        gk = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for s in range(0, n_splits):
            gq += tl.load(q_part + s * DD + offs, mask=ok, other=0.0)
            gk += tl.load(k_part + s * DD + offs, mask=ok, other=0.0)
        if WRITE_GRAMS:
            tl.store(grams_ptr + bh.to(tl.int64) * DD + offs, gq, mask=ok)
            tl.store(grams_ptr + (bh.to(tl.int64) + N) * DD + offs, gk, mask=ok)
        acc += gq.to(tl.float64) * gk.to(tl.float64)
    tl.store(per_head_ptr + bh, tl.sum(acc))


@triton.jit
def _gram_bwd_side(x1_ptr, x2_ptr, x1_base, x2_base, rows, ok, g, D, off_out, D_OUT, u1, u2,
                   D1, D2, x1_stride_l, x1_stride_d, x2_stride_l, x2_stride_d,
                   BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_OUT: tl.constexpr):
    """[BLOCK_L, BLOCK_OUT] rows of [u1 x1 | u2 x2] G[:, off_out:off_out + D_OUT] in fp32, as a
    loop over BLOCK_K columns of X (and rows of G) at a time."""
    k = tl.arange(0, BLOCK_K)
    c = tl.arange(0, BLOCK_OUT)
    c_ok = (c < D_OUT)[None, :]
    acc = tl.zeros((BLOCK_L, BLOCK_OUT), dtype=tl.float32)
    # X G in fp32: the two products nearly cancel when student ~ teacher, so no 16-bit rounding
    # of G or X before the sum.
    for k0 in range(0, D1, BLOCK_K):
        x = load_rows(x1_ptr, x1_base + k0 * x1_stride_d, rows, ok, x1_stride_l, x1_stride_d,
                      D1 - k0, BLOCK_K).to(tl.float32) * u1
        gk = tl.load(g + (k0 + k)[:, None] * D + (off_out + c)[None, :],
                     mask=(k0 + k < D1)[:, None] & c_ok, other=0.0)
        acc = tl.dot(x, gk, acc, input_precision="ieee")
    for k0 in range(0, D2, BLOCK_K):
        x = load_rows(x2_ptr, x2_base + k0 * x2_stride_d, rows, ok, x2_stride_l, x2_stride_d,
                      D2 - k0, BLOCK_K).to(tl.float32) * u2
        gk = tl.load(g + (D1 + k0 + k)[:, None] * D + (off_out + c)[None, :],
                     mask=(k0 + k < D2)[:, None] & c_ok, other=0.0)
        acc = tl.dot(x, gk, acc, input_precision="ieee")
    return acc


@triton.jit
def _gram_bwd_kernel(
    # pointers: x1, x2 as in the forward; g: the OTHER side's Grams [N, D1+D2, D1+D2] fp32;
    # dx1 [N*L, D1], dx2 [N*L, D2] contiguous, input dtypes
    x1_ptr, x2_ptr, mask_ptr, g_ptr, grad_out_ptr, dx1_ptr, dx2_ptr,
    # sizes
    B, H, L, D1, D2,
    # strides
    x1_stride_n, x1_stride_b, x1_stride_h, x1_stride_l, x1_stride_d,
    x2_stride_n, x2_stride_b, x2_stride_h, x2_stride_l, x2_stride_d,
    mask_stride_b, mask_stride_l,
    # scalars
    u1, u2, scale,
    # meta-parameters
    HAS_MASK: tl.constexpr, NEED_1: tl.constexpr, NEED_2: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D1: tl.constexpr,
    BLOCK_D2: tl.constexpr,
):
    """dx1 = coef u1 [u1 x1 | u2 x2] G[:, :D1] and dx2 = coef u2 [u1 x1 | u2 x2] G[:, D1:] for
    this program's BLOCK_L rows, coef = 2 scale g.  The products run over BLOCK_K columns of X at
    a time (X re-read from L1/L2 per gradient), one accumulator live at a time: holding all of X
    and the [D, D] Gram in registers spilled (ptxas, sm_90: 116-276 bytes at d = 26/64 with both
    gradients, 4.6 KB at d = 128)."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    n, b, h = head_index(bh, B, H)
    # padded key rows load as 0, so their gradient rows come out 0
    ok = keep_rows(mask_ptr, b, rows, L, mask_stride_b, mask_stride_l, HAS_MASK)
    x1_base = head_base(n, b, h, x1_stride_n, x1_stride_b, x1_stride_h)
    x2_base = head_base(n, b, h, x2_stride_n, x2_stride_b, x2_stride_h)
    D = D1 + D2
    g = g_ptr + bh.to(tl.int64) * D * D
    coef = 2.0 * scale * tl.load(grad_out_ptr).to(tl.float32)
    out_rows = bh.to(tl.int64) * L + rows
    in_range = rows < L
    if NEED_1:
        acc = _gram_bwd_side(x1_ptr, x2_ptr, x1_base, x2_base, rows, ok, g, D, 0, D1, u1, u2,
                             D1, D2, x1_stride_l, x1_stride_d, x2_stride_l, x2_stride_d,
                             BLOCK_L, BLOCK_K, BLOCK_D1)
        store_rows(dx1_ptr, out_rows, in_range, D1, acc * (coef * u1), BLOCK_D1)
    if NEED_2:
        acc = _gram_bwd_side(x1_ptr, x2_ptr, x1_base, x2_base, rows, ok, g, D, D1, D2, u1, u2,
                             D1, D2, x1_stride_l, x1_stride_d, x2_stride_l, x2_stride_d,
                             BLOCK_L, BLOCK_K, BLOCK_D2)
        store_rows(dx2_ptr, out_rows, in_range, D2, acc * (coef * u2), BLOCK_D2)


# --- tiled path ----------------------------------------------------------------------------------

@triton.jit
def _score_diff(qs, ks, qt, kt, a_s, a_t, FP32_S: tl.constexpr, FP32_T: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """a_s qs ks^T - a_t qt kt^T for one [BLOCK_M, BLOCK_N] tile, fp32."""
    zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return (mm(qs, tl.trans(ks), zero, FP32_S) * a_s
            - mm(qt, tl.trans(kt), zero, FP32_T) * a_t)


@triton.jit
def _tiled_fwd_kernel(
    # pointers: qs, ks [n, B, H, L, DS]; qt, kt [n, B, H, L, DT]; mask [B, L]; partial fp32
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, mask_ptr, partial_ptr,
    # sizes
    B, H, L, DS, DT,
    # strides
    qs_stride_n, qs_stride_b, qs_stride_h, qs_stride_l, qs_stride_d,
    ks_stride_n, ks_stride_b, ks_stride_h, ks_stride_l, ks_stride_d,
    qt_stride_n, qt_stride_b, qt_stride_h, qt_stride_l, qt_stride_d,
    kt_stride_n, kt_stride_b, kt_stride_h, kt_stride_l, kt_stride_d,
    mask_stride_b, mask_stride_l,
    # scalars
    a_s, a_t,
    # meta-parameters
    HAS_MASK: tl.constexpr, FP32_S: tl.constexpr, FP32_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    n, b, h = head_index(bh, B, H)
    ks_base = head_base(n, b, h, ks_stride_n, ks_stride_b, ks_stride_h)
    kt_base = head_base(n, b, h, kt_stride_n, kt_stride_b, kt_stride_h)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    qs = load_rows(qs_ptr, head_base(n, b, h, qs_stride_n, qs_stride_b, qs_stride_h), rows, row_ok,
                    qs_stride_l, qs_stride_d, DS, BLOCK_DS)
    qt = load_rows(qt_ptr, head_base(n, b, h, qt_stride_n, qt_stride_b, qt_stride_h), rows, row_ok,
                    qt_stride_l, qt_stride_d, DT, BLOCK_DT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, L, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keep_rows(mask_ptr, b, keys, L, mask_stride_b, mask_stride_l, HAS_MASK)
        ks = load_rows(ks_ptr, ks_base, keys, key_ok, ks_stride_l, ks_stride_d, DS, BLOCK_DS)
        kt = load_rows(kt_ptr, kt_base, keys, key_ok, kt_stride_l, kt_stride_d, DT, BLOCK_DT)
        d = _score_diff(qs, ks, qt, kt, a_s, a_t, FP32_S, FP32_T, BLOCK_M, BLOCK_N)
        acc += d * d
    tl.store(partial_ptr + bh * tl.num_programs(1) + pid_m, tl.sum(acc))


@triton.jit
def _tiled_bwd_kernel(
    # pointers: xs, xt the student's and teacher's tensor whose gradient this program computes
    # (Q_s, Q_t when X_IS_Q, else K_s, K_t), ys, yt the other one (K or Q), all [n, B, H, L, d];
    # mask [B, L]; grad_out (0-dim); dxs [N*L, DS], dxt [N*L, DT] contiguous, the inputs' dtypes
    xs_ptr, xt_ptr, ys_ptr, yt_ptr, mask_ptr, grad_out_ptr, dxs_ptr, dxt_ptr,
    # sizes
    B, H, L, DS, DT,
    # strides
    xs_stride_n, xs_stride_b, xs_stride_h, xs_stride_l, xs_stride_d,
    xt_stride_n, xt_stride_b, xt_stride_h, xt_stride_l, xt_stride_d,
    ys_stride_n, ys_stride_b, ys_stride_h, ys_stride_l, ys_stride_d,
    yt_stride_n, yt_stride_b, yt_stride_h, yt_stride_l, yt_stride_d,
    mask_stride_b, mask_stride_l,
    # scalars
    a_s, a_t, scale,
    # meta-parameters: BLOCK_M rows of X per program, BLOCK_N rows of Y per step
    HAS_MASK: tl.constexpr, FP32_S: tl.constexpr, FP32_T: tl.constexpr, X_IS_Q: tl.constexpr,
    NEED_S: tl.constexpr, NEED_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    """dX_s = 2 scale g a_s E Y_s and dX_t = -2 scale g a_t E Y_t for this program's BLOCK_M rows
    of X, with E = D M (X = Q, Y = K: dQ per query tile) or E = M D^T (X = K, Y = Q: dK per key
    tile), the score-difference tiles recomputed from the loop's rows of Y."""
    bh = tl.program_id(0)
    n, b, h = head_index(bh, B, H)
    ys_base = head_base(n, b, h, ys_stride_n, ys_stride_b, ys_stride_h)
    yt_base = head_base(n, b, h, yt_stride_n, yt_stride_b, yt_stride_h)
    xr = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    # The key mask is the whole of the masking (padded query rows are not masked): on the loop's
    # rows for dQ, on this program's rows for dK, whose padded keys then load as 0, so D^T's rows
    # and the gradient rows for them come out 0.
    if X_IS_Q:
        x_ok = xr < L
    else:
        x_ok = keep_rows(mask_ptr, b, xr, L, mask_stride_b, mask_stride_l, HAS_MASK)
    xs = load_rows(xs_ptr, head_base(n, b, h, xs_stride_n, xs_stride_b, xs_stride_h), xr, x_ok,
                   xs_stride_l, xs_stride_d, DS, BLOCK_DS)
    xt = load_rows(xt_ptr, head_base(n, b, h, xt_stride_n, xt_stride_b, xt_stride_h), xr, x_ok,
                   xt_stride_l, xt_stride_d, DT, BLOCK_DT)
    acc_s = tl.zeros((BLOCK_M, BLOCK_DS), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_M, BLOCK_DT), dtype=tl.float32)
    for y0 in range(0, L, BLOCK_N):
        yr = y0 + tl.arange(0, BLOCK_N)
        if X_IS_Q:
            y_ok = keep_rows(mask_ptr, b, yr, L, mask_stride_b, mask_stride_l, HAS_MASK)
        else:
            y_ok = yr < L
        ys = load_rows(ys_ptr, ys_base, yr, y_ok, ys_stride_l, ys_stride_d, DS, BLOCK_DS)
        yt = load_rows(yt_ptr, yt_base, yr, y_ok, yt_stride_l, yt_stride_d, DT, BLOCK_DT)
        e = _score_diff(xs, ys, xt, yt, a_s, a_t, FP32_S, FP32_T, BLOCK_M, BLOCK_N)  # D or D^T
        if NEED_S:
            acc_s = mm(e, ys, acc_s, FP32_S)
        if NEED_T:
            acc_t = mm(e, yt, acc_t, FP32_T)
    coef = 2.0 * scale * tl.load(grad_out_ptr).to(tl.float32)
    out_rows = bh.to(tl.int64) * L + xr
    if NEED_S:
        store_rows(dxs_ptr, out_rows, xr < L, DS, acc_s * (coef * a_s), BLOCK_DS)
    if NEED_T:
        store_rows(dxt_ptr, out_rows, xr < L, DT, acc_t * (-coef * a_t), BLOCK_DT)


# --- launchers -----------------------------------------------------------------------------------

def gram_workspace_shape(N: int, L: int, d_s: int, d_t: int) -> tuple[int, ...]:
    """Shape of the forward's partial-Gram buffer (fp32): [2, N, n_splits, D, D]."""
    D = d_s + d_t
    return (2, N, triton.cdiv(L, GRAM_ROWS_PER_PROGRAM), D, D)


def gram_forward(q_s, k_s, q_t, k_t, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (fp32 scalar) and the Grams [2, N, D, D] fp32 (G_Q then G_K per head, N heads over all
    groups, D = d_s + d_t) kept for backward; see the module docstring."""
    B, H, L, d_s, d_t, heads = qk_dims(q_s, q_t)
    N, D = sum(heads), d_s + d_t
    device = q_s[0].device
    dtypes = {x[0].dtype for x in (q_s, k_s, q_t, k_t)}
    # (on CPU, Triton's interpreter, nothing spills: the 16-bit rows then)
    fp32 = device.type != "cpu" and any(dot_in_fp32(a, b, device) for a in dtypes for b in dtypes)
    block_l = dot_block(L, GRAM_FP32_BLOCK_L if fp32 else GRAM_BLOCK_L)
    stages = GRAM_FP32_NUM_STAGES if fp32 and (device_arch(device) or 0) >= 100 else 3
    bd1, bd2 = dot_block(d_s, MAX_HEAD_DIM), dot_block(d_t, MAX_HEAD_DIM)
    partial = torch.empty(gram_workspace_shape(N, L, d_s, d_t), dtype=torch.float32, device=device)
    n_splits = partial.shape[2]
    mask_t, msb, msl, has_mask = mask_args(mask, partial)
    a_s, a_t = d_s ** -0.5, d_t ** -0.5
    sides = ((q_s, q_t, a_s, a_t, False), (k_s, k_t, 1.0, -1.0, has_mask))
    for side, (x1s, x2s, u1, u2, side_mask) in enumerate(sides):
        start = 0
        for x1, x2, n_heads in zip(x1s, x2s, heads):
            _gram_fwd_kernel[(n_heads, n_splits)](
                x1, x2, mask_t, partial[side, start:],
                B, H, L, d_s, d_t, GRAM_ROWS_PER_PROGRAM,
                *x1.stride(), *x2.stride(), msb, msl,
                u1, u2,
                HAS_MASK=side_mask, FP32_11=dot_in_fp32(x1.dtype, x1.dtype, device),
                FP32_12=dot_in_fp32(x1.dtype, x2.dtype, device),
                FP32_22=dot_in_fp32(x2.dtype, x2.dtype, device),
                BLOCK_L=block_l, BLOCK_D1=bd1, BLOCK_D2=bd2, num_warps=qk_num_warps(bd1, bd2),
                num_stages=stages,
            )
            start += n_heads
    # one chunk per head: the partial buffer already holds the Grams
    write = n_splits > 1
    grams = (torch.empty((2, N, D, D), dtype=torch.float32, device=device) if write
             else partial.view(2, N, D, D))
    per_head = torch.empty(N, dtype=torch.float64, device=device)
    block_d = next_power_of_2(D)
    _gram_combine_kernel[(N,)](
        partial, grams, per_head, N, n_splits, D,
        WRITE_GRAMS=write, BLOCK_R=max(1, 2048 // block_d), BLOCK_D=block_d, num_warps=4,
    )
    return (per_head.sum() * scale).to(torch.float32), grams


def gram_backward(grad_out, grams, q_s, k_s, q_t, k_t, mask, scale: float, need: tuple):
    """Gradients (contiguous, input dtypes) [dq_s, dk_s, dq_t, dk_t], each a list over groups
    (empty where not needed).  need: (q_s, k_s, q_t, k_t) flags."""
    B, H, L, d_s, d_t, heads = qk_dims(q_s, q_t)
    # (on CPU, Triton's interpreter, nothing spills: the same rows for every dtype)
    mixed = (q_s[0].device.type != "cpu"
             and len({x[0].dtype for x in (q_s, k_s, q_t, k_t)}) > 1)
    block_l = dot_block(L, GRAM_BWD_MIXED_BLOCK_L if mixed else GRAM_BWD_BLOCK_L)
    bd1, bd2 = dot_block(d_s, MAX_HEAD_DIM), dot_block(d_t, MAX_HEAD_DIM)
    mask_t, msb, msl, has_mask = mask_args(mask, grad_out)
    a_s, a_t = d_s ** -0.5, d_t ** -0.5
    need_qs, need_ks, need_qt, need_kt = need
    out = [[], [], [], []]
    # Q side: dX = 2 c g X G_K; K side: dY = 2 c g M Y G_Q
    sides = ((q_s, q_t, a_s, a_t, False, grams[1], need_qs, need_qt, 0),
             (k_s, k_t, 1.0, -1.0, has_mask, grams[0], need_ks, need_kt, 1))
    for x1s, x2s, u1, u2, side_mask, g, need1, need2, slot in sides:
        if not (need1 or need2):
            continue
        start = 0
        for x1, x2, n_heads in zip(x1s, x2s, heads):
            dx1 = torch.empty(x1.shape, dtype=x1.dtype, device=x1.device) if need1 else grad_out
            dx2 = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device) if need2 else grad_out
            _gram_bwd_kernel[(n_heads, triton.cdiv(L, block_l))](
                x1, x2, mask_t, g[start:], grad_out, dx1, dx2,
                B, H, L, d_s, d_t,
                *x1.stride(), *x2.stride(), msb, msl,
                u1, u2, scale,
                HAS_MASK=side_mask, NEED_1=need1, NEED_2=need2,
                BLOCK_L=block_l, BLOCK_K=GRAM_BWD_BLOCK_K, BLOCK_D1=bd1, BLOCK_D2=bd2,
                num_warps=qk_num_warps(bd1, bd2),
            )
            start += n_heads
            if need1:
                out[slot].append(dx1)
            if need2:
                out[slot + 2].append(dx2)
    return out


def tiled_forward(q_s, k_s, q_t, k_t, mask, scale: float) -> torch.Tensor:
    """Loss (fp32 scalar); see the module docstring."""
    B, H, L, d_s, d_t, heads = qk_dims(q_s, q_t)
    meta = _tile_meta(q_s, k_s, q_t, k_t, L, d_s, d_t)
    n_m = triton.cdiv(L, meta["BLOCK_M"])
    partials = torch.empty(sum(heads) * n_m, dtype=torch.float32, device=q_s[0].device)
    mask_t, msb, msl, has_mask = mask_args(mask, partials)
    start = 0
    for qs, ks, qt, kt, n_heads in zip(q_s, k_s, q_t, k_t, heads):
        _tiled_fwd_kernel[(n_heads, n_m)](
            qs, ks, qt, kt, mask_t, partials[start * n_m:],
            B, H, L, d_s, d_t,
            *qs.stride(), *ks.stride(), *qt.stride(), *kt.stride(), msb, msl,
            d_s ** -0.5, d_t ** -0.5,
            HAS_MASK=has_mask, **meta,
        )
        start += n_heads
    return partials.sum() * scale


def tiled_backward(grad_out, q_s, k_s, q_t, k_t, mask, scale: float, need: tuple):
    """As gram_backward, recomputing the score-difference tiles: `_tiled_bwd_kernel` once for
    dQ_s / dQ_t (X_IS_Q) and once for dK_s / dK_t, per group, each only when needed."""
    B, H, L, d_s, d_t, heads = qk_dims(q_s, q_t)
    meta = _tile_meta(q_s, k_s, q_t, k_t, L, d_s, d_t)
    mask_t, msb, msl, has_mask = mask_args(mask, grad_out)
    out = [[], [], [], []]
    # dQ then dK: X = (q_s, k_s, q_t, k_t)[slot] (student) and [slot + 2] (teacher), Y = the other
    # of Q and K; a dK program holds a key tile (BLOCK_N) and steps over query tiles (BLOCK_M)
    for slot in (0, 1):
        xy = (slot, slot + 2, 1 - slot, 3 - slot)
        need_s, need_t = need[slot], need[slot + 2]
        if not (need_s or need_t):
            continue
        launch_meta = qk_bwd_meta(meta, need_s, need_t, q_s[0].device, wide_below=100)
        block_x, block_y = ((launch_meta["BLOCK_M"], launch_meta["BLOCK_N"]) if slot == 0
                            else (launch_meta["BLOCK_N"], launch_meta["BLOCK_M"]))
        tile_meta = dict(launch_meta, BLOCK_M=block_x, BLOCK_N=block_y)
        for group, n_heads in zip(zip(q_s, k_s, q_t, k_t), heads):
            x_s, x_t = group[slot], group[slot + 2]
            ds = torch.empty(x_s.shape, dtype=x_s.dtype, device=x_s.device) if need_s \
                else grad_out
            dt = torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device) if need_t \
                else grad_out
            _tiled_bwd_kernel[(n_heads, triton.cdiv(L, block_x))](
                *(group[i] for i in xy), mask_t, grad_out, ds, dt,
                B, H, L, d_s, d_t,
                *(st for i in xy for st in group[i].stride()), msb, msl,
                d_s ** -0.5, d_t ** -0.5, scale,
                HAS_MASK=has_mask, X_IS_Q=slot == 0, NEED_S=need_s, NEED_T=need_t, **tile_meta,
            )
            if need_s:
                out[slot].append(ds)
            if need_t:
                out[slot + 2].append(dt)
    return out
