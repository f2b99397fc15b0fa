"""Object storage against a real S3 server (SeaweedFS, started by tests/conftest.py): the
backend, its errors and cache, bad keys, audits and relabelling in the bucket, a server
restart mid-audit, and credentials that never leak."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from tasks import storage
from tasks.config import AuditConfig
from tasks.s3 import S3Backend
from tests.s3server import READER_KEY, READER_SECRET, SECRETS, free_ports

# --- helpers ----------------------------------------------------------------------------


def put(s3, key: str, data: bytes) -> None:
    s3.server.client().put_object(Bucket=s3.bucket, Key=key, Body=data)


def keys_under(s3, prefix: str) -> list[str]:
    client, out, token = s3.server.client(), [], None
    while True:
        args = {"Bucket": s3.bucket, "Prefix": prefix}
        if token:
            args["ContinuationToken"] = token
        page = client.list_objects_v2(**args)
        out += [o["Key"] for o in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
        if not token:
            return out


def snapshot(s3, prefix: str) -> dict[str, str]:
    """key -> MD5 of the content of every object under prefix (read with a plain client)."""
    client = s3.server.client()
    return {k[len(prefix):]: hashlib.md5(client.get_object(Bucket=s3.bucket, Key=k)["Body"]
                                         .read()).hexdigest()
            for k in keys_under(s3, prefix)}


def upload_folder(s3, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            put(s3, f"{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())


def assert_no_secrets(text: str | bytes, where: str) -> None:
    data = text.encode() if isinstance(text, str) else text
    for secret in SECRETS:
        assert secret.encode() not in data, f"credential found in {where}"


# --- the backend ------------------------------------------------------------------------


def test_backend_roundtrip_list_copy_delete(s3):
    backend = S3Backend(page_size=2)  # several pages for a handful of keys
    root = s3.root
    for key in ["b/2.png", "a/1.png", "b/\x01ctl.png", "a/z.png", "c/deep/3.png"]:
        backend.write_bytes(f"{root}/{key}", key.encode())
    put(s3, f"{s3.prefix}/c/", b"")  # a folder marker, as consoles create them
    listing = list(backend.list(root + "/"))
    # Every key, relative to the root, sorted; the page boundary after a key with a
    # control character does not end the listing early.
    assert [i.key for i in listing] == ["a/1.png", "a/z.png", "b/\x01ctl.png", "b/2.png",
                                        "c/deep/3.png"]
    assert [i.size for i in listing] == [len(i.key) for i in listing]
    assert listing[0].etag == hashlib.md5(b"a/1.png").hexdigest()

    assert backend.read_bytes(f"{root}/a/1.png") == b"a/1.png"
    assert backend.exists(f"{root}/a/1.png") and not backend.exists(f"{root}/a/nope.png")
    assert backend.head(f"{root}/nope") is None

    backend.copy(f"{root}/a/1.png", f"{root}/d/1.png")
    src, dst = backend.head(f"{root}/a/1.png"), backend.head(f"{root}/d/1.png")
    assert (dst.size, dst.etag) == (src.size, src.etag)  # single-part: same ETag
    with pytest.raises(storage.StorageError, match="refusing to overwrite"):
        backend.copy(f"{root}/a/z.png", f"{root}/d/1.png")
    assert backend.read_bytes(f"{root}/d/1.png") == b"a/1.png"
    backend.delete(f"{root}/d/1.png")
    backend.delete(f"{root}/d/1.png")  # already gone: no error
    assert not backend.exists(f"{root}/d/1.png")

    # The module functions route s3:// URIs here.
    storage.write_text(f"{root}/t.txt", "héllo")
    assert storage.read_text(f"{root}/t.txt") == "héllo"


def test_conditional_copy_refuses_overwrite_without_head_check(s3, monkeypatch):
    """The server-side If-None-Match guard alone stops an overwrite (the race the HEAD
    check cannot see)."""
    backend = S3Backend()
    backend.write_bytes(f"{s3.root}/src.png", b"new")
    backend.write_bytes(f"{s3.root}/dst.png", b"old")
    real_head = backend.head
    monkeypatch.setattr(backend, "head",
                        lambda uri: None if uri.endswith("dst.png") else real_head(uri))
    with pytest.raises(storage.StorageError, match="refusing to overwrite"):
        backend.copy(f"{s3.root}/src.png", f"{s3.root}/dst.png")
    assert backend.read_bytes(f"{s3.root}/dst.png") == b"old"


def test_multipart_upload_for_large_objects(s3):
    backend = S3Backend(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    data = os.urandom((6 << 20) + 123)
    backend.write_bytes(f"{s3.root}/big.bin", data)
    info = backend.head(f"{s3.root}/big.bin")
    assert info.etag.endswith("-2")  # two parts
    assert backend.read_bytes(f"{s3.root}/big.bin") == data
    path = backend.local_path(f"{s3.root}/big.bin")
    assert Path(path).read_bytes() == data and Path(path).is_relative_to(s3.cache)


def test_fetch_many_caches_by_etag_and_rejects_unsafe_keys(s3):
    backend = S3Backend.shared()
    assert backend is S3Backend.shared()  # one client per process
    uris = [f"{s3.root}/c{i % 2}/{i}.png" for i in range(6)]
    for i, uri in enumerate(uris):
        backend.write_bytes(uri, f"image {i}".encode())
    gets = []
    backend.client.meta.events.register("before-call.s3.GetObject",
                                        lambda **kw: gets.append(1))
    paths = storage.fetch_many(uris)
    assert [Path(p).read_bytes() for p in paths] == [f"image {i}".encode() for i in range(6)]
    assert all(Path(p).is_relative_to(s3.cache) for p in paths) and len(gets) == 6

    # A second trainer on this machine: nothing is downloaded again.
    etags = [backend.head(u).etag for u in uris]
    assert storage.fetch_many(uris, etags) == paths and len(gets) == 6
    # A changed object is fetched again (a new cache entry); the others are reused.
    backend.write_bytes(uris[2], b"image 2, relabelled elsewhere")
    new_etags = [backend.head(u).etag for u in uris]
    again = storage.fetch_many(uris, new_etags)
    assert len(gets) == 7 and again[2] != paths[2] and again[:2] == paths[:2]
    assert Path(again[2]).read_bytes() == b"image 2, relabelled elsewhere"
    # Asking for a version that is neither cached nor in the bucket any more is an error,
    # not a silent mix of versions.
    late = f"{s3.root}/c0/late.png"
    backend.write_bytes(late, b"as indexed")
    indexed = backend.head(late).etag
    backend.write_bytes(late, b"changed after indexing")
    with pytest.raises(storage.StorageError, match="late.png changed since it was listed"):
        storage.fetch_many([late], [indexed])

    before = sorted(p for p in s3.cache.rglob("*"))
    for bad in [f"s3://{s3.bucket}/{s3.prefix}/../../escape.png",
                f"s3://{s3.bucket}//abs.png", f"{s3.root}/c0/\x07bell.png",
                f"{s3.root}/c0/./x.png"]:
        with pytest.raises(storage.StorageError, match="unsafe key"):
            storage.fetch_many([uris[0], bad])
    assert sorted(p for p in s3.cache.rglob("*")) == before


def test_errors_name_the_uri_and_never_the_credentials(s3, monkeypatch, tmp_path, capsys):
    from tasks import cli

    backend = S3Backend()
    messages = []

    def fails(fn, match):
        with pytest.raises(storage.StorageError, match=match) as err:
            fn()
        messages.append(str(err.value))

    fails(lambda: list(backend.list("s3://acl-no-such-bucket/data")),
          "bucket 'acl-no-such-bucket' does not exist")
    fails(lambda: backend.read_bytes("s3://acl-no-such-bucket/x.png"),
          "bucket 'acl-no-such-bucket' does not exist")
    fails(lambda: backend.read_bytes(f"{s3.root}/missing.png"), "missing.png does not exist")
    fails(lambda: list(backend.list(f"{s3.root}/empty/")),
          r"acl-test/.*/empty/ is empty or does not exist")

    # A missing prefix as the dataset root: one line from the CLI, exit code 2.
    code = cli.main(["audit", "--set", f"data_path={s3.root}/no-data",
                     "--set", f"work_uri={s3.root}/work"])
    err = capsys.readouterr().err
    assert code == 2 and "no-data is empty or does not exist" in err
    assert "Traceback" not in err
    messages.append(err)

    # Credentials that may only read another bucket; a wrong secret.
    backend.write_bytes(f"{s3.root}/private.png", b"x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER_SECRET)
    reader = S3Backend()
    fails(lambda: reader.read_bytes(f"{s3.root}/private.png"), "access denied: cannot read")
    fails(lambda: list(reader.list(s3.root)), "access denied: cannot list")
    fails(lambda: reader.write_bytes(f"s3://{s3.server.reader_bucket}/x", b"x"),
          "access denied: cannot write")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "acl-fake-wrong-secret-NEVER-PRINT")
    fails(lambda: S3Backend().read_bytes(f"{s3.root}/private.png"),
          "S3 rejected the credentials")

    # Nobody answers at the endpoint: retried with backoff, then a clear error.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_ports(1)[0]}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    t0 = time.monotonic()
    fails(lambda: S3Backend().read_bytes(f"{s3.root}/private.png"),
          r"cannot read s3://.*private.png: S3 endpoint http://127.0.0.1:\d+ did not answer")
    assert time.monotonic() - t0 < 20

    for message in messages:
        assert_no_secrets(message, f"error message {message!r}")
        assert "acl-fake-wrong-secret" not in message


def test_md5_verifies_a_copy_whose_etag_differs(s3):
    """A server-side copy of a multipart or encrypted object gets a new ETag; relabel then
    compares content (MD5 taken at plan time) instead of failing or trusting blindly."""
    from tasks.relabel import Move, _same

    uri = f"{s3.root}/x.png"
    storage.write_bytes(uri, b"pixels")
    info = storage.head(uri)
    md5 = hashlib.md5(b"pixels").hexdigest()
    move = Move(src="a/x.png", dst="b/x.png", label="a", corrected_label="b", pct=100.0,
                num_preds=2, size=6, etag="0123abcd-2", md5=md5)
    assert _same(info, uri, move)
    assert not _same(info, uri, Move(**{**move.__dict__, "md5": "0" * 32}))
    assert not _same(info, uri, Move(**{**move.__dict__, "md5": ""}))
    assert not _same(info, uri, Move(**{**move.__dict__, "size": 7}))


def test_airflow_connection_supplies_endpoint_and_credentials(s3, tmp_path):
    """Inside Airflow (airflow imported) without AWS_* variables, the `aws_default`
    connection names the endpoint and credentials; the server checks the signature."""
    storage.write_bytes(f"{s3.root}/conn/a.png", b"a")
    conn = {"conn_type": "aws", "login": s3.server.env()["AWS_ACCESS_KEY_ID"],
            "password": s3.server.env()["AWS_SECRET_ACCESS_KEY"],
            "extra": {"endpoint_url": s3.server.endpoint, "region_name": "us-east-1"}}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") or k == "AWS_EC2_METADATA_DISABLED"}
    env["AIRFLOW_CONN_AWS_DEFAULT"] = json.dumps(conn)
    code = ("import airflow.sdk, sys\n"
            "from tasks import storage\n"
            "from tasks.s3 import S3Backend\n"
            f"print(S3Backend.shared().endpoint, [i.key for i in storage.list_objects("
            f"'{s3.root}/conn')])\n"
            "env = storage.subprocess_env()\n"
            "print(sorted(env), env['AWS_ENDPOINT_URL_S3'])\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == f"{s3.server.endpoint} ['a.png']"
    assert lines[1] == (f"['AWS_ACCESS_KEY_ID', 'AWS_DEFAULT_REGION', 'AWS_ENDPOINT_URL_S3', "
                        f"'AWS_SECRET_ACCESS_KEY'] {s3.server.endpoint}")
    assert_no_secrets(out.stderr, "the log of a process using the Airflow connection")
