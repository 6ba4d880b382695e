//! The [`Topology`]: namespaces, links and processes of one test, all torn
//! down by `Drop`.
//!
//! Layout (N = 10, 11, ... in order of `add_host`):
//!
//! ```text
//!   ns {base}-sw                    ns {base}-{role}
//!   ┌──────────────────────┐        ┌───────────────────────────┐
//!   │ br0 ── p0 ───────────┼─veth──┼─ eth0 10.250.0.10/24, lo   │
//!   │     └─ p1 ───────────┼─veth──┼─ eth0 10.250.0.11/24, lo   │ (next host)
//!   └──────────────────────┘        └───────────────────────────┘
//! ```
//!
//! Network safety: the only routes in a host namespace are the connected
//! `10.250.0.0/24` and loopback. There is no default route and nothing is
//! created in the root namespace (veth pairs are created inside the switch
//! namespace with the peer moved straight into the host namespace), so a test
//! can never reach, or disturb, the real network of the machine.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use super::cmd::{command, output_with_timeout, render, run_checked, wait_child};
use super::netns;
use super::util::require_root;

/// Set this (to anything) to keep per-topology temp directories after a test.
pub const KEEP_DIRS_ENV: &str = "EDGEMESH_KEEP_TEST_DIRS";

/// Default limit for [`Topology::exec`]: generous, but a hung command fails the
/// test instead of hanging CI.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// How long [`Topology::stop`] waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Number of trailing log lines printed per process when a test fails.
const LOG_TAIL_LINES: usize = 60;

/// The host subnet is 10.250.0.0/24; hosts get .10, .11, ...
const SUBNET_PREFIX: [u8; 3] = [10, 250, 0];
const FIRST_HOST_OCTET: u8 = 10;
const MAX_HOSTS: usize = 240;

/// Name of the switch namespace's role; reserved so hosts cannot clash.
const SWITCH_ROLE: &str = "sw";

/// Per-process counter making namespace names unique across parallel tests.
static NEXT_TOPOLOGY: AtomicU32 = AtomicU32::new(0);
/// Counter for unique curl body files (curl takes `&self`).
static NEXT_CURL: AtomicU32 = AtomicU32::new(0);

/// One simulated machine: a network namespace with `eth0` on the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Network namespace name, usable with `ip netns exec`.
    pub ns: String,
    /// Address of `eth0` (in 10.250.0.0/24).
    pub ip: Ipv4Addr,
    /// The label given to [`Topology::add_host`].
    pub role: String,
}

impl Host {
    /// `ip:port` of this host, handy for listen/connect arguments.
    pub fn addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, port)
    }
}

/// Handle to a process started with [`Topology::spawn`]. Only meaningful for
/// the topology that returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcId(usize);

/// A spawned process and what we know about it.
struct Proc {
    name: String,
    role: String,
    pid: u32,
    child: Child,
    log: PathBuf,
    /// Set once the child has been reaped; after that its pid may be reused
    /// by an unrelated process, so we must never signal it again.
    status: Option<ExitStatus>,
}

/// Owns a set of network namespaces and the processes running in them.
/// Dropping it (also while unwinding from a panic) kills every process and
/// deletes every namespace; see the module docs for the layout.
pub struct Topology {
    base: String,
    switch_ns: String,
    /// Every namespace created so far, switch first. Recorded *before* any
    /// further setup so a failing setup step is still cleaned up by `Drop`.
    namespaces: Vec<String>,
    hosts: Vec<Host>,
    /// Pod namespaces behind hosts (see [`Topology::add_pod`]).
    pods: Vec<Host>,
    procs: Vec<Proc>,
    dir: PathBuf,
}

