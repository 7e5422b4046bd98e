//! A fast mock OpenAI upstream for the load harness, usable as a static worker.
//!
//! `POST /v1/chat/completions`: a fixed ~1.4 KB JSON answer, or with `"stream": true` an SSE
//! stream of `--chunks` chunks, `--ttft-ms` before the first and `--itl-ms` between chunks.
//! The request body is read in full (as a real server would) but not parsed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Delay before the first byte of an answer (milliseconds).
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// Delay between SSE chunks (milliseconds).
    #[arg(long, default_value_t = 0)]
    itl_ms: u64,
    /// SSE chunks per streamed answer.
    #[arg(long, default_value_t = 16)]
    chunks: usize,
}

struct Mock {
    json: Bytes,
    chunk: Bytes,
    args: Args,
}

fn answer_json() -> Bytes {
    let content =
        "Switchyard routes each request to the cheapest pool that can serve it. ".repeat(17);
    let v = serde_json::json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": "mock",
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": "stop" }],
        "usage": { "prompt_tokens": 250, "completion_tokens": 300, "total_tokens": 550 }
    });
    Bytes::from(v.to_string())
}

async fn chat(State(m): State<Arc<Mock>>, body: Bytes) -> Response {
    let stream = memchr_stream(&body);
    if m.args.ttft_ms > 0 {
        tokio::time::sleep(Duration::from_millis(m.args.ttft_ms)).await;
    }
    if !stream {
        return ([(header::CONTENT_TYPE, "application/json")], m.json.clone()).into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(8);
    let m2 = Arc::clone(&m);
    tokio::spawn(async move {
        for i in 0..m2.args.chunks {
            if i > 0 && m2.args.itl_ms > 0 {
                tokio::time::sleep(Duration::from_millis(m2.args.itl_ms)).await;
            }
            if tx.send(Ok(m2.chunk.clone())).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap_or_else(|_| axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `"stream":true` anywhere in the body (the mock does not parse JSON).
fn memchr_stream(body: &[u8]) -> bool {
    body.windows(13).any(|w| w == b"\"stream\":true")
        || body.windows(14).any(|w| w == b"\"stream\": true")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let chunk = Bytes::from(format!(
        "data: {}\n\n",
        serde_json::json!({ "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": "mock",
            "choices": [{ "index": 0, "delta": { "content": "token " }, "finish_reason": null }] })
    ));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("LISTENING http://{}", listener.local_addr()?);
    let mock = Arc::new(Mock {
        json: answer_json(),
        chunk,
        args,
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(|| async { axum::Json(serde_json::json!({ "object": "list", "data": [{ "id": "mock", "object": "model" }] })) }))
        .route("/health", get(|| async { "ok" }))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
        .with_state(mock);
    // Small SSE writes go out at once (no Nagle wait for the peer's delayed ACK).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await
}
