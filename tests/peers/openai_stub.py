"""A small OpenAI-compatible chat completions server: the inference server the sensor watches.

Streams replies as server-sent events, one token chunk per event, flushed one by one with
TCP_NODELAY as real inference servers do. It is also the ground truth: for every request it
appends to a JSON-lines ledger exactly what it read and wrote on the connection (bytes of
the request head and body, bytes of the response, events sent), the credential it saw and the
X-Forwarded-For header. Usage: openai_stub.py PORT LEDGER
"""

import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Counting:
    """Wraps a file object and counts the bytes that pass through it."""

    def __init__(self, inner):
        self.inner = inner
        self.count = 0

    def read(self, n=-1):
        data = self.inner.read(n)
        self.count += len(data)
        return data

    def readline(self, limit=-1):
        data = self.inner.readline(limit)
        self.count += len(data)
        return data

    def write(self, data):
        n = self.inner.write(data)
        self.count += len(data)
        return n

    def flush(self):
        self.inner.flush()

    def __getattr__(self, name):
        return getattr(self.inner, name)


LEDGER_LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = Counting(self.rfile)
        self.wfile = Counting(self.wfile)

    def log_message(self, *args):
        pass

    def handle_one_request(self):
        # Each request's byte counts start where the previous one ended.
        self.rfile.count = 0
        self.wfile.count = 0
        self.events = 0
        super().handle_one_request()
        if getattr(self, "command", None) and self.rfile.count:
            with LEDGER_LOCK, open(self.server.ledger, "a") as ledger:
                ledger.write(json.dumps({
                    "peer": self.client_address[0],
                    "key": self.key,
                    "xff": self.headers.get("X-Forwarded-For"),
                    "bytes_in": self.rfile.count,
                    "bytes_out": self.wfile.count,
                    "events": self.events,
                }) + "\n")

    def do_GET(self):
        # Load-balancer health checks and model listings: a tiny reply.
        self.key = None
        body = b'{"status":"ok"}' if self.path.startswith("/health") else b'{"object":"list","data":[]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def do_POST(self):
        auth = self.headers.get("Authorization", "")
        self.key = auth[7:] if auth.lower().startswith("bearer ") else None
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        tokens = int(body.get("max_tokens") or 5)
        created = int(time.time())
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(tokens):
                chunk = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": created,
                         "model": body.get("model", "stub"),
                         "choices": [{"index": 0, "delta": {"content": f" tok{i}"}, "finish_reason": None}]}
                self.send_event(json.dumps(chunk))
            self.send_event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        else:
            reply = json.dumps({
                "id": "chatcmpl-stub", "object": "chat.completion", "created": created,
                "model": body.get("model", "stub"),
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": " ".join(f"tok{i}" for i in range(tokens))},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": tokens + 3},
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
            self.wfile.flush()

    def send_event(self, data):
        payload = f"data: {data}\n\n".encode()
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()
        self.events += 1
        # Token pacing: each event leaves in its own segment, as from a real model.
        time.sleep(0.002)


def main():
    port, ledger = int(sys.argv[1]), sys.argv[2]
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.ledger = ledger
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
