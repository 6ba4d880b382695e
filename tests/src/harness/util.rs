//! Free-standing helpers: locating binaries, polling, precondition checks.

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

/// Environment variable that overrides where [`bin`] looks for binaries.
pub const BIN_DIR_ENV: &str = "EDGEMESH_BIN_DIR";

/// Path of a workspace binary such as `cloudcore` or `edgemesh`.
///
/// Cargo only exposes `CARGO_BIN_EXE_*` for binaries of the *same* package, so
/// we derive the location instead: a test executable lives at
/// `target/<profile>/deps/<test>-<hash>`, and `cargo build --workspace --bins`
/// puts binaries in `target/<profile>/`. Setting `EDGEMESH_BIN_DIR` overrides
/// the directory (e.g. to test installed binaries).
///
/// Panics with instructions if the binary has not been built.
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os(BIN_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => profile_dir(),
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "binary `{name}` not found at {}: run `cargo build --workspace --bins` first \
         (same profile as the tests), or point {BIN_DIR_ENV} at the binaries",
        path.display()
    );
    path
}

/// `target/<profile>/` derived from the running test executable.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("cannot determine the test executable's path");
    let mut dir = exe
        .parent()
        .expect("test executable has no parent directory")
        .to_path_buf();
    // Integration tests run from target/<profile>/deps; be lenient if some
    // runner places the executable directly in target/<profile>.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// Polls `f` every 50 ms until it returns `Some`, and returns that value.
///
/// Panics with `what` and the elapsed time once `timeout` has passed; `f` is
/// always called at least once, and once more at the deadline, so a short
/// timeout still gets a fair chance.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = f() {
            return value;
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            panic!("timed out after {elapsed:.1?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(50).min(timeout - elapsed));
    }
}

/// Panics unless the test runs as root with a working `ip netns`.
///
/// End-to-end tests must not silently skip themselves: a "passing" run that
/// tested nothing is worse than a loud failure telling how to run them.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "edgemesh end-to-end tests need root (euid is {euid}): they create network \
         namespaces. Run them as root, e.g. `sudo -E cargo test -p edgemesh-e2e`"
    );
    let probe = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`ip netns list` failed ({}): {} — network namespaces are required",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("cannot run `ip` ({e}): install iproute2"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_for_returns_value() {
        let mut n = 0;
        let v = wait_for("counter", Duration::from_secs(5), || {
            n += 1;
            (n == 3).then_some(n)
        });
        assert_eq!(v, 3);
    }

    #[test]
    #[should_panic(expected = "run `cargo build --workspace --bins` first")]
    fn bin_missing_explains_how_to_build() {
        bin("no-such-edgemesh-binary");
    }

    #[test]
    #[should_panic(expected = "waiting for never")]
    fn wait_for_times_out() {
        wait_for("never", Duration::from_millis(120), || None::<()>);
    }
}
