"""The cache folder: its lock, the temp files a killed write leaves, clearing a cache, checking
committed chunks against their checksums, and the manifest that completes a build (finalize).

Temp files: the folder's atomic writes (build spec, indexes, manifest) run under a shared flock
on the folder; remove_temp_files (called by every CacheWriter and TeacherCache.open) takes it
exclusively, so it removes what a killed process left (only this package's temp-file names,
format.is_temp_file) and never a write in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re

import numpy as np
import torch

from .._io import atomic_write
from .errors import CacheCorruptionError, CacheError
from .extension import crc32c
from .fingerprint import example_ids_fingerprint, tokens_fingerprint
from .format import (BUILD_SPEC, FORMAT_NAME, FORMAT_VERSION, MANIFEST, REBUILD, CacheLayout,
                     canonical, decode_index, is_temp_file, manifest_checksum, read_json,
                     shard_name)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

logger = logging.getLogger(__name__)

_SHARD_FILE = re.compile(r"shard-\d{5}-of-\d{5}\.(?:data|index|journal)")


@contextlib.contextmanager
def _folder_lock(path: str, exclusive: bool, blocking: bool = True):
    """flock on the folder itself (no lock file; the kernel releases it if the holder dies):
    shared around this package's atomic writes in a cache folder, exclusive to remove temp files.
    Yields whether it is held (False: blocking=False and another process holds it)."""
    fd = None
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    if fd is None:
        yield True
        return
    try:
        held = True
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                        | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            held = False
        except OSError:  # a file system without flock: nothing to coordinate with
            pass
        yield held
    finally:
        os.close(fd)


def _atomic_write(path: str, data: bytes, fsync: bool) -> None:
    """tinybert_fast._io.atomic_write under the folder's shared lock (see remove_temp_files)."""
    with _folder_lock(os.path.dirname(os.path.abspath(path)), exclusive=False):
        atomic_write(path, data, fsync=fsync)


def remove_temp_files(path: str | os.PathLike) -> list[str]:
    """Remove the temp files that this package's atomic writes left in a cache folder (a process
    killed mid-write, e.g. in close): only names format.is_temp_file accepts, nothing else.
    Skipped (returns []) while another process is writing there.  Returns the names removed."""
    path = os.fspath(path)
    with contextlib.suppress(OSError):
        if not any(is_temp_file(n) for n in os.listdir(path)):
            return []
    removed = []
    with _folder_lock(path, exclusive=True, blocking=False) as held:
        if not held:
            logger.debug("%s: another process is writing; leaving temp files for later", path)
            return []
        try:
            names = [n for n in os.listdir(path) if is_temp_file(n)]
        except OSError:
            return []
        for name in names:
            try:
                os.remove(os.path.join(path, name))
                removed.append(name)
            except FileNotFoundError:
                pass
            except OSError as exc:  # a read-only folder: harmless, readers ignore them
                logger.debug("%s: cannot remove the temp file %s: %s", path, name, exc)
    if removed:
        logger.info("%s: removed temp files left by an interrupted write: %s", path,
                    ", ".join(sorted(removed)))
    return removed


