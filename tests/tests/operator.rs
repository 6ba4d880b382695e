//! What an operator installs and runs: the systemd units (`systemd-analyze verify`, readiness
//! over `NOTIFY_SOCKET`), and `scripts/install.sh` / `--uninstall` on a scratch root and inside a
//! node namespace whose agent crashed with its iptables rules in place.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use edgemesh_e2e::harness::{bin, require_root};
use edgemesh_e2e::mesh::{Mesh, ADMIN};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

fn bin_dir() -> PathBuf {
    bin("edgemesh")
        .parent()
        .expect("binary directory")
        .to_path_buf()
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `scripts/install.sh ARGS` with `env`, optionally inside a network namespace.
fn install_sh(netns: Option<&str>, env: &[(&str, &Path)], args: &[&str]) -> Output {
    let script = repo().join("scripts/install.sh");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "bash"]).arg(&script);
            c
        }
        None => {
            let mut c = Command::new("bash");
            c.arg(&script);
            c
        }
    };
    cmd.args(args).env("BIN_DIR", bin_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run scripts/install.sh")
}

/// Every path under `root`, relative, sorted.
fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            out.push(
                path.strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string(),
            );
            if path.is_dir() && !path.is_symlink() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// `systemd-analyze verify --root=ROOT` on both units; returns its combined output (empty when
/// systemd has nothing to say).
fn verify_units(root: &Path) -> (bool, String) {
    // `verify` loads the units' dependencies (sysinit.target, ...) from the root too.
    let units = root.join("usr/lib/systemd/system");
    if !units.exists() {
        std::fs::create_dir_all(root.join("usr/lib/systemd")).expect("mkdir");
        let cp = Command::new("cp")
            .arg("-a")
            .arg("/usr/lib/systemd/system")
            .arg(&units)
            .output()
            .expect("cp");
        assert!(cp.status.success(), "copy systemd's units: {}", text(&cp));
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args([
            "/etc/systemd/system/edgemesh.service",
            "/etc/systemd/system/cloudcore.service",
        ])
        .output()
        .expect("systemd-analyze (package systemd) is installed by scripts/test.sh");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said.trim().to_string())
}

#[test]
fn install_verifies_units_and_uninstall_leaves_nothing_behind() {
    require_root();
    let scratch = tempfile::tempdir().expect("tempdir");
    let root = scratch.path().join("root");
    std::fs::create_dir(&root).expect("mkdir root");

    let out = install_sh(None, &[("DESTDIR", &root)], &[]);
    assert!(out.status.success(), "install: {}", text(&out));
    for (path, want) in [
        ("usr/local/bin/edgemesh", 0o755),
        ("usr/local/bin/cloudcore", 0o755),
        ("etc/systemd/system/edgemesh.service", 0o644),
        ("etc/systemd/system/cloudcore.service", 0o644),
        ("etc/edgemesh/edgemesh.toml", 0o600),
        ("etc/cloudcore/cloudcore.toml", 0o600),
    ] {
        assert_eq!(mode(&root.join(path)), want, "mode of {path}");
    }
    // The installed binary is the one built, and runs.
    let version = Command::new(root.join("usr/local/bin/edgemesh"))
        .arg("--version")
        .output()
        .expect("installed edgemesh runs");
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("edgemesh "));
    let unit =
        std::fs::read_to_string(root.join("etc/systemd/system/edgemesh.service")).expect("unit");
    for line in [
        "Type=notify",
        "ExecStart=/usr/local/bin/edgemesh --config /etc/edgemesh/edgemesh.toml",
        "ExecStopPost=/usr/local/bin/edgemesh cleanup --config /etc/edgemesh/edgemesh.toml",
        "Restart=always",
        "StateDirectory=edgemesh",
        "ConfigurationDirectory=edgemesh",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "edgemesh.service lacks `{line}`"
        );
    }

    // systemd accepts both units as installed: no error and no warning.
    let (ok, said) = verify_units(&root);
    assert!(ok && said.is_empty(), "systemd-analyze verify: {said}");
    // ... and the check is real: a unit systemd would half-ignore is reported.
    let broken = root.join("etc/systemd/system/cloudcore.service");
    let original = std::fs::read_to_string(&broken).expect("unit");
    std::fs::write(&broken, original.replace("Type=notify", "Type=notfy")).expect("write");
    let (_, said) = verify_units(&root);
    assert!(
        said.contains("notfy"),
        "verify must report a bad Type=: {said:?}"
    );
    std::fs::write(&broken, original).expect("restore");
    // The units copied in for verify are not the installer's to remove.
    std::fs::remove_dir_all(root.join("usr/lib")).expect("rm usr/lib");

    // A second install refuses to overwrite an installation.
    let again = install_sh(None, &[("DESTDIR", &root)], &[]);
    assert!(!again.status.success(), "second install must refuse");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already installed"));

    let out = install_sh(None, &[("DESTDIR", &root)], &["--uninstall"]);
    assert!(out.status.success(), "uninstall: {}", text(&out));
    assert_eq!(
        tree(&root),
        Vec::<String>::new(),
        "left behind: {}",
        text(&out)
    );

    // A config the operator edited survives --uninstall, and goes with --purge.
    let out = install_sh(None, &[("DESTDIR", &root)], &[]);
    assert!(out.status.success(), "reinstall: {}", text(&out));
    let conf = root.join("etc/edgemesh/edgemesh.toml");
    let mut edited = std::fs::read_to_string(&conf).expect("config");
    edited.push_str("\n# edited by the operator\n");
    std::fs::write(&conf, &edited).expect("edit config");
    let out = install_sh(None, &[("DESTDIR", &root)], &["--uninstall"]);
    assert!(out.status.success(), "uninstall: {}", text(&out));
    assert_eq!(
        tree(&root),
        vec!["etc", "etc/edgemesh", "etc/edgemesh/edgemesh.toml"],
        "only the edited config stays: {}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&conf).expect("kept"), edited);
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept"));
    let out = install_sh(None, &[("DESTDIR", &root)], &["--uninstall", "--purge"]);
    assert!(out.status.success(), "purge: {}", text(&out));
    // The directories the first install created were recorded then; the edited file was the
    // only thing keeping etc/edgemesh.
    let left = tree(&root);
    assert!(
        left.iter().all(|p| p == "etc"),
        "purge leaves at most the empty etc/: {left:?}"
    );
}

