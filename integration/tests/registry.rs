//! Worker registry over real gRPC: leases, freeze/thaw, drain, authentication, router restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use integration::{
    FLEET_RULES, TestEnv, WorkerSpec, chat_body, eventually, header, spot_and_on_demand,
};
use proto::registry_client::RegistryClient;
use proto::{RegisterRequest, ServedModel};
use serde_json::{Value, json};

/// A registration of one `tiny`-serving worker, as a probe.
fn probe(worker_id: &str, pool: &str, address: &str) -> RegisterRequest {
    RegisterRequest {
        worker_id: worker_id.into(),
        pool: pool.into(),
        address: address.into(),
        models: vec![ServedModel {
            name: "tiny".into(),
            max_context: 100,
            modalities: vec!["text".into()],
        }],
        max_concurrency: 1,
        device: "cpu".into(),
        engine: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_worker_expires_within_ttl_and_returns_after_thaw() {
    let env = TestEnv::new()
        .rules(FLEET_RULES)
        .worker(WorkerSpec::new("cpu"))
        .start()
        .await
        .unwrap();
    let w = env.workers_json().await.unwrap();
    assert_eq!(w[0]["id"], "cpu-0");
    assert!(w[0]["lease_age_s"].as_f64().unwrap() >= 0.0);

    env.workers[0].proc.signal("STOP");
    let frozen = Instant::now();
    eventually(
        Duration::from_secs(3),
        "the frozen worker to expire (TTL 1 s)",
        || async { (env.workers_json().await.ok()?.is_empty()).then_some(()) },
    )
    .await
    .unwrap();
    assert!(
        frozen.elapsed() < Duration::from_secs(2),
        "expired after {:?}",
        frozen.elapsed()
    );
    // no live worker for `light`: clear 503, not a hang
    let r = env.chat(&chat_body("tiny", 30, 4, false)).await.unwrap();
    assert_eq!(r.status(), 503);

    env.workers[0].proc.signal("CONT");
    eventually(
        Duration::from_secs(5),
        "the thawed worker to register again",
        || async { (env.live_workers().await.ok()? == 1).then_some(()) },
    )
    .await
    .unwrap();
    let r = env.chat(&chat_body("tiny", 30, 4, false)).await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempted_worker_drains_finishes_in_flight_and_leaves() {
    let env = spot_and_on_demand("l40s", &[]).await.unwrap();
    // a slow request in flight on the spot worker
    env.faults(0, json!({ "delay_first_token_ms": 1500 }))
        .await
        .unwrap();
    let slow = {
        let http = env.http.clone();
        let url = format!("{}/v1/chat/completions", env.proxy);
        tokio::spawn(async move {
            http.post(url)
                .json(&chat_body("tiny", 1500, 4, false))
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = env
        .http
        .post(format!(
            "{}/admin/preempt?deadline_s=10",
            env.workers[0].url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    eventually(
        Duration::from_secs(2),
        "the spot worker to show as draining",
        || async {
            let w = env.workers_json().await.ok()?;
            w.iter()
                .any(|w| w["pool"] == "l40s-spot" && w["state"] == "draining")
                .then_some(())
        },
    )
    .await
    .unwrap();
    // new work goes elsewhere at once
    let r = env.chat(&chat_body("tiny", 1500, 4, false)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-pool"), "l40s-ondemand");
    assert_eq!(header(&r, "x-switchyard-attempts"), "1");
    // the in-flight request finishes on the draining worker
    let r = slow.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-pool"), "l40s-spot");
    // then it deregisters and exits
    eventually(
        Duration::from_secs(5),
        "the drained worker to leave",
        || async {
            let w = env.workers_json().await.ok()?;
            (w.len() == 1 && w[0]["pool"] == "l40s-ondemand").then_some(())
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_and_disallowed_address_are_refused() {
    let env = TestEnv::new()
        .rules(FLEET_RULES)
        .router_arg("--registry-token")
        .router_arg("s3cret")
        .router_arg("--allow-networks")
        .router_arg("127.0.0.0/8,10.0.0.0/8")
        .worker(WorkerSpec::new("cpu").arg("--token").arg("wrong"))
        .worker(WorkerSpec::new("l40s-spot").arg("--token").arg("s3cret"))
        .expect_registered(1)
        .start()
        .await
        .unwrap();
    let w = env.workers_json().await.unwrap();
    assert_eq!(w.len(), 1);
    assert_eq!(w[0]["pool"], "l40s-spot");
    eventually(
        Duration::from_secs(5),
        "the refusal in the worker's log",
        || async {
            env.log("worker-0.log")
                .contains("bad or missing registry token")
                .then_some(())
        },
    )
    .await
    .unwrap();

    let mut client = RegistryClient::connect(env.grpc.clone()).await.unwrap();
    let register = |address: &str, pool: &str, token: Option<&str>| {
        let mut req = tonic::Request::new(probe("probe", pool, address));
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        req
    };
    let e = client
        .register(register("127.0.0.1:1", "cpu", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = client
        .register(register("127.0.0.1:1", "gpu-x", Some("s3cret")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(
        e.message().contains("unknown pool `gpu-x`"),
        "{}",
        e.message()
    );
    let e = client
        .register(register("not-an-address", "cpu", Some("s3cret")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // the advertised address must fall in --allow-networks, token or not
    let e = client
        .register(register("192.168.1.5:8000", "cpu", Some("s3cret")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message().contains("192.168.1.5:8000") && e.message().contains("10.0.0.0/8"),
        "{}",
        e.message()
    );
    let ok = client
        .register(register("10.1.2.3:8000", "cpu", Some("s3cret")))
        .await
        .unwrap();
    assert!(!ok.into_inner().lease_id.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_only_loopback_addresses_register() {
    let env = TestEnv::new().rules(FLEET_RULES).start().await.unwrap();
    let mut client = RegistryClient::connect(env.grpc.clone()).await.unwrap();
    let e = client
        .register(probe("remote", "cpu", "10.1.2.3:8000"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("10.1.2.3:8000"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_come_back_after_a_router_restart() {
    let mut env = TestEnv::new()
        .rules(FLEET_RULES)
        .worker(WorkerSpec::new("cpu"))
        .worker(WorkerSpec::new("l40s-spot"))
        .start()
        .await
        .unwrap();
    env.restart_router().await.unwrap();
    let t0 = Instant::now();
    eventually(
        Duration::from_secs(5),
        "both workers to register with the new router",
        || async { (env.live_workers().await.ok()? == 2).then_some(()) },
    )
    .await
    .unwrap();
    eprintln!("workers back {:?} after the restart", t0.elapsed());
    let r = env.chat(&chat_body("tiny", 30, 4, false)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-pool"), "cpu");
}

/// A throwaway PKI: a CA, the router's certificate (127.0.0.1), two worker certificates from
/// the CA naming the `cpu` pool and a rogue one from another CA. Returns the PEM paths by
/// name.
fn pki(dir: &std::path::Path) -> std::collections::HashMap<&'static str, String> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair,
    };
    let ca = |_: ()| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    };
    let (good_ca, rogue_ca) = (ca(()), ca(()));
    let mut out = std::collections::HashMap::new();
    let mut write = |name: &'static str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        out.insert(name, path.display().to_string());
    };
    write("ca.pem", good_ca.pem());
    for (name, sans, usage, issuer) in [
        (
            "router",
            vec!["127.0.0.1".to_string()],
            ExtendedKeyUsagePurpose::ServerAuth,
            &good_ca,
        ),
        (
            "worker",
            vec!["cpu".to_string()],
            ExtendedKeyUsagePurpose::ClientAuth,
            &good_ca,
        ),
        (
            "cpu-cert",
            vec!["cpu".to_string()],
            ExtendedKeyUsagePurpose::ClientAuth,
            &good_ca,
        ),
        (
            "rogue",
            vec!["rogue".to_string()],
            ExtendedKeyUsagePurpose::ClientAuth,
            &rogue_ca,
        ),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(sans).unwrap();
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, issuer).unwrap();
        write(
            match name {
                "router" => "router.pem",
                "worker" => "worker.pem",
                "cpu-cert" => "cpu-cert.pem",
                _ => "rogue.pem",
            },
            cert.pem(),
        );
        write(
            match name {
                "router" => "router.key",
                "worker" => "worker.key",
                "cpu-cert" => "cpu-cert.key",
                _ => "rogue.key",
            },
            key.serialize_pem(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mtls_a_certified_worker_registers_and_others_are_refused() {
    // (the certificate must name the worker's pool or id: #17's identity binding)
    let dir = tempfile::tempdir().unwrap();
    let f = pki(dir.path());
    let worker = |pool: &str, cert: &str, key: &str| {
        WorkerSpec::new(pool)
            .arg("--tls-ca")
            .arg(&f["ca.pem"])
            .arg("--tls-cert")
            .arg(&f[cert])
            .arg("--tls-key")
            .arg(&f[key])
    };
    let env = TestEnv::new()
        .rules(FLEET_RULES)
        .router_arg("--registry-tls-cert")
        .router_arg(&f["router.pem"])
        .router_arg("--registry-tls-key")
        .router_arg(&f["router.key"])
        .router_arg("--registry-client-ca")
        .router_arg(&f["ca.pem"])
        .worker(worker("cpu", "worker.pem", "worker.key"))
        .worker(worker("l40s-spot", "rogue.pem", "rogue.key"))
        // certified by the right CA, but for the cpu pool: it cannot join another pool
        .worker(worker("l40s-ondemand", "cpu-cert.pem", "cpu-cert.key"))
        .expect_registered(1)
        .start()
        .await
        .unwrap();
    assert!(env.grpc.starts_with("https://"), "{}", env.grpc);
    let w = env.workers_json().await.unwrap();
    assert_eq!(
        w.len(),
        1,
        "only the certified worker of its own pool: {w:?}"
    );
    let refused = integration::eventually(
        Duration::from_secs(10),
        "the cpu certificate's refusal for l40s-ondemand in that worker's log",
        || async {
            let log = env.log("worker-2.log");
            log.contains("must name the worker id").then_some(log)
        },
    )
    .await
    .unwrap();
    assert!(refused.contains("`l40s-ondemand`"), "{refused}");
    assert_eq!(w[0]["pool"], "cpu");
    let r = env.chat(&chat_body("tiny", 30, 2, false)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-switchyard-pool"), "cpu");

    // a caller trusting the router but without a client certificate gets nowhere
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(&f["ca.pem"]).unwrap());
    let attempt = async {
        let ch = tonic::transport::Channel::from_shared(env.grpc.clone())
            .unwrap()
            .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(ca))
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        RegistryClient::new(ch)
            .register(probe("anonymous", "cpu", "127.0.0.1:1"))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert!(attempt.await.is_err(), "registered without a certificate");
    assert_eq!(env.workers_json().await.unwrap().len(), 1);
}

/// Registry abuse (#17): a registration naming a live worker's id from another address is
/// refused (before, it took over the worker's traffic); the router's own listeners cannot
/// be registered; and a static worker that is the router itself loops at most once per
/// attempt (the hop header), instead of ~500 requests to itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_ids_cannot_be_hijacked_and_the_router_never_routes_to_itself() {
    let env = TestEnv::new()
        .rules(FLEET_RULES)
        .worker(WorkerSpec::new("cpu"))
        .start()
        .await
        .unwrap();
    let real = env.workers_json().await.unwrap()[0]["address"]
        .as_str()
        .unwrap()
        .to_string();
    let mut client = RegistryClient::connect(env.grpc.clone()).await.unwrap();
    let e = client
        .register(probe("cpu-0", "cpu", "127.0.0.1:6666"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{}", e.message());
    let w = env.workers_json().await.unwrap();
    assert_eq!(w.len(), 1);
    assert_eq!(
        w[0]["address"],
        real.as_str(),
        "traffic still goes to the real worker"
    );
    let r = env.chat(&chat_body("tiny", 30, 2, false)).await.unwrap();
    assert_eq!(r.status(), 200);

    for own in [&env.proxy, &env.grpc, &env.admin] {
        let addr = own.trim_start_matches("http://").trim_end_matches('/');
        let e = client
            .register(probe("mirror", "cpu", addr))
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::InvalidArgument,
            "{addr}: {}",
            e.message()
        );
    }

    // a static worker that is the router's own proxy listener
    let proxy = env
        .proxy
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let rules = FLEET_RULES.replace("{TINY}", &env.tiny_model.display().to_string()).replace(
        "  cpu:  ",
        &format!("  mirror: {{ class: cpu, capacity: on_demand, cost_per_hour: 0.1, workers: [\"{proxy}\"] }}\n  cpu:  "),
    ).replace("route: [cpu]", "route: [mirror]");
    std::fs::write(&env.rules_path, rules).unwrap();
    eventually(Duration::from_secs(10), "the mirror pool", || async {
        let ws = env.workers_json().await.ok()?;
        ws.iter().any(|w| w["pool"] == "mirror").then_some(())
    })
    .await
    .unwrap();
    let started = Instant::now();
    let r = env.chat(&chat_body("tiny", 30, 2, false)).await.unwrap();
    assert_eq!(r.status(), 503, "{}", r.text().await.unwrap());
    assert!(started.elapsed() < Duration::from_secs(5));
    let looped_in = |m: &str| -> f64 {
        m.lines()
            .filter(|l| {
                l.starts_with("switchyard_router_requests_total{") && l.contains("status=\"508\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let m = env.metrics_until(|m| looped_in(m) >= 1.0).await.unwrap();
    let looped = looped_in(&m);
    assert!(
        (1.0..=3.0).contains(&looped),
        "each attempt came back once and was refused: {looped}\n{m}"
    );
}

/// The admin API behind a token: `/admin/*` wants it, probes and scrapes do not; a router
/// whose admin listener is reachable beyond loopback refuses to start without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_wants_its_token() {
    let env = TestEnv::new()
        .rules(FLEET_RULES)
        .router_arg("--admin-token")
        .router_arg("adm1n")
        .start()
        .await
        .unwrap();
    for path in ["/admin/workers", "/admin/rules", "/admin/registry/leases"] {
        let r = env
            .http
            .get(format!("{}{path}", env.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        let r = env
            .http
            .get(format!("{}{path}", env.admin))
            .bearer_auth("adm1n")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let r = env
        .http
        .post(format!("{}/admin/reload", env.admin))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    for path in ["/healthz", "/metrics"] {
        let r = env
            .http
            .get(format!("{}{path}", env.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }

    let out = std::process::Command::new(integration::bin("switchyard").unwrap())
        .args(["serve", "--rules"])
        .arg(&env.rules_path)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
            "--admin",
            "0.0.0.0:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--admin-token"), "{err}");
}

/// Many routers (#19): a worker given two `--router`s registers with both, each with its
/// own lease — the second router joined when it comes up, after the worker; one router
/// killed, the other keeps serving with no worker lost; restarted, the worker joins it
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_registers_with_every_router_replica_and_rejoins_one_that_restarts() {
    let port_b = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let grpc_b = format!("127.0.0.1:{port_b}");
    let env = TestEnv::new()
        .rules(FLEET_RULES)
        .worker(
            WorkerSpec::new("cpu")
                .arg("--router")
                .arg(&format!("http://{grpc_b}")),
        )
        .start()
        .await
        .unwrap();
    let b_addrs = ["127.0.0.1:0", grpc_b.as_str(), "127.0.0.1:0"];
    let start_b = |name: &str| {
        env.another_router(name, &env.rules_path, &b_addrs, &[])
            .unwrap()
    };
    let live_on = |admin: String| {
        let http = env.http.clone();
        async move {
            let ws: Vec<Value> = http
                .get(format!("{admin}/admin/workers"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (ws.len() == 1 && ws[0]["state"] == "live").then_some(())
        }
    };
    let chat = |proxy: String| {
        let req = env
            .http
            .post(format!("{proxy}/v1/chat/completions"))
            .json(&chat_body("tiny", 30, 2, false));
        async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
    };

    let mut b = start_b("b");
    let (proxy_b, admin_b) = (b.field("proxy").unwrap(), b.field("admin").unwrap());
    eventually(
        Duration::from_secs(20),
        "the worker joined router B",
        || live_on(admin_b.clone()),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", env.log("worker-0.log")));
    assert_eq!(chat(env.proxy.clone()).await, 200);
    assert_eq!(chat(proxy_b.clone()).await, 200);

    // B dies: A keeps serving, the worker stays live there
    let _ = b.child.kill();
    let _ = b.child.wait();
    for _ in 0..3 {
        assert_eq!(chat(env.proxy.clone()).await, 200);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await; // past A's lease TTL
    assert_eq!(env.live_workers().await.unwrap(), 1);

    // B back on its registry address: the worker registers with it again
    let b2 = start_b("b2");
    let (proxy_b2, admin_b2) = (b2.field("proxy").unwrap(), b2.field("admin").unwrap());
    eventually(
        Duration::from_secs(20),
        "the worker rejoined router B",
        || live_on(admin_b2.clone()),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", env.log("worker-0.log")));
    assert_eq!(chat(proxy_b2).await, 200);
    assert_eq!(chat(env.proxy.clone()).await, 200);
}

/// Routers found by DNS (#19, a headless Service): a worker given `--router-dns
/// http://localhost:PORT` registers with the router at every address `localhost` resolves
/// to — here a second router that starts after the worker, found on a later lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_registers_with_the_routers_a_dns_name_stands_for() {
    let port_b = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = TestEnv::new()
        .rules(FLEET_RULES)
        .worker(
            WorkerSpec::new("cpu")
                .arg("--router-dns")
                .arg(&format!("http://localhost:{port_b}"))
                .arg("--router-dns-every-s")
                .arg("1"),
        )
        .start()
        .await
        .unwrap();
    let grpc_b = format!("127.0.0.1:{port_b}");
    let mut b = env
        .another_router(
            "b",
            &env.rules_path,
            &["127.0.0.1:0", grpc_b.as_str(), "127.0.0.1:0"],
            &[],
        )
        .unwrap();
    let admin_b = b.field("admin").unwrap();
    let http = env.http.clone();
    eventually(Duration::from_secs(20), "the worker on router b", || {
        let (http, admin) = (http.clone(), admin_b.clone());
        async move {
            let ws: Vec<Value> = http
                .get(format!("{admin}/admin/workers"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (ws.len() == 1 && ws[0]["state"] == "live").then_some(())
        }
    })
    .await
    .unwrap();
    // and still on the first router, through its --router
    assert_eq!(env.workers_json().await.unwrap().len(), 1);
    assert!(env.log("worker-0.log").contains("joining router"));
    let _ = b.child.kill();
    let _ = b.child.wait();
}
