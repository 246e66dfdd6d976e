#!/usr/bin/env bash
# One entry point for a fresh machine: creates (or reuses) .venv, installs what the command needs,
# then runs it.  ./dev.sh demo | test | lint | bench | lock [--add|--check] | peers | shell
set -euo pipefail
cd "$(dirname "$0")"
VENV=${EDGECLOUD_VENV:-.venv}
PY=${PYTHON:-python3}

LOCK=requirements-lock.txt
# The extras the lock covers: everything `test` installs (demo and lint use a subset of it).
LOCK_EXTRAS=dev,samples,zoo

pip_install() {
  # Every install is constrained to a lock, so a fresh machine gets what main was tested with:
  # edgecloud's venv to $LOCK, a peer's venv (whose pins must never meet ours) to its own.
  local venv=$1
  shift
  case "$venv" in
    "$VENV") "$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$LOCK" "$@" ;;
    *) "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" ;;
  esac
}

install_project() {
  # $1 venv, $2 extras. The build backend (hatchling, and editables for -e) comes from the lock
  # too, instead of an isolated build env with whatever is newest; pip is upgraded to the locked
  # version first.
  local venv=$1 extras=$2
  pip_install "$venv" --upgrade pip
  pip_install "$venv" hatchling editables
  # torch and torchvision (re-training the samples, building the model zoo) are the pinned pair
  # in pyproject's [samples] and [zoo] extras, both on the machine's disk.
  pip_install "$venv" --no-build-isolation -e ".[$extras]"
}

ensure_venv() {
  local extras=$1
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.edgecloud-installed-$extras"
  local want
  want=$(cat pyproject.toml "$LOCK" | sha256sum | cut -c1-16)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    install_project "$VENV" "$extras"
    echo "$want" > "$stamp"
  fi
}

refresh_lock() {
  # A throwaway venv gets the newest releases pyproject's ranges allow (the lock is not applied),
  # then its pip freeze becomes the new lock. Run the tests afterwards: that is what you commit.
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  "$PY" -m venv "$tmp/venv"
  "$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip hatchling editables
  "$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation \
    -e ".[$LOCK_EXTRAS]"
  "$tmp/venv/bin/python" .ci/lock.py write --extras "$LOCK_EXTRAS"
  # The MLServer peer's lock: its own venv, the newest releases its pins allow.
  "$PY" -m venv "$tmp/peer"
  # shellcheck disable=SC2086 # the pins are separate arguments
  "$tmp/peer/bin/python" -m pip install -q --disable-pip-version-check $MLSERVER_PINS
  { echo "# The MLServer peer venv (.venv-mlserver) for the interop tests: $MLSERVER_PINS."
    echo "# Refresh: ./dev.sh lock. Installed as constraints by dev.sh's ensure_mlserver."
    "$tmp/peer/bin/python" -m pip freeze --all; } > "$PEER_LOCK"
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
PEER_LOCK=requirements-peer-mlserver.txt

ensure_mlserver() {
  # The peer venv is locked like ours (requirements-peer-mlserver.txt, refreshed by ./dev.sh lock).
  local stamp="$MLSERVER_VENV/.edgecloud-pins" want
  want=$(echo "$MLSERVER_PINS" | cat - "$PEER_LOCK" | sha256sum | cut -c1-16)
  if [ -x "$MLSERVER_VENV/bin/mlserver" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  echo "installing the MLServer peer venv ($MLSERVER_PINS, locked) in $MLSERVER_VENV ..."
  "$PY" -m venv "$MLSERVER_VENV"
  # shellcheck disable=SC2086 # the pins are separate arguments
  if pip_install "$MLSERVER_VENV" $MLSERVER_PINS -c "$PEER_LOCK"; then
    echo "$want" > "$stamp"
  else
    echo "warning: could not install MLServer; its interop tests will fail" >&2
  fi
}

ensure_chromium() {
  # The fleet console's browser tests drive Debian's chromium through Playwright
  # (executable_path=/usr/bin/chromium); Playwright's own browser download is never used.
  if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium (Debian package) for the fleet console's browser tests ..."
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      chromium chromium-driver >/dev/null \
      || echo "warning: could not install chromium; the console's browser tests will fail" >&2
  else
    echo "note: chromium is not installed and this is not root; the console's browser tests will fail" >&2
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
    ensure_venv "$LOCK_EXTRAS"
    ensure_mosquitto
    ensure_postgres
    ensure_mlserver
    ensure_chromium
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  lint)
    ensure_venv dev
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/mypy"
    ;;
  bench)
    ensure_venv "$LOCK_EXTRAS"
    exec "$VENV/bin/python" -m benchmarks "$@"
    ;;
  lock)
    # ./dev.sh lock          refresh requirements-lock.txt from the newest allowed releases
    # ./dev.sh lock --add    keep every pin, add what a new pyproject requirement brings in
    # ./dev.sh lock --check  pyproject agrees with the lock, and .venv is exactly the lock
    case "${1:-}" in
      --check)
        ensure_venv "$LOCK_EXTRAS"
        "$VENV/bin/python" .ci/lock.py check --extras "$LOCK_EXTRAS"
        "$VENV/bin/python" .ci/lock.py freeze-diff
        ;;
      --add)
        ensure_venv "$LOCK_EXTRAS"
        "$VENV/bin/python" .ci/lock.py write --extras "$LOCK_EXTRAS"
        ;;
      *) refresh_lock ;;
    esac
    ;;
  peers)
    ensure_mlserver
    ;;
  shell)
    ensure_venv dev
    exec "$VENV/bin/python" "$@"
    ;;
  *)
    echo "usage: ./dev.sh demo|test|lint|bench|lock [--add|--check]|peers|shell [args...]" >&2
    exit 2
    ;;
esac
