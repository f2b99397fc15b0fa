"""S3-compatible object storage (AWS S3, MinIO, Ceph, SeaweedFS ...) behind `tasks.storage`.

URIs are `s3://bucket/key`. Endpoint, region and credentials come the standard boto3 way
(`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY`, `~/.aws`, instance roles), except what `storage.configure_s3` set
explicitly (inside Airflow: the AWS connection, handed over by the adapter). Requests are
retried with exponential backoff on throttling and connection errors (botocore `standard`
mode, 20 attempts; `AWS_RETRY_MODE` / `AWS_MAX_ATTEMPTS` override).
Errors are `StorageError`s that name the URI, never the credentials.

Objects are downloaded into a local cache (`ACL_CACHE_DIR`, default
`~/.cache/auto-correct-labels`), one file per (endpoint, bucket, key, ETag), so repeats on
the same machine reuse it and a changed object is fetched again.
"""

from __future__ import annotations

import email.utils
import hashlib
import io
import logging
import os
import queue
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import boto3
import botocore.session
import botocore.utils
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from tasks.errors import StorageError
from tasks.keys import ObjectInfo, unsafe_key_reason

log = logging.getLogger(__name__)

CACHE_ENV = "ACL_CACHE_DIR"
CONCURRENCY_ENV = "ACL_S3_CONCURRENCY"
DEFAULT_CACHE_DIR = "~/.cache/auto-correct-labels"
DEFAULT_CONCURRENCY = 16
# botocore waits 50 ms x 2^attempt (up to 20 s, jittered) after a connection error, so 20
# attempts ride out about two minutes of an unreachable endpoint; throttling backs off longer.
DEFAULT_MAX_ATTEMPTS = 20
# Uploads above this size go multipart (boto3 managed transfer), in parts of CHUNK.
MULTIPART_THRESHOLD = 64 << 20
MULTIPART_CHUNK = 16 << 20
COPY_OBJECT_LIMIT = 5 << 30  # the largest object CopyObject copies in one request
DELETE_OBJECTS_LIMIT = 1000  # the most keys one DeleteObjects request takes
PROGRESS_SECONDS = 10
STREAM_ATTEMPTS = 3  # botocore retries a request, not a body that breaks mid-stream

_STREAM_ERRORS = (ResponseStreamingError, IncompleteReadError, ReadTimeoutError)
_MISSING = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                    "ExpiredToken", "TokenRefreshRequired", "InvalidSecurity"}
_BUSY = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
         "ServiceUnavailable", "503", "InternalError", "500", "RequestTimeout"}
_NOT_SUPPORTED = {"NotImplemented", "501", "InvalidArgument", "InvalidRequest"}
_REFUSED = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_KMS = {"aws:kms", "aws:kms:dsse"}  # encryption whose ETags are not the content MD5


def split_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// URI; the key may be empty (the bucket root)."""
    if not uri.startswith("s3://"):
        raise StorageError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"S3 URI {uri!r} names no bucket; expected s3://bucket/prefix")
    return bucket, key


