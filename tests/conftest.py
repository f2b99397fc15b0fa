"""Shared fixtures. `s3_server`: one real SeaweedFS S3 server per test session;
`s3`: the environment pointed at it (standard AWS variables, a fresh object cache) and a
fresh prefix in its bucket for one test."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.s3server import SeaweedS3

S3_BUCKET = "acl-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    server.client().create_bucket(Bucket=S3_BUCKET)
    server.client().create_bucket(Bucket=server.reader_bucket)
    yield server
    server.kill()


@dataclass
class S3Place:
    """A test's place in the bucket: `root` is s3://<bucket>/<prefix>."""

    server: SeaweedS3
    bucket: str
    prefix: str
    cache: Path

    @property
    def root(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@pytest.fixture
def s3(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
       request: pytest.FixtureRequest):
    from tasks.s3 import S3Backend

    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS",
                 "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ACL_CACHE_DIR", str(tmp_path / "cache"))
    S3Backend.reset_shared()
    prefix = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:60]
    yield S3Place(server=s3_server, bucket=S3_BUCKET, prefix=prefix, cache=tmp_path / "cache")
    S3Backend.reset_shared()
