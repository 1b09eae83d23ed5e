#!/usr/bin/env bash
# Makes a working Docker engine available on this machine. Idempotent:
#  * if the engine already answers (`docker version` reports a server), it does nothing;
#  * if a dockerd is already starting (e.g. another run of this script just launched it), it only
#    waits for it;
#  * otherwise it installs Debian's docker.io if dockerd is absent and starts dockerd without
#    systemd (these machines have none), then waits for it, bounded.
#
# Prints the DOCKER_HOST in use on stdout (one line), so callers may
#   export DOCKER_HOST=$(scripts/setup-docker.sh)
# Everything else goes to stderr. Exits non-zero with the tail of dockerd's log if the engine
# does not come up within NESTOR_DOCKER_START_TIMEOUT seconds (default 60).
#
# Background (see ../shared/docs/agent-server/running.md, "A container image without a registry"):
#  * A new machine has only the Docker *client* (28.x, /usr/local/bin/docker) and no engine.
#    Debian bookworm's docker.io brings dockerd 20.10 (API 1.41); the 28.x client and bollard
#    negotiate down to it. docker.io also installs its own 20.10 client as /usr/bin/docker;
#    /usr/local/bin comes first on PATH, so `docker` stays the 28.x client. Both work.
#  * There is no systemd: the package's postinst cannot start the service ("policy-rc.d denied
#    execution of start"), so we start dockerd ourselves with setsid, detached from this shell.
#  * Storage driver: on these machines / is ext4 on a virtio disk and the kernel has overlay, so
#    dockerd's default overlay2 works (checked: "Storage Driver: overlay2, Backing Filesystem:
#    extfs", containers start in ~0.3 s). Where overlay2 cannot work (e.g. /var/lib/docker itself
#    on overlayfs, as inside another container), dockerd exits at start-up; we then retry with
#    fuse-overlayfs (needs /dev/fuse; installed from Debian) and last with vfs (always works, but
#    copies the whole image for every container: slow and large for an ~800 MB image).
#    The driver that worked is remembered in the cache dir and used directly next time.
#    NESTOR_DOCKER_STORAGE_DRIVER=<driver> forces one.
#  * The bridge network's NAT uses iptables (nf_tables backend on bookworm); it works here, and
#    `docker run -p 127.0.0.1::8000` publishing works. Beware: a second dockerd started on the
#    same host with `--bridge=none` deletes the shared docker0 interface at start-up, after which
#    this engine's `docker run` fails ("could not find bridge docker0") until it is restarted.
set -euo pipefail

CACHE_ROOT="${NESTOR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nestor}"
STATE_DIR="$CACHE_ROOT/docker"
LOG="$STATE_DIR/dockerd.log"
DRIVER_FILE="$STATE_DIR/storage-driver"
START_TIMEOUT="${NESTOR_DOCKER_START_TIMEOUT:-60}"
DEFAULT_HOST="unix:///var/run/docker.sock"
PIDFILE=/var/run/docker.pid

log() { echo "setup-docker: $*" >&2; }
die() { log "error: $*"; exit 1; }

engine_ok() { 
  local v
  v=$(timeout 15 docker version --format '{{.Server.Version}}' 2>/dev/null) && [[ -n "$v" ]]
}

print_host() { echo "${DOCKER_HOST:-$DEFAULT_HOST}"; }

if command -v docker >/dev/null 2>&1 && engine_ok; then
  print_host
  exit 0
fi

if [[ -n "${DOCKER_HOST:-}" && "$DOCKER_HOST" != "$DEFAULT_HOST" ]]; then
  die "DOCKER_HOST=$DOCKER_HOST does not answer, and this script only starts a local engine on $DEFAULT_HOST; unset DOCKER_HOST or start that engine"
fi

