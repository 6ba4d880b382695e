//! `get`'s tables: one header line, columns padded, like kubectl.

use serde_json::{Map, Value};

use super::kinds::ResourceKind;

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `ns/name:port/path`, `/path` or the URL: what a rule's resource points at.
pub fn resource_summary(r: &Value) -> String {
    let Some(m) = r.as_object() else {
        return s(r);
    };
    if let Some(url) = m.get("url") {
        return s(url);
    }
    let path = m.get("path").map(s).unwrap_or_default();
    match (m.get("namespace"), m.get("name"), m.get("port")) {
        (Some(ns), Some(name), Some(port)) => format!("{}/{}:{}{path}", s(ns), s(name), s(port)),
        _ if !path.is_empty() && m.len() == 1 => path,
        _ => Value::Object(m.clone()).to_string(),
    }
}

fn properties_summary(p: &Map<String, Value>) -> String {
    let mut parts: Vec<String> = p.iter().map(|(k, v)| format!("{k}={}", s(v))).collect();
    parts.sort();
    parts.join(",")
}

pub fn render(kind: ResourceKind, items: &[Value], wide: bool, all_namespaces: bool) -> String {
    let mut head: Vec<&str> = Vec::new();
    let mut rows: Vec<Vec<String>> = Vec::new();
    match kind {
        ResourceKind::Service => {
            head.extend(["NAME", "CLUSTER-IP", "PORTS", "VERSION"]);
            if wide {
                head.extend(["AFFINITY", "ANNOTATIONS"]);
            }
            for i in items {
                let ports: Vec<String> = i["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP")))
                    .collect();
                let mut row = vec![
                    s(&i["metadata"]["name"]),
                    s(&i["spec"]["clusterIP"]),
                    ports.join(","),
                    s(&i["metadata"]["resourceVersion"]),
                ];
                if wide {
                    row.push(s(&i["spec"]["sessionAffinity"]));
                    let ann = i["metadata"]["annotations"].as_object().cloned();
                    row.push(ann.map(|a| properties_summary(&a)).unwrap_or_default());
                }
                rows.push(row);
            }
        }
        ResourceKind::Endpoints => {
            head.extend(["NAME", "ENDPOINTS", "VERSION"]);
            for i in items {
                let mut eps = Vec::new();
                for subset in i["subsets"].as_array().into_iter().flatten() {
                    for a in subset["addresses"].as_array().into_iter().flatten() {
                        for p in subset["ports"].as_array().into_iter().flatten() {
                            let node = a["nodeName"]
                                .as_str()
                                .map(|n| format!("@{n}"))
                                .filter(|_| wide)
                                .unwrap_or_default();
                            eps.push(format!("{}:{}{node}", s(&a["ip"]), p["port"]));
                        }
                    }
                }
                rows.push(vec![
                    s(&i["metadata"]["name"]),
                    eps.join(","),
                    s(&i["metadata"]["resourceVersion"]),
                ]);
            }
        }
        ResourceKind::Node => {
            head.extend(["NAME", "STATUS", "ACKED", "LAST-SYNC"]);
            if wide {
                head.extend(["ADDRESS", "REPLICA", "LABELS"]);
            }
            for i in items {
                let st = &i["status"];
                let mut row = vec![
                    s(&i["metadata"]["name"]),
                    if st["online"].as_bool() == Some(true) {
                        "Online".into()
                    } else {
                        "Offline".into()
                    },
                    s(&st["ackedVersion"]),
                    s(&st["lastSync"]),
                ];
                if wide {
                    row.push(s(&st["address"]));
                    row.push(s(&st["replica"]));
                    let labels = i["metadata"]["labels"].as_object().cloned();
                    row.push(labels.map(|l| properties_summary(&l)).unwrap_or_default());
                }
                rows.push(row);
            }
        }
        ResourceKind::Community => {
            head.extend(["NAME", "MEMBERS", "NODE-SELECTOR", "VERSION"]);
            for i in items {
                let members: Vec<String> = i["spec"]["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .collect();
                let selector = match i["spec"]["nodeSelector"]["matchLabels"].as_object() {
                    Some(l) if l.is_empty() => "(every node)".to_string(),
                    Some(l) => properties_summary(l),
                    None if i["spec"]["nodeSelector"].is_object() => "(every node)".to_string(),
                    None => String::new(),
                };
                rows.push(vec![
                    s(&i["metadata"]["name"]),
                    members.join(","),
                    selector,
                    s(&i["metadata"]["resourceVersion"]),
                ]);
            }
        }
        ResourceKind::Rule => {
            head.extend([
                "NAME",
                "SOURCE",
                "SOURCE-RESOURCE",
                "TARGET",
                "TARGET-RESOURCE",
                "SUCCESS",
                "FAIL",
            ]);
            if wide {
                head.extend(["ID", "CREATED", "LAST-ERROR"]);
            }
            for i in items {
                let mut row = vec![
                    s(&i["name"]),
                    s(&i["source"]),
                    resource_summary(&i["source_resource"]),
                    s(&i["target"]),
                    resource_summary(&i["target_resource"]),
                    s(&i["success_messages"]),
                    s(&i["fail_messages"]),
                ];
                if wide {
                    row.push(s(&i["id"]));
                    row.push(s(&i["created_at"]));
                    let last = i["errors"].as_array().and_then(|e| e.last());
                    row.push(last.map(|e| s(&e["message"])).unwrap_or_default());
                }
                rows.push(row);
            }
        }
        ResourceKind::RuleEndpoint => {
            head.extend(["NAME", "TYPE", "PROPERTIES"]);
            if wide {
                head.extend(["ID", "PROJECT", "SHARED", "CREATED"]);
            }
            for i in items {
                let props = i["properties"].as_object().cloned().unwrap_or_default();
                let mut row = vec![s(&i["name"]), s(&i["type"]), properties_summary(&props)];
                if wide {
                    row.push(s(&i["id"]));
                    row.push(s(&i["project_id"]));
                    row.push(s(&i["is_shared"]));
                    row.push(s(&i["created_at"]));
                }
                rows.push(row);
            }
        }
    }
    if all_namespaces {
        head.insert(0, "NAMESPACE");
        for (row, i) in rows.iter_mut().zip(items) {
            row.insert(0, s(&i["metadata"]["namespace"]));
        }
    }
    let mut all = vec![head.into_iter().map(String::from).collect::<Vec<_>>()];
    all.extend(rows);
    let widths: Vec<usize> = (0..all[0].len())
        .map(|c| all.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in all {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rule_table_summarises_resources() {
        let rule = json!({"name": "to-hello", "source": "cloud-rest", "target": "mesh",
            "source_resource": {"path": "/hello"},
            "target_resource": {"namespace": "default", "name": "hello", "port": 80, "path": "/v1"},
            "success_messages": 3, "fail_messages": 1});
        let out = render(ResourceKind::Rule, &[rule], false, false);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{out}");
        assert!(
            lines[0].contains("SOURCE-RESOURCE") && lines[0].ends_with("FAIL"),
            "{out}"
        );
        let cols: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cols,
            [
                "to-hello",
                "cloud-rest",
                "/hello",
                "mesh",
                "default/hello:80/v1",
                "3",
                "1"
            ]
        );
    }

    #[test]
    fn all_namespaces_adds_the_namespace_column() {
        let svc = json!({"metadata": {"name": "a", "namespace": "x", "resourceVersion": "4"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}});
        let out = render(ResourceKind::Service, &[svc], false, true);
        assert!(out.starts_with("NAMESPACE   NAME"), "{out}");
        assert!(
            out.lines().nth(1).is_some_and(|l| l.starts_with("x ")),
            "{out}"
        );
    }

    #[test]
    fn community_table_lists_members_and_selector() {
        let items = [
            json!({"metadata": {"name": "factory", "resourceVersion": "7"},
                "spec": {"members": ["edge-1", "edge-2"], "nodeSelector": {"matchLabels": {"site": "f1"}}}}),
            json!({"metadata": {"name": "all", "resourceVersion": "8"},
                "spec": {"nodeSelector": {"matchLabels": {}}}}),
        ];
        let out = render(ResourceKind::Community, &items, false, false);
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("NAME") && lines[0].contains("NODE-SELECTOR"),
            "{out}"
        );
        let cols: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(cols, ["factory", "edge-1,edge-2", "site=f1", "7"]);
        assert!(lines[2].contains("(every node)"), "{out}");
    }
}
