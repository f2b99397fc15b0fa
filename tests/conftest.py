"""Shared test setup and fixtures.

Airflow reads AIRFLOW_HOME and its config when first imported, so the tests' Airflow
(a throwaway home with SQLite, no example DAGs, this checkout's dags/) is set up here,
before any test module is collected. `s3_server`: one real SeaweedFS S3 server per test
session; `s3`: the environment pointed at it (standard AWS variables, a fresh object cache)
and a fresh prefix in its bucket for one test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.s3server import SeaweedS3

S3_BUCKET = "acl-test"

ROOT = Path(__file__).resolve().parent.parent
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="acl-airflow-home-")
os.environ.update({
    "AIRFLOW_HOME": _AIRFLOW_HOME,
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME}/airflow.db",
})


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """A migrated Airflow metadata DB (SQLite in a temporary AIRFLOW_HOME), once per session."""
    proc = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _AIRFLOW_HOME


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
