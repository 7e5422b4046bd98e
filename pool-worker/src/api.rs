//! The OpenAI-compatible HTTP API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//! `/health`, `/metrics`, `/admin/preempt`, and (only when enabled) `/admin/faults`.
//!
//! This layer parses and validates the JSON, hands the prompt to the model's side
//! ([`Prompt`], which renders the chat template and tokenizes), submits a [`Job`] and
//! answers from its events — holding the response until the first token (the commit
//! point), then sending the header at once and the rest as a server-sent event stream, or
//! (not streaming) as one JSON body when the generation ends. Tokenization runs on a
//! blocking thread, never on the runtime that answers `/health` and heartbeats.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use model_meta::ChatMessage;
use opentelemetry::KeyValue;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::engine::{Engine, Event, GenParams, Job, Prompt, Usage};
use crate::error::{WorkerError, error_body, openai_error};
use crate::trace::WorkerTrace;

/// What an answer's task holds until the answer ends: its place in `AppState::active`, and
/// its trace (ended with the answer).
type Held = (Active, Option<WorkerTrace>);

/// Ends a held trace: with the usage when the answer completed, else with why it did not.
fn end_trace(trace: &mut Option<WorkerTrace>, usage: Option<&Usage>, error: Option<&str>) {
    if let Some(t) = trace.take() {
        t.finish(usage, error);
    }
}

/// Faults the worker injects on request, for failover tests. Only routed when enabled.
#[derive(Debug, Default)]
pub struct Faults {
    /// Fail this many next requests with 503 `preempted` before any work.
    pub fail_next: AtomicU32,
    /// Drop the connection after this many content chunks (0 = never); not streaming,
    /// after this many tokens' text, once the header is sent.
    pub drop_after_tokens: AtomicU32,
    /// Delay before the work starts, i.e. before the first token (milliseconds).
    pub delay_first_token_ms: AtomicU32,
    /// Exit the process abruptly when the next request arrives.
    pub exit_next: AtomicBool,
}

/// Why and until when the worker is shutting down; `AppState::shutdown` wakes `main`.
#[derive(Debug, Default)]
pub struct ShutdownRequest {
    pub deadline_s: AtomicU32,
}

pub struct AppState {
    pub engine: Engine,
    pub faults: Option<Arc<Faults>>,
    pub draining: AtomicBool,
    /// Notified by `POST /admin/preempt`; `main` then drains and exits.
    pub shutdown: tokio::sync::Notify,
    pub shutdown_request: ShutdownRequest,
    /// Requests between arrival and the end of their answer (streams included).
    pub active: AtomicUsize,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Besides loopback callers (a spot-interruption watcher on the host), `POST
    /// /admin/preempt` is accepted from callers presenting this token (the registry token).
    pub admin_token: Option<String>,
    /// The tracer, when tracing is on ([`crate::trace`]).
    pub otel: Option<proto::otel::Otel>,
    /// The GPU, when the worker runs on one and NVML answers ([`crate::gpu`]).
    pub gpu: Option<crate::gpu::Gpu>,
}

/// Counts a request in `AppState::active` until dropped.
struct Active(Arc<AppState>);

