"""The cache's side of the C++/CUDA extension: the ops, loaded on first use.

tinybert_fast._extension builds (just in time, cached) and loads the library; it stays outside
this package so that `tinybert-fast build-extension` reaches it without importing the cache.
This module is what the rest of the cache calls: `ops()` (and the HAS_EXTENSION flags) load the
library on first use, check that its `int[] layout` field order is LAYOUT_FIELDS and register
the ops' fake kernels (tinybert_fast.cache.fake), so torch.compile and FakeTensorMode can trace
through them.

Ops (torch.ops.tinybert_fast_cache, schemas in csrc/teacher_cache.cpp):
    crc32c(data, crc)  record_bytes(lengths, layout)  pack(...)  gather(...)  unpack(...)
    build_info()  layout_fields()
"""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np
import torch

from .. import _extension
from ._fields import LAYOUT_FIELDS


_FLAGS = {"HAS_EXTENSION": lambda s: s.loaded,
          "HAS_CUDA_KERNELS": lambda s: s.cuda_kernels,
          "EXTENSION_ERROR": lambda s: s.error}
_ready = False
_ready_lock = threading.Lock()


def flag(name: str):
    """HAS_EXTENSION, HAS_CUDA_KERNELS or EXTENSION_ERROR; builds (or loads from the cache) and
    loads the extension on first use."""
    s = _extension.state()
    if s.loaded:
        ops()  # the layout check and the fake kernels, for callers of torch.ops directly
    return _FLAGS[name](s)


def ops():
    """torch.ops.tinybert_fast_cache, building and loading the extension first if needed;
    RuntimeError saying why and how to fix it when it is unavailable."""
    global _ready
    namespace = _extension.ops()
    if not _ready:
        with _ready_lock:
            if not _ready:
                _check_layout_fields(namespace)
                from . import fake
                fake.register()
                _ready = True
    return namespace


def _check_layout_fields(namespace) -> None:
    # A library built from other sources than this Python (a stale build folder, a hand-copied
    # .so) could read the layout integers in another order: refuse it rather than misread records.
    have = tuple(str(namespace.layout_fields()).split(", "))
    if have != LAYOUT_FIELDS:
        raise _extension.ExtensionError(
            f"the teacher-cache extension reads the layout as {have}, this tinybert_fast "
            f"writes {LAYOUT_FIELDS}: rebuild it (`tinybert-fast build-extension --force`)")


def has_cuda_kernels() -> bool:
    return _extension.state().cuda_kernels


def build_info() -> str:
    """What the loaded extension was built against, e.g. "torch 2.14.1 cuda"."""
    return ops().build_info()


def default_threads() -> int:
    """C++ threads for packing and gathering: the CPUs this process may run on, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def crc32c(data: bytes | bytearray | memoryview | np.ndarray | torch.Tensor, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of a buffer, continuing from `crc`."""
    if not isinstance(data, torch.Tensor):
        arr = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        if arr.size == 0:
            return crc
        with warnings.catch_warnings():  # read-only buffers: the op only reads
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(np.ascontiguousarray(arr).view(np.uint8).reshape(-1))
    return int(ops().crc32c(data.contiguous(), crc))
