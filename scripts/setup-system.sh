#!/usr/bin/env bash
# Installs the Debian packages nestor's run and test commands need, only those missing.
# Idempotent and quick when everything is there. Usage: setup-system.sh [package...]
# (default: what running nestor needs: tmux, used by the agent-server's terminal tool).
set -euo pipefail
log() { echo "setup-system: $*" >&2; }

want=("$@")
[[ ${#want[@]} -gt 0 ]] || want=(tmux)

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if ! command -v apt-get >/dev/null; then
  log "missing packages ${missing[*]} and no apt-get here: install them yourself"; exit 1
fi
SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
log "installing ${missing[*]}"
for attempt in 1 2 3; do
  if timeout 300 $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
    exit 0
  fi
  log "apt-get install failed (attempt $attempt); refreshing package lists"
  timeout 300 $SUDO apt-get update -q >&2 || true
done
log "could not install ${missing[*]}"; exit 1
