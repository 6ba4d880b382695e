#!/usr/bin/env bash
# Installs edgemesh (the node agent) and cloudcore (the cloud side) as systemd services, or
# removes them again.
#
#   scripts/install.sh [--prefix DIR] [--no-build]       build release binaries and install
#   scripts/install.sh --uninstall [--purge]              remove what an install put there
#
# Installs:
#   $PREFIX/bin/edgemesh, $PREFIX/bin/cloudcore           (PREFIX=/usr/local)
#   $UNITDIR/edgemesh.service, cloudcore.service          (UNITDIR=/etc/systemd/system;
#                                                          ExecStart points at $PREFIX/bin)
#   $SYSCONFDIR/edgemesh/edgemesh.toml                    (SYSCONFDIR=/etc; from examples/config,
#   $SYSCONFDIR/cloudcore/cloudcore.toml                   never overwriting an existing file)
#   $PREFIX/share/edgemesh/install-manifest               what was installed, for --uninstall
# Every path is under $DESTDIR when it is set (a staging or scratch root).
#
# --uninstall stops and disables the units (when systemd runs this machine and the units are in
# a systemd directory), removes edgemesh's iptables rules and DNS address (`edgemesh cleanup`,
# not under DESTDIR: those live in the kernel, not in the file tree), then every file of the
# manifest and the directories the install created. A config file the operator changed is kept
# (and named) unless --purge is given; --purge also removes the state directories
# /var/lib/edgemesh and /var/lib/cloudcore (the node's metadata copy, the cloud's store and its
# tokens).
#
# Environment: DESTDIR, PREFIX, SYSCONFDIR, UNITDIR as above; BIN_DIR=DIR installs prebuilt
# binaries from DIR instead of building (also --no-build: target/release as it is);
# CARGO_TARGET_DIR is honoured.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

info() { printf '    %s\n' "$*"; }
die() {
    printf 'install.sh: %s\n' "$*" >&2
    exit 1
}
# shellcheck source-path=SCRIPTDIR source=lib/rust.sh
. "$REPO/scripts/lib/rust.sh"

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

MODE=install
PURGE=0
BUILD=1
while [ $# -gt 0 ]; do
    case $1 in
    --uninstall) MODE=uninstall ;;
    --purge) PURGE=1 ;;
    --prefix)
        [ $# -ge 2 ] || die "--prefix needs a directory"
        PREFIX=$2
        shift
        ;;
    --prefix=*) PREFIX=${1#--prefix=} ;;
    --no-build) BUILD=0 ;;
    -h | --help)
        usage
        exit 0
        ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
[ "$PURGE" = 1 ] && [ "$MODE" != uninstall ] && die "--purge goes with --uninstall"

DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
PREFIX=${PREFIX:-/usr/local}
SYSCONFDIR=${SYSCONFDIR:-/etc}
UNITDIR=${UNITDIR:-/etc/systemd/system}
for v in PREFIX SYSCONFDIR UNITDIR; do
    case ${!v} in
    /*) ;;
    *) die "$v must be an absolute path (got '${!v}')" ;;
    esac
done
MANIFEST_DIR=$PREFIX/share/edgemesh
MANIFEST=$MANIFEST_DIR/install-manifest
UNITS=(edgemesh cloudcore)

# The manifest has one line per thing installed, in install order:
#   dir PATH          a directory this install created
#   file PATH         a binary or unit
#   config PATH SHA   a config file as installed (kept at uninstall when changed since)
# Paths are without DESTDIR, so a staged tree can be moved to its root and still uninstall.
manifest_lines=()
record() { manifest_lines+=("$*"); }

# Creates DIR and its missing parents, recording each one created.
make_dir() {
    local dir=$1 missing=() d
    d=$dir
    while [ ! -d "$DESTDIR$d" ]; do
        missing=("$d" "${missing[@]}")
        d=$(dirname "$d")
    done
    for d in "${missing[@]}"; do
        mkdir -m 0755 "$DESTDIR$d"
        record dir "$d"
    done
}

# Whether systemctl should manage the units: systemd runs this machine, nothing is staged, and
# the units are where systemd looks.
systemd_managed() {
    [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 &&
        case $UNITDIR in
        /etc/systemd/system | /lib/systemd/system | /usr/lib/systemd/system) true ;;
        *) false ;;
        esac
}

install_all() {
    [ -e "$DESTDIR$MANIFEST" ] &&
        die "already installed ($DESTDIR$MANIFEST exists): run --uninstall first, or remove that file"
    if [ "$(id -u)" -ne 0 ] && [ -z "$DESTDIR" ]; then
        die "run as root (or set DESTDIR to install into a staging directory)"
    fi

    local bin_dir
    if [ -n "${BIN_DIR:-}" ]; then
        bin_dir=$BIN_DIR
    else
        bin_dir=${CARGO_TARGET_DIR:-$REPO/target}/release
        if [ "$BUILD" = 1 ]; then
            if ! command -v cc >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
                info "installing build-essential"
                DEBIAN_FRONTEND=noninteractive apt-get update -qq
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential pkg-config curl ca-certificates >/dev/null
            fi
            ensure_rust "$REPO"
            info "building release binaries (Rust $RUST_VERSION)"
            (cd "$REPO" && cargo build --release --locked -p edgemesh -p cloudcore)
        fi
    fi
    local b
    for b in edgemesh cloudcore; do
        [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing or not executable"
    done

    make_dir "$PREFIX/bin"
    for b in edgemesh cloudcore; do
        install -m 0755 "$bin_dir/$b" "$DESTDIR$PREFIX/bin/$b"
        record file "$PREFIX/bin/$b"
        info "$DESTDIR$PREFIX/bin/$b"
    done

    make_dir "$UNITDIR"
    local unit
    for unit in "${UNITS[@]}"; do
        # The units name /usr/local/bin; point them at this PREFIX.
        sed "s#/usr/local/bin/#$PREFIX/bin/#g; s#/etc/$unit/#$SYSCONFDIR/$unit/#g" \
            "$REPO/systemd/$unit.service" >"$DESTDIR$UNITDIR/$unit.service"
        chmod 0644 "$DESTDIR$UNITDIR/$unit.service"
        record file "$UNITDIR/$unit.service"
        info "$DESTDIR$UNITDIR/$unit.service"
    done

    local conf
    for unit in "${UNITS[@]}"; do
        conf=$SYSCONFDIR/$unit/$unit.toml
        make_dir "$SYSCONFDIR/$unit"
        if [ -e "$DESTDIR$conf" ]; then
            info "$DESTDIR$conf exists: kept as it is"
            continue
        fi
        # Root-only: the file may hold a token.
        install -m 0600 "$REPO/examples/config/$unit.toml" "$DESTDIR$conf"
        record config "$conf" "$(sha256sum "$DESTDIR$conf" | cut -d' ' -f1)"
        info "$DESTDIR$conf"
    done

    make_dir "$MANIFEST_DIR"
    printf '%s\n' "${manifest_lines[@]}" >"$DESTDIR$MANIFEST"

    if systemd_managed; then
        systemctl daemon-reload
    fi
    cat <<EOF

Installed. Next steps:
  cloud:  edit $SYSCONFDIR/cloudcore/cloudcore.toml, then: systemctl enable --now cloudcore
          cloudcore token create NODE      (prints the node's token)
  node:   edit $SYSCONFDIR/edgemesh/edgemesh.toml (node_name, cloud.url), put the token in
          $SYSCONFDIR/edgemesh/token (mode 0600), then: systemctl enable --now edgemesh
  remove: $0 --uninstall
EOF
}

uninstall_all() {
    if [ "$(id -u)" -ne 0 ] && [ -z "$DESTDIR" ]; then
        die "run as root (or set DESTDIR for a staging directory)"
    fi
    local lines=()
    if [ -f "$DESTDIR$MANIFEST" ]; then
        mapfile -t lines <"$DESTDIR$MANIFEST"
    else
        # Installed by hand, or the manifest is gone: the default locations, no directories.
        info "no $DESTDIR$MANIFEST: removing the default locations"
        local unit
        for unit in "${UNITS[@]}"; do
            lines+=("file $PREFIX/bin/$unit" "file $UNITDIR/$unit.service"
                "config $SYSCONFDIR/$unit/$unit.toml -")
        done
    fi

    if systemd_managed; then
        local unit
        for unit in "${UNITS[@]}"; do
            if [ -f "$UNITDIR/$unit.service" ]; then
                systemctl disable --now "$unit.service" >/dev/null 2>&1 || true
                info "stopped and disabled $unit.service"
            fi
        done
    fi

    # The rules live in the kernel; a staged tree has none of its own.
    if [ -z "$DESTDIR" ]; then
        local edgemesh=$PREFIX/bin/edgemesh
        [ -x "$edgemesh" ] || edgemesh=$(command -v edgemesh || true)
        if [ -n "$edgemesh" ] && [ -x "$edgemesh" ]; then
            local conf=$SYSCONFDIR/edgemesh/edgemesh.toml args=()
            [ -f "$conf" ] && args=(--config "$conf")
            "$edgemesh" cleanup "${args[@]}" ||
                die "'$edgemesh cleanup' failed: the iptables rules may still be installed; nothing was removed"
        fi
    fi

    local i line kind path sum dirs=()
    for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
        line=${lines[i]}
        read -r kind path sum <<<"$line"
        case $kind in
        file)
            rm -f "$DESTDIR$path"
            info "removed $DESTDIR$path"
            ;;
        config)
            [ -e "$DESTDIR$path" ] || continue
            if [ "$PURGE" = 1 ] || [ "$sum" = "$(sha256sum "$DESTDIR$path" | cut -d' ' -f1)" ]; then
                rm -f "$DESTDIR$path"
                info "removed $DESTDIR$path"
            else
                info "kept $DESTDIR$path (changed since it was installed; --purge removes it)"
            fi
            ;;
        dir) dirs+=("$path") ;;
        "") ;;
        *) die "$DESTDIR$MANIFEST: unknown line '$line'" ;;
        esac
    done
    rm -f "$DESTDIR$MANIFEST"

    if [ "$PURGE" = 1 ]; then
        local unit
        for unit in "${UNITS[@]}"; do
            rm -rf "$DESTDIR/var/lib/$unit" "$DESTDIR/var/lib/private/$unit"
            rm -f "$DESTDIR$SYSCONFDIR/$unit/token"
            rmdir "$DESTDIR$SYSCONFDIR/$unit" 2>/dev/null || true
        done
        info "purged /var/lib/edgemesh and /var/lib/cloudcore"
    fi

    # Directories the install created, deepest first, when nothing else is in them.
    local d
    for d in "${dirs[@]}"; do
        if rmdir "$DESTDIR$d" 2>/dev/null; then
            info "removed $DESTDIR$d/"
        elif [ -d "$DESTDIR$d" ]; then
            info "kept $DESTDIR$d/ (not empty)"
        fi
    done
    # The manifest's own directory, also when the manifest created it last.
    rmdir "$DESTDIR$MANIFEST_DIR" 2>/dev/null || true

    if systemd_managed; then
        systemctl daemon-reload
    fi
    echo "Uninstalled."
}

case $MODE in
install) install_all ;;
uninstall) uninstall_all ;;
esac
