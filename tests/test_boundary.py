"""The package's two boundaries: only `tasks.airflow_adapter` imports Airflow (every other
module imports with Airflow unimportable, and none names it in an import), and the errors
a user can fix share one base class, `tasks.errors.UserError`."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import tasks
from tasks.errors import MissingFileError, StorageError, UserError

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


def _tasks_imports(module: str) -> set[str]:
    """The tasks modules `module` imports anywhere in its file (also inside functions)."""
    path = Path(tasks.__file__).parent / f"{module}.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "tasks":
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tasks."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tasks.")}
    return found - {module}


def test_no_import_cycle_among_the_modules() -> None:
    """Counting imports inside functions too: a module never needs itself, however lazily."""
    modules = {m.name for m in pkgutil.iter_modules(tasks.__path__)}
    graph = {m: _tasks_imports(m) & modules for m in modules}
    assert graph["merge"] and graph["storage"]  # the walk found imports
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            assert m != start, f"tasks.{start} imports itself through tasks.{m}"
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])


def test_domain_errors_are_user_errors_and_keep_their_old_bases() -> None:
    from tasks.airflow_adapter import AuditFileError
    from tasks.audit import TrainerError
    from tasks.config import ConfigError
    from tasks.index import DatasetError
    from tasks.merge import MissingShardsError
    from tasks.relabel import RelabelError
    from tasks.sample import SampleError

    for cls, old in [(ConfigError, ValueError), (DatasetError, ValueError),
                     (MissingShardsError, RuntimeError), (RelabelError, RuntimeError),
                     (TrainerError, RuntimeError), (StorageError, RuntimeError),
                     (MissingFileError, FileNotFoundError), (SampleError, ValueError),
                     (AuditFileError, ValueError)]:
        assert issubclass(cls, UserError) and issubclass(cls, old), cls


def trainer(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks.train", "--run", str(run), "--repeat",
                           "0"], capture_output=True, text=True, timeout=300)


def test_a_bug_in_the_trainer_logs_its_traceback_at_error(tmp_path: Path) -> None:
    """A pod's log shows where an unexpected error came from; the last line still says what
    failed. A run folder whose config.json is not JSON stands in for a bug."""
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{not json")
    proc = trainer(run)
    assert proc.returncode == 1
    assert "ERROR repeat 0 failed with an unexpected error\nTraceback (most recent call last):" \
        in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].endswith(
        "ERROR repeat 0 failed: JSONDecodeError: Expecting property name enclosed in double "
        "quotes: line 1 column 2 (char 1)")


def test_a_user_error_in_the_trainer_is_one_line(tmp_path: Path) -> None:
    proc = trainer(tmp_path / "nowhere")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines() == [proc.stdout.strip().splitlines()[-1]]
    assert proc.stdout.strip().endswith(
        f"ERROR repeat 0 failed: MissingFileError: {tmp_path / 'nowhere'}/config.json does not "
        f"exist: is {tmp_path / 'nowhere'} a run folder?")
