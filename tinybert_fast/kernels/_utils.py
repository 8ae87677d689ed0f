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
