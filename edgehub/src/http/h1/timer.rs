//! Timeouts on the HTTP/1 path without a timer per wait.
//!
//! A tokio timer costs a handle lookup when it is made, and a lock and a wheel update when it
//! is armed and again when it is dropped. A keep-alive connection waits for a request head and
//! for a response head once per request, and writes a few times; made per wait, those timers
//! were about 4.5 % of the agent's samples under keep-alive load (`perf record`, issue 13).
//! Here a wait that is ready at once makes no timer, and each kind of wait of a connection
//! keeps one [`Deadline`] whose deadlines only move later, so it is re-armed when it fires
//! rather than for every wait.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Far enough ahead that the first wait always moves the timer to its own deadline.
const UNARMED: Duration = Duration::from_secs(365 * 24 * 3600);

/// The wait did not end by its deadline.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct TimedOut;

/// One timer for successive waits of one kind on one connection.
pub(super) struct Deadline {
    sleep: Pin<Box<Sleep>>,
    /// When `sleep` fires.
    armed: Instant,
}

impl Deadline {
    pub(super) fn new() -> Deadline {
        let armed = Instant::now() + UNARMED;
        Deadline {
            sleep: Box::pin(tokio::time::sleep_until(armed)),
            armed,
        }
    }

    /// `f`, unless `deadline` passes first. The timer is moved only to an earlier deadline;
    /// when it fires before this wait's own deadline, it is moved on to it.
    pub(super) async fn wait<F: Future>(
        &mut self,
        deadline: Instant,
        f: F,
    ) -> Result<F::Output, TimedOut> {
        let mut f = pin!(f);
        if let Some(out) = ready_now(f.as_mut()).await {
            return Ok(out);
        }
        if deadline < self.armed {
            self.arm(deadline);
        }
        loop {
            tokio::select! {
                biased;
                out = &mut f => return Ok(out),
                () = &mut self.sleep => {
                    if Instant::now() >= deadline {
                        return Err(TimedOut);
                    }
                    self.arm(deadline);
                }
            }
        }
    }

    fn arm(&mut self, at: Instant) {
        self.sleep.as_mut().reset(at);
        self.armed = at;
    }
}

/// `io`, failing with `TimedOut` if it takes longer than `idle`; no timer is made when it is
/// ready at once (most writes, and reads of bytes already there).
pub(crate) async fn within<T>(
    idle: Duration,
    io: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    let mut io = pin!(io);
    if let Some(r) = ready_now(io.as_mut()).await {
        return r;
    }
    match tokio::time::timeout(idle, io).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("nothing moved for {idle:?}"),
        )),
    }
}

/// Polls `f` once: its output if it is ready, else `None` (its waker is registered).
async fn ready_now<F: Future>(mut f: Pin<&mut F>) -> Option<F::Output> {
    std::future::poll_fn(|cx| match f.as_mut().poll(cx) {
        Poll::Ready(out) => Poll::Ready(Some(out)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_its_own_deadline_whatever_the_timer_held() {
        let mut timer = Deadline::new();
        let start = Instant::now();
        // Ready at once: no timer is armed.
        assert_eq!(timer.wait(start, async { 1 }).await, Ok(1));
        assert!(timer.armed > start + Duration::from_secs(3600));

        let first = start + Duration::from_secs(5);
        let slow = tokio::time::sleep(Duration::from_secs(2));
        assert_eq!(timer.wait(first, slow).await, Ok(()));
        assert_eq!(timer.armed, first);

        // A later deadline leaves the timer where it was; when it fires, the wait goes on.
        let second = start + Duration::from_secs(12);
        let never = std::future::pending::<()>();
        assert_eq!(timer.wait(second, never).await, Err(TimedOut));
        assert_eq!(Instant::now(), second);

        // An earlier deadline than the armed one moves the timer back.
        timer.arm(Instant::now() + Duration::from_secs(100));
        let third = Instant::now() + Duration::from_secs(1);
        let never = std::future::pending::<()>();
        assert_eq!(timer.wait(third, never).await, Err(TimedOut));
        assert_eq!(Instant::now(), third);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_that_fired_between_waits_does_not_end_the_next_one_early() {
        let mut timer = Deadline::new();
        let start = Instant::now();
        let slow = tokio::time::sleep(Duration::from_secs(1));
        assert_eq!(
            timer.wait(start + Duration::from_secs(2), slow).await,
            Ok(())
        );
        // The timer's deadline passes while nothing waits on it.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let next = Instant::now() + Duration::from_secs(3);
        let slow = tokio::time::sleep(Duration::from_secs(2));
        assert_eq!(timer.wait(next, slow).await, Ok(()));
        let never = std::future::pending::<()>();
        assert_eq!(timer.wait(next, never).await, Err(TimedOut));
        assert_eq!(Instant::now(), next);
    }

    #[tokio::test(start_paused = true)]
    async fn within_times_out_a_stalled_operation_only() {
        let idle = Duration::from_secs(3);
        assert_eq!(within(idle, async { Ok(7) }).await.expect("ready"), 7);
        let start = Instant::now();
        let stalled = within(idle, std::future::pending::<io::Result<()>>()).await;
        assert_eq!(
            stalled.expect_err("stalled").kind(),
            io::ErrorKind::TimedOut
        );
        assert_eq!(Instant::now(), start + idle);
    }
}
