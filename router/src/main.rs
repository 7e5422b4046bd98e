//! `switchyard`: serve the router, run the demo fleet, or check and explain rules files.

mod demo;
mod replay;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use pingora::prelude::*;
use pingora::server::ExecutionPhase;
use pingora::server::configuration::ServerConf;
use router::metrics::Metrics;
use router::proxy::SwitchyardProxy;
use router::registry::Registry;
use router::state::{Config, Shared};
use routing_rules::RulesStore;

#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about = "Tiered LLM request router")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines: `json` (one object per line; the access line's message is `request`),
    /// `text`, or `auto` (text on a terminal, else JSON).
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_LOG_FORMAT",
        value_enum,
        default_value = "auto"
    )]
    log_format: router::logging::LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the router.
    Serve(Box<ServeArgs>),
    /// Start a local demo fleet (router + a worker per pool); `--smoke` checks a mix of requests.
    Demo(demo::DemoArgs),
    /// Replay a trace through the real router in front of a simulated fleet, once per rules
    /// file, and compare cost and latency side by side (`--generate N` writes a trace).
    Replay(replay::ReplayArgs),
    /// Work with rules files.
    #[command(subcommand)]
    Rules(RulesCmd),
    /// What each tenant / model / pool cost a running router over the last minutes, and
    /// what the same traffic would have cost all on one pool (default: the dearest
    /// on-demand one), from the router's own accounting (`GET /admin/cost`).
    Cost(CostArgs),
    /// Tell a worker on this host to drain as on a spot-interruption notice (stop taking
    /// work, tell every router, finish what is in flight, deregister, exit) and wait until
    /// it has gone: a Kubernetes `preStop` hook for worker pods.
    Preempt(PreemptArgs),
}

