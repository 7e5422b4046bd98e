//! Tenant limits shared by two router replicas through a real Redis (Debian's
//! `redis-server`, installed by `scripts/test.sh`): one tenant's requests per minute hold
//! across both routers; with Redis killed, requests keep flowing on each router's own
//! limits and the routers say so in their metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration::{FLEET_RULES, TestEnv, WorkerSpec, chat_body, eventually, sha256_hex};

/// A `redis-server` of its own on an ephemeral port, nothing persisted; killed when dropped.
struct Redis {
    child: Child,
    port: u16,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "`redis-server` is not installed: scripts/test.sh installs it \
                 (apt-get install redis-server)",
            );
        let r = Redis { child, port };
        let t0 = Instant::now();
        while !r.pings() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    fn pings(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }
}

fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_share_one_tenants_limit_in_redis_and_fall_back_to_local_limits() {
    let redis = Redis::start();
    let url = format!("redis://127.0.0.1:{}", redis.port);
    const RPM: u32 = 12;
    let rules = format!(
        "{FLEET_RULES}tenants:\n  team-a:\n    keys: [{{ sha256: \"{}\" }}]\n    limits: {{ requests_per_minute: {RPM} }}\n",
        sha256_hex("secret-a"),
    );
    let env = TestEnv::new()
        .rules(&rules)
        .router_arg("--limits-redis")
        .router_arg(&url)
        .worker(WorkerSpec::new("cpu"))
        .start()
        .await
        .unwrap();
    // the second replica reaches the same worker as a static one
    let worker = env.workers[0].url.trim_start_matches("http://");
    let cpu = "cost_per_hour: 0.20 }";
    assert!(rules.contains(cpu));
    let rules_b = rules.replace(
        cpu,
        &format!("cost_per_hour: 0.20, workers: [\"{worker}\"] }}"),
    );
    let rules_b = rules_b.replace("{TINY}", &env.tiny_model.display().to_string());
    let path_b = env.dir.path().join("rules-b.yaml");
    std::fs::write(&path_b, rules_b).unwrap();
    let b = env
        .another_router(
            "b",
            &path_b,
            &["127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"],
            &["--limits-redis", &url],
        )
        .unwrap();
    let proxies = [
        format!("{}/v1/chat/completions", env.proxy),
        format!("{}/v1/chat/completions", b.field("proxy").unwrap()),
    ];
    let admin_b = b.field("admin").unwrap();
    let metrics_b = || async {
        env.http
            .get(format!("{admin_b}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
    };
    // both replicas serve (an unlimited, anonymous request) and reach Redis
    for p in &proxies {
        eventually(Duration::from_secs(20), "the replica serving", || async {
            let r = env
                .http
                .post(p)
                .json(&chat_body("tiny", 30, 1, false))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", env.log("router-b.log")));
    }
    for m in [env.metrics().await.unwrap(), metrics_b().await.unwrap()] {
        assert_eq!(
            gauge(&m, "switchyard_router_limits_store_up "),
            Some(1.0),
            "{m}"
        );
    }

    // team-a alternates between the replicas: together they admit one minute's worth
    let send = |p: &String, key: &'static str| {
        let req = env
            .http
            .post(p)
            .bearer_auth(key)
            .json(&chat_body("tiny", 30, 1, false));
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let t0 = Instant::now();
    let mut admitted = [0u32; 2];
    let mut refused = 0;
    for i in 0..(3 * RPM) as usize {
        match send(&proxies[i % 2], "secret-a").await {
            200 => admitted[i % 2] += 1,
            429 => refused += 1,
            other => panic!("request {i}: status {other}"),
        }
    }
    let total = admitted[0] + admitted[1];
    // the bucket refills one request every 60/RPM seconds meanwhile
    let refilled = (t0.elapsed().as_secs_f64() / (60.0 / f64::from(RPM))).ceil() as u32;
    assert!(
        (RPM..=RPM + refilled).contains(&total),
        "admitted {admitted:?} (refused {refused}) in {:?}: the limit is {RPM} per minute across both",
        t0.elapsed()
    );
    println!(
        "admitted {admitted:?}, refused {refused} in {:?}",
        t0.elapsed()
    );
    assert!(admitted[0] > 0 && admitted[1] > 0, "{admitted:?}");

    // Redis gone: requests keep flowing, each replica on its own limits, and says so
    drop(redis);
    let mut served = 0;
    for i in 0..6 {
        match send(&proxies[i % 2], "secret-a").await {
            200 => served += 1,
            429 => {}
            other => panic!("with Redis down, request {i}: status {other}"),
        }
    }
    assert_eq!(served, 6, "each replica's own bucket is full");
    for m in [env.metrics().await.unwrap(), metrics_b().await.unwrap()] {
        assert_eq!(
            gauge(&m, "switchyard_router_limits_store_up "),
            Some(0.0),
            "{m}"
        );
        let local = gauge(&m, "switchyard_router_limits_local_decisions_total ").unwrap();
        assert!(local >= 1.0, "{m}");
    }
}
