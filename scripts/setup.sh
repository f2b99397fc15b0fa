#!/usr/bin/env bash
# Set up this checkout: system packages (when root and apt exists), then .venv with the
# project and the extras named as arguments (default: train). `labelstudio` is no extra: it
# makes .venv-labelstudio, Label Studio's own virtualenv (its pins clash with FFCV's and
# Airflow's), for the review round-trip test.
# Usage: bash scripts/setup.sh [train] [airflow] [dev] [ffcv] [labelstudio]
set -euo pipefail
cd "$(dirname "$0")/.."
extras=("$@"); [ ${#extras[@]} -gt 0 ] || extras=(train)

apt_pkgs=(dataset-fashion-mnist)
pip_extras=()
for e in "${extras[@]}"; do
  [ "$e" = labelstudio ] || pip_extras+=("$e")
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
spec="."; [ ${#pip_extras[@]} -eq 0 ] || spec=".[$(IFS=,; echo "${pip_extras[*]}")]"
echo "pip: installing $spec"
.venv/bin/python -m pip install -q -e "$spec"

if [[ " ${extras[*]} " == *" labelstudio "* ]]; then
  echo "pip: installing label-studio into .venv-labelstudio"
  [ -x .venv-labelstudio/bin/python ] || python3 -m venv .venv-labelstudio
  .venv-labelstudio/bin/python -m pip install -q --upgrade pip
  .venv-labelstudio/bin/python -m pip install -q "label-studio==1.23.2"
fi
