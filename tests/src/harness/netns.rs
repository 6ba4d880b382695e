//! Namespace naming, creation and teardown.
//!
//! Every namespace this harness creates is named `em{pid}x{n}-{tag}-{role}`:
//! `pid` is the creating test process and `n` a per-process topology counter.
//! That makes names unique across parallel tests (different `n`) and
//! parallel test binaries (different `pid`), and it lets a later run recognise
//! leftovers of a crashed run: a harness namespace whose pid is no longer alive
//! belongs to nobody and can be deleted.

use std::path::Path;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use super::cmd::{run_checked, run_quiet};

/// Fixed start of every harness namespace name.
const PREFIX: &str = "em";

/// `ip netns add` has to turn /run/netns into a shared mount the first time it
/// is used, and concurrent first uses race on that. Serialising our own
/// creations avoids the race between parallel tests of one binary.
static CREATE_LOCK: Mutex<()> = Mutex::new(());

/// The per-topology part of namespace names, e.g. `em4242x3-mytag`.
pub(crate) fn base_name(pid: u32, counter: u32, tag: &str) -> String {
    format!("{PREFIX}{pid}x{counter}-{tag}")
}

/// Extracts the creator pid from a harness namespace name, or `None` if the
/// name was not made by this harness (those are never touched).
pub(crate) fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, rest) = rest.split_once('x')?;
    let (counter, _label) = rest.split_once('-')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(pid) || !all_digits(counter) {
        return None;
    }
    pid.parse().ok()
}

/// Labels end up in namespace and file names: keep them short and boring.
pub(crate) fn check_label(kind: &str, label: &str) {
    let ok = !label.is_empty()
        && label.len() <= 12
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    assert!(
        ok,
        "{kind} {label:?} must be 1-12 characters of [A-Za-z0-9_-]"
    );
}

/// Names of all named network namespaces (`ip netns list`).
pub(crate) fn list() -> Vec<String> {
    // Output lines look like "name" or "name (id: 3)".
    run_checked(&["ip", "netns", "list"])
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Creates a named network namespace, panicking on failure.
pub(crate) fn create(name: &str) {
    let _guard = CREATE_LOCK
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    run_checked(&["ip", "netns", "add", name]);
}

/// Kills every process still inside `name`, then deletes the namespace.
/// Deleting it also destroys its veth ends and bridge. Never panics (runs in
/// `Drop`); returns false if the namespace could not be deleted.
pub(crate) fn destroy(name: &str) -> bool {
    kill_all_in(name);
    if run_quiet(&["ip", "netns", "del", name]).is_some() {
        return true;
    }
    // A concurrent cleaner may have deleted it first; that counts as success.
    !list_quiet().iter().any(|n| n == name)
}

/// SIGKILLs everything in the namespace (including grandchildren that our
/// direct children forked) and waits briefly until it is empty, so a
/// namespace is never deleted while something still runs in it.
fn kill_all_in(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = pids_in(name);
        if pids.is_empty() || Instant::now() >= deadline {
            return;
        }
        for pid in pids {
            // SAFETY: plain syscall; ESRCH for an already-gone pid is fine.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Pids of processes whose network namespace is `name` (`ip netns pids`).
/// Exited-but-unreaped processes are not listed: they no longer hold a
/// namespace.
fn pids_in(name: &str) -> Vec<libc::pid_t> {
    run_quiet(&["ip", "netns", "pids", name])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn list_quiet() -> Vec<String> {
    run_quiet(&["ip", "netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Deletes harness namespaces left by earlier runs whose process is gone
/// (crashed, killed, or aborted before `Drop`). Namespaces of live processes,
/// including parallel tests in this very process, are left alone.
pub(crate) fn remove_stale() {
    for name in list() {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if !pid_alive(pid) && !destroy(&name) {
            eprintln!("harness: could not delete stale namespace {name}");
        }
    }
}

/// Whether a process with this pid currently exists (zombies count as dead:
/// they run nothing and hold no namespace).
pub(crate) fn pid_alive(pid: u32) -> bool {
    let stat = match std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat"))
    {
        Ok(stat) => stat,
        Err(_) => return false,
    };
    // Format: "pid (comm) state ..."; comm may contain spaces and parens, so
    // look after the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_harness_names() {
        assert_eq!(owner_pid("em123x4-tag-srv"), Some(123));
        assert_eq!(owner_pid(&base_name(77, 0, "t")), Some(77));
        assert_eq!(owner_pid("em123x4"), None);
        assert_eq!(owner_pid("emx4-tag"), None);
        assert_eq!(owner_pid("em12ax4-tag"), None);
        assert_eq!(owner_pid("embassy-1"), None);
        assert_eq!(owner_pid("cni-1234"), None);
    }

    #[test]
    fn own_pid_is_alive() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(99_999_999));
    }
}
