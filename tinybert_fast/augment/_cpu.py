"""What the CPU computes natively, for the choice of a compute dtype (GloVe neighbours, masked
LM)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_dot() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where a bf16 matrix
    product is several times faster than fp32; elsewhere it is emulated and slower."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False
