#!/usr/bin/env bash
# An S3-compatible server for tests and benchmarks: moto_server from PyPI, in a venv cached
# outside the repository keyed by version, started in the background on a free loopback port.
# Idempotent: a second run finds the venv complete and the server answering and only prints
# the endpoint again.
#
#   scripts/setup-s3.sh                 install if needed, start if needed, print the endpoint
#                                       (http://127.0.0.1:PORT) on stdout
#   scripts/setup-s3.sh --install-only  install if needed, print the venv's path
#   scripts/setup-s3.sh --awscli        also install the aws CLI (PyPI awscli, its own venv),
#                                       print the path of its `aws` binary (benchmarks only)
#   scripts/setup-s3.sh --stop          stop the server this script started (if any)
#
# Environment: NESTOR_CACHE_DIR (cache root), NESTOR_MOTO_VERSION, NESTOR_AWSCLI_VERSION,
# NESTOR_S3_PORT (use this port instead of a free one).
#
# Tests use the endpoint through NESTOR_TEST_S3_ENDPOINT; without it the workspace-store tests
# run this script with --install-only and start their own moto_server (see
# crates/workspace-store/tests/common/mod.rs). moto keeps everything in memory: stopping the
# server loses every bucket.
set -euo pipefail

MOTO_VERSION="${NESTOR_MOTO_VERSION:-5.2.5}"
AWSCLI_VERSION="${NESTOR_AWSCLI_VERSION:-1.46.2}"
CACHE_ROOT="${NESTOR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nestor}"
BASE="$CACHE_ROOT/moto-$MOTO_VERSION"
VENV="$BASE/venv"
STAMP="$VENV/.nestor-complete"
PIDFILE="$BASE/server.pid"
PORTFILE="$BASE/server.port"
LOGFILE="$BASE/server.log"

log() { echo "setup-s3: $*" >&2; }

mode=start
case "${1:-}" in
  "") ;;
  --install-only) mode=install ;;
  --awscli) mode=awscli ;;
  --stop) mode=stop ;;
  -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
  *) log "unknown option $1 (see --help)"; exit 2 ;;
esac

find_python() {
  local c
  for c in python3 python3.13 python3.12 python3.11 python3.10 python3.9; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3,9) else 1)' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  log "no python3 >= 3.9 with the venv module found (Debian: apt-get install python3-venv)"
  return 1
}

install_venv() { # dir stamp requirement...
  local dir="$1" stamp="$2"; shift 2
  local py
  py=$(find_python)
  rm -rf "$dir"
  "$py" -m venv "$dir" >&2
  local attempt
  for attempt in 1 2 3; do
    if timeout 600 "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >&2; then
      touch "$stamp"; return 0
    fi
    log "pip install $* failed (attempt $attempt)"
    sleep $((attempt * 2))
  done
  log "could not install $*"
  return 1
}

ensure_moto() {
  [[ -f "$STAMP" && -x "$VENV/bin/moto_server" ]] && return 0
  mkdir -p "$BASE"
  exec 9>"$BASE/.install.lock"
  flock -w 900 9 || { log "timed out waiting for another install"; return 1; }
  if [[ -f "$STAMP" && -x "$VENV/bin/moto_server" ]]; then return 0; fi
  log "installing moto[server]==$MOTO_VERSION into $VENV"
  local start=$SECONDS
  install_venv "$VENV" "$STAMP" "moto[server]==$MOTO_VERSION"
  log "installed in $((SECONDS - start)) s"
}

ensure_awscli() {
  local base="$CACHE_ROOT/awscli-$AWSCLI_VERSION" venv stamp
  venv="$base/venv"; stamp="$venv/.nestor-complete"
  if ! [[ -f "$stamp" && -x "$venv/bin/aws" ]]; then
    mkdir -p "$base"
    exec 8>"$base/.install.lock"
    flock -w 900 8 || { log "timed out waiting for another install"; return 1; }
    if ! [[ -f "$stamp" && -x "$venv/bin/aws" ]]; then
      log "installing awscli==$AWSCLI_VERSION into $venv"
      install_venv "$venv" "$stamp" "awscli==$AWSCLI_VERSION"
    fi
  fi
  echo "$venv/bin/aws"
}

answers() { # port
  curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$1/" 2>/dev/null | grep -q '^200$'
}

running_port() {
  [[ -f "$PIDFILE" && -f "$PORTFILE" ]] || return 1
  local pid port
  pid=$(cat "$PIDFILE"); port=$(cat "$PORTFILE")
  kill -0 "$pid" 2>/dev/null || return 1
  answers "$port" || return 1
  echo "$port"
}

free_port() {
  "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case "$mode" in
  install) ensure_moto; echo "$VENV"; exit 0 ;;
  awscli) ensure_awscli; exit 0 ;;
  stop)
    if [[ -f "$PIDFILE" ]]; then
      pid=$(cat "$PIDFILE")
      if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        log "stopped moto_server (pid $pid)"
      fi
      rm -f "$PIDFILE" "$PORTFILE"
    fi
    exit 0 ;;
esac

ensure_moto
exec 9>"$BASE/.server.lock"
flock -w 60 9 || { log "timed out waiting for another start"; exit 1; }
if port=$(running_port); then
  echo "http://127.0.0.1:$port"
  exit 0
fi

port="${NESTOR_S3_PORT:-$(free_port)}"
log "starting moto_server on 127.0.0.1:$port (log: $LOGFILE)"
# setsid: the server outlives this script (and the shell that ran it) on purpose; 9>&-: it
# must not inherit the lock.
setsid nohup "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$LOGFILE" 2>&1 </dev/null 9>&- &
pid=$!
echo "$pid" >"$PIDFILE"
echo "$port" >"$PORTFILE"
for _ in $(seq 1 300); do # at most 30 s
  if answers "$port"; then
    echo "http://127.0.0.1:$port"
    exit 0
  fi
  if ! kill -0 "$pid" 2>/dev/null; then
    log "moto_server exited; its log:"; tail -n 20 "$LOGFILE" >&2; rm -f "$PIDFILE" "$PORTFILE"; exit 1
  fi
  sleep 0.1
done
log "moto_server did not answer on port $port within 30 s; its log:"
tail -n 20 "$LOGFILE" >&2
kill "$pid" 2>/dev/null || true
rm -f "$PIDFILE" "$PORTFILE"
exit 1
