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
import time
from collections import Counter
from datetime import UTC
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


def test_timestamps_parse_as_botocore_parses_them(s3):
    """The backend's client parses timestamps itself (dateutil's parser was most of a
    listing's CPU): the same instants as botocore's parser, from this server's answers and
    from the other forms S3 servers send."""
    from botocore.utils import parse_timestamp

    from tasks.s3 import _timestamp
    for value in ["2026-12-02T06:42:09.123Z", "2026-12-02T06:42:09Z",
                  "2026-12-02T06:42:09.123456+00:00", "2026-12-02T08:42:09+02:00",
                  "Wed, 02 Dec 2026 06:42:09 GMT", "2026-12-02T06:42:09", "1764657729",
                  1764657729, 1764657729.5]:
        ours, theirs = _timestamp(value), parse_timestamp(value)
        assert ours == theirs and (ours.tzinfo is None) == (theirs.tzinfo is None), value
    put(s3, f"{s3.prefix}/t/1.png", b"x")
    answers = []
    for c in (S3Backend().client, s3.server.client()):
        head = c.head_object(Bucket=s3.bucket, Key=f"{s3.prefix}/t/1.png")
        listed = c.list_objects_v2(Bucket=s3.bucket, Prefix=f"{s3.prefix}/t/")["Contents"][0]
        answers.append([head["LastModified"], listed["LastModified"]])
    ours, theirs = answers
    assert ours == theirs
    # dateutil (a stock client) gives its own tzutc: these came from the backend's parser.
    assert all(t.tzinfo is UTC for t in ours)


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


def test_copies_skip_the_destination_check_once_the_server_refuses_overwrites(s3):
    """SeaweedFS refuses a conditional copy onto an existing object: proven once per bucket
    with two hidden probe objects (gone afterwards), then a copy is one request."""
    backend = S3Backend()
    for i in range(2):
        backend.write_bytes(f"{s3.root}/a/{i}.png", b"x%d" % i)
    infos = [backend.head(f"{s3.root}/a/{i}.png") for i in range(2)]
    calls = []
    for op in ("HeadObject", "CopyObject", "PutObject"):
        backend.client.meta.events.register(f"before-call.s3.{op}",
                                            lambda op=op, **kw: calls.append(op))
    backend.copy(f"{s3.root}/a/0.png", f"{s3.root}/b/0.png", expect=infos[0])
    # The probe (two objects written, a refused copy between them), then the copy.
    assert calls == ["PutObject", "PutObject", "CopyObject", "CopyObject"]
    calls.clear()
    backend.copy(f"{s3.root}/a/1.png", f"{s3.root}/b/1.png", expect=infos[1])
    assert calls == ["CopyObject"]
    assert backend._refuses_overwrite == {s3.bucket: True}
    assert [k for k in keys_under(s3, s3.prefix) if "probe" in k] == []
    with pytest.raises(storage.StorageError, match="refusing to copy"):
        backend.copy(f"{s3.root}/a/1.png", f"{s3.root}/b/0.png", expect=infos[1])
    assert backend.read_bytes(f"{s3.root}/b/0.png") == b"x0"


def test_delete_many_in_batches_and_one_by_one_where_unsupported(s3, monkeypatch):
    from botocore.exceptions import ClientError

    monkeypatch.setattr("tasks.s3.DELETE_OBJECTS_LIMIT", 2)
    backend = S3Backend()
    uris = [f"{s3.root}/d/{i}.png" for i in range(5)]
    for uri in uris:
        backend.write_bytes(uri, b"x")
    requests = []
    backend.client.meta.events.register("before-call.s3.DeleteObjects",
                                        lambda **kw: requests.append(1))
    backend.delete_many([*uris[:3], f"{s3.root}/d/missing.png"])
    assert len(requests) == 2 and keys_under(s3, f"{s3.prefix}/d/") == [
        f"{s3.prefix}/d/3.png", f"{s3.prefix}/d/4.png"]

    def unsupported(**kw):  # what a server without multi-object delete answers
        raise ClientError({"Error": {"Code": "NotImplemented", "Message": "no"}},
                          "DeleteObjects")

    other = S3Backend()
    other.client.meta.events.register("before-call.s3.DeleteObjects", unsupported)
    other.delete_many(uris[3:])
    assert keys_under(s3, f"{s3.prefix}/d/") == [] and other._multi_delete is False
    with pytest.raises(storage.StorageError, match="NotImplemented"):  # supported before
        backend.client.meta.events.register("before-call.s3.DeleteObjects", unsupported)
        backend.delete_many(uris[3:])