#[derive(Debug, clap::Args)]
struct PreemptArgs {
    /// The worker's OpenAI API address (loopback needs no token).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    worker: String,
    /// Seconds the worker has to finish its requests.
    #[arg(long, default_value_t = 30)]
    deadline_s: u32,
    /// The registry token, for a worker not on loopback (also SWITCHYARD_REGISTRY_TOKEN).
    #[arg(long, env = "SWITCHYARD_REGISTRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, clap::Args)]
struct CostArgs {
    /// The router's admin listener.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin: SocketAddr,
    /// The admin API's token (also SWITCHYARD_ADMIN_TOKEN).
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Minutes to look back (1 to 1440).
    #[arg(long, default_value_t = 60)]
    window: u64,
    /// Group by any of tenant, model, pool (comma-separated).
    #[arg(long, default_value = "tenant,model,pool")]
    by: String,
    /// The pool to compare with [default: the dearest on-demand pool].
    #[arg(long)]
    baseline: Option<String>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum RulesCmd {
    /// Exit 0 if FILE compiles, else exit 1 listing every problem.
    Check { file: PathBuf },
    /// Print the JSON Schema of the rules file (for editors: yaml-language-server etc.).
    Schema,
    /// Print, as JSON, the decision the rules make for a request body.
    Explain {
        file: PathBuf,
        request: PathBuf,
        /// Endpoint the request is sent to.
        #[arg(long, default_value = "/v1/chat/completions")]
        endpoint: String,
        /// A request header, `name: value` (repeatable): for rules on `headers`.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// The request's API key (as `Authorization: Bearer KEY`): for rules on `tenant`.
        #[arg(long)]
        api_key: Option<String>,
    },
}

/// The router's three listeners (port 0 = any free port).
#[derive(Debug, Clone, clap::Args)]
struct Listeners {
    /// OpenAI-compatible proxy listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// gRPC registry listener for workers.
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc: SocketAddr,
    /// Admin listener: /healthz, /metrics, /admin/*.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin: SocketAddr,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Rules file (YAML); reloaded when it changes.
    #[arg(long)]
    rules: PathBuf,
    #[command(flatten)]
    addrs: Listeners,
    /// Shared token workers must present (also SWITCHYARD_REGISTRY_TOKEN). Without it only
    /// loopback workers may register.
    #[arg(long, env = "SWITCHYARD_REGISTRY_TOKEN", hide_env_values = true)]
    registry_token: Option<String>,
    /// Bearer token the admin API's `/admin/*` routes require (also
    /// SWITCHYARD_ADMIN_TOKEN). Required when --admin listens beyond loopback.
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[arg(long, default_value_t = 2000)]
    heartbeat_ms: u64,
    #[arg(long, default_value_t = 6000)]
    lease_ttl_ms: u64,
    /// Largest request body accepted (bytes).
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Time a client has to send its whole request body; 408 beyond.
    #[arg(long, default_value_t = 30_000)]
    body_timeout_ms: u64,
    /// Seconds an idle keep-alive connection waits for its next request (and the longest
    /// wait for each read of a request header).
    #[arg(long, default_value_t = 60)]
    keepalive_timeout_s: u64,
    /// Longest wait for one write to the client (ms): a client that stops reading is cut
    /// off after it.
    #[arg(long, default_value_t = 30_000)]
    send_timeout_ms: u64,
    /// Time a client has to send a request's whole header (ms; nginx's
    /// `client_header_timeout`), from the connection's start or the request's first byte;
    /// 408 and close beyond.
    #[arg(long, default_value_t = 15_000)]
    header_timeout_ms: u64,
    /// Seconds between re-resolutions of static workers listed by host name (every address
    /// a name has is a worker).
    #[arg(long, default_value_t = 30)]
    resolve_every_s: u64,
    /// Open client connections at most; one more gets 503 with Retry-After and is closed.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Largest request header block accepted (bytes); 431 beyond.
    #[arg(long, default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    #[arg(long, default_value_t = 1000)]
    connect_timeout_ms: u64,
    /// Time a worker has to send its response header (prefill included).
    #[arg(long, default_value_t = 120_000)]
    first_byte_timeout_ms: u64,
    /// Longest a request may take from arrival to its last byte; a stream past it ends with
    /// an SSE error event (`timeout`).
    #[arg(long, default_value_t = 600_000)]
    total_timeout_ms: u64,
    /// Drift window (s): each tenant's traffic in a window (prompt tokens, max_tokens,
    /// modalities, models) is compared with the windows before it
    /// (`switchyard_router_drift_psi`, `/admin/drift`).
    #[arg(long, default_value_t = 300.0)]
    drift_window_s: f64,
    /// Windows before the current one that make its drift baseline.
    #[arg(long, default_value_t = 12)]
    drift_baseline_windows: usize,
    /// Latency objectives (`slo:` in the rules): seconds of a pool's recent answers its
    /// time-to-first-token percentile is taken over.
    #[arg(long, default_value_t = 10.0)]
    slo_window_s: f64,
    /// Latency objectives: least seconds a pool that missed one stays behind the dearer
    /// tiers (hysteresis).
    #[arg(long, default_value_t = 5.0)]
    slo_cooldown_s: f64,
    /// Time budget for exact token counting before the bound is used.
    #[arg(long, default_value_t = 50)]
    classify_budget_ms: u64,
    /// Do not add x-switchyard-* headers to answers.
    #[arg(long)]
    no_debug_headers: bool,
    /// Proxy worker threads [default: the machine's cores].
    #[arg(long)]
    threads: Option<usize>,
    /// All request bodies held in memory at once (bytes); beyond it requests get 503 with
    /// Retry-After.
    #[arg(long, default_value_t = 1024 * 1024 * 1024)]
    max_buffered_bytes: usize,
    /// TLS for the gRPC registry: certificate chain (PEM). With --registry-tls-key.
    #[arg(long, requires = "registry_tls_key")]
    registry_tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --registry-tls-cert.
    #[arg(long, requires = "registry_tls_cert")]
    registry_tls_key: Option<PathBuf>,
    /// mTLS: workers must present a certificate signed by this CA (PEM); such workers need
    /// no token and may register from any allowed network.
    #[arg(long, requires = "registry_tls_cert")]
    registry_client_ca: Option<PathBuf>,
    /// Networks workers may advertise addresses in (comma-separated CIDRs; also
    /// SWITCHYARD_ALLOW_NETWORKS). Default: loopback, and only when --grpc is on loopback;
    /// required otherwise.
    #[arg(long, env = "SWITCHYARD_ALLOW_NETWORKS", value_delimiter = ',')]
    allow_networks: Vec<ipnet::IpNet>,
    /// On SIGTERM: the most seconds in-flight requests have to finish (new connections are
    /// refused and /readyz answers 503 meanwhile); the router exits as soon as none is left.
    #[arg(long, default_value_t = 30)]
    shutdown_grace_s: u64,
    /// Interval of the active health checks of static workers (0 turns them off).
    #[arg(long, default_value_t = 2000)]
    health_check_ms: u64,
    /// Path the static workers' health check requests (a 2xx answer is healthy).
    #[arg(long, default_value = "/health")]
    health_check_path: String,
    /// Zero-downtime upgrade: take over the listening sockets and the registered workers'
    /// leases of the router running on the same addresses, then send that one SIGQUIT
    /// (within 5 s). It finishes its in-flight requests and exits.
    #[arg(long)]
    upgrade: bool,
    /// Unix socket the listening sockets are handed over on; both processes must agree
    /// [default: /tmp/switchyard-upgrade-<proxy port>.sock].
    #[arg(long)]
    upgrade_sock: Option<PathBuf>,
    /// OpenTelemetry traces: the OTLP/HTTP collector's base URL (spans go to
    /// `<url>/v1/traces`). OpenTelemetry's own variables work too
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_TRACES_SAMPLER`, `OTEL_SERVICE_NAME`, …);
    /// without either, tracing is off.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Redis every router replica shares tenants' requests and tokens per minute in
    /// (`redis://host:6379`; also SWITCHYARD_LIMITS_REDIS). Without it, each router keeps
    /// its own limits; while Redis cannot answer, each router decides alone.
    #[arg(long, env = "SWITCHYARD_LIMITS_REDIS")]
    limits_redis: Option<String>,
}

fn main() -> anyhow::Result<()> {
    proto::host::require_cpu_baseline();
    #[cfg(feature = "mimalloc")]
    router::allocator::tune();
    let cli = Cli::parse();
    router::logging::init(cli.log_format);
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Demo(args) => demo::run(args),
        Command::Replay(args) => replay::run(args),
        Command::Cost(args) => cost(&args),
        Command::Preempt(args) => preempt(&args),
        Command::Rules(RulesCmd::Check { file }) => match routing_rules::compile_file(&file) {
            Ok(r) => {
                println!(
                    "{}: ok ({} pools, {} models, {} rules)",
                    file.display(),
                    r.pools().len(),
                    r.models().len(),
                    r.rules().len()
                );
                Ok(())
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                router::logging::exit(1);
            }
        },
        Command::Rules(RulesCmd::Schema) => {
            println!("{}", routing_rules::JSON_SCHEMA);
            Ok(())
        }
        Command::Rules(RulesCmd::Explain {
            file,
            request,
            endpoint,
            headers,
            api_key,
        }) => explain(&file, &request, &endpoint, &headers, api_key.as_deref()),
    }
}

fn explain(
    file: &std::path::Path,
    request: &std::path::Path,
    endpoint: &str,
    headers: &[String],
    api_key: Option<&str>,
) -> anyhow::Result<()> {
    let rules = routing_rules::compile_file(file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let body = std::fs::read(request).with_context(|| format!("read {}", request.display()))?;
    let ep = router::classify::endpoint_of(endpoint)
        .with_context(|| format!("unknown endpoint {endpoint}"))?;
    let mut head = http::HeaderMap::new();
    for h in headers {
        let (name, value) = h
            .split_once(':')
            .with_context(|| format!("--header `{h}`: expected `name: value`"))?;
        head.append(
            http::HeaderName::from_bytes(name.trim().as_bytes())
                .with_context(|| format!("--header `{h}`: bad name"))?,
            http::HeaderValue::from_str(value.trim())
                .with_context(|| format!("--header `{h}`: bad value"))?,
        );
    }
    if let Some(key) = api_key {
        head.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(&format!("Bearer {key}")).context("--api-key")?,
        );
    }
    let (counters, errors) = router::classify::load_counters(&rules, &Default::default());
    for e in errors {
        eprintln!("warning: {e}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let classifier = router::classify::Classifier {
        rules: &rules,
        counters: &counters,
        budget: Duration::from_secs(30),
    };
    let explained = rt
        .block_on(classifier.explain(ep, &head, &body))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let out = explained.to_json();
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Port 0 means "any free port": find one now so it can be printed before pingora binds.
fn resolve_port(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let l = std::net::TcpListener::bind(addr)?;
    Ok(l.local_addr()?)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let rules = Arc::new(
        RulesStore::open(&args.rules)
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.rules.display()))?,
    );
    let registry = Registry::new(
        Duration::from_millis(args.heartbeat_ms),
        Duration::from_millis(args.lease_ttl_ms),
    );
    let metrics = Arc::new(Metrics::new()?);
    anyhow::ensure!(
        args.slo_cooldown_s >= 0.0,
        "bad settings:\n  --slo-cooldown-s must be 0 or more, got {}",
        args.slo_cooldown_s
    );
    let config = Config {
        drift_window: Duration::try_from_secs_f64(args.drift_window_s).unwrap_or(Duration::ZERO),
        drift_baseline_windows: args.drift_baseline_windows,
        slo_window: Duration::try_from_secs_f64(args.slo_window_s).unwrap_or(Duration::ZERO),
        slo_cooldown: Duration::try_from_secs_f64(args.slo_cooldown_s).unwrap_or(Duration::ZERO),
        max_body_bytes: args.max_body_bytes,
        max_header_bytes: args.max_header_bytes,
        classify_budget: Duration::from_millis(args.classify_budget_ms),
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        first_byte_timeout: Duration::from_millis(args.first_byte_timeout_ms),
        total_timeout: Duration::from_millis(args.total_timeout_ms),
        debug_headers: !args.no_debug_headers,
        max_buffered_bytes: args.max_buffered_bytes,
        body_timeout: Duration::from_millis(args.body_timeout_ms),
        keepalive_timeout: Duration::from_secs(args.keepalive_timeout_s),
        send_timeout: Duration::from_millis(args.send_timeout_ms),
        header_timeout: Duration::from_millis(args.header_timeout_ms),
        max_connections: args.max_connections,
    }
    .validated()
    .map_err(|problems| anyhow::anyhow!("bad settings:\n  {}", problems.join("\n  ")))?;
    let allowed_networks = if args.allow_networks.is_empty() {
        router::grpc::default_networks(args.addrs.grpc).context(
            "--allow-networks is required when the registry (--grpc) listens beyond loopback: \
             name the networks workers advertise addresses in",
        )?
    } else {
        args.allow_networks.clone()
    };
    anyhow::ensure!(
        args.admin_token.as_deref() != Some("") && args.registry_token.as_deref() != Some(""),
        "an empty --admin-token or --registry-token would let anyone in: give a token or none"
    );
    anyhow::ensure!(
        args.admin_token.is_some() || args.addrs.admin.ip().is_loopback(),
        "--admin {} listens beyond loopback: set --admin-token (or SWITCHYARD_ADMIN_TOKEN) so \
         reloads, explain and the lease hand-over are not open to the network",
        args.addrs.admin
    );
    let otel = proto::otel::Otel::from_env("switchyard-router", args.otlp_endpoint.as_deref())
        .map_err(anyhow::Error::msg)?;
    if otel.is_some() {
        tracing::info!("tracing on: spans go out over OTLP");
    }
    let shared = Shared::new(
        Arc::clone(&rules),
        Arc::clone(&registry),
        Arc::clone(&metrics),
        config,
        otel,
    );
    if args.registry_token.is_none() {
        tracing::warn!("no --registry-token: only workers on loopback may register");
    }
    let limits_store = match &args.limits_redis {
        Some(url) => {
            let store = router::shared_limits::SharedLimits::new(
                url,
                metrics.limits_store_up.clone(),
                metrics.limits_local_decisions.clone(),
            )
            .map_err(anyhow::Error::msg)?;
            let _ = shared.limiters.shared.set(Arc::clone(&store));
            Some(store)
        }
        None => None,
    };

    let listen = resolve_port(args.addrs.listen)?;
    let upgrade_sock = args.upgrade_sock.clone().unwrap_or_else(|| {
        PathBuf::from(format!("/tmp/switchyard-upgrade-{}.sock", listen.port()))
    });
    if args.upgrade {
        anyhow::ensure!(
            args.addrs.listen.port() != 0
                && args.addrs.grpc.port() != 0
                && args.addrs.admin.port() != 0,
            "--upgrade takes over a running router: give its --listen, --grpc and --admin addresses"
        );
        match fetch_leases(args.addrs.admin, args.admin_token.as_deref()) {
            Ok(leases) => {
                let n = registry.import(leases);
                tracing::info!(
                    workers = n,
                    "upgrade: took over the registered workers' leases"
                );
            }
            Err(e) => tracing::warn!(
                "upgrade: no leases from the running router's admin listener ({e:#}); \
                 workers register again within a heartbeat"
            ),
        }
    }
    let conf = ServerConf {
        threads: args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
            .max(1),
        // SIGTERM: listeners close at once, in-flight requests get the grace period, then
        // the runtimes one more second to wind down.
        grace_period_seconds: Some(args.shutdown_grace_s),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: upgrade_sock.display().to_string(),
        ..Default::default()
    };
    let opt = Opt {
        upgrade: args.upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    let phases = server.watch_execution_phase();

    // Control plane on its own runtime: gRPC registry, admin API, lease expiry, rules watcher.
    // A fresh start binds its listeners first, so a taken port stops it before anything
    // else. An upgrade first waits for the old process's proxy sockets (it sends them on
    // SIGQUIT and closes its gRPC and admin listeners), then binds gRPC and admin as the old
    // process lets go of them.
    let (std_grpc, std_admin) = if args.upgrade {
        println!(
            "UPGRADING waiting for the running router's sockets on {}: send it SIGQUIT",
            upgrade_sock.display()
        );
        server.bootstrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        (
            bind_when_free(args.addrs.grpc, deadline).context("bind gRPC")?,
            bind_when_free(args.addrs.admin, deadline).context("bind admin")?,
        )
    } else {
        let listeners = (
            std::net::TcpListener::bind(args.addrs.grpc)
                .with_context(|| format!("bind gRPC {}", args.addrs.grpc))?,
            std::net::TcpListener::bind(args.addrs.admin)
                .with_context(|| format!("bind admin {}", args.addrs.admin))?,
        );
        server.bootstrap();
        listeners
    };
    std_grpc.set_nonblocking(true)?;
    std_admin.set_nonblocking(true)?;
    let grpc_addr = std_grpc.local_addr()?;
    let admin_addr = std_admin.local_addr()?;

    let stop = Arc::new(AtomicBool::new(false));
    let watch_shared = Arc::clone(&shared);
    rules.watch(Duration::from_millis(500), Arc::clone(&stop), move |r| {
        watch_shared.on_reload(r)
    })?;

    let tls = registry_tls(&args)?;
    let mtls = args.registry_client_ca.is_some();
    let grpc_scheme = if tls.is_some() { "https" } else { "http" };
    let cp_shared = Arc::clone(&shared);
    let token = args.registry_token.clone();
    let admin_token = args.admin_token.clone();
    // a worker may not advertise one of these: the router would forward to itself
    let own_addresses = vec![listen, grpc_addr, admin_addr];
    let health_every =
        (args.health_check_ms > 0).then(|| Duration::from_millis(args.health_check_ms));
    let health_path = args.health_check_path.clone();
    let resolve_every = Duration::from_secs(args.resolve_every_s.max(1));
    std::thread::Builder::new()
        .name("control-plane".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("control plane runtime: {e}");
                    router::logging::exit(1);
                }
            };
            rt.block_on(async move {
                let (grpc, admin) = match (
                    tokio::net::TcpListener::from_std(std_grpc),
                    tokio::net::TcpListener::from_std(std_admin),
                ) {
                    (Ok(g), Ok(a)) => (g, a),
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::error!("control plane listeners: {e}");
                        router::logging::exit(1);
                    }
                };
                // imported leases start their TTL now, however long the hand-over took
                cp_shared.registry.renew_all();
                let expiry = tokio::spawn(Arc::clone(&cp_shared.registry).run_expiry());
                if let Some(store) = limits_store {
                    tokio::spawn(store.connect());
                }
                let (stop_cp, cp_stopped) = tokio::sync::watch::channel(false);
                let lifecycle = tokio::spawn(exit_when_idle(
                    Arc::clone(&cp_shared),
                    phases,
                    stop_cp,
                    expiry.abort_handle(),
                ));
                tokio::spawn(reload_on_sighup(Arc::clone(&cp_shared)));
                // drift windows end on time, whether or not requests come
                let drift = Arc::clone(&cp_shared);
                tokio::spawn(async move {
                    let every = (drift.drift.window() / 10)
                        .clamp(Duration::from_millis(50), Duration::from_secs(1));
                    let mut tick = tokio::time::interval(every);
                    loop {
                        tick.tick().await;
                        drift.drift.tick();
                    }
                });
                // static workers named by host: their addresses followed (DNS)
                let resolver = Arc::clone(&cp_shared);
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(resolve_every);
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        let s = Arc::clone(&resolver);
                        let _ = tokio::task::spawn_blocking(move || s.refresh_statics()).await;
                    }
                });
                if let Some(every) = health_every {
                    tokio::spawn(router::health::run(
                        Arc::clone(&cp_shared),
                        every,
                        health_path,
                    ));
                }
                let svc = router::grpc::RegistryService {
                    registry: Arc::clone(&cp_shared.registry),
                    rules: Arc::clone(&cp_shared.rules),
                    token,
                    metrics: Arc::clone(&cp_shared.metrics),
                    allowed_networks,
                    mtls,
                    own_addresses,
                };
                let mut builder = tonic::transport::Server::builder();
                if let Some(tls) = tls {
                    builder = match builder.tls_config(tls) {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::error!("registry TLS: {e}");
                            router::logging::exit(1);
                        }
                    };
                }
                let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                };
                let grpc_task = builder
                    .add_service(proto::registry_server::RegistryServer::new(svc))
                    .serve_with_incoming_shutdown(
                        tokio_stream_from(grpc),
                        stopped(cp_stopped.clone()),
                    );
                let admin_task = axum::serve(
                    admin,
                    router::admin::router(Arc::clone(&cp_shared), admin_token)
                        .into_make_service_with_connect_info::<router::admin::Peer>(),
                )
                .with_graceful_shutdown(stopped(cp_stopped));
                let (g, a) = tokio::join!(grpc_task, admin_task);
                if let Err(e) = g {
                    tracing::error!("gRPC server stopped: {e}");
                }
                if let Err(e) = a {
                    tracing::error!("admin server stopped: {e}");
                }
                // after an upgrade's hand-over: in-flight requests finish, then exit
                let _ = lifecycle.await;
            });
        })?;

    // The proxy behind the connection guards (header deadline, connection cap): what
    // `pingora::proxy::http_proxy_service` builds, wrapped.
    let limits = router::conn::ConnLimits {
        max_connections: shared.config.max_connections,
        header_timeout: shared.config.header_timeout,
    };
    let metrics = Arc::clone(&shared.metrics);
    let mut http = pingora::proxy::HttpProxy::new(
        SwitchyardProxy::new(shared),
        Arc::clone(&server.configuration),
    );
    http.handle_init_modules();
    let mut proxy = pingora::services::listening::Service::new(
        "Switchyard proxy".to_string(),
        router::conn::Guarded::new(http, limits, metrics),
    );
    // A 16 KiB write buffer downstream: a JSON answer's header and body leave in one send
    // (pingora's default of 1,460 bytes sent them apart). Streams are flushed chunk by
    // chunk regardless, so SSE latency is unchanged.
    proxy.add_listener(
        pingora::listeners::ListenerConfig::tcp(listen.to_string())
            .l4_buffer(pingora::listeners::L4BufferSettings::default().write(16 * 1024)),
    );
    server.add_service(proxy);
    println!(
        "LISTENING proxy=http://{listen} grpc={grpc_scheme}://{grpc_addr} admin=http://{admin_addr}"
    );
    tracing::info!(%listen, %grpc_addr, %admin_addr, rules = %args.rules.display(), "switchyard serving");
    server.run_forever();
}

