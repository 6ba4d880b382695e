//! A real etcd for unit tests: one member on free loopback ports, its data on tmpfs, killed
//! and removed when the guard drops (also when the test fails).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::config::EtcdConfig;

pub(crate) struct TestEtcd {
    child: Child,
    dir: PathBuf,
    pub(crate) endpoint: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl TestEtcd {
    /// Starts etcd (Debian's `etcd-server`); panics with what to install when it is missing.
    pub(crate) fn start() -> TestEtcd {
        let (client, peer) = (free_port(), free_port());
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!(
            "edgemesh-etcd-test-{}-{client}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args([
                "--name",
                "test",
                "--data-dir",
                &dir.display().to_string(),
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("test={peer_url}"),
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "etcd (apt-get install etcd-server) must be installed for the etcd store tests",
            );
        let etcd = TestEtcd {
            child,
            dir,
            endpoint,
        };
        // Ready once the client port accepts connections.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
            assert!(std::time::Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        etcd
    }

    /// A store config for this member under `prefix`.
    pub(crate) fn config(&self, prefix: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![self.endpoint.clone()],
            prefix: prefix.to_string(),
            startup_timeout: Duration::from_secs(10),
            ..EtcdConfig::default()
        }
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
