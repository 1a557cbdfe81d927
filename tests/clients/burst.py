#!/usr/bin/env python3
"""Many OpenAI chat completions in a row, fast, counting who answered; prints one JSON line.

Two ways to call, both configured only with a base URL and a (placeholder) API key:

--mode raw (default): stdlib `http.client` over keep-alive connections (one per worker thread),
`POST {base}/chat/completions`; fast enough for a thousand calls in a few seconds.
--mode sdk: the unmodified `openai` SDK (`client.chat.completions.with_raw_response.create`,
one client per worker, no retries); an `APIStatusError` is recorded with its class, status and
the error body the SDK parsed, so a scenario can check what an agent's code would see.

Output: {"mode", "count", "ok", "statuses": {status: n}, "served_by": {x-mock-name: n},
"calls": [{"status", "ms", "served_by", "model", "usage", "error"?}] (only with --count <= 20),
"errors": [first 5 errors], "max_ms", "elapsed_ms"}. Exits 0 whatever the calls returned; a
transport failure of a call is recorded as status 0.
"""

import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse
from collections import Counter


def body_for(a, i):
    prompt = a.prompt if not a.vary else f"{a.prompt} (call {i})"
    return json.dumps({"model": a.model, "messages": [{"role": "user", "content": prompt}]}).encode()


class RawWorker:
    """One keep-alive connection; reconnects after a transport error or `Connection: close`."""

    def __init__(self, a):
        u = urllib.parse.urlsplit(a.base_url)
        if u.scheme != "http":
            raise SystemExit("raw mode speaks plain http only")
        self.host, self.port = u.hostname, u.port or 80
        self.path = u.path.rstrip("/") + "/chat/completions"
        self.key = a.api_key
        self.conn = None

    def call(self, a, i):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"}
        try:
            self.conn.request("POST", self.path, body=body_for(a, i), headers=headers)
            r = self.conn.getresponse()
            data = r.read()
        except (OSError, http.client.HTTPException) as e:
            self.conn.close()
            self.conn = None
            return {"status": 0, "error": {"class": type(e).__name__, "message": str(e)}}
        if (r.getheader("connection") or "").lower() == "close":
            self.conn.close()
            self.conn = None
        out = {"status": r.status, "served_by": r.getheader("x-mock-name")}
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = None
        if r.status == 200 and isinstance(parsed, dict):
            out["model"] = parsed.get("model")
            out["usage"] = parsed.get("usage")
        else:
            out["error"] = {"class": "http", "body": parsed, "text": data.decode("utf-8", "replace")}
        return out


class SdkWorker:
    def __init__(self, a):
        import openai

        self.openai = openai
        self.client = openai.OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=30.0)

    def call(self, a, i):
        openai = self.openai
        messages = json.loads(body_for(a, i))["messages"]
        try:
            raw = self.client.chat.completions.with_raw_response.create(model=a.model, messages=messages)
            r = raw.parse()
        except openai.APIStatusError as e:
            return {
                "status": e.status_code,
                "served_by": e.response.headers.get("x-mock-name"),
                "error": {
                    "class": type(e).__name__,
                    "api_status_error": True,
                    "body": e.body,
                    "text": e.response.text,
                },
            }
        except openai.APIError as e:
            return {"status": 0, "error": {"class": type(e).__name__, "api_status_error": False, "message": str(e)}}
        return {
            "status": raw.status_code,
            "served_by": raw.headers.get("x-mock-name"),
            "model": r.model,
            "usage": r.usage.model_dump(mode="json") if r.usage else None,
        }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.2:8113/v1")
    p.add_argument("--api-key", default="placeholder")
    p.add_argument("--mode", choices=["raw", "sdk"], default="raw")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--model", default="gpt-4o-mini")
    p.add_argument("--prompt", default="Say hello.")
    p.add_argument("--vary", action="store_true", help="number the prompt of each call")
    a = p.parse_args()

    make = RawWorker if a.mode == "raw" else SdkWorker
    results = [None] * a.count
    next_i = iter(range(a.count))
    lock = threading.Lock()

    def run():
        w = make(a)
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            t = time.monotonic()
            res = w.call(a, i)
            res["ms"] = round((time.monotonic() - t) * 1e3, 3)
            results[i] = res

    t0 = time.monotonic()
    threads = [threading.Thread(target=run) for _ in range(max(1, min(a.concurrency, a.count)))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = (time.monotonic() - t0) * 1e3

    statuses = Counter(str(r["status"]) for r in results)
    served = Counter(r.get("served_by") or "none" for r in results)
    errors = [dict(r["error"], status=r["status"]) for r in results if "error" in r][:5]
    out = {
        "mode": a.mode,
        "count": a.count,
        "ok": statuses.get("200", 0),
        "statuses": dict(statuses),
        "served_by": dict(served),
        "errors": errors,
        "max_ms": max((r["ms"] for r in results), default=0),
        "elapsed_ms": round(elapsed, 3),
    }
    if a.count <= 20:
        out["calls"] = results
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
