#!/usr/bin/env bash
# Installs the real OpenHands agent-server (and the SDK used by the end-to-end tests) into a
# venv cached outside the repository, keyed by version. Idempotent: a second run with the venv
# already complete returns in well under a second.
#
# Prints the venv's path on stdout (last line). Everything else goes to stderr.
#
# Why each step (see ../shared/docs/agent-server/running.md):
#  * Python >= 3.12 is required (PEP 695 syntax); the system python3 may be 3.11.
#  * 1.58.2 pins certifi>=2026.10.19, newer than some registries serve, so a plain install
#    silently resolves to 1.58.0. We install with uv and an override file instead.
#  * --compile-bytecode, else the first start pays for compiling.
set -euo pipefail

VERSION="${NESTOR_AGENT_SERVER_VERSION:-1.58.2}"
CACHE_ROOT="${NESTOR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nestor}"
VENV="$CACHE_ROOT/agent-server-$VERSION/venv"
STAMP="$VENV/.nestor-complete"

log() { echo "setup-agent-server: $*" >&2; }

if [[ -f "$STAMP" && -x "$VENV/bin/agent-server" ]]; then
  echo "$VENV"
  exit 0
fi

find_python() {
  local tried=()
  local candidates=()
  for v in 3.13 3.12 3.14; do
    candidates+=("python$v")
  done
  local roots=()
  if command -v pyenv >/dev/null 2>&1; then roots+=("$(pyenv root)/versions"); fi
  roots+=("$HOME/.pyenv/versions" "/usr/local/bin" "/usr/bin")
  for c in "${candidates[@]}"; do
    tried+=("$c")
    if p=$(command -v "$c" 2>/dev/null) && "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3,12) else 1)' 2>/dev/null; then
      echo "$p"; return 0
    fi
  done
  for r in "${roots[@]}"; do
    [[ -d "$r" ]] || continue
    for d in "$r"/3.1[2-9]* "$r"/3.[2-9][0-9]*; do
      [[ -x "$d/bin/python3" ]] || continue
      tried+=("$d/bin/python3")
      if "$d/bin/python3" -c 'import sys; sys.exit(0 if sys.version_info >= (3,12) else 1)' 2>/dev/null; then
        echo "$d/bin/python3"; return 0
      fi
    done
  done
  log "no Python >= 3.12 found; tried: ${tried[*]}"
  log "install python3.12 or newer (e.g. 'pyenv install 3.12' or your distribution's python3.12) and retry"
  return 1
}

PY=$(find_python)
log "using $PY ($("$PY" --version 2>&1)) for agent-server $VERSION"

mkdir -p "$CACHE_ROOT"
# One installer at a time (CI may start several set-ups at once).
exec 9>"$CACHE_ROOT/.agent-server-$VERSION.lock"
flock -w 900 9 || { log "timed out waiting for another install to finish"; exit 1; }
if [[ -f "$STAMP" && -x "$VENV/bin/agent-server" ]]; then echo "$VENV"; exit 0; fi

rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip uv >&2

OVERRIDES="$CACHE_ROOT/agent-server-$VERSION/overrides.txt"
echo 'certifi>=2026.10.18' >"$OVERRIDES"

start=$(date +%s)
"$VENV/bin/python" -m uv pip install --python "$VENV/bin/python" --compile-bytecode \
  --override "$OVERRIDES" \
  "openhands-agent-server==$VERSION" "openhands-sdk==$VERSION" \
  "openhands-tools==$VERSION" "openhands-workspace==$VERSION" \
  "websockets" "httpx" >&2
log "installed in $(( $(date +%s) - start )) s"

"$VENV/bin/python" - <<EOF >&2
import importlib.metadata as m
v = m.version("openhands-agent-server")
assert v == "$VERSION", f"installed openhands-agent-server {v}, wanted $VERSION"
print("openhands-agent-server", v, "sdk", m.version("openhands-sdk"))
EOF

touch "$STAMP"
echo "$VENV"