def clear(path: str | os.PathLike) -> list[str]:
    """Remove a cache (complete or not) from its folder: the manifest, the build spec, every
    shard's data, index and journal, and temp files; other files (and the folder) stay.
    Call it from one process (in DDP: one rank, then a barrier).  Returns the names removed."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return []
    removed = remove_temp_files(path)
    for name in os.listdir(path):
        if name in (MANIFEST, BUILD_SPEC) or _SHARD_FILE.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(path, name))
                removed.append(name)
    return removed


def verify_chunks(data_path: str, chunks, ids, lengths, offsets, crcs,
                  layout: CacheLayout | None) -> None:
    """Check committed chunks of a data file against their CRC32C (chunks [k, 4]: start, end,
    crc, first example; ids, lengths, offsets, crcs: the chunks' records, in order).
    CacheCorruptionError naming the chunk, its examples and the first damaged one."""
    chunks = np.asarray(chunks, np.int64).reshape(-1, 4)
    if not len(chunks):
        return
    size = os.path.getsize(data_path)
    with open(data_path, "rb") as f:
        for c, (start, end, crc, first) in enumerate(chunks.tolist()):
            if end > size:
                raise CacheCorruptionError(f"{data_path}: committed chunk {c} (bytes "
                                           f"{start}..{end}) lies past the file's end ({size} "
                                           f"bytes): {REBUILD}")
            f.seek(start)
            got, left = 0, end - start
            while left:
                block = f.read(min(left, 1 << 24))
                got, left = crc32c(block, got), left - len(block)
            if got == crc:
                continue
            last = int(chunks[c + 1, 3]) if c + 1 < len(chunks) else len(ids)
            sel = np.arange(first, last)
            victim = None
            if layout is not None and len(sel):
                nb = layout.record_bytes(lengths[sel])
                for i, n in zip(sel.tolist(), nb.tolist()):
                    f.seek(int(offsets[i]))
                    if crc32c(f.read(n)) != int(crcs[i]):
                        victim = int(ids[i])
                        break
            where = (f"the record of example {victim} is damaged" if victim is not None
                     else "the bytes between records are damaged")
            members = ids[sel].tolist()
            raise CacheCorruptionError(
                f"{data_path}: committed chunk {c} (bytes {start}..{end}, {len(members)} examples: "
                f"ids {members[:8]}{' ...' if len(members) > 8 else ''}) fails its checksum: "
                f"{where}.  The file "
                f"changed after the interrupted build committed it; {REBUILD}")


def resolve_shard(shard) -> tuple[int, int]:
    if shard is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    rank, world = (int(v) for v in shard)
    if not (world >= 1 and 0 <= rank < world):
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size; got "
                         f"{shard}")
    return rank, world


def finalize(path: str, fsync: bool = True) -> bool:
    """Write the manifest if every shard's index exists; True when the cache is complete.

    Idempotent and safe to race: every rank that sees all shards writes the same bytes."""
    manifest_path = os.path.join(path, MANIFEST)
    if os.path.exists(manifest_path):
        return True
    spec = read_json(os.path.join(path, BUILD_SPEC))
    world = int(spec["world_size"])
    spec_hash = hashlib.sha256(canonical(spec).encode()).digest()
    names = [shard_name(r, world, "index") for r in range(world)]
    if not all(os.path.exists(os.path.join(path, n)) for n in names):
        return False
    shards, layouts, all_ids, all_tokens, max_len = [], set(), [], [], 0
    for r, name in enumerate(names):
        idx = decode_index(os.path.join(path, name))
        if idx.spec != spec_hash:
            raise CacheCorruptionError(f"{os.path.join(path, name)} belongs to another build")
        if idx.layout is not None:
            layouts.add(idx.layout)
        all_ids.append(idx.ids)
        all_tokens.append(idx.tokens)
        max_len = max(max_len, int(idx.lengths.max()) if len(idx.lengths) else 0)
        shards.append({"data": shard_name(r, world, "data"), "index": name,
                       "examples": int(len(idx.ids)), "data_bytes": int(idx.data_bytes),
                       "index_crc32c": int(idx.crc)})
    if len(layouts) > 1:
        raise CacheError(f"{path}: shards disagree on the layout: {sorted(map(str, layouts))}")
    ids = np.concatenate(all_ids) if all_ids else np.zeros(0, np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise CacheError(f"{path}: example ids stored by more than one shard: "
                         f"{uniq[counts > 1][:10].tolist()}")
    layout = layouts.pop() if layouts else None
    fingerprint = dict(spec["fingerprint"])
    fields = layout.fields if layout else []
    if fingerprint.setdefault("fields", fields) != fields:
        raise CacheError(f"{path}: the fingerprint names fields {fingerprint['fields']} but the "
                         f"stored outputs are {fields}")
    fingerprint["example_ids"] = example_ids_fingerprint(ids)
    # what the teacher saw: None when the writer was given no input_ids
    fingerprint["tokens"] = tokens_fingerprint(
        ids, np.concatenate(all_tokens) if all_tokens else np.zeros(0, np.int64))
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "fingerprint": fingerprint,
                "layout": dataclasses.asdict(layout) if layout else None,
                "num_examples": int(len(ids)), "max_length": max_len, "shards": shards}
    manifest["checksum"] = manifest_checksum(manifest)
    _atomic_write(manifest_path, json.dumps(manifest, indent=1).encode(), fsync)
    return True
