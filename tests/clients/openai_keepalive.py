#!/usr/bin/env python3
"""Several chat completions through one unmodified `openai` SDK client, so they share its pooled
keep-alive connection; prints what each call got as one JSON list.

Configured only from the environment (OPENAI_API_KEY, OPENAI_BASE_URL, SSL_CERT_FILE); retries
off. `--plan` names the calls in order: `plain` (non-streamed) or `stream` (streamed with
stream_options.include_usage). `--async` uses AsyncOpenAI (httpx over asyncio: OpenSSL through a
memory BIO instead of the socket).

Usage: openai_keepalive.py --model M --plan plain,stream,plain [--async]
Output: [{"stream": bool, "id": ..., "content": ..., "usage": {...}, "port": local port}, ...]
"""

import argparse
import asyncio
import json
import sys

import openai

PORTS = []


def record(response):
    stream = response.extensions.get("network_stream")
    addr = stream.get_extra_info("client_addr") if stream is not None else None
    PORTS.append(addr[1] if addr else None)


async def arecord(response):
    record(response)


def message(i):
    return [{"role": "user", "content": f"Call {i}: name a colour and a number."}]


def collect(chunks):
    parts, usage, rid = [], None, None
    for chunk in chunks:
        rid = chunk.id
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                parts.append(choice.delta.content)
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    return rid, "".join(parts), usage


def run_sync(a, plan):
    client = openai.OpenAI(max_retries=0, timeout=30.0, http_client=openai.DefaultHttpxClient(event_hooks={"response": [record]}))
    out = []
    for i, kind in enumerate(plan):
        kw = {"model": a.model, "messages": message(i), "max_tokens": 16}
        if kind == "stream":
            rid, content, usage = collect(list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)))
        else:
            r = client.chat.completions.create(**kw)
            rid, content, usage = r.id, r.choices[0].message.content, r.usage.model_dump()
        out.append({"stream": kind == "stream", "id": rid, "content": content, "usage": usage, "port": PORTS[-1]})
    return out


async def run_async(a, plan):
    http = openai.DefaultAsyncHttpxClient(event_hooks={"response": [arecord]})
    client = openai.AsyncOpenAI(max_retries=0, timeout=30.0, http_client=http)
    out = []
    for i, kind in enumerate(plan):
        kw = {"model": a.model, "messages": message(i), "max_tokens": 16}
        if kind == "stream":
            chunks = [c async for c in await client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)]
            rid, content, usage = collect(chunks)
        else:
            r = await client.chat.completions.create(**kw)
            rid, content, usage = r.id, r.choices[0].message.content, r.usage.model_dump()
        out.append({"stream": kind == "stream", "id": rid, "content": content, "usage": usage, "port": PORTS[-1]})
    await client.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--plan", required=True)
    p.add_argument("--async", dest="use_async", action="store_true")
    a = p.parse_args()
    plan = a.plan.split(",")
    out = asyncio.run(run_async(a, plan)) if a.use_async else run_sync(a, plan)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
