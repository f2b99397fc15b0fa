#!/usr/bin/env bash
# Set up everything the tests need, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh train airflow dev ffcv labelstudio
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
