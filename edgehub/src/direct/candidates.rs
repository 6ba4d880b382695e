//! A node's direct-path candidates: the addresses a peer may try to reach its `direct.listen`
//! port at, best first — its interfaces' addresses (a LAN neighbour gets there directly; Linux
//! NAT does not hairpin, so two nodes behind one NAT meet only this way), the reflexive address
//! the cloud saw (its NAT's public side), and what the operator advertises.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::message::{Candidate, CandidateKind, MAX_CANDIDATES};

/// Whether a peer could ever reach `ip`: not unspecified, loopback, multicast, broadcast or
/// link-local (which needs an interface the peer cannot name).
pub fn reachable(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_link_local())
        }
        IpAddr::V6(v6) => {
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unicast_link_local())
        }
    }
}

/// The addresses of this host's interfaces that are up, minus those no peer could reach.
pub fn host_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free with freeifaddrs below; every
    // node is read only while the list is alive.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        let flags = ifa.ifa_flags as libc::c_int;
        if ifa.ifa_addr.is_null() || flags & libc::IFF_UP == 0 || flags & libc::IFF_LOOPBACK != 0 {
            continue;
        }
        // SAFETY: `ifa_addr` is non-null and points at a sockaddr whose family says its type.
        let ip = unsafe {
            match (*ifa.ifa_addr).sa_family as libc::c_int {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                        sin.sin_addr.s_addr,
                    ))))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                }
                _ => None,
            }
        };
        if let Some(ip) = ip.filter(|ip| reachable(*ip)) {
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

/// The candidates of a socket bound to `local`: host addresses (all of `host` of the socket's
/// family when it is bound to the unspecified address, else its own), then `reflexive`, then
/// `advertised`; each address once, at most [`MAX_CANDIDATES`].
pub fn gather(
    local: SocketAddr,
    host: &[IpAddr],
    reflexive: Option<SocketAddr>,
    advertised: &[SocketAddr],
) -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut push = |address: SocketAddr, kind: CandidateKind| {
        if out.len() < MAX_CANDIDATES && reachable(address.ip()) && seen.insert(address) {
            out.push(Candidate { address, kind });
        }
    };
    if local.ip().is_unspecified() {
        // An IPv6 socket on [::] also takes IPv4 (dual-stack, the Linux default).
        for ip in host
            .iter()
            .filter(|ip| ip.is_ipv4() == local.is_ipv4() || local.is_ipv6())
        {
            push(SocketAddr::new(*ip, local.port()), CandidateKind::Host);
        }
    } else {
        push(local, CandidateKind::Host);
    }
    if let Some(r) = reflexive {
        push(r, CandidateKind::Reflexive);
    }
    for a in advertised {
        push(*a, CandidateKind::Advertised);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn host_then_reflexive_then_advertised_each_once() {
        let host: Vec<IpAddr> = ["10.1.0.2", "192.168.5.1", "fd00::2"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        let c = gather(
            addr("0.0.0.0:10004"),
            &host,
            Some(addr("198.51.100.2:40000")),
            &[addr("203.0.113.7:10004"), addr("198.51.100.2:40000")],
        );
        let got: Vec<(String, CandidateKind)> =
            c.iter().map(|c| (c.address.to_string(), c.kind)).collect();
        assert_eq!(
            got,
            vec![
                ("10.1.0.2:10004".into(), CandidateKind::Host),
                ("192.168.5.1:10004".into(), CandidateKind::Host),
                ("198.51.100.2:40000".into(), CandidateKind::Reflexive),
                ("203.0.113.7:10004".into(), CandidateKind::Advertised),
            ]
        );
        // A node with a public address: its reflexive address is a host address already.
        let c = gather(
            addr("198.51.100.2:10004"),
            &host,
            Some(addr("198.51.100.2:10004")),
            &[],
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].kind, CandidateKind::Host);
        // A dual-stack socket offers both families.
        assert_eq!(gather(addr("[::]:10004"), &host, None, &[]).len(), 3);
        // Nothing a peer could not reach.
        let c = gather(
            addr("0.0.0.0:1"),
            &["169.254.1.1".parse().expect("ip")],
            None,
            &[addr("0.0.0.0:5")],
        );
        assert!(c.is_empty(), "{c:?}");
    }

    #[test]
    fn this_host_has_addresses_and_none_is_loopback() {
        let addrs = host_addresses().expect("getifaddrs");
        assert!(addrs.iter().all(|ip| reachable(*ip)), "{addrs:?}");
    }
}
