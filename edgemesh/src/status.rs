//! `edgemesh status`: what the running agent says, or, when it is not running, what its store
//! holds (read-only: status never creates, migrates or repairs a store).

use std::time::Duration;

use axum::http::Method;
use edgehub::http_client;
use edgehub::metamanager::{MetaManager, DB_FILE};
use serde_json::Value;

use crate::config::Config;

fn ago(ms: Option<i64>) -> String {
    let Some(ms) = ms else { return "-".into() };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let secs = (now - ms).max(0) / 1000;
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

/// A JSON document from the admin API, `Null` when it has none (the proxy is off) or a 503
/// (`/readyz` of a node that is not ready still has a body).
async fn admin_json(cfg: &Config, path: &str) -> Value {
    let url = format!("http://{}{path}", cfg.admin.listen);
    match http_client::request(Method::GET, &url, None, None, None, Duration::from_secs(5)).await {
        Ok(r) if r.status == 200 || r.status == 503 => {
            serde_json::from_slice(&r.body).unwrap_or(Value::Null)
        }
        _ => Value::Null,
    }
}

pub async fn run(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let url = format!("http://{}/debug/sync", cfg.admin.listen);
    match http_client::request(Method::GET, &url, None, None, None, Duration::from_secs(5)).await {
        Ok(resp) if resp.status == 200 => {
            let mut v: Value = serde_json::from_slice(&resp.body)?;
            v["proxy"] = admin_json(cfg, "/debug/proxy").await;
            v["readiness"] = admin_json(cfg, "/readyz").await;
            v["direct"] = admin_json(cfg, "/debug/direct").await;
            v["running"] = Value::Bool(true);
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_running(&v);
            }
            Ok(())
        }
        Ok(resp) => anyhow::bail!("admin API at {url} answered HTTP {}", resp.status),
        Err(e) => print_stopped(cfg, json, &e.to_string()),
    }
}

/// The agent does not answer: what its store holds, read without writing anything. No store
/// is an error: there is nothing to report, and creating one here would hide that the
/// configured `data_dir` is not where the agent keeps it.
fn print_stopped(cfg: &Config, json: bool, why: &str) -> anyhow::Result<()> {
    let path = cfg.data_dir.join(DB_FILE);
    let node = if cfg.node_name.is_empty() {
        "- (node_name is not set)"
    } else {
        cfg.node_name.as_str()
    };
    eprintln!(
        "edgemesh is not running (admin API {}: {why}); reading its store instead",
        cfg.admin.listen
    );
    let Some(meta) = MetaManager::open_existing_read_only(&path)? else {
        anyhow::bail!(
            "no store at {}: no agent has run with data_dir = {:?} yet (give the agent's \
             --config or --data-dir)",
            path.display(),
            cfg.data_dir.display().to_string()
        );
    };
    let view = meta.view();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "running": false, "nodeName": cfg.node_name,
                "store": {
                    "path": path.display().to_string(), "storeId": view.store_id,
                    "version": view.version, "services": view.services.len(),
                    "endpoints": view.endpoints.len(), "nodes": view.nodes.len(),
                },
            })
        );
    } else {
        println!("node:        {node}");
        println!("agent:       not running");
        println!(
            "version:     {} (store {})",
            view.version,
            view.store_id.as_deref().unwrap_or("-")
        );
        println!(
            "objects:     {} services, {} endpoints, {} nodes",
            view.services.len(),
            view.endpoints.len(),
            view.nodes.len()
        );
        println!("store:       {}", path.display());
    }
    Ok(())
}