impl Active {
    fn new(s: &Arc<AppState>) -> Self {
        s.active.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(s))
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The default body cap for a model with a `max_context`-token window: 16 bytes per token
/// (a token is ~4 bytes of text; JSON escaping and chat structure leave room), at least
/// 1 MiB. A body much larger than the window can only end in `context_length_exceeded`, after
/// costing memory and tokenizer time.
pub fn default_max_body_bytes(max_context: usize) -> usize {
    max_context.saturating_mul(16).max(1 << 20)
}

pub fn router(state: Arc<AppState>) -> Router {
    let mut r = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/admin/preempt", post(preempt));
    if state.faults.is_some() {
        r = r.route("/admin/faults", post(set_faults));
    }
    let limit = state.max_body_bytes;
    r.layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    if s.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else {
        "ok".into_response()
    }
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{ "id": s.engine.model.name, "object": "model", "created": 0, "owned_by": "switchyard" }]
    }))
    .into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    match s.engine.stats.metrics.encode() {
        Ok(mut body) => {
            if let Some(gpu) = &s.gpu {
                body.extend_from_slice(gpu.encode().as_bytes());
            }
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
        }
        Err(e) => {
            tracing::warn!("metrics: {e}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn set_faults(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let Some(faults) = &s.faults else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return WorkerError::bad(format!("invalid JSON: {e}"), None).into_response(),
    };
    let set = |key: &str, target: &AtomicU32| {
        if let Some(n) = v.get(key).and_then(Value::as_u64) {
            target.store(n.min(u64::from(u32::MAX)) as u32, Ordering::Relaxed);
        }
    };
    set("fail_next", &faults.fail_next);
    set("drop_after_tokens", &faults.drop_after_tokens);
    set("delay_first_token_ms", &faults.delay_first_token_ms);
    set("token_delay_ms", &s.engine.stats.fault_token_delay_ms);
    if let Some(b) = v.get("exit_next").and_then(Value::as_bool) {
        faults.exit_next.store(b, Ordering::Relaxed);
    }
    axum::Json(json!({
        "fail_next": faults.fail_next.load(Ordering::Relaxed),
        "drop_after_tokens": faults.drop_after_tokens.load(Ordering::Relaxed),
        "delay_first_token_ms": faults.delay_first_token_ms.load(Ordering::Relaxed),
        "token_delay_ms": s.engine.stats.fault_token_delay_ms.load(Ordering::Relaxed),
        "exit_next": faults.exit_next.load(Ordering::Relaxed),
    }))
    .into_response()
}

/// Whether a preemption notice from `peer` presenting `presented` may drain the worker:
/// loopback callers always, others only with the configured token (constant-time compare).
fn preempt_allowed(
    peer: std::net::SocketAddr,
    token: Option<&str>,
    presented: Option<&str>,
) -> bool {
    let token_ok = match (token, presented) {
        (Some(t), Some(p)) => bool::from(subtle::ConstantTimeEq::ct_eq(t.as_bytes(), p.as_bytes())),
        _ => false,
    };
    peer.ip().is_loopback() || token_ok
}

/// Checks a `POST /admin/preempt` notice (the worker's and a sidecar's): who may send it
/// ([`preempt_allowed`]) and its `deadline_s` (default 30). The refusal is the answer.
pub fn preemption_notice(
    peer: std::net::SocketAddr,
    token: Option<&str>,
    headers: &axum::http::HeaderMap,
    query: Option<&str>,
) -> Result<u32, Box<Response>> {
    // Draining takes a worker out of service: only the host itself (loopback) or a holder
    // of the registry token may ask for it.
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !preempt_allowed(peer, token, presented) {
        let message = format!(
            "preemption notices are accepted from loopback, or with the registry token (caller {peer})"
        );
        return Err(Box::new(openai_error(
            StatusCode::FORBIDDEN,
            "permission_error",
            "forbidden",
            &message,
            None,
        )));
    }
    let deadline = query
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("deadline_s="))
        .map(str::parse::<u32>);
    match deadline {
        None => Ok(30),
        Some(Ok(d)) => Ok(d),
        Some(Err(_)) => Err(Box::new(
            WorkerError::bad(
                "deadline_s must be a whole number of seconds",
                Some("deadline_s"),
            )
            .into_response(),
        )),
    }
}

/// A spot-interruption notice: stop taking work, tell the router, finish in-flight
/// requests, deregister and exit — within `deadline_s` (default 30).
async fn preempt(
    State(s): State<Arc<AppState>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Response {
    let deadline = match preemption_notice(peer, s.admin_token.as_deref(), &headers, q.as_deref()) {
        Ok(d) => d,
        Err(refused) => return *refused,
    };
    s.draining.store(true, Ordering::Relaxed);
    s.shutdown_request
        .deadline_s
        .store(deadline, Ordering::Relaxed);
    s.shutdown.notify_one();
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({ "draining": true, "deadline_s": deadline })),
    )
        .into_response()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// Request keys accepted; anything else is refused rather than silently ignored.
const ACCEPTED: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "user",
    "continue_final_message",
    "add_generation_prompt",
];

struct Parsed {
    prompt: Prompt,
    params: GenParams,
    stream: bool,
    include_usage: bool,
}

