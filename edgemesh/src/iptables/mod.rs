//! The rules that send the service CIDR to the proxy (SPEC §4.1): TCP by `REDIRECT` in `nat`;
//! UDP by a `MARK` in `mangle` and one policy routing rule that delivers marked packets to this
//! host (see [`policy`]), where the proxy holds a transparent socket on each UDP Service
//! IP:port. (`TPROXY` is not used: on nodes with `br_netfilter`, the usual case behind a pod
//! bridge, its socket assignment is lost before the packet reaches the IP layer.)
//!
//! edgemesh owns two chains, `EDGEMESH-PREROUTING` (traffic from pods) and `EDGEMESH-OUTPUT`
//! (traffic of host processes), each reached by one jump from the built-in chain of the same
//! name. Inside them one `REDIRECT` covers the whole service CIDR, so the rule count does not
//! depend on how many Services exist. Everything else in the table belongs to someone else
//! (kube-proxy, the operator) and is never flushed or rewritten: the only rules touched outside
//! our chains are our own jumps, recognised by their exact text.
//!
//! [`Rules::reconcile`] compares what is installed with what should be and repairs only the
//! difference, so running it after a restart, after a crash, or on a timer converges to exactly
//! one copy of every rule.

use std::process::Stdio;
use std::time::Duration;

use ipnet::IpNet;
use thiserror::Error;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Comment on every rule edgemesh writes, so operators can tell them apart in `iptables-save`.
const COMMENT: &str = "edgemesh";
/// Longest time one iptables command may take (including waiting for the xtables lock).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum IptablesError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("`{command}` did not finish within {COMMAND_TIMEOUT:?}")]
    Timeout { command: String },
}

/// What [`Rules::count`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RuleCount {
    pub present: usize,
    pub expected: usize,
    /// Every rule in place exactly once, and nothing else in our chains.
    pub complete: bool,
}

mod policy;

/// One of our chains and the built-in chain that jumps to it.
struct OwnedChain {
    table: &'static str,
    name: &'static str,
    hook: &'static str,
}

const CHAINS: [OwnedChain; 4] = [
    OwnedChain {
        table: "nat",
        name: "EDGEMESH-PREROUTING",
        hook: "PREROUTING",
    },
    OwnedChain {
        table: "nat",
        name: "EDGEMESH-OUTPUT",
        hook: "OUTPUT",
    },
    // UDP: datagrams to the service CIDR from pods (PREROUTING) and from the host (OUTPUT)
    // are marked, so that the policy rule delivers them locally.
    OwnedChain {
        table: "mangle",
        name: "EDGEMESH-UDP-PREROUTING",
        hook: "PREROUTING",
    },
    OwnedChain {
        table: "mangle",
        name: "EDGEMESH-UDP-OUTPUT",
        hook: "OUTPUT",
    },
];

/// What edgemesh installs, for one address family.
#[derive(Clone, Debug)]
pub struct Rules {
    program: &'static str,
    service_cidr: IpNet,
    proxy_port: u16,
    mark: u32,
    policy: policy::Policy,
}

impl Rules {
    /// `route_mark` and `route_table`: `proxy.udp.route_mark` and `proxy.udp.route_table`.
    pub fn new(
        service_cidr: IpNet,
        proxy_port: u16,
        mark: u32,
        route_mark: u32,
        route_table: u32,
    ) -> Rules {
        let program = match service_cidr {
            IpNet::V4(_) => "iptables",
            IpNet::V6(_) => "ip6tables",
        };
        Rules {
            program,
            service_cidr,
            proxy_port,
            mark,
            policy: policy::Policy::new(service_cidr, route_mark, route_table),
        }
    }

    /// The jump from a built-in chain, as `iptables -S` prints it (minus `-A HOOK`).
    fn jump(&self, chain: &OwnedChain) -> Vec<String> {
        args(&["-m", "comment", "--comment", COMMENT, "-j", chain.name])
    }

    /// The rules of one of our chains, in order, as `iptables -S` prints them.
    fn chain_rules(&self, chain: &OwnedChain) -> Vec<Vec<String>> {
        let cidr = self.service_cidr.to_string();
        let route_mark = hex_mark(self.policy.mark);
        let capture = match chain.table {
            "mangle" => args(&[
                "-d",
                &cidr,
                "-p",
                "udp",
                "-m",
                "comment",
                "--comment",
                COMMENT,
                "-j",
                "MARK",
                "--set-xmark",
                &route_mark,
            ]),
            _ => self.redirect(),
        };
        if chain.hook == "OUTPUT" {
            // The agent's own upstream sockets carry the mark; never capture them again.
            // As `iptables -S` prints it, so that the comparison in `reconcile` holds: a full
            // mask is left out.
            let mark = if self.mark == u32::MAX {
                format!("{:#x}", self.mark)
            } else {
                format!("{:#x}/{:#x}", self.mark, self.mark)
            };
            let own = args(&[
                "-m",
                "mark",
                "--mark",
                &mark,
                "-m",
                "comment",
                "--comment",
                COMMENT,
                "-j",
                "RETURN",
            ]);
            vec![own, capture]
        } else {
            vec![capture]
        }
    }

