"""A real Label Studio server for tests: the `label-studio` of `.venv-labelstudio` (its own
virtualenv, made by `scripts/setup.sh labelstudio`: its pins clash with Airflow's) on a free
loopback port, with SQLite in a temporary data folder, one admin user with a fixed API
token, and local file serving from `document_root`. Analytics, Sentry, the PyPI version
check and converter downloads are off, and outbound HTTP goes to a dead loopback proxy, so
nothing leaves loopback. Stopped by PID.

A fresh database takes most of the start-up (Django migrations); the first start copies
the migrated database (with the user) into the virtualenv, and later starts begin from it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.s3server import free_ports

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-labelstudio"
USER = "reviewer@example.com"
PASSWORD = "acl-ls-password-3b9e"
TOKEN = "acl0ls0test0token0a4f7c2e9d1b"  # Token auth: the org enables legacy API tokens
DB_NAME = "label_studio.sqlite3"


def binary() -> Path | None:
    """The `label-studio` command of the Label Studio virtualenv, or None when not set up."""
    path = VENV / "bin" / "label-studio"
    return path if path.exists() else None


def version() -> str:
    """The installed label-studio version (from its dist-info folder name)."""
    found = glob.glob(str(VENV / "lib" / "python*" / "site-packages" / "label_studio-*.dist-info"))
    return Path(found[0]).name.removeprefix("label_studio-").removesuffix(".dist-info")


class LabelStudio:
    """One `label-studio start` on 127.0.0.1."""

    def __init__(self, workdir: Path, document_root: Path) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.document_root = document_root
        self.port = free_ports(1)[0]
        self.log_path = workdir / "label-studio.log"
        self.template = VENV / f"acl-test-db-{version()}.sqlite3"
        self.proc: subprocess.Popen | None = None
        self.started_in: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """A clean environment: nothing of the caller's (AWS, Airflow, LABEL_STUDIO_*)."""
        dead = f"http://127.0.0.1:{free_ports(1)[0]}"
        return {
            "PATH": f"{VENV / 'bin'}:/usr/bin:/bin", "HOME": str(self.workdir),
            "LANG": "C.UTF-8", "TZ": "UTC",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root),
            "COLLECT_ANALYTICS": "false", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
            "LATEST_VERSION_CHECK": "false", "CONVERTER_DOWNLOAD_RESOURCES": "false",
            "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "https_proxy": dead,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        }

    def command(self) -> list[str]:
        exe = binary()
        assert exe, "no Label Studio virtualenv: bash scripts/setup.sh labelstudio"
        return [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1",
                "--port", str(self.port), "--data-dir", str(self.data), "--log-level", "WARNING",
                "--username", USER, "--password", PASSWORD, "--user-token", TOKEN,
                "--enable-legacy-api-token"]

    def start(self, timeout: float = 300) -> None:
        """Start the server; return once the API answers with the user's token."""
        self.data.mkdir(parents=True, exist_ok=True)
        fresh = not self.template.exists()
        if not fresh:
            shutil.copyfile(self.template, self.data / DB_NAME)
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), env=self.env(), cwd=self.workdir,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"label-studio exited with {self.proc.returncode}; see "
                                   f"{self.log_path}")
            try:
                if self.api("GET", "/api/current-user/whoami", timeout=5)["email"] == USER:
                    break
            except (OSError, urllib.error.URLError, KeyError, ValueError):
                pass
            if time.monotonic() - began > timeout:
                self.kill()
                raise RuntimeError(f"Label Studio did not answer within {timeout}s; see "
                                   f"{self.log_path}")
            time.sleep(0.5)
        self.started_in = time.monotonic() - began
        if fresh:  # keep the migrated database (a consistent copy) for the next start
            tmp = self.template.with_suffix(".tmp")
            with sqlite3.connect(self.data / DB_NAME) as src, sqlite3.connect(tmp) as dst:
                src.backup(dst)
            os.replace(tmp, self.template)

    def kill(self) -> None:
        """Stop the server by PID (SIGTERM, then SIGKILL) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.proc = None

    def request(self, method: str, path: str, body: object = None,
                timeout: float = 60) -> tuple[int, str, bytes]:
        """(status, content type, body) of one API call with the user's token."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers={
            "Authorization": f"Token {TOKEN}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.headers.get_content_type(), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get_content_type(), err.read()

    def api(self, method: str, path: str, body: object = None, timeout: float = 60):
        """The JSON answer of one API call; raises on an error status, with its body."""
        status, _, raw = self.request(method, path, body, timeout)
        if status >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {raw[:1000]!r}")
        return json.loads(raw) if raw else None