fn parse(s: &AppState, kind: Kind, body: &[u8]) -> Result<Parsed, WorkerError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| WorkerError::bad(format!("invalid JSON body: {e}"), None))?;
    let obj = v
        .as_object()
        .ok_or_else(|| WorkerError::bad("the body must be a JSON object", None))?;
    if let Some(k) = obj.keys().find(|k| !ACCEPTED.contains(&k.as_str())) {
        return Err(WorkerError::BadRequest {
            message: format!("unsupported parameter `{k}`"),
            param: None,
            code: "unsupported_parameter",
        });
    }
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| WorkerError::bad("`model` is required", Some("model")))?;
    if model != s.engine.model.name {
        return Err(WorkerError::UnknownModel(model.to_string()));
    }
    if obj.get("n").is_some_and(|n| n.as_u64() != Some(1)) {
        return Err(WorkerError::bad("only n=1 is supported", Some("n")));
    }
    let mut continues_words = 0;
    let prompt = match kind {
        Kind::Chat => {
            let msgs = obj
                .get("messages")
                .and_then(Value::as_array)
                .ok_or_else(|| WorkerError::bad("`messages` must be an array", Some("messages")))?;
            if msgs.is_empty() {
                return Err(WorkerError::bad(
                    "`messages` must not be empty",
                    Some("messages"),
                ));
            }
            let accepts = &s.engine.model.modalities;
            let mut msgs = msgs
                .iter()
                .map(|m| message(m, accepts))
                .collect::<Result<Vec<_>, _>>()?;
            let flag = |k: &'static str| match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(_) => Err(WorkerError::bad(
                    format!("`{k}` must be a boolean"),
                    Some(k),
                )),
            };
            let continuing = flag("continue_final_message")?.unwrap_or(false);
            match (continuing, flag("add_generation_prompt")?) {
                (true, Some(true)) => {
                    return Err(WorkerError::bad(
                        "`continue_final_message` and `add_generation_prompt` cannot both be true",
                        Some("add_generation_prompt"),
                    ));
                }
                (false, Some(false)) => {
                    return Err(WorkerError::bad(
                        "`add_generation_prompt: false` is supported only with `continue_final_message: true`",
                        Some("add_generation_prompt"),
                    ));
                }
                _ => {}
            }
            if continuing {
                let answer = msgs
                    .pop()
                    .filter(|m| m.role == "assistant")
                    .ok_or_else(|| {
                        WorkerError::bad(
                            "`continue_final_message` needs an assistant message last",
                            Some("messages"),
                        )
                    })?;
                continues_words = answer.content.split_whitespace().count();
                Prompt::Continue(msgs, answer.content)
            } else {
                Prompt::Chat(msgs)
            }
        }
        Kind::Completion => Prompt::Text(
            obj.get("prompt")
                .and_then(Value::as_str)
                .ok_or_else(|| WorkerError::bad("`prompt` must be a string", Some("prompt")))?
                .to_string(),
        ),
    };
    let max_tokens = match obj
        .get("max_completion_tokens")
        .or_else(|| obj.get("max_tokens"))
    {
        None | Some(Value::Null) => 256,
        Some(v) => v.as_u64().filter(|n| *n > 0).ok_or_else(|| {
            WorkerError::bad(
                "`max_tokens` must be a positive integer",
                Some("max_tokens"),
            )
        })? as usize,
    };
    let num = |k: &'static str, lo: f64, hi: f64| -> Result<Option<f64>, WorkerError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| (lo..=hi).contains(x))
                .map(Some)
                .ok_or_else(|| {
                    WorkerError::bad(format!("`{k}` must be a number in {lo}..={hi}"), Some(k))
                }),
        }
    };
    let temperature = num("temperature", 0.0, 2.0)?;
    let top_p = num("top_p", 0.0, 1.0)?;
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => rand::random::<u64>(),
        Some(v) => v.as_u64().ok_or_else(|| {
            WorkerError::bad("`seed` must be a non-negative integer", Some("seed"))
        })?,
    };
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| WorkerError::bad("`stop` must be strings", Some("stop")))?,
        Some(_) => {
            return Err(WorkerError::bad(
                "`stop` must be a string or up to 4 strings",
                Some("stop"),
            ));
        }
    };
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(Parsed {
        prompt,
        params: GenParams {
            max_tokens,
            temperature: temperature.or(Some(1.0)),
            top_p,
            seed,
            stop,
            ignore_eos: false,
            continues_words,
            replay_tokens: 0,
        },
        stream,
        include_usage,
    })
}