SUDO=()
if [[ $EUID -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    die "the Docker engine is not running and starting it needs root (no password-less sudo here)"
  fi
fi

mkdir -p "$STATE_DIR"
# One starter at a time: a second run waits here, then finds the engine up (or starting).
exec 9>"$STATE_DIR/.setup.lock"
flock -w $((START_TIMEOUT * 3 + 600)) 9 || die "timed out waiting for another setup-docker run"
if command -v docker >/dev/null 2>&1 && engine_ok; then print_host; exit 0; fi

apt_install() {
  # Non-interactive, bounded retries (the registry proxy occasionally drops a connection).
  local try
  for try in 1 2 3; do
    if "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -q >&2 &&
       "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q \
         --no-install-recommends "$@" >&2; then
      return 0
    fi
    log "apt-get install $* failed (try $try of 3)"
    sleep $((try * 5))
  done
  return 1
}

if ! command -v docker >/dev/null 2>&1 || { ! command -v dockerd >/dev/null 2>&1 && [[ ! -x /usr/sbin/dockerd ]]; }; then
  log "dockerd (or the docker client) not found; installing Debian's docker.io"
  apt_install docker.io || die "could not install docker.io"
fi
command -v docker >/dev/null 2>&1 || die "no docker client on PATH even after installing docker.io"
DOCKERD=$(command -v dockerd 2>/dev/null || echo /usr/sbin/dockerd)

# Is a dockerd already running (perhaps still starting)? Trust its pid file first, then the
# process table. We never kill a dockerd we did not start in this run.
running_dockerd() {
  local pid
  if [[ -r $PIDFILE ]]; then
    pid=$(cat "$PIDFILE" 2>/dev/null || true)
    if [[ -n "$pid" && -r /proc/$pid/comm && "$(cat "/proc/$pid/comm" 2>/dev/null)" == dockerd ]]; then
      echo "$pid"; return 0
    fi
  fi
  pid=$(pgrep -x dockerd 2>/dev/null | head -n1 || true)
  [[ -n "$pid" ]] && { echo "$pid"; return 0; }
  return 1
}

# Waits until the engine answers. Returns 1 if the given dockerd pid died, 2 on timeout.
wait_engine() {
  local pid=$1 deadline=$((SECONDS + START_TIMEOUT))
  while ((SECONDS < deadline)); do
    engine_ok && return 0
    if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
      sleep 0.2; engine_ok && return 0
      return 1
    fi
    sleep 0.5
  done
  return 2
}

# The last N meaningful lines of dockerd's log (its grpc "[core]" chatter says nothing useful).
log_tail() { [[ -f "$LOG" ]] && grep -v '\[core\]' "$LOG" | tail -n "$1" >&2 || true; }

fail_with_log() {
  log "$1"
  log "last lines of $LOG:"
  log_tail 30
  exit 1
}

if pid=$(running_dockerd); then
  log "dockerd (pid $pid) is already running; waiting up to ${START_TIMEOUT}s for it to answer"
  rc=0; wait_engine "$pid" || rc=$?
  case $rc in
    0) print_host; exit 0 ;;
    1) log "dockerd pid $pid exited before answering; starting a new one" ;;
    *) fail_with_log "dockerd pid $pid did not answer within ${START_TIMEOUT}s" ;;
  esac
fi

# Which storage drivers to try, in order.
drivers=()
if [[ -n "${NESTOR_DOCKER_STORAGE_DRIVER:-}" ]]; then
  drivers=("$NESTOR_DOCKER_STORAGE_DRIVER")
elif [[ -s "$DRIVER_FILE" ]]; then
  drivers=("$(cat "$DRIVER_FILE")")   # what worked last time, then the usual fall-backs
  for d in "" fuse-overlayfs vfs; do [[ "$d" == "${drivers[0]}" ]] || drivers+=("$d"); done
elif [[ -s /etc/docker/daemon.json ]] && grep -q '"storage-driver"' /etc/docker/daemon.json; then
  drivers=("")   # the admin chose one; do not fight daemon.json (a flag would conflict with it)
else
  drivers=("" fuse-overlayfs vfs)   # "" = dockerd's own choice (overlay2 here)
fi

start_dockerd() {
  local driver=$1 args=()
  [[ -n "$driver" ]] && args+=(--storage-driver "$driver")
  if [[ "$driver" == fuse-overlayfs ]] && ! command -v fuse-overlayfs >/dev/null 2>&1; then
    [[ -e /dev/fuse ]] || { log "no /dev/fuse: skipping fuse-overlayfs"; return 1; }
    apt_install fuse-overlayfs || { log "could not install fuse-overlayfs"; return 1; }
  fi
  log "starting dockerd${driver:+ --storage-driver $driver} (log: $LOG)"
  {
    echo "=== $(date -u +%FT%TZ) setup-docker: $DOCKERD ${args[*]}"
  } >>"$LOG"
  # setsid: own session, so it survives this shell and is not hit by its job-control signals.
  # cd /: do not pin the caller's working directory.
  (cd / && exec "${SUDO[@]}" setsid "$DOCKERD" "${args[@]}" </dev/null >>"$LOG" 2>&1) &
  STARTED_PID=$!
  # With sudo, $! is sudo's pid; sudo stays alive as long as dockerd does, so kill -0 still works.
}

for driver in "${drivers[@]}"; do
  start_dockerd "$driver" || continue
  rc=0; wait_engine "$STARTED_PID" || rc=$?
  if ((rc == 0)); then
    actual=$(timeout 15 docker info --format '{{.Driver}}' 2>/dev/null || true)
    [[ -n "$actual" && -z "${NESTOR_DOCKER_STORAGE_DRIVER:-}" ]] && echo "$actual" >"$DRIVER_FILE"
    log "Docker engine $(timeout 15 docker version --format '{{.Server.Version}}') is up (storage driver ${actual:-?})"
    print_host
    exit 0
  fi
  if ((rc == 2)); then
    fail_with_log "dockerd (pid $STARTED_PID) did not answer within ${START_TIMEOUT}s; it is left running"
  fi
  log "dockerd${driver:+ --storage-driver $driver} exited at start-up; last lines of $LOG:"
  log_tail 8
done
tried=(); for d in "${drivers[@]}"; do tried+=("${d:-default}"); done
die "could not start dockerd with any storage driver (tried: ${tried[*]}); see $LOG"
