"""tasks/storage.py on local folders: atomic writes with normal file modes, listing, copy
that never overwrites, and path helpers."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tasks import storage
from tasks.storage import StorageError


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """Set the process umask for one test; restored afterwards."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_mode_of_a_new_file(tmp_path, umask, mask, expected):
    umask(mask)
    out = tmp_path / "run" / "results.csv"
    storage.write_text(str(out), "filename,label\n")
    assert mode(out) == expected
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert mode(out) == mode(plain)
    storage.write_bytes(str(out), b"again")  # replacing keeps the rule
    assert mode(out) == expected and out.read_bytes() == b"again"


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    out = tmp_path / "a.bin"
    storage.write_bytes(str(out), b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes(str(out), b"new")
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_copy_never_overwrites_and_keeps_the_source_mode(tmp_path, umask):
    umask(0o022)
    src, dst = tmp_path / "cat" / "x.png", tmp_path / "dog" / "x.png"
    src.parent.mkdir()
    src.write_bytes(b"cat bytes")
    src.chmod(0o644)
    storage.copy(str(src), str(dst))
    assert dst.read_bytes() == b"cat bytes" and mode(dst) == 0o644
    src.write_bytes(b"other")
    with pytest.raises(StorageError, match="refusing to overwrite"):
        storage.copy(str(src), str(dst))
    assert dst.read_bytes() == b"cat bytes"
    with pytest.raises(StorageError, match="does not exist"):
        storage.copy(str(tmp_path / "missing.png"), str(tmp_path / "dog" / "y.png"))
    assert sorted(p.name for p in dst.parent.iterdir()) == ["x.png"]


def test_list_head_delete_and_paths(tmp_path):
    for key in ("b/2.png", "a/1.png", "a/sub/3.png"):
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(key.encode())
    keys = [o.key for o in storage.list_objects(str(tmp_path))]
    assert keys == ["a/1.png", "a/sub/3.png", "b/2.png"]
    info = storage.head(str(tmp_path / "a/1.png"))
    assert info is not None and info.size == len(b"a/1.png")
    assert info.etag == hashlib.md5(b"a/1.png").hexdigest()
    assert storage.head(str(tmp_path / "nope.png")) is None
    storage.delete(str(tmp_path / "a/1.png"))
    storage.delete(str(tmp_path / "a/1.png"))  # already gone: no error
    assert not storage.exists(str(tmp_path / "a/1.png"))
    with pytest.raises(StorageError, match="is not a folder"):
        list(storage.list_objects(str(tmp_path / "nope")))
    assert storage.join("s3://b/p/", "/runs/", "x") == "s3://b/p/runs/x"
    assert storage.parent("s3://b/p/runs/x") == "s3://b/p/runs"
    assert storage.basename("/a/b/c/") == "c"


def test_configured_s3_settings_go_to_trainer_subprocesses() -> None:
    """What `configure_s3` was given (the Airflow adapter's connection) reaches a child
    process as the standard AWS variables; a new call replaces the old settings."""
    storage.configure_s3(endpoint_url="http://store.example:8333",
                         aws_access_key_id="AKIAEXAMPLEKEYID1234",
                         aws_secret_access_key="example-secret")
    try:
        assert storage.subprocess_env() == {"AWS_ENDPOINT_URL_S3": "http://store.example:8333",
                                            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID1234",
                                            "AWS_SECRET_ACCESS_KEY": "example-secret"}
        storage.configure_s3(region_name="eu-west-1")
        assert storage.subprocess_env() == {"AWS_DEFAULT_REGION": "eu-west-1"}
    finally:
        storage.configure_s3()
    assert storage.subprocess_env() == {}
