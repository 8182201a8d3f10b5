#!/usr/bin/env bash
# Set up everything the node and its tests need on a fresh Debian 12 machine:
# Debian packages (DICOM peers, validators, headless Chromium, promtool), a virtual environment in
# .venv with the project installed (torch resolves to the local CPU build 2.13.0).
# Idempotent: a second run only checks. Needs root (or sudo) for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DEB_PACKAGES=(dcmtk orthanc dicom3tools chromium prometheus)  # prometheus: promtool for the alert rules

missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
  # installed, not merely known to dpkg (a removed package keeps "deinstall ok config-files")
  [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ] || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: installing the project into .venv (first run takes a few minutes)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q 'torch==2.13.0'
  .venv/bin/pip install -q -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
echo "setup: ok ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
