#!/usr/bin/env bash
# The embedded default, end to end: set up, write a sample dataset with 10% wrong labels,
# audit it on this machine (local folder, local runner), print the results CSV path.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh train
[ -d data/sample ] || .venv/bin/python -m tasks sample --out data/sample --n 2000 --noise 0.1 --seed 0
.venv/bin/python -m tasks audit --config configs/config.yaml "$@"
