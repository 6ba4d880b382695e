//! The write half of the hub link, in a task of its own. A write that waits for the network (a
//! full socket buffer while streams move data) then never holds up the read half: WINDOW grants,
//! changes and keepalives from the cloud keep arriving while DATA goes out, and the two halves
//! run on different cores.

use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use super::HubError;
use crate::tunnel::Outgoing;

/// Messages written in one go before a flush.
const MAX_WRITE_BATCH: usize = 64;

/// Control messages (sync requests, acks, keepalives) waiting for the writer. Small: they are
/// few, and a full queue means the link itself is stuck.
const CONTROL_QUEUE: usize = 64;

pub(super) struct LinkWriter {
    control: Option<mpsc::Sender<WsMessage>>,
    /// `None` once the task has been awaited to its end.
    task: Option<JoinHandle<Result<(), HubError>>>,
}

impl LinkWriter {
    /// Starts writing `sink`: control messages first, then the streams' frames from `streams`.
    pub fn spawn<S>(
        sink: SplitSink<WebSocketStream<S>, WsMessage>,
        streams: Option<mpsc::UnboundedReceiver<Outgoing>>,
    ) -> LinkWriter
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
        let task = tokio::spawn(write_link(sink, rx, streams));
        LinkWriter {
            control: Some(tx),
            task: Some(task),
        }
    }

    /// Queues a control message; fails with the writer's error once it has stopped.
    pub async fn send(&mut self, msg: WsMessage) -> Result<(), HubError> {
        let sent = match &self.control {
            Some(tx) => tx.send(msg).await.is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            Err(self.stopped().await)
        }
    }

    /// Resolves when the writer has stopped (a write failed), with why. Cancel-safe.
    pub async fn stopped(&mut self) -> HubError {
        let Some(task) = self.task.as_mut() else {
            return HubError::Closed(String::new());
        };
        let result = task.await;
        self.task = None;
        match result {
            Ok(Err(e)) => e,
            Ok(Ok(())) => HubError::Closed(String::new()),
            Err(e) => HubError::Protocol(format!("the link writer failed: {e}")),
        }
    }

    /// Says goodbye (a websocket Close after whatever is queued) and waits up to `wait` for
    /// it to be written.
    pub async fn close(mut self, wait: Duration) {
        if let Some(tx) = self.control.take() {
            let _ = tx.send(WsMessage::Close(None)).await;
        }
        if let Some(task) = self.task.as_mut() {
            if tokio::time::timeout(wait, task).await.is_err() {
                debug!("the link's Close was not written in time");
            }
        }
    }
}

impl Drop for LinkWriter {
    /// A session that ended must not leave a writer blocked on a socket nobody reads.
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The writer task: ends when the session drops its sender (after writing what was queued),
/// or with the first write error.
async fn write_link<S>(
    mut sink: SplitSink<WebSocketStream<S>, WsMessage>,
    mut control: mpsc::Receiver<WsMessage>,
    mut streams: Option<mpsc::UnboundedReceiver<Outgoing>>,
) -> Result<(), HubError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Link budget held by frames written but not yet flushed.
    let mut permits = Vec::new();
    loop {
        tokio::select! {
            biased;
            msg = control.recv() => match msg {
                Some(msg) => sink.feed(msg).await?,
                None => {
                    sink.flush().await?;
                    return Ok(());
                }
            },
            Some(out) = next_outgoing(&mut streams) => {
                let (message, permit) = out.into_parts();
                sink.feed(message).await?;
                permits.push(permit);
            }
        }
        // Whatever else is queued goes out with the same flush.
        let mut fed = 1;
        while fed < MAX_WRITE_BATCH {
            if let Ok(msg) = control.try_recv() {
                sink.feed(msg).await?;
            } else if let Some(Ok(out)) = streams.as_mut().map(|rx| rx.try_recv()) {
                let (message, permit) = out.into_parts();
                sink.feed(message).await?;
                permits.push(permit);
            } else {
                break;
            }
            fed += 1;
        }
        sink.flush().await?;
        permits.clear();
    }
}

/// The next message of the stream queue, or never when this link carries no streams.
async fn next_outgoing(rx: &mut Option<mpsc::UnboundedReceiver<Outgoing>>) -> Option<Outgoing> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
