//! The `cloudcore` CLI end to end: the real binary run in the cloud namespace against a real
//! cloudcore — `apply -f examples/`, `get` in every format, malformed manifests refused whole
//! with the document and field named, `delete`, where the client takes its server and token
//! from (flag, environment, client config file, default), and node tokens.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use edgemesh_e2e::mesh::Mesh;
use edgemesh_e2e::{bin, wait_for};
use serde_json::Value;

/// Runs `cloudcore` in the cloud namespace with a controlled environment: no `CLOUDCORE_*`
/// from the test's own, and a `HOME` / `XDG_CONFIG_HOME` inside the test directory.
struct Cli {
    ns: String,
    data_dir: PathBuf,
    home: PathBuf,
    server: String,
}

struct Run {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Cli {
    fn new(mesh: &Mesh) -> Cli {
        let home = mesh.topo.dir().join("home");
        std::fs::create_dir_all(&home).expect("home dir");
        Cli {
            ns: mesh.cloud.ns.clone(),
            data_dir: mesh.cloud_dir.clone(),
            home,
            server: mesh.api_url(""),
        }
    }

    /// `cloudcore ARGS` with `env` set (and nothing else of the client's settings).
    fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let cloudcore = bin("cloudcore");
        // `timeout`: a hung CLI fails the test instead of hanging it.
        let mut argv: Vec<String> = ["timeout", "60", "ip", "netns", "exec", &self.ns, "env"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for var in [
            "CLOUDCORE_SERVER",
            "CLOUDCORE_TOKEN",
            "CLOUDCORE_CA_CERT",
            "CLOUDCORE_CLIENT_CONFIG",
            "CLOUDCORE_CONFIG",
        ] {
            argv.extend(["-u".to_string(), var.to_string()]);
        }
        argv.push(format!("HOME={}", self.home.display()));
        argv.push(format!(
            "XDG_CONFIG_HOME={}",
            self.home.join("xdg").display()
        ));
        argv.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        argv.push(cloudcore.display().to_string());
        argv.extend([
            "--data-dir".to_string(),
            self.data_dir.display().to_string(),
        ]);
        argv.extend(args.iter().map(|s| s.to_string()));
        let out: Output = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .expect("run cloudcore");
        Run {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `cloudcore ARGS` against the test's cloudcore (server from the environment, token from
    /// the default `<data_dir>/api-token`).
    fn run(&self, args: &[&str]) -> Run {
        self.run_env(args, &[("CLOUDCORE_SERVER", &self.server)])
    }

    /// Runs and asserts success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(r.ok, "cloudcore {args:?} failed:\n{}{}", r.stdout, r.stderr);
        r.stdout
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut full = args.to_vec();
        full.extend(["-o", "json"]);
        let out = self.ok(&full);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// Names of the listed items (`metadata.name`, or `name` for router records).
    fn names(&self, kind: &str) -> Vec<String> {
        let v = self.json(&["get", kind]);
        v["items"]
            .as_array()
            .unwrap_or_else(|| panic!("get {kind}: no items: {v}"))
            .iter()
            .map(|i| {
                i["metadata"]["name"]
                    .as_str()
                    .or(i["name"].as_str())
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    }
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn item<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["metadata"]["name"] == name || i["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {list}"))
}

#[test]
fn apply_examples_get_every_kind_delete_and_refuse_malformed_manifests() {
    let mut mesh = Mesh::new("cli", 0, Vec::new());
    mesh.start_cloud();
    let cli = Cli::new(&mesh);

    let examples = examples_dir().display().to_string();
    let out = cli.ok(&["apply", "-f", &examples]);
    for line in [
        "service/hello created",
        "endpoints/hello created",
        "service/hello-headless created",
        "ruleendpoint/cloud-rest created",
        "ruleendpoint/mesh created",
        "rule/hello-from-cloud created",
        "rule/billing-from-edge created",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "{line:?} missing in:\n{out}"
        );
    }
    // Services before their Endpoints, rule endpoints before the rules that name them.
    let pos = |l: &str| out.find(l).unwrap_or_else(|| panic!("{l} in {out}"));
    assert!(
        pos("service/hello created") < pos("endpoints/hello created"),
        "{out}"
    );
    assert!(
        pos("ruleendpoint/mesh created") < pos("rule/hello-from-cloud created"),
        "{out}"
    );

    let services = cli.json(&["get", "services"]);
    let hello = item(&services, "hello");
    assert_eq!(hello["spec"]["ports"][0]["port"], 80, "{hello}");
    assert!(hello["spec"]["clusterIP"]
        .as_str()
        .is_some_and(|ip| ip.starts_with("10.")));
    assert_eq!(
        item(&services, "hello-headless")["spec"]["clusterIP"],
        "None"
    );
    // The virtual Service the service → rest rule made.
    assert_eq!(
        item(&services, "billing")["metadata"]["annotations"]["edgemesh.io/router-rule"],
        item(&cli.json(&["get", "rules"]), "billing-from-edge")["id"]
    );
    let endpoints = cli.json(&["get", "ep"]);
    let addrs = &item(&endpoints, "hello")["subsets"][0]["addresses"];
    assert_eq!(addrs[0]["ip"], "10.244.1.10", "{endpoints}");
    assert_eq!(addrs[1]["nodeName"], "node-b", "{endpoints}");
    let rules = cli.json(&["get", "rules"]);
    let rule = item(&rules, "hello-from-cloud");
    assert_eq!(rule["source"], "cloud-rest");
    assert_eq!(rule["source_resource"]["path"], "/hello");
    assert_eq!(rule["target_resource"]["name"], "hello");
    assert_eq!(rule["target_resource"]["port"], 80);
    assert_eq!(rule["success_messages"], 0);
    let re = cli.json(&["get", "re", "cloud-rest"]);
    assert_eq!(re["type"], "rest", "{re}");
    assert_eq!(re["properties"]["qps"], 100, "{re}");
    assert_eq!(cli.json(&["get", "svc/hello"])["metadata"]["name"], "hello");
    // Nodes: none has connected; the list is empty but well-formed.
    assert_eq!(cli.json(&["get", "nodes"])["items"], Value::Array(vec![]));

    // Tables.
    let table = cli.ok(&["get", "rules"]);
    let mut lines = table.lines();
    let head: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        head,
        [
            "NAME",
            "SOURCE",
            "SOURCE-RESOURCE",
            "TARGET",
            "TARGET-RESOURCE",
            "SUCCESS",
            "FAIL"
        ],
        "{table}"
    );
    assert!(
        lines.any(|l| l.split_whitespace().collect::<Vec<_>>()
            == [
                "hello-from-cloud",
                "cloud-rest",
                "/hello",
                "mesh",
                "default/hello:80",
                "0",
                "0"
            ]),
        "{table}"
    );
    let table = cli.ok(&["get", "svc"]);
    assert!(table.starts_with("NAME "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("hello ") && l.contains("80/TCP")),
        "{table}"
    );
    let table = cli.ok(&["get", "svc", "-A"]);
    assert!(table.starts_with("NAMESPACE "), "{table}");
    let table = cli.ok(&["get", "re", "-o", "wide"]);
    assert!(table
        .lines()
        .next()
        .is_some_and(|h| h.contains("PROPERTIES") && h.contains("ID")));
    assert!(table.contains("burst=200,qps=100"), "{table}");
    let yaml = cli.ok(&["get", "rule", "hello-from-cloud", "-o", "yaml"]);
    assert!(yaml.contains("name: hello-from-cloud"), "{yaml}");

    // Applying again changes nothing; a changed rule is configured.
    let out = cli.ok(&["apply", "-f", &examples]);
    assert!(
        out.lines().all(|l| l.ends_with(" unchanged")) && out.lines().count() >= 8,
        "{out}"
    );
    let changed = mesh.topo.write_file(
        "changed.yaml",
        "kind: Rule\nmetadata: {name: hello-from-cloud}\nsource: cloud-rest\n\
         source_resource: {path: /hi/}\ntarget: mesh\n\
         target_resource: {namespace: default, name: hello, port: 80}\n",
    );
    let out = cli.ok(&["apply", "-f", &changed.display().to_string()]);
    assert_eq!(out.trim(), "rule/hello-from-cloud configured");
    assert_eq!(
        item(&cli.json(&["get", "rules"]), "hello-from-cloud")["source_resource"]["path"],
        "/hi"
    );

    // Malformed manifests: a bad field deep in the last document; nothing of the file is applied.
    let before = (
        cli.names("svc"),
        cli.names("ep"),
        cli.names("re"),
        cli.names("rules"),
    );
    let head = "kind: Service\nmetadata: {name: extra}\nspec: {ports: [{port: 80}]}\n---\n\
                kind: RuleEndpoint\nmetadata: {name: extra-rest}\ntype: rest\n---\n\
                kind: Endpoints\nmetadata: {name: extra}\nsubsets:\n\
                - addresses: [{ip: 10.244.9.1}]\n  ports: [{port: 8080}]\n---\n";
    let cases = [
        // Checked by the CLI: the rule's port.
        (
            "bad-rule.yaml",
            format!(
                "{head}kind: Rule\nmetadata: {{name: extra}}\nsource: extra-rest\n\
                 source_resource: {{path: /extra}}\ntarget: mesh\n\
                 target_resource: {{namespace: default, name: extra, port: 70000}}\n"
            ),
            "document 4 (Rule extra): field target_resource.port",
        ),
        // Checked by the CLI: a Service port out of range, deep in the spec.
        (
            "bad-port.yaml",
            format!(
                "{head}kind: Service\nmetadata: {{name: extra2}}\n\
                 spec: {{ports: [{{name: a, port: 80}}, {{name: b, port: 99999}}]}}\n"
            ),
            "document 4 (Service default/extra2): field spec.ports[1].port",
        ),
        // Checked by the server only (an address inside its service CIDR); the CLI still names
        // the file and document.
        (
            "bad-ip.yaml",
            format!(
                "{head}kind: Endpoints\nmetadata: {{name: extra3}}\nsubsets:\n\
                 - addresses: [{{ip: 10.244.9.2}}, {{ip: 10.96.0.5}}]\n  ports: [{{port: 80}}]\n"
            ),
            "document 4 (Endpoints default/extra3)",
        ),
    ];
    for (file, text, want) in cases {
        let path = mesh.topo.write_file(file, text);
        let r = cli.run(&["apply", "-f", &path.display().to_string()]);
        assert!(!r.ok, "{file} was accepted: {}", r.stdout);
        assert!(
            r.stderr.contains(&path.display().to_string()),
            "{file}: {}",
            r.stderr
        );
        assert!(
            r.stderr.contains(want),
            "{file}: want {want:?} in: {}",
            r.stderr
        );
        if file == "bad-ip.yaml" {
            assert!(
                r.stderr.contains("subsets[0].addresses[1].ip"),
                "{}",
                r.stderr
            );
        }
        assert_eq!(r.stdout, "", "{file}: something was applied");
        let after = (
            cli.names("svc"),
            cli.names("ep"),
            cli.names("re"),
            cli.names("rules"),
        );
        assert_eq!(after, before, "{file}: nothing may be applied");
    }

    // Errors that say what to do.
    let r = cli.run(&["get", "pods"]);
    assert!(!r.ok);
    assert!(
        r.stderr.contains("\"pods\"") && r.stderr.contains("ruleendpoints (re)"),
        "{}",
        r.stderr
    );
    let r = cli.run(&["get", "rule", "nope"]);
    assert!(
        !r.ok && r.stderr.contains("rule \"nope\" not found"),
        "{}",
        r.stderr
    );

    // What `get -o yaml` prints applies again (kept for after the deletes).
    let backup = mesh.topo.write_file(
        "backup.yaml",
        format!(
            "{}---\n{}",
            cli.ok(&["get", "re", "-o", "yaml"]),
            cli.ok(&["get", "rules", "-o", "yaml"])
        ),
    );

    // Delete.
    assert_eq!(
        cli.ok(&["delete", "rule", "hello-from-cloud"]).trim(),
        "rule/hello-from-cloud deleted"
    );
    assert_eq!(
        cli.ok(&["delete", "svc", "hello-headless"]).trim(),
        "service/hello-headless deleted"
    );
    cli.ok(&["delete", "ep/hello-headless"]);
    cli.ok(&["delete", "rule", "billing-from-edge"]);
    cli.ok(&["delete", "re", "cloud-rest"]);
    // What examples/units.yaml added.
    for object in ["svc/web", "ep/web", "svc/api", "ep/api", "svc/cloud-db"] {
        cli.ok(&["delete", object]);
    }
    assert_eq!(cli.names("rules"), Vec::<String>::new());
    assert_eq!(cli.names("re"), ["mesh"]);
    assert_eq!(
        cli.names("svc"),
        ["hello"],
        "the virtual Service went with its rule"
    );
    assert_eq!(cli.names("ep"), ["hello"]);
    let r = cli.run(&["delete", "svc", "hello-headless"]);
    assert!(!r.ok && r.stderr.contains("not found"), "{}", r.stderr);

    let out = cli.ok(&["apply", "-f", &backup.display().to_string()]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "ruleendpoint/cloud-rest created",
            "ruleendpoint/mesh unchanged",
            "rule/billing-from-edge created",
            "rule/hello-from-cloud created"
        ],
        "{out}"
    );
    assert_eq!(cli.names("svc"), ["billing", "hello"]);
}

/// A manifest shaped like Istio's bookinfo sample: per microservice a Service, a
/// ServiceAccount and one or more Deployments.
fn bookinfo() -> String {
    let mut docs =
        vec!["# Bookinfo-like sample: Services, ServiceAccounts and Deployments".to_string()];
    for (app, versions) in [
        ("details", &["v1"][..]),
        ("ratings", &["v1"][..]),
        ("reviews", &["v1", "v2", "v3"][..]),
        ("productpage", &["v1"][..]),
    ] {
        docs.push(format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {app}\n  labels:\n    app: {app}\n    service: {app}\nspec:\n  ports:\n  - port: 9080\n    name: http\n  selector:\n    app: {app}\n"
        ));
        docs.push(format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: bookinfo-{app}\n  labels:\n    account: {app}\n"
        ));
        for v in versions {
            docs.push(format!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {app}-{v}\n  labels:\n    app: {app}\n    version: {v}\nspec:\n  replicas: 1\n  selector:\n    matchLabels:\n      app: {app}\n      version: {v}\n  template:\n    metadata:\n      labels:\n        app: {app}\n        version: {v}\n    spec:\n      serviceAccountName: bookinfo-{app}\n      containers:\n      - name: {app}\n        image: docker.io/istio/examples-bookinfo-{app}-{v}:1.20.3\n        imagePullPolicy: IfNotPresent\n        ports:\n        - containerPort: 9080\n"
            ));
        }
    }
    docs.join("---\n")
}

