#!/usr/bin/env bash
# Runs every test of edgemesh: formatting, lints, unit tests and the end-to-end tests over
# network namespaces. Installs what it needs on a fresh Debian machine; run as root (the
# end-to-end tests create namespaces, veth pairs and bridges).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: run as root (the end-to-end tests create network namespaces)" >&2
  exit 1
fi

# System packages the build and the tests use.
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v dig >/dev/null 2>&1 || need+=(dnsutils)
command -v dnsmasq >/dev/null 2>&1 || need+=(dnsmasq-base)
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
# systemd-analyze verifies the units (the tests never start systemd itself).
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
# The etcd store (cargo feature `etcd`): protoc builds etcd-client; its tests run real etcd.
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/*.proto), which etcd's protos import: only a
# recommendation of protobuf-compiler, so not there with --no-install-recommends.
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
# etcdctl: tests/tests/ha.rs reads the store's head and asks which member leads with it.
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
dpkg -s ca-certificates >/dev/null 2>&1 || need+=(ca-certificates)
if [ "${#need[@]}" -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# Rust: the toolchain pinned in rust-toolchain.toml, with rustfmt and clippy (installed with
# rustup only when missing: a machine that has it runs offline).
info() { printf '    %s\n' "$*"; }
die() {
  echo "scripts/test.sh: $*" >&2
  exit 1
}
# shellcheck source-path=SCRIPTDIR source=lib/rust.sh
. scripts/lib/rust.sh
ensure_rust "$PWD"
log "Rust $RUST_VERSION"

log "cargo fmt --check"
cargo fmt --all -- --check

log "shellcheck (the demo, the installer, the benchmarks)"
shellcheck -x -S warning scripts/*.sh scripts/bench/* scripts/lib/*.sh .ci/run

log "cargo clippy -D warnings (the default build, and with the etcd store)"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --locked --features cloudcore/etcd -- -D warnings

# One cloudcore with the etcd store serves every end-to-end test: SQLite stays its default
# backend, and tests/tests/ha.rs runs replicas of it on etcd.
log "building the binaries the end-to-end tests start"
cargo build --workspace --bins --locked --features cloudcore/etcd

log "unit and end-to-end tests"
# The end-to-end tests each run a small mesh of processes; 4 at a time fits 2 cores.
cargo test --workspace --locked --features cloudcore/etcd -- --test-threads=4