def test_single_part_etags_are_md5s_and_multipart_ones_are_not(s3):
    backend = S3Backend(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    backend.write_bytes(f"{s3.root}/small.png", b"pixels")
    backend.write_bytes(f"{s3.root}/big.bin", os.urandom((6 << 20) + 1))
    assert storage.etags_are_md5(f"{s3.root}/small.png")
    assert not backend.etags_are_md5(f"{s3.root}/big.bin")
    assert not backend.etags_are_md5(f"{s3.root}/missing.png")


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
    with pytest.raises(storage.StorageError, match=r"late\.png changed since it was listed"):
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

    backend.write_bytes(f"{s3.root}/private.png", b"x")

    # A cache folder that cannot be created.
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("ACL_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    fails(lambda: backend.local_path(f"{s3.root}/private.png"),
          "cannot create the object cache .* set ACL_CACHE_DIR to a writable folder")

    # Credentials that may only read another bucket; a wrong secret.
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
    """Inside Airflow without AWS_* variables, the `aws_default` connection (handed to the
    storage layer by the adapter, as every task body does) names the endpoint and
    credentials; the server checks the signature."""
    storage.write_bytes(f"{s3.root}/conn/a.png", b"a")
    conn = {"conn_type": "aws", "login": s3.server.env()["AWS_ACCESS_KEY_ID"],
            "password": s3.server.env()["AWS_SECRET_ACCESS_KEY"],
            "extra": {"endpoint_url": s3.server.endpoint, "region_name": "us-east-1"}}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") or k == "AWS_EC2_METADATA_DISABLED"}
    env["AIRFLOW_CONN_AWS_DEFAULT"] = json.dumps(conn)
    code = ("from tasks import airflow_adapter, storage\n"
            "from tasks.s3 import S3Backend\n"
            "settings = airflow_adapter.use_aws_connection()\n"
            f"print(S3Backend.shared(settings).endpoint, [i.key for i in storage.list_objects("
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


def test_the_shared_backend_follows_the_configured_settings(monkeypatch):
    """One client per process and settings: new settings (another connection) get a new
    client, the same settings the same one."""
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    one = {"endpoint_url": "http://one.example:9000", "region_name": "us-east-1"}
    S3Backend.reset_shared()
    try:
        backend = S3Backend.shared(one)
        assert backend.endpoint == "http://one.example:9000"
        assert S3Backend.shared(dict(one)) is backend
        other = S3Backend.shared({**one, "endpoint_url": "http://two.example:9000"})
        assert other is not backend and other.endpoint == "http://two.example:9000"
    finally:
        S3Backend.reset_shared()


# --- bad keys ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated dataset (160 Fashion-MNIST PNGs, 10% wrong labels) on local disk."""
    from tasks.sample import write_sample

    out = tmp_path_factory.mktemp("sample") / "ds"
    write_sample(out, 160, 0.1, 0, "symmetric", "auto")
    return out


def tiny_config(data_path: str, work_uri: str, **extra) -> AuditConfig:
    return AuditConfig(data_path=data_path, work_uri=work_uri, n_repeats=2, num_epochs=1,
                       test_split=0.5, num_workers=0, **extra)


def test_bad_keys_in_the_bucket_are_skipped_and_reported(s3, sample_dataset):
    from tasks.audit import prepare_run
    from tasks.index import index_dataset, list_dataset

    for path in sorted(sample_dataset.rglob("*.png"))[::4]:  # 40 images are enough here
        put(s3, f"{s3.prefix}/ds/{path.relative_to(sample_dataset).as_posix()}",
            path.read_bytes())
    image = next(sample_dataset.rglob("*.png")).read_bytes()
    stored_bad = ["coat/\x01ctl.png", "coat/tab\tname.png", "coat/\x1b[31mred.png"]
    for key in stored_bad:
        put(s3, f"{s3.prefix}/ds/{key}", image)
    root = f"{s3.root}/ds"
    cfg = tiny_config(root, f"{s3.root}/work")

    # End to end through the run folder: skipped.csv in the bucket lists them.
    run = prepare_run(cfg)
    skipped = pd.read_csv(io.BytesIO(storage.read_bytes(f"{run}/skipped.csv")))
    assert set(skipped["filename"]) == set(stored_bad)
    assert skipped["reason"].str.startswith("unsafe key").all()
    manifest = pd.read_parquet(io.BytesIO(storage.read_bytes(f"{run}/manifest.parquet")))
    assert len(manifest) == 40
    # Only the good images were fetched into the cache.
    assert len([p for p in s3.cache.rglob("*") if p.is_file()]) == 40

    # SeaweedFS refuses '..' and absolute keys and turns '\\' into '/'; AWS S3 stores them
    # as they are. The listing a bucket on AWS would give holds them next to the real keys:
    listing = list(list_dataset(root))  # an Arrow-backed Listing; here, to add entries
    info = listing[0]
    escaping = ["../escape.png", "/abs/x.png", "coat/../../up.png", "coat/./dot.png",
                "coat//empty.png", "coat/..\\..\\win.png"]
    listing += [storage.ObjectInfo(key=k, size=info.size, etag=info.etag) for k in escaping]
    index = index_dataset(cfg, sorted(listing, key=lambda i: i.key))
    reasons = dict(zip(index.skipped["filename"], index.skipped["reason"], strict=True))
    assert set(reasons) == set(stored_bad) | set(escaping)
    assert all(r.startswith("unsafe key") for r in reasons.values())
    assert not set(index.manifest["key"]) & set(reasons)
    assert len([p for p in s3.cache.rglob("*") if p.is_file()]) == 40


def test_resuming_over_changed_objects_in_the_bucket_is_refused(s3):
    """An object rewritten with other bytes of the same size (a new ETag) or deleted since
    the run was indexed: resuming the run by its id is refused with one line."""
    from tasks.audit import prepare_run
    from tasks.index import DatasetError
    from tests.datasets import image_bytes

    for i in range(12):
        put(s3, f"{s3.prefix}/ds/{'cat' if i % 2 else 'dog'}/{i:02d}.png", image_bytes(i))
    cfg = tiny_config(f"{s3.root}/ds", f"{s3.root}/work")
    run = prepare_run(cfg, "mine")
    assert prepare_run(cfg, "mine") == run
    edited = image_bytes(100)
    assert len(edited) == len(image_bytes(3))
    put(s3, f"{s3.prefix}/ds/cat/03.png", edited)
    with pytest.raises(DatasetError, match=r"^run 'mine' cannot resume: 1 of its 12 images "
                       r"changed content since it was indexed \(e.g. 'cat/03.png'\); its "
                       r"manifest and predictions are stale: start a new run"):
        prepare_run(cfg, "mine")
    s3.server.client().delete_object(Bucket=s3.bucket, Key=f"{s3.prefix}/ds/dog/04.png")
    with pytest.raises(DatasetError, match=r"^run 'mine' cannot resume: 1 of its 12 images "
                       rf"are gone from {s3.root}/ds or changed size since it was indexed "
                       r"\(e.g. 'dog/04.png'\)"):
        prepare_run(cfg, "mine")
    assert prepare_run(cfg) != run  # the derived run id follows the bucket's listing


# --- relabelling in the bucket ----------------------------------------------------------

# A relabel (or undo) in a child process that SIGKILLs itself right after the nth call of
# one step: the journal write, a server-side copy or a batch of deletes.
KILL_CHILD = """
import os, signal, sys
import pandas as pd
from tasks import relabel, runs, storage

command, target, point, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
calls = []

def kill_after(fn):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapper

relabel.DELETE_BATCH = 2  # several batches of deletes, to be killed between
if point == "journal":
    relabel.Journal.write = kill_after(relabel.Journal.write)
else:
    setattr(storage, point, kill_after(getattr(storage, point)))
if command == "undo":
    relabel.undo(target)
else:  # what `python -m tasks relabel --results` does, without importing the trainer
    run = storage.parent(target)
    cfg = runs.read_config(run)
    results = pd.read_csv(storage.local_path(target), keep_default_na=False)
    relabel.relabel(results, cfg.data_path, runs.journal_uri(run), cfg.sensitivity,
                    cfg.min_preds)
"""

MOVES = {"cat/cat-0.png": "dog", "cat/shared.png": "dog", "dog/dog-2.png": "cat",
         "dog/dog-3.png": "bird", "bird/bird-0.png": "cat"}


def relabel_case(s3, relabel_mode: str = "move") -> tuple[str, str]:
    """A dataset in the bucket, and a run folder whose results suggest 5 moves (one onto
    an existing name) and 3 rows that stay. Returns (dataset prefix, results URI)."""
    from tasks import runs

    prefix = f"{s3.prefix}/ds"
    for cls, n in (("bird", 2), ("cat", 5), ("dog", 5)):
        for i in range(n):
            put(s3, f"{prefix}/{cls}/{cls}-{i}.png", os.urandom(48) + f"{cls}-{i}".encode())
        put(s3, f"{prefix}/{cls}/shared.png", os.urandom(48))
    rows = [(src, src.split("/")[0], dst, 100.0, 4) for src, dst in MOVES.items()]
    rows += [("cat/cat-1.png", "cat", "dog", 50.0, 4),   # p_suggestion below sensitivity
             ("cat/cat-2.png", "cat", "dog", 100.0, 1),  # too few predictions
             ("dog/dog-0.png", "dog", "dog", 100.0, 4)]
    results = pd.DataFrame(rows, columns=["filename", "label", "corrected_label", "%",
                                          "num_preds"])
    results["label_quality"], results["is_label_issue"] = 0.1, True
    results["suggested_quality"] = results["%"] / 100
    results["p_suggestion"] = results["%"] / 100
    run = f"{s3.root}/work/runs/r1"
    runs.write_config(run, AuditConfig(data_path=f"s3://{s3.bucket}/{prefix}",
                                       work_uri=f"{s3.root}/work", sensitivity=60,
                                       min_preds=2, relabel_mode=relabel_mode))
    storage.write_text(runs.results_uri(run), results.to_csv(index=False))
    storage.write_text(storage.join(run, "classes.json"), json.dumps(["bird", "cat", "dog"]))
    return prefix + "/", runs.results_uri(run)


@pytest.mark.parametrize(("command", "point", "nth"), [
    ("relabel", "journal", 1), ("relabel", "copy", 2), ("relabel", "delete_many", 1),
    ("undo", "delete_many", 1),
])
def test_relabel_in_the_bucket_survives_a_kill(s3, command, point, nth, capsys):
    from tasks import cli
    from tasks.relabel import Journal

    prefix, results = relabel_case(s3)
    journal = results.replace("results.csv", "relabel-journal.jsonl")
    before = snapshot(s3, prefix)
    if command == "undo":
        assert cli.main(["relabel", "--results", results]) == 0
        assert Counter(snapshot(s3, prefix).values()) == Counter(before.values())
    target = results if command == "relabel" else journal
    child = subprocess.run([sys.executable, "-c", KILL_CHILD, command, target, point, str(nth)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert_no_secrets(child.stdout + child.stderr, "the relabel log")
    # Killed mid-way: nothing lost (a copy may exist twice until the re-run).
    assert not Counter(before.values()) - Counter(snapshot(s3, prefix).values())

    if command == "relabel":
        assert cli.main(["relabel", "--results", results]) == 0  # completes from the journal
        after = snapshot(s3, prefix)
        assert Counter(after.values()) == Counter(before.values())
        header, moves = Journal(journal).read()
        assert header["state"] == "complete"
        assert {m.src: m.corrected_label for m in moves} == MOVES
        for m in moves:
            assert m.src not in after and after[m.dst] == before[m.src]
        assert after["dog/shared.png"] == before["dog/shared.png"]  # never overwritten
        assert {m.dst for m in moves if m.src == "cat/shared.png"} == {
            f"dog/shared.relabel-{hashlib.sha1(b'cat/shared.png').hexdigest()[:8]}.png"}
    assert cli.main(["undo", "--journal", journal]) == 0
    assert snapshot(s3, prefix) == before
    assert Journal(journal).read()[0]["state"] == "undone"
    assert_no_secrets(capsys.readouterr().out, "the relabel output")


def test_a_failed_batch_of_deletes_stops_the_relabel_and_loses_nothing(s3, monkeypatch):
    """The deletes go in the background while the copies go on: a batch that fails stops the
    relabel with its error, every content is still in the bucket, and a re-run completes."""
    from tasks import cli, relabel

    prefix, results = relabel_case(s3)
    before = snapshot(s3, prefix)
    monkeypatch.setattr(relabel, "DELETE_BATCH", 2)
    real, sent = storage.delete_many, []

    def failing_first(uris: list[str]) -> None:
        sent.append(list(uris))
        if len(sent) == 1:
            raise storage.StorageError("DeleteObjects refused (test)")
        real(uris)

    monkeypatch.setattr(storage, "delete_many", failing_first)
    with pytest.raises(storage.StorageError, match=r"refused \(test\)"):
        relabel.relabel_results(results)
    assert len(sent) >= 2  # the sources of the copies made after it are still deleted
    assert not Counter(before.values()) - Counter(snapshot(s3, prefix).values())
    monkeypatch.setattr(storage, "delete_many", real)
    assert cli.main(["relabel", "--results", results]) == 0
    after = snapshot(s3, prefix)
    assert Counter(after.values()) == Counter(before.values())
    assert all(src not in after for src in MOVES)


def test_a_chained_journal_in_the_bucket_runs_in_order(s3):
    """A hand-written journal whose second move's destination is the first one's source
    (b/x -> c/x, then a/x -> b/x): each source is deleted before the next move (no batch),
    and the undo runs the chain backwards."""
    from tasks.relabel import Journal, Move, relabel, undo

    prefix = f"{s3.prefix}/chain"
    bodies = {"a/x.png": b"from a", "b/x.png": b"from b"}
    for key, body in bodies.items():
        put(s3, f"{prefix}/{key}", body)
    before = snapshot(s3, prefix + "/")

    def move(src: str, dst: str) -> Move:
        md5 = hashlib.md5(bodies[src]).hexdigest()
        return Move(src=src, dst=dst, label=src[0], corrected_label=dst[0], pct=100.0,
                    num_preds=2, size=len(bodies[src]), etag=md5, md5=md5)

    root, journal = f"s3://{s3.bucket}/{prefix}", f"{s3.root}/work/chain.jsonl"
    Journal(journal).write({"type": "header", "root": root, "state": "started"},
                           [move("b/x.png", "c/x.png"), move("a/x.png", "b/x.png")])
    relabel(pd.DataFrame(), root, journal, 60.0, 2)  # finishes the journal
    assert snapshot(s3, prefix + "/") == {"b/x.png": before["a/x.png"],
                                          "c/x.png": before["b/x.png"]}
    undo(journal)
    assert snapshot(s3, prefix + "/") == before


def test_relabel_manifest_mode_leaves_the_bucket_alone(s3, capsys):
    from tasks import cli

    prefix, results = relabel_case(s3, relabel_mode="manifest")
    before = snapshot(s3, prefix)
    assert cli.main(["relabel", "--results", results]) == 0
    out = results.replace("results.csv", "corrected-labels.csv")
    assert capsys.readouterr().out.strip() == out
    table = pd.read_csv(io.BytesIO(storage.read_bytes(out)))
    changed = table[table["changed"]]
    assert dict(zip(changed["filename"], changed["new_label"], strict=True)) == MOVES
    assert snapshot(s3, prefix) == before


def test_undo_in_the_bucket_restores_all_but_a_deleted_object(s3, capsys):
    from tasks import cli
    from tasks.relabel import Journal

    prefix, results = relabel_case(s3)
    journal = results.replace("results.csv", "relabel-journal.jsonl")
    before = snapshot(s3, prefix)
    assert cli.main(["relabel", "--results", results]) == 0
    moves = {m.src: m.dst for m in Journal(journal).read()[1]}
    s3.server.client().delete_object(Bucket=s3.bucket, Key=prefix + moves["dog/dog-3.png"])
    assert cli.main(["undo", "--journal", journal]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and f"restored all but 1 of {len(MOVES)} file(s)" in err[0], err
    assert "in the bucket s3://" in err[0] and "folder" not in err[0]
    assert f"dog/dog-3.png (moved to {moves['dog/dog-3.png']})" in err[0]
    assert snapshot(s3, prefix) == {k: v for k, v in before.items() if k != "dog/dog-3.png"}
    assert Journal(journal).read()[0]["state"] == "undone"


def test_relabel_from_a_results_copy_in_the_bucket(s3, capsys):
    from tasks import cli
    from tasks.merge import run_sidecar_uri

    prefix, results = relabel_case(s3)
    before = snapshot(s3, prefix)
    run = storage.parent(results)
    copy = f"{s3.root}/exports/latest.csv"
    storage.write_bytes(copy, storage.read_bytes(results))
    assert cli.main(["relabel", "--results", copy]) == 2  # nothing ties it to its run yet
    assert "<work_uri>/runs/<run_id>/results.csv" in capsys.readouterr().err
    storage.write_text(run_sidecar_uri(copy), json.dumps({"run": run}))  # as merge writes it
    assert cli.main(["relabel", "--results", copy]) == 0
    journal = capsys.readouterr().out.strip()
    assert journal == f"{run}/relabel-journal.jsonl"
    assert cli.main(["undo", "--journal", journal]) == 0
    assert snapshot(s3, prefix) == before


# --- audits in the bucket ---------------------------------------------------------------

TINY = ["--set", "n_repeats=2", "--set", "num_epochs=1", "--set", "test_split=0.5",
        "--set", "num_workers=0"]


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"audit exited ({proc.returncode}) before {what}:\n"
                                 + log.read_text()[-3000:])
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n" + log.read_text()[-3000:])
        time.sleep(0.2)


def assert_same_results(got: bytes, want: bytes) -> None:
    """Two results CSVs agree: the same rows, labels, votes and flags, and probabilities equal
    up to float rounding (a trainer in another process may sum in another order)."""
    a, b = (pd.read_csv(io.BytesIO(x)).sort_values("filename").reset_index(drop=True)
            for x in (got, want))
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    floats = ["%", "label_quality", "suggested_quality", "p_label_wrong", "p_suggestion"]
    pd.testing.assert_frame_equal(a.drop(columns=floats), b.drop(columns=floats))
    pd.testing.assert_frame_equal(a[floats], b[floats], check_exact=False, atol=1e-3)


def test_audit_in_the_bucket_matches_local_and_survives_a_server_restart(
        s3, sample_dataset, tmp_path, capsys, monkeypatch):
    from tasks import cli
    from tasks.audit import prepare_run
    from tasks.merge import merge_run
    from tasks.train import run_repeat

    # The same audit on the local copy, for reference (its steps in this process).
    run = prepare_run(tiny_config(str(sample_dataset), str(tmp_path / "work")))
    for repeat in range(2):
        run_repeat(run, repeat)
    local_csv = Path(merge_run(run)).read_bytes()

    # data_path and work_uri in the bucket; the server is killed once repeat 0's shard is
    # written, and only started again after the trainer of repeat 1 met the dead endpoint.
    upload_folder(s3, sample_dataset, f"{s3.prefix}/ds")
    s3_args = ["--set", f"data_path={s3.root}/ds", "--set", f"work_uri={s3.root}/work", *TINY]
    log_path = tmp_path / "audit.log"
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    client = s3.server.client()

    def shards() -> dict[str, object]:
        keys = [k for k in keys_under(s3, f"{s3.prefix}/work/") if "/shards/" in k]
        return {k: client.head_object(Bucket=s3.bucket, Key=k)["LastModified"] for k in keys}

    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tasks", "audit", *s3_args],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: any(k.endswith("/shards/repeat-0000.parquet")
                             for k in keys_under(s3, f"{s3.prefix}/work/")),
                 proc, log_path, 240, "the shard of repeat 0")
        first = shards()
        s3.server.kill()
        wait_for(lambda: "attempt 1 failed" in log_path.read_text(), proc, log_path, 120,
                 "a failed S3 attempt")
        s3.server.start()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if s3.server.proc is None:
            s3.server.start()
    text = log_path.read_text()
    assert "(EndpointConnectionError)" in text
    if proc.returncode == 0:  # rode out the restart with retries
        assert "audit finished" in text
        results = text.strip().splitlines()[-1]
        assert_same_results(storage.read_bytes(results), local_csv)  # same seed as local
    else:  # or gave up, with one clear line
        assert proc.returncode == 2, text[-3000:]
        assert text.strip().splitlines()[-1].startswith("error: trainer for repeat 1 exited")

    # Re-running resumes the same run, without retraining finished repeats.
    done = shards()
    assert cli.main(["audit", *s3_args]) == 0
    out = capsys.readouterr()
    results = out.out.strip().splitlines()[-1]
    assert results.startswith(f"{s3.root}/work/runs/") and results.endswith("/results.csv")
    assert_same_results(storage.read_bytes(results), local_csv)
    assert out.out.count("already done") == len(done) >= 1
    after = shards()
    assert {k: after[k] for k in done} == done and {k: after[k] for k in first} == first

    # The credentials appear in no log and no artefact of the run.
    assert_no_secrets(text + out.out + out.err, "the audit logs")
    for key in keys_under(s3, f"{s3.prefix}/work/"):
        assert_no_secrets(client.get_object(Bucket=s3.bucket, Key=key)["Body"].read(), key)


def test_trainer_that_cannot_reach_s3_fails_with_one_clear_line(s3, monkeypatch):
    from tasks.audit import TrainerError, run_trainer_subprocess

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_ports(1)[0]}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    lines: list[str] = []
    with pytest.raises(TrainerError, match="trainer for repeat 0 exited with code 1"):
        run_trainer_subprocess(f"{s3.root}/work/runs/r", 0, emit=lines.append)
    failed = [line for line in lines if "repeat 0 failed" in line]
    assert len(failed) == 1 and "StorageError: cannot read s3://acl-test/" in failed[0]
    assert "did not answer after retries" in failed[0]
    assert not any("Traceback" in line for line in lines)
    assert_no_secrets("\n".join(lines), "the trainer log")
