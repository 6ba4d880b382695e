# shellcheck shell=bash
# ensure_rust REPO: puts a Rust toolchain at least as new as the workspace's rust-version on PATH,
# installing or updating it with rustup when needed. Needs `info` and `die` from the caller.

_rust_version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

ensure_rust() {
    local repo=$1 need have
    # rustup's env file puts ~/.cargo/bin on PATH (sudo resets PATH).
    # shellcheck source=/dev/null
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
    need=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$repo/Cargo.toml" | head -n1)
    need=${need:-1.0}
    have=$(rustc --version 2>/dev/null | awk '{print $2}') || true
    if ! command -v cargo >/dev/null 2>&1 || [ -z "$have" ]; then
        info "installing Rust with rustup (cargo not found)"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal ||
            die "installing Rust with rustup failed (no internet access?); install Rust $need or newer (https://rustup.rs) and rerun"
        # shellcheck source=/dev/null
        . "$HOME/.cargo/env"
    elif ! _rust_version_ge "$have" "$need"; then
        if command -v rustup >/dev/null 2>&1; then
            info "Rust $have is older than the required $need: updating the stable toolchain"
            rustup toolchain install stable --profile minimal
            rustup default stable
        else
            die "Rust $have (not managed by rustup) is older than the required $need; remove it or install rustup (https://rustup.rs) and rerun"
        fi
    fi
    have=$(rustc --version | awk '{print $2}')
    _rust_version_ge "$have" "$need" || die "Rust $have is older than the required $need"
    # shellcheck disable=SC2034 # read by the scripts that source this file
    RUST_VERSION=$have
}
