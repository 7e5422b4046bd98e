//! Upstreams that are not Switchyard workers, reached the way a platform team has them:
//! behind HTTPS with a private CA, wanting an API key (a vLLM started with `--api-key`, a
//! managed endpoint). The server is `integration/upstream/openai_server.py` (Python's
//! standard library: not our code path), over TLS with a certificate for `localhost`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use integration::{TestEnv, eventually, header};
use serde_json::{Value, json};
use std::time::Duration;

/// A CA, a server certificate from it for `localhost`, and a second CA the server does not
/// chain to; PEM files in `dir`.
fn pki(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    };
    let (good, other) = (ca("switchyard test CA"), ca("another CA"));
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = p.signed_by(&key, &good).unwrap();
    for (name, pem) in [
        ("ca.pem", good.pem()),
        ("other-ca.pem", other.pem()),
        ("server.pem", cert.pem()),
        ("server.key", key.serialize_pem()),
        ("api-key.txt", "sk-upstream-secret\n".to_string()),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Python server over HTTPS with `dir`'s certificate; its port.
fn serve(dir: &std::path::Path) -> (Server, u16) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("upstream/openai_server.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args(["--api-key", "sk-upstream-secret"])
        .arg("--cert")
        .arg(dir.join("server.pem"))
        .arg("--key")
        .arg(dir.join("server.key"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .strip_prefix("LISTENING ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no LISTENING line: {line:?}"));
    (Server(child), port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_with_an_api_key_is_served_and_never_sees_the_clients_key() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let (_server, port) = serve(dir.path());
    let d = dir.path().display().to_string();
    let pool = |name: &str, ca: &str, key: bool| {
        let key = if key {
            format!(", api_key: {{ file: \"{d}/api-key.txt\" }}")
        } else {
            String::new()
        };
        format!(
            "  {name}: {{ class: h100, capacity: on_demand, cost_per_hour: 4, workers: [\"127.0.0.1:{port}\"], upstream: {{ tls: true, ca_file: \"{d}/{ca}\", server_name: localhost{key} }} }}\n"
        )
    };
    let rules = format!(
        "version: 1\npools:\n{}{}{}rules:\n  - name: wrong-ca\n    when: {{ model: [wrong-ca] }}\n    route: [wrong-ca]\n  - name: no-key\n    when: {{ model: [no-key] }}\n    route: [no-key]\n  - name: all\n    route: [ext]\n",
        pool("ext", "ca.pem", true),
        pool("wrong-ca", "other-ca.pem", true),
        pool("no-key", "ca.pem", false),
    );
    // the three pools' static workers (no worker registers)
    let env = TestEnv::new()
        .rules(&rules)
        .expect_registered(3)
        .start()
        .await
        .unwrap();
    let ask = |model: &str, stream: bool| {
        env.http
            .post(format!("{}/v1/chat/completions", env.proxy))
            .bearer_auth("sk-the-clients-own-key")
            .json(&json!({
                "model": model,
                "messages": [{ "role": "user", "content": "hi" }],
                "max_tokens": 8,
                "stream": stream,
            }))
            .send()
    };

    // served over HTTPS, verified against the pool's CA for `localhost`, with the pool's key
    let r = ask("ext-model", false).await.unwrap();
    assert_eq!(r.status(), 200, "{}", env.log("router.log"));
    assert_eq!(header(&r, "x-switchyard-pool"), "ext");
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"], "hello from a server that is not Switchyard",
        "{v}"
    );
    // a stream too
    let r = ask("ext-model", true).await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("Switchyard") && text.contains("[DONE]"),
        "{text}"
    );

    // a certificate that does not chain to the pool's CA is never trusted
    let r = ask("wrong-ca", false).await.unwrap();
    let pool = header(&r, "x-switchyard-pool");
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 503, "served by {pool}: {body}");
    assert!(
        !body.contains("sk-"),
        "no key in the client's error: {body}"
    );
    // without the pool's key the upstream refuses: the client's own key was not passed on
    let r = ask("no-key", false).await.unwrap();
    assert_ne!(r.status(), 200);

    // what the upstream saw: the pool's key or none, never the client's; Host names it
    let seen: Value = tokio::task::spawn_blocking(move || {
        let out = Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import ssl,urllib.request;c=ssl.create_default_context(cafile='{d}/ca.pem');print(urllib.request.urlopen('https://localhost:{port}/seen',context=c).read().decode())"
                ),
            ])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!("{}", String::from_utf8_lossy(&out.stderr))
        })
    })
    .await
    .unwrap();
    let seen = seen.as_array().unwrap().clone();
    assert!(seen.len() >= 3, "{seen:?}");
    for s in &seen {
        let auth = s["authorization"].as_str().unwrap_or("");
        assert!(
            auth.is_empty() || auth == "Bearer sk-upstream-secret",
            "the upstream saw {auth:?}"
        );
        assert_eq!(s["host"], format!("localhost:{port}"), "{s}");
    }
    assert!(
        seen.iter()
            .any(|s| s["authorization"] == "Bearer sk-upstream-secret")
    );
    assert!(seen.iter().any(|s| s["authorization"].is_null()));
    // and the key is nowhere in what the router says about itself
    let pools = env
        .admin_get("/admin/pools")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!pools.contains("sk-upstream-secret"), "{pools}");
    assert!(!env.log("router.log").contains("sk-upstream-secret"));

    // active health checks go over the pools' own HTTPS settings: the worker the pool's CA
    // does not vouch for is unhealthy, the others are checked healthy
    let states = eventually(Duration::from_secs(10), "health checks", || async {
        let ws = env.workers_json().await.ok()?;
        let state = |pool: &str| {
            ws.iter()
                .find(|w| w["pool"] == pool)
                .map(|w| w["routing_state"].as_str().unwrap_or("").to_string())
        };
        let s = (state("ext")?, state("wrong-ca")?, state("no-key")?);
        (s.1 == "unhealthy").then_some(s)
    })
    .await
    .unwrap();
    assert_eq!(states.0, "live");
    assert_eq!(states.2, "live", "the health path wants no key");
    let m = env.metrics().await.unwrap();
    assert!(
        m.lines()
            .any(|l| l
                .starts_with("switchyard_router_health_check_failures_total{pool=\"wrong-ca\"}")),
        "{m}"
    );
    assert!(
        !m.lines()
            .any(|l| l.starts_with("switchyard_router_health_check_failures_total{pool=\"ext\"}")),
        "the right CA passes"
    );
}

/// A bad upstream section is refused with every problem listed: a missing CA file, a key
/// variable that is not set, settings that need `tls`.
#[test]
fn bad_upstream_settings_are_refused_with_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(
        &path,
        "version: 1\npools:\n  a: { class: cpu, capacity: on_demand, cost_per_hour: 1, workers: [\"127.0.0.1:9\"], upstream: { tls: true, ca_file: missing.pem, api_key: { env: SWITCHYARD_TEST_SURELY_UNSET_KEY } } }\n  b: { class: cpu, capacity: on_demand, cost_per_hour: 1, upstream: { server_name: x, client_cert: c.pem } }\nrules:\n  - name: all\n    route: [a]\n",
    )
    .unwrap();
    let out = Command::new(integration::bin("switchyard").unwrap())
        .args(["rules", "check"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    for expected in [
        "pools.a.upstream.ca_file",
        "cannot read",
        "pools.a.upstream.api_key",
        "SWITCHYARD_TEST_SURELY_UNSET_KEY",
        "pools.b.upstream",
        "go together",
        "pools.b.upstream.tls",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
}
