//! The node's one direct-path UDP socket, shared by QUIC and the reflexive-address probes.
//!
//! The reflexive address is the NAT mapping of this very socket, so probes must leave from it
//! and their answers arrive on it. quinn reads the socket; [`DirectSocket`] is the socket
//! quinn is given: it hands every datagram to quinn except the reflector's answers, which go
//! to the prober ([`ProbePort`]). Probes are sent through a second descriptor of the same
//! socket (same port, same mapping); nothing reads from that one.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};
use tokio::sync::{mpsc, Mutex};

use super::reflect::{ProbeIo, ANSWER_MAGIC, MAX_ANSWER_LEN};

/// Answers waiting for the prober; more are dropped (the prober reads them at once, and a
/// flood of look-alikes must not take memory).
const ANSWER_QUEUE: usize = 16;

/// What quinn reads and writes: the socket, less the reflector's answers.
pub(crate) struct DirectSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    answers: mpsc::Sender<(Bytes, SocketAddr)>,
}

impl fmt::Debug for DirectSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectSocket").finish_non_exhaustive()
    }
}

/// The prober's side of the socket: sends from it, receives the answers quinn passed over.
pub struct ProbePort {
    send: tokio::net::UdpSocket,
    answers: Mutex<mpsc::Receiver<(Bytes, SocketAddr)>>,
}

/// Splits a bound socket into quinn's socket and the prober's port.
pub(crate) fn split(socket: std::net::UdpSocket) -> io::Result<(Arc<DirectSocket>, ProbePort)> {
    socket.set_nonblocking(true)?;
    let send = tokio::net::UdpSocket::from_std(socket.try_clone()?)?;
    let inner = quinn::TokioRuntime.wrap_udp_socket(socket)?;
    let (tx, rx) = mpsc::channel(ANSWER_QUEUE);
    Ok((
        Arc::new(DirectSocket { inner, answers: tx }),
        ProbePort {
            send,
            answers: Mutex::new(rx),
        },
    ))
}

/// Whether a datagram is a reflector's answer rather than QUIC. QUIC short headers may begin
/// with the same byte, but not with the same four and this short; a QUIC packet taken for an
/// answer is lost like any other and sent again.
fn is_answer(datagram: &[u8]) -> bool {
    datagram.len() <= MAX_ANSWER_LEN && datagram.starts_with(ANSWER_MAGIC)
}

impl AsyncUdpSocket for DirectSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let n = match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            // Keep quinn's datagrams at the front, in order; pass the answers on.
            let mut kept = 0;
            for i in 0..n {
                let m = meta[i];
                let single = m.len == m.stride || m.stride == 0;
                if single && is_answer(&bufs[i][..m.len]) {
                    let _ = self
                        .answers
                        .try_send((Bytes::copy_from_slice(&bufs[i][..m.len]), m.addr));
                    continue;
                }
                if kept != i {
                    let (front, back) = bufs.split_at_mut(i);
                    front[kept][..m.len].copy_from_slice(&back[0][..m.len]);
                    meta[kept] = m;
                }
                kept += 1;
            }
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
            // Only answers: read on (the socket's readiness decides whether to wait).
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

impl ProbeIo for ProbePort {
    async fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.send.send_to(buf, to).await
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let mut answers = self.answers.lock().await;
        let (datagram, from) = answers
            .recv()
            .await
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "direct socket closed"))?;
        let n = datagram.len().min(buf.len());
        buf[..n].copy_from_slice(&datagram[..n]);
        Ok((n, from))
    }
}

impl ProbePort {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.send.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_told_from_quic() {
        assert!(is_answer(b"EMA1\x00\x01"));
        assert!(!is_answer(b"EMA2"));
        assert!(
            !is_answer(&[0x45; 1200]),
            "a QUIC short header of full size"
        );
        let mut long = b"EMA1".to_vec();
        long.resize(MAX_ANSWER_LEN + 1, 0);
        assert!(!is_answer(&long));
    }
}