def cache_dir() -> Path:
    """The local object cache: `ACL_CACHE_DIR`, default ~/.cache/auto-correct-labels."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


# --- the backend ------------------------------------------------------------------------

def _is_aws(endpoint: str) -> bool:
    host = re.sub(r"^\w+://", "", endpoint).split("/")[0].split(":")[0]
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def _third_party_options(core: botocore.session.Session, options: dict[str, Any]) -> None:
    """MinIO, Ceph, SeaweedFS ...: path-style addressing (a bucket is not a DNS name there),
    and checksums only where the API requires them (older servers reject the newer default
    checksum headers). Settings in the environment or ~/.aws/config win."""
    options["s3"] = {"addressing_style": "path"}
    for name in ("request_checksum_calculation", "response_checksum_validation"):
        if core.get_config_variable(name) is None:
            options[name] = "when_required"


def _timestamp(value: Any) -> Any:
    """A response's timestamp, the same datetime as botocore's default parser gives, but fast
    for the timezone-qualified ISO 8601 and HTTP-date forms S3 sends: a listing parses one per
    object, and dateutil's parser was most of a listing's client CPU. Any other form goes to
    botocore."""
    if isinstance(value, str):
        try:
            parsed: datetime | None = datetime.fromisoformat(value)
        except ValueError:
            try:
                parsed = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed
    return botocore.utils.parse_timestamp(value)


def make_client(concurrency: int = DEFAULT_CONCURRENCY, settings: Mapping[str, str] | None = None,
                ) -> tuple[Any, list[str]]:
    """A boto3 S3 client and the credential strings it uses (kept out of messages);
    `settings` (boto3 client arguments: endpoint_url, region_name, keys) win over the
    environment."""
    core = botocore.session.get_session()
    core.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=_timestamp)
    settings = dict(settings or {})
    retries: dict[str, Any] = {}
    if core.get_config_variable("retry_mode") is None:
        retries["mode"] = "standard"
    if core.get_config_variable("max_attempts") is None:
        retries["total_max_attempts"] = DEFAULT_MAX_ATTEMPTS
    options: dict[str, Any] = {"retries": retries, "max_pool_connections": concurrency + 4,
                               "connect_timeout": 10, "read_timeout": 60}
    session = boto3.session.Session(botocore_session=core)
    endpoint = (settings.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))
    if endpoint and not _is_aws(endpoint):
        _third_party_options(core, options)
    client = session.client("s3", config=Config(**options), **settings)
    if "s3" not in options and not _is_aws(client.meta.endpoint_url):  # set in ~/.aws/config
        _third_party_options(core, options)
        client = session.client("s3", config=Config(**options), **settings)
    client.meta.events.register("needs-retry.s3", _log_failed_attempt)
    secrets = [settings.get(k, "") for k in ("aws_access_key_id", "aws_secret_access_key",
                                             "aws_session_token")]
    secrets += [os.environ.get(k, "") for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                "AWS_SESSION_TOKEN")]
    return client, [s for s in secrets if len(s) >= 4]


def _log_failed_attempt(attempts: int = 0, response: Any = None, caught_exception: Any = None,
                        operation: Any = None, **_: Any) -> None:
    """Log each failed S3 attempt (connection error, throttling, 5xx) so a task's log shows
    why it is waiting; botocore decides whether and when to retry."""
    reason = ""
    if caught_exception is not None:
        reason = type(caught_exception).__name__
    elif response is not None:
        status = response[0].status_code
        code = str((response[1] or {}).get("Error", {}).get("Code", ""))
        if status >= 500 or status == 429 or code in _BUSY:
            reason = f"HTTP {status} {code}".strip()
    if reason:
        name = getattr(operation, "name", "request")
        log.warning("S3 %s attempt %d failed (%s)", name, attempts, reason)


def _copy_etag(resp: Mapping[str, Any]) -> str | None:
    """The new object's ETag from a CopyObject response."""
    etag = (resp.get("CopyObjectResult") or {}).get("ETag")
    return str(etag).strip('"') if etag else None


