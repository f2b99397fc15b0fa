"""One storage layer for local folders and s3:// URIs.

Every stage reads and writes through these functions, so a run folder or a dataset
root can be a local path or an object-store prefix. URIs are plain strings.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from tasks.errors import StorageError as StorageError
from tasks.keys import ObjectInfo as ObjectInfo
from tasks.keys import unsafe_key_reason as unsafe_key_reason

# The longest file name (in bytes) on Linux file systems; names this layer makes stay within it.
NAME_MAX = 255
# Temporary files of atomic writes and copies: `.<name, cut to fit>.<8 random>.acl.tmp`.
TEMP_SUFFIX = ".acl.tmp"
_TEMP_RANDOM = r"[a-z0-9_]{8}"  # what tempfile.mkstemp puts between prefix and suffix

# boto3 client settings handed over by `configure_s3`, and the standard AWS variable of each.
_S3_SETTINGS: dict[str, str] = {}
_S3_ENV_NAMES = {"endpoint_url": "AWS_ENDPOINT_URL_S3", "region_name": "AWS_DEFAULT_REGION",
                 "aws_access_key_id": "AWS_ACCESS_KEY_ID",
                 "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
                 "aws_session_token": "AWS_SESSION_TOKEN"}


def configure_s3(*, endpoint_url: str | None = None, region_name: str | None = None,
                 aws_access_key_id: str | None = None, aws_secret_access_key: str | None = None,
                 aws_session_token: str | None = None) -> None:
    """S3 endpoint, region and credentials for this process and its local trainer
    subprocesses (the Airflow adapter hands over its AWS connection's). They win over the
    standard boto3 sources (the environment, ~/.aws, roles); a setting left None comes from
    those. Replaces earlier settings."""
    given = {"endpoint_url": endpoint_url, "region_name": region_name,
             "aws_access_key_id": aws_access_key_id,
             "aws_secret_access_key": aws_secret_access_key,
             "aws_session_token": aws_session_token}
    _S3_SETTINGS.clear()
    _S3_SETTINGS.update({k: v for k, v in given.items() if v})


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


def cut_name(name: str, max_bytes: int) -> str:
    """`name` cut to at most `max_bytes` bytes as the file system stores it (UTF-8, or the
    raw bytes of a non-UTF-8 name), at a character boundary where the name is UTF-8."""
    raw = os.fsencode(name)[:max(0, max_bytes)]
    for drop in range(min(3, len(raw)) + 1):
        try:
            (raw[:len(raw) - drop]).decode("utf-8")
        except UnicodeDecodeError:
            continue
        return os.fsdecode(raw[:len(raw) - drop])
    return os.fsdecode(raw)


def _temp_prefix(name: str) -> str:
    """The temporary-name prefix for a file called `name`: `.<name>.`, the name cut so that
    the whole temporary name fits NAME_MAX bytes whatever the name's length."""
    room = NAME_MAX - len(b"..") - 8 - len(TEMP_SUFFIX)
    return f".{cut_name(name, room)}."


def temp_files_for(uri: str) -> list[str]:
    """Leftover temporary files of writes or copies to the local file `uri` (a killed
    process leaves them): only names of this layer's own pattern for that target."""
    path = Path(uri)
    pattern = re.compile(re.escape(_temp_prefix(path.name)) + _TEMP_RANDOM
                         + re.escape(TEMP_SUFFIX))
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [str(path.parent / n) for n in sorted(names) if pattern.fullmatch(n)]


def remove_temp_files(uris: list[str]) -> int:
    """Delete the leftover temporary files (see `temp_files_for`) of local targets; S3 URIs
    have none (copies there are server-side, writes single requests). Returns how many."""
    removed = 0
    for uri in uris:
        if is_s3(uri):
            continue
        for tmp in temp_files_for(uri):
            Path(tmp).unlink(missing_ok=True)
            removed += 1
    return removed


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


def _display_name(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 become \\xNN escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _walk(folder: Path, real_root: str, prefix: str, seen: set[str]) -> Iterator[ObjectInfo]:
    """The local listing below `folder`, unsorted. Symbolic links to files or folders inside
    the root are followed; links that leave the root or point nowhere, names that are not UTF-8,
    folders that cannot be read and special files are listed with their `problem`."""
    seen = seen | {os.path.realpath(folder)}
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as err:
        yield ObjectInfo(prefix.rstrip("/"), 0, "",
                         f"folder cannot be read ({type(err).__name__}: {err.strerror or err})")
        return
    for entry in entries:
        try:
            entry.name.encode("utf-8")
        except UnicodeEncodeError:
            kind = "folder" if entry.is_dir() else "file"
            yield ObjectInfo(prefix + _display_name(entry.name), 0, "",
                             f"{kind} name is not valid UTF-8; rename it")
            continue
        key = prefix + entry.name
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if not os.path.exists(target):
                yield ObjectInfo(key, 0, "", "dangling symbolic link")
                continue
            if os.path.commonpath([target, real_root]) != real_root:
                yield ObjectInfo(key, 0, "", "symbolic link to outside the dataset root "
                                 f"({_display_name(target)})")
                continue
            if target in seen:
                yield ObjectInfo(key, 0, "", "symbolic link loop")
                continue
        # The scandir entry's methods follow links, like Path's, and mostly need no call.
        if entry.is_dir():
            yield from _walk(Path(entry.path), real_root, key + "/", seen)
        elif entry.is_file():
            try:
                st = entry.stat()
            except OSError as err:  # removed since the listing
                yield ObjectInfo(key, 0, "", f"cannot be read ({type(err).__name__}: "
                                 f"{err.strerror or err})")
                continue
            # A cheap change marker; head() gives the content MD5.
            yield ObjectInfo(key=key, size=st.st_size, etag=f"mtime:{st.st_mtime_ns}")
        else:
            yield ObjectInfo(key, 0, "", "not a regular file (a device, pipe or socket)")


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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name),
                                   suffix=TEMP_SUFFIX)
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

    def create(self, uri: str, data: bytes) -> bool:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def exists(self, uri: str) -> bool:
        return Path(uri).is_file()

    def head(self, uri: str) -> ObjectInfo | None:
        path = Path(uri)
        if not path.is_file():
            return None
        return ObjectInfo(key=path.name, size=path.stat().st_size, etag=_file_etag(path))

    def list(self, root: str) -> Iterator[ObjectInfo]:
        # Sorted by key as a bucket lists them, whatever the walk's order.
        yield from sorted((info for page in self.list_pages(root) for info in page),
                          key=lambda info: info.key.encode())

    def list_pages(self, root: str, page_size: int = 10_000) -> Iterator[list[ObjectInfo]]:
        base = Path(root)
        if not base.is_dir():
            raise StorageError(f"{root} is not a folder")
        try:
            os.scandir(base).close()
        except OSError as err:
            raise StorageError(f"{root} cannot be read ({err.strerror or err})") from None
        page: list[ObjectInfo] = []
        for info in _walk(base, os.path.realpath(base), "", set()):
            page.append(info)
            if len(page) >= page_size:
                yield page
                page = []
        if page:
            yield page

    def copy(self, src: str, dst: str, expect: ObjectInfo | None = None) -> str | None:
        if expect is not None and (not Path(src).is_file() or _file_etag(Path(src)) != expect.etag):
            raise StorageError(f"refusing to copy {src}: it is missing or no longer ETag "
                               f"{expect.etag}")
        dst_path = Path(dst)
        dst_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst_path.parent, prefix=_temp_prefix(dst_path.name),
                                   suffix=TEMP_SUFFIX)
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
        return None

    def delete(self, uri: str) -> None:
        Path(uri).unlink(missing_ok=True)

    def delete_many(self, uris: list[str]) -> None:
        for uri in uris:
            self.delete(uri)

    def etags_are_md5(self, uri: str) -> bool:
        return True

    def local_path(self, uri: str) -> str:
        return uri

    def fetch_many(self, uris: list[str], etags: list[str] | None = None) -> list[str]:
        return list(uris)


