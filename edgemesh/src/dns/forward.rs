//! Forwarding names outside the cluster zone to the upstream servers, with a cache.
//!
//! Each upstream gets an equal share of what is left of `dns.upstream_timeout`; one that
//! refuses or cannot be reached is skipped at once. A truncated UDP answer is asked again over
//! TCP. Every query uses a fresh socket (random source port) and a random ID, and only a reply
//! that matches both the ID and the question is accepted.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, LowerName, Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::time::timeout_at;
use tracing::debug;

use super::cache::{Answer, Cache, Key};
use super::limits::{record_limit, Limit};

/// EDNS payload size asked of upstreams (and offered to clients): the DNS flag day value.
pub const UDP_PAYLOAD: u16 = 1232;

/// Forwarded queries in flight at once; more get SERVFAIL at once instead of piling up.
const MAX_IN_FLIGHT: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream servers are configured")]
    NoUpstreams,
    #[error("too many forwarded queries in flight")]
    Busy,
    #[error("no upstream answered within {0:?}")]
    Timeout(Duration),
    #[error("upstream {upstream}: {reason}")]
    Upstream {
        upstream: SocketAddr,
        reason: String,
    },
}

/// Where a forwarded answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Cache,
    Upstream,
}

pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    cache: Cache,
    in_flight: Semaphore,
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration, cache_size: usize) -> Forwarder {
        Forwarder {
            upstreams,
            timeout,
            cache: Cache::new(cache_size),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
        }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// The answer for `name`, from the cache or the upstreams, within `dns.upstream_timeout`.
    pub async fn resolve(
        &self,
        name: &LowerName,
        qtype: RecordType,
        class: DNSClass,
    ) -> Result<(Answer, Source), ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstreams);
        }
        let key = Key {
            name: name.clone(),
            qtype,
            class,
        };
        if let Some(answer) = self.cache.get(&key, Instant::now()) {
            return Ok((answer, Source::Cache));
        }
        let _permit = self.in_flight.try_acquire().map_err(|_| {
            record_limit(Limit::ForwardInFlight);
            ForwardError::Busy
        })?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut query = Query::query(Name::from(name), qtype);
        query.set_query_class(class);
        let mut last_err = ForwardError::Timeout(self.timeout);
        let mut fallback = None;
        for (i, upstream) in self.upstreams.iter().enumerate() {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            // An equal share of what is left for this upstream and the ones after it.
            let share = (deadline - now) / u32::try_from(self.upstreams.len() - i).unwrap_or(1);
            match exchange(*upstream, &query, now + share).await {
                Ok(msg) => {
                    let answer = Answer::from_message(msg);
                    if matches!(answer.rcode, ResponseCode::ServFail | ResponseCode::Refused) {
                        // Another upstream may do better; keep this one in case none does.
                        fallback = Some(answer);
                        continue;
                    }
                    self.cache.insert(key, &answer, Instant::now());
                    return Ok((answer, Source::Upstream));
                }
                Err(reason) => {
                    metrics::counter!("edgemesh_dns_upstream_failures_total").increment(1);
                    debug!(%upstream, name = %name, %reason, "upstream failed");
                    last_err = ForwardError::Upstream {
                        upstream: *upstream,
                        reason,
                    };
                }
            }
        }
        match fallback {
            Some(answer) => Ok((answer, Source::Upstream)),
            None => Err(last_err),
        }
    }
}

