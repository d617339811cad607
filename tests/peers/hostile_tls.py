"""Hostile TLS peers against the collector (tests/tests/collector.rs).

flood HOST PORT SECONDS SPEC...: each SPEC is `SOURCE:N:KIND`; N tasks bound to the loopback
  address SOURCE, KIND `badtoken` (TLS connection sending a bad-token GET every 3 s, reconnecting
  whenever the server closes) or `silent` (TCP connection that never starts TLS). Prints a JSON
  line of counts at the end.
bombs HOST PORT TOKEN FILE N: N concurrent POSTs of the gzip body FILE to /v1/ingest with TOKEN;
  prints the status codes as a JSON list.
"""

import asyncio
import json
import os
import ssl
import sys


def context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


BAD = (
    b"GET /v1/clients HTTP/1.1\r\nHost: collector\r\n"
    b"Authorization: Bearer not-a-valid-token-00000000\r\n\r\n"
)


async def badtoken(host, port, src, stats, ctx):
    while True:
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ctx, local_addr=(src, 0)), 15
            )
            stats["connected"] += 1
            answered = 0
            try:
                while True:
                    w.write(BAD)
                    await w.drain()
                    data = await asyncio.wait_for(r.read(65536), 15)
                    if not data:
                        stats["closed_by_server"] += 1
                        break
                    stats["answers"] += 1
                    answered += 1
                    if answered == 2:
                        # The server kept the connection for a second bad request.
                        stats["kept_after_401"] += 1
                    await asyncio.sleep(3)
            finally:
                w.close()
        except asyncio.CancelledError:
            raise
        except Exception:
            stats["errors"] += 1
            await asyncio.sleep(0.5)


async def silent(host, port, src, stats):
    while True:
        try:
            r, w = await asyncio.open_connection(host, port, local_addr=(src, 0))
            stats["silent_connected"] += 1
            await r.read()
            w.close()
        except asyncio.CancelledError:
            raise
        except Exception:
            stats["errors"] += 1
        await asyncio.sleep(0.5)


async def flood(host, port, seconds, specs):
    stats = {k: 0 for k in ["connected", "answers", "closed_by_server", "kept_after_401", "silent_connected", "errors"]}
    ctx = context()
    tasks = []
    for spec in specs:
        src, n, kind = spec.split(":")
        for _ in range(int(n)):
            if kind == "silent":
                tasks.append(asyncio.create_task(silent(host, port, src, stats)))
            else:
                tasks.append(asyncio.create_task(badtoken(host, port, src, stats, ctx)))
    await asyncio.sleep(seconds)
    # Not waiting for the tasks to finish: a cancellation can be lost inside wait_for
    # (Python 3.11), and the process ends here anyway.
    print(json.dumps(stats), flush=True)
    os._exit(0)


async def bomb(host, port, token, body, ctx):
    try:
        r, w = await asyncio.open_connection(host, port, ssl=ctx)
        w.write(
            b"POST /v1/ingest HTTP/1.1\r\nHost: collector\r\nContent-Encoding: gzip\r\n"
            + b"Content-Type: application/json\r\nConnection: close\r\n"
            + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await w.drain()
        line = await asyncio.wait_for(r.readline(), 120)
        w.close()
        return int(line.split()[1])
    except Exception:
        return 0


async def bombs(host, port, token, path, n):
    with open(path, "rb") as f:
        body = f.read()
    ctx = context()
    codes = await asyncio.gather(*[bomb(host, port, token, body, ctx) for _ in range(n)])
    print(json.dumps(codes), flush=True)


def main():
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "flood":
        asyncio.run(flood(host, port, float(sys.argv[4]), sys.argv[5:]))
    elif mode == "bombs":
        asyncio.run(bombs(host, port, sys.argv[4], sys.argv[5], int(sys.argv[6])))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
