//! `switchyard-worker`: serves one model over the OpenAI API and registers with the router.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use pool_worker::api::{AppState, Faults};
use pool_worker::engine::Engine;
use pool_worker::registration::RegistrationConfig;

#[derive(Debug, Parser)]
#[command(
    name = "switchyard-worker",
    about = "Candle inference server for a Switchyard pool, or (with --engine-url) the registration sidecar of an external engine"
)]
struct Args {
    /// The model: a GGUF file, or a Hugging Face directory (config.json, *.safetensors,
    /// tokenizer.json, tokenizer_config.json). Architectures: llama, qwen2.
    #[arg(
        long,
        required_unless_present = "engine_url",
        conflicts_with = "engine_url"
    )]
    model: Option<PathBuf>,
    /// Sidecar mode: register the external engine at this URL (`http://127.0.0.1:8000`,
    /// on this host) instead of serving a model. Routers send requests straight to the
    /// engine; this process only registers it, reports its load from its metrics, takes
    /// it out of routing while it is down and drains it on SIGTERM or /admin/preempt.
    #[arg(long, env = "SWITCHYARD_ENGINE_URL")]
    engine_url: Option<String>,
    /// The engine behind --engine-url: where its health and metrics are and how they read.
    #[arg(long, value_enum, default_value = "openai", requires = "engine_url")]
    engine: pool_worker::sidecar::EngineKind,
    /// The engine's API key (vLLM's --api-key), for its /v1 calls (also
    /// SWITCHYARD_ENGINE_API_KEY). Requests routed to it carry the pool's
    /// `upstream.api_key` from the rules file instead.
    #[arg(
        long,
        env = "SWITCHYARD_ENGINE_API_KEY",
        hide_env_values = true,
        requires = "engine_url"
    )]
    engine_api_key: Option<String>,
    /// Context window to register for the engine's models when the engine does not say it.
    #[arg(long, requires = "engine_url")]
    max_context: Option<u32>,
    /// Input modalities the engine's models accept.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "text",
        requires = "engine_url"
    )]
    modalities: Vec<String>,
    /// How often the sidecar reads the engine's health and metrics, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    engine_poll_ms: u64,
    /// tokenizer.json; by default the model's own (GGUF metadata, or the directory's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Name clients use in `model` (default: the file or directory name up to the first '-'
    /// or '.', lower-case).
    #[arg(long)]
    model_name: Option<String>,
    /// Address to serve the OpenAI API on (port 0 = any free port); a sidecar serves its
    /// /health, /metrics and /admin/preempt there.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Router registry URL, e.g. http://127.0.0.1:50051; repeat it (or separate URLs with
    /// commas) to register with every router replica, each with its own lease. A router not
    /// up yet is joined when it comes. Without it the worker serves standalone.
    #[arg(long, value_delimiter = ',')]
    router: Vec<String>,
    /// A router registry URL whose host name stands for every router replica (a Kubernetes
    /// headless Service: `http://switchyard-router-registry:50051`): resolved every
    /// --router-dns-every-s, one registration per address; routers that appear are joined,
    /// ones that disappear are left. With TLS, router certificates are checked for the name.
    #[arg(long, env = "SWITCHYARD_ROUTER_DNS")]
    router_dns: Option<String>,
    /// Seconds between lookups of --router-dns.
    #[arg(long, default_value_t = 10)]
    router_dns_every_s: u64,
    /// The `host:port` routers send requests to (also SWITCHYARD_ADVERTISE_ADDRESS).
    /// Default: the listen address (a sidecar: the engine's); when that is unspecified
    /// (`0.0.0.0`) or, for a sidecar, loopback, `POD_IP` with the port, else the address
    /// this host reaches the first router from.
    #[arg(long, env = "SWITCHYARD_ADVERTISE_ADDRESS")]
    advertise_address: Option<SocketAddr>,
    /// Pool to join (a pool name from the router's rules file).
    #[arg(long, default_value = "cpu")]
    pool: String,
    /// Registry token (also SWITCHYARD_REGISTRY_TOKEN).
    #[arg(long, env = "SWITCHYARD_REGISTRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA (PEM) to verify an `https://` router's registry certificate with.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// mTLS: this worker's certificate (PEM), with --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Worker id (default: `<pool>-<advertised host:port>`, unique per pod).
    #[arg(long)]
    worker_id: Option<String>,
    /// Token source: `real` (candle) or `sim` (simulated hardware: no weights, streams filler
    /// tokens at --sim-ttft-ms / --sim-tokens-per-s; accepts image and audio parts).
    #[arg(long, default_value = "real", value_parser = ["real", "sim"])]
    backend: String,
    #[arg(long, default_value_t = 200)]
    sim_ttft_ms: u64,
    #[arg(long, default_value_t = 50.0)]
    sim_tokens_per_s: f64,
    /// Simulated prefill speed (prompt tokens per second, added to --sim-ttft-ms; 0: none).
    #[arg(long, default_value_t = 0.0)]
    sim_prefill_tokens_per_s: f64,
    /// Simulated keys and values per prompt token in the prefix cache, bytes (with
    /// --prefix-cache-mib, how much prompt the simulated worker keeps for reuse). Default:
    /// a 70B-class model's in f16 (80 layers × 8 key/value heads × 128 × 2 × 2 bytes).
    #[arg(long, default_value_t = pool_worker::engine::SimProfile::KV_BYTES_70B)]
    sim_kv_bytes_per_token: usize,
    /// Device: cpu, or cuda[:N] when built with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// `q8_0`: hold a Hugging Face checkpoint's projection matrices as 8-bit blocks (CPU
    /// only; a quarter of the f32 memory, faster decode). `none` keeps them as f32.
    #[arg(long, default_value = "none")]
    quantize: pool_worker::engine::Quantize,
    /// Sequences generated together (continuous batching): requests beyond this wait in
    /// the queue.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Requests that may wait for the engine before the worker answers 429.
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// Memory for the prefix cache, in MiB: keys and values of earlier prompts and answers,
    /// reused by prompts that start the same way (a shared system prompt, a conversation's
    /// earlier turns) instead of being prefilled again. 0 turns it off.
    #[arg(long, default_value_t = 256)]
    prefix_cache_mib: usize,
    /// Enable POST /admin/faults (fault injection for failover tests). Never in production.
    #[arg(long)]
    fault_injection: bool,
    /// Largest request body accepted, in bytes (413 beyond). Default: what the model can
    /// use, 16 bytes per token of its context window, at least 1 MiB — a body far larger
    /// than the context window only costs memory and tokenizer time before its 400.
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Seconds in-flight requests get to finish on shutdown.
    #[arg(long, default_value_t = 30)]
    drain_timeout_s: u64,
    /// OpenTelemetry traces: the OTLP/HTTP collector's base URL (spans go to
    /// `<url>/v1/traces`). OpenTelemetry's own variables work too
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_TRACES_SAMPLER`, `OTEL_SERVICE_NAME`, …);
    /// without either, tracing is off.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Log lines: `json` (one object per line), `text`, or `auto` (text on a terminal,
    /// else JSON), as the router's.
    #[arg(long, env = "SWITCHYARD_LOG_FORMAT", default_value = "auto", value_parser = ["auto", "json", "text"])]
    log_format: String,
}

/// Logs to stderr (`RUST_LOG` filters, default `info`): JSON lines off a terminal, so a
/// fleet's collector reads router and worker lines alike.
fn init_logs(format: &str) {
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    let json = format == "json" || (format == "auto" && !terminal);
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(terminal && !json);
    if json {
        fmt.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init();
    } else {
        fmt.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    proto::host::require_cpu_baseline();
    pool_worker::pin_cpu_thread_count();
    let args = Args::parse();
    init_logs(&args.log_format);
    let Some(model) = args.model.clone() else {
        return sidecar(args).await;
    };
    let name = args.model_name.clone().unwrap_or_else(|| {
        // a .safetensors file stands for its directory
        let path = match model.extension() {
            Some(e) if e == "safetensors" => model
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new(".")),
            _ => &model,
        };
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        stem.split(['-', '.']).next().unwrap_or("model").to_string()
    });
    if args.backend == "sim" && args.quantize != pool_worker::engine::Quantize::None {
        anyhow::bail!("--quantize applies to model weights; the sim backend loads none");
    }
    let backend = if args.backend == "sim" {
        tracing::warn!("simulated backend: tokens are filler, not model output");
        pool_worker::engine::Backend::Sim(pool_worker::engine::SimProfile {
            ttft: Duration::from_millis(args.sim_ttft_ms),
            tokens_per_s: args.sim_tokens_per_s,
            prefill_tokens_per_s: args.sim_prefill_tokens_per_s,
            kv_bytes_per_token: args.sim_kv_bytes_per_token,
        })
    } else {
        pool_worker::engine::Backend::Real(
            pool_worker::engine::parse_device(&args.device)?,
            args.quantize,
        )
    };
    let t0 = std::time::Instant::now();
    let engine = Engine::load(
        &model,
        args.tokenizer.as_deref(),
        name.clone(),
        backend,
        args.queue,
        args.max_batch,
        args.prefix_cache_mib << 20,
    )?;
    engine.warm_up().await.context("warm-up")?;
    tracing::info!(model = %name, "loaded and warmed up in {:.2?}", t0.elapsed());

    let state = Arc::new(AppState {
        engine: engine.clone(),
        faults: args.fault_injection.then(|| Arc::new(Faults::default())),
        draining: AtomicBool::new(false),
        shutdown: tokio::sync::Notify::new(),
        shutdown_request: Default::default(),
        active: Default::default(),
        max_body_bytes: args
            .max_body_bytes
            .unwrap_or_else(|| pool_worker::api::default_max_body_bytes(engine.model.max_context)),
        admin_token: args.token.clone(),
        otel: proto::otel::Otel::from_env("switchyard-worker", args.otlp_endpoint.as_deref())
            .map_err(anyhow::Error::msg)?,
        gpu: pool_worker::gpu::Gpu::open(&args.device),
    });
    let listener = listen(args.listen).with_context(|| format!("bind {}", args.listen))?;
    let addr = listener.local_addr()?;
    // Machine-readable line for harnesses and scripts.
    println!("LISTENING http://{addr}");

    let advertised = advertise(&args, addr);
    if args.router.is_empty() && args.router_dns.is_none() {
        tracing::info!("no --router: serving standalone");
    } else {
        tracing::info!(address = %advertised, routers = args.router.len(), router_dns = args.router_dns.as_deref(), "registering");
    }
    let models = vec![proto::ServedModel {
        name: name.clone(),
        max_context: engine.model.max_context as u32,
        modalities: engine.model.modalities.clone(),
    }];
    let device = if engine.model.simulated {
        "sim".into()
    } else {
        args.device.clone()
    };
    let routers = register(
        &args,
        advertised,
        Arc::new(std::sync::RwLock::new(models)),
        u32::try_from(args.max_batch).unwrap_or(u32::MAX),
        (device, "switchyard"),
        Arc::clone(&engine.stats) as Arc<dyn pool_worker::registration::LoadSource>,
    )?;

    let shutdown_state = Arc::clone(&state);
    let reg = Arc::clone(&routers);
    let drain_timeout = Duration::from_secs(args.drain_timeout_s);
    let shutdown = async move {
        let (reason, drain_timeout) = tokio::select! {
            _ = shutdown_signal() => ("shutdown", drain_timeout),
            _ = shutdown_state.shutdown.notified() => {
                let d = shutdown_state.shutdown_request.deadline_s.load(Ordering::Relaxed);
                ("preempted", drain_timeout.min(Duration::from_secs(u64::from(d))))
            }
        };
        tracing::info!(
            reason,
            "shutting down: draining for up to {drain_timeout:?}"
        );
        shutdown_state.draining.store(true, Ordering::Relaxed);
        reg.close();
        let all = reg.all();
        futures::future::join_all(
            all.iter()
                .map(|r| r.drain(drain_timeout.as_secs() as u32, reason)),
        )
        .await;
        let stats = &shutdown_state.engine.stats;
        let deadline = tokio::time::Instant::now() + drain_timeout;
        while (shutdown_state.active.load(Ordering::Relaxed) + stats.in_flight() + stats.queued())
            > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        futures::future::join_all(all.iter().map(|r| r.leave())).await;
    };
    // Each token is a small SSE write: send it at once rather than letting Nagle hold it
    // for the router's delayed ACK (up to 40 ms per token).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let traced = Arc::clone(&state);
    axum::serve(
        listener,
        pool_worker::api::router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await?;
    // the spans of the last answers
    if let Some(otel) = &traced.otel {
        tokio::task::block_in_place(|| otel.shutdown());
    }
    Ok(())
}

/// Sidecar mode (`--engine-url`): registers the external engine (see
/// [`pool_worker::sidecar`]).
async fn sidecar(args: Args) -> anyhow::Result<()> {
    use pool_worker::sidecar::{self, Admin, Engine, EngineConfig};
    let Some(url) = args.engine_url.clone() else {
        anyhow::bail!("give --model (serve a model) or --engine-url (register an engine)");
    };
    let url = url.trim_end_matches('/').to_string();
    let engine_addr = engine_address(&url)
        .filter(|_| url.starts_with("http://") && url.matches('/').count() == 2)
        .with_context(|| {
            format!("--engine-url {url}: not http://host:port (no path: the sidecar adds /v1/models, /metrics, …)")
        })?;
    if args.backend != "real" || args.tokenizer.is_some() || args.model_name.is_some() {
        anyhow::bail!(
            "--backend, --tokenizer and --model-name describe a model this process serves; with --engine-url the engine serves its own"
        );
    }
    let engine = Arc::new(Engine::new(EngineConfig {
        url: url.clone(),
        kind: args.engine,
        api_key: args.engine_api_key.clone(),
        max_context: args.max_context,
        modalities: args.modalities.clone(),
        poll: Duration::from_millis(args.engine_poll_ms.max(50)),
    })?);
    let (preempted, mut preempt_rx) = tokio::sync::watch::channel(None);
    let admin = Arc::new(Admin {
        engine: Arc::clone(&engine),
        draining: AtomicBool::new(false),
        admin_token: args.token.clone(),
        preempted,
    });
    let listener = listen(args.listen).with_context(|| format!("bind {}", args.listen))?;
    println!("LISTENING http://{}", listener.local_addr()?);
    let server = axum::serve(
        listener,
        sidecar::router(Arc::clone(&admin)).into_make_service_with_connect_info::<SocketAddr>(),
    );
    let server = tokio::spawn(async move { server.await });

    tracing::info!(engine = args.engine.name(), %url, "waiting for the engine");
    // a stop before the engine is ready ends the sidecar at once (nothing registered)
    let mut early = preempt_rx.clone();
    let ready = tokio::select! {
        r = engine.wait_ready() => Some(r),
        _ = shutdown_signal() => None,
        _ = early.wait_for(Option::is_some) => None,
    };
    let Some((found, slots)) = ready else {
        tracing::info!("stopped before the engine was ready");
        server.abort();
        return Ok(());
    };
    engine.load.set_up(true);
    let names: Vec<&str> = found.iter().map(|m| m.name.as_str()).collect();
    tracing::info!(models = ?names, "the engine serves");
    let models = Arc::new(std::sync::RwLock::new(found));
    let advertised = advertise(&args, engine_addr);
    let max_concurrency =
        slots.unwrap_or_else(|| u32::try_from(args.max_batch).unwrap_or(u32::MAX));
    if args.router.is_empty() && args.router_dns.is_none() {
        tracing::warn!("no --router or --router-dns: nothing to register with");
    } else {
        tracing::info!(address = %advertised, "registering the engine");
    }
    let routers = register(
        &args,
        advertised,
        Arc::clone(&models),
        max_concurrency,
        (args.device.clone(), args.engine.name()),
        Arc::clone(&engine.load) as Arc<dyn pool_worker::registration::LoadSource>,
    )?;
    let watcher = tokio::spawn(sidecar::watch(
        Arc::clone(&engine),
        Arc::clone(&routers),
        models,
    ));
    let drain_timeout = Duration::from_secs(args.drain_timeout_s);
    let (reason, deadline) = tokio::select! {
        _ = shutdown_signal() => ("shutdown", drain_timeout),
        d = preempt_rx.wait_for(Option::is_some) => {
            let d = d.ok().and_then(|d| *d).unwrap_or(0);
            ("preempted", drain_timeout.min(Duration::from_secs(u64::from(d))))
        }
    };
    tracing::info!(reason, "draining the engine for up to {deadline:?}");
    admin.draining.store(true, Ordering::Relaxed);
    watcher.abort();
    routers.close();
    sidecar::drain(&engine, &routers, deadline, reason).await;
    server.abort();
    tracing::info!("deregistered; exiting");
    Ok(())
}

/// Registers with every `--router` and the routers `--router-dns` stands for: `advertised`
/// serving `models`, with `max_concurrency`, `(device, engine)`, heartbeating `load`.
fn register(
    args: &Args,
    advertised: SocketAddr,
    models: pool_worker::registration::Models,
    max_concurrency: u32,
    (device, engine): (String, &str),
    load: Arc<dyn pool_worker::registration::LoadSource>,
) -> anyhow::Result<Arc<pool_worker::routers::Routers>> {
    let routers = pool_worker::routers::Routers::new(
        RegistrationConfig {
            router: String::new(),
            token: args.token.clone(),
            tls: registry_tls(args)?,
            worker_id: args
                .worker_id
                .clone()
                .unwrap_or_else(|| format!("{}-{}", args.pool, advertised)),
            pool: args.pool.clone(),
            address: advertised.to_string(),
            models,
            max_concurrency,
            device,
            engine: engine.into(),
        },
        load,
    );
    for router in &args.router {
        routers.join(router, None);
    }
    if let Some(url) = args.router_dns.clone() {
        let every = Duration::from_secs(args.router_dns_every_s.max(1));
        tokio::spawn(Arc::clone(&routers).follow_dns(url, every));
    }
    Ok(routers)
}

/// The socket address in an `http://host:port` URL (a host name resolved now).
fn engine_address(url: &str) -> Option<SocketAddr> {
    let (_, host, port) = pool_worker::routers::split_url(url)?;
    std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .ok()?
        .next()
}

