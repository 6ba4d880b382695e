//! Telling systemd how the daemon is doing (`Type=notify`, `WatchdogSec=`): the sd_notify(3)
//! datagram protocol on `NOTIFY_SOCKET`. Outside systemd (no `NOTIFY_SOCKET`) every call does
//! nothing, so the daemons call these unconditionally.
//!
//! - [`ready`] once the store is loaded and every listener is bound: `systemctl start` returns
//!   then, and units ordered `After=` this one start only then.
//! - [`stopping`] when shutdown begins, so systemd does not count the drain as a hang.
//! - [`status`] for the one-line state `systemctl status` shows.
//! - [`watchdog`] pings at half the unit's `WatchdogSec=` from a runtime task: a runtime that no
//!   longer schedules tasks (a deadlock, every worker blocked) misses the pings and systemd
//!   restarts the daemon (`Restart=always`).
//!
//! Written here rather than with the `sd-notify` crate because its sends block while the
//! manager's receive queue is full; a notification must never stall a runtime worker (or the
//! shutdown path), so ours are non-blocking and a full queue drops the message.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

enum NotifyState<'a> {
    Ready,
    Stopping,
    Status(&'a str),
    Watchdog,
}

impl NotifyState<'_> {
    fn write(&self, out: &mut String) {
        match self {
            NotifyState::Ready => out.push_str("READY=1\n"),
            NotifyState::Stopping => out.push_str("STOPPING=1\n"),
            NotifyState::Watchdog => out.push_str("WATCHDOG=1\n"),
            NotifyState::Status(s) => {
                // One line per field: a newline would end the field early.
                out.push_str("STATUS=");
                out.push_str(&s.replace('\n', " "));
                out.push('\n');
            }
        }
    }
}

/// The manager's socket: a path, or `@name` in the abstract namespace.
fn notify_addr(raw: &std::ffi::OsStr) -> io::Result<SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = raw.as_bytes();
    match bytes.first() {
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&bytes[1..])
        }
        Some(b'/') => SocketAddr::from_pathname(raw),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is neither a path nor an abstract socket name",
        )),
    }
}

fn notify(states: &[NotifyState]) -> io::Result<()> {
    let Some(raw) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let addr = notify_addr(&raw)?;
    let mut msg = String::new();
    for s in states {
        s.write(&mut msg);
    }
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    sock.send_to_addr(msg.as_bytes(), &addr)?;
    Ok(())
}

fn send(states: &[NotifyState]) {
    if let Err(e) = notify(states) {
        // Readiness that never arrives makes systemd fail the start after TimeoutStartSec;
        // say why in the log the operator will read then.
        warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// Startup is complete; `summary` becomes the unit's status line.
pub fn ready(summary: &str) {
    debug!(summary, "notifying systemd: ready");
    send(&[NotifyState::Ready, NotifyState::Status(summary)]);
}

/// Shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// A new status line (no state change).
pub fn status(summary: &str) {
    send(&[NotifyState::Status(summary)]);
}

/// The watchdog period systemd asked for (`WATCHDOG_USEC`, when `WATCHDOG_PID` is unset or
/// this process), if any.
pub fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its period until `shutdown`; does nothing when the unit has no
/// `WatchdogSec=`. Call from within the runtime.
pub fn watchdog(shutdown: CancellationToken) {
    let Some(period) = watchdog_period() else {
        return;
    };
    let every = (period / 2).max(Duration::from_millis(100));
    debug!(
        period_ms = period.as_millis() as u64,
        "systemd watchdog enabled"
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => send(&[NotifyState::Watchdog]),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    /// One test owns the environment: `NOTIFY_SOCKET` is process-wide.
    #[tokio::test]
    async fn sends_readiness_status_stopping_and_watchdog_pings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        // SAFETY (edition 2021: set_var is safe but racy): no other test in this crate reads
        // these variables.
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", "200000");
        std::env::set_var("WATCHDOG_PID", std::process::id().to_string());

        let recv = |sock: &UnixDatagram| {
            let mut buf = [0u8; 512];
            let n = sock.recv(&mut buf).expect("a notification");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        ready("serving");
        assert_eq!(recv(&sock), "READY=1\nSTATUS=serving\n");
        status("connected");
        assert_eq!(recv(&sock), "STATUS=connected\n");

        assert_eq!(watchdog_period(), Some(Duration::from_millis(200)));
        let shutdown = CancellationToken::new();
        watchdog(shutdown.clone());
        let sock = tokio::task::spawn_blocking(move || {
            assert_eq!(recv(&sock), "WATCHDOG=1\n");
            assert_eq!(recv(&sock), "WATCHDOG=1\n");
            sock
        })
        .await
        .expect("pings");
        shutdown.cancel();
        stopping();
        // Pings already queued may precede it; the last message is the stop.
        let mut last = String::new();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut buf = [0u8; 512];
        while let Ok(n) = sock.recv(&mut buf) {
            last = String::from_utf8_lossy(&buf[..n]).into_owned();
        }
        assert_eq!(last, "STOPPING=1\nSTATUS=stopping\n");

        // A manager that does not read: the queue fills, and sends fail instead of blocking.
        for _ in 0..1000 {
            status("queue filler");
        }
        drop(sock);

        // An abstract socket name (`@...`), as systemd uses inside containers.
        use std::os::linux::net::SocketAddrExt;
        let name = format!("edgehub-notify-test-{}", std::process::id());
        let abstract_sock = UnixDatagram::bind_addr(
            &SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name"),
        )
        .expect("bind abstract");
        abstract_sock
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));
        status("multi\nline");
        assert_eq!(recv(&abstract_sock), "STATUS=multi line\n");

        // Another process's watchdog is not ours.
        std::env::set_var("WATCHDOG_PID", "1");
        assert_eq!(watchdog_period(), None);
        std::env::remove_var("NOTIFY_SOCKET");
        std::env::remove_var("WATCHDOG_USEC");
        std::env::remove_var("WATCHDOG_PID");
    }
}
