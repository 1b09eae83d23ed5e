#!/usr/bin/env bash
# Builds nestor's own container image without any container registry and tags it nestor:latest
# (what deploy/kubernetes/deployment.yaml runs) and nestor:<version>-<hash>. Prints the
# versioned tag on stdout (last line); everything else goes to stderr.
#
#  1. The release binary is built on the host (`cargo build --release`; NESTOR_BIN=<path>
#     uses an existing binary instead) and stripped of its debug info (150 MB -> ~35 MB; the
#     symbol table stays, so backtraces keep function names).
#  2. The runtime base, nestor/runtime-base:<suite>-<hash>, is made the way
#     build-agent-server-image.sh makes the agent-server's (no registry, so no base image can
#     be pulled): a Debian minbase rootfs from debootstrap with ca-certificates, user and group
#     10001 (nestor), /var/lib/nestor owned by it, docs and caches trimmed, `docker import`.
#     Cached by content hash (this script + suite + packages + architecture): the image is
#     reused while it exists, and its tarball is kept under
#     $NESTOR_CACHE_DIR/nestor-image/<hash>/ so a rebuild after `docker rmi` needs no network.
#     The suite is trixie (glibc 2.41): a binary built on a bookworm host (2.36) runs on it, and
#     its .debs are already in the debootstrap cache the agent-server image filled.
#  3. `docker build --target prebuilt` of the repository's Dockerfile, on a context holding
#     only the binary (the repository's target/ is tens of GB), with the classic builder
#     (DOCKER_BUILDKIT=0: no buildx on these machines; the Dockerfile orders its stages so the
#     source build stage is not run for that target).
#  4. Check: `docker run --rm nestor:latest --version` must answer (a glibc mismatch would show
#     here, not in production).
#
# Needs root for the base (debootstrap) and a Docker engine (it runs ./setup-docker.sh).
# A flock serialises concurrent runs.
set -euo pipefail

SUITE="${NESTOR_IMAGE_SUITE:-trixie}"
INCLUDE=ca-certificates
IMAGE_REPO="${NESTOR_IMAGE_REPO:-nestor}"
BASE_REPO=nestor/runtime-base
LABEL_KEY=org.nestor.runtime-base.build-hash
CACHE_ROOT="${NESTOR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nestor}"

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
HERE=$(dirname "$SCRIPT_PATH")
ROOT=$(dirname "$HERE")
ARCH=$(dpkg --print-architecture 2>/dev/null || uname -m)

log() { echo "build-nestor-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

"$HERE/setup-docker.sh" >/dev/null
export DOCKER_BUILDKIT=0

mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.nestor-image.lock"
if ! flock -n 9; then
  log "another build is running; waiting for it (up to 30 min)"
  flock -w 1800 9 || die "timed out waiting for another build-nestor-image run"
fi

# --- 1. the binary ---------------------------------------------------------------------------
if [[ -n "${NESTOR_BIN:-}" ]]; then
  BIN=$(readlink -f "$NESTOR_BIN")
  [[ -x "$BIN" ]] || die "NESTOR_BIN=$NESTOR_BIN is not an executable"
else
  log "cargo build --release -p nestor-aggregator --bin nestor"
  (cd "$ROOT" && cargo build --release --locked -p nestor-aggregator --bin nestor >&2)
  BIN="$ROOT/target/release/nestor"
fi

# --- 2. the runtime base ---------------------------------------------------------------------
BASE_HASH=$({
  sed -n '/^# --- 2\./,/^# --- 3\./p' "$SCRIPT_PATH"
  printf 'suite=%s include=%s arch=%s\n' "$SUITE" "$INCLUDE" "$ARCH"
} | sha256sum | cut -c1-12)
BASE_TAG="$BASE_REPO:$SUITE-$BASE_HASH"
BASE_DIR="$CACHE_ROOT/nestor-image/$BASE_HASH"
BASE_TAR="$BASE_DIR/rootfs.tar"

base_ready() {
  local got
  got=$(docker image inspect --format "{{index .Config.Labels \"$LABEL_KEY\"}}" "$BASE_TAG" 2>/dev/null) &&
    [[ "$got" == "$BASE_HASH" ]]
}

# The Debian mirror this host's apt uses (as build-agent-server-image.sh does).
detect_mirror() {
  if [[ -n "${NESTOR_DEBIAN_MIRROR:-}" ]]; then echo "$NESTOR_DEBIAN_MIRROR"; return; fi
  local f uri
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -r "$f" ]] || continue
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