    fn redirect(&self) -> Vec<String> {
        args(&[
            "-d",
            &self.service_cidr.to_string(),
            "-p",
            "tcp",
            "-m",
            "comment",
            "--comment",
            COMMENT,
            "-j",
            "REDIRECT",
            "--to-ports",
            &self.proxy_port.to_string(),
        ])
    }

    /// Brings the table to the desired state, touching only what differs. Returns how many
    /// changes were made (0 when everything was already in place).
    pub async fn reconcile(&self) -> Result<usize, IptablesError> {
        let mut changes = 0;
        for chain in &CHAINS {
            let have = match self.owned_chain(chain).await? {
                Some(rules) => rules,
                None => {
                    self.run(&["-t", chain.table, "-N", chain.name]).await?;
                    changes += 1;
                    Vec::new()
                }
            };
            let want = self.chain_rules(chain);
            if have != want {
                // Our own chain: rewrite it whole rather than patch it rule by rule.
                self.run(&["-t", chain.table, "-F", chain.name]).await?;
                for rule in &want {
                    let mut argv = vec!["-t", chain.table, "-A", chain.name];
                    argv.extend(rule.iter().map(String::as_str));
                    self.run(&argv).await?;
                }
                changes += 1;
            }
            let jump = self.jump(chain);
            let jumps = self.count_jumps(chain, &jump).await?;
            if jumps == 0 {
                // First in the chain, so a foreign rule cannot divert service traffic first.
                let mut argv = vec!["-t", chain.table, "-I", chain.hook, "1"];
                argv.extend(jump.iter().map(String::as_str));
                self.run(&argv).await?;
                changes += 1;
            }
            for _ in 1..jumps {
                self.delete_rule(chain, &jump).await?;
                changes += 1;
            }
        }
        changes += self.policy.reconcile().await?;
        Ok(changes)
    }

    /// Removes every rule and chain edgemesh made; leaves everything else alone. Safe to run
    /// when nothing is installed.
    pub async fn cleanup(&self) -> Result<(), IptablesError> {
        for chain in &CHAINS {
            let jump = self.jump(chain);
            let jumps = self.count_jumps(chain, &jump).await?;
            for _ in 0..jumps {
                self.delete_rule(chain, &jump).await?;
            }
        }
        for chain in &CHAINS {
            if self.owned_chain(chain).await?.is_some() {
                self.run(&["-t", chain.table, "-F", chain.name]).await?;
                self.run(&["-t", chain.table, "-X", chain.name]).await?;
            }
        }
        self.policy.cleanup().await
    }

    /// Whether every rule is in place exactly once (for `/readyz` and `edgemesh status`).
    pub async fn installed(&self) -> Result<bool, IptablesError> {
        for chain in &CHAINS {
            if self.owned_chain(chain).await? != Some(self.chain_rules(chain)) {
                return Ok(false);
            }
            let jump = self.jump(chain);
            let jumps = self.count_jumps(chain, &jump).await?;
            if jumps != 1 {
                return Ok(false);
            }
        }
        Ok(self.policy.count().await? == (1, 1))
    }

    /// Which of the rules that should be in place are (for `/readyz` and `edgemesh status`):
    /// the rules of our chains plus one jump into each.
    pub async fn count(&self) -> Result<RuleCount, IptablesError> {
        let mut count = RuleCount {
            present: 0,
            expected: 0,
            complete: true,
        };
        for chain in &CHAINS {
            let want = self.chain_rules(chain);
            let have = self.owned_chain(chain).await?.unwrap_or_default();
            let jumps = self.count_jumps(chain, &self.jump(chain)).await?;
            count.expected += want.len() + 1;
            count.present += want.iter().filter(|r| have.contains(r)).count() + jumps.min(1);
            count.complete &= have == want && jumps == 1;
        }
        let (rules, routes) = self.policy.count().await?;
        count.expected += 2;
        count.present += rules.min(1) + routes.min(1);
        count.complete &= (rules, routes) == (1, 1);
        Ok(count)
    }

    /// How many copies of our `jump` the built-in chain holds (more than one after a crash
    /// between two installs of an older version, or a hand-made copy).
    async fn count_jumps(
        &self,
        chain: &OwnedChain,
        jump: &[String],
    ) -> Result<usize, IptablesError> {
        Ok(self
            .rules_of(chain.table, chain.hook)
            .await?
            .iter()
            .filter(|r| r.as_slice() == jump)
            .count())
    }

    async fn delete_rule(&self, chain: &OwnedChain, rule: &[String]) -> Result<(), IptablesError> {
        let mut argv = vec!["-t", chain.table, "-D", chain.hook];
        argv.extend(rule.iter().map(String::as_str));
        self.run(&argv).await.map(drop)
    }