fn message(v: &Value, accepts: &[String]) -> Result<ChatMessage, WorkerError> {
    let role = v
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| WorkerError::bad("each message needs a `role`", Some("messages")))?;
    let content = match v.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        text.push_str(p.get("text").and_then(Value::as_str).unwrap_or_default())
                    }
                    Some(kind @ ("image_url" | "input_audio"))
                        if accepts.iter().any(|m| {
                            kind.starts_with(m.as_str()) || kind.ends_with(m.as_str())
                        }) =>
                    {
                        // The simulated backend accepts media; it stands for them in the prompt.
                        text.push_str(if kind == "image_url" {
                            "<image>"
                        } else {
                            "<audio>"
                        });
                    }
                    Some(other) => {
                        return Err(WorkerError::bad(
                            format!(
                                "this model accepts {}, not `{other}` parts",
                                accepts.join(", ")
                            ),
                            Some("messages"),
                        ));
                    }
                    None => {
                        return Err(WorkerError::bad(
                            "content parts need a `type`",
                            Some("messages"),
                        ));
                    }
                }
            }
            text
        }
        None | Some(Value::Null) => String::new(),
        Some(_) => {
            return Err(WorkerError::bad(
                "`content` must be a string or an array of parts",
                Some("messages"),
            ));
        }
    };
    Ok(ChatMessage {
        role: role.to_string(),
        content,
    })
}

/// Answers from the simulated backend say so, all the way to the client.
fn label(simulated: bool, mut r: Response) -> Response {
    if simulated {
        r.headers_mut().insert(
            "x-switchyard-backend",
            axum::http::HeaderValue::from_static("sim"),
        );
    }
    r
}

async fn chat(
    State(s): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    answer(s, Kind::Chat, &headers, body).await
}

async fn completions(
    State(s): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    answer(s, Kind::Completion, &headers, body).await
}

/// The caller's `x-request-id` (the router always sends one) when it is 1–128 visible
/// ASCII characters: the answer's `id` is named after it, as vLLM does, so one id follows
/// the request from the client through the router's log to the worker's answer.
fn request_id(headers: &axum::http::HeaderMap) -> Option<String> {
    let v = headers.get("x-request-id")?.to_str().ok()?;
    ((1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic())).then(|| v.to_string())
}

/// The answer or the OpenAI-shaped error, labelled when it comes from the sim backend.
async fn answer(
    s: Arc<AppState>,
    kind: Kind,
    headers: &axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let sim = s.engine.model.simulated;
    let mut trace = s.otel.as_ref().map(|o| {
        let name = match kind {
            Kind::Chat => "POST /v1/chat/completions",
            Kind::Completion => "POST /v1/completions",
        };
        let t = WorkerTrace::start(o, headers, name, &s.engine.model.name);
        t.attribute(KeyValue::new(
            "switchyard.request_id",
            request_id(headers).unwrap_or_default(),
        ));
        t
    });
    let r = serve(s, kind, request_id(headers), body, &mut trace)
        .await
        .unwrap_or_else(|e| {
            if let Some(t) = trace.take() {
                t.finish(None, Some(&e.to_string()));
            }
            e.into_response()
        });
    label(sim, r)
}

