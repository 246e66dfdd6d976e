#!/usr/bin/env bash
# One entry point for a fresh machine: creates (or reuses) .venv, installs what the command needs,
# then runs it.  ./dev.sh demo | test | lint | bench | peers | shell
set -euo pipefail
cd "$(dirname "$0")"
VENV=${EDGECLOUD_VENV:-.venv}
PY=${PYTHON:-python3}

ensure_venv() {
  local extras=$1
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.edgecloud-installed-$extras"
  local want
  want=$(cat pyproject.toml | sha256sum | cut -c1-16)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    # torch (for re-training the samples) is the CPU build pinned in pyproject's [samples] extra.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]"
    echo "$want" > "$stamp"
  fi
}

ensure_mosquitto() {
  # The MQTT demo and tests need a Mosquitto binary; the tests start their own broker on loopback.
  if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing mosquitto (Debian package) ..."
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null \
      || echo "warning: could not install mosquitto; MQTT paths will be skipped or fall back to HTTP" >&2
  else
    echo "note: mosquitto is not installed and this is not root; the demo will use HTTP only" >&2
  fi
}

ensure_postgres() {
  # The fleet store's PostgreSQL tests run a throwaway cluster (tests/fixtures/postgres.py).
  if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing postgresql (Debian package) for the fleet store tests ..."
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null \
      || echo "warning: could not install postgresql; its store tests will be skipped" >&2
  fi
}

# Peer V2 servers for the interop tests, each in a venv of its own so that their pins never meet
# edgecloud's: Seldon MLServer (pinned) with onnxruntime and numpy only. Kept between runs in the
# same clone; reinstalled only when the pins below change.
MLSERVER_VENV=${EDGECLOUD_MLSERVER_VENV:-.venv-mlserver}
MLSERVER_PINS="mlserver==1.7.1 onnxruntime>=1.18 numpy>=1.24"

ensure_mlserver() {
  local stamp="$MLSERVER_VENV/.edgecloud-pins"
  if [ -x "$MLSERVER_VENV/bin/mlserver" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$MLSERVER_PINS" ]; then
    return 0
  fi
  echo "installing the MLServer peer venv ($MLSERVER_PINS) in $MLSERVER_VENV ..."
  "$PY" -m venv "$MLSERVER_VENV"
  # shellcheck disable=SC2086 # the pins are separate arguments
  if "$MLSERVER_VENV/bin/python" -m pip install -q --disable-pip-version-check $MLSERVER_PINS; then
    echo "$MLSERVER_PINS" > "$stamp"
  else
    echo "warning: could not install MLServer; its interop tests will fail" >&2
  fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
  demo)
    ensure_venv dev
    ensure_mosquitto
    exec "$VENV/bin/edgecloud" demo "$@"
    ;;
  test)
    ensure_venv "dev,samples"
    ensure_mosquitto
    ensure_postgres
    ensure_mlserver
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  lint)
    ensure_venv dev
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/mypy"
    ;;
  bench)
    ensure_venv "dev,samples"
    exec "$VENV/bin/python" -m benchmarks "$@"
    ;;
  peers)
    ensure_mlserver
    ;;
  shell)
    ensure_venv dev
    exec "$VENV/bin/python" "$@"
    ;;
  *)
    echo "usage: ./dev.sh demo|test|lint|bench|peers [args...]" >&2
    exit 2
    ;;
esac
