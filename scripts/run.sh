#!/usr/bin/env bash
# Quick start: set everything up and run nestor on its embedded default (the process
# provisioner: one local agent-server subprocess per conversation).
#
#   scripts/run.sh [nestor serve flags...]     e.g. scripts/run.sh --bind 127.0.0.1:8000
#
# Set-up (cached, so later runs start at once): Debian packages nestor needs (tmux), the real
# openhands-agent-server venv (scripts/setup-agent-server.sh), and a release build of nestor.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup-system.sh tmux
bash scripts/setup-agent-server.sh >/dev/null
cargo build --release --locked -q -p nestor-aggregator
exec "$ROOT/target/release/nestor" serve "$@"