/// The registry's TLS settings from the command line (files read now, so a bad path stops
/// the router at start with a clear error).
fn registry_tls(args: &ServeArgs) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&args.registry_tls_cert, &args.registry_tls_key) else {
        return Ok(None);
    };
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("read {}", p.display()));
    let mut tls = tonic::transport::ServerTlsConfig::new().identity(
        tonic::transport::Identity::from_pem(read(cert)?, read(key)?),
    );
    if let Some(ca) = &args.registry_client_ca {
        tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

/// `kill -HUP` re-reads the rules file, as the file watcher and `POST /admin/reload` do.
async fn reload_on_sighup(shared: Arc<router::state::Shared>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP: {e}");
            return;
        }
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading rules");
        let s = Arc::clone(&shared);
        let _ = tokio::task::spawn_blocking(move || s.reload_now()).await;
    }
}

/// pingora handles SIGTERM and SIGQUIT itself (listeners close, then it waits out the grace
/// period). This follows its phases:
/// - SIGTERM: `/readyz` answers 503 so load balancers stop sending;
/// - SIGQUIT (an upgrade): the gRPC and admin listeners close so workers and scrapers move
///   to the new process, and leases stop expiring here (heartbeats now go to the new one);
/// - then, once pingora has closed the proxy listeners, the process exits as soon as no
///   request is in flight instead of sleeping out the rest of the grace period.
async fn exit_when_idle(
    shared: Arc<router::state::Shared>,
    mut phases: tokio::sync::broadcast::Receiver<ExecutionPhase>,
    stop_control_plane: tokio::sync::watch::Sender<bool>,
    expiry: tokio::task::AbortHandle,
) {
    use std::sync::atomic::Ordering;
    use tokio::sync::broadcast::error::RecvError;
    let mut graceful = false;
    loop {
        let phase = match phases.recv().await {
            Ok(p) => p,
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        };
        match phase {
            ExecutionPhase::GracefulTerminate => {
                graceful = true;
                shared.shutting_down.store(true, Ordering::Relaxed);
                tracing::info!(
                    in_flight = shared.active_requests.load(Ordering::Relaxed),
                    "SIGTERM: not ready; exiting when in-flight requests finish (or the grace period ends)"
                );
            }
            ExecutionPhase::GracefulUpgradeTransferringFds => {
                graceful = true;
                shared.shutting_down.store(true, Ordering::Relaxed);
                expiry.abort();
                let _ = stop_control_plane.send(true);
                tracing::info!(
                    in_flight = shared.active_requests.load(Ordering::Relaxed),
                    "SIGQUIT: handing the listeners to the new process; exiting when in-flight requests finish"
                );
            }
            ExecutionPhase::ShutdownStarted if graceful => break,
            // pingora exits the process next: write out the queued lines first
            ExecutionPhase::ShutdownRuntimes | ExecutionPhase::Terminated => {
                router::logging::flush()
            }
            _ => {}
        }
    }
    // let pingora's listeners stop accepting before counting
    tokio::time::sleep(Duration::from_millis(200)).await;
    while shared.active_requests.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!("no request in flight: exiting");
    if let Some(otel) = &shared.otel {
        otel.shutdown();
    }
    router::logging::exit(0);
}

