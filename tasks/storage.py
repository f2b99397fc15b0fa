"""One storage layer for local folders and s3:// URIs.

Every stage reads and writes through these functions, so a run folder or a dataset
root can be a local path or an object-store prefix. URIs are plain strings.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI (never credentials)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One file or object under a root: key relative to the root, size in bytes, etag."""

    key: str
    size: int
    etag: str


def unsafe_key_reason(key: str) -> str | None:
    """Why a key must not be used as a path (escapes the root, control chars), or None.
    Keys listed from a bucket are data: they are checked before they name a file anywhere."""
    if key.startswith("/") or key.startswith("\\"):
        return "absolute path"
    if any(unicodedata.category(c) == "Cc" for c in key):
        return "control character in name"
    if any(part in ("..", ".") or part == "" for part in key.split("/")):
        return "'..', '.' or empty path component"
    if "\\" in key:
        return "backslash in name"
    return None


def is_s3(uri: str) -> bool:
    """True for s3:// URIs."""
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', for local paths and s3:// alike."""
    out = base.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def parent(uri: str) -> str:
    """The URI one level up."""
    return uri.rstrip("/").rsplit("/", 1)[0]


def basename(uri: str) -> str:
    """The last part of a URI."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _file_etag(path: Path) -> str:
    """MD5 of a local file's bytes (what S3 reports as ETag for single-part uploads)."""
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    """This process's umask (read from /proc where possible: setting it to read it races
    with threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class LocalBackend:
    """Files on the local disk."""

    def read_bytes(self, uri: str) -> bytes:
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{uri} does not exist") from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        self._write(uri, lambda f: f.write(data))

    def write_file(self, uri: str, src: Path) -> None:
        def fill(f: BinaryIO) -> None:
            with src.open("rb") as s:
                shutil.copyfileobj(s, f, 1 << 20)

        self._write(uri, fill)

    def _write(self, uri: str, fill: Callable[[BinaryIO], object]) -> None:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            # mkstemp makes the file 0600; a written file gets the mode of any new file.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, uri: str) -> bool:
        return Path(uri).is_file()

    def head(self, uri: str) -> ObjectInfo | None:
        path = Path(uri)
        if not path.is_file():
            return None
        return ObjectInfo(key=path.name, size=path.stat().st_size, etag=_file_etag(path))

    def list(self, root: str) -> Iterator[ObjectInfo]:
        base = Path(root)
        if not base.is_dir():
            raise StorageError(f"{root} is not a folder")
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if path.is_file():
                    key = path.relative_to(base).as_posix()
                    st = path.stat()
                    # A cheap change marker; head() gives the content MD5.
                    yield ObjectInfo(key=key, size=st.st_size, etag=f"mtime:{st.st_mtime_ns}")

    def copy(self, src: str, dst: str) -> None:
        dst_path = Path(dst)
        dst_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst_path.parent, prefix=f".{dst_path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            shutil.copymode(src, tmp)  # a moved image keeps its mode (mkstemp made it 0600)
            os.link(tmp, dst)  # atomic, and fails instead of overwriting an existing file
        except FileExistsError:
            raise StorageError(f"refusing to overwrite {dst}") from None
        except FileNotFoundError:
            raise StorageError(f"{src} does not exist") from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def delete(self, uri: str) -> None:
        Path(uri).unlink(missing_ok=True)

    def local_path(self, uri: str) -> str:
        return uri

    def fetch_many(self, uris: list[str], etags: list[str] | None = None) -> list[str]:
        return list(uris)


def _backend(uri: str):
    if is_s3(uri):
        from tasks.s3 import S3Backend

        return S3Backend.shared()
    return LocalBackend()


def read_bytes(uri: str) -> bytes:
    """The whole content of a file or object."""
    return _backend(uri).read_bytes(uri)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file or object atomically (readers never see a partial file)."""
    _backend(uri).write_bytes(uri, data)


def write_file(uri: str, path: str | Path) -> None:
    """Write the content of the local file `path` at `uri` atomically, streamed from disk
    (for outputs too large to hold in memory as one bytes object)."""
    _backend(uri).write_file(uri, Path(path))


def read_text(uri: str) -> str:
    """Content decoded as UTF-8."""
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    """Write UTF-8 text atomically."""
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str) -> bool:
    """True when the file or object exists."""
    return _backend(uri).exists(uri)


def head(uri: str) -> ObjectInfo | None:
    """Size and etag (content MD5 for local files) of one object, or None if absent."""
    return _backend(uri).head(uri)


def list_objects(root: str) -> Iterator[ObjectInfo]:
    """Every file under root, recursively, keys relative to root, in sorted order."""
    return _backend(root).list(root)


def copy(src: str, dst: str) -> None:
    """Copy within one store (server-side on S3); never overwrites an existing dst."""
    if is_s3(src) != is_s3(dst):
        raise StorageError(f"copy between stores is not supported: {src} -> {dst}")
    _backend(src).copy(src, dst)


def delete(uri: str) -> None:
    """Delete one file or object (no error if it is already gone)."""
    _backend(uri).delete(uri)


def local_path(uri: str) -> str:
    """A local filesystem path with the object's content (downloaded into the cache for S3)."""
    return _backend(uri).local_path(uri)


def fetch_many(uris: list[str], etags: list[str] | None = None) -> list[str]:
    """Local paths for many URIs of one store; S3 objects are downloaded in parallel into
    the local cache (reused across repeats on the same machine). `etags`, when known (from
    a listing or a manifest), name the expected version of each object: the cache is keyed
    by them, and an object that changed since is an error instead of a silent mix."""
    if not uris:
        return []
    return _backend(uris[0]).fetch_many(uris, etags)


def subprocess_env() -> dict[str, str]:
    """Environment a child process (a local trainer) needs to reach the same object store:
    empty unless the S3 settings came from an Airflow connection of this process."""
    if "airflow" not in sys.modules:
        return {}
    from tasks.s3 import connection_env

    return connection_env()