impl Topology {
    /// Creates the switch namespace (with bridge `br0`) and a temp directory.
    ///
    /// `tag` (1-12 chars of `[A-Za-z0-9_-]`) labels namespace and directory
    /// names for debugging. Also deletes namespaces left behind by earlier
    /// test processes that no longer exist.
    pub fn new(tag: &str) -> Topology {
        require_root();
        netns::check_label("tag", tag);
        netns::remove_stale();

        let counter = NEXT_TOPOLOGY.fetch_add(1, Ordering::Relaxed);
        let base = netns::base_name(std::process::id(), counter, tag);
        let dir = make_dir(&base);
        let mut topo = Topology {
            switch_ns: format!("{base}-{SWITCH_ROLE}"),
            base,
            namespaces: Vec::new(),
            hosts: Vec::new(),
            pods: Vec::new(),
            procs: Vec::new(),
            dir,
        };
        topo.create_switch();
        topo
    }

    fn create_switch(&mut self) {
        let sw = self.switch_ns.clone();
        self.create_ns(&sw);
        run_checked(&["ip", "-n", &sw, "link", "set", "lo", "up"]);
        // STP is off by default, so ports forward as soon as they are up
        // (no 15 s listening/learning delay).
        run_checked(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
        run_checked(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
    }

    fn create_ns(&mut self, name: &str) {
        netns::create(name);
        self.namespaces.push(name.to_string());
    }

    /// Adds a host namespace wired to the bridge, with `eth0` at
    /// 10.250.0.N/24 (N = 10, 11, ... in order of creation) and `lo` up.
    /// There is deliberately no default route.
    pub fn add_host(&mut self, role: &str) -> Host {
        netns::check_label("role", role);
        assert!(role != SWITCH_ROLE, "host role {role:?} is reserved");
        assert!(
            self.hosts.iter().all(|h| h.role != role),
            "host role {role:?} used twice in one topology"
        );
        let index = self.hosts.len();
        assert!(index < MAX_HOSTS, "too many hosts (max {MAX_HOSTS})");

        let ns = format!("{}-{role}", self.base);
        self.create_ns(&ns);
        let [a, b, c] = SUBNET_PREFIX;
        let ip = Ipv4Addr::new(a, b, c, FIRST_HOST_OCTET + index as u8);
        self.wire_host(&ns, index, ip);

        let host = Host {
            ns,
            ip,
            role: role.to_string(),
        };
        self.hosts.push(host.clone());
        host
    }

    /// Creates the veth pair *inside* the switch namespace and moves the peer
    /// straight into the host namespace, so the root namespace never sees
    /// either end, not even briefly.
    fn wire_host(&self, ns: &str, index: usize, ip: Ipv4Addr) {
        let sw = self.switch_ns.as_str();
        // Port names only need to be unique within the switch namespace.
        let port = format!("p{index}");
        let cidr = format!("{ip}/24");
        run_checked(&[
            "ip", "-n", sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            ns,
        ]);
        run_checked(&["ip", "-n", sw, "link", "set", &port, "master", "br0"]);
        run_checked(&["ip", "-n", sw, "link", "set", &port, "up"]);
        run_checked(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        run_checked(&["ip", "-n", ns, "addr", "add", &cidr, "dev", "eth0"]);
        run_checked(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
    }

    /// Cuts `hosts` off from each other while each still reaches every other host (the
    /// cloud): their switch ports become isolated bridge ports, like nodes behind separate NATs.
    pub fn isolate(&self, hosts: &[&Host]) {
        for host in hosts {
            let index = self
                .hosts
                .iter()
                .position(|h| h.ns == host.ns)
                .expect("a host of this topology");
            let port = format!("p{index}");
            run_checked(&[
                "ip",
                "-n",
                &self.switch_ns,
                "link",
                "set",
                "dev",
                &port,
                "type",
                "bridge_slave",
                "isolated",
                "on",
            ]);
        }
    }

    /// Adds a pod namespace behind `node`: the node gets bridge `cbr0` at 10.244.I.1/24 (I = the
    /// node's host index) the first time, and the pod gets `eth0` at 10.244.I.K/24 (K = 2, 3, ...)
    /// with its default route through the node, so anything the pod sends outside its subnet
    /// (a cluster IP, another node) is routed by the node's namespace, where edgemesh's iptables
    /// rules see it in `PREROUTING`. The node itself still has no default route.
    pub fn add_pod(&mut self, node: &Host, role: &str) -> Host {
        netns::check_label("role", role);
        assert!(
            self.hosts.iter().chain(&self.pods).all(|h| h.role != role) && role != SWITCH_ROLE,
            "pod role {role:?} used twice in one topology"
        );
        let node_index = self
            .hosts
            .iter()
            .position(|h| h == node)
            .expect("add_pod: node is not a host of this topology");
        let on_node = self
            .pods
            .iter()
            .filter(|p| p.ip.octets()[2] == node_index as u8)
            .count();
        assert!(on_node < 250, "too many pods on {}", node.role);
        let gateway = Ipv4Addr::new(10, 244, node_index as u8, 1);
        let ip = Ipv4Addr::new(10, 244, node_index as u8, on_node as u8 + 2);
        if on_node == 0 {
            let n = node.ns.as_str();
            run_checked(&["ip", "-n", n, "link", "add", "cbr0", "type", "bridge"]);
            run_checked(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("{gateway}/24"),
                "dev",
                "cbr0",
            ]);
            run_checked(&["ip", "-n", n, "link", "set", "cbr0", "up"]);
            run_checked(&[
                "ip",
                "netns",
                "exec",
                n,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]);
        }
        let ns = format!("{}-{role}", self.base);
        self.create_ns(&ns);
        let port = format!("pod{on_node}");
        run_checked(&[
            "ip", "-n", &node.ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ]);
        run_checked(&["ip", "-n", &node.ns, "link", "set", &port, "master", "cbr0"]);
        run_checked(&["ip", "-n", &node.ns, "link", "set", &port, "up"]);
        run_checked(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        run_checked(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]);
        run_checked(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        run_checked(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &gateway.to_string(),
        ]);
        let pod = Host {
            ns,
            ip,
            role: role.to_string(),
        };
        self.pods.push(pod.clone());
        pod
    }

    /// Pods added so far, in creation order.
    pub fn pods(&self) -> &[Host] {
        &self.pods
    }

    /// Hosts added so far, in creation order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Every namespace this topology created (switch first).
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// Per-topology temp directory (logs, curl bodies, files of the test).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `contents` to `name` inside [`Topology::dir`] and returns the
    /// path (e.g. for config files passed to the binaries under test).
    pub fn write_file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir.join(name);
        fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// Runs `argv` inside `host` (`ip netns exec NS argv...`) and waits for it.
    /// Never panics on a non-zero exit: inspect the returned `Output`. A
    /// command still running after [`EXEC_TIMEOUT`] is killed.
    pub fn exec(&self, host: &Host, argv: &[&str]) -> Output {
        self.exec_timeout(host, argv, EXEC_TIMEOUT)
    }

    /// [`Topology::exec`] with an explicit timeout.
    pub fn exec_timeout(&self, host: &Host, argv: &[&str], timeout: Duration) -> Output {
        assert!(!argv.is_empty(), "exec needs a command");
        let mut full = vec!["ip", "netns", "exec", host.ns.as_str()];
        full.extend_from_slice(argv);
        output_with_timeout(&full, timeout)
    }

    /// Runs `curl` inside `host` and returns `(http_status, body)`.
    ///
    /// Invoked as `curl -sS --noproxy '*' -o <tmpfile> -w '%{http_code}'
    /// --max-time 10 ARGS...` (`--noproxy` so a proxy configured in the
    /// environment can never be used); don't pass `-o` or `-w` yourself.
    /// Status 0 means curl got no HTTP response (connection refused, timeout,
    /// ...); the string then holds curl's error message instead of a body, so
    /// a failing assertion shows why.
    pub fn curl(&self, host: &Host, args: &[&str]) -> (u16, String) {
        let n = NEXT_CURL.fetch_add(1, Ordering::Relaxed);
        let body_path = self.dir.join(format!("curl-{n}.body"));
        let body_arg = body_path.to_str().expect("temp dir path is not UTF-8");
        let mut argv = vec![
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "-o",
            body_arg,
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ];
        argv.extend_from_slice(args);
        let out = self.exec(host, &argv);

        let status: u16 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        let body = fs::read(&body_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        // Best effort: a leftover body file is removed with the dir anyway.
        let _ = fs::remove_file(&body_path);
        if status == 0 {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return (0, format!("curl failed ({}): {err}", out.status));
        }
        (status, body)
    }

    /// Starts a long-running `program args...` inside `host` with extra
    /// environment `env`. Stdout and stderr both go to
    /// `dir()/NN-name.log` (first line: the command line), see
    /// [`Topology::log`]. The process gets `PR_SET_PDEATHSIG(SIGKILL)`, so it
    /// dies with the test process even if `Drop` never runs.
    pub fn spawn(
        &mut self,
        host: &Host,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> ProcId {
        let index = self.procs.len();
        let log = self.dir.join(format!("{index:02}-{}.log", sanitize(name)));
        let program = program.to_str().expect("program path is not UTF-8");
        let mut argv = vec!["ip", "netns", "exec", host.ns.as_str(), program];
        argv.extend(args.iter().map(String::as_str));

        let file = open_log(&log, &argv, env);
        let stdout = file.try_clone().expect("duplicate log file handle");
        let child = command(&argv)
            .envs(env.iter().copied())
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{}`: {e}", render(&argv)));

        self.procs.push(Proc {
            name: name.to_string(),
            role: host.role.clone(),
            pid: child.id(),
            child,
            log,
            status: None,
        });
        ProcId(index)
    }

    fn proc(&self, id: ProcId) -> &Proc {
        self.procs
            .get(id.0)
            .expect("ProcId does not belong to this Topology")
    }

    fn proc_mut(&mut self, id: ProcId) -> &mut Proc {
        self.procs
            .get_mut(id.0)
            .expect("ProcId does not belong to this Topology")
    }

    /// Pid of a spawned process (the program itself: `ip netns exec` execs it).
    pub fn pid(&self, id: ProcId) -> u32 {
        self.proc(id).pid
    }

    /// Path of a spawned process's log file.
    pub fn log_path(&self, id: ProcId) -> &Path {
        &self.proc(id).log
    }

    /// Contents of the process's log so far (lossy UTF-8; empty if missing).
    pub fn log(&self, id: ProcId) -> String {
        read_lossy(&self.proc(id).log)
    }

    /// Sends signal `sig` (e.g. `libc::SIGHUP`). Does nothing if the process
    /// has already exited: once reaped, its pid may belong to someone else.
    pub fn kill(&mut self, id: ProcId, sig: i32) {
        if !self.is_running(id) {
            return;
        }
        // Not yet reaped, so the pid is still ours (at worst a zombie, for
        // which kill is a harmless no-op).
        let pid = self.proc(id).pid as libc::pid_t;
        // SAFETY: plain syscall on a pid we own.
        unsafe { libc::kill(pid, sig) };
    }

    /// Whether the process is still running (reaps it if it has exited).
    pub fn is_running(&mut self, id: ProcId) -> bool {
        let p = self.proc_mut(id);
        if p.status.is_none() {
            p.status = p.child.try_wait().expect("waitpid on spawned process");
        }
        p.status.is_none()
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still
    /// running then. Returns the recorded status if it already exited.
    pub fn wait_exit(&mut self, id: ProcId, timeout: Duration) -> Option<ExitStatus> {
        let p = self.proc_mut(id);
        if p.status.is_none() {
            p.status = wait_child(&mut p.child, timeout);
        }
        p.status
    }

    /// Graceful stop: SIGTERM, wait up to 10 s, then SIGKILL. Always reaps
    /// the process and returns its exit status.
    pub fn stop(&mut self, id: ProcId) -> ExitStatus {
        self.kill(id, libc::SIGTERM);
        if let Some(status) = self.wait_exit(id, STOP_GRACE) {
            return status;
        }
        let p = self.proc_mut(id);
        eprintln!(
            "harness: {} (pid {}) ignored SIGTERM for {STOP_GRACE:?}; sending SIGKILL",
            p.name, p.pid
        );
        kill_and_reap(p).expect("reap SIGKILLed process")
    }

    /// Prints where everything is plus the tail of every log, so a failed
    /// test can be diagnosed from CI output alone.
    fn dump_for_failure(&self) {
        eprintln!(
            "==== harness: test failed; topology {} (namespaces {:?}), dir {} ====",
            self.base,
            self.namespaces,
            self.dir.display()
        );
        for p in &self.procs {
            let status = p
                .status
                .map_or_else(|| "running".to_string(), |s| s.to_string());
            eprintln!(
                "---- {} on {} (pid {}, {status}), last {LOG_TAIL_LINES} lines of {} ----",
                p.name,
                p.role,
                p.pid,
                p.log.display()
            );
            eprintln!("{}", tail(&read_lossy(&p.log), LOG_TAIL_LINES));
        }
        eprintln!("==== end of harness dump ====");
    }
}

impl Drop for Topology {
    /// Must never panic (a panic while unwinding aborts the test binary), so
    /// every step here only warns on failure.
    fn drop(&mut self) {
        // Kill first so the logs are complete when dumped and nothing keeps
        // the namespaces alive.
        for p in &mut self.procs {
            if p.status.is_none() {
                if let Err(e) = kill_and_reap(p) {
                    eprintln!("harness: cannot reap {} (pid {}): {e}", p.name, p.pid);
                }
            }
        }
        if thread::panicking() {
            self.dump_for_failure();
        }
        // Hosts before the switch; destroy() also kills anything our
        // children forked into a namespace.
        for ns in self.namespaces.iter().rev() {
            if !netns::destroy(ns) {
                eprintln!("harness: could not delete namespace {ns}");
            }
        }
        if std::env::var_os(KEEP_DIRS_ENV).is_some() {
            eprintln!("harness: keeping test dir {}", self.dir.display());
        } else if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("harness: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// SIGKILL + wait, recording the status. Never panics (used by `Drop`).
fn kill_and_reap(p: &mut Proc) -> std::io::Result<ExitStatus> {
    // Err here only means it already exited; wait() below still reaps it.
    let _ = p.child.kill();
    let status = p.child.wait()?;
    p.status = Some(status);
    Ok(status)
}

/// Creates a fresh per-topology directory under the system temp dir. A
/// leftover with the same name (pid reused after a crashed run) is wiped.
fn make_dir(base: &str) -> PathBuf {
    let dir = std::env::temp_dir().join("edgemesh-e2e").join(base);
    if dir.exists() {
        fs::remove_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot clear stale {}: {e}", dir.display()));
    }
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// Opens the log in append mode (so the child's stdout and stderr, which
/// share it, never overwrite each other) and writes a header line.
fn open_log(path: &Path, argv: &[&str], env: &[(&str, &str)]) -> File {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open log {}: {e}", path.display()));
    let env: String = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    writeln!(file, "# harness: {env}{}", render(argv))
        .unwrap_or_else(|e| panic!("cannot write log {}: {e}", path.display()));
    file
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Keeps process names safe for use in file names.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }

    #[test]
    fn sanitize_replaces_odd_chars() {
        assert_eq!(sanitize("edge mesh/1"), "edge_mesh_1");
    }
}
