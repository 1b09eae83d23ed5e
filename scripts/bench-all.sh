#!/usr/bin/env bash
# The whole benchmark suite in one command, bounded to 15 minutes (docs/performance.md):
#   1. `nestor-bench run`     REST + WebSocket, direct vs nestor vs nginx (scripts/bench.sh)
#   2. `nestor-bench catalog` search/count/paging over 1,000 conversations on 10 downstreams
#                             vs one fake holding all; upstream connection reuse
#   3. `nestor-bench create`  create -> first event with the real agent-server: process,
#                             pool, docker (cold) vs the agent-server's own docker mode
#   4. `nestor-bench dockermode` REST, events-socket latency and memory: nestor's docker
#                             provisioner vs the agent-server's docker mode (containers
#                             direct, nginx alongside); left out with BENCH_NO_DOCKER=1
# The soak test is not part of it (10 minutes on its own: `nestor-bench soak`).
#
# Each phase has its own timeout (run 480 s, catalog 150 s, create 420 s, dockermode 360 s) inside an overall
# bound of 870 s plus the one-time setup (release build, agent-server venv, image and engine,
# all cached after the first time). A phase that fails or times out is reported and the next
# one still runs; the exit status is non-zero if any failed.
#
# Charts: docs/bench/*.svg (the run phase's four, catalog.svg, create.svg, dockermode.svg).
#
# Usage: scripts/bench-all.sh [--quick]
# Env:   BENCH_DIR=<dir>     where results go (default docs/bench)
#        BENCH_NO_BUILD=1    use the binaries already in target/release
#        BENCH_NO_DOCKER=1   leave out the two docker targets of `create`
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "bench-all: $*" >&2; }

quick=()
[[ "${1:-}" == "--quick" ]] && quick=(--quick)
dir="${BENCH_DIR:-docs/bench}"
mkdir -p "$dir"
stamp="$(date -u +%F)"
next_free() { # $1 = base name without .json
  local out="$1.json" n=2
  while [[ -e "$out" ]]; do out="$1-$n.json"; n=$((n + 1)); done
  echo "$out"
}

if [[ "${BENCH_NO_BUILD:-}" != 1 ]]; then
  log "building release binaries"
  cargo build --release -q -p nestor-aggregator -p nestor-test-support -p nestor-bench
fi
venv="$(bash scripts/setup-agent-server.sh)"
image=() docker_env=()
if [[ "${BENCH_NO_DOCKER:-}" != 1 ]]; then
  docker_host="$(bash scripts/setup-docker.sh | tail -n1)"
  image=(--image "$(bash scripts/build-agent-server-image.sh | tail -n1)" --docker-host "$docker_host")
  docker_env=(DOCKER_HOST="$docker_host")
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/nestor-bench-all.XXXXXX")"
cleanup() {
  # Each nestor-bench stops what it starts; this only matters if one was itself killed.
  for f in "$work"/*/pids/*.pid; do
    [[ -f "$f" ]] || continue
    kill -KILL -- "-$(cat "$f")" 2>/dev/null || kill -KILL "$(cat "$f")" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

start=$SECONDS
failed=0
remaining() { echo $((870 - (SECONDS - start))); }
phase() { # name, timeout, command...
  local name="$1" limit="$2"; shift 2
  local left; left="$(remaining)"
  (( limit > left )) && limit="$left"
  if (( limit < 30 )); then log "$name skipped: the 15-minute budget is spent"; failed=1; return; fi
  log "$name (at most ${limit}s)"
  local t0=$SECONDS
  if ! timeout --signal=TERM --kill-after=20 "$limit" "$@"; then
    log "$name FAILED or timed out"; failed=1
  fi
  log "$name took $((SECONDS - t0))s"
}

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
phase run 480 env BENCH_NO_BUILD=1 BENCH_OUT="$(next_free "$dir/results-$stamp")" bash scripts/bench.sh "${quick[@]}"
mkdir -p "$work/catalog" "$work/create"
phase catalog 150 target/release/nestor-bench catalog --out "$(next_free "$dir/catalog-$stamp")" --plots "$dir" --work-dir "$work/catalog" "${quick[@]}"
phase create 420 env "${docker_env[@]}" target/release/nestor-bench create --out "$(next_free "$dir/create-$stamp")" --plots "$dir" \
  --work-dir "$work/create" --agent-server "$venv/bin/agent-server" "${image[@]}" "${quick[@]}"
if [[ "${BENCH_NO_DOCKER:-}" != 1 ]]; then
  mkdir -p "$work/dockermode"
  phase dockermode 360 env "${docker_env[@]}" target/release/nestor-bench dockermode --out "$(next_free "$dir/dockermode-$stamp")" --plots "$dir" \
    --work-dir "$work/dockermode" --agent-server "$venv/bin/agent-server" "${image[@]}" \
    --rounds 2 --requests 150 --frames 30 --burst 100 "${quick[@]}"
fi
log "suite took $((SECONDS - start))s (budget 870s after setup); results in $dir"
exit "$failed"
