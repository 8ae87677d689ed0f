"""Helpers shared by the kernel families: block-size choice, Triton dtype handling, the mask
arguments, and the tile pieces of the two families from Q and K (attention_qk, attention_kl).

Kept in one place so that every family picks its tiles the same way and no family imports
another.  The constants of the loss semantics (the -100 threshold, ...) are not here but in
tinybert_fast._semantics, which the eager reference reads too.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Natural log <-> base 2: the online softmaxes run on exp2/log2 (one MUFU instruction each).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Elements one program of a streaming (memory-bound) kernel touches per tile.  4096 elements of
# bf16 is 8 KiB per operand: enough loads in flight per SM on Hopper without spilling registers.
STREAM_TILE_ELEMENTS = 4096
# Narrowest column block a 2-D tile uses: keeps rows of tiny C (2 or 3 classes) from turning into
# one-element programs.
MIN_BLOCK_COLS = 16


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return triton.next_power_of_2(max(int(n), 1))


def stream_tile(n_cols: int, max_cols: int = 8192) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) for a streaming 2-D tile over rows of `n_cols` columns.

    BLOCK_COLS covers a whole row when it fits under `max_cols` (the kernel then needs no column
    loop); BLOCK_ROWS fills the tile up to STREAM_TILE_ELEMENTS.
    """
    block_cols = min(max(next_power_of_2(n_cols), MIN_BLOCK_COLS), max_cols)
    block_rows = max(1, STREAM_TILE_ELEMENTS // block_cols)
    return block_rows, block_cols


def stream_num_warps(tile_elements: int) -> int:
    """Warps for a streaming tile: about 16 elements per thread, between 4 and 16 warps."""
    return max(4, min(16, tile_elements // (32 * 16)))


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query is a host call)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    """Triton `input_precision` for a float32 matrix product, following PyTorch's setting.

    torch.get_float32_matmul_precision() == "highest" (PyTorch's default) keeps full fp32
    ("ieee"); "high"/"medium" allow TF32 as cuBLAS would.  Half types always use the tensor cores.
    """
    if dtype != torch.float32:
        return "tf32"  # ignored by Triton for 16-bit operands
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def as_loadable_mask(mask: torch.Tensor) -> torch.Tensor:
    """A [B, L] mask the kernels can load: bool is reinterpreted as uint8 (no copy)."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


# tl.dot needs every block dimension >= 16.
MIN_DOT_BLOCK = 16
HALF_DTYPES = (torch.float16, torch.bfloat16)


def dot_block(n: int, max_block: int) -> int:
    """Block size for a dimension that feeds tl.dot: a power of two >= n, >= 16, <= max_block."""
    return max(MIN_DOT_BLOCK, min(next_power_of_2(n), max_block))


def dot_in_fp32(a: torch.dtype, b: torch.dtype, device: torch.device) -> bool:
    """Whether a kernel's product of operands of dtypes a and b must run in fp32.

    Two operands of the same 16-bit dtype feed the tensor cores directly (their products are exact
    in the fp32 accumulator); anything else (fp32, or mixed dtypes, which tl.dot rejects) is
    upcast in registers and multiplied in full fp32 ("ieee").  On CPU (Triton's interpreter) bf16
    is upcast too: the interpreter has no bf16 matrix product (numpy lacks bf16).
    """
    if device.type == "cpu" and torch.bfloat16 in (a, b):
        return True
    return not (a == b and a in HALF_DTYPES)


def mask_args(mask: torch.Tensor | None, ref: torch.Tensor):
    """(pointer, stride_b, stride_l, HAS_MASK) of an optional [B, L] mask for a launch.  Without a
    mask, `ref` (any tensor on the launch's device) stands in for the pointer: never read, since
    the kernel is specialised with HAS_MASK=False."""
    if mask is None:
        return ref, 0, 0, False
    mask = as_loadable_mask(mask)
    return mask, mask.stride(0), mask.stride(1), True


# --- the families from Q and K (attention_qk, attention_kl) --------------------------------------
# Their groups hold n mapped layers stacked, [n, B, H, L, d], any strides; one program works on one
# flattened head bh of [n, B, H] and a tile of its rows.

# Widest head dimension the kernels take: a [d, d] fp32 Gram block lives in one program's
# registers (128 x 128 fp32 over 8 warps is 64 registers per thread).
MAX_HEAD_DIM = 128
# Query/key tile of the tiled (flash-attention style) kernels, as flash-attention for d <= 64.
QK_TILE = 64


@triton.jit
def head_index(bh, B, H):
    """(layer, batch, head) of a flattened head index over [n, B, H]."""
    h = bh % H
    q = bh // H
    return q // B, q % B, h


@triton.jit
def head_base(n, b, h, stride_n, stride_b, stride_h):
    """Offset (int64) of head (n, b, h) of an [n, B, H, L, d] tensor."""
    return n.to(tl.int64) * stride_n + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def keep_rows(mask_ptr, b, rows, n_rows, mask_stride_b, mask_stride_l, HAS_MASK: tl.constexpr):
    """rows < n_rows, and (key padding) m[b, row] != 0."""
    ok = rows < n_rows
    if HAS_MASK:
        m = tl.load(mask_ptr + b.to(tl.int64) * mask_stride_b + rows.to(tl.int64) * mask_stride_l,
                    mask=ok, other=0)
        ok = ok & (m != 0)
    return ok


@triton.jit
def load_rows(ptr, base, rows, row_ok, stride_l, stride_d, D, BLOCK_D: tl.constexpr):
    """[BLOCK_ROWS, BLOCK_D] tile of a [L, D] matrix (one head); 0 outside row_ok and D."""
    cols = tl.arange(0, BLOCK_D)
    offs = base + rows.to(tl.int64)[:, None] * stride_l + cols.to(tl.int64)[None, :] * stride_d
    return tl.load(ptr + offs, mask=row_ok[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def mm(a, b, acc, FP32: tl.constexpr):
    """acc + a @ b, accumulated in fp32.  FP32: both operands in full fp32 ("ieee": TF32 would
    cost ~1e-3 relative per product, which the cancellation in these losses magnifies); otherwise
    `a` is cast to `b`'s 16-bit dtype for the tensor cores."""
    if FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(b.dtype), b, acc)
    return acc


@triton.jit
def store_rows(ptr, rows, row_ok, D, value, BLOCK_D: tl.constexpr):
    """Rows of a contiguous [N*L, D] gradient (rows already offset by head * L, int64)."""
    cols = tl.arange(0, BLOCK_D)
    tl.store(ptr + rows[:, None] * D + cols[None, :], value.to(ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols < D)[None, :])


def qk_dims(q_s: list[torch.Tensor], q_t: list[torch.Tensor]):
    """(B, H, L, d_s, d_t, heads per group) of groups [n, B, H, L, d]."""
    _, B, H, L, d_s = q_s[0].shape
    d_t = q_t[0].shape[-1]
    return B, H, L, d_s, d_t, [x.shape[0] * B * H for x in q_s]


def device_arch(device: torch.device) -> int | None:
    """Compute capability (major * 10 + minor) a launch on `device` compiles for: the GPU's, or on
    "meta" tensors the target of the active Triton driver (benchmarks/static.py's offline
    driver); None on CPU (Triton's interpreter)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    if device.type == "meta":
        try:
            return int(triton.runtime.driver.active.get_current_target().arch)
        except Exception:  # no driver: no target-specific choice
            return None
    return None


def qk_num_warps(*blocks: int) -> int:
    """Warps of a program holding [BLOCK, d] tiles: 8 once a block passes 64."""
    return 8 if max(blocks) > 64 else 4


def qk_tile_meta(q_s, k_s, q_t, k_t, L: int, d_s: int, d_t: int) -> dict:
    """Meta-parameters of a tiled kernel from Q and K: FP32_S / FP32_T (each model's products in
    full fp32, dot_in_fp32), BLOCK_M = BLOCK_N (query and key tiles), BLOCK_DS, BLOCK_DT and
    num_warps."""
    block = dot_block(L, QK_TILE)
    bds, bdt = dot_block(d_s, MAX_HEAD_DIM), dot_block(d_t, MAX_HEAD_DIM)
    device = q_s[0].device
    return dict(FP32_S=dot_in_fp32(q_s[0].dtype, k_s[0].dtype, device),
                FP32_T=dot_in_fp32(q_t[0].dtype, k_t[0].dtype, device),
                BLOCK_M=block, BLOCK_N=block, BLOCK_DS=bds, BLOCK_DT=bdt,
                num_warps=qk_num_warps(bds, bdt))


# Query/key tiles of a tiled backward launch that computes both models' gradients with 16-bit
# tensor-core products (two accumulators live beside the [BLOCK, BLOCK] score tiles): heads up to
# 64 wide, and wider ones.
QK_BWD_BOTH_TILE = 32
QK_BWD_BOTH_WIDE_TILE = 16


def qk_bwd_meta(meta: dict, need_s: bool, need_t: bool, device: torch.device,
                wide_below: int) -> dict:
    """The tile meta of one tiled backward launch (`_kl_bwd_kernel`, `_tiled_bwd_kernel`): `meta`,
    with QK_BWD_BOTH_TILE query/key tiles where both models' gradients are computed with 16-bit
    products, and QK_BWD_BOTH_WIDE_TILE on heads wider than 64 on targets below `wide_below`
    (compute capability; the launcher's).  The student-only backward (the distillation step's: the
    teacher is frozen) keeps its tiles.

    Why (ptxas, benchmarks/static.py): at 64 x 64 the both-gradients specialisation got 255
    registers and spilled 8-64 bytes on sm_80 (8 warps: still 255 and 8-24 bytes), 168 registers
    and 8 bytes on sm_100.  On heads wider than 64, 32 x 32 still spilled on sm_80 (the KL
    backward 16 bytes) and sm_90 (the MSE one 8 bytes) and 16 x 16 did not (88-128 registers);
    on sm_90 the KL backward spilled 16 bytes at 16 x 16 and none at 32 x 32, hence `wide_below`
    per launcher: sm_80 for the KL backward, sm_80 and sm_90 for the MSE one."""
    if need_s and need_t and not (meta["FP32_S"] or meta["FP32_T"]):
        wide = max(meta["BLOCK_DS"], meta["BLOCK_DT"]) > 64
        arch = device_arch(device)
        small = wide and arch is not None and arch < wide_below
        both = QK_BWD_BOTH_WIDE_TILE if small else QK_BWD_BOTH_TILE
        tile = min(meta["BLOCK_M"], meta["BLOCK_N"], both)
        return dict(meta, BLOCK_M=tile, BLOCK_N=tile)
    return meta


# --- the streaming loss families (attention_mse, attention_kl_scores, soft_ce, kl_div) -----------

def byte_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A [B, L] mask as 1 byte per entry (nonzero = token): a kernel that loads the key mask with
    every [rows, keys] tile requests 1 byte per score instead of 8 for an int64 mask (Hugging
    Face's), which would double the traffic of a bf16 score pass.  bool and uint8 pass as they
    are; anything else costs one elementwise op over B*L."""
    if mask is None or mask.dtype in (torch.bool, torch.uint8):
        return mask
    return mask != 0


def stream_launch(n_cols: int, max_cols: int = 8192) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps) of a streaming kernel over rows of `n_cols` columns:
    stream_tile and stream_num_warps together (every streaming family launches this way)."""
    block_rows, block_cols = stream_tile(n_cols, max_cols)
    return block_rows, block_cols, stream_num_warps(block_rows * block_cols)


@triton.jit
def score_row_offsets(rows, L, H, B, strides):
    """int64 element offsets of rows (flattened layer, batch, head, query i) of an
    [n, B, H, L, L] tensor with `strides` (its 5 strides), their batch index b and query index i."""
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
def online_softmax_step(m, l, z, k):
    """One tile of an online softmax over the rows of z [ROWS, COLS] (-inf where a column does not
    take part), with m the running row maxima and l the running sums of exp2((z - m) * k):
    returns (m', l', alpha, e) with m' = max(m, max_j z), alpha = exp2((m - m') * k) (how the
    earlier terms rescale), e = exp2((z - m') * k) [ROWS, COLS] and l' = l * alpha + sum_j e.
    k converts z to base-2 exponent units (log2 e / T).  A row whose maximum is still -inf
    (nothing yet) rescales against 0, so exp2(-inf - -inf) = NaN never occurs."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2((m - ref) * k)
    e = tl.exp2((z - ref[:, None]) * k)
    return m_new, l * alpha + tl.sum(e, axis=1), alpha, e


@triton.jit
def load_logit_tile(s_ptr, t_ptr, s_row, t_row, rows_ok, c0, C, s_stride_c, t_stride_c,
                    BLOCK_C: tl.constexpr):
    """Columns c0 .. c0 + BLOCK_C of rows of both [N, C] logit sets (s_row, t_row: the rows'
    int64 offsets) in fp32, -inf past C (for the softmax) and 0 on rows past N; and the tile's
    columns and in-bounds mask."""
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = (cols < C)[None, :]
    ok = rows_ok[:, None] & col_ok
    c_off = cols[None, :].to(tl.int64)
    zs = tl.load(s_ptr + s_row[:, None] + c_off * s_stride_c, mask=ok, other=0.0).to(tl.float32)
    zt = tl.load(t_ptr + t_row[:, None] + c_off * t_stride_c, mask=ok, other=0.0).to(tl.float32)
    return tl.where(col_ok, zs, float("-inf")), tl.where(col_ok, zt, float("-inf")), cols, ok


@triton.jit
def _w_terms(e, zs, zt, W_OF_DIFF: tl.constexpr):
    """e * Z_s (or e * (Z_t - Z_s)), 0 where e == 0 (no teacher mass: Z_s, Z_t may be -inf)."""
    if W_OF_DIFF:
        x = zt - zs
    else:
        x = zs
    return tl.where(e > 0, e * x, 0.0)


@triton.jit
def logits_row_stats(s_ptr, t_ptr, s_row, t_row, row_ok, C, s_stride_c, t_stride_c, k,
                     W_OF_DIFF: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """The online softmaxes of both [N, C] logit sets over the rows of one program (the soft-CE
    and KL kernels' row loop), fp32, maxima in logit units, k = log2(e) / T:

        m_x = max_c Z_x[c],   l_x = sum_c exp2((Z_x[c] - m_x) k)                    (x = s, t)
        w   = sum_c exp2((Z_t[c] - m_t) k) * (Z_s[c], or Z_t[c] - Z_s[c] with W_OF_DIFF)

    (classes where the teacher gives no mass skip w's term: Z_s may be -inf there).  Returns
    (m_s, l_s, m_t, l_t, w, zs, zt, cols, ok); with ONE_TILE (C <= BLOCK_C) the last four are the
    row's only tile, still in registers for the gradients; otherwise placeholders."""
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_N,), tl.float32)
    l_t = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float32)
    if ONE_TILE:
        zs, zt, cols, ok = load_logit_tile(s_ptr, t_ptr, s_row, t_row, row_ok, 0, C,
                                           s_stride_c, t_stride_c, BLOCK_C)
        m_s, l_s, _, _ = online_softmax_step(m_s, l_s, zs, k)
        m_t, l_t, _, e = online_softmax_step(m_t, l_t, zt, k)
        w = tl.sum(_w_terms(e, zs, zt, W_OF_DIFF), axis=1)
    else:
        for c0 in range(0, C, BLOCK_C):
            zs, zt, cols, ok = load_logit_tile(s_ptr, t_ptr, s_row, t_row, row_ok, c0, C,
                                               s_stride_c, t_stride_c, BLOCK_C)
            m_s, l_s, _, _ = online_softmax_step(m_s, l_s, zs, k)
            m_t, l_t, alpha, e = online_softmax_step(m_t, l_t, zt, k)
            w = w * alpha + tl.sum(_w_terms(e, zs, zt, W_OF_DIFF), axis=1)
        zs = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
        zt = zs
        cols = tl.arange(0, BLOCK_C)
        ok = zs != 0.0
    return m_s, l_s, m_t, l_t, w, zs, zt, cols, ok


