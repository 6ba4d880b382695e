//! `edgemesh status`: what the running agent says, or, when it is not running, what its store
//! holds.

use std::time::Duration;

use axum::http::Method;
use edgehub::http_client;
use edgehub::metamanager::MetaManager;
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

pub async fn run(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let url = format!("http://{}/debug/sync", cfg.admin.listen);
    match http_client::request(Method::GET, &url, None, None, None, Duration::from_secs(5)).await {
        Ok(resp) if resp.status == 200 => {
            let mut v: Value = serde_json::from_slice(&resp.body)?;
            let proxy_url = format!("http://{}/debug/proxy", cfg.admin.listen);
            let proxy = match http_client::request(
                Method::GET,
                &proxy_url,
                None,
                None,
                None,
                Duration::from_secs(5),
            )
            .await
            {
                Ok(r) if r.status == 200 => serde_json::from_slice(&r.body).unwrap_or(Value::Null),
                _ => Value::Null,
            };
            v["proxy"] = proxy;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_running(&v);
            }
            Ok(())
        }
        Ok(resp) => anyhow::bail!("admin API at {url} answered HTTP {}", resp.status),
        Err(e) => {
            eprintln!("edgemesh is not running ({e}); reading its store instead");
            let meta = MetaManager::open(&cfg.data_dir)?;
            let view = meta.view();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "running": false, "storeId": view.store_id, "version": view.version,
                        "services": view.services.len(), "endpoints": view.endpoints.len(), "nodes": view.nodes.len(),
                    })
                );
            } else {
                println!("node:        {}", cfg.node_name);
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
            }
            Ok(())
        }
    }
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
    println!("node:        {}", text(&s["nodeName"]));
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
    let p = &v["proxy"];
    if p.is_object() {
        let ejected = p["ejected"].as_array().map_or(0, Vec::len);
        println!(
            "proxy:       listening on {}, {} routes, {} endpoints ejected",
            text(&p["listen"]),
            p["routes"],
            ejected
        );
        println!("iptables:    {}", text(&p["iptables"]));
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
}
