#!/usr/bin/env python3
"""Several Messages API calls through one unmodified `anthropic` SDK client, so they share its
pooled keep-alive connection when the SDK keeps it; prints what each call got as one JSON list.

Configured only from the environment (ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL, SSL_CERT_FILE);
retries off. `--plan` names the calls in order:
- `tool`: streamed (`messages.stream`) with the get_weather tool offered, so the answer is a
  `tool_use` block whose input arrives as `input_json_delta` fragments;
- `result`: streamed, answering the last `tool_use` with a `tool_result` (text answer);
- `plain`: not streamed, no tools.
Streams end with `get_final_message()`, so the SDK's own accumulator checks every event.

Usage: anthropic_keepalive.py --model M --plan tool,result,plain
Output: [{"kind", "stream": bool, "id", "stop_reason", "text", "tool_use": [...], "usage": {...},
"events": {type: n}, "port": local port}, ...]
"""

import argparse
import json
import sys
from collections import Counter

import anthropic
from anthropic_messages import WEATHER_TOOL  # same folder: one definition of the tool and summary
from anthropic_messages import summarize as messages_summary

PORTS = []


def record(response):
    stream = response.extensions.get("network_stream")
    addr = stream.get_extra_info("client_addr") if stream is not None else None
    PORTS.append(addr[1] if addr else None)


def summarize(kind, msg, events):
    return {"kind": kind, "stream": kind != "plain", **messages_summary(msg, events), "port": PORTS[-1]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--plan", required=True)
    a = p.parse_args()

    http = anthropic.DefaultHttpxClient(event_hooks={"response": [record]})
    client = anthropic.Anthropic(max_retries=0, timeout=30.0, http_client=http)
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    last_tool = None
    out = []
    for i, kind in enumerate(a.plan.split(",")):
        kw = {"model": a.model, "max_tokens": 256}
        if kind == "plain":
            kw["messages"] = [{"role": "user", "content": f"Call {i}: name a colour and a number."}]
            out.append(summarize(kind, client.messages.create(**kw), Counter()))
            continue
        kw["tools"] = [WEATHER_TOOL]
        if kind == "tool":
            kw["messages"] = question
        elif kind == "result":
            if last_tool is None:
                raise SystemExit("plan: `result` needs an earlier `tool` call that got a tool_use")
            result = json.dumps({"city": last_tool["input"].get("city"), "temperature": 21})
            kw["messages"] = question + [
                {"role": "assistant", "content": [{"type": "tool_use", **last_tool}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": last_tool["id"], "content": result}]},
            ]
        else:
            raise SystemExit(f"plan: unknown call kind {kind!r}")
        events = Counter()
        with client.messages.stream(**kw) as s:
            for ev in s:
                events[ev.type] += 1
            msg = s.get_final_message()
        got = summarize(kind, msg, events)
        if got["tool_use"]:
            last_tool = got["tool_use"][0]
        out.append(got)
    client.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
