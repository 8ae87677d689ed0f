"""Helpers shared by every launcher: block-size choice and Triton dtype handling.

Kept in one place so that every kernel family picks its tiles the same way.
"""

from __future__ import annotations

import functools

import torch
import triton

# TinyBERT's rule: attention scores at or below this are the additive mask bias (or have absorbed
# it) and count as 0 in the attention loss.
MASK_THRESHOLD = -100.0

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
