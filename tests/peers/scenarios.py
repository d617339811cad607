"""Labelled traffic for the detection evaluation: real HTTP requests over loopback, each
client from its own 127.x address (or many clients behind one, as behind a NAT) with its own
API key, against an OpenAI-compatible server.

Two sets, never mixed: the **tuning** set (fixed seed family `tune-*`, its own parameter
ranges) is what the rules were designed and tuned on; the **held-out** set draws every
parameter from different ranges with a seed from another family (`heldout-*`, a new seed per
CI run unless given), and is only ever measured. Every scenario family is in both sets, with
different parameters; the tuning set also keeps the original six scenarios.

Time is compressed: every pause and rate is in scaled seconds (real = scaled / SCALE), against
an agent whose clock runs at the same speed (detect.time_scale).

Usage: scenarios.py --port P --scale S --minutes M --set tuning|heldout --seed N
                    [--only a,b,...] --labels OUT.json
"""

import argparse
import http.client
import json
import math
import multiprocessing
import random
import threading
import time

# name: (kind, description). kind: normal (must not alert), allowed (allow-listed, must not
# alert), unlisted (an un-listed nightly eval job: must alert, see docs/detection.md),
# attack (must alert).
SCENARIOS = {
    "normal": ("normal", "interactive users: sessions of requests with reading pauses, breaks"),
    "batch": ("allowed", "heavy batch job on the allow-list: 4 parallel connections"),
    "office-nat": ("normal", "an office behind one NAT address: each person with their own key, human pace"),
    "cloud24": ("normal", "a busy cloud /24: tenants with their own keys; people, cron jobs and light apps"),
    "healthchecks": ("normal", "load-balancer health checks: GET /health at a fixed period"),
    "agent-loop": ("normal", "agentic coding loops: steady, small outputs, growing prompts, task resets"),
    "heavy-users": ("normal", "interactive heavy users: short think times, long outputs, sessions and breaks"),
    "nightly-eval": ("unlisted", "un-listed nightly eval job: parallel connections, long outputs, minutes"),
    "bot": ("attack", "high-rate bot: parallel connections, long replies"),
    "steady": ("attack", "slow-and-steady extractor: one request every few seconds, regular"),
    "distributed": ("attack", "distributed extractor: many addresses of one /24, own keys, periodic"),
    "probing": ("attack", "logit probing: very many tiny requests"),
    "under-thresholds": ("attack", "a bot just under each single-rule threshold: 7 connections, Poisson, long outputs"),
    "poisson-bot": ("attack", "Poisson-jittered bot: a few connections, long outputs, no regularity"),
    "rotation": ("attack", "one key rotating through source addresses"),
    "many-keys-net": ("attack", "many keys from a few addresses of one network, same request shape"),
    "low-and-slow": ("attack", "one key at a fast human rate for hours, long outputs, never pausing"),
    "hydra": ("attack", "a ring of many keys over several networks, each far below any per-key limit"),
}

# Only in the tuning set: the original scenarios (their rules were tuned on them).
TUNING_ONLY = {"batch", "steady", "distributed"}

