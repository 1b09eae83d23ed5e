#!/usr/bin/env bash
# Smoke test of the agent-server image: starts a container with a session key, publishes port
# 8000 on a free loopback port, waits for /alive (bounded), checks /server_info reports the
# expected version and that the REST API enforces the key, then removes the container.
#
# Usage: scripts/smoke-agent-server-image.sh [IMAGE]
#   IMAGE defaults to the tag printed by scripts/build-agent-server-image.sh (which builds it if
#   needed). NESTOR_AGENT_SERVER_VERSION (default 1.58.2) is the version expected.
# Prints "ok <image> alive after <s> s" on stdout; diagnostics and the container's log on failure
# go to stderr.
set -euo pipefail

HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
VERSION="${NESTOR_AGENT_SERVER_VERSION:-1.58.2}"
ALIVE_TIMEOUT="${NESTOR_SMOKE_ALIVE_TIMEOUT:-60}"
KEY=k

log() { echo "smoke-agent-server-image: $*" >&2; }

"$HERE/setup-docker.sh" >/dev/null
IMAGE="${1:-$("$HERE/build-agent-server-image.sh")}"

CID=""
cleanup() {
  local rc=$?
  if [[ -n "$CID" ]]; then
    if ((rc != 0)); then
      log "container log (last 40 lines):"
      docker logs --tail 40 "$CID" >&2 2>&1 || true
    fi
    docker rm -f "$CID" >/dev/null 2>&1 || true
  fi
  exit $rc
}
trap cleanup EXIT

start_ns=$(date +%s%N)
CID=$(docker run -d --rm -p 127.0.0.1::8000 -e SESSION_API_KEY=$KEY "$IMAGE")
HOSTPORT=$(docker port "$CID" 8000/tcp | grep -m1 '^127\.0\.0\.1:' || true)
[[ -n "$HOSTPORT" ]] || { log "docker port gave no 127.0.0.1 mapping for 8000/tcp"; exit 1; }
URL="http://$HOSTPORT"
log "container ${CID:0:12} from $IMAGE on $URL"

elapsed() { echo $(( ($(date +%s%N) - start_ns) / 1000000 )); }
alive_ms=""
while (( $(elapsed) < ALIVE_TIMEOUT * 1000 )); do
  if [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$URL/alive" || true)" == 200 ]]; then
    alive_ms=$(elapsed); break
  fi
  if [[ "$(docker inspect -f '{{.State.Running}}' "$CID" 2>/dev/null || echo false)" != true ]]; then
    log "container exited before /alive answered"; exit 1
  fi
  sleep 0.1
done
[[ -n "$alive_ms" ]] || { log "/alive did not answer 200 within ${ALIVE_TIMEOUT}s"; exit 1; }
alive_s=$(awk -v ms="$alive_ms" 'BEGIN { printf "%.1f", ms / 1000 }')
log "/alive answered after $alive_s s (clock started before docker run)"

INFO=$(curl -sf --max-time 5 "$URL/server_info")
GOT=$(printf '%s' "$INFO" | python3 -c 'import json, sys; print(json.load(sys.stdin).get("version", ""))')
[[ "$GOT" == "$VERSION" ]] || { log "/server_info version is '$GOT', wanted $VERSION: $INFO"; exit 1; }

# The REST API must require the session key.
no_key=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$URL/api/conversations/search")
with_key=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H "X-Session-API-Key: $KEY" "$URL/api/conversations/search")
[[ "$no_key" == 401 || "$no_key" == 403 ]] || { log "GET /api/conversations/search without key gave $no_key, wanted 401/403"; exit 1; }
[[ "$with_key" == 200 ]] || { log "GET /api/conversations/search with key gave $with_key, wanted 200"; exit 1; }

# It runs as the unprivileged openhands user, like upstream.
uid=$(docker exec "$CID" id -u)
[[ "$uid" == 10001 ]] || { log "server runs as uid $uid, wanted 10001"; exit 1; }

echo "ok $IMAGE version $GOT alive after $alive_s s"