class S3Backend:
    """Objects in an S3-compatible store; the same methods as `storage.LocalBackend`."""

    _shared: ClassVar[S3Backend | None] = None
    _shared_pid: ClassVar[int] = 0
    _shared_settings: ClassVar[dict[str, str]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, client: Any = None, concurrency: int | None = None,
                 page_size: int = 1000, multipart_threshold: int = MULTIPART_THRESHOLD,
                 multipart_chunksize: int = MULTIPART_CHUNK,
                 settings: Mapping[str, str] | None = None) -> None:
        self.concurrency = concurrency or int(os.environ.get(CONCURRENCY_ENV)
                                              or DEFAULT_CONCURRENCY)
        if client is None:
            client, self._secrets = make_client(self.concurrency, settings)
        else:
            self._secrets = []
        self.client = client
        self.page_size = page_size
        self.multipart_threshold = multipart_threshold
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                       multipart_chunksize=multipart_chunksize,
                                       max_concurrency=min(self.concurrency, 10))
        self._conditional_copy: bool | None = None  # unknown until the server answers
        self._conditional_put: bool | None = None
        self._multi_delete: bool | None = None
        self._refuses_overwrite: dict[str, bool] = {}  # per bucket, once probed
        self._probe_lock = threading.Lock()

    @classmethod
    def shared(cls, settings: Mapping[str, str] | None = None) -> S3Backend:
        """One backend (one client and connection pool) per process and `settings` (see
        `make_client`); a forked child makes its own, since boto3 clients do not survive a
        fork."""
        settings = dict(settings or {})
        with cls._lock:
            if (cls._shared is None or cls._shared_pid != os.getpid()
                    or cls._shared_settings != settings):
                cls._shared = cls(settings=settings)
                cls._shared_pid, cls._shared_settings = os.getpid(), settings
            return cls._shared

    @classmethod
    def reset_shared(cls) -> None:
        """Forget the shared backend (the next call reads the environment again)."""
        with cls._lock:
            cls._shared = None

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    # --- errors -------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _client_error(self, err: ClientError, uri: str, action: str) -> StorageError:
        error = err.response.get("Error", {})
        code = str(error.get("Code") or err.response.get("ResponseMetadata", {})
                   .get("HTTPStatusCode", ""))
        bucket = split_uri(uri)[0]
        if code == "NoSuchBucket":
            return StorageError(f"bucket {bucket!r} does not exist ({uri})")
        if code in _MISSING:
            return StorageError(f"{uri} does not exist")
        if code in _BAD_CREDENTIALS:
            return StorageError(
                f"S3 rejected the credentials ({code}) to {action} {uri}; check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS connection")
        if code in _DENIED:
            if self._bucket_missing(bucket):  # some servers deny writes to a missing bucket
                return StorageError(f"bucket {bucket!r} does not exist ({uri})")
            return StorageError(f"access denied: cannot {action} {uri}; check that these "
                                "credentials may do that in this bucket")
        if code in _BUSY:
            return StorageError(f"S3 is throttling or unavailable ({code}) and did not "
                                f"recover after retries: cannot {action} {uri}; try again later")
        message = self._redact(str(error.get("Message", "")))[:200]
        return StorageError(f"S3 error {code} when trying to {action} {uri}: {message}")

    def _bucket_missing(self, bucket: str) -> bool:
        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError as err:
            return str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket")
        except BotoCoreError:
            return False
        return False

    @contextmanager
    def _errors(self, uri: str, action: str) -> Iterator[None]:
        """Turn botocore errors into StorageErrors that name the URI and the endpoint."""
        try:
            yield
        except ClientError as err:
            raise self._client_error(err, uri, action) from None
        except (NoCredentialsError, PartialCredentialsError):
            raise StorageError(
                f"no S3 credentials found to {action} {uri}; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or a profile, an instance role, the AWS connection)"
            ) from None
        except BotoCoreError as err:
            raise StorageError(
                f"cannot {action} {uri}: S3 endpoint {self.endpoint} did not answer after "
                f"retries ({type(err).__name__}: {self._redact(str(err))[:200]})") from None

    # --- the storage interface ----------------------------------------------------------

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = split_uri(uri)
        with self._errors(uri, "read"):
            for attempt in range(1, STREAM_ATTEMPTS + 1):
                try:
                    return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
                except _STREAM_ERRORS:
                    if attempt == STREAM_ATTEMPTS:
                        raise
                    time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def write_bytes(self, uri: str, data: bytes) -> None:
        """One full-object PUT (multipart above MULTIPART_THRESHOLD): readers see the old
        object or the new one, never a part."""
        bucket, key = split_uri(uri)
        with self._errors(uri, "write"):
            if len(data) <= self.multipart_threshold:
                self.client.put_object(Bucket=bucket, Key=key, Body=data)
            else:
                self.client.upload_fileobj(io.BytesIO(data), bucket, key, Config=self.transfer)

    def create(self, uri: str, data: bytes) -> bool:
        """A conditional PUT (If-None-Match: *); where the server does not support it, an
        existence check and a plain PUT."""
        bucket, key = split_uri(uri)
        with self._errors(uri, "write"):
            if self._conditional_put is not False:
                try:
                    self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                    self._conditional_put = True
                    return True
                except ClientError as err:
                    code = str(err.response.get("Error", {}).get("Code"))
                    if code in _REFUSED:
                        return False
                    if code not in _NOT_SUPPORTED or self._conditional_put:
                        raise
                    log.info("this S3 server does not support conditional writes (%s); "
                             "relying on the existence check", code)
                    self._conditional_put = False
            if self.head(uri) is not None:
                return False
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
            return True

    def write_file(self, uri: str, src: Path) -> None:
        """Upload a local file, streamed from disk (multipart above MULTIPART_THRESHOLD)."""
        bucket, key = split_uri(uri)
        with self._errors(uri, "write"):
            self.client.upload_file(str(src), bucket, key, Config=self.transfer)

    def exists(self, uri: str) -> bool:
        return self.head(uri) is not None

    def _head_object(self, uri: str) -> dict[str, Any] | None:
        """The HEAD response of the object at `uri`, or None if it (or its bucket) is absent."""
        bucket, key = split_uri(uri)
        if not key:
            return None
        with self._errors(uri, "read"):
            try:
                return self.client.head_object(Bucket=bucket, Key=key)
            except ClientError as err:
                if str(err.response.get("Error", {}).get("Code")) in _MISSING | {"NoSuchBucket"}:
                    return None
                raise

    def head(self, uri: str) -> ObjectInfo | None:
        resp = self._head_object(uri)
        if resp is None:
            return None
        return ObjectInfo(key=PurePosixPath(split_uri(uri)[1]).name,
                          size=int(resp["ContentLength"]), etag=str(resp["ETag"]).strip('"'))

    def list(self, root: str) -> Iterator[ObjectInfo]:
        """Every object under the prefix `root`, keys relative to it, sorted. Folder
        markers (keys ending in '/') are skipped. A prefix without objects is an error."""
        found = [info for page in self.list_pages(root) for info in page]
        found.sort(key=lambda info: info.key)
        yield from found

    def list_pages(self, root: str) -> Iterator[list[ObjectInfo]]:
        """What `list` finds, page by page and unsorted: the objects directly under `root`
        first, then every top-level folder (class prefix) listed concurrently, pages
        handed over through a bounded queue so memory holds a few pages, not the bucket."""
        bucket, prefix = split_uri(root)
        prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        folders: list[str] = []
        seen = 0
        for contents, common in self._pages(bucket, prefix, root, delimiter="/"):
            seen += len(contents) + len(common)
            folders += common
            page = self._infos(contents, prefix)
            if page:
                yield page
        if seen == 0:
            raise StorageError(f"{root} is empty or does not exist: no objects under prefix "
                               f"{prefix!r} in bucket {bucket!r}")
        yield from self._folder_pages(bucket, prefix, root, folders)

    def _folder_pages(self, bucket: str, prefix: str, root: str,
                      folders: list[str]) -> Iterator[list[ObjectInfo]]:
        """The pages of each folder, listed by up to `concurrency` threads."""
        if not folders:
            return
        pages: queue.Queue = queue.Queue(maxsize=4 * self.concurrency)
        stop = threading.Event()

        def put(item: object) -> None:
            while not stop.is_set():
                try:
                    pages.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def work(folder: str) -> None:
            try:
                for contents, _ in self._pages(bucket, folder, root):
                    if stop.is_set():
                        return
                    put(self._infos(contents, prefix))
            except BaseException as err:  # handed to the consumer, raised there
                put(err)
            finally:
                put(None)

        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(folders)))
        try:
            for folder in folders:
                pool.submit(work, folder)
            finished = 0
            while finished < len(folders):
                item = pages.get()
                if item is None:
                    finished += 1
                elif isinstance(item, BaseException):
                    raise item
                elif item:
                    yield item
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def _pages(self, bucket: str, prefix: str, root: str,
               delimiter: str = "") -> Iterator[tuple[list[dict], list[str]]]:
        """(objects, common prefixes) of each page of one listing request."""
        start_after = ""
        while True:
            # Pages continue after the last key (StartAfter), not with the continuation
            # token: some servers (SeaweedFS 4.x) mangle a token holding a control
            # character and end the listing early. After a common prefix, StartAfter is the
            # prefix followed by the highest code point, past every key below it.
            args: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": self.page_size}
            if delimiter:
                args["Delimiter"] = delimiter
            if start_after:
                args["StartAfter"] = start_after
            with self._errors(root, "list"):
                page = self.client.list_objects_v2(**args)
            contents = page.get("Contents", [])
            common = [p["Prefix"] for p in page.get("CommonPrefixes", [])]
            yield contents, common
            if not page.get("IsTruncated"):
                return
            ends = [contents[-1]["Key"]] if contents else []
            ends += [common[-1] + "\U0010ffff"] if common else []
            if not ends or max(ends) <= start_after:
                raise StorageError(f"listing {root} stopped advancing at {start_after!r}")
            start_after = max(ends)

    @staticmethod
    def _infos(contents: list[dict], prefix: str) -> list[ObjectInfo]:
        """Listed objects, keys relative to `prefix`, folder markers left out."""
        out = []
        for obj in contents:
            rel = obj["Key"][len(prefix):]
            if rel and not rel.endswith("/"):
                out.append(ObjectInfo(key=rel, size=int(obj["Size"]),
                                      etag=str(obj["ETag"]).strip('"')))
        return out

    def copy(self, src: str, dst: str, expect: ObjectInfo | None = None) -> str | None:
        """Server-side copy that never overwrites: a HEAD check first, then a conditional
        write (If-None-Match: *) where the server supports it. With `expect` (the source as
        the caller last saw it), the source is not looked up again and is copied only if its
        ETag is still `expect.etag` (CopySourceIfMatch). Returns the copy's ETag (None after
        a multipart copy)."""
        (src_bucket, src_key), (dst_bucket, dst_key) = split_uri(src), split_uri(dst)
        info = expect or self.head(src)
        if info is None:
            raise StorageError(f"{src} does not exist")
        # The managed multipart copy (over COPY_OBJECT_LIMIT) sends no If-None-Match.
        conditional = info.size <= COPY_OBJECT_LIMIT and self._overwrite_refused(dst_bucket,
                                                                                 dst_key)
        if not conditional and self.head(dst) is not None:
            raise StorageError(f"refusing to overwrite {dst}")
        source = {"Bucket": src_bucket, "Key": src_key}
        match = {"CopySourceIfMatch": f'"{expect.etag}"'} if expect else {}
        refused = (f"refusing to overwrite {dst}" if expect is None else
                   f"refusing to copy {src} to {dst}: {dst} exists, or {src} is no longer "
                   f"ETag {expect.etag}")
        with self._errors(dst, "copy to"):
            try:
                if info.size > COPY_OBJECT_LIMIT:
                    self.client.copy(source, dst_bucket, dst_key, ExtraArgs=match,
                                     Config=self.transfer)
                    return None
                if self._conditional_copy is not False:
                    try:
                        resp = self.client.copy_object(Bucket=dst_bucket, Key=dst_key,
                                                       CopySource=source, IfNoneMatch="*",
                                                       **match)
                        self._conditional_copy = True
                        return _copy_etag(resp)
                    except ClientError as err:
                        code = str(err.response.get("Error", {}).get("Code"))
                        if code in _REFUSED:
                            raise StorageError(refused) from None
                        if code not in _NOT_SUPPORTED or self._conditional_copy:
                            raise
                        log.info("this S3 server does not support conditional copies (%s); "
                                 "relying on the existence check", code)
                        self._conditional_copy = False
                resp = self.client.copy_object(Bucket=dst_bucket, Key=dst_key,
                                               CopySource=source, **match)
                return _copy_etag(resp)
            except ClientError as err:
                code = str(err.response.get("Error", {}).get("Code"))
                if code in _MISSING:  # the source: the destination is written, never read
                    raise StorageError(f"{src} does not exist") from None
                if code in ("PreconditionFailed", "412"):
                    raise StorageError(refused) from None
                raise

    def _overwrite_refused(self, bucket: str, key: str) -> bool:
        """Whether this server is proven to refuse a conditional copy (If-None-Match: *) onto
        an existing object of `bucket`, so that a copy needs no HEAD of its destination
        first: tried once per bucket with two hidden probe objects beside `key`, deleted
        right after (a server that ignores the condition keeps the HEAD check)."""
        with self._probe_lock:
            if bucket not in self._refuses_overwrite:
                self._refuses_overwrite[bucket] = self._probe_overwrite(bucket, key)
            return self._refuses_overwrite[bucket]

    def _probe_overwrite(self, bucket: str, key: str) -> bool:
        folder = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
        a, b = (f"{folder}.acl-overwrite-probe-{os.urandom(6).hex()}-{x}" for x in "ab")
        try:
            self.client.put_object(Bucket=bucket, Key=a, Body=b"a")
            self.client.put_object(Bucket=bucket, Key=b, Body=b"b")
            try:
                self.client.copy_object(Bucket=bucket, Key=b, IfNoneMatch="*",
                                        CopySource={"Bucket": bucket, "Key": a})
            except ClientError as err:
                if str(err.response.get("Error", {}).get("Code")) in _REFUSED:
                    return True
                raise
            log.info("this S3 server does not refuse a conditional copy onto an existing "
                     "object; every copy checks its destination first")
            return False
        except (ClientError, BotoCoreError) as err:
            log.info("could not check whether this S3 server refuses overwrites (%s); every "
                     "copy checks its destination first", self._redact(str(err))[:200])
            return False
        finally:
            for k in (a, b):
                try:
                    self.client.delete_object(Bucket=bucket, Key=k)
                except (ClientError, BotoCoreError):
                    log.warning("could not delete the probe object s3://%s/%s", bucket, k)

    def delete(self, uri: str) -> None:
        bucket, key = split_uri(uri)
        with self._errors(uri, "delete"):
            self.client.delete_object(Bucket=bucket, Key=key)

    def delete_many(self, uris: list[str]) -> None:
        by_bucket: dict[str, list[str]] = {}
        for uri in uris:
            bucket, key = split_uri(uri)
            by_bucket.setdefault(bucket, []).append(key)
        for bucket, keys in by_bucket.items():
            for a in range(0, len(keys), DELETE_OBJECTS_LIMIT):
                self._delete_objects(bucket, keys[a:a + DELETE_OBJECTS_LIMIT])

    def _delete_objects(self, bucket: str, keys: list[str]) -> None:
        if self._multi_delete is False:
            for key in keys:
                self.delete(f"s3://{bucket}/{key}")
            return
        with self._errors(f"s3://{bucket}/{keys[0]}", "delete"):
            try:
                resp = self.client.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})
                self._multi_delete = True
            except ClientError as err:
                code = str(err.response.get("Error", {}).get("Code"))
                if code not in _NOT_SUPPORTED or self._multi_delete:
                    raise
                log.info("this S3 server has no multi-object delete (%s); deleting one object "
                         "per request", code)
                self._multi_delete = False
                self._delete_objects(bucket, keys)
                return
        failed = [e for e in resp.get("Errors") or [] if str(e.get("Code")) not in _MISSING]
        if failed:
            first = failed[0]
            raise StorageError(
                f"could not delete {len(failed)} of {len(keys)} objects, the first "
                f"s3://{bucket}/{first.get('Key')} ({first.get('Code')}: "
                f"{self._redact(str(first.get('Message', '')))[:200]})")

    def etags_are_md5(self, uri: str) -> bool:
        resp = self._head_object(uri)
        if resp is None:
            return False
        return (re.fullmatch(r"[0-9a-f]{32}", str(resp["ETag"]).strip('"')) is not None
                and resp.get("ServerSideEncryption") not in _KMS
                and not resp.get("SSECustomerAlgorithm"))

    def local_path(self, uri: str) -> str:
        return self.fetch_many([uri])[0]

    def fetch_many(self, uris: list[str], etags: list[str] | None = None) -> list[str]:
        """Download objects into the local cache (bounded parallelism) and return their
        local paths, in order. Objects already cached at the same ETag are not fetched
        again. Keys that could name a path outside the cache are rejected."""
        if not uris:
            return []
        parts = [split_uri(u) for u in uris]
        bad = [(u, r) for u, (_, k) in zip(uris, parts, strict=True)
               if (r := unsafe_key_reason(k))]
        if bad:
            shown = "; ".join(f"{u!r}: {r}" for u, r in bad[:3])
            raise StorageError(f"refusing to fetch {len(bad)} object(s) with unsafe keys: "
                               f"{shown}")
        if etags is None:
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                infos = list(pool.map(self.head, uris))
            missing = [u for u, i in zip(uris, infos, strict=True) if i is None]
            if missing:
                raise StorageError(f"{missing[0]} does not exist"
                                   + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                      else ""))
            etags = [i.etag for i in infos if i is not None]
        try:
            cache_dir().mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"cannot create the object cache {cache_dir()} ({err.strerror}); "
                               f"set {CACHE_ENV} to a writable folder") from None
        paths = [self._cache_path(b, k, e) for (b, k), e in zip(parts, etags, strict=True)]
        todo = [i for i, p in enumerate(paths) if not p.is_file()]
        if todo:
            self._download_all([(uris[i], etags[i], paths[i]) for i in todo], len(uris))
        return [str(p) for p in paths]

    def _download_all(self, jobs: list[tuple[str, str, Path]], total: int) -> None:
        """Download in parallel, logging progress every PROGRESS_SECONDS; the first error
        cancels what has not started and is raised."""
        t0 = last = time.perf_counter()
        size = 0
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = [pool.submit(self._download, *job) for job in jobs]
            for n, future in enumerate(as_completed(futures), 1):
                size += future.result()
                now = time.perf_counter()
                if now - last >= PROGRESS_SECONDS and n < len(jobs):
                    log.info("fetched %d/%d objects (%.0f objects/s)", n, len(jobs),
                             n / (now - t0))
                    last = now
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        secs = time.perf_counter() - t0
        log.info("fetched %d of %d objects (%.1f MiB) into %s in %.1fs (%.0f objects/s)",
                 len(jobs), total, size / 2**20, cache_dir(), secs, len(jobs) / max(secs, 1e-9))

    # --- the cache ----------------------------------------------------------------------

    def _cache_path(self, bucket: str, key: str, etag: str) -> Path:
        """Where one version of one object lives in the cache: a hash of endpoint, bucket,
        key and ETag (never the key itself, so no key can name a path), plus its suffix."""
        digest = hashlib.sha256(f"{self.endpoint}\n{bucket}\n{key}\n{etag}".encode())
        name = digest.hexdigest()[:40]
        suffix = PurePosixPath(key).suffix
        if re.fullmatch(r"\.[A-Za-z0-9]{1,10}", suffix):
            name += suffix.lower()
        return cache_dir() / "s3" / name[:2] / name

    def _download(self, uri: str, etag: str, path: Path) -> int:
        """Fetch one object into `path` atomically; returns its size."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(uri, "read"):
            for attempt in range(1, STREAM_ATTEMPTS + 1):
                try:
                    return self._download_once(uri, etag, path)
                except _STREAM_ERRORS:
                    if attempt == STREAM_ATTEMPTS:
                        raise
                    time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def _download_once(self, uri: str, etag: str, path: Path) -> int:
        bucket, key = split_uri(uri)
        resp = self.client.get_object(Bucket=bucket, Key=key)
        got = str(resp["ETag"]).strip('"')
        if got != etag:
            resp["Body"].close()
            raise StorageError(f"{uri} changed since it was listed (ETag {got}, expected "
                               f"{etag}); re-run the audit to index it again")
        expected = int(resp["ContentLength"])
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            size = 0
            with os.fdopen(fd, "wb") as f:
                for chunk in resp["Body"].iter_chunks(1 << 20):
                    f.write(chunk)
                    size += len(chunk)
            if size != expected:
                raise IncompleteReadError(actual_bytes=size, expected_bytes=expected)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return size