fn print_running(v: &Value) {
    let s = &v["status"];
    let st = &v["store"];
    let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let connection = if s["connected"].as_bool() == Some(true) {
        format!(
            "connected to {} since {}{}",
            text(&s["cloudUrl"]),
            ago(s["connectedSinceMs"].as_i64()),
            if s["synced"].as_bool() == Some(true) {
                ", synced"
            } else {
                ", syncing"
            }
        )
    } else {
        format!("disconnected (last error: {})", text(&s["lastError"]))
    };
    let r = &v["readiness"];
    let ready = match r["ready"].as_bool() {
        Some(true) => "ready".to_string(),
        Some(false) => {
            let failed: Vec<String> = r["failed"]
                .as_array()
                .map(|f| f.iter().map(text).collect())
                .unwrap_or_default();
            let details: Vec<String> = failed
                .iter()
                .map(|name| format!("{name}: {}", text(&r["checks"][name]["detail"])))
                .collect();
            format!("NOT READY ({})", details.join("; "))
        }
        None => "readiness unknown".to_string(),
    };
    println!("node:        {}", text(&s["nodeName"]));
    println!(
        "agent:       edgemesh {}, {ready}",
        text(&v["agentVersion"])
    );
    println!("cloud:       {connection}");
    println!(
        "version:     {} (store {})",
        st["version"],
        text(&st["storeId"])
    );
    if let Some(ls) = s.get("lastSync").filter(|l| !l.is_null()) {
        println!(
            "last sync:   {} of {} (version {} -> {}) {}",
            text(&ls["mode"]),
            ls["count"],
            ls["fromVersion"],
            ls["toVersion"],
            ago(ls["atMs"].as_i64())
        );
    }
    println!(
        "objects:     {} services, {} endpoints, {} nodes",
        st["services"], st["endpoints"], st["nodes"]
    );
    println!(
        "hub:         {} connects, {} changes applied, {} snapshots, {} deltas, acked {}",
        s["connects"], s["changesApplied"], s["snapshots"], s["deltas"], s["ackedVersion"]
    );
    println!("store:       {}", text(&st["path"]));
    let r = &st["recovery"];
    if r.is_object() {
        println!(
            "recovered:   {} the store was corrupt ({}); moved to {}, {}",
            ago(r["atMs"].as_i64()),
            text(&r["reason"]),
            text(&r["movedTo"]),
            if r["resynced"] == true {
                "resynced from the cloud"
            } else {
                "waiting for the cloud's snapshot"
            }
        );
    }
    match v["dns"].as_str() {
        Some(addr) => println!("dns:         listening on {addr}"),
        None => println!("dns:         off (dns.enabled = false)"),
    }
    let p = &v["proxy"];
    if p.is_object() {
        let ejected = p["ejected"].as_array().map_or(0, Vec::len);
        println!(
            "proxy:       listening on {}, {} routes, {} UDP routes, {} endpoints ejected",
            text(&p["listen"]),
            p["routes"],
            p["udpRoutes"].as_u64().unwrap_or(0),
            ejected
        );
        let rules = &p["iptablesRules"];
        if rules.is_object() {
            println!(
                "iptables:    {} ({} of {} rules)",
                text(&p["iptables"]),
                rules["present"],
                rules["expected"]
            );
        } else {
            println!("iptables:    {}", text(&p["iptables"]));
        }
        let t = &p["tunnel"];
        if t.is_object() {
            let link = if t["linkUp"] == true {
                "up"
            } else {
                "down (cloud unreachable)"
            };
            println!("tunnel:      {link}, {} streams open", t["openStreams"]);
        }
    } else {
        println!("proxy:       not running");
    }
    print_paths(&v["direct"]);
}

/// One line per peer: the path its calls take, the candidate in use, RTT, bytes, streams.
fn print_paths(d: &Value) {
    let Some(paths) = d["paths"].as_array() else {
        return;
    };
    let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let direct = paths.iter().filter(|p| p["path"] == "direct").count();
    println!(
        "direct:      {} (certificate {}), {direct} of {} peers on a direct path",
        match d["listen"].as_str() {
            Some(l) => format!("UDP {l}"),
            None => "off".to_string(),
        },
        if d["certificate"].is_object() {
            "held"
        } else {
            "missing"
        },
        paths.len()
    );
    for p in paths {
        let rtt = p["rttMs"]
            .as_f64()
            .map_or("-".to_string(), |r| format!("{r:.2} ms"));
        let detail = if p["path"] == "direct" {
            format!(
                "via {} rtt {rtt}, {} streams, {} B out / {} B in",
                text(&p["candidate"]),
                p["streams"],
                p["txBytes"],
                p["rxBytes"]
            )
        } else {
            match p["lastError"].as_str() {
                Some(e) => format!("no direct path ({} failed rounds): {e}", p["failedRounds"]),
                None => "no direct path yet".to_string(),
            }
        };
        println!(
            "  {:<24} {:<6} {detail}",
            text(&p["peer"]),
            text(&p["path"])
        );
    }
}