@triton.jit
def _logits_grad_tile(zs, zt, m_s, r_s, m_t, r_t, v, g_off, ok, coef, inv_temp, ds_ptr, dt_ptr,
                      KL: tl.constexpr, NEED_DS: tl.constexpr, NEED_DT: tl.constexpr):
    """Store one tile of dZ_s = coef (p_s - p_t) and dZ_t = -coef p_t (log p_s + ce) (soft CE)
    or coef p_t (log p_t - log p_s - kl) (KL), v the row's ce or kl; log p = (Z - m) / T - r."""
    log_p_s = (zs - m_s[:, None]) * inv_temp - r_s[:, None]
    log_p_t = (zt - m_t[:, None]) * inv_temp - r_t[:, None]
    p_t = tl.exp2(log_p_t * LOG2E)
    if NEED_DS:
        ds = coef * (tl.exp2(log_p_s * LOG2E) - p_t)
        tl.store(ds_ptr + g_off, ds.to(ds_ptr.dtype.element_ty), mask=ok)
    if NEED_DT:
        if KL:
            dt = coef * p_t * (log_p_t - log_p_s - v[:, None])
        else:
            dt = -coef * p_t * (log_p_s + v[:, None])
        # p_t == 0 (teacher logit -inf): no mass, no gradient (and no -inf - -inf)
        tl.store(dt_ptr + g_off, tl.where(p_t > 0, dt, 0.0).to(dt_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _logits_loss_kernel(
    # pointers (dZ_s and dZ_t are allocated contiguous [N, C])
    s_ptr, t_ptr, partial_ptr, ds_ptr, dt_ptr,
    # sizes
    N, C,
    # strides
    s_stride_n, s_stride_c, t_stride_n, t_stride_c,
    # scalars
    inv_temp, loss_scale, grad_coef,
    # meta-parameters
    KL: tl.constexpr, NEED_DS: tl.constexpr, NEED_DT: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    s_row = rows.to(tl.int64) * s_stride_n
    t_row = rows.to(tl.int64) * t_stride_n
    k = inv_temp * LOG2E  # logit differences -> base-2 exponent units
    m_s, l_s, m_t, l_t, w, zs, zt, cols, ok = logits_row_stats(
        s_ptr, t_ptr, s_row, t_row, row_ok, C, s_stride_c, t_stride_c, k, KL, ONE_TILE,
        BLOCK_N, BLOCK_C)
    r_s = tl.log2(l_s) * LN2
    r_t = tl.log2(l_t) * LN2
    if KL:
        # kl = E_t[u - x] + lse(x) - lse(u), lse(x) - lse(u) = (m_s - m_t) / T + r_s - r_t
        v = (w / l_t - (m_t - m_s)) * inv_temp + (r_s - r_t)
    else:
        # ce = lse(x) - E_t[x] = (m_s - E_t[Z_s]) / T + r_s
        v = (m_s - w / l_t) * inv_temp + r_s
    tl.store(partial_ptr + pid, tl.sum(tl.where(row_ok, v, 0.0)) * loss_scale)
    if NEED_DS or NEED_DT:
        g_row = rows.to(tl.int64)[:, None] * C
        if ONE_TILE:
            _logits_grad_tile(zs, zt, m_s, r_s, m_t, r_t, v, g_row + cols[None, :], ok, grad_coef,
                              inv_temp, ds_ptr, dt_ptr, KL, NEED_DS, NEED_DT)
        else:
            for c0 in range(0, C, BLOCK_C):
                zs, zt, cols, ok = load_logit_tile(s_ptr, t_ptr, s_row, t_row, row_ok, c0, C,
                                                   s_stride_c, t_stride_c, BLOCK_C)
                _logits_grad_tile(zs, zt, m_s, r_s, m_t, r_t, v, g_row + cols[None, :], ok,
                                  grad_coef, inv_temp, ds_ptr, dt_ptr, KL, NEED_DS, NEED_DT)


def logits_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                loss_scale: float, grad_coef: float, kl: bool, need_student: bool,
                need_teacher: bool, max_block_c: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The soft-CE (kl=False) or KL (kl=True) kernel over [N, C] logits: (loss_scale * sum of the
    rows' ce or kl, fp32 scalar; dZ_s; dZ_t), the gradients contiguous [N, C] in the logits'
    dtypes with coefficient grad_coef (see _logits_grad_tile), an empty [0] tensor where not
    asked for.  One program per BLOCK_N rows; a row up to max_block_c classes is read once."""
    N, C = student.shape
    block_n, block_c, num_warps = stream_launch(C, max_block_c)
    if need_student and need_teacher and torch.float32 in (student.dtype, teacher.dtype):
        # both gradients of fp32 logits: twice the warps (at 4096 columns 8 warps got 80
        # registers and spilled 8 bytes on sm_80; 16 warps: 64 registers, no spills)
        num_warps = min(2 * num_warps, 32)
    grid = triton.cdiv(N, block_n)
    partials = torch.empty(grid, dtype=torch.float32, device=student.device)
    ds = student.new_empty((N, C) if need_student else (0,))
    dt = teacher.new_empty((N, C) if need_teacher else (0,))
    _logits_loss_kernel[(grid,)](
        student, teacher, partials, ds, dt,
        N, C,
        *student.stride(), *teacher.stride(),
        1.0 / temperature, loss_scale, grad_coef,
        KL=kl, NEED_DS=need_student, NEED_DT=need_teacher, ONE_TILE=C <= block_c,
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps,
    )
    return partials.sum(), ds, dt


# The gradient of these losses is written by their forward kernel (scaled for an incoming gradient
# of 1); the backward multiplies it by the incoming gradient g in place, read on the device: a
# program that finds g == 1 (a loss summed into the total) stops before touching the gradient, so
# the usual backward moves 4 bytes per program and no pass over the maps.
SCALE_BLOCK = 4096


@triton.jit
def _scale_in_place_kernel(x_ptr, g_ptr, factor, n, BLOCK: tl.constexpr):
    g = tl.load(g_ptr).to(tl.float32) * factor
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(x_ptr + offs, (x * g).to(x_ptr.dtype.element_ty), mask=ok)


def scale_in_place(tensors: list[torch.Tensor], grad: torch.Tensor, factor: float = 1.0) -> None:
    """x *= g * factor for each contiguous tensor x, with g the 0-dim (or one-element) tensor
    `grad`, read by the kernel (no host synchronisation); nothing is read or written where
    g * factor == 1."""
    for x in tensors:
        if x.numel():
            _scale_in_place_kernel[(triton.cdiv(x.numel(), SCALE_BLOCK),)](
                x, grad, factor, x.numel(), BLOCK=SCALE_BLOCK, num_warps=8)


def split_grad_scale(scale, *dtypes: torch.dtype) -> tuple:
    """(forward factor, backward factor) of a gradient whose reduction scale is `scale` (a float
    or a 0-dim tensor, returned as it is in one of the two places), for a
    forward that writes the gradient and a backward that multiplies it by g * (backward factor).
    Normally (scale, 1): the backward touches nothing when g == 1.  float16 has 5 exponent bits:
    a gradient scaled by 1 / (B*H*L*L) falls into its subnormals, so a float16 gradient is
    written unscaled, (1, scale), and the backward always makes its pass."""
    return (1.0, scale) if torch.float16 in dtypes else (scale, 1.0)


def k_div(K: int, x: torch.Tensor, weight: torch.Tensor) -> int:
    """Largest power of two <= 16 dividing K and the row strides of x [n, M, K] and weight [N, K]:
    the K_DIV hint (K = 312 gives 8, so bf16 rows load 16 bytes at a time)."""
    div = 16
    while div > 1 and any(v % div for v in (K, x.stride(0), x.stride(1), weight.stride(0))):
        div //= 2
    return div


# Rows of a hidden_mse / hidden_cosine GEMM tile when K_DIV = 1 (K or a row stride odd: 2-byte
# loads, no cp.async): at 128 x 64 the 16-bit hidden_mse forward with the residual got 255
# registers and spilled 40 bytes on sm_80, the hidden_cosine sums 44 (ptxas,
# benchmarks/static.py); at 64 x 64, 200-203 registers, no spills.  Only the tests' odd K (7, 9)
# take it; K = 312 (TinyBERT4) has K_DIV = 8.
NARROW_BLOCK_M = 64
