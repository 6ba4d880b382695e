//! The reflexive-address service: a node sends a small authenticated UDP probe to cloudcore's
//! `direct.listen`, which answers with the source address it saw (what the node's NAT maps its
//! direct-path port to), like a STUN binding request.
//!
//! It must not become an open reflector: a probe carries the node's name and an HMAC-SHA256
//! under a key the hub handed that node over its authenticated link, a timestamp in the cloud's
//! clock (±[`MAX_SKEW_MS`]) and a nonce that is answered once. The answer is never larger than
//! the probe (probes are padded to [`PROBE_LEN`]), so even a replayed probe from a spoofed
//! address cannot amplify. The answer is authenticated with the same key, so a node takes no
//! address from anyone but the cloud.
//!
//! ```text
//! probe:  "EMP1" | name_len u8 | name | nonce[16] | time_ms i64 BE | zero padding | hmac[32]
//! answer: "EMA1" | nonce[16] | family u8 (4|6) | port u16 BE | ip[4|16] | hmac[32]
//! ```

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ring::hmac;
use tokio::net::UdpSocket;

const PROBE_MAGIC: &[u8; 4] = b"EMP1";
pub(crate) const ANSWER_MAGIC: &[u8; 4] = b"EMA1";
/// The longest answer: magic, nonce, family, port, an IPv6 address, tag.
pub(crate) const MAX_ANSWER_LEN: usize = 4 + NONCE_LEN + 1 + 2 + 16 + TAG_LEN;
const TAG_LEN: usize = 32;
const NONCE_LEN: usize = 16;
/// Every probe is padded to this many bytes: more than the largest answer (72 bytes).
pub const PROBE_LEN: usize = 320;
/// How far a probe's time may be from the cloud's clock.
pub const MAX_SKEW_MS: i64 = 30_000;
/// Nonces remembered to refuse replays (a probe is valid for 2 × [`MAX_SKEW_MS`]).
const REPLAY_MEMORY: usize = 1 << 16;

/// A node's probe key: HMAC-SHA256 of the node name under the responder's secret. The hub
/// hands it to the node over the authenticated link; the responder derives it again.
pub fn node_key(secret: &[u8], node: &str) -> Vec<u8> {
    let k = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::sign(
        &k,
        format!("edgemesh reflexive probe v1\0{node}").as_bytes(),
    )
    .as_ref()
    .to_vec()
}

fn tag(key: &[u8], data: &[u8]) -> hmac::Tag {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
}

fn tag_ok(key: &[u8], data: &[u8], t: &[u8]) -> bool {
    hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, key), data, t).is_ok()
}

/// A probe from `node`.
pub fn probe(node: &str, key: &[u8], nonce: [u8; NONCE_LEN], time_ms: i64) -> Vec<u8> {
    let name = node.as_bytes();
    let mut p = Vec::with_capacity(PROBE_LEN);
    p.extend_from_slice(PROBE_MAGIC);
    p.push(name.len().min(255) as u8);
    p.extend_from_slice(&name[..name.len().min(255)]);
    p.extend_from_slice(&nonce);
    p.extend_from_slice(&time_ms.to_be_bytes());
    p.resize(PROBE_LEN - TAG_LEN, 0);
    let t = tag(key, &p);
    p.extend_from_slice(t.as_ref());
    p
}

/// A probe's fields (not yet authenticated).
struct Probe<'a> {
    node: &'a str,
    nonce: [u8; NONCE_LEN],
    time_ms: i64,
    signed: &'a [u8],
    tag: &'a [u8],
}

fn parse_probe(buf: &[u8]) -> Option<Probe<'_>> {
    if buf.len() != PROBE_LEN || &buf[..4] != PROBE_MAGIC {
        return None;
    }
    let n = buf[4] as usize;
    let name_end = 5 + n;
    let nonce_end = name_end + NONCE_LEN;
    let time_end = nonce_end + 8;
    if n == 0 || time_end > PROBE_LEN - TAG_LEN {
        return None;
    }
    let node = std::str::from_utf8(&buf[5..name_end])
        .ok()
        .filter(|n| crate::model::is_dns1123_subdomain(n))?;
    Some(Probe {
        node,
        nonce: buf[name_end..nonce_end].try_into().ok()?,
        time_ms: i64::from_be_bytes(buf[nonce_end..time_end].try_into().ok()?),
        signed: &buf[..PROBE_LEN - TAG_LEN],
        tag: &buf[PROBE_LEN - TAG_LEN..],
    })
}

