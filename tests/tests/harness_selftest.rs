//! Self-tests of the namespace harness: if these fail, every other
//! end-to-end test result is meaningless.

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use edgemesh_e2e::{require_root, wait_for, Host, Topology};

fn ping(topo: &Topology, from: &Host, to: &Host) -> std::process::Output {
    topo.exec(from, &["ping", "-c1", "-W2", &to.ip.to_string()])
}

/// Names from `ip netns list` (lines look like "name (id: 0)").
fn netns_names() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    assert!(out.status.success(), "ip netns list failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Alive = /proc entry exists and is not a zombie (our test binary is not
/// pid 1, so orphaned grandchildren may linger as zombies of init).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn hosts_reach_each_other_but_nothing_outside() {
    require_root();
    let mut topo = Topology::new("ping");
    let a = topo.add_host("a");
    let b = topo.add_host("b");
    assert_eq!(a.ip.to_string(), "10.250.0.10");
    assert_eq!(b.ip.to_string(), "10.250.0.11");

    for (from, to) in [(&a, &b), (&b, &a)] {
        let out = ping(&topo, from, to);
        assert!(
            out.status.success(),
            "ping {} -> {} failed: {}{}",
            from.role,
            to.ip,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // No default route: anything outside 10.250.0.0/24 is unreachable.
    let out = topo.exec(&a, &["ip", "route", "get", "1.1.1.1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("unreachable"),
        "host can route outside the topology: {out:?}"
    );
    let routes = topo.exec(&a, &["ip", "route", "show"]);
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(
        !routes.contains("default"),
        "unexpected default route: {routes}"
    );

    // exec never panics on failure and reports the exit code.
    let out = topo.exec(&a, &["sh", "-c", "echo oops >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "oops");

    // Nothing listens on b: curl reports status 0 with its error message.
    let (status, msg) = topo.curl(&a, &[&format!("http://{}:9/", b.ip)]);
    assert_eq!(status, 0, "{msg}");
    assert!(msg.contains("curl failed"), "{msg}");
}

/// What the panicking closure leaves behind for inspection.
#[derive(Default)]
struct Leftovers {
    namespaces: Vec<String>,
    pids: Vec<u32>,
    dir: Option<std::path::PathBuf>,
}

/// Builds a topology with a child and a grandchild (forked by the child, so
/// only the namespace sweep can find it), records what exists, then either
/// returns normally or panics.
fn build_and_maybe_panic(tag: &str, leftovers: &mut Leftovers, do_panic: bool) {
    let mut topo = Topology::new(tag);
    let h = topo.add_host("h");
    let sleeper = topo.spawn(&h, "sleep", Path::new("/bin/sleep"), &["600".into()], &[]);
    let pidfile = topo.dir().join("grandchild.pid");
    let script = format!("sleep 600 & echo $! > {}; wait", pidfile.display());
    let forker = topo.spawn(
        &h,
        "forker",
        Path::new("/bin/sh"),
        &["-c".into(), script],
        &[],
    );
    let grandchild: u32 = wait_for("grandchild pid file", Duration::from_secs(5), || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    });

    leftovers.namespaces = topo.namespaces().to_vec();
    leftovers.pids = vec![topo.pid(sleeper), topo.pid(forker), grandchild];
    leftovers.dir = Some(topo.dir().to_path_buf());
    for &pid in &leftovers.pids {
        assert!(alive(pid), "pid {pid} should be running");
    }
    assert!(topo.is_running(sleeper));
    assert!(topo.log(sleeper).starts_with("# harness:"));
    if do_panic {
        panic!("intentional panic to exercise Topology cleanup");
    }
}

fn assert_all_gone(leftovers: &Leftovers) {
    assert_eq!(leftovers.namespaces.len(), 2, "switch + 1 host expected");
    let names = netns_names();
    for ns in &leftovers.namespaces {
        assert!(!names.contains(ns), "namespace {ns} survived the drop");
    }
    for &pid in &leftovers.pids {
        assert!(!alive(pid), "pid {pid} survived the drop");
    }
    let dir = leftovers.dir.as_ref().expect("dir recorded");
    if std::env::var_os(edgemesh_e2e::KEEP_DIRS_ENV).is_none() {
        assert!(!dir.exists(), "{} survived the drop", dir.display());
    }
}

#[test]
fn drop_kills_processes_and_deletes_namespaces_even_on_panic() {
    require_root();

    // Normal drop at the end of scope.
    let mut normal = Leftovers::default();
    build_and_maybe_panic("dropok", &mut normal, false);
    assert_all_gone(&normal);

    // Drop during unwinding.
    let mut unwound = Leftovers::default();
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        build_and_maybe_panic("droppanic", &mut unwound, true)
    }));
    assert!(result.is_err(), "the closure was supposed to panic");
    assert_all_gone(&unwound);
}

#[test]
fn stale_namespaces_of_dead_runs_are_removed() {
    require_root();
    // pid_max is at most 2^22, so this pid can never be alive.
    let stale = "em99999999x0-stale-sw";
    let foreign = "emtest-not-ours";
    for ns in [stale, foreign] {
        // A previous failed run may have left them; start from scratch.
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        // Topology::new in a parallel test may sweep the fake stale namespace
        // while `ip netns add` is still half-way (file created, not yet
        // bind-mounted), failing the add: just try again.
        wait_for(
            &format!("ip netns add {ns}"),
            Duration::from_secs(5),
            || {
                let out = Command::new("ip").args(["netns", "add", ns]).output();
                out.expect("run ip netns add")
                    .status
                    .success()
                    .then_some(())
            },
        );
    }
    let topo = Topology::new("stale");
    let names = netns_names();
    // Clean up our own foreign namespace before asserting.
    let del = Command::new("ip").args(["netns", "del", foreign]).status();
    assert!(del.expect("run ip netns del").success());
    assert!(!names.contains(&stale.to_string()), "stale namespace kept");
    assert!(
        names.contains(&foreign.to_string()),
        "foreign namespace deleted"
    );
    drop(topo);
}

#[test]
fn spawn_logs_env_and_process_control() {
    use std::os::unix::process::ExitStatusExt;
    require_root();
    let mut topo = Topology::new("proc");
    let h = topo.add_host("h");

    let script = "echo out $GREETING; echo err >&2; exit 4".to_string();
    let short = topo.spawn(
        &h,
        "short",
        Path::new("/bin/sh"),
        &["-c".into(), script],
        &[("GREETING", "hello")],
    );
    let status = topo.wait_exit(short, Duration::from_secs(5));
    assert_eq!(status.and_then(|s| s.code()), Some(4));
    let log = topo.log(short);
    assert!(log.contains("out hello") && log.contains("err"), "{log}");

    let sleeper = topo.spawn(&h, "sleep", Path::new("/bin/sleep"), &["600".into()], &[]);
    assert!(topo.is_running(sleeper));
    assert_eq!(topo.wait_exit(sleeper, Duration::from_millis(100)), None);
    let status = topo.stop(sleeper);
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}");
    assert!(!topo.is_running(sleeper));
    // Signalling a reaped process is a no-op, never a stray kill.
    topo.kill(sleeper, libc::SIGKILL);
}
