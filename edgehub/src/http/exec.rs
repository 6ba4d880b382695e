//! Where hyper runs the tasks of an HTTP/2 connection (one per stream on the server side, one
//! per request body sent on the client side): on the connection's own task, not spawned onto
//! the runtime.
//!
//! Why: a spawned task, and a task that wakes itself while it runs (which is what a stream
//! does to its connection when it has a frame to send), is queued behind others and makes
//! tokio wake another worker thread, which then steals work: every call crossed threads
//! several times. Here the connection and its streams are polled together under a waker of
//! their own; wakes that happen while they are being polled just make the loop go round
//! again, and only wakes from outside (sockets, other tasks) wake the task.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::AtomicWaker;
use tokio::sync::mpsc;

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Rounds of polling in one go before the task yields to others.
const ROUNDS: usize = 32;

/// The executor handed to hyper; clones share the connection's task set.
#[derive(Clone)]
pub struct ConnExec(mpsc::UnboundedSender<Task>);

impl<F> hyper::rt::Executor<F> for ConnExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        // Only the connection and its tasks call this, from within `ConnTasks::run`, which
        // takes new tasks after every poll: the receiver is there, and needs no wake-up.
        let _ = self.0.send(Box::pin(fut));
    }
}

/// The tasks of one connection, run by whoever drives the connection.
pub struct ConnTasks {
    incoming: mpsc::UnboundedReceiver<Task>,
    running: FuturesUnordered<Task>,
    waker: Arc<LoopWaker>,
}

/// Wakes the task, unless the wake comes while the task is polling the connection and its
/// streams: then it only asks for another round. (`SeqCst`: the poller stores `polling` and
/// loads `again`, a waker does the reverse; weaker orderings could let both miss the other.)
#[derive(Default)]
struct LoopWaker {
    task: AtomicWaker,
    polling: AtomicBool,
    again: AtomicBool,
}

impl Wake for LoopWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.again.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            self.task.wake();
        }
    }
}

impl ConnTasks {
    pub fn new() -> (ConnExec, ConnTasks) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            ConnExec(tx),
            ConnTasks {
                incoming: rx,
                running: FuturesUnordered::new(),
                waker: Arc::new(LoopWaker::default()),
            },
        )
    }

    /// Drives `conn` and the tasks spawned for it until `conn` is done.
    pub async fn run<F: Future + Unpin>(&mut self, mut conn: F) -> F::Output {
        std::future::poll_fn(|cx| self.poll_with(cx, &mut conn)).await
    }

    fn poll_with<F: Future + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        conn: &mut F,
    ) -> Poll<F::Output> {
        self.waker.task.register(cx.waker());
        let waker = Waker::from(self.waker.clone());
        let mut inner = Context::from_waker(&waker);
        for _ in 0..ROUNDS {
            self.waker.polling.store(true, Ordering::SeqCst);
            self.waker.again.store(false, Ordering::SeqCst);
            if let Poll::Ready(out) = Pin::new(&mut *conn).poll(&mut inner) {
                self.waker.polling.store(false, Ordering::SeqCst);
                return Poll::Ready(out);
            }
            while let Ok(task) = self.incoming.try_recv() {
                self.running.push(task);
            }
            while let Poll::Ready(Some(())) = self.running.poll_next_unpin(&mut inner) {}
            self.waker.polling.store(false, Ordering::SeqCst);
            // A wake that came while polling, or just after, means another round.
            if !self.waker.again.load(Ordering::SeqCst) && self.incoming.is_empty() {
                return Poll::Pending;
            }
        }
        // Busy: let other tasks run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Runs the tasks still going once their connection is done (they end as soon as they
    /// notice it is gone).
    pub async fn finish(mut self) {
        self.incoming.close();
        while let Ok(task) = self.incoming.try_recv() {
            self.running.push(task);
        }
        while self.running.next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn tasks_run_beside_their_connection() {
        let (exec, mut tasks) = ConnTasks::new();
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let conn = {
            let (exec, done) = (exec.clone(), done.clone());
            Box::pin(async move {
                for _ in 0..3 {
                    let done = done.clone();
                    exec.execute(async move {
                        tokio::task::yield_now().await;
                        done.fetch_add(1, Ordering::SeqCst);
                    });
                }
                // The connection waits for something its tasks do not depend on.
                let _ = rx.await;
                "closed"
            })
        };
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            let _ = tx.send(());
        });
        assert_eq!(tasks.run(conn).await, "closed");
        exec.execute(async {});
        tasks.finish().await;
        assert_eq!(done.load(Ordering::SeqCst), 3);
    }
}
