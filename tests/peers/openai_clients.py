"""Real OpenAI SDK clients: chat completions, streamed and not, with given API keys from given
source addresses. Usage: openai_clients.py BASE_URL SPEC_JSON
SPEC_JSON: [{"key": ..., "source": "127.0.0.5", "requests": 3, "stream": true,
             "headers": {...}}, ...]. Prints one JSON line per client with what it received.
"""

import json
import sys

try:
    import httpx2 as httpx  # what current openai releases use
except ImportError:
    import httpx
from openai import OpenAI


def run(base_url, spec):
    transport = httpx.HTTPTransport(local_address=spec["source"])
    client = OpenAI(base_url=base_url, api_key=spec["key"], max_retries=0,
                    default_headers=spec.get("headers") or None,
                    http_client=httpx.Client(transport=transport))
    chunks = 0
    for i in range(spec["requests"]):
        messages = [{"role": "user", "content": f"question {i} " + "x" * (i * 37)}]
        if spec.get("stream"):
            for chunk in client.chat.completions.create(model="stub", messages=messages,
                                                        max_tokens=4 + i, stream=True):
                chunks += 1
        else:
            reply = client.chat.completions.create(model="stub", messages=messages, max_tokens=4 + i)
            assert reply.choices[0].message.content
    return {"source": spec["source"], "chunks": chunks}


def main():
    base_url, specs = sys.argv[1], json.loads(sys.argv[2])
    for spec in specs:
        print(json.dumps(run(base_url, spec)), flush=True)


if __name__ == "__main__":
    main()