# Parameter ranges per set: (low, high), drawn uniformly; ints stay ints. Held-out ranges
# differ from the tuning ones (wider, shifted, more clients), chosen before any held-out run.
RANGES = {
    "tuning": {
        "normal": dict(users=(4, 6), think=(25.0, 45.0), session=(6.0, 20.0), pause=(3.0, 10.0), arrive=(0.0, 10.0)),
        "batch": dict(conns=(4, 4)),
        "office-nat": dict(users=(12, 18), think=(25.0, 45.0), session=(8.0, 25.0), pause=(3.0, 10.0), arrive=(0.0, 15.0)),
        "cloud24": dict(tenants=(15, 22), arrive=(0.0, 15.0)),
        "healthchecks": dict(lbs=(2, 2), period=(5.0, 10.0)),
        "agent-loop": dict(sessions=(2, 3), step=(2.0, 6.0), growth=(500, 1500), initial=(2000, 5000),
                           tokens=(20, 120), steps=(10, 30), rest=(30.0, 120.0)),
        "heavy-users": dict(users=(2, 3), think=(15.0, 25.0), session=(15.0, 40.0), pause=(3.0, 10.0)),
        "nightly-eval": dict(start=(5.0, 15.0), conns=(4, 4), per_conn=(20.0, 30.0), duration=(8.0, 12.0), tokens=(200, 500)),
        "bot": dict(conns=(8, 8), per_conn=(30.0, 30.0), tokens=(150, 150)),
        "steady": dict(period=(4.0, 4.0)),
        "distributed": dict(addresses=(50, 50), period=(10.0, 10.0)),
        "probing": dict(conns=(4, 4), per_conn=(100.0, 100.0)),
        "under-thresholds": dict(conns=(7, 7), rate=(60.0, 100.0), tokens=(300, 600), start=(0.0, 5.0)),
        "poisson-bot": dict(conns=(1, 2), rate=(20.0, 40.0), tokens=(300, 600), start=(0.0, 10.0)),
        "rotation": dict(rate=(30.0, 60.0), every=(2.0, 5.0), tokens=(200, 600), start=(0.0, 10.0)),
        "many-keys-net": dict(keys=(15, 25), addresses=(3, 6), rate=(2.0, 4.0), tokens=(300, 600), start=(6.0, 12.0)),
        "low-and-slow": dict(rate=(4.0, 6.0), tokens=(600, 1000), start=(0.0, 5.0)),
        "hydra": dict(keys=(20, 30), networks=(3, 5), rate=(1.0, 2.0), tokens=(300, 800), start=(6.0, 12.0)),
    },
    "heldout": {
        "normal": dict(users=(6, 10), think=(30.0, 60.0), session=(8.0, 30.0), pause=(3.0, 15.0), arrive=(0.0, 20.0)),
        "office-nat": dict(users=(24, 36), think=(20.0, 60.0), session=(10.0, 35.0), pause=(2.0, 15.0), arrive=(0.0, 25.0)),
        "cloud24": dict(tenants=(28, 40), arrive=(0.0, 25.0)),
        "healthchecks": dict(lbs=(3, 5), period=(2.0, 5.0)),
        "agent-loop": dict(sessions=(3, 5), step=(1.0, 10.0), growth=(1000, 4000), initial=(3000, 10000),
                           tokens=(10, 200), steps=(15, 50), rest=(20.0, 300.0)),
        "heavy-users": dict(users=(3, 5), think=(12.0, 30.0), session=(20.0, 50.0), pause=(2.0, 15.0)),
        "nightly-eval": dict(start=(10.0, 30.0), conns=(3, 6), per_conn=(15.0, 40.0), duration=(10.0, 20.0), tokens=(150, 600)),
        "bot": dict(conns=(10, 14), per_conn=(15.0, 25.0), tokens=(200, 400)),
        "probing": dict(conns=(3, 6), per_conn=(70.0, 120.0)),
        "under-thresholds": dict(conns=(7, 7), rate=(90.0, 118.0), tokens=(400, 800), start=(0.0, 10.0)),
        "poisson-bot": dict(conns=(2, 3), rate=(15.0, 60.0), tokens=(400, 1000), start=(0.0, 15.0)),
        "rotation": dict(rate=(20.0, 50.0), every=(1.0, 4.0), tokens=(200, 700), start=(0.0, 15.0)),
        "many-keys-net": dict(keys=(20, 40), addresses=(4, 10), rate=(1.0, 4.0), tokens=(300, 700), start=(6.0, 20.0)),
        "low-and-slow": dict(rate=(3.0, 5.0), tokens=(700, 1200), start=(0.0, 5.0)),
        "hydra": dict(keys=(30, 60), networks=(5, 8), rate=(0.5, 2.0), tokens=(300, 800), start=(6.0, 20.0)),
    },
}


def draw(rng, ranges):
    out = {}
    for k, (lo, hi) in ranges.items():
        out[k] = rng.randint(lo, hi) if isinstance(lo, int) else rng.uniform(lo, hi)
    return out