fn nat_rules(mesh: &Mesh, i: usize) -> String {
    let out = mesh
        .topo
        .exec(&mesh.nodes[i].host, &["iptables", "-t", "nat", "-S"]);
    assert!(out.status.success(), "iptables -S: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn uninstall_removes_the_rules_of_a_crashed_agent() {
    let mut mesh = Mesh::start("opuninst", 1);
    assert!(
        nat_rules(&mesh, 0).contains("EDGEMESH"),
        "the agent installs its rules"
    );
    // A crash leaves the rules in the kernel (ExecStopPost would remove them under systemd).
    mesh.stop_node(0, libc::SIGKILL);
    assert!(nat_rules(&mesh, 0).contains("EDGEMESH"));

    // Installed into relocated directories (no DESTDIR: this is the machine's own install), in
    // the node's namespace so `edgemesh cleanup` sees that namespace's rules.
    let scratch = tempfile::tempdir().expect("tempdir");
    let prefix = scratch.path().join("usr");
    let etc = scratch.path().join("etc");
    let units = scratch.path().join("units");
    let env = [
        ("PREFIX", prefix.as_path()),
        ("SYSCONFDIR", etc.as_path()),
        ("UNITDIR", units.as_path()),
    ];
    let ns = mesh.nodes[0].host.ns.clone();
    let out = install_sh(Some(&ns), &env, &[]);
    assert!(out.status.success(), "install: {}", text(&out));
    assert!(prefix.join("bin/edgemesh").is_file());
    let unit = std::fs::read_to_string(units.join("edgemesh.service")).expect("unit");
    let exec_start = format!(
        "ExecStart={}/bin/edgemesh --config {}/edgemesh/edgemesh.toml",
        prefix.display(),
        etc.display()
    );
    assert!(
        unit.lines().any(|l| l == exec_start),
        "unit follows PREFIX and SYSCONFDIR:\n{unit}"
    );

    let out = install_sh(Some(&ns), &env, &["--uninstall"]);
    assert!(out.status.success(), "uninstall: {}", text(&out));
    let rules = nat_rules(&mesh, 0);
    assert!(
        !rules.contains("EDGEMESH"),
        "uninstall removes the rules:\n{rules}\n{}",
        text(&out)
    );
    assert_eq!(
        tree(scratch.path()),
        Vec::<String>::new(),
        "uninstall removes every file: {}",
        text(&out)
    );
}

/// A socket standing in for systemd's `NOTIFY_SOCKET`, read by a thread as systemd would (the
/// daemons drop notifications rather than block when nobody reads).
struct Notifications {
    rx: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Notifications {
    fn bind(path: &Path) -> Notifications {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                if tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
                {
                    return;
                }
            }
        });
        Notifications {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a message containing `what`; returns it.
    fn wait_for(&mut self, what: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(msg) => {
                    self.seen.push(msg.clone());
                    if msg.contains(what) {
                        return msg;
                    }
                }
                Err(_) => panic!(
                    "no notification with {what:?} within {timeout:?}; got {:?}",
                    self.seen
                ),
            }
        }
    }
}

