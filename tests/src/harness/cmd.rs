//! Running external commands (`ip`, `curl`, the binaries under test).
//!
//! All network plumbing goes through the `ip` tool (iproute2) rather than a
//! netlink crate: the commands are exactly what a human would type to debug a
//! failing test, and every failure message below quotes them verbatim.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Renders `argv` as a shell-like command line for error messages.
pub(crate) fn render(argv: &[&str]) -> String {
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,%@+".contains(c));
            if plain {
                a.to_string()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Builds a `Command` for `argv` whose child is SIGKILLed if we die.
///
/// The death signal is what keeps a crashed or aborted test run from leaving
/// daemons behind: `Drop` never runs on `SIGKILL` or `abort`, but the kernel
/// still delivers `PR_SET_PDEATHSIG`. `ip netns exec` execs the target program
/// in place (no fork), and the setting survives a non-setuid `exec`, so it
/// reaches the binary under test.
///
/// Caveat: the kernel fires the signal when the *thread* that forked the child
/// exits, not the whole process. Tests therefore must spawn from the thread
/// that owns the `Topology` (the normal case for `#[test]` functions), never
/// from a short-lived helper thread.
pub(crate) fn command(argv: &[&str]) -> Command {
    assert!(!argv.is_empty(), "empty command line");
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null());
    // getpid() here runs in the parent, before the fork.
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and only calls
    // async-signal-safe functions (prctl, getppid, raise).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl; then nobody
            // would ever send the death signal, so die now instead.
            if libc::getppid() != parent {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        });
    }
    cmd
}

/// Runs a setup command and panics with the command line and its stderr if
/// it cannot be started or exits non-zero. Returns its stdout.
pub(crate) fn run_checked(argv: &[&str]) -> String {
    let out = command(argv)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", render(argv)));
    if !out.status.success() {
        panic!(
            "`{}` failed ({}): {}",
            render(argv),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command for cleanup purposes: never panics (it is called from
/// `Drop`, where a second panic would abort the whole test binary), returns
/// stdout on success and `None` on any failure.
pub(crate) fn run_quiet(argv: &[&str]) -> Option<String> {
    let out = command(argv).stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `argv` to completion, capturing stdout/stderr like
/// `Command::output`, but SIGKILLs it once `timeout` passes so a hung command
/// cannot hang the whole test run. A killed command reports the signal in its
/// `ExitStatus` and gets a note appended to its stderr.
pub(crate) fn output_with_timeout(argv: &[&str], timeout: Duration) -> Output {
    let mut child = command(argv)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", render(argv)));
    // Drain both pipes concurrently so a chatty command cannot block on a
    // full pipe while we wait for it.
    let stdout = drain(child.stdout.take().expect("stdout was piped"));
    let stderr = drain(child.stderr.take().expect("stderr was piped"));
    let (status, timed_out) = match wait_child(&mut child, timeout) {
        Some(status) => (status, false),
        None => {
            // Ignore the error: the child may have exited in the meantime.
            let _ = child.kill();
            (child.wait().expect("wait for killed command"), true)
        }
    };
    let stdout = stdout.join().expect("stdout reader thread panicked");
    let mut stderr = stderr.join().expect("stderr reader thread panicked");
    if timed_out {
        let note = format!("\n[harness: killed after {timeout:?} timeout]\n");
        stderr.extend_from_slice(note.as_bytes());
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error just truncates the captured output; nothing to do.
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Polls `child` until it exits (reaping it) or `timeout` passes.
pub(crate) fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("waitpid on child") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