/// The answer to a probe with `nonce`, telling `seen`.
pub fn answer(key: &[u8], nonce: &[u8; NONCE_LEN], seen: SocketAddr) -> Vec<u8> {
    let mut a = Vec::with_capacity(72);
    a.extend_from_slice(ANSWER_MAGIC);
    a.extend_from_slice(nonce);
    match seen.ip().to_canonical() {
        IpAddr::V4(ip) => {
            a.push(4);
            a.extend_from_slice(&seen.port().to_be_bytes());
            a.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            a.push(6);
            a.extend_from_slice(&seen.port().to_be_bytes());
            a.extend_from_slice(&ip.octets());
        }
    }
    let t = tag(key, &a);
    a.extend_from_slice(t.as_ref());
    a
}

/// The address an answer to the probe with `nonce` tells, if it is one, authentic.
pub fn parse_answer(key: &[u8], nonce: &[u8; NONCE_LEN], buf: &[u8]) -> Option<SocketAddr> {
    if buf.len() < 4 + NONCE_LEN + 3 + TAG_LEN || &buf[..4] != ANSWER_MAGIC {
        return None;
    }
    let (body, t) = buf.split_at(buf.len() - TAG_LEN);
    if &body[4..4 + NONCE_LEN] != nonce || !tag_ok(key, body, t) {
        return None;
    }
    let rest = &body[4 + NONCE_LEN..];
    let port = u16::from_be_bytes([rest[1], rest[2]]);
    let ip: IpAddr = match (rest[0], &rest[3..]) {
        (4, ip) if ip.len() == 4 => Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).into(),
        (6, ip) if ip.len() == 16 => Ipv6Addr::from(<[u8; 16]>::try_from(ip).ok()?).into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Why the responder did not answer a datagram (each is counted, none is logged per packet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a probe of this protocol.
    Malformed,
    /// A node that has no token (unknown, deleted, revoked).
    UnknownNode,
    /// Not signed with that node's key.
    BadTag,
    /// Its time is too far from the cloud's clock.
    Stale,
    /// Its nonce was answered already.
    Replayed,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::UnknownNode => "unknown-node",
            Refusal::BadTag => "bad-tag",
            Refusal::Stale => "stale",
            Refusal::Replayed => "replayed",
        }
    }
}

/// The responder's state: its secret and the nonces it answered recently.
pub struct Responder {
    secret: [u8; 32],
    seen: HashMap<[u8; NONCE_LEN], i64>,
    order: VecDeque<[u8; NONCE_LEN]>,
}

impl Responder {
    /// A responder with a fresh random secret: keys handed out before a restart stop working,
    /// and nodes ask for new ones when they reconnect.
    pub fn new() -> Responder {
        Responder::with_secret(rand::random())
    }

