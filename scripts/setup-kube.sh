#!/usr/bin/env bash
# A real Kubernetes API server (kube-apiserver + etcd) on loopback, for nestor's kubernetes
# provisioner tests. No container registry or binary download is reachable here, so both come
# from Debian: etcd is the `etcd-server` package; kube-apiserver is built from Debian's
# `kubernetes` source package (1.20) with Debian's Go.
#
#   scripts/setup-kube.sh            build if needed, start if not running; prints the admin
#                                    kubeconfig path (one line on stdout)
#   scripts/setup-kube.sh build      only build/cache the binaries
#   scripts/setup-kube.sh --no-build start only if the binaries are already cached (exit 3 if not)
#   scripts/setup-kube.sh stop       stop both and remove the cluster's data (binaries stay cached)
#   scripts/setup-kube.sh status     exit 0 if the API server answers
#
# Everything else goes to stderr. Idempotent; a flock serialises concurrent runs (the loser
# waits, then finds the cluster up; the daemons do not inherit the lock). Every wait is bounded.
#
# Where things are (NESTOR_CACHE_DIR, default ${XDG_CACHE_HOME:-$HOME/.cache}/nestor):
#   kube-<version>/bin/kube-apiserver     cached build (keyed by the Debian source version)
#   kube-run/                             the running cluster:
#     pki/                 self-signed CA, serving cert (127.0.0.1), admin client cert,
#                          service-account signing key pair
#     tokens.csv           static bearer tokens (users below)
#     admin.kubeconfig     client cert, group system:masters (everything; what tests set up with)
#     nestor.kubeconfig    token of user "nestor": no rights until a RoleBinding grants them
#                          (tests bind deploy/kubernetes/role.yaml to it)
#     nestor-readonly.kubeconfig  token of user "nestor-readonly": for permission-denied tests
#     etcd/ etcd.log apiserver.log *.pid
#
# The API server runs with RBAC, without the admission plugins that need a controller manager
# (ServiceAccount: there is no token controller; StorageObjectInUseProtection: nobody would
# remove the PVC finalizer). There is no scheduler and no kubelet: tests run
# `nestor-node-agent` (crates/test-support) which binds pods to itself and runs them in Docker.
#
# Ports (loopback only): etcd NESTOR_KUBE_ETCD_PORT (default 23790, peer +10),
# API NESTOR_KUBE_API_PORT (default 26443).
set -euo pipefail

CACHE_ROOT="${NESTOR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nestor}"
RUN_DIR="$CACHE_ROOT/kube-run"
ETCD_PORT="${NESTOR_KUBE_ETCD_PORT:-23790}"
ETCD_PEER_PORT=$((ETCD_PORT + 10))
API_PORT="${NESTOR_KUBE_API_PORT:-26443}"
START_TIMEOUT="${NESTOR_KUBE_START_TIMEOUT:-90}"
BUILD_TIMEOUT="${NESTOR_KUBE_BUILD_TIMEOUT:-2400}"
SRC_PACKAGE=kubernetes

log() { echo "setup-kube: $*" >&2; }
die() { log "error: $*"; exit 1; }

MODE=up
case "${1:-}" in
  "") ;;
  build) MODE=build ;;
  --no-build) MODE=nobuild ;;
  stop) MODE=stop ;;
  status) MODE=status ;;
  *) die "unknown argument ${1} (expected nothing, build, --no-build, stop or status)" ;;
esac

mkdir -p "$RUN_DIR"
SUDO=()
[[ $EUID -eq 0 ]] || SUDO=(sudo -n)

api_ok() {
  [[ -s "$RUN_DIR/pki/ca.crt" && -s "$RUN_DIR/pki/admin.crt" ]] || return 1
  local out
  out=$(curl -sS --max-time 3 --cacert "$RUN_DIR/pki/ca.crt" --cert "$RUN_DIR/pki/admin.crt" \
    --key "$RUN_DIR/pki/admin.key" "https://127.0.0.1:$API_PORT/readyz" 2>/dev/null) && [[ "$out" == ok ]]
}

alive_pid() { # pidfile name -> pid if that process runs
  local f="$RUN_DIR/$1.pid" pid
  [[ -s "$f" ]] || return 1
  pid=$(cat "$f")
  [[ -r /proc/$pid/comm && "$(cat /proc/$pid/comm)" == "$2"* ]] || return 1
  echo "$pid"
}

stop_one() { # name comm
  local pid i
  if pid=$(alive_pid "$1" "$2"); then
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    log "stopped $1 (pid $pid)"
  fi
  rm -f "$RUN_DIR/$1.pid"
}

if [[ $MODE == status ]]; then api_ok; exit; fi
# Fast path, no lock: the cluster is up.
if [[ $MODE == up || $MODE == nobuild ]] && api_ok; then
  echo "$RUN_DIR/admin.kubeconfig"
  exit 0
fi

exec 9>"$RUN_DIR/.setup.lock"
flock -w $((BUILD_TIMEOUT + START_TIMEOUT + 600)) 9 || die "timed out waiting for another setup-kube run"