#[test]
fn a_real_application_manifest_applies_what_cloudcore_serves_and_lists_the_rest() {
    let mut mesh = Mesh::new("mixed", 0, Vec::new());
    mesh.start_cloud();
    let cli = Cli::new(&mesh);
    let dir = mesh.topo.dir().join("manifests");
    std::fs::create_dir_all(&dir).expect("dir");
    let bookinfo_path = dir.join("bookinfo.yaml");
    std::fs::write(&bookinfo_path, bookinfo()).expect("write");
    // A second file in the directory, after the first in name order: not stopped at the first.
    std::fs::write(
        dir.join("gateway.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: bookinfo-gateway}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: gateway}\nspec: {ports: [{port: 80}]}\n",
    )
    .expect("write");
    let files = dir.display().to_string();

    // --strict: nothing applied, every such document named with its file and number.
    let r = cli.run(&["apply", "--strict", "-f", &files]);
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stdout, "");
    let book = bookinfo_path.display().to_string();
    for want in [
        format!("{book}: document 2: serviceaccount/bookinfo-details"),
        format!("{book}: document 3: deployment.apps/details-v1"),
        format!("{book}: document 11: deployment.apps/reviews-v3"),
        format!(
            "{}: document 1: gateway.networking.istio.io/bookinfo-gateway",
            dir.join("gateway.yaml").display()
        ),
    ] {
        assert!(
            r.stderr.contains(&want),
            "{want:?} missing in:\n{}",
            r.stderr
        );
    }
    assert_eq!(
        cli.names("svc"),
        Vec::<String>::new(),
        "--strict applied nothing"
    );

    // Without: the Services are applied, the rest listed, and the exit status says so.
    let r = cli.run(&["apply", "-f", &files]);
    assert_eq!(r.code, Some(3), "{}{}", r.stdout, r.stderr);
    for line in [
        "service/details created",
        "service/reviews created",
        "service/productpage created",
        "service/gateway created",
        "serviceaccount/bookinfo-ratings skipped: not served by cloudcore",
        "deployment.apps/reviews-v2 skipped: not served by cloudcore",
        "deployment.apps/productpage-v1 skipped: not served by cloudcore",
        "gateway.networking.istio.io/bookinfo-gateway skipped: not served by cloudcore",
    ] {
        assert!(
            r.stdout.lines().any(|l| l == line),
            "{line:?} missing in:\n{}",
            r.stdout
        );
    }
    let skipped = r
        .stdout
        .lines()
        .filter(|l| l.contains(" skipped: "))
        .count();
    assert_eq!(skipped, 4 + 6 + 1, "{}", r.stdout);
    assert!(
        r.stderr.contains("11 of 16 documents skipped"),
        "{}",
        r.stderr
    );
    assert_eq!(
        cli.names("svc"),
        ["details", "gateway", "productpage", "ratings", "reviews"]
    );
    let svc = cli.json(&["get", "svc", "reviews"]);
    assert_eq!(svc["spec"]["ports"][0]["port"], 9080, "{svc}");

    // The REST API numbers the same text the same way.
    let out = mesh.topo.exec(
        &mesh.cloud,
        &[
            "curl",
            "-sS",
            "-H",
            &format!("Authorization: Bearer {}", mesh.api_token),
            "-H",
            "Content-Type: application/yaml",
            "--data-binary",
            &format!("@{book}"),
            &mesh.api_url("/api/v1/apply"),
        ],
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON answer");
    let skipped: Vec<(u64, &str)> = v["skipped"]
        .as_array()
        .expect("skipped")
        .iter()
        .map(|s| {
            (
                s["document"].as_u64().unwrap_or(0),
                s["resource"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(skipped[0], (2, "serviceaccount/bookinfo-details"), "{v}");
    assert_eq!(skipped[1], (3, "deployment.apps/details-v1"), "{v}");
    assert!(skipped.contains(&(11, "deployment.apps/reviews-v3")), "{v}");
    assert_eq!(v["results"].as_array().map(Vec::len), Some(4), "{v}");

    // Everything served: exit 0.
    let r = cli.run(&["apply", "-f", &examples_dir().display().to_string()]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
}

#[test]
fn client_settings_come_from_flag_env_file_or_default_and_tokens_work() {
    let mut mesh = Mesh::new("clicfg", 1, Vec::new());
    mesh.start_cloud();
    let cli = Cli::new(&mesh);
    let good = mesh.api_token.clone();
    let server = cli.server.clone();
    let get = ["get", "services", "-o", "json"];

    // The default config file: server from it, a wrong token in it.
    let config = cli.home.join("xdg/cloudcore/client.toml");
    std::fs::create_dir_all(config.parent().expect("dir")).expect("mkdir");
    std::fs::write(
        &config,
        format!("server = \"{server}\"\ntoken = \"wrong-in-file\"\n"),
    )
    .expect("write config");
    let r = cli.run_env(&get, &[]);
    assert!(!r.ok, "the file's wrong token was not used");
    assert!(
        r.stderr.contains("refused")
            && r.stderr
                .contains(&format!("key token in {}", config.display())),
        "{}",
        r.stderr
    );
    // The environment beats the file (and the file still gives the server).
    let r = cli.run_env(&get, &[("CLOUDCORE_TOKEN", &good)]);
    assert!(r.ok, "{}", r.stderr);
    // A flag beats the environment.
    let r = cli.run_env(
        &["get", "services", "--token", "wrong-flag"],
        &[("CLOUDCORE_TOKEN", &good)],
    );
    assert!(!r.ok && r.stderr.contains("flag --token"), "{}", r.stderr);
    // A file named by CLOUDCORE_CLIENT_CONFIG with token_file, relative to it.
    std::fs::create_dir_all(mesh.topo.dir().join("other")).expect("mkdir other");
    let other = mesh.topo.write_file(
        "other/client.toml",
        format!("server = \"{server}\"\ntoken_file = \"secret\"\n"),
    );
    mesh.topo.write_file("other/secret", format!("{good}\n"));
    let r = cli.run_env(
        &get,
        &[("CLOUDCORE_CLIENT_CONFIG", &other.display().to_string())],
    );
    assert!(r.ok, "{}", r.stderr);
    // --client-config beats the variable.
    let r = cli.run_env(
        &[
            "get",
            "services",
            "--client-config",
            &config.display().to_string(),
        ],
        &[("CLOUDCORE_CLIENT_CONFIG", &other.display().to_string())],
    );
    assert!(!r.ok && r.stderr.contains("key token in"), "{}", r.stderr);
    // A key the file should not have is named with the file.
    std::fs::write(&config, "servr = \"x\"\n").expect("write config");
    let r = cli.run_env(&get, &[]);
    assert!(
        !r.ok && r.stderr.contains("servr") && r.stderr.contains(&config.display().to_string()),
        "{}",
        r.stderr
    );
    std::fs::remove_file(&config).expect("remove config");
    // No file, no variables: the default server (not where cloudcore listens) is reported.
    let r = cli.run_env(&get, &[]);
    assert!(
        !r.ok
            && r.stderr
                .contains("cannot reach cloudcore at http://127.0.0.1:10002")
            && r.stderr.contains("CLOUDCORE_SERVER"),
        "{}",
        r.stderr
    );
    // The environment's server with the default token file works.
    assert!(cli.run(&get).ok);

    // `token create` prints a token a node connects with; `token revoke` disconnects it.
    let token = cli.ok(&["token", "create", "edge-0"]).trim().to_string();
    assert!(token.len() >= 16, "{token:?}");
    mesh.nodes[0].token = token;
    mesh.start_node(0);
    mesh.wait_synced(0);
    let nodes = cli.json(&["get", "nodes"]);
    assert_eq!(item(&nodes, "edge-0")["status"]["online"], true, "{nodes}");
    assert!(cli
        .ok(&["get", "no"])
        .lines()
        .any(|l| l.starts_with("edge-0") && l.contains("Online")));
    assert_eq!(
        cli.ok(&["token", "revoke", "edge-0"]).trim(),
        "token of node edge-0 revoked"
    );
    wait_for("edge-0 disconnected", Duration::from_secs(10), || {
        let s = mesh.sync_status(0);
        (s["status"]["connected"] == false
            && s["status"]["lastError"]
                .as_str()
                .is_some_and(|e| e.contains("401")))
        .then_some(())
    });
    let nodes = cli.json(&["get", "nodes"]);
    assert_eq!(item(&nodes, "edge-0")["status"]["online"], false, "{nodes}");
    assert_eq!(
        item(&nodes, "edge-0")["status"]["hasToken"],
        false,
        "{nodes}"
    );
    mesh.stop_node(0, libc::SIGTERM);
}

/// Makes a CA and a certificate for `ip` signed by it in `dir`, and a second, unrelated CA.
fn certificates(dir: &Path, ip: std::net::Ipv4Addr) {
    let sh = format!(
        "set -e; cd {d}; \
         openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=edgemesh-test-ca 2>/dev/null; \
         openssl req -x509 -newkey rsa:2048 -nodes -keyout other-ca.key -out other-ca.pem -days 1 -subj /CN=other-ca 2>/dev/null; \
         openssl req -newkey rsa:2048 -nodes -keyout cloud.key -out cloud.csr -subj /CN=cloudcore 2>/dev/null; \
         printf 'subjectAltName=IP:{ip}\\n' > ext.cnf; \
         openssl x509 -req -in cloud.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cloud.pem -days 1 -extfile ext.cnf 2>/dev/null",
        d = dir.display()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &sh])
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_ca_certificate_comes_from_flag_env_or_client_config() {
    let mut mesh = Mesh::new("clitls", 0, Vec::new());
    let dir = mesh.topo.dir().to_path_buf();
    certificates(&dir, mesh.cloud.ip);
    mesh.cloud_extra = vec![
        format!("hub.tls_cert=\"{}\"", dir.join("cloud.pem").display()),
        format!("hub.tls_key=\"{}\"", dir.join("cloud.key").display()),
    ];
    mesh.api_scheme = "https";
    mesh.ca_cert = Some(dir.join("ca.pem"));
    mesh.start_cloud();
    let cli = Cli::new(&mesh);
    let server = cli.server.clone();
    assert!(server.starts_with("https://"), "{server}");
    let get = ["get", "nodes", "-o", "json"];

    // No CA anywhere: said so, with where to set one.
    let r = cli.run(&get);
    assert!(
        !r.ok && r.stderr.contains("no CA certificate") && r.stderr.contains("CLOUDCORE_CA_CERT"),
        "{}",
        r.stderr
    );
    // The client config's ca_cert, relative to the file.
    let config = cli.home.join("xdg/cloudcore/client.toml");
    std::fs::create_dir_all(config.parent().expect("dir")).expect("mkdir");
    std::fs::copy(dir.join("ca.pem"), config.with_file_name("ca.pem")).expect("copy ca");
    std::fs::write(
        &config,
        format!("server = \"{server}\"\nca_cert = \"ca.pem\"\n"),
    )
    .expect("write config");
    let r = cli.run_env(&get, &[]);
    assert!(r.ok, "{}", r.stderr);
    // The environment's CA (one that did not sign the server's certificate) beats the file.
    let other = dir.join("other-ca.pem").display().to_string();
    let r = cli.run_env(&get, &[("CLOUDCORE_CA_CERT", &other)]);
    assert!(!r.ok, "a CA that did not sign the certificate was accepted");
    assert!(
        r.stderr.contains("TLS handshake")
            && r.stderr.contains("environment variable CLOUDCORE_CA_CERT")
            && !r.stderr.contains("cannot reach"),
        "{}",
        r.stderr
    );
    // A flag beats the environment.
    let good = dir.join("ca.pem").display().to_string();
    let mut args = get.to_vec();
    args.extend(["--ca-cert", &good]);
    let r = cli.run_env(&args, &[("CLOUDCORE_CA_CERT", &other)]);
    assert!(r.ok, "{}", r.stderr);
}
