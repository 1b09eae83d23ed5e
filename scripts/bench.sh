#!/usr/bin/env bash
# The benchmark suite: the same REST and WebSocket workloads against the fake agent-server
# directly, through nestor and through nginx, side by side in one run (see
# docs/performance.md). Prints the table and writes docs/bench/results-<date>.json plus the
# SVG charts in docs/bench/. Takes about 5 minutes; bounded to 15.
#
# Usage: scripts/bench.sh [--quick] [more `nestor-bench run` flags, e.g. --rounds 5]
# Env:   BENCH_OUT=<file>   results file (default docs/bench/results-<UTC date>[-N].json)
#        BENCH_NO_BUILD=1   use the binaries already in target/release
#        BENCH_NICE=<n>     niceness of the run and everything it starts (default -10 when
#                           allowed: other work on a shared machine then disturbs it less;
#                           every target gets the same priority, so comparisons stay fair)
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "bench: $*" >&2; }

bash scripts/setup-system.sh nginx wrk

if [[ "${BENCH_NO_BUILD:-}" != 1 ]]; then
  log "building release binaries"
  cargo build --release -q -p nestor-aggregator -p nestor-test-support -p nestor-bench
fi

# Descriptors: 10,000 idle pairs need 20,000+ in nestor (client + downstream socket each).
# Raise the soft limit as far as the hard one goes; nestor-bench clamps what it cannot fit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log "open files limit: $(ulimit -n) (hard $(ulimit -Hn))"

out="${BENCH_OUT:-}"
if [[ -z "$out" ]]; then
  base="docs/bench/results-$(date -u +%F)"
  out="$base.json"; n=2
  while [[ -e "$out" ]]; do out="$base-$n.json"; n=$((n + 1)); done
fi
mkdir -p "$(dirname "$out")"

work="$(mktemp -d "${TMPDIR:-/tmp}/nestor-bench.XXXXXX")"
cleanup() {
  # nestor-bench kills what it starts; this only matters if it was itself killed.
  if [[ -d "$work/pids" ]]; then
    for f in "$work"/pids/*.pid; do
      [[ -f "$f" ]] || continue
      pid="$(cat "$f")"
      case "$(basename "$f")" in
        nginx*) kill -KILL -- "-$pid" 2>/dev/null || true ;;  # master and its workers
        *) kill -KILL "$pid" 2>/dev/null || true ;;
      esac
    done
  fi
  rm -rf "$work"
}
trap cleanup EXIT

nice_cmd=()
niceness="${BENCH_NICE:--10}"
if [[ "$niceness" != 0 ]] && nice -n "$niceness" true 2>/dev/null && [[ "$(nice -n "$niceness" nice)" == "$niceness" ]]; then
  nice_cmd=(nice -n "$niceness")
fi
log "results: $out${nice_cmd:+ (niceness $niceness)}"
timeout --signal=TERM --kill-after=30 900 \
  "${nice_cmd[@]}" target/release/nestor-bench run --out "$out" --plots docs/bench --work-dir "$work" "$@"
log "charts: docs/bench/*.svg (regenerate: target/release/nestor-bench plot --results $out --out docs/bench)"