if [[ $MODE == stop ]]; then
  stop_one apiserver kube-apiserver
  stop_one etcd etcd
  rm -rf "$RUN_DIR/etcd"
  exit 0
fi

if [[ $MODE != build ]] && api_ok; then
  echo "$RUN_DIR/admin.kubeconfig"
  exit 0
fi

apt_install() {
  local try
  for try in 1 2 3; do
    if timeout 600 "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q \
         --no-install-recommends "$@" >&2; then
      return 0
    fi
    log "apt-get install $* failed (try $try of 3); refreshing package lists"
    timeout 300 "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=300 update -q >&2 || true
    sleep $((try * 3))
  done
  return 1
}

need_pkgs() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] || { log "installing ${missing[*]}"; apt_install "${missing[@]}" || die "could not install ${missing[*]}"; }
}

need_pkgs etcd-server openssl curl ca-certificates

# ---------------------------------------------------------------- build (cached by version)

# The version of Debian's kubernetes source package, from the binary package built from it
# (deb lines are always there; deb-src lines may not be).
VERSION=$(apt-cache show --no-all-versions kubernetes-client 2>/dev/null | sed -n 's/^Version: //p' | head -n1)
if [[ -z "$VERSION" ]]; then
  timeout 300 "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=300 update -q >&2 || true
  VERSION=$(apt-cache show --no-all-versions kubernetes-client 2>/dev/null | sed -n 's/^Version: //p' | head -n1)
fi
# A cache already built for some version is used when apt knows none (offline laptops).
if [[ -z "$VERSION" ]]; then
  cached=$(ls -d "$CACHE_ROOT"/kube-*/bin/kube-apiserver 2>/dev/null | head -n1 || true)
  [[ -n "$cached" ]] || die "apt knows no 'kubernetes' package version (run apt-get update) and nothing is cached"
  BIN_DIR=$(dirname "$cached")
else
  BIN_DIR="$CACHE_ROOT/kube-$VERSION/bin"
fi
APISERVER="$BIN_DIR/kube-apiserver"

build_apiserver() {
  [[ $MODE == nobuild ]] && { log "kube-apiserver is not built yet ($APISERVER); run scripts/setup-kube.sh build"; exit 3; }
  need_pkgs golang-go rsync dpkg-dev make
  local work="$CACHE_ROOT/kube-$VERSION/src" started=$SECONDS
  rm -rf "$work"; mkdir -p "$work"
  # deb-src lines for Debian main, unless some source list has them already.
  if ! grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    local suite
    suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    log "adding deb-src lines for $suite (/etc/apt/sources.list.d/nestor-deb-src.sources)"
    printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$suite" | "${SUDO[@]}" tee /etc/apt/sources.list.d/nestor-deb-src.sources >/dev/null
    timeout 300 "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=300 update -q >&2 || die "apt-get update failed"
  fi
  log "downloading Debian source package $SRC_PACKAGE=$VERSION into $work"
  (cd "$work" && timeout 900 apt-get source -q "$SRC_PACKAGE=$VERSION" >&2) || die "apt-get source $SRC_PACKAGE=$VERSION failed"
  local tree
  tree=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name "$SRC_PACKAGE-*" | head -n1)
  [[ -n "$tree" ]] || die "no unpacked source tree under $work"
  # As debian/rules does: GOPATH with a k8s.io/kubernetes link, no cgo. The version is stamped
  # from the upstream part of the Debian version (1.20.5+really1.20.2 -> v1.20.2).
  local upstream=${VERSION%%-*}; upstream=${upstream##*really}
  log "building kube-apiserver v$upstream with $(go version | cut -d' ' -f3) (several minutes on 2 cores; log: $work/build.log)"
  mkdir -p "$tree/.go/src/k8s.io"
  ln -sfn ../../.. "$tree/.go/src/k8s.io/kubernetes"
  if ! (cd "$tree" && GOPATH="$tree/.go" GOCACHE="$work/gocache" CGO_ENABLED=0 HOME="$work/home" \
        KUBE_GIT_VERSION="v$upstream" KUBE_GIT_TREE_STATE=clean \
        timeout "$BUILD_TIMEOUT" make WHAT=cmd/kube-apiserver >"$work/build.log" 2>&1); then
    tail -n 30 "$work/build.log" >&2
    die "building kube-apiserver failed (see $work/build.log)"
  fi
  mkdir -p "$BIN_DIR"
  install -m 0755 "$tree/_output/bin/kube-apiserver" "$APISERVER.tmp"
  mv -f "$APISERVER.tmp" "$APISERVER"
  rm -rf "$work"
  log "built $APISERVER in $((SECONDS - started)) s"
}

[[ -x "$APISERVER" ]] || build_apiserver
[[ $MODE == build ]] && { log "kube-apiserver is cached at $APISERVER"; exit 0; }

# ---------------------------------------------------------------- PKI, tokens, kubeconfigs

