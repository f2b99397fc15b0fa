"""The docs match the code: every config key is documented in the README with its default
(configs/config.yaml against the schema: tests/test_config.py)."""

from __future__ import annotations

import re
from pathlib import Path

from tasks.config import AuditConfig

ROOT = Path(__file__).resolve().parent.parent


def test_readme_documents_every_config_key_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| \w+ \| `([^`]*)` \|", readme, flags=re.M))
    for name, field in AuditConfig.model_fields.items():
        assert name in rows, f"README's config table lacks {name}"
        default = field.default
        shown = "null" if default is None else str(default).lower() if isinstance(
            default, bool) else str(default)
        assert rows[name] == shown, f"README shows {name} default {rows[name]!r}, code {shown!r}"


def test_readme_quick_start_names_the_scripts_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