/// One question to one upstream: UDP, then TCP when the answer was truncated.
async fn exchange(
    upstream: SocketAddr,
    query: &Query,
    deadline: tokio::time::Instant,
) -> Result<Message, String> {
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(query.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(UDP_PAYLOAD);
    msg.set_edns(edns);
    let id = msg.metadata.id;
    let bytes = msg
        .to_vec()
        .map_err(|e| format!("cannot encode the query: {e}"))?;
    let reply = match timeout_at(deadline, udp(upstream, &bytes, id, query)).await {
        Ok(r) => r?,
        Err(_) => return Err("timed out".into()),
    };
    if !reply.metadata.truncation {
        return Ok(reply);
    }
    match timeout_at(deadline, tcp(upstream, &bytes, id, query)).await {
        Ok(r) => r,
        Err(_) => Err("timed out over TCP".into()),
    }
}

/// Parses a reply, refusing one whose header claims more records than its bytes could hold
/// (the parser would reserve room for all of them first).
fn parse(bytes: &[u8]) -> Option<Message> {
    if bytes.len() < 12 {
        return None;
    }
    let count = |i: usize| usize::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
    // A question takes at least 5 bytes, a record at least 11.
    if count(4) * 5 + (count(6) + count(8) + count(10)) * 11 > bytes.len() - 12 {
        return None;
    }
    Message::from_vec(bytes).ok()
}

fn matches(reply: &Message, id: u16, query: &Query) -> bool {
    reply.metadata.id == id
        && reply.metadata.message_type == MessageType::Response
        && reply.queries.len() == 1
        && reply.queries[0].query_type() == query.query_type()
        && reply.queries[0].query_class() == query.query_class()
        && LowerName::new(reply.queries[0].name()) == LowerName::new(query.name())
}

async fn udp(
    upstream: SocketAddr,
    bytes: &[u8],
    id: u16,
    query: &Query,
) -> Result<Message, String> {
    let local: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = UdpSocket::bind(local).await.map_err(|e| e.to_string())?;
    // Connected: the kernel drops datagrams from anyone else and reports ICMP errors.
    socket.connect(upstream).await.map_err(|e| e.to_string())?;
    socket.send(bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; usize::from(UDP_PAYLOAD).max(4096)];
    loop {
        let n = socket.recv(&mut buf).await.map_err(|e| e.to_string())?;
        // Anything that is not the reply (late answers to an earlier query, garbage) is
        // ignored; the deadline bounds the wait.
        if let Some(reply) = parse(&buf[..n]) {
            if matches(&reply, id, query) {
                return Ok(reply);
            }
        }
    }
}

async fn tcp(
    upstream: SocketAddr,
    bytes: &[u8],
    id: u16,
    query: &Query,
) -> Result<Message, String> {
    let mut stream = TcpStream::connect(upstream)
        .await
        .map_err(|e| e.to_string())?;
    let len = u16::try_from(bytes.len()).map_err(|_| "query too long".to_string())?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await.map_err(|e| e.to_string())?;
    loop {
        let len = stream.read_u16().await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; usize::from(len)];
        stream
            .read_exact(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        let reply = parse(&buf).ok_or_else(|| "unreadable reply".to_string())?;
        if matches(&reply, id, query) {
            return Ok(reply);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record};
    use std::str::FromStr;

    /// A tiny upstream on loopback: answers every A query with 192.0.2.1 (TTL 60), truncating
    /// over UDP when `truncate` is set, and counts the queries it got.
    async fn upstream(
        truncate: bool,
    ) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
        let count = std::sync::Arc::new(AtomicUsize::new(0));
        let reply = |req: &[u8], tc: bool| {
            let req = Message::from_vec(req).unwrap();
            let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
            resp.metadata.truncation = tc;
            resp.add_queries(req.queries.clone());
            if !tc {
                resp.add_answer(Record::from_rdata(
                    req.queries[0].name().clone(),
                    60,
                    RData::A(A::new(192, 0, 2, 1)),
                ));
            }
            resp.to_vec().unwrap()
        };
        let c = count.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                c.fetch_add(1, Ordering::SeqCst);
                let _ = udp.send_to(&reply(&buf[..n], truncate), from).await;
            }
        });
        tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                let len = s.read_u16().await.unwrap();
                let mut buf = vec![0u8; len as usize];
                s.read_exact(&mut buf).await.unwrap();
                let out = reply(&buf, false);
                s.write_all(&(out.len() as u16).to_be_bytes())
                    .await
                    .unwrap();
                s.write_all(&out).await.unwrap();
            }
        });
        (addr, count)
    }

    fn name(s: &str) -> LowerName {
        LowerName::from_str(s).unwrap()
    }

    #[tokio::test]
    async fn forwards_caches_and_retries_truncated_answers_over_tcp() {
        let (addr, count) = upstream(false).await;
        let f = Forwarder::new(vec![addr], Duration::from_secs(2), 10);
        let (a, src) = f
            .resolve(&name("www.example."), RecordType::A, DNSClass::IN)
            .await
            .unwrap();
        assert_eq!(src, Source::Upstream);
        assert_eq!(a.answers.len(), 1);
        let (_, src) = f
            .resolve(&name("www.example."), RecordType::A, DNSClass::IN)
            .await
            .unwrap();
        assert_eq!(src, Source::Cache);
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);

        let (addr, _) = upstream(true).await;
        let f = Forwarder::new(vec![addr], Duration::from_secs(2), 0);
        let (a, _) = f
            .resolve(&name("big.example."), RecordType::A, DNSClass::IN)
            .await
            .unwrap();
        assert_eq!(a.answers.len(), 1, "the TCP answer is complete");
    }

    #[tokio::test]
    async fn an_unreachable_upstream_fails_within_the_timeout_and_the_next_one_answers() {
        // A bound socket that never answers.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let dead = silent.local_addr().unwrap();
        let f = Forwarder::new(vec![dead], Duration::from_millis(300), 10);
        let t = Instant::now();
        let e = f
            .resolve(&name("x.example."), RecordType::A, DNSClass::IN)
            .await
            .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2), "{e}");
        // A closed port is skipped at once; the second upstream answers.
        let closed = {
            let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            s.local_addr().unwrap()
        };
        let (good, _) = upstream(false).await;
        let f = Forwarder::new(vec![closed, good], Duration::from_secs(5), 10);
        let t = Instant::now();
        f.resolve(&name("y.example."), RecordType::A, DNSClass::IN)
            .await
            .unwrap();
        assert!(t.elapsed() < Duration::from_secs(2));
        let none = Forwarder::new(vec![], Duration::from_secs(1), 10);
        assert!(matches!(
            none.resolve(&name("y.example."), RecordType::A, DNSClass::IN)
                .await,
            Err(ForwardError::NoUpstreams)
        ));
    }
}