def _backend(uri: str):
    if is_s3(uri):
        from tasks.s3 import S3Backend

        return S3Backend.shared(_S3_SETTINGS)
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


def create(uri: str, data: bytes) -> bool:
    """Write a small file or object only if it does not exist (O_EXCL; a conditional PUT,
    If-None-Match: *, on S3); returns False when it already existed."""
    return _backend(uri).create(uri, data)


def exists(uri: str) -> bool:
    """True when the file or object exists."""
    return _backend(uri).exists(uri)


def head(uri: str) -> ObjectInfo | None:
    """Size and etag (content MD5 for local files) of one object, or None if absent."""
    return _backend(uri).head(uri)


def list_objects(root: str) -> Iterator[ObjectInfo]:
    """Every file under root, recursively, keys relative to root, in sorted order."""
    return _backend(root).list(root)


def list_pages(root: str) -> Iterator[list[ObjectInfo]]:
    """What `list_objects` finds, in pages (lists of up to some thousands) and in no
    particular order, for listings too large to hold as Python objects at once (the caller
    sorts what it keeps). On S3 the top-level folders are listed concurrently."""
    return _backend(root).list_pages(root)


def copy(src: str, dst: str, expect: ObjectInfo | None = None) -> str | None:
    """Copy within one store (server-side on S3); never overwrites an existing dst. With
    `expect` (size and ETag of the source as the caller last saw it) the source is copied
    only if it still has that ETag (a StorageError otherwise; one request on S3). Returns the
    copy's ETag where the store reports it (S3), else None."""
    if is_s3(src) != is_s3(dst):
        raise StorageError(f"copy between stores is not supported: {src} -> {dst}")
    return _backend(src).copy(src, dst, expect)


def parallelism(uri: str) -> int:
    """How many requests to keep in flight against the store of `uri`: the S3 client's
    connection pool (ACL_S3_CONCURRENCY, default 16); 1 for local files (a local disk gains
    little, and serial work leaves at most one temporary file when killed)."""
    return _backend(uri).concurrency if is_s3(uri) else 1


def delete(uri: str) -> None:
    """Delete one file or object (no error if it is already gone)."""
    _backend(uri).delete(uri)


def delete_many(uris: list[str]) -> None:
    """Delete files or objects of one store (no error for those already gone): on S3 in
    DeleteObjects requests of up to 1,000 keys (one request per key where the server has no
    multi-object delete); a StorageError names the first that could not be deleted."""
    if uris:
        _backend(uris[0]).delete_many(uris)


def etags_are_md5(uri: str) -> bool:
    """True when the ETag of the object at `uri` is its content MD5 (always for a local file's
    `head`; on S3 for a single-part object stored without KMS or customer-key encryption, as
    a HEAD tells), so a plan can take other single-part ETags of that store for MD5s."""
    return _backend(uri).etags_are_md5(uri)


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
    the settings given to `configure_s3`, as the standard AWS variables (passed, never
    logged)."""
    return {_S3_ENV_NAMES[k]: v for k, v in _S3_SETTINGS.items()}
