"""Object keys and listings, shared by `tasks.storage` and its S3 backend."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectInfo:
    """One file or object under a root: key relative to the root, size in bytes, etag.
    `problem` is set (and size and etag are empty) for an entry a listing found but cannot
    use, e.g. a dangling link; the index skips and lists it."""

    key: str
    size: int
    etag: str
    problem: str = ""


def unsafe_key_reason(key: str) -> str | None:
    """Why a key must not be used as a path (escapes the root, control chars), or None.
    Keys listed from a bucket are data: they are checked before they name a file anywhere."""
    if key.startswith("/") or key.startswith("\\"):
        return "absolute path"
    if (not key.isprintable() if key.isascii()  # ASCII: not printable is exactly Cc
            else any(unicodedata.category(c) == "Cc" for c in key)):
        return "control character in name"
    if any(part in ("..", ".") or part == "" for part in key.split("/")):
        return "'..', '.' or empty path component"
    if "\\" in key:
        return "backslash in name"
    return None