/// The address routers reach this worker at (see `--advertise-address`); `bound` is the
/// worker's listen address, or a sidecar's engine.
fn advertise(args: &Args, bound: SocketAddr) -> SocketAddr {
    if let Some(a) = args.advertise_address {
        return a;
    }
    // an engine on loopback is reached from other hosts through this host's address
    let sidecar_loopback = args.engine_url.is_some() && bound.ip().is_loopback();
    if !bound.ip().is_unspecified() && !sidecar_loopback {
        return bound;
    }
    if let Some(ip) = std::env::var("POD_IP").ok().and_then(|v| v.parse().ok()) {
        return SocketAddr::new(ip, bound.port());
    }
    // the local address the kernel picks to reach the first router (no packet is sent)
    let from_router = args
        .router
        .first()
        .or(args.router_dns.as_ref())
        .and_then(|r| {
            let authority = r.split("://").nth(1).unwrap_or(r).split('/').next()?;
            let target = std::net::ToSocketAddrs::to_socket_addrs(authority)
                .ok()?
                .next()?;
            let any: SocketAddr = if target.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let probe = std::net::UdpSocket::bind(any).ok()?;
            probe.connect(target).ok()?;
            Some(probe.local_addr().ok()?.ip())
        });
    match from_router {
        Some(ip) => SocketAddr::new(ip, bound.port()),
        None => {
            tracing::warn!(
                "listening on {bound}: set --advertise-address (or POD_IP) so routers can reach this worker"
            );
            bound
        }
    }
}

/// The API listener, with an accept queue for bursts: a router opening hundreds of
/// connections at once (a cold pool meeting a wave of new streams) must not find the
/// queue full — tokio's default of 128 dropped their SYNs, and the router's connects timed
/// out. The kernel caps the queue at `net.core.somaxconn`.
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}

/// TLS to the registry from the command line (files read now: a bad path stops the worker
/// at start with a clear error).
fn registry_tls(args: &Args) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
    if args.tls_ca.is_none() && args.tls_cert.is_none() {
        return Ok(None);
    }
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("read {}", p.display()));
    let mut tls = tonic::transport::ClientTlsConfig::new();
    if let Some(ca) = &args.tls_ca {
        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            read(cert)?,
            read(key)?,
        ));
    }
    Ok(Some(tls))
}