async fn serve(
    s: Arc<AppState>,
    kind: Kind,
    request_id: Option<String>,
    body: Bytes,
    trace: &mut Option<WorkerTrace>,
) -> Result<Response, WorkerError> {
    if s.draining.load(Ordering::Relaxed) {
        return Err(WorkerError::Unavailable("draining"));
    }
    if let Some(f) = &s.faults
        && f.fail_next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    {
        return Err(WorkerError::Unavailable("preempted"));
    }
    let active = Active::new(&s);
    let mut p = parse(&s, kind, &body)?;
    drop(body);
    // The model's work (template, tokenizer, context window) once the request is valid, off
    // the async runtime: a multi-megabyte prompt takes seconds to tokenize, and `/health`
    // and the registration heartbeat run on the same runtime.
    let model = Arc::clone(&s.engine.model);
    let t_tokenize = Instant::now();
    let (prompt, answer) = tokio::task::spawn_blocking(move || model.tokenize_parts(p.prompt))
        .await
        .map_err(|e| WorkerError::Engine(format!("tokenization stopped: {e}")))??;
    // a greedy continuation replays its answer's start as decode produced it (see
    // `GenParams::replay_tokens`); a sampled one is not the same sample either way
    if p.params.temperature == Some(0.0) {
        p.params.replay_tokens = answer;
    }
    if let Some(t) = trace {
        let n = i64::try_from(prompt.len()).unwrap_or(i64::MAX);
        t.stage(
            "tokenize",
            t_tokenize,
            Instant::now(),
            vec![KeyValue::new("gen_ai.usage.input_tokens", n)],
        );
    }
    // What the context window leaves after the prompt bounds the answer (`tokenize` refused
    // a prompt that fills the window), so a huge `max_tokens` cannot run away.
    let room = s.engine.model.max_context.saturating_sub(prompt.len());
    p.params.max_tokens = p.params.max_tokens.min(room);
    let mut drop_after = 0;
    if let Some(f) = &s.faults {
        if f.exit_next.load(Ordering::Relaxed) {
            tracing::error!("fault injection: exiting abruptly");
            std::process::exit(3);
        }
        let delay = f.delay_first_token_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(u64::from(delay))).await;
        }
        drop_after = f.drop_after_tokens.load(Ordering::Relaxed);
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    s.engine.submit(Job {
        prompt,
        params: p.params,
        events: tx,
    })?;
    // Commit point: nothing is sent to the client until the first token (or the end) exists.
    // A client that leaves before then drops this future and `rx` with it: the engine drops
    // the job from its queue or its batch.
    let first = rx
        .recv()
        .await
        .ok_or_else(|| WorkerError::Engine("engine dropped the request".into()))?;
    if let Event::Failed(e) = first {
        return Err(WorkerError::Engine(e));
    }
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        request_id.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
    );
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let meta = Meta {
        id,
        created,
        model: s.engine.model.name.clone(),
        kind,
    };
    let trace = trace.take();
    if p.stream {
        Ok(stream_response(
            meta,
            first,
            rx,
            p.include_usage,
            drop_after,
            (active, trace),
        ))
    } else {
        Ok(json_response(meta, first, rx, drop_after, (active, trace)))
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

fn finish(u: &Usage) -> &'static str {
    if u.finish_length { "length" } else { "stop" }
}

impl Meta {
    fn full(&self, text: &str, u: Usage) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                json!({ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": finish(&u) })
            }
            Kind::Completion => json!({ "index": 0, "text": text, "finish_reason": finish(&u) }),
        };
        json!({
            "id": self.id, "object": if self.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
            "created": self.created, "model": self.model, "choices": [choice], "usage": u,
        })
    }

    fn chunk(&self, delta: Option<Value>, text: Option<&str>, finish: Option<&str>) -> Bytes {
        let choice = match self.kind {
            Kind::Chat => {
                json!({ "index": 0, "delta": delta.unwrap_or_else(|| json!({})), "finish_reason": finish })
            }
            Kind::Completion => {
                json!({ "index": 0, "text": text.unwrap_or_default(), "finish_reason": finish })
            }
        };
        self.frame(json!({
            "id": self.id, "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created, "model": self.model, "choices": [choice],
        }))
    }

    fn frame(&self, v: Value) -> Bytes {
        Bytes::from(format!("data: {v}\n\n"))
    }
}

