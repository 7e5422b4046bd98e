//! Simulated fleet: `--workers N` workers register with a router over real gRPC and
//! heartbeat at the interval the router asks for, with random load, until stopped — the
//! control-plane traffic of a large fleet, for measuring the request path beside it
//! (`benches/load.py --fleet`). Every simulated worker advertises the same data-plane
//! address (`--address`, e.g. a mock-openai).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use proto::registry_client::RegistryClient;
use proto::{HeartbeatRequest, RegisterRequest, ServedModel};

#[derive(Debug, Parser)]
struct Args {
    /// The router's gRPC registry, `http://host:port`.
    #[arg(long)]
    router: String,
    /// Data-plane address every simulated worker advertises.
    #[arg(long)]
    address: String,
    #[arg(long, default_value = "mock")]
    pool: String,
    #[arg(long, default_value = "mock")]
    model: String,
    #[arg(long, default_value_t = 1000)]
    workers: usize,
    /// Seconds to run after registering (0 = until killed).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let channel = tonic::transport::Endpoint::from_shared(args.router.clone())?
        .connect()
        .await
        .with_context(|| format!("connect {}", args.router))?;
    let t0 = Instant::now();
    let mut leases = Vec::with_capacity(args.workers);
    for chunk in (0..args.workers).collect::<Vec<_>>().chunks(50) {
        let regs = chunk.iter().map(|&i| {
            let mut c = RegistryClient::new(channel.clone());
            let req = RegisterRequest {
                worker_id: format!("sim-{i}"),
                pool: args.pool.clone(),
                address: args.address.clone(),
                models: vec![ServedModel {
                    name: args.model.clone(),
                    max_context: 8192,
                    modalities: vec!["text".into()],
                }],
                max_concurrency: 8,
                device: "sim".into(),
                engine: "sim".into(),
            };
            async move { c.register(req).await.map(|r| r.into_inner()) }
        });
        for r in futures::future::join_all(regs).await {
            leases.push(r.context("register")?);
        }
    }
    let interval = Duration::from_millis(u64::from(
        leases.first().map_or(2000, |l| l.heartbeat_interval_ms),
    ));
    println!(
        "REGISTERED {} workers in {:.2} s; heartbeat every {:?}",
        leases.len(),
        t0.elapsed().as_secs_f64(),
        interval
    );
    let beats = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let n = leases.len().max(1) as u32;
    for (i, lease) in leases.into_iter().enumerate() {
        let mut c = RegistryClient::new(channel.clone());
        let (beats, failures) = (Arc::clone(&beats), Arc::clone(&failures));
        tokio::spawn(async move {
            // spread the fleet's heartbeats evenly over the interval
            tokio::time::sleep(interval * i as u32 / n).await;
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let load = (i as u32 * 7 + beats.load(Ordering::Relaxed) as u32) % 9;
                let req = HeartbeatRequest {
                    lease_id: lease.lease_id.clone(),
                    in_flight: load,
                    queued: load / 3,
                    kv_cache_usage: load as f32 / 9.0,
                    tokens_per_second: 40.0,
                    device_memory_bytes: 0,
                    ..Default::default()
                };
                match c.heartbeat(req).await {
                    Ok(_) => beats.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failures.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        eprintln!(
            "{:.0} s: {} heartbeats, {} failed",
            started.elapsed().as_secs_f64(),
            beats.load(Ordering::Relaxed),
            failures.load(Ordering::Relaxed)
        );
        if args.seconds > 0 && started.elapsed().as_secs() >= args.seconds {
            return Ok(());
        }
    }
}
