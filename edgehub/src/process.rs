//! What both daemons do the same way as processes: run an async main and report its error,
//! turn SIGTERM or SIGINT into one shutdown signal, and give memory back after a burst.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

/// Runs `main` on a multi-threaded runtime. An error is printed as `name: error` (with its
/// causes, for `anyhow` errors) and the process exits with status 1.
pub fn run_main<E: Display>(name: &str, main: impl Future<Output = Result<(), E>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A token that is cancelled on the first SIGTERM or SIGINT. Call from within the runtime.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let signalled = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("shutting down");
        signalled.cancel();
    });
    token
}

/// Waits for the next change of `watched`: `false` once `shutdown` is cancelled or the sender
/// is gone, which ends every loop that follows a watch channel.
pub async fn changed<T>(
    watched: &mut tokio::sync::watch::Receiver<T>,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        changed = watched.changed() => changed.is_ok(),
    }
}

/// After a burst of changes to `watched` (a large apply in cloudcore, a snapshot on a node),
/// once it has been quiet for a moment, hands the memory the burst freed back to the system.
/// glibc keeps freed memory in its arenas otherwise, for good: measured, cloudcore held about
/// 50 MB more after applying 10,000 Services and Endpoints at once than after a restart with
/// the same data, and an agent about 1.5 MB more after a 10,000-Service snapshot.
pub async fn release_memory_after_bursts<T>(
    mut watched: tokio::sync::watch::Receiver<T>,
    shutdown: CancellationToken,
) {
    const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);
    loop {
        if !changed(&mut watched, &shutdown).await {
            return;
        }
        // Let the burst end (or run for a while) and its consumers catch up.
        let burst = tokio::time::Instant::now();
        while burst.elapsed() < SETTLE * 15 {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SETTLE) => break,
                changed = watched.changed() => if changed.is_err() { return },
            }
        }
        watched.borrow_and_update();
        // malloc_trim walks every arena: on the blocking pool, off the async workers.
        let _ = tokio::task::spawn_blocking(release_free_memory).await;
    }
}

/// Hands memory freed inside the allocator back to the system (glibc keeps it otherwise). Walks
/// every arena: call it off the async workers (`spawn_blocking`), after a burst has ended.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free_memory() {
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() {}