PKI="$RUN_DIR/pki"
make_pki() {
  [[ -s "$PKI/admin.crt" && -s "$PKI/sa.key" && -s "$RUN_DIR/tokens.csv" ]] && return 0
  log "creating a self-signed CA, certificates and tokens in $PKI"
  rm -rf "$PKI"; mkdir -p "$PKI"; chmod 700 "$PKI"
  (
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=nestor-test-ca" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' >server.ext
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=kube-apiserver" 2>/dev/null
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 3650 \
      -extfile server.ext 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=nestor-test-admin" 2>/dev/null
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 3650 \
      -extfile client.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    rm -f ./*.csr ./*.ext
  )
  local t1 t2
  t1=$(openssl rand -hex 24); t2=$(openssl rand -hex 24)
  printf '%s,nestor,nestor-uid,""\n%s,nestor-readonly,nestor-readonly-uid,""\n' "$t1" "$t2" >"$RUN_DIR/tokens.csv"
  chmod 600 "$RUN_DIR/tokens.csv"
}

write_kubeconfig() { # file user-block
  local file=$1 user=$2 ca
  ca=$(base64 -w0 <"$PKI/ca.crt")
  cat >"$file.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: nestor-test
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $ca
contexts:
- name: nestor-test
  context:
    cluster: nestor-test
    user: u
    namespace: default
current-context: nestor-test
users:
- name: u
  user:
$user
EOF
  chmod 600 "$file.tmp"; mv -f "$file.tmp" "$file"
}

make_pki
write_kubeconfig "$RUN_DIR/admin.kubeconfig" "    client-certificate-data: $(base64 -w0 <"$PKI/admin.crt")
    client-key-data: $(base64 -w0 <"$PKI/admin.key")"
write_kubeconfig "$RUN_DIR/nestor.kubeconfig" "    token: $(sed -n 's/,nestor,.*//p' "$RUN_DIR/tokens.csv")"
write_kubeconfig "$RUN_DIR/nestor-readonly.kubeconfig" "    token: $(sed -n 's/,nestor-readonly,.*//p' "$RUN_DIR/tokens.csv")"

# ---------------------------------------------------------------- start

stop_one apiserver kube-apiserver

ETCD=$(command -v etcd || echo /usr/bin/etcd)
etcd_ok() { curl -sS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | grep -q '"health":"true"'; }
if ! alive_pid etcd etcd >/dev/null || ! etcd_ok; then
  stop_one etcd etcd
  rm -rf "$RUN_DIR/etcd"
  log "starting etcd on 127.0.0.1:$ETCD_PORT (log: $RUN_DIR/etcd.log)"
  (cd / && exec setsid "$ETCD" --name nestor-test --data-dir "$RUN_DIR/etcd" \
      --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
      --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
      --initial-cluster "nestor-test=http://127.0.0.1:$ETCD_PEER_PORT" \
      --unsafe-no-fsync=true --quota-backend-bytes=$((512 << 20)) \
      </dev/null >"$RUN_DIR/etcd.log" 2>&1 9>&-) &
  echo $! >"$RUN_DIR/etcd.pid"
  deadline=$((SECONDS + 30))
  until etcd_ok; do
    kill -0 "$(cat "$RUN_DIR/etcd.pid")" 2>/dev/null || { tail -n 20 "$RUN_DIR/etcd.log" >&2; die "etcd exited at start-up"; }
    ((SECONDS < deadline)) || { tail -n 20 "$RUN_DIR/etcd.log" >&2; die "etcd did not answer within 30 s"; }
    sleep 0.2
  done
fi

log "starting kube-apiserver on https://127.0.0.1:$API_PORT (log: $RUN_DIR/apiserver.log)"
(cd / && exec setsid "$APISERVER" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" --insecure-port=0 \
    --tls-cert-file="$PKI/server.crt" --tls-private-key-file="$PKI/server.key" \
    --client-ca-file="$PKI/ca.crt" --token-auth-file="$RUN_DIR/tokens.csv" \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc \
    --authorization-mode=RBAC --anonymous-auth=false --allow-privileged=false \
    --disable-admission-plugins=ServiceAccount,StorageObjectInUseProtection,DefaultStorageClass,MutatingAdmissionWebhook,ValidatingAdmissionWebhook \
    --service-cluster-ip-range=10.254.0.0/24 --endpoint-reconciler-type=none \
    --profiling=false --logtostderr=true --v=1 \
    </dev/null >"$RUN_DIR/apiserver.log" 2>&1 9>&-) &
echo $! >"$RUN_DIR/apiserver.pid"
deadline=$((SECONDS + START_TIMEOUT))
until api_ok; do
  if ! kill -0 "$(cat "$RUN_DIR/apiserver.pid")" 2>/dev/null; then
    tail -n 30 "$RUN_DIR/apiserver.log" >&2
    die "kube-apiserver exited at start-up"
  fi
  if ((SECONDS >= deadline)); then
    tail -n 30 "$RUN_DIR/apiserver.log" >&2
    die "kube-apiserver did not become ready within ${START_TIMEOUT}s (it is left running; scripts/setup-kube.sh stop)"
  fi
  sleep 0.5
done
log "kube-apiserver $("$APISERVER" --version 2>/dev/null | cut -d' ' -f2) is ready"
echo "$RUN_DIR/admin.kubeconfig"
