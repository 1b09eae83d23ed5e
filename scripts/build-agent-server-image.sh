#!/usr/bin/env bash
# Builds a Docker image of the real OpenHands agent-server without any container registry:
# a Debian trixie rootfs from debootstrap, a venv inside it made with trixie's Python 3.13 and
# uv, then `docker import`. Prints the image tag on stdout (last line); everything else goes to
# stderr. Also tags the image as nestor/agent-server:<version>.
#
# Idempotent and cached by content hash. The hash covers this script's own bytes plus the
# version inputs below (agent-server version, Debian suite, package list, uv version,
# architecture); it is part of the tag (nestor/agent-server:<version>-<hash>) and stored in the
# image label org.nestor.agent-server.build-hash.
#  * If an image with that tag and label exists, the script prints its tag and exits (~0.1 s).
#  * The finished rootfs tarball (and the bare debootstrap tarball) are cached under
#    $NESTOR_CACHE_DIR/agent-server-image/<version>-<hash>/, so a rebuild after `docker rmi`
#    re-imports without touching the network (~15 s).
#  * A flock serialises concurrent runs; the loser waits and then takes the fast path.
#  * Needs root (debootstrap, chroot, mounts) and a Docker engine; it runs ./setup-docker.sh.
#
# Why each step (see ../shared/docs/agent-server/running.md, "A container image without a
# registry"):
#  * No registry is reachable, so no base image can be pulled: debootstrap builds the rootfs from
#    Debian's archive, using the same mirror as this host's apt (NESTOR_DEBIAN_MIRROR overrides).
#  * Python >= 3.12 is required; trixie's python3 is 3.13. Trixie binaries do not run on a
#    bookworm host (GLIBC_2.38 not found), so the venv is made and filled *inside* the chroot
#    with a copy of the uv binary (uv needs neither pip nor python3-venv).
#  * 1.58.2 pins certifi>=2026.10.19, newer than the registry may serve: install with an uv
#    override `certifi>=2026.10.18`. --compile-bytecode, else every container start pays for it.
#  * A TLS-intercepting proxy may sit in front of the registries; its CA is in the host bundle
#    only. The host bundle is copied into the chroot as a separate file for the install step and
#    removed before the image is made; the image trusts the normal public CAs through Debian's
#    ca-certificates package, which we never modify.
#  * The image mirrors upstream's layout: venv at /agent-server/.venv, user `openhands`
#    (uid/gid 10001) owning /workspace, WORKDIR /, so the server's relative defaults
#    (workspace/project, workspace/conversations, ...) land under /workspace. All server state
#    lives under /workspace (HOME=/workspace too, so ~/.openhands is OH_PERSISTENCE_DIR):
#    mount one volume there to keep a server's state across containers. Like upstream, the venv
#    is not on PATH: `python`/`pip` in the agent's terminal must not touch the server's venv.
set -euo pipefail

VERSION="${NESTOR_AGENT_SERVER_VERSION:-1.58.2}"
IMAGE_REPO="${NESTOR_AGENT_SERVER_IMAGE_REPO:-nestor/agent-server}"
SUITE=trixie
INCLUDE=python3,ca-certificates,tmux,git,bash
UV_VERSION=0.13.9
PY_PACKAGES=(
  "openhands-agent-server==$VERSION" "openhands-sdk==$VERSION"
  "openhands-tools==$VERSION" "openhands-workspace==$VERSION"
)
OVERRIDES='certifi>=2026.10.18'
LABEL_KEY=org.nestor.agent-server.build-hash
CACHE_ROOT="${NESTOR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nestor}"

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
HERE=$(dirname "$SCRIPT_PATH")
ARCH=$(dpkg --print-architecture 2>/dev/null || uname -m)

