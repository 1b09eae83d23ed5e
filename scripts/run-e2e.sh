#!/usr/bin/env bash
# Runs nestor's end-to-end tests (tests/e2e): real agent-server + real Python SDK + fake LLM.
#
#   scripts/run-e2e.sh [pytest args...]          e.g. scripts/run-e2e.sh -k multistep -x
#
# Environment:
#   NESTOR_E2E_TARGET         direct (default: a real agent-server, no nestor) | nestor-existing | nestor-process
#                             | nestor-docker (needs the engine and NESTOR_TEST_AGENT_SERVER_IMAGE, see scripts/test.sh)
#   NESTOR_BIN                nestor binary for NESTOR_E2E_TARGET=nestor-process
#   NESTOR_E2E_URL / NESTOR_E2E_API_KEY   for NESTOR_E2E_TARGET=nestor-existing
#   NESTOR_E2E_TOTAL_TIMEOUT  bound on the pytest run in seconds (default 900); on expiry pytest
#                             gets SIGINT (fixtures tear down, servers are stopped), SIGKILL 60 s later
#   NESTOR_E2E_SETUP_TIMEOUT  bound on venv + test-deps installation (default 900)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SETUP_TIMEOUT="${NESTOR_E2E_SETUP_TIMEOUT:-900}"
TOTAL_TIMEOUT="${NESTOR_E2E_TOTAL_TIMEOUT:-900}"

VENV="$(timeout "$SETUP_TIMEOUT" bash "$ROOT/scripts/setup-agent-server.sh")"
timeout "$SETUP_TIMEOUT" bash "$ROOT/tests/e2e/install-deps.sh" "$VENV"

export NESTOR_E2E_TARGET="${NESTOR_E2E_TARGET:-direct}"
export LITELLM_LOCAL_MODEL_COST_MAP=True OPENHANDS_SUPPRESS_BANNER=1 TZ=UTC
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}" no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"
export NESTOR_AGENT_SERVER_BIN="${NESTOR_AGENT_SERVER_BIN:-$VENV/bin/agent-server}"

echo "run-e2e: target=$NESTOR_E2E_TARGET venv=$VENV (bound ${TOTAL_TIMEOUT}s)" >&2
cd "$ROOT/tests/e2e"
set +e
timeout --signal=INT --kill-after=60 "$TOTAL_TIMEOUT" "$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 124 ]]; then echo "run-e2e: pytest exceeded ${TOTAL_TIMEOUT}s" >&2; fi
exit $rc
