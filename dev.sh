#!/usr/bin/env bash
# One entry point for a fresh machine: creates (or reuses) .venv, installs what the command needs,
# then runs it.  ./dev.sh demo | test | lint | bench | shell
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

cmd=${1:-help}
shift || true
case "$cmd" in
  demo)
    ensure_venv dev
    ensure_mosquitto
    exec "$VENV/bin/edgecloud" demo "$@"
    ;;
  test)
    ensure_venv "dev,zoo"
    ensure_mosquitto
    ensure_postgres
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  lint)
    ensure_venv dev
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/mypy"
    ;;
  bench)
    ensure_venv "dev,zoo"
    exec "$VENV/bin/python" -m benchmarks "$@"
    ;;
  shell)
    ensure_venv dev
    exec "$VENV/bin/python" "$@"
    ;;
  *)
    echo "usage: ./dev.sh demo|test|lint|bench [args...]" >&2
    exit 2
    ;;
esac
