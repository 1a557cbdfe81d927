#!/usr/bin/env python3
"""Chat completions through the real `openai` SDK with its own retry logic left on, recording
every HTTP response the SDK saw (status, time, rate-limit headers), so a test can check that the
SDK honoured tollgate's Retry-After. The SDK is configured from the environment only
(OPENAI_API_KEY, OPENAI_BASE_URL); the httpx client is the SDK's own default client with a
response hook, so retries, timeouts and header parsing are exactly the SDK's.

Usage: openai_governed.py --request '{"model": ..., "messages": [...], "max_tokens": N}'
                          [--calls N] [--max-retries N]
Output (stdout, one line): {"sdk": ..., "calls": [{"ok", "elapsed", "content" | "status",
"error"}], "responses": [{"status", "t", "headers": {retry-after*, x-ratelimit-*}}]}
"""

import argparse
import json
import sys
import time

import openai

T0 = time.monotonic()
RESPONSES = []


def record(response):
    h = {k.lower(): v for k, v in response.headers.items()
         if k.lower().startswith(("retry-after", "x-ratelimit-"))}
    RESPONSES.append({"status": response.status_code, "t": time.monotonic() - T0, "headers": h})


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--request", required=True)
    p.add_argument("--calls", type=int, default=1)
    p.add_argument("--max-retries", type=int, default=2)
    a = p.parse_args()
    req = json.loads(a.request)

    http = openai.DefaultHttpxClient(event_hooks={"response": [record]})
    client = openai.OpenAI(max_retries=a.max_retries, timeout=30.0, http_client=http)
    calls = []
    for _ in range(a.calls):
        start = time.monotonic()
        try:
            r = client.chat.completions.create(model=req["model"], messages=req["messages"],
                                               max_tokens=req.get("max_tokens"))
            calls.append({"ok": True, "elapsed": time.monotonic() - start,
                          "content": r.choices[0].message.content,
                          "usage": r.usage.model_dump() if r.usage else None})
        except openai.APIStatusError as e:
            calls.append({"ok": False, "elapsed": time.monotonic() - start, "status": e.status_code,
                          "error": e.body, "type": type(e).__name__})
    print(json.dumps({"sdk": f"openai {openai.__version__}", "calls": calls, "responses": RESPONSES}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
