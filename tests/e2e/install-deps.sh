#!/usr/bin/env bash
# Installs tests/e2e/requirements.txt into the given venv (default: the agent-server venv).
# Cached: a stamp keyed by the requirements file's hash makes a rerun a no-op (< 0.1 s).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-$(bash "$HERE/../../scripts/setup-agent-server.sh")}"
REQ="$HERE/requirements.txt"
HASH="$(sha256sum "$REQ" | cut -c1-16)"
STAMP="$VENV/.nestor-e2e-deps-$HASH"
if [[ -f "$STAMP" ]]; then exit 0; fi
exec 9>"$VENV/.nestor-e2e-deps.lock"
flock -w 300 9 || { echo "install-deps: timed out waiting for another install" >&2; exit 1; }
if [[ -f "$STAMP" ]]; then exit 0; fi
echo "install-deps: installing $(grep -v '^#' "$REQ" | xargs) into $VENV" >&2
if "$VENV/bin/python" -m uv --version >/dev/null 2>&1; then
  "$VENV/bin/python" -m uv pip install --python "$VENV/bin/python" --quiet -r "$REQ" >&2
else
  "$VENV/bin/python" -m pip install --quiet -r "$REQ" >&2
fi
rm -f "$VENV"/.nestor-e2e-deps-*
touch "$STAMP"