/// Binds `addr`, retrying while the process being replaced still holds it.
fn bind_when_free(addr: SocketAddr, deadline: Instant) -> anyhow::Result<std::net::TcpListener> {
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("{addr} is still taken"))),
        }
    }
}

/// The registered workers' leases from the running router's admin listener.
fn fetch_leases(
    admin: SocketAddr,
    token: Option<&str>,
) -> anyhow::Result<Vec<router::registry::ExportedLease>> {
    let mut target = admin;
    if target.ip().is_unspecified() {
        target.set_ip(if admin.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?;
        let mut req = client.get(format!("http://{target}/admin/registry/leases"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let leases = req.send().await?.error_for_status()?.json().await?;
        Ok(leases)
    })
}

/// `switchyard cost`: the running router's cost report, as a table or JSON.
fn cost(args: &CostArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body: serde_json::Value = rt.block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?;
        let mut query = vec![("window", args.window.to_string()), ("by", args.by.clone())];
        if let Some(b) = &args.baseline {
            query.push(("baseline", b.clone()));
        }
        let mut req = client
            .get(format!("http://{}/admin/cost", args.admin))
            .query(&query);
        if let Some(t) = &args.admin_token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await?;
        let status = r.status();
        let body: serde_json::Value = r.json().await?;
        if !status.is_success() {
            let message = body["error"]["message"].as_str().unwrap_or("no message");
            anyhow::bail!("{}: {status}: {message}", args.admin);
        }
        anyhow::Ok(body)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        let report: router::cost::Report = serde_json::from_value(body)?;
        print!("{}", router::cost::table(&report));
    }
    Ok(())
}

fn preempt(args: &PreemptArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let worker = args.worker.trim_end_matches('/');
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?;
        let mut req = client.post(format!(
            "{worker}/admin/preempt?deadline_s={}",
            args.deadline_s
        ));
        if let Some(t) = &args.token {
            req = req.bearer_auth(t);
        }
        let r = req
            .send()
            .await
            .with_context(|| format!("{worker}: no answer"))?;
        if !r.status().is_success() {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            anyhow::bail!("{worker}: {status}: {body}");
        }
        println!("{worker}: draining (deadline {} s)", args.deadline_s);
        // gone = its listener refuses; give it the deadline and a little more to exit
        let until =
            tokio::time::Instant::now() + Duration::from_secs(u64::from(args.deadline_s) + 5);
        while tokio::time::Instant::now() < until {
            if client.get(format!("{worker}/health")).send().await.is_err() {
                println!("{worker}: gone");
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        anyhow::bail!(
            "{worker}: still up {} s after the notice",
            args.deadline_s + 5
        )
    })
}

fn tokio_stream_from(l: tokio::net::TcpListener) -> tokio_stream::wrappers::TcpListenerStream {
    tokio_stream::wrappers::TcpListenerStream::new(l)
}