#[test]
fn daemons_tell_systemd_they_are_ready_only_when_serving() {
    let mut mesh = Mesh::new("opnotify", 1, Vec::new());
    let dir = mesh.topo.dir().to_path_buf();
    let cloud_sock = dir.join("cloud-notify.sock");
    let node_sock = dir.join("node-notify.sock");
    let mut cloud_notes = Notifications::bind(&cloud_sock);
    let mut node_notes = Notifications::bind(&node_sock);
    let watchdog = ("WATCHDOG_USEC".to_string(), "400000".to_string());
    mesh.cloud_env = vec![
        ("NOTIFY_SOCKET".into(), cloud_sock.display().to_string()),
        watchdog.clone(),
    ];
    mesh.nodes[0].env = vec![
        ("NOTIFY_SOCKET".into(), node_sock.display().to_string()),
        watchdog,
    ];

    mesh.spawn_cloud();
    let ready = cloud_notes.wait_for("READY=1", Duration::from_secs(30));
    assert!(ready.contains("STATUS=serving: hub"), "{ready}");
    // At READY the API answers at once: ready means serving.
    let (status, body) = mesh.topo.curl(&mesh.cloud, &[&mesh.api_url("/readyz")]);
    assert_eq!(status, 200, "cloudcore /readyz right after READY=1: {body}");
    mesh.wait_cloud_ready();
    cloud_notes.wait_for("WATCHDOG=1", Duration::from_secs(5));
    cloud_notes.wait_for("WATCHDOG=1", Duration::from_secs(5));

    mesh.create_tokens();
    mesh.spawn_node(0);
    let ready = node_notes.wait_for("READY=1", Duration::from_secs(30));
    assert!(ready.contains("metadata version"), "{ready}");
    // At READY the admin API is ready and the interception rules are in place.
    let host = mesh.nodes[0].host.clone();
    let (status, body) = mesh.topo.curl(&host, &[&format!("http://{ADMIN}/readyz")]);
    assert_eq!(status, 200, "edgemesh /readyz right after READY=1: {body}");
    assert!(nat_rules(&mesh, 0).contains("EDGEMESH"));
    node_notes.wait_for("WATCHDOG=1", Duration::from_secs(5));
    // The status line follows the cloud link.
    let line = node_notes.wait_for("STATUS=connected to ws://", Duration::from_secs(15));
    assert!(line.contains("services"), "{line}");

    // cloudcore's status line counts the nodes online.
    cloud_notes.wait_for("nodes online: 1", Duration::from_secs(15));

    // A clean stop says so before the drain.
    mesh.stop_node(0, libc::SIGTERM);
    node_notes.wait_for("STOPPING=1", Duration::from_secs(5));
    mesh.stop_cloud(libc::SIGTERM);
    cloud_notes.wait_for("STOPPING=1", Duration::from_secs(5));
}

/// The demo's isolation check (the one that decides whether a cross-node call really went
/// through the cloud) fails where the nodes reach each other and where ping is missing, and
/// passes only on the isolated topology: `scripts/demo.sh --self-test` builds each case.
#[test]
fn the_demo_isolation_check_fails_when_the_nodes_reach_each_other() {
    require_root();
    let out = Command::new("timeout")
        .args(["120", "bash"])
        .arg(repo().join("scripts/demo.sh"))
        .arg("--self-test")
        .output()
        .expect("run scripts/demo.sh --self-test");
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    for want in [
        "ok: nodes that reach each other fail the isolation check",
        "ok: without ping the check cannot tell and says so",
        "ok: isolated nodes pass it",
        "self-test finished OK",
    ] {
        assert!(all.contains(want), "{want:?} missing:\n{all}");
    }
}
