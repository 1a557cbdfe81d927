#!/usr/bin/env python3
"""One Messages API call through the real, unmodified `anthropic` SDK; prints what it got as JSON.

Configured only the way an agent's operator would: base URL and API key (flags, else
ANTHROPIC_BASE_URL / ANTHROPIC_API_KEY), trust roots from SSL_CERT_FILE; no retries, so a failure
is seen once and a retried request is never counted twice.

Streaming uses `client.messages.stream(...)` and `get_final_message()`, so the SDK's own
accumulator checks every event (order, indexes, JSON fragments), and the events it yields are
counted by type (the SDK drops `ping` itself).

Usage: anthropic_messages.py [--base-url URL] [--api-key KEY] [--model M] [--prompt TEXT]
       [--max-tokens N] [--stream] [--tools] [--roundtrip] [--count-tokens]
Output (stdout, one line): {"sdk", "id", "model", "text", "tool_use": [{"id", "name", "input"}],
"stop_reason", "usage": {...}, "events": {type: n}, "count_tokens"?, "final"?: {same keys plus
"tool_result"}}
"""

import argparse
import json
import os
import sys
from collections import Counter

import anthropic

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
    },
}


def summarize(msg, events):
    """The parts of a Message a test asserts on."""
    u = msg.usage
    return {
        "id": msg.id,
        "model": msg.model,
        "text": "".join(b.text for b in msg.content if b.type == "text"),
        "tool_use": [{"id": b.id, "name": b.name, "input": b.input} for b in msg.content if b.type == "tool_use"],
        "stop_reason": msg.stop_reason,
        "usage": {
            "input_tokens": u.input_tokens,
            "output_tokens": u.output_tokens,
            "cache_read_input_tokens": u.cache_read_input_tokens,
            "cache_creation_input_tokens": u.cache_creation_input_tokens,
        },
        "events": dict(events),
    }


def call(client, stream, kwargs):
    if not stream:
        return summarize(client.messages.create(**kwargs), Counter())
    events = Counter()
    with client.messages.stream(**kwargs) as s:
        for ev in s:
            events[ev.type] += 1
        msg = s.get_final_message()
    return summarize(msg, events)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", default=os.environ.get("ANTHROPIC_BASE_URL"))
    p.add_argument("--api-key", default=os.environ.get("ANTHROPIC_API_KEY", "placeholder"))
    p.add_argument("--model", default="claude-sonnet-4-6")
    p.add_argument("--prompt", default="What is the weather in Paris?")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--tools", action="store_true", help="offer the get_weather tool")
    p.add_argument("--roundtrip", action="store_true", help="answer a tool_use with a tool_result and call again")
    p.add_argument("--count-tokens", action="store_true", help="also call messages.count_tokens")
    a = p.parse_args()

    client = anthropic.Anthropic(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=30.0)
    messages = [{"role": "user", "content": a.prompt}]
    kwargs = {"model": a.model, "max_tokens": a.max_tokens, "messages": messages}
    if a.tools:
        kwargs["tools"] = [WEATHER_TOOL]

    out = {"sdk": f"anthropic {anthropic.__version__}"}
    out.update(call(client, a.stream, kwargs))
    if a.count_tokens:
        ct_kwargs = {k: v for k, v in kwargs.items() if k != "max_tokens"}
        out["count_tokens"] = client.messages.count_tokens(**ct_kwargs).input_tokens
    if a.roundtrip and out["tool_use"]:
        tu = out["tool_use"][0]
        result = json.dumps({"city": tu["input"].get("city"), "temperature": 21, "unit": tu["input"].get("unit")})
        assistant = {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": tu["id"], "name": tu["name"], "input": tu["input"]}],
        }
        user = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tu["id"], "content": result}]}
        kwargs["messages"] = messages + [assistant, user]
        final = call(client, a.stream, kwargs)
        final["tool_result"] = result
        out["final"] = final
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