    /// The rules of one of our chains, or `None` when it does not exist. Only that chain is
    /// listed: the nat table of a kube-proxy node can hold tens of thousands of rules.
    async fn owned_chain(
        &self,
        chain: &OwnedChain,
    ) -> Result<Option<Vec<Vec<String>>>, IptablesError> {
        match self.rules_of(chain.table, chain.name).await {
            Ok(rules) => Ok(Some(rules)),
            // iptables' wording for a missing chain differs between its backends; if the
            // chain does exist after all, the `-N` that follows says so.
            Err(IptablesError::Failed { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The rules of `chain` as argument lists, without the leading `-A CHAIN`.
    async fn rules_of(&self, table: &str, chain: &str) -> Result<Vec<Vec<String>>, IptablesError> {
        let out = self.run(&["-t", table, "-S", chain]).await?;
        let prefix = format!("-A {chain} ");
        Ok(out
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(split_rule)
            .collect())
    }

    async fn run(&self, argv: &[&str]) -> Result<String, IptablesError> {
        let mut full = vec!["-w", "5"];
        full.extend_from_slice(argv);
        run(self.program, &full).await
    }

    /// Keeps the rules in place until `shutdown`, then removes them. A rule deleted by hand is
    /// back within one `interval`.
    pub async fn keep_installed(self, interval: Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            match self.reconcile().await {
                Ok(0) => {}
                Ok(n) => {
                    metrics::counter!("edgemesh_iptables_repairs_total").increment(n as u64);
                    warn!(
                        changes = n,
                        "iptables rules were missing or changed; repaired"
                    );
                }
                Err(e) => warn!(error = %e, "iptables reconcile failed"),
            }
        }
        match self.cleanup().await {
            Ok(()) => info!("iptables rules removed"),
            Err(e) => warn!(error = %e, "iptables cleanup failed; run `edgemesh cleanup`"),
        }
    }
}

/// Runs `program` (iptables, ip) with `argv`, within [`COMMAND_TIMEOUT`]; its stdout.
async fn run(program: &'static str, argv: &[&str]) -> Result<String, IptablesError> {
    let command = format!("{program} {}", argv.join(" "));
    debug!(%command, "run");
    let child = Command::new(program)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| IptablesError::Spawn { program, source })?;
    let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| IptablesError::Timeout {
            command: command.clone(),
        })?
        .map_err(|source| IptablesError::Spawn { program, source })?;
    if !out.status.success() {
        return Err(IptablesError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `edgemesh cleanup`: removes edgemesh's rules of both address families. Our rules are found
/// by chain name and comment, so this works whatever `service_cidr` and `proxy.port` were; the
/// UDP policy routing rule by `udp`'s `route_mark` and `route_table` (the agent's config).
pub async fn cleanup_all(udp: &crate::proxy::UdpConfig) -> anyhow::Result<()> {
    let mut removed_any = false;
    for cidr in ["10.96.0.0/12", "fd00::/108"] {
        let rules = Rules::new(
            cidr.parse().unwrap_or_else(|_| unreachable!()),
            1,
            1,
            udp.route_mark,
            udp.route_table,
        );
        match rules.cleanup().await {
            Ok(()) => removed_any = true,
            // A machine without IPv6 netfilter has nothing of ours to remove there.
            Err(e) if rules.program == "ip6tables" => {
                debug!(error = %e, "ip6tables cleanup skipped")
            }
            Err(e) => return Err(e.into()),
        }
    }
    if removed_any {
        println!("edgemesh iptables rules removed");
    }
    Ok(())
}

/// A mark with itself as mask, as `iptables -S` and `ip rule` print it.
fn hex_mark(mark: u32) -> String {
    format!("{mark:#x}/{mark:#x}")
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Splits one line of `iptables -S` into arguments. Comments with spaces come back quoted.
fn split_rule(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_compare_with_what_iptables_prints() {
        let r = Rules::new(
            "10.96.0.0/12".parse().expect("cidr"),
            40001,
            0x1e5,
            0x10000,
            485,
        );
        let printed =
            "-d 10.96.0.0/12 -p tcp -m comment --comment edgemesh -j REDIRECT --to-ports 40001";
        assert_eq!(vec![split_rule(printed)], r.chain_rules(&CHAINS[0]));
        let out = r.chain_rules(&CHAINS[1]);
        assert_eq!(
            out[0],
            split_rule("-m mark --mark 0x1e5/0x1e5 -m comment --comment edgemesh -j RETURN")
        );
        assert_eq!(
            split_rule(r#"-m comment --comment "two words" -j X"#),
            vec!["-m", "comment", "--comment", "two words", "-j", "X"]
        );
        assert_eq!(
            r.chain_rules(&CHAINS[2]),
            vec![split_rule(
                "-d 10.96.0.0/12 -p udp -m comment --comment edgemesh -j MARK \
                 --set-xmark 0x10000/0x10000"
            )]
        );
        assert_eq!(
            r.chain_rules(&CHAINS[3])[1],
            split_rule(
                "-d 10.96.0.0/12 -p udp -m comment --comment edgemesh -j MARK \
                 --set-xmark 0x10000/0x10000"
            )
        );
        assert_eq!(
            Rules::new("fd00::/108".parse().expect("v6"), 1, 1, 2, 3).program,
            "ip6tables"
        );
    }
}
