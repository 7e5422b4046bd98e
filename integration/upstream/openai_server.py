"""A small OpenAI-compatible server that is not Switchyard's, for the upstream tests.

Standard library only. It answers `POST /v1/chat/completions` (JSON, or SSE when `stream`
is true) only with `Authorization: Bearer <--api-key>` (else OpenAI's 401
`invalid_api_key`), optionally over HTTPS (`--cert`/`--key`), and reports what it saw at
`GET /seen` (the Authorization and Host headers of each chat request) so a test can check
that the router sent the pool's key, never the client's.

    python3 openai_server.py --api-key K [--cert C --key K] [--host 127.0.0.1]
    -> prints "LISTENING <port>" once it serves
"""

import argparse
import json
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SEEN = []
LOCK = threading.Lock()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    args = ap.parse_args()

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
            if self.path == "/seen":
                with LOCK:
                    self.send_json(200, SEEN)
            elif self.path in ("/health", "/v1/models"):
                self.send_json(200, {"object": "list", "data": [{"id": "ext-model", "object": "model"}]})
            else:
                self.send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

        def do_POST(self):
            length = int(self.headers.get("content-length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            auth = self.headers.get("authorization")
            with LOCK:
                SEEN.append({"authorization": auth, "host": self.headers.get("host")})
            if auth != f"Bearer {args.api_key}":
                self.send_json(401, {"error": {"message": "Incorrect API key provided.",
                                               "type": "invalid_request_error", "param": None,
                                               "code": "invalid_api_key"}})
                return
            text = "hello from a server that is not Switchyard"
            usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
            if body.get("stream"):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                frames = []
                for word in text.split(" "):
                    frames.append({"id": "x", "object": "chat.completion.chunk", "model": body.get("model"),
                                   "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]})
                frames.append({"id": "x", "object": "chat.completion.chunk", "model": body.get("model"),
                               "choices": [], "usage": usage})
                for f in frames:
                    chunk = f"data: {json.dumps(f)}\n\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                done = b"data: [DONE]\n\n"
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
                return
            self.send_json(200, {"id": "x", "object": "chat.completion", "model": body.get("model"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}],
                                 "usage": usage})

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"LISTENING {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
