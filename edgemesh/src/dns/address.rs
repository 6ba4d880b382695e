//! Making `dns.listen` an address of the node, the way node-local DNS caches do: when the
//! address is not on the node, it is added to `lo` as a /32 (/128) with the label
//! `lo:edgemesh`, and removed again when the agent stops. The label marks the address as the
//! agent's, so one left behind by a crash is recognised (and reused, then removed) on the next
//! start, and an address the operator configured is never touched.

use std::net::IpAddr;
use std::process::Command;

use super::config::is_local;

/// Label of the IPv4 address the agent adds (IPv6 addresses have no labels).
pub const LABEL: &str = "lo:edgemesh";

#[derive(Debug, thiserror::Error)]
#[error("cannot add {ip} to lo: {reason}")]
pub struct AddressError {
    ip: IpAddr,
    reason: String,
}

/// An address the agent put on `lo`; [`ManagedAddress::remove`] takes it away again, and so
/// does dropping it (when the agent stops on an error before the DNS task could finish).
#[derive(Debug)]
pub struct ManagedAddress {
    ip: IpAddr,
    armed: bool,
}

fn prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    }
}

fn ip_cmd(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether `ip` is on `lo` with the agent's label (left by an earlier run).
fn labelled(ip: IpAddr) -> bool {
    if !ip.is_ipv4() {
        return false;
    }
    let Ok(out) = ip_cmd(&["-o", "-4", "addr", "show", "dev", "lo", "label", LABEL]) else {
        return false;
    };
    let needle = format!("inet {} ", prefix(ip));
    out.lines().any(|l| l.contains(&needle))
}

/// Makes `ip` an address of the node. Returns `None` when there is nothing to manage: the
/// address is unspecified, loopback, or already the node's (and not the agent's).
pub fn ensure(ip: IpAddr) -> Result<Option<ManagedAddress>, AddressError> {
    if ip.is_unspecified() || ip.is_loopback() {
        return Ok(None);
    }
    if labelled(ip) {
        return Ok(Some(ManagedAddress { ip, armed: true }));
    }
    if is_local(ip) {
        return Ok(None);
    }
    let p = prefix(ip);
    let mut args = vec!["addr", "add", p.as_str(), "dev", "lo"];
    if ip.is_ipv4() {
        args.extend(["label", LABEL]);
    } else {
        // No duplicate address detection: the address is ours alone, and usable at once.
        args.push("nodad");
    }
    ip_cmd(&args).map_err(|reason| AddressError { ip, reason })?;
    Ok(Some(ManagedAddress { ip, armed: true }))
}

impl ManagedAddress {
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Takes the address off `lo`.
    pub fn remove(mut self) -> Result<(), String> {
        self.armed = false;
        ip_cmd(&["addr", "del", &prefix(self.ip), "dev", "lo"]).map(|_| ())
    }
}

impl Drop for ManagedAddress {
    fn drop(&mut self) {
        if self.armed {
            let _ = ip_cmd(&["addr", "del", &prefix(self.ip), "dev", "lo"]);
        }
    }
}

/// Removes the address the agent added for `ip`, if it is there (for `edgemesh cleanup`).
pub fn cleanup(ip: IpAddr) -> Result<bool, String> {
    if !labelled(ip) {
        return Ok(false);
    }
    ManagedAddress { ip, armed: true }.remove().map(|_| true)
}
