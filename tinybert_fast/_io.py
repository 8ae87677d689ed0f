"""The one way this package writes a file: atomically and durably, with the usual mode.

Policy: write a temp file in the destination's folder (same file system, so the rename is
atomic), flush and fsync it, give it the mode a plain ``open`` would (0666 less the umask, not
``mkstemp``'s 0600), rename it over the destination, then fsync the folder so the rename survives
a crash. A failure removes the temp file and leaves the destination as it was. Readers therefore
see the old file or the new one, never a part.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from typing import IO, Iterator

_umask_lock = threading.Lock()


def umask() -> int:
    """The process umask (read by setting and restoring it, under a lock)."""
    with _umask_lock:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def fsync_dir(path: str) -> None:
    """fsync a folder, so that renames and creations in it are durable (no-op where the OS
    cannot open folders, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", *, fsync: bool = True, encoding: str | None = None,
                newline: str | None = None) -> Iterator[IO]:
    """``with atomic_open(path, "w") as f: ...``: f is a temp file beside ``path``; on a clean exit
    it replaces ``path`` (policy in the module docstring), on an exception it is removed.

    mode: "w" (text; encoding defaults to UTF-8) or "wb". fsync=False skips both fsyncs (for
    scratch files whose loss a crash may cost) but keeps the atomic rename.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode: expected 'w' or 'wb', got {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path!r}: cannot create a file in {folder!r} "
                                 f"({exc.strerror})") from exc
    try:
        if mode == "w":
            f = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline=newline)
        else:
            f = os.fdopen(fd, "wb")
        with f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(folder)


def atomic_write(path: str, data: bytes | str, *, fsync: bool = True) -> None:
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` atomically (see atomic_open)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)
