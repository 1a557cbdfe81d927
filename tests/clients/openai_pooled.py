#!/usr/bin/env python3
"""One `openai` SDK client object making chat calls on demand, so every call reuses the SDK's
pooled keep-alive connection: a test drives it line by line (one `call` line on stdin, one JSON
line on stdout) and can change tollgate's config between calls. Each result names the local port
of the connection the call went out on, so the test can check the pool kept one connection.
The SDK is configured from the environment only (OPENAI_API_KEY, OPENAI_BASE_URL); retries are
off so every refusal is seen as it was answered.

Usage: openai_pooled.py --model M   (then `call` lines on stdin; EOF ends it)
Output per call: {"ok": bool, "status": int, "port": int, "content" | "error": ...}
"""

import argparse
import json
import sys

import openai

PORTS = []


def record(response):
    stream = response.extensions.get("network_stream")
    addr = stream.get_extra_info("client_addr") if stream is not None else None
    PORTS.append(addr[1] if addr else None)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    a = p.parse_args()
    http = openai.DefaultHttpxClient(event_hooks={"response": [record]})
    client = openai.OpenAI(max_retries=0, timeout=30.0, http_client=http)
    for line in sys.stdin:
        if line.strip() != "call":
            continue
        msgs = [{"role": "user", "content": "Name a colour."}]
        try:
            r = client.chat.completions.create(model=a.model, messages=msgs, max_tokens=8)
            out = {"ok": True, "status": 200, "content": r.choices[0].message.content}
        except openai.APIStatusError as e:
            out = {"ok": False, "status": e.status_code, "error": e.body}
        except openai.APIConnectionError as e:
            out = {"ok": False, "status": 0, "error": str(e)}
        out["port"] = PORTS[-1] if PORTS else None
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