log() { echo "build-agent-server-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

HASH=$({
  cat "$SCRIPT_PATH"
  printf 'version=%s suite=%s include=%s uv=%s arch=%s\n' "$VERSION" "$SUITE" "$INCLUDE" "$UV_VERSION" "$ARCH"
} | sha256sum | cut -c1-12)
TAG="$IMAGE_REPO:$VERSION-$HASH"
ALIAS="$IMAGE_REPO:$VERSION"

image_ready() {
  local got
  got=$(docker image inspect --format "{{index .Config.Labels \"$LABEL_KEY\"}}" "$TAG" 2>/dev/null) &&
    [[ "$got" == "$HASH" ]]
}

finish() {
  docker tag "$TAG" "$ALIAS" >&2
  echo "$TAG"
  exit 0
}

# Fast path: engine up (setup-docker.sh returns at once when it is) and image present.
"$HERE/setup-docker.sh" >/dev/null
image_ready && finish

[[ $EUID -eq 0 ]] || die "building the image needs root (debootstrap, chroot, mounts); run as root"

BUILD_DIR="$CACHE_ROOT/agent-server-image/$VERSION-$HASH"
BASE_TAR="$BUILD_DIR/debootstrap-$SUITE.tar"
ROOTFS_TAR="$BUILD_DIR/rootfs.tar"
WORK="$BUILD_DIR/work"
ROOTFS="$WORK/rootfs"
mkdir -p "$BUILD_DIR"

exec 9>"$CACHE_ROOT/.agent-server-image.lock"
if ! flock -n 9; then
  log "another build is running; waiting for it (up to 30 min)"
  flock -w 1800 9 || die "timed out waiting for another build-agent-server-image run"
fi
image_ready && finish

t0=$SECONDS

# ---------------------------------------------------------------------------------------------
# Mount bookkeeping. Never delete a directory with something mounted below it (a bind-mounted
# /dev under rm -rf would be a disaster): every rm of the work dir goes through safe_rm_work.
MOUNTS=()
mounts_under() { awk -v p="$1/" '{ m = $5; gsub(/\\040/, " ", m); if (index(m "/", p) == 1) print m }' /proc/self/mountinfo; }
unmount_all() {
  local i m
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    m=${MOUNTS[i]}
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "warning: could not unmount $m"
  done
  MOUNTS=()
  # Leftovers from an interrupted earlier run (deepest first).
  if [[ -d "$WORK" ]]; then
    mounts_under "$WORK" | sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" || true; done
  fi
}
safe_rm_work() {
  unmount_all
  if [[ -d "$WORK" && -n "$(mounts_under "$WORK")" ]]; then
    die "refusing to delete $WORK: still mounted: $(mounts_under "$WORK" | tr '\n' ' ')"
  fi
  rm -rf "$WORK"
}
do_mount() { # do_mount TARGET mount-args...
  local target=$1; shift
  mkdir -p "$target"
  mount "$@" "$target"
  MOUNTS+=("$target")
}
trap 'rc=$?; unmount_all; [[ $rc -eq 0 ]] || log "failed (exit $rc); the work dir $WORK is kept for inspection and is reset by the next run"; exit $rc' EXIT

# ---------------------------------------------------------------------------------------------
apt_install() {
  local try
  for try in 1 2 3; do
    if DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -q >&2 &&
       DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q \
         --no-install-recommends "$@" >&2; then
      return 0
    fi
    log "apt-get install $* failed (try $try of 3)"
    sleep $((try * 5))
  done
  return 1
}

# The Debian mirror this host's apt uses: the first deb URI whose path ends in /debian (not the
# security archive, not third-party repositories). Falls back to deb.debian.org.
detect_mirror() {
  if [[ -n "${NESTOR_DEBIAN_MIRROR:-}" ]]; then echo "$NESTOR_DEBIAN_MIRROR"; return; fi
  local files=() f uri
  [[ -r /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
  for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -r "$f" ]] && files+=("$f")
  done
  for f in "${files[@]}"; do
    while read -r uri; do
      if [[ "$uri" =~ ^(https?|file):.*/debian/?$ ]]; then echo "${uri%/}"; return; fi
    done < <(
      if [[ "$f" == *.sources ]]; then
        awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' "$f"
      else
        sed -E -n 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' "$f"
      fi
    )
  done
  echo "http://deb.debian.org/debian"
}

# debootstrap uses wget, which ignores apt.conf: carry over apt's HTTP proxy if one is set.
if [[ -z "${http_proxy:-}" ]] && command -v apt-config >/dev/null 2>&1; then
  APT_HTTP_PROXY=""
  eval "$(apt-config shell APT_HTTP_PROXY Acquire::http::Proxy)"
  if [[ -n "$APT_HTTP_PROXY" && "$APT_HTTP_PROXY" != DIRECT ]]; then export http_proxy="$APT_HTTP_PROXY"; fi
fi

# uv for the host side: a pinned copy under the cache (pip --target: needs no venv module).
UV_DIR="$CACHE_ROOT/tools/uv-$UV_VERSION"
ensure_uv() {
  [[ -x "$UV_DIR/bin/uv" ]] && return 0
  local py
  py=$(command -v python3 || true)
  [[ -n "$py" ]] || die "python3 is needed on the host to fetch uv from PyPI"
  log "fetching uv $UV_VERSION from PyPI"
  rm -rf "$UV_DIR.tmp"
  "$py" -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
    --target "$UV_DIR.tmp" "uv==$UV_VERSION" >&2 || die "pip install uv==$UV_VERSION failed"
  [[ -x "$UV_DIR.tmp/bin/uv" ]] || die "uv wheel has no bin/uv"
  rm -rf "$UV_DIR"; mv "$UV_DIR.tmp" "$UV_DIR"
}

# ---------------------------------------------------------------------------------------------
build_base() {
  command -v debootstrap >/dev/null 2>&1 || { log "installing debootstrap"; apt_install debootstrap || die "could not install debootstrap"; }
  local mirror try
  mirror=$(detect_mirror)
  mkdir -p "$CACHE_ROOT/debootstrap-debs"
  for try in 1 2 3; do
    safe_rm_work
    mkdir -p "$WORK"
    log "debootstrap --variant=minbase $SUITE from $mirror (try $try of 3)"
    local s=$SECONDS
    # --cache-dir keeps the downloaded .debs (shared by all builds) so a script edit does not
    # download the whole base system again.
    if debootstrap --variant=minbase --include="$INCLUDE" --cache-dir="$CACHE_ROOT/debootstrap-debs" \
         "$SUITE" "$ROOTFS" "$mirror" >"$WORK/debootstrap.log" 2>&1; then
      log "debootstrap done in $((SECONDS - s)) s"
      rm -f "$ROOTFS"/var/cache/apt/archives/*.deb   # they are in --cache-dir already
      tar -C "$ROOTFS" --numeric-owner -cf "$BASE_TAR.partial" .
      mv "$BASE_TAR.partial" "$BASE_TAR"
      return 0
    fi
    log "debootstrap failed; last lines of its log:"
    tail -n 15 "$WORK/debootstrap.log" >&2
    [[ -f "$ROOTFS/debootstrap/debootstrap.log" ]] && tail -n 15 "$ROOTFS/debootstrap/debootstrap.log" >&2
    sleep $((try * 5))
  done
  die "debootstrap failed 3 times"
}

in_chroot() {
  # A clean environment; the registry settings of the caller are passed through.
  local env=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
    SSL_CERT_FILE=/tmp/nestor-host-ca.crt UV_CACHE_DIR=/tmp/uv-cache UV_LINK_MODE=copy
    UV_PYTHON_DOWNLOADS=never UV_NO_PROGRESS=1)
  local v
  for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY \
           UV_INDEX_URL UV_DEFAULT_INDEX UV_EXTRA_INDEX_URL UV_INDEX PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
    [[ -n "${!v:-}" ]] && env+=("$v=${!v}")
  done
  chroot "$ROOTFS" /usr/bin/env -i "${env[@]}" "$@"
}

customise() {
  ensure_uv
  # The host's CA bundle (includes the intercepting proxy's CA), for the install step only.
  local host_ca="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
  [[ -r "$host_ca" ]] || host_ca=/etc/ssl/certs/ca-certificates.crt
  cp "$host_ca" "$ROOTFS/tmp/nestor-host-ca.crt"
  cp "$UV_DIR/bin/uv" "$ROOTFS/tmp/uv"
  cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true
  printf '%s\n' "$OVERRIDES" >"$ROOTFS/tmp/overrides.txt"

  do_mount "$ROOTFS/proc" -t proc proc
  do_mount "$ROOTFS/dev" --bind /dev
  # uv's download cache lives on the host, so rebuilds after a script edit are quick.
  mkdir -p "$CACHE_ROOT/uv-cache-chroot"
  do_mount "$ROOTFS/tmp/uv-cache" --bind "$CACHE_ROOT/uv-cache-chroot"

  log "creating the venv with $(in_chroot /usr/bin/python3 --version) and installing agent-server $VERSION"
  local s=$SECONDS
  in_chroot /tmp/uv venv --quiet --python /usr/bin/python3 /agent-server/.venv >&2
  in_chroot /tmp/uv pip install --python /agent-server/.venv/bin/python --compile-bytecode \
    --override /tmp/overrides.txt "${PY_PACKAGES[@]}" >&2
  log "venv installed in $((SECONDS - s)) s"
  in_chroot /agent-server/.venv/bin/python - "$VERSION" >&2 <<'EOF'
import sys, importlib.metadata as m
want = sys.argv[1]
for d in ("openhands-agent-server", "openhands-sdk", "openhands-tools", "openhands-workspace"):
    v = m.version(d)
    assert v == want, f"{d} {v} installed, wanted {want}"
import openhands.agent_server  # noqa: F401  (imports cleanly with this interpreter)
print("verified openhands-agent-server", want, "certifi", m.version("certifi"), "python", sys.version.split()[0])
EOF
  # The resolved dependency set is not pinned by the hash (only the four openhands packages
  # are); record it in the image for diagnosis.
  in_chroot /tmp/uv pip freeze --python /agent-server/.venv/bin/python >"$ROOTFS/agent-server/requirements.freeze.txt"

  # User and workspace, like upstream (uid/gid 10001); home is /workspace (see header).
  in_chroot /bin/sh -eu -c '
    getent group 10001 >/dev/null || groupadd -g 10001 openhands
    getent passwd 10001 >/dev/null || useradd -u 10001 -g 10001 -d /workspace -M -s /bin/bash openhands
    mkdir -p /workspace/project
    chown -R 10001:10001 /workspace
  '

  unmount_all
  rm -f "$ROOTFS/tmp/nestor-host-ca.crt" "$ROOTFS/tmp/uv" "$ROOTFS/tmp/overrides.txt"
  rmdir "$ROOTFS/tmp/uv-cache"
  [[ ! -e "$ROOTFS/tmp/nestor-host-ca.crt" ]] || die "host CA bundle still in the rootfs"
}

trim() {
  local r=$ROOTFS
  rm -rf "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* \
    "$r"/usr/share/lintian "$r"/usr/share/linda \
    "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb "$r"/var/cache/apt/archives/partial/* \
    "$r"/var/cache/debconf/*-old "$r"/var/lib/apt/lists/* "$r"/var/lib/dpkg/*-old \
    "$r"/debootstrap "$r"/root/.cache "$r"/tmp/* "$r"/var/tmp/*
  find "$r"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' ! -name 'C.*' -exec rm -rf {} + 2>/dev/null || true
  find "$r"/var/log -type f -exec truncate -s 0 {} +
  # Keep later `apt-get install` in the container from bringing docs back.
  mkdir -p "$r/etc/dpkg/dpkg.cfg.d"
  cat >"$r/etc/dpkg/dpkg.cfg.d/90nestor-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  # Docker bind-mounts its own resolv.conf, hostname and hosts; do not ship the build host's.
  : >"$r/etc/resolv.conf"
  echo agent-server >"$r/etc/hostname"
  # Device nodes debootstrap made: docker mounts its own /dev.
  find "$r/dev" -mindepth 1 -delete
}

# ---------------------------------------------------------------------------------------------
if [[ ! -s "$ROOTFS_TAR" ]]; then
  if [[ -s "$BASE_TAR" ]]; then
    log "using the cached debootstrap rootfs $BASE_TAR"
    safe_rm_work
    mkdir -p "$ROOTFS"
    tar -C "$ROOTFS" --numeric-owner -xpf "$BASE_TAR"
  else
    build_base
  fi
  customise
  trim
  log "rootfs is $(du -sh "$ROOTFS" | cut -f1); writing $ROOTFS_TAR"
  tar -C "$ROOTFS" --numeric-owner -cf "$ROOTFS_TAR.partial" .
  mv "$ROOTFS_TAR.partial" "$ROOTFS_TAR"
  safe_rm_work
else
  log "using the cached rootfs $ROOTFS_TAR (no network needed)"
fi

log "importing into Docker as $TAG"
s=$SECONDS
docker import \
  --change "LABEL $LABEL_KEY=$HASH" \
  --change "LABEL org.nestor.agent-server.version=$VERSION" \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8 PYTHONUNBUFFERED=1 HOME=/workspace' \
  --change 'ENV LITELLM_LOCAL_MODEL_COST_MAP=True OPENHANDS_SUPPRESS_BANNER=1' \
  --change 'ENV OH_PRELOAD_TOOLS=false OH_ENABLE_BROWSER=false OH_ENABLE_VSCODE=false OH_ENABLE_VNC=false' \
  --change 'ENV OH_CONVERSATIONS_PATH=/workspace/conversations OH_BASH_EVENTS_DIR=/workspace/bash_events OH_PERSISTENCE_DIR=/workspace/.openhands OH_WORKSPACE_PATH=/workspace/project' \
  --change 'USER 10001:10001' \
  --change 'WORKDIR /' \
  --change 'EXPOSE 8000' \
  --change 'ENTRYPOINT ["/agent-server/.venv/bin/agent-server", "--host", "0.0.0.0", "--port", "8000"]' \
  - "$TAG" <"$ROOTFS_TAR" >&2
log "imported in $((SECONDS - s)) s"
image_ready || die "imported $TAG but its label $LABEL_KEY is not $HASH"

# Drop cached rootfs builds and images of other hashes (older edits of this script). The alias
# moves to the new image first, so untagging an old hash tag frees its image. Images still used
# by a container are kept (docker refuses to remove them without -f).
docker tag "$TAG" "$ALIAS" >&2
for d in "$CACHE_ROOT"/agent-server-image/*; do
  [[ -d "$d" && "$d" != "$BUILD_DIR" ]] || continue
  if [[ -z "$(mounts_under "$d")" ]]; then log "removing old cached build $d"; rm -rf "$d"; fi
done
{
  docker image ls --format '{{.Repository}}:{{.Tag}}' "$IMAGE_REPO" 2>/dev/null |
    grep -E "^$IMAGE_REPO:[^:]+-[0-9a-f]{12}$" | grep -vxF "$TAG" || true
  docker image ls -q --filter dangling=true --filter "label=$LABEL_KEY" 2>/dev/null || true
} | while read -r old; do
  docker rmi "$old" >/dev/null 2>&1 && log "removed old image $old" || true
done

log "built $TAG in $((SECONDS - t0)) s ($(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
finish