/// A non-streaming answer past the commit point: the header now, the JSON body when the
/// generation ends. Chunked, so a failure after the header cuts the body (the client sees an
/// incomplete answer, never a valid short one); a client that leaves closes the body channel,
/// which drops `rx` and stops the engine.
fn json_response(
    meta: Meta,
    first: Event,
    mut rx: mpsc::UnboundedReceiver<Event>,
    drop_after: u32,
    held: Held,
) -> Response {
    let (tx, out) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    tokio::spawn(async move {
        let (_active, mut trace) = held;
        let mut text = String::new();
        let mut pieces = 0u32;
        let mut ev = Some(first);
        loop {
            match ev {
                Some(Event::Text(_)) if drop_after > 0 && pieces == drop_after => {
                    end_trace(
                        &mut trace,
                        None,
                        Some("fault injection: connection dropped"),
                    );
                    let err = std::io::Error::other("fault injection: connection dropped");
                    let _ = tx.send(Err(err)).await;
                    return;
                }
                Some(Event::Text(t)) => {
                    pieces += 1;
                    text.push_str(&t);
                }
                Some(Event::Done(u)) => {
                    end_trace(&mut trace, Some(&u), None);
                    let body = meta.full(&text, u).to_string();
                    let _ = tx.send(Ok(Bytes::from(body))).await;
                    return;
                }
                Some(Event::Failed(e)) => {
                    tracing::warn!("generation failed after the commit point: {e}");
                    end_trace(&mut trace, None, Some(&e));
                    let _ = tx.send(Err(std::io::Error::other(e))).await;
                    return;
                }
                None => {
                    tracing::warn!("the engine dropped a request after the commit point");
                    end_trace(&mut trace, None, Some("engine dropped the request"));
                    let err = std::io::Error::other("engine dropped the request");
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            }
            ev = tokio::select! {
                e = rx.recv() => e,
                () = tx.closed() => {
                    // client gone; dropping rx stops the engine
                    end_trace(&mut trace, None, Some("the client left"));
                    return;
                }
            };
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(out));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn stream_response(
    meta: Meta,
    first: Event,
    mut rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
    drop_after: u32,
    held: Held,
) -> Response {
    let (tx, out) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    tokio::spawn(async move {
        let (_active, mut trace) = held;
        let mut content_chunks = 0u32;
        let mut frames = Vec::new();
        if meta.kind == Kind::Chat {
            frames.push(meta.chunk(
                Some(json!({ "role": "assistant", "content": "" })),
                None,
                None,
            ));
        }
        let mut ev = Some(first);
        while let Some(e) = ev {
            match e {
                Event::Text(t) => {
                    if drop_after > 0 && content_chunks == drop_after {
                        // Fault injection: break the connection mid-stream, after exactly
                        // `drop_after` content chunks. The error aborts the connection at
                        // once, dropping whatever the transport has not written yet, so the
                        // chunks already sent get time to go out first.
                        end_trace(
                            &mut trace,
                            None,
                            Some("fault injection: connection dropped"),
                        );
                        let err = std::io::Error::other("fault injection: connection dropped");
                        for f in frames.drain(..) {
                            let _ = tx.send(Ok(f)).await;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        let _ = tx.send(Err(err)).await;
                        return;
                    }
                    content_chunks += 1;
                    frames.push(meta.chunk(Some(json!({ "content": t })), Some(&t), None));
                }
                Event::Done(u) => {
                    end_trace(&mut trace, Some(&u), None);
                    frames.push(meta.chunk(None, None, Some(finish(&u))));
                    if include_usage {
                        frames.push(meta.frame(json!({
                            "id": meta.id,
                            "object": if meta.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                            "created": meta.created,
                            "model": meta.model, "choices": [], "usage": u,
                        })));
                    }
                    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
                }
                Event::Failed(err) => {
                    end_trace(&mut trace, None, Some(&err));
                    frames.push(meta.frame(error_body(
                        "server_error",
                        "inference_failed",
                        &err,
                        None,
                    )));
                    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
                }
            }
            for f in frames.drain(..) {
                if tx.send(Ok(f)).await.is_err() {
                    // client gone; dropping rx stops the engine
                    end_trace(&mut trace, None, Some("the client left"));
                    return;
                }
            }
            ev = tokio::select! {
                e = rx.recv() => e,
                () = tx.closed() => {
                    end_trace(&mut trace, None, Some("the client left"));
                    return;
                }
            };
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(out));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_body_cap_follows_the_context_window() {
        assert_eq!(super::default_max_body_bytes(2048), 1 << 20);
        assert_eq!(super::default_max_body_bytes(131_072), 2 << 20);
        assert_eq!(super::default_max_body_bytes(usize::MAX), usize::MAX);
    }

    #[test]
    fn preemption_notices_need_loopback_or_the_token() {
        let local: std::net::SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: std::net::SocketAddr = "10.0.0.5:5000".parse().unwrap();
        assert!(super::preempt_allowed(local, None, None));
        assert!(!super::preempt_allowed(remote, None, None));
        assert!(!super::preempt_allowed(remote, None, Some("x")));
        assert!(!super::preempt_allowed(
            remote,
            Some("s3cret"),
            Some("wrong")
        ));
        assert!(!super::preempt_allowed(remote, Some("s3cret"), None));
        assert!(super::preempt_allowed(
            remote,
            Some("s3cret"),
            Some("s3cret")
        ));
    }
}