class Client:
    def __init__(self, port, source, key):
        self.port, self.source, self.key = port, source, key
        self.conn = None
        self.sent = 0

    def _send(self, method, path, body, headers):
        for _ in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60,
                                                           source_address=(self.source, 0))
                self.conn.request(method, path, body=body, headers=headers)
                self.conn.getresponse().read()
                self.sent += 1
                return
            except (OSError, http.client.HTTPException):
                self.conn = None

    def request(self, max_tokens, stream=False, prompt_len=40):
        body = json.dumps({
            "model": "stub",
            "messages": [{"role": "user", "content": "q" * int(prompt_len)}],
            "max_tokens": int(max_tokens),
            "stream": stream,
        })
        self._send("POST", "/v1/chat/completions", body, {
            "Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})

    def health(self):
        self._send("GET", "/health", None, {})

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Clock:
    def __init__(self, scale, minutes, origin):
        self.scale = scale
        self.origin = origin
        self.end = origin + minutes * 60 / scale

    def pause(self, scaled_seconds):
        time.sleep(max(0.0, min(scaled_seconds / self.scale, self.end - time.monotonic())))

    def running(self):
        return time.monotonic() < self.end

    def scaled_now(self):
        return (time.monotonic() - self.origin) * self.scale

    def until(self, scaled_t):
        self.pause(scaled_t - self.scaled_now())


def human(clk, c, rng, p, tokens=(20, 400), stream_p=0.6):
    """A person: sessions of requests, reading/typing pauses (log-normal, median `think`
    seconds), breaks between sessions; arrives some minutes in."""
    clk.until(p.get("arrive_at", 0.0) * 60)
    while clk.running():
        session_end = clk.scaled_now() + rng.uniform(*p["session_range"]) * 60
        while clk.running() and clk.scaled_now() < session_end:
            c.request(rng.randint(*tokens), stream=rng.random() < stream_p,
                      prompt_len=min(4000, int(rng.lognormvariate(math.log(200), 1.0))))
            clk.pause(rng.lognormvariate(math.log(p["think"]), 0.8))
        c.close()
        clk.pause(rng.uniform(*p["pause_range"]) * 60)


def poisson(clk, c, rng, rate_per_min, tokens, stream=False, prompt=(200, 2000), start=0.0):
    """Requests at exponential gaps (a Poisson process) of `rate_per_min`, closed loop."""
    clk.until(start * 60)
    while clk.running():
        t0 = clk.scaled_now()
        c.request(tokens if isinstance(tokens, int) else rng.randint(*tokens), stream=stream,
                  prompt_len=rng.randint(*prompt))
        spent = clk.scaled_now() - t0
        clk.pause(max(0.0, rng.expovariate(rate_per_min / 60) - spent))


def periodic(clk, c, rng, period, jitter, tokens, stream):
    clk.pause(rng.uniform(0, period))
    while clk.running():
        t0 = clk.scaled_now()
        c.request(tokens, stream=stream)
        spent = clk.scaled_now() - t0
        clk.pause(max(0.0, period * rng.uniform(1 - jitter, 1 + jitter) - spent))


def scenario(name, args, rng, p):
    """Returns (clients, [(target, args)])."""
    port = args.port
    work = []
    clients = []

    def add(c, target, *a):
        clients.append(c)
        work.append((target, (c,) + a))

    if name in ("normal", "office-nat"):
        users = p["users"]
        for i in range(1, users + 1):
            src = "127.0.30.1" if name == "office-nat" else f"127.0.20.{i}"
            urng = random.Random(rng.random())
            up = dict(think=p["think"] * urng.uniform(0.7, 1.4), session_range=(p["session"] * 0.5, p["session"] * 1.5),
                      pause_range=(p["pause"] * 0.5, p["pause"] * 1.5), arrive_at=urng.uniform(0, p["arrive"]))
            add(Client(port, src, f"sk-{name}-{i}"), human, urng, up)
    elif name == "batch":
        for _ in range(p["conns"]):
            add(Client(port, "127.0.21.1", "sk-batch-job"), poisson, random.Random(rng.random()), 60.0, 100)
    elif name == "cloud24":
        for i in range(1, p["tenants"] + 1):
            trng = random.Random(rng.random())
            c = Client(port, f"127.0.31.{i}", f"sk-tenant-{i}")
            kind = trng.random()
            if kind < 0.6:
                up = dict(think=trng.uniform(20, 60), session_range=(5, 30), pause_range=(3, 20),
                          arrive_at=trng.uniform(0, p["arrive"]))
                add(c, human, trng, up)
            elif kind < 0.85:
                # A cron job: a small batch of requests every few minutes.
                add(c, cron, trng, trng.uniform(60, 300), trng.randint(1, 4), trng.randint(20, 300),
                    trng.randint(100, 3000))
            else:
                # A light app integration: Poisson, its own prompt and reply sizes.
                size = trng.randint(100, 3000)
                add(c, poisson, trng, trng.uniform(0.5, 3.0), (50, trng.randint(60, 300)), False,
                    (size, size * 2), trng.uniform(0, p["arrive"]))
    elif name == "healthchecks":
        for i in range(1, p["lbs"] + 1):
            add(Client(port, f"127.0.32.{i}", None), health, random.Random(rng.random()), p["period"])
    elif name == "agent-loop":
        for i in range(1, p["sessions"] + 1):
            add(Client(port, f"127.0.33.{i}", f"sk-agent-{i}"), agent_loop, random.Random(rng.random()), p)
    elif name == "heavy-users":
        for i in range(1, p["users"] + 1):
            urng = random.Random(rng.random())
            up = dict(think=p["think"] * urng.uniform(0.8, 1.25), session_range=(p["session"] * 0.7, p["session"] * 1.3),
                      pause_range=(p["pause"] * 0.5, p["pause"] * 1.5), arrive_at=urng.uniform(0, 5))
            add(Client(port, f"127.0.34.{i}", f"sk-heavy-{i}"), human, urng, up, (100, 700), 0.7)
    elif name == "nightly-eval":
        for _ in range(p["conns"]):
            add(Client(port, "127.0.35.1", "sk-nightly-eval"), bounded, random.Random(rng.random()),
                p["start"], p["duration"], p["per_conn"], (p["tokens"] // 2, p["tokens"]))
    elif name == "bot":
        for _ in range(p["conns"]):
            add(Client(port, "127.0.22.1", "sk-bot"), poisson, random.Random(rng.random()), p["per_conn"],
                p["tokens"], False, (300, 600))
    elif name == "steady":
        add(Client(port, "127.0.23.1", "sk-steady"), periodic, rng, p["period"], 0.02, 60, True)
    elif name == "distributed":
        for i in range(1, p["addresses"] + 1):
            add(Client(port, f"127.0.24.{i}", f"sk-dist-{i}"), periodic, random.Random(rng.random()),
                p["period"], 0.2, 100, False)
    elif name == "probing":
        for _ in range(p["conns"]):
            add(Client(port, "127.0.25.1", "sk-probe"), poisson, random.Random(rng.random()), p["per_conn"], 1,
                False, (20, 60))
    elif name == "under-thresholds":
        for _ in range(p["conns"]):
            add(Client(port, "127.0.36.1", "sk-under"), poisson, random.Random(rng.random()),
                p["rate"] / p["conns"], (p["tokens"] // 2, p["tokens"]), False, (200, 1500), p["start"])
    elif name == "poisson-bot":
        for _ in range(p["conns"]):
            add(Client(port, "127.0.37.1", "sk-poisson"), poisson, random.Random(rng.random()),
                p["rate"] / p["conns"], (p["tokens"] // 2, p["tokens"]), False, (200, 1500), p["start"])
    elif name == "rotation":
        sources = [f"127.0.{38 + j // 250}.{1 + j % 250}" for j in range(500)]
        add(Client(port, sources[0], "sk-rotating"), rotating, rng, p, sources)
    elif name == "many-keys-net":
        size = rng.randint(300, 1500)
        start = p["start"] + rng.uniform(0, 1)
        for i in range(1, p["keys"] + 1):
            src = f"127.0.41.{1 + (i - 1) % p['addresses']}"
            add(Client(port, src, f"sk-mk-{i}"), poisson, random.Random(rng.random()), p["rate"],
                (p["tokens"] * 3 // 4, p["tokens"]), False, (size, int(size * 1.3)),
                start + rng.uniform(0, 1))
    elif name == "low-and-slow":
        add(Client(port, "127.0.42.1", "sk-slow"), poisson, rng, p["rate"], (p["tokens"] * 3 // 4, p["tokens"]),
            False, (200, 1500), p["start"])
    elif name == "hydra":
        size = rng.randint(300, 1500)
        start = p["start"]
        for i in range(1, p["keys"] + 1):
            net = (i - 1) % p["networks"]
            src = f"127.0.{50 + net}.{1 + (i - 1) // p['networks']}"
            add(Client(port, src, f"sk-hydra-{i}"), poisson, random.Random(rng.random()), p["rate"],
                (p["tokens"] * 3 // 4, p["tokens"]), False, (size, int(size * 1.3)),
                start + rng.uniform(0, 1))
    return clients, work


def health(clk, c, rng, period):
    clk.pause(rng.uniform(0, period))
    while clk.running():
        t0 = clk.scaled_now()
        c.health()
        clk.pause(max(0.0, period * rng.uniform(0.99, 1.01) - (clk.scaled_now() - t0)))


def cron(clk, c, rng, period, burst, tokens, prompt):
    clk.pause(rng.uniform(0, period))
    while clk.running():
        t0 = clk.scaled_now()
        for _ in range(burst):
            c.request(tokens, prompt_len=prompt)
        c.close()
        clk.pause(max(0.0, period - (clk.scaled_now() - t0)))


def agent_loop(clk, c, rng, p):
    """A coding agent: each step sends the whole growing context, gets a short answer (a tool
    call), runs the tool, and goes on; a new task starts from a fresh context."""
    clk.pause(rng.uniform(0, 60))
    while clk.running():
        context = int(p["initial"] * rng.uniform(0.5, 1.5))
        for _ in range(rng.randint(max(1, p["steps"] // 2), p["steps"])):
            if not clk.running():
                return
            c.request(rng.randint(max(1, p["tokens"] // 3), p["tokens"]), stream=rng.random() < 0.5,
                      prompt_len=context)
            context += int(p["growth"] * rng.uniform(0.5, 1.5))
            clk.pause(p["step"] * rng.uniform(0.5, 1.5))
        clk.pause(p["rest"] * rng.uniform(0.5, 1.5))


def bounded(clk, c, rng, start_min, duration_min, per_conn, tokens):
    """A job that starts at `start_min`, runs `duration_min`, then stops."""
    clk.until(start_min * 60)
    stop = clk.scaled_now() + duration_min * 60
    while clk.running() and clk.scaled_now() < stop:
        t0 = clk.scaled_now()
        c.request(rng.randint(*tokens), prompt_len=rng.randint(300, 2000))
        clk.pause(max(0.0, 60 / per_conn - (clk.scaled_now() - t0)))
    c.close()


def rotating(clk, c, rng, p, sources):
    clk.until(p["start"] * 60)
    i = 0
    while clk.running():
        until = clk.scaled_now() + p["every"] * 60 * rng.uniform(0.7, 1.3)
        while clk.running() and clk.scaled_now() < until:
            t0 = clk.scaled_now()
            c.request(rng.randint(p["tokens"] // 2, p["tokens"]), prompt_len=rng.randint(200, 1500))
            clk.pause(max(0.0, rng.expovariate(p["rate"] / 60) - (clk.scaled_now() - t0)))
        i += 1
        c.close()
        c.source = sources[i % len(sources)]
        c.sources_used.add(c.source)


def run_one(name, args, origin, queue):
    kind, description = SCENARIOS[name]
    # Seed families never overlap: "tune-<seed>-<name>" and "heldout-<seed>-<name>".
    family = "tune" if args.set == "tuning" else "heldout"
    rng = random.Random(f"{family}-{args.seed}-{name}")
    p = draw(rng, RANGES[args.set][name])
    clients, work = scenario(name, args, rng, p)
    for c in clients:
        c.sources_used = {c.source}
    clk = Clock(args.scale, args.minutes, origin)
    threads = [threading.Thread(target=t, args=(clk,) + a, daemon=True) for t, a in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put((name, {
        "kind": kind,
        "description": description,
        "params": {k: round(v, 2) if isinstance(v, float) else v for k, v in p.items()},
        "addresses": sorted({s for c in clients for s in c.sources_used}),
        "keys": sorted({c.key for c in clients if c.key}),
        "requests": sum(c.sent for c in clients),
    }))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--scale", type=float, default=10)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--set", choices=["tuning", "heldout"], default="tuning")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", default="")
    p.add_argument("--labels", required=True)
    args = p.parse_args()
    names = [n for n in (args.only.split(",") if args.only else SCENARIOS)
             if n and (args.set == "tuning" or n not in TUNING_ONLY or args.only)]
    # One process per scenario: hundreds of clients would contend for one interpreter lock.
    queue = multiprocessing.Queue()
    origin = time.monotonic()
    procs = [multiprocessing.Process(target=run_one, args=(n, args, origin, queue)) for n in names]
    for pr in procs:
        pr.start()
    out = dict(queue.get() for _ in procs)
    for pr in procs:
        pr.join()
    with open(args.labels, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
