"""Labelled traffic for the detection evaluation: real HTTP requests over loopback, each
client from its own 127.x address with its own API key, against an OpenAI-compatible server.

Time is compressed: every pause and rate is in scaled seconds (real = scaled / SCALE), so a
scenario of 40 minutes runs in 4 real minutes at --scale 10, against an agent whose clock
runs at the same speed (detect.time_scale).

Usage: scenarios.py --port P --scale S --minutes M --only bot,normal,... --labels OUT.json
"""

import argparse
import http.client
import json
import random
import threading
import time

SCENARIOS = {
    # name: (kind, description)
    "normal": ("normal", "5 interactive users: bursty requests with human pauses"),
    "batch": ("allowed", "heavy batch job on the allow-list: 4 parallel connections, continuous"),
    "bot": ("attack", "sustained high-rate bot: 8 parallel connections, long streamed replies"),
    "steady": ("attack", "slow-and-steady extractor: one request every 4 s, long replies, just under a naive rate limit"),
    "distributed": ("attack", "distributed extractor: 50 addresses of one /24, each 6 requests/min, own keys"),
    "probing": ("attack", "logit probing: very many tiny requests"),
}


class Client:
    def __init__(self, port, source, key):
        self.port, self.source, self.key = port, source, key
        self.conn = None
        self.sent = 0

    def request(self, max_tokens, stream=False, prompt_len=40):
        body = json.dumps({
            "model": "stub",
            "messages": [{"role": "user", "content": "q" * prompt_len}],
            "max_tokens": max_tokens,
            "stream": stream,
        })
        for _ in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30,
                                                           source_address=(self.source, 0))
                self.conn.request("POST", "/v1/chat/completions", body=body, headers={
                    "Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
                self.conn.getresponse().read()
                self.sent += 1
                return
            except (OSError, http.client.HTTPException):
                self.conn = None


def run(args):
    scale = args.scale
    start = time.monotonic()
    end = start + args.minutes * 60 / scale

    def pause(scaled_seconds):
        time.sleep(max(0.0, scaled_seconds / scale))

    def running():
        return time.monotonic() < end

    labels = {}
    threads = []

    def spawn(target, *a):
        t = threading.Thread(target=target, args=a, daemon=True)
        t.start()
        threads.append(t)

    def normal_user(c, rng):
        pause(rng.uniform(0, 10))
        while running():
            for _ in range(rng.randint(1, 3)):
                c.request(rng.randint(20, 80), stream=rng.random() < 0.5)
                pause(rng.uniform(1, 4))
            pause(rng.expovariate(1 / 15))

    def continuous(c, max_tokens, stream):
        while running():
            c.request(max_tokens, stream=stream)

    def periodic(c, period, jitter, max_tokens, stream, rng):
        pause(rng.uniform(0, period))
        while running():
            t0 = time.monotonic()
            c.request(max_tokens, stream=stream)
            spent = (time.monotonic() - t0) * scale
            pause(max(0.0, period * rng.uniform(1 - jitter, 1 + jitter) - spent))

    for name in args.only.split(","):
        kind, description = SCENARIOS[name]
        rng = random.Random(name)
        clients = []
        if name == "normal":
            clients = [Client(args.port, f"127.0.20.{i}", f"sk-normal-{i}") for i in range(1, 6)]
            for c in clients:
                spawn(normal_user, c, random.Random(c.source))
        elif name == "batch":
            clients = [Client(args.port, "127.0.21.1", "sk-batch-job") for _ in range(4)]
            for c in clients:
                spawn(continuous, c, 100, False)
        elif name == "bot":
            clients = [Client(args.port, "127.0.22.1", "sk-bot") for _ in range(8)]
            for c in clients:
                spawn(continuous, c, 150, True)
        elif name == "steady":
            clients = [Client(args.port, "127.0.23.1", "sk-steady")]
            spawn(periodic, clients[0], 4.0, 0.02, 60, True, rng)
        elif name == "distributed":
            clients = [Client(args.port, f"127.0.24.{i}", f"sk-dist-{i}") for i in range(1, 51)]
            for c in clients:
                spawn(periodic, c, 10.0, 0.2, 100, False, random.Random(c.source))
        elif name == "probing":
            clients = [Client(args.port, "127.0.25.1", "sk-probe") for _ in range(4)]
            for c in clients:
                spawn(continuous, c, 1, False)
        labels[name] = {
            "kind": kind,
            "description": description,
            "addresses": sorted({c.source for c in clients}),
            "keys": sorted({c.key for c in clients}),
            "clients": clients,
        }
    for t in threads:
        t.join()
    out = {}
    for name, l in labels.items():
        l["requests"] = sum(c.sent for c in l.pop("clients"))
        out[name] = l
    with open(args.labels, "w") as f:
        json.dump(out, f)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--scale", type=float, default=10)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--only", default=",".join(SCENARIOS))
    p.add_argument("--labels", required=True)
    run(p.parse_args())


if __name__ == "__main__":
    main()