build_base_tar() {
  [[ $EUID -eq 0 ]] || die "building the runtime base needs root (debootstrap); run as root"
  command -v debootstrap >/dev/null 2>&1 ||
    { log "installing debootstrap"; DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >&2; }
  if [[ -z "${http_proxy:-}" ]] && command -v apt-config >/dev/null 2>&1; then
    APT_HTTP_PROXY=""
    eval "$(apt-config shell APT_HTTP_PROXY Acquire::http::Proxy)"
    if [[ -n "$APT_HTTP_PROXY" && "$APT_HTTP_PROXY" != DIRECT ]]; then export http_proxy="$APT_HTTP_PROXY"; fi
  fi
  local work="$BASE_DIR/work" r="$BASE_DIR/work/rootfs" mirror try
  mirror=$(detect_mirror)
  mkdir -p "$CACHE_ROOT/debootstrap-debs"
  for try in 1 2 3; do
    rm -rf "$work"; mkdir -p "$work"   # nothing is ever mounted under it (no chroot steps)
    log "debootstrap --variant=minbase $SUITE from $mirror (try $try of 3)"
    if debootstrap --variant=minbase --include="$INCLUDE" --cache-dir="$CACHE_ROOT/debootstrap-debs" \
         "$SUITE" "$r" "$mirror" >"$work/debootstrap.log" 2>&1; then
      break
    fi
    tail -n 15 "$work/debootstrap.log" >&2
    [[ $try -lt 3 ]] || die "debootstrap failed 3 times"
    sleep $((try * 5))
  done
  # User and group 10001, like the agent-server image and deploy/kubernetes (runAsUser 10001).
  # Written directly: no chroot, so nothing is mounted under the work dir.
  grep -q '^nestor:' "$r/etc/group" || echo 'nestor:x:10001:' >>"$r/etc/group"
  grep -q '^nestor:' "$r/etc/passwd" || echo 'nestor:x:10001:10001:nestor:/var/lib/nestor:/usr/sbin/nologin' >>"$r/etc/passwd"
  grep -q '^nestor:' "$r/etc/shadow" || echo 'nestor:!:20000::::::' >>"$r/etc/shadow"
  mkdir -p "$r/var/lib/nestor" "$r/etc/nestor"
  chown 10001:10001 "$r/var/lib/nestor"
  chmod 0750 "$r/var/lib/nestor"
  # Trim: documentation, caches, apt lists, device nodes (docker mounts its own /dev), the
  # build host's resolver config.
  rm -rf "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/usr/share/lintian \
    "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/* \
    "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old "$r"/debootstrap "$r"/tmp/* "$r"/var/tmp/*
  find "$r"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
  find "$r"/var/log -type f -exec truncate -s 0 {} +
  find "$r/dev" -mindepth 1 -delete
  : >"$r/etc/resolv.conf"
  echo nestor >"$r/etc/hostname"
  log "runtime rootfs is $(du -sh "$r" | cut -f1)"
  tar -C "$r" --numeric-owner -cf "$BASE_TAR.partial" .
  mv "$BASE_TAR.partial" "$BASE_TAR"
  rm -rf "$work"
}

if ! base_ready; then
  mkdir -p "$BASE_DIR"
  if [[ -s "$BASE_TAR" ]]; then log "using the cached runtime rootfs $BASE_TAR"; else build_base_tar; fi
  log "importing the runtime base as $BASE_TAG"
  docker import \
    --change "LABEL $LABEL_KEY=$BASE_HASH" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    --change 'USER 10001:10001' \
    --change 'WORKDIR /var/lib/nestor' \
    - "$BASE_TAG" <"$BASE_TAR" >&2
  base_ready || die "imported $BASE_TAG but its label $LABEL_KEY is not $BASE_HASH"
  # Older bases (other hashes): untag; docker keeps them while an image still uses them.
  { docker image ls --format '{{.Repository}}:{{.Tag}}' "$BASE_REPO" 2>/dev/null | grep -vxF "$BASE_TAG" || true; } |
    while read -r old; do docker rmi "$old" >/dev/null 2>&1 && log "removed old base $old" || true; done
  for d in "$CACHE_ROOT"/nestor-image/*; do
    if [[ -d "$d" && "$d" != "$BASE_DIR" ]]; then log "removing old cached base $d"; rm -rf "$d"; fi
  done
fi

# --- 3. the nestor image ---------------------------------------------------------------------
CTX=$(mktemp -d "${TMPDIR:-/tmp}/nestor-image.XXXXXX")
trap 'rm -rf "$CTX"' EXIT
cp "$ROOT/Dockerfile" "$CTX/Dockerfile"
cp "$BIN" "$CTX/nestor"
strip --strip-debug "$CTX/nestor" 2>/dev/null || log "warning: strip not available; the image carries debug info"
VERSION=$("$CTX/nestor" --version | awk '{print $NF}')
HASH=$({ sha256sum "$CTX/nestor" "$CTX/Dockerfile" | cut -d' ' -f1; echo "$BASE_TAG"; } | sha256sum | cut -c1-12)
TAG="$IMAGE_REPO:$VERSION-$HASH"
log "building $TAG (and $IMAGE_REPO:latest) on $BASE_TAG with a $(du -h "$CTX/nestor" | cut -f1) binary"
docker build -q --target prebuilt \
  --build-arg "RUNTIME_IMAGE=$BASE_TAG" --build-arg NESTOR_BIN=nestor \
  --label "org.nestor.version=$VERSION" --label "org.nestor.build-hash=$HASH" \
  -t "$TAG" -t "$IMAGE_REPO:latest" "$CTX" >&2

# --- 4. check --------------------------------------------------------------------------------
got=$(timeout 60 docker run --rm --network none "$IMAGE_REPO:latest" --version) || die "$IMAGE_REPO:latest does not run: $got"
log "$IMAGE_REPO:latest runs: $got ($(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
echo "$TAG"
