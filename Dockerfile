# nestor's own container image.
#
# Two ways to build it, both ending in the same small runtime stage (a Debian base with only
# ca-certificates, nestor as /usr/local/bin/nestor, user 10001, state in /var/lib/nestor):
#
#  * Where no registry is reachable (this project's CI and dev machines), use
#      scripts/build-nestor-image.sh
#    It builds the runtime base itself (debootstrap + `docker import`, like
#    scripts/build-agent-server-image.sh), builds the release binary on the host and builds
#    the `prebuilt` target of this file with RUNTIME_IMAGE set to that base. Tags: nestor:latest
#    (what deploy/kubernetes/deployment.yaml runs) and nestor:<version>-<hash>.
#
#  * Where a registry is reachable, a plain multi-stage build from source:
#      docker build -t nestor:latest .
#    RUST_IMAGE (the build stage: any image with a Rust toolchain, cargo and a C compiler,
#    whose glibc is not newer than the runtime's) and RUNTIME_IMAGE (any Debian-like base with
#    /etc/passwd and CA certificates) can point at locally built images instead:
#      docker build --build-arg RUST_IMAGE=my/rust:local --build-arg RUNTIME_IMAGE=my/base .
#
# Stages are ordered so that the classic builder (`DOCKER_BUILDKIT=0`, the only one on a
# machine without buildx) building `--target prebuilt` never runs the Rust build stage.

ARG RUNTIME_IMAGE=debian:trixie-slim
ARG RUST_IMAGE=rust:1-trixie

# ---------------------------------------------------------------------------------------------
# runtime: what every variant shares. Nothing but the binary is added to the base; the user,
# the state directory and the CA bundle come from the base (the script's base has them; on
# debian:*-slim the RUN below adds what is missing).
FROM ${RUNTIME_IMAGE} AS runtime
USER 0
RUN set -eu; \
    getent group 10001 >/dev/null || groupadd -g 10001 nestor; \
    getent passwd 10001 >/dev/null || useradd -u 10001 -g 10001 -d /var/lib/nestor -M -s /usr/sbin/nologin nestor; \
    mkdir -p /var/lib/nestor /etc/nestor; \
    chown 10001:10001 /var/lib/nestor; \
    test -s /etc/ssl/certs/ca-certificates.crt || { apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*; }
# nestor's state (catalog, settings, docker manifests with each container's keys): mount a
# volume here to keep conversations across nestor containers.
# (Not set through NESTOR_STATE_DIR: environment overrides the config file, and the file's
# `state_dir` should win.)
VOLUME ["/var/lib/nestor"]
EXPOSE 8000
USER 10001:10001
WORKDIR /var/lib/nestor
ENTRYPOINT ["/usr/local/bin/nestor"]
# A config file is expected at /etc/nestor/nestor.toml (mount one; README.md, "nestor in a
# container"). `bind` must not be loopback inside a container.
CMD ["serve", "--config", "/etc/nestor/nestor.toml"]

# ---------------------------------------------------------------------------------------------
# prebuilt: the binary built on the host (scripts/build-nestor-image.sh); NESTOR_BIN is its
# path inside the build context.
FROM runtime AS prebuilt
ARG NESTOR_BIN=nestor
COPY --chown=0:0 ${NESTOR_BIN} /usr/local/bin/nestor

# ---------------------------------------------------------------------------------------------
# build: the release binary from source (needs the crates: a registry or a vendored tree).
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p nestor-aggregator --bin nestor \
    && strip --strip-debug target/release/nestor \
    && cp target/release/nestor /nestor

# ---------------------------------------------------------------------------------------------
# The default target: the runtime with the binary from the build stage.
FROM runtime AS final
COPY --from=build --chown=0:0 /nestor /usr/local/bin/nestor
