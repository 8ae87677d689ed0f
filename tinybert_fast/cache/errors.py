"""The teacher cache's exceptions."""

from __future__ import annotations


class CacheError(RuntimeError):
    """Base class of the teacher cache's errors."""


class CacheCorruptionError(CacheError):
    """A cache file is damaged (checksum mismatch, truncated, missing, foreign)."""


class CacheIncompleteError(CacheError):
    """The folder holds a build that has not finished (or is still running)."""


class CacheMismatchError(CacheError, ValueError):
    """The cache was built from something else than what the caller expects (fingerprint)."""
