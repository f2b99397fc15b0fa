#!/usr/bin/env bash
# Set up this checkout: system packages (when root and apt exists), then .venv with the
# project and the extras named as arguments (default: train).
# Usage: bash scripts/setup.sh [train] [airflow] [dev] [ffcv]
set -euo pipefail
cd "$(dirname "$0")/.."
extras=("$@"); [ ${#extras[@]} -gt 0 ] || extras=(train)

apt_pkgs=(dataset-fashion-mnist)
for e in "${extras[@]}"; do
  case "$e" in
    # build deps of FFCV; libgl1 for the opencv-python wheel FFCV pulls in
    ffcv) apt_pkgs+=(pkg-config libturbojpeg0-dev libopencv-dev libgl1) ;;
    dev) apt_pkgs+=(chromium chromium-driver docker-compose) ;;
  esac
done
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  missing=()
  for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "apt: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
else
  echo "note: not root or no apt-get; install these system packages yourself if missing: ${apt_pkgs[*]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
spec=".[$(IFS=,; echo "${extras[*]}")]"
echo "pip: installing $spec"
.venv/bin/python -m pip install -q -e "$spec"