    pub fn with_secret(secret: [u8; 32]) -> Responder {
        Responder {
            secret,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The key the hub hands `node`.
    pub fn key_for(&self, node: &str) -> Vec<u8> {
        node_key(&self.secret, node)
    }

    /// The answer to `datagram` from `from`, or why there is none. `known(node)` says whether
    /// the node may use the service.
    pub fn respond(
        &mut self,
        datagram: &[u8],
        from: SocketAddr,
        now_ms: i64,
        known: impl Fn(&str) -> bool,
    ) -> Result<Vec<u8>, Refusal> {
        let p = parse_probe(datagram).ok_or(Refusal::Malformed)?;
        if !known(p.node) {
            return Err(Refusal::UnknownNode);
        }
        let key = self.key_for(p.node);
        if !tag_ok(&key, p.signed, p.tag) {
            return Err(Refusal::BadTag);
        }
        if (p.time_ms - now_ms).abs() > MAX_SKEW_MS {
            return Err(Refusal::Stale);
        }
        // Forget nonces whose probes are too old to pass the time check anyway.
        while let Some(old) = self.order.front() {
            let expired = self
                .seen
                .get(old)
                .is_none_or(|t| now_ms - t > 2 * MAX_SKEW_MS);
            if !expired && self.order.len() < REPLAY_MEMORY {
                break;
            }
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        if self.seen.contains_key(&p.nonce) {
            return Err(Refusal::Replayed);
        }
        self.seen.insert(p.nonce, now_ms);
        self.order.push_back(p.nonce);
        let a = answer(&key, &p.nonce, from);
        debug_assert!(a.len() <= datagram.len());
        Ok(a)
    }
}

impl Default for Responder {
    fn default() -> Self {
        Responder::new()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReflectError {
    #[error("probe to {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    #[error("no answer from {reflector} after {tries} probes")]
    NoAnswer { reflector: SocketAddr, tries: u32 },
}

/// Where probes leave from and answers arrive: a plain UDP socket, or the direct-path socket's
/// probe port ([`super::socket::ProbePort`]), whose answers quinn passes over.
pub trait ProbeIo: Send + Sync {
    fn send_to(
        &self,
        buf: &[u8],
        to: SocketAddr,
    ) -> impl std::future::Future<Output = std::io::Result<usize>> + Send;
    fn recv_from(
        &self,
        buf: &mut [u8],
    ) -> impl std::future::Future<Output = std::io::Result<(usize, SocketAddr)>> + Send;
}

impl ProbeIo for UdpSocket {
    async fn send_to(&self, buf: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        UdpSocket::send_to(self, buf, to).await
    }

    async fn recv_from(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        UdpSocket::recv_from(self, buf).await
    }
}

/// Learns the reflexive address of `socket` (its address as `reflector` sees it) by probing
/// `tries` times, waiting 250 ms, 500 ms, 1 s, ... for an authentic answer. `cloud_offset_ms`
/// is the cloud's clock minus this node's. Datagrams from elsewhere, or answers to other
/// probes, are ignored.
pub async fn learn_reflexive(
    socket: &impl ProbeIo,
    reflector: SocketAddr,
    node: &str,
    key: &[u8],
    cloud_offset_ms: i64,
    tries: u32,
) -> Result<SocketAddr, ReflectError> {
    let mut wait = Duration::from_millis(250);
    let mut buf = [0u8; 512];
    for _ in 0..tries {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let now = crate::direct::now_ms() + cloud_offset_ms;
        socket
            .send_to(&probe(node, key, nonce, now), reflector)
            .await
            .map_err(|e| ReflectError::Io(reflector, e))?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let received = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await;
            let Ok(received) = received else { break };
            let (n, from) = received.map_err(|e| ReflectError::Io(reflector, e))?;
            if from != reflector {
                continue;
            }
            if let Some(addr) = parse_answer(key, &nonce, &buf[..n]) {
                return Ok(addr);
            }
        }
        wait = (wait * 2).min(Duration::from_secs(4));
    }
    Err(ReflectError::NoAnswer { reflector, tries })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn a_probe_is_answered_once_with_what_was_seen_and_no_larger() {
        let mut r = Responder::with_secret([7; 32]);
        let key = r.key_for("edge-1");
        let nonce = [1; 16];
        let p = probe("edge-1", &key, nonce, NOW + 1000);
        assert_eq!(p.len(), PROBE_LEN);
        for seen in ["198.51.100.2:40000", "[2001:db8::1]:40000"] {
            let seen: SocketAddr = seen.parse().expect("addr");
            let mut r = Responder::with_secret([7; 32]);
            let a = r
                .respond(&p, seen, NOW, |n| n == "edge-1")
                .expect("answered");
            assert!(a.len() <= p.len(), "{} > {}", a.len(), p.len());
            assert_eq!(parse_answer(&key, &nonce, &a), Some(seen));
            // Not with another nonce, not with another key, not when tampered with.
            assert_eq!(parse_answer(&key, &[2; 16], &a), None);
            assert_eq!(parse_answer(&r.key_for("edge-2"), &nonce, &a), None);
            let mut t = a.clone();
            t[22] ^= 1;
            assert_eq!(parse_answer(&key, &nonce, &t), None);
        }
        let seen: SocketAddr = "198.51.100.2:40000".parse().expect("addr");
        r.respond(&p, seen, NOW, |_| true).expect("first");
        assert_eq!(r.respond(&p, seen, NOW, |_| true), Err(Refusal::Replayed));
    }

    #[test]
    fn probes_that_are_not_authentic_fresh_or_from_a_known_node_get_nothing() {
        let mut r = Responder::with_secret([7; 32]);
        let from: SocketAddr = "198.51.100.9:1".parse().expect("addr");
        let key = r.key_for("edge-1");
        let known = |n: &str| n == "edge-1";
        // Another node's key, an unknown node, a stale or future time, garbage, short input.
        let other = probe("edge-1", &r.key_for("edge-2"), [1; 16], NOW);
        assert_eq!(r.respond(&other, from, NOW, known), Err(Refusal::BadTag));
        let unknown = probe("ghost", &r.key_for("ghost"), [2; 16], NOW);
        assert_eq!(
            r.respond(&unknown, from, NOW, known),
            Err(Refusal::UnknownNode)
        );
        let stale = probe("edge-1", &key, [3; 16], NOW - MAX_SKEW_MS - 1);
        assert_eq!(r.respond(&stale, from, NOW, known), Err(Refusal::Stale));
        let future = probe("edge-1", &key, [4; 16], NOW + MAX_SKEW_MS + 1);
        assert_eq!(r.respond(&future, from, NOW, known), Err(Refusal::Stale));
        let mut tampered = probe("edge-1", &key, [5; 16], NOW);
        tampered[100] = 1;
        assert_eq!(r.respond(&tampered, from, NOW, known), Err(Refusal::BadTag));
        for junk in [&b""[..], b"EMP1", &[0u8; PROBE_LEN], &[0xff; 4096]] {
            assert_eq!(r.respond(junk, from, NOW, known), Err(Refusal::Malformed));
        }
        let mut short_name = probe("edge-1", &key, [6; 16], NOW);
        short_name[4] = 0;
        assert_eq!(
            r.respond(&short_name, from, NOW, known),
            Err(Refusal::Malformed)
        );
        let mut long_name = probe("edge-1", &key, [6; 16], NOW);
        long_name[4] = 255;
        assert_eq!(
            r.respond(&long_name, from, NOW, known),
            Err(Refusal::Malformed)
        );
    }

    #[test]
    fn old_nonces_are_forgotten_but_stay_refused_while_their_probe_is_valid() {
        let mut r = Responder::with_secret([7; 32]);
        let key = r.key_for("n");
        let from: SocketAddr = "198.51.100.9:1".parse().expect("addr");
        let p = probe("n", &key, [9; 16], NOW);
        r.respond(&p, from, NOW, |_| true).expect("first");
        assert_eq!(
            r.respond(&p, from, NOW + MAX_SKEW_MS, |_| true),
            Err(Refusal::Replayed)
        );
        let later = probe("n", &key, [10; 16], NOW + 3 * MAX_SKEW_MS);
        r.respond(&later, from, NOW + 3 * MAX_SKEW_MS, |_| true)
            .expect("later");
        assert_eq!(r.order.len(), 1, "the expired nonce was dropped");
    }

    #[tokio::test]
    async fn a_node_learns_its_address_over_udp_and_ignores_strangers() {
        let reflector = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let stranger = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let node = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let raddr = reflector.local_addr().expect("addr");
        let naddr = node.local_addr().expect("addr");
        let mut responder = Responder::with_secret([3; 32]);
        let key = responder.key_for("edge-1");
        let serve = tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            // Drop the first probe (a lost packet), answer the second; a stranger's forged
            // answer arrives first.
            let _ = reflector.recv_from(&mut buf).await.expect("first probe");
            let (n, from) = reflector.recv_from(&mut buf).await.expect("second probe");
            let fake = answer(&[0; 32], &[0; 16], "203.0.113.1:1".parse().expect("addr"));
            stranger.send_to(&fake, from).await.expect("send");
            let a = responder
                .respond(&buf[..n], from, super::super::now_ms(), |n| n == "edge-1")
                .expect("answer");
            reflector.send_to(&a, from).await.expect("send");
        });
        let seen = learn_reflexive(&node, raddr, "edge-1", &key, 0, 4)
            .await
            .expect("learned");
        assert_eq!(seen, naddr);
        serve.await.expect("server");
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let e = learn_reflexive(
            &node,
            silent.local_addr().expect("addr"),
            "edge-1",
            &key,
            0,
            2,
        )
        .await
        .expect_err("no answer");
        assert!(matches!(e, ReflectError::NoAnswer { tries: 2, .. }), "{e}");
    }
}
