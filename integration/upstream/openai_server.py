"""A small OpenAI-compatible server that is not Switchyard's, for the upstream and engine tests.

Standard library only. It answers `POST /v1/chat/completions` (JSON, or SSE when `stream`
is true); with `--api-key`, only requests with `Authorization: Bearer <key>` (else
OpenAI's 401 `invalid_api_key`). Optionally over HTTPS (`--cert`/`--key`). It reports what
it saw at `GET /seen` (the Authorization and Host headers of each chat request) so a test
can check that the router sent the pool's key, never the client's.

With `--engine vllm` it behaves as a vLLM server does towards a router (the engine tests'
stand-in where a real vLLM cannot run): `GET /health` answers 200 with an empty body,
`GET /v1/models` lists `--model` with its `max_model_len`, `GET /metrics` exports vLLM's
load gauges (`vllm:num_requests_running` counts the requests it is answering,
`vllm:num_requests_waiting` is what `/control` set), and a stream's HTTP header goes out
at once, before the first token (`--first-token-ms` later), as vLLM's does.
`POST /control` (JSON: `first_token_ms`, `token_ms`, `waiting`) changes that while it runs.

    python3 openai_server.py [--api-key K] [--cert C --key K] [--host 127.0.0.1]
                             [--engine vllm --model M --max-model-len N]
    -> prints "LISTENING <port>" once it serves
"""

import argparse
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SEEN = []
LOCK = threading.Lock()
STATE = {"running": 0, "waiting": 0, "first_token_ms": 0, "token_ms": 0, "generated": 0}


def vllm_metrics(model):
    """vLLM's load metrics, named and typed as vLLM exports them (see
    pool-worker/tests/data/engine-metrics/vllm.prom for a real scrape)."""
    with LOCK:
        running, waiting, generated = STATE["running"], STATE["waiting"], STATE["generated"]
    label = f'{{engine="0",model_name="{model}"}}'
    return (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f"vllm:num_requests_running{label} {float(running)}\n"
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f"vllm:num_requests_waiting{label} {float(waiting)}\n"
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f"vllm:kv_cache_usage_perc{label} {min(1.0, 0.05 * running)}\n"
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
        "# TYPE vllm:generation_tokens_total counter\n"
        f"vllm:generation_tokens_total{label} {float(generated)}\n"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--api-key")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--engine", choices=["plain", "vllm"], default="plain")
    ap.add_argument("--model", default="ext-model")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--first-token-ms", type=int, default=0)
    ap.add_argument("--token-ms", type=int, default=0)
    args = ap.parse_args()
    STATE["first_token_ms"] = args.first_token_ms
    STATE["token_ms"] = args.token_ms
    vllm = args.engine == "vllm"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def send_json(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            model = {"id": args.model, "object": "model", "owned_by": "vllm"}
            if vllm:
                model["max_model_len"] = args.max_model_len
            if self.path == "/seen":
                with LOCK:
                    self.send_json(200, SEEN)
            elif self.path == "/health" and vllm:
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()
            elif self.path == "/metrics" and vllm:
                data = vllm_metrics(args.model).encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif self.path in ("/health", "/v1/models"):
                self.send_json(200, {"object": "list", "data": [model]})
            else:
                self.send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

        def do_POST(self):
            length = int(self.headers.get("content-length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path == "/control":
                with LOCK:
                    for k in ("first_token_ms", "token_ms", "waiting"):
                        if k in body:
                            STATE[k] = int(body[k])
                    self.send_json(200, {k: STATE[k] for k in ("first_token_ms", "token_ms", "waiting")})
                return
            auth = self.headers.get("authorization")
            with LOCK:
                SEEN.append({"authorization": auth, "host": self.headers.get("host")})
            if args.api_key is not None and auth != f"Bearer {args.api_key}":
                self.send_json(401, {"error": {"message": "Incorrect API key provided.",
                                               "type": "invalid_request_error", "param": None,
                                               "code": "invalid_api_key"}})
                return
            with LOCK:
                STATE["running"] += 1
            try:
                self.answer(body)
            finally:
                with LOCK:
                    STATE["running"] -= 1

        def answer(self, body):
            text = "hello from a server that is not Switchyard"
            words = text.split(" ")
            usage = {"prompt_tokens": 5, "completion_tokens": len(words) + 2, "total_tokens": 16}
            with LOCK:
                first_ms, token_ms = STATE["first_token_ms"], STATE["token_ms"]
            if body.get("stream"):
                # the header first, as vLLM sends it, then the tokens
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                time.sleep(first_ms / 1000)
                frames = []
                for word in words:
                    frames.append({"id": "x", "object": "chat.completion.chunk", "model": body.get("model"),
                                   "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]})
                frames.append({"id": "x", "object": "chat.completion.chunk", "model": body.get("model"),
                               "choices": [], "usage": usage})
                for i, f in enumerate(frames):
                    if i and token_ms:
                        time.sleep(token_ms / 1000)
                    chunk = f"data: {json.dumps(f)}\n\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                    with LOCK:
                        STATE["generated"] += 1
                done = b"data: [DONE]\n\n"
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
                return
            time.sleep((first_ms + token_ms * len(words)) / 1000)
            with LOCK:
                STATE["generated"] += len(words)
            self.send_json(200, {"id": "x", "object": "chat.completion", "model": body.get("model"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}],
                                 "usage": usage})

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            # a client (the router) that hung up: nothing to report
            if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                super().handle_error(request, client_address)

    server = Server((args.host, args.port), Handler)
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"LISTENING {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
