#!/usr/bin/env python3
"""Many chat completions at once from one unmodified `openai` SDK process, optionally alongside
calls to a second HTTPS origin (another base URL) that the test keeps out of tollgate's capture.

Configured from the environment (OPENAI_API_KEY, OPENAI_BASE_URL, SSL_CERT_FILE); retries off.
`--calls N` calls of `--kind` (`stream`: streamed with stream_options.include_usage; `plain`)
are all started together: `asyncio.gather` over one AsyncOpenAI client with `--async` (OpenSSL
through a memory BIO), else one thread per call sharing one OpenAI client (OpenSSL on the
socket). `--prompt-bytes` pads each prompt to about that size (a large request body written in
one SSL call). `--other-url U --other-calls K --other-bytes B` adds K non-streamed calls with a
prompt of about B bytes to U, started with the others.

Usage: openai_load.py --model M --calls N [--kind stream|plain] [--async] [--prompt-bytes P]
       [--other-url U --other-calls K --other-bytes B]
Output: {"calls": [{"id", "usage", "port"}...], "other": [{"usage"}...], "max_in_flight": int}
(max_in_flight: most calls of `--calls` in progress at one instant, from their start/end times).
"""

import argparse
import asyncio
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

PORTS = {}
LOCK = threading.Lock()


def port_of(response):
    stream = response.extensions.get("network_stream")
    addr = stream.get_extra_info("client_addr") if stream is not None else None
    return addr[1] if addr else None


def record(response):
    with LOCK:
        PORTS[response.request.headers.get("x-call-id")] = port_of(response)


async def arecord(response):
    record(response)


def messages(i, size):
    text = f"Call {i}: name a colour and a number."
    if size > len(text):
        # Words, so the mock counts them as prompt tokens the way it counts any text.
        pad = " ".join(f"w{i}x{n}" for n in range(size // 8))
        text = (text + " " + pad)[:size]
    return [{"role": "user", "content": text}]


def usage_of(chunks):
    usage, rid = None, None
    for chunk in chunks:
        rid = chunk.id
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    return rid, usage


def max_overlap(spans):
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = cur = 0
    for _, d in edges:
        cur += d
        best = max(best, cur)
    return best


def run_threads(a):
    http = openai.DefaultHttpxClient(event_hooks={"response": [record]}, limits=httpx.Limits(max_connections=1000, max_keepalive_connections=0))
    client = openai.OpenAI(max_retries=0, timeout=60.0, http_client=http)
    other = None
    if a.other_url:
        other = openai.OpenAI(max_retries=0, timeout=60.0, base_url=a.other_url)
    spans = []

    def one(i):
        kw = {"model": a.model, "messages": messages(i, a.prompt_bytes), "max_tokens": 16, "extra_headers": {"x-call-id": str(i)}}
        t0 = time.monotonic()
        if a.kind == "stream":
            rid, usage = usage_of(list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)))
        else:
            r = client.chat.completions.create(**kw)
            rid, usage = r.id, r.usage.model_dump()
        with LOCK:
            spans.append((t0, time.monotonic()))
        return {"id": rid, "usage": usage, "port": PORTS.get(str(i))}

    def one_other(i):
        r = other.chat.completions.create(model=a.model, messages=messages(1000 + i, a.other_bytes), max_tokens=4)
        return {"usage": r.usage.model_dump()}

    with ThreadPoolExecutor(max_workers=a.calls + a.other_calls) as pool:
        calls = [pool.submit(one, i) for i in range(a.calls)]
        others = [pool.submit(one_other, i) for i in range(a.other_calls if other else 0)]
        out = {"calls": [f.result() for f in calls], "other": [f.result() for f in others]}
    out["max_in_flight"] = max_overlap(spans)
    return out


async def run_async(a):
    http = openai.DefaultAsyncHttpxClient(event_hooks={"response": [arecord]}, limits=httpx.Limits(max_connections=1000, max_keepalive_connections=0))
    client = openai.AsyncOpenAI(max_retries=0, timeout=60.0, http_client=http)
    other = openai.AsyncOpenAI(max_retries=0, timeout=60.0, base_url=a.other_url) if a.other_url else None
    spans = []

    async def one(i):
        kw = {"model": a.model, "messages": messages(i, a.prompt_bytes), "max_tokens": 16, "extra_headers": {"x-call-id": str(i)}}
        t0 = time.monotonic()
        if a.kind == "stream":
            rid, usage = usage_of([c async for c in await client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)])
        else:
            r = await client.chat.completions.create(**kw)
            rid, usage = r.id, r.usage.model_dump()
        spans.append((t0, time.monotonic()))
        return {"id": rid, "usage": usage, "port": PORTS.get(str(i))}

    async def one_other(i):
        r = await other.chat.completions.create(model=a.model, messages=messages(1000 + i, a.other_bytes), max_tokens=4)
        return {"usage": r.usage.model_dump()}

    tasks = [one(i) for i in range(a.calls)] + [one_other(i) for i in range(a.other_calls if other else 0)]
    res = await asyncio.gather(*tasks)
    await client.close()
    if other is not None:
        await other.close()
    return {"calls": res[: a.calls], "other": res[a.calls :], "max_in_flight": max_overlap(spans)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--calls", type=int, required=True)
    p.add_argument("--kind", choices=["stream", "plain"], default="stream")
    p.add_argument("--async", dest="use_async", action="store_true")
    p.add_argument("--prompt-bytes", type=int, default=0)
    p.add_argument("--other-url")
    p.add_argument("--other-calls", type=int, default=0)
    p.add_argument("--other-bytes", type=int, default=0)
    a = p.parse_args()
    out = asyncio.run(run_async(a)) if a.use_async else run_threads(a)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
