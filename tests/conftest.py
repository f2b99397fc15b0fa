"""Shared test setup.

Airflow reads AIRFLOW_HOME and its config when first imported, so the tests' Airflow
(a throwaway home with SQLite, no example DAGs, this checkout's dags/) is set up here,
before any test module is collected.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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
