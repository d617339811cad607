"""A local stand-in for Splunk's HTTP Event Collector and for a webhook receiver, for the
outputs end-to-end test. It checks what Splunk documents and answers with Splunk's documented
codes and bodies:

  POST /services/collector/event   Authorization: Splunk <token>
    body: one or more JSON objects concatenated, each {"time", "host", "source", "sourcetype",
    ["index",] "event"}; "time" a number (epoch seconds), "event" present and not empty
    - the first --busy requests: 503 {"text":"Server is busy","code":9}
    - no Authorization: 401 {"text":"Token is required","code":2}
    - wrong token: 403 {"text":"Invalid token","code":4}
    - an invalid event: 400 {"text":"Invalid data format","code":6,"invalid-event-number":N}
    - else 200 {"text":"Success","code":0}
  POST /hook   X-Sensor-Signature: sha256=<hex HMAC-SHA256 of the body with the secret>
    - the first --busy requests: 503; a bad signature: 401; else 200

Accepted events go to OUTDIR/hec.jsonl and OUTDIR/webhook.jsonl, every answer to
OUTDIR/answers.jsonl. Prints "ready" once listening.

Usage: siem_receiver.py PORT OUTDIR --token T --secret-file F --busy N
"""

import argparse
import hashlib
import hmac
import http.server
import json
import os
import threading

LOCK = threading.Lock()


def append(path, obj):
    with LOCK, open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def make_handler(args, secret, counters):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def answer(self, status, body, route):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            append(os.path.join(args.outdir, "answers.jsonl"), {"route": route, "status": status})

        def busy(self, route):
            with LOCK:
                counters[route] = counters.get(route, 0) + 1
                return counters[route] <= args.busy

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            self.close_connection = True
            if self.path == "/services/collector/event":
                return self.hec(body)
            if self.path == "/hook":
                return self.hook(body)
            self.answer(404, {"text": "The requested URL was not found on this server.", "code": 404}, "?")

        def hec(self, body):
            auth = self.headers.get("Authorization")
            if auth is None:
                return self.answer(401, {"text": "Token is required", "code": 2}, "hec")
            if auth != f"Splunk {args.token}":
                return self.answer(403, {"text": "Invalid token", "code": 4}, "hec")
            if self.busy("hec"):
                return self.answer(503, {"text": "Server is busy", "code": 9}, "hec")
            text = body.decode("utf-8")
            decoder = json.JSONDecoder()
            events, i = [], 0
            while i < len(text):
                while i < len(text) and text[i].isspace():
                    i += 1
                if i == len(text):
                    break
                try:
                    obj, i = decoder.raw_decode(text, i)
                except ValueError:
                    return self.answer(400, {"text": "Invalid data format", "code": 6,
                                             "invalid-event-number": len(events)}, "hec")
                events.append(obj)
            if not events:
                return self.answer(400, {"text": "No data", "code": 5}, "hec")
            for n, e in enumerate(events):
                ok = (isinstance(e, dict) and isinstance(e.get("time"), (int, float))
                      and isinstance(e.get("host"), str) and isinstance(e.get("source"), str)
                      and isinstance(e.get("sourcetype"), str) and e.get("event") not in (None, "", {})
                      and set(e) <= {"time", "host", "source", "sourcetype", "index", "event", "fields"})
                if not ok:
                    return self.answer(400, {"text": "Invalid data format", "code": 6,
                                             "invalid-event-number": n}, "hec")
            for e in events:
                append(os.path.join(args.outdir, "hec.jsonl"), e)
            self.answer(200, {"text": "Success", "code": 0}, "hec")

        def hook(self, body):
            if self.busy("hook"):
                return self.answer(503, {"error": "busy"}, "hook")
            expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
            got = self.headers.get("X-Sensor-Signature", "")
            if not hmac.compare_digest(expected, got):
                return self.answer(401, {"error": "bad signature"}, "hook")
            append(os.path.join(args.outdir, "webhook.jsonl"),
                   {"event_id_header": self.headers.get("X-Sensor-Event-Id"),
                    "content_type": self.headers.get("Content-Type"),
                    "body": json.loads(body)})
            self.answer(200, {"ok": True}, "hook")

    return Handler


def main():
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("outdir")
    p.add_argument("--token", required=True)
    p.add_argument("--secret-file", required=True)
    p.add_argument("--busy", type=int, default=0)
    args = p.parse_args()
    with open(args.secret_file, "rb") as f:
        secret = f.read().rstrip()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args, secret, {}))
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
