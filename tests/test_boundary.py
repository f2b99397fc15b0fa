"""Only `tasks.airflow_adapter` imports Airflow: every other module imports with Airflow
unimportable, and none names it in an import."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import tasks

ADAPTER = "tasks.airflow_adapter"
AIRFLOW_FREE = sorted(f"tasks.{m.name}" for m in pkgutil.iter_modules(tasks.__path__)
                      if f"tasks.{m.name}" not in (ADAPTER, "tasks.__main__"))


def test_every_module_but_the_adapter_imports_without_airflow() -> None:
    assert len(AIRFLOW_FREE) >= 15 and "tasks.storage" in AIRFLOW_FREE  # pkgutil found them
    code = ("import importlib, json, sys\n"
            "sys.modules['airflow'] = None  # any import of airflow now raises ImportError\n"
            "try:\n    import airflow.sdk\nexcept ImportError:\n    pass\n"
            "else:\n    raise SystemExit('the blocker does not block')\n"
            "failed = {}\n"
            f"for name in {AIRFLOW_FREE!r}:\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except ImportError as err:\n        failed[name] = str(err)\n"
            "print(json.dumps(failed))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=Path(tasks.__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}


@pytest.mark.parametrize("module", AIRFLOW_FREE)
def test_no_module_but_the_adapter_names_airflow_in_an_import(module: str) -> None:
    """Also imports inside functions, which importing the module does not run."""
    path = Path(tasks.__file__).parent / f"{module.removeprefix('tasks.')}.py"
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    assert [n for n in names if n.split(".")[0] == "airflow"] == []

