//! The policy routing of UDP interception: packets carrying `proxy.udp.route_mark` are looked
//! up in `proxy.udp.route_table`, whose one route (`local default dev lo`) delivers them to
//! this host, where the proxy's transparent socket on the Service IP:port takes them. Found by its
//! mark and table, reconciled to exactly one rule and one route, removed with the chains.

use ipnet::IpNet;

use super::{hex_mark, run, IptablesError};

#[derive(Clone, Debug)]
pub(super) struct Policy {
    /// `-4` or `-6`.
    family: &'static str,
    pub(super) mark: u32,
    table: u32,
}

impl Policy {
    pub(super) fn new(service_cidr: IpNet, mark: u32, table: u32) -> Policy {
        Policy {
            family: if service_cidr.addr().is_ipv4() {
                "-4"
            } else {
                "-6"
            },
            mark,
            table,
        }
    }

    /// `ip rule` selector of our rule, as `ip rule show` prints it.
    fn selector(&self) -> String {
        format!("fwmark {} lookup {}", hex_mark(self.mark), self.table)
    }

    fn any(&self) -> &'static str {
        if self.family == "-4" {
            "0.0.0.0/0"
        } else {
            "::/0"
        }
    }

    /// How many copies of our rule, and of our route, are installed.
    pub(super) async fn count(&self) -> Result<(usize, usize), IptablesError> {
        let selector = self.selector();
        let rules = run("ip", &[self.family, "rule", "show"])
            .await?
            .lines()
            .filter(|l| l.trim_end().ends_with(&selector))
            .count();
        // A table that does not exist yet cannot be listed on its own: all of them are.
        let route = format!("local default dev lo table {} ", self.table);
        let routes = run("ip", &[self.family, "route", "show", "table", "all"])
            .await?
            .lines()
            .filter(|l| l.starts_with(&route))
            .count();
        Ok((rules, routes))
    }

    /// Brings rule and route to exactly one copy each; how many changes that took.
    pub(super) async fn reconcile(&self) -> Result<usize, IptablesError> {
        let (rules, routes) = self.count().await?;
        let mut changes = 0;
        let mark = hex_mark(self.mark);
        let table = self.table.to_string();
        if routes == 0 {
            run(
                "ip",
                &[
                    self.family,
                    "route",
                    "replace",
                    "local",
                    self.any(),
                    "dev",
                    "lo",
                    "table",
                    &table,
                ],
            )
            .await?;
            changes += 1;
        }
        let rule = [
            self.family,
            "rule",
            "add",
            "fwmark",
            &mark,
            "lookup",
            &table,
        ];
        if rules == 0 {
            run("ip", &rule).await?;
            changes += 1;
        }
        for _ in 1..rules {
            let mut del = rule;
            del[2] = "del";
            run("ip", &del).await?;
            changes += 1;
        }
        Ok(changes)
    }

    /// Removes every copy of our rule and the route of our table.
    pub(super) async fn cleanup(&self) -> Result<(), IptablesError> {
        let (rules, routes) = self.count().await?;
        let mark = hex_mark(self.mark);
        let table = self.table.to_string();
        for _ in 0..rules {
            run(
                "ip",
                &[
                    self.family,
                    "rule",
                    "del",
                    "fwmark",
                    &mark,
                    "lookup",
                    &table,
                ],
            )
            .await?;
        }
        if routes > 0 {
            run("ip", &[self.family, "route", "flush", "table", &table]).await?;
        }
        Ok(())
    }
}
