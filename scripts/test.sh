#!/usr/bin/env bash
# Quick start: set everything up and run the whole test suite. This is what CI runs
# (.ci/run). Every stage is bounded in time; the first failing stage fails the run.
#
#   scripts/test.sh              everything
#   NESTOR_TEST_STAGES="unit e2e-process" scripts/test.sh    a subset
#
# Stages:
#   setup          Debian packages, the real agent-server venv (cached by version)
#   docker         the Docker engine (scripts/setup-docker.sh) and the agent-server image, built
#                  without a registry (scripts/build-agent-server-image.sh, cached); with it the
#                  unit stage runs the docker provisioner's tests against the real engine and image
#   kube           a real kube-apiserver 1.20 + etcd on loopback (scripts/setup-kube.sh: built once
#                  from Debian's source package, cached by version); with it (and the docker
#                  stage) the unit stage runs the kubernetes provisioner's tests against it
#   unit           cargo tests of every crate: unit, property and fake-downstream integration tests
#   e2e-process    real agent-server + real Python SDK through nestor, process provisioner
#   e2e-existing   the same through nestor on the existing provisioner over two real agent-servers
#   e2e-docker     the same through nestor on the docker provisioner (a container per conversation)
#   e2e-kube       the same through nestor on the kubernetes provisioner (a pod per conversation, on
#                  the kube stage's cluster, pods run by nestor-node-agent): 3 SDK conversations, and
#                  two replicas with kill -9 of one and delete through the other
#                  (tests/e2e/test_kube_replicas.py); needs the docker and kube stages' set-up
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STAGES="${NESTOR_TEST_STAGES:-setup docker kube unit e2e-process e2e-existing e2e-docker e2e-kube}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

stage() { echo; echo "=== test.sh: $1 ($(date -u +%H:%M:%S))" >&2; }
has() { [[ " $STAGES " == *" $1 "* ]]; }
started=$(date +%s)

if has setup || has e2e-process || has e2e-existing || has e2e-docker || has e2e-kube; then
  stage setup
  bash scripts/setup-system.sh tmux
  timeout 1200 bash scripts/setup-agent-server.sh >/dev/null
fi

if has docker || has e2e-docker || has e2e-kube; then
  stage docker
  DOCKER_HOST="$(timeout 600 bash scripts/setup-docker.sh)"
  export DOCKER_HOST
  NESTOR_TEST_AGENT_SERVER_IMAGE="$(timeout 2400 bash scripts/build-agent-server-image.sh)"
  export NESTOR_TEST_AGENT_SERVER_IMAGE
  # From here on a missing engine or image fails the docker tests instead of skipping them.
  export NESTOR_TEST_REQUIRE_DOCKER=1
fi

if has kube || has e2e-kube; then
  stage kube
  # Builds kube-apiserver on first use (~13 min on 2 cores), then starts it (~10 s).
  NESTOR_KUBE_BUILD_TIMEOUT=2700 timeout 3000 bash scripts/setup-kube.sh >/dev/null
  # From here on a missing cluster fails the kubernetes tests instead of skipping them.
  export NESTOR_TEST_REQUIRE_KUBE=1
fi

if has unit; then
  stage unit
  # A real S3-compatible server (moto_server) for the workspace-store and persistence tests;
  # required: a failed set-up fails the stage rather than letting those tests skip.
  if s3=$(timeout 1200 bash scripts/setup-s3.sh); then
    export NESTOR_TEST_S3_ENDPOINT="$s3"
    # From here on a missing S3 server fails the persistence tests instead of skipping them.
    export NESTOR_TEST_REQUIRE_S3=1
    trap 'bash scripts/setup-s3.sh --stop' EXIT
  else
    echo "test.sh: no S3-compatible server (scripts/setup-s3.sh failed); the persistence tests cannot run" >&2
    exit 1
  fi
  if cargo nextest --version >/dev/null 2>&1; then
    timeout 2400 cargo nextest run --workspace --locked --no-fail-fast
  else
    timeout 2400 cargo test --workspace --locked --no-fail-fast
  fi
fi

if has e2e-process || has e2e-existing || has e2e-docker || has e2e-kube; then
  timeout 1800 cargo build --locked -q -p nestor-aggregator
  export NESTOR_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/nestor"
fi

if has e2e-kube; then
  # First of the e2e stages, so the cluster can stop before the others run.
  stage e2e-kube
  timeout 1800 cargo build --locked -q -p nestor-test-support --bin nestor-node-agent
  export NESTOR_NODE_AGENT_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/nestor-node-agent"
  NESTOR_E2E_TARGET="nestor-kubernetes" NESTOR_E2E_TOTAL_TIMEOUT=900 \
    bash scripts/run-e2e.sh -q test_sdk_conversations.py test_kube_replicas.py
fi

if has kube || has e2e-kube; then
  # The test cluster is only test infrastructure: stop it and drop its data.
  bash scripts/setup-kube.sh stop || true
fi
for t in process existing docker; do
  if has "e2e-$t"; then
    stage "e2e-$t"
    NESTOR_E2E_TARGET="nestor-$t" NESTOR_E2E_TOTAL_TIMEOUT=900 bash scripts/run-e2e.sh -q
  fi
done

echo "test.sh: all stages passed in $(( $(date +%s) - started )) s" >&2
