# shellcheck shell=bash
# ensure_rust REPO: puts the Rust toolchain pinned in REPO/rust-toolchain.toml (with rustfmt and
# clippy) on PATH. With rustup: installs rustup when there is no Rust at all, and the pinned
# toolchain when it is missing; nothing is downloaded when it is installed already, so a
# machine that has it builds offline. Rust without rustup (a distribution's) is used when it is
# at least the workspace's rust-version, with a note that it is not the pinned one. Needs `info`
# and `die` from the caller.

_rust_version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

# The channel pinned in REPO/rust-toolchain.toml.
rust_pinned() {
    sed -n 's/^channel *= *"\([^"]*\)".*/\1/p' "$1/rust-toolchain.toml" | head -n1
}

ensure_rust() {
    local repo=$1 need have pinned
    # rustup's env file puts ~/.cargo/bin on PATH (sudo resets PATH).
    # shellcheck source=/dev/null
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
    need=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$repo/Cargo.toml" | head -n1)
    need=${need:-1.0}
    pinned=$(rust_pinned "$repo")
    [ -n "$pinned" ] || die "$repo/rust-toolchain.toml names no channel"
    if ! command -v rustup >/dev/null 2>&1 && ! command -v cargo >/dev/null 2>&1; then
        info "installing rustup (no Rust found)"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
            sh -s -- -y --profile minimal --default-toolchain none ||
            die "installing rustup failed (no internet access?); install Rust $pinned (https://rustup.rs) and rerun"
        # shellcheck source=/dev/null
        . "$HOME/.cargo/env"
    fi
    if command -v rustup >/dev/null 2>&1; then
        if ! rustup toolchain list | grep -q "^$pinned-"; then
            info "installing Rust $pinned with rustfmt and clippy (pinned in rust-toolchain.toml)"
            rustup toolchain install "$pinned" --profile minimal -c rustfmt -c clippy ||
                die "installing Rust $pinned failed (no internet access?)"
        fi
        local c
        for c in rustfmt clippy; do
            if ! (cd "$repo" && rustup component list --installed 2>/dev/null | grep -q "^$c"); then
                info "adding $c to Rust $pinned"
                (cd "$repo" && rustup component add "$c") || die "rustup component add $c failed"
            fi
        done
    else
        have=$(rustc --version 2>/dev/null | awk '{print $2}') || true
        _rust_version_ge "${have:-0}" "$need" ||
            die "Rust ${have:-?} (not managed by rustup) is older than the required $need; install rustup (https://rustup.rs) and rerun"
        info "note: Rust $have without rustup: rust-toolchain.toml (Rust $pinned) is not applied"
    fi
    # Inside the repository, so that rustup picks the pinned toolchain.
    have=$(cd "$repo" && rustc --version | awk '{print $2}')
    _rust_version_ge "$have" "$need" || die "Rust $have is older than the required $need"
    # shellcheck disable=SC2034 # read by the scripts that source this file
    RUST_VERSION=$have
}
