#!/usr/bin/env python3
"""OpenAI API calls through the real, unmodified `openai` SDK; prints what it got as JSON.

Configured only the way an agent's operator would: base URL and API key (flags, else
OPENAI_BASE_URL / OPENAI_API_KEY), trust roots from SSL_CERT_FILE; no retries.

--api chat (default): chat completion offering a strict `get_weather` function tool (unless
--no-tools). Streaming uses the SDK's `client.chat.completions.stream(...)` helper, whose
accumulator rebuilds the message from every delta and parses the tool arguments as JSON, with
`stream_options.include_usage`.
--api responses: Responses API with the same tool as a Responses function tool; streaming uses
`client.responses.stream(...)`, which checks the event lifecycle (created first, output indexes,
item identities, completed).
--api embeddings / completions: one embeddings / legacy completions call (completions can stream).
--roundtrip: after a tool call, send the tool's result back and call again ("final" in the output).

Output (stdout, one line): {"sdk", "api", "id", "model", "content", "tool_calls": [{"id", "name",
"arguments"}], "finish_reason", "usage": {...}, "chunks": n, "events": {type: n}, "final"?: {...}}
"""

import argparse
import base64
import json
import os
import struct
import sys
from collections import Counter

import openai

PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
CHAT_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": PARAMS,
        "strict": True,
    },
}
RESPONSES_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city.",
    "parameters": PARAMS,
    "strict": True,
}


def dump(x):
    return x.model_dump(mode="json") if x is not None else None


def tool_result(arguments: str) -> str:
    args = json.loads(arguments)
    return json.dumps({"city": args.get("city"), "temperature": 21, "unit": args.get("unit")})


def chat_call(client, a, messages, tools):
    kwargs = {"model": a.model, "messages": messages}
    if tools:
        kwargs["tools"] = tools
    if a.max_tokens:
        kwargs["max_tokens"] = a.max_tokens
    events = Counter()
    if a.stream:
        with client.chat.completions.stream(stream_options={"include_usage": True}, **kwargs) as s:
            for ev in s:
                events[ev.type] += 1
            r = s.get_final_completion()
    else:
        r = client.chat.completions.create(**kwargs)
    msg = r.choices[0].message
    calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls or []]
    return {
        "id": r.id,
        "model": r.model,
        "content": msg.content,
        "tool_calls": calls,
        "finish_reason": r.choices[0].finish_reason,
        "usage": dump(r.usage),
        "chunks": events.get("chunk", 0),
        "events": dict(events),
    }, msg


def run_chat(client, a):
    messages = [{"role": "user", "content": a.prompt}]
    tools = [] if a.no_tools else [CHAT_TOOL]
    out, msg = chat_call(client, a, messages, tools)
    if a.roundtrip and out["tool_calls"]:
        call = out["tool_calls"][0]
        result = tool_result(call["arguments"])
        assistant = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
            ],
        }
        follow = messages + [assistant, {"role": "tool", "tool_call_id": call["id"], "content": result}]
        final, _ = chat_call(client, a, follow, tools)
        final["tool_result"] = result
        out["final"] = final
    return out


def responses_call(client, a, input_items, tools):
    kwargs = {"model": a.model, "input": input_items}
    if tools:
        kwargs["tools"] = tools
    if a.max_tokens:
        kwargs["max_output_tokens"] = a.max_tokens
    events = Counter()
    if a.stream:
        with client.responses.stream(**kwargs) as s:
            for ev in s:
                events[ev.type] += 1
            r = s.get_final_response()
    else:
        r = client.responses.create(**kwargs)
    calls = [{"id": o.call_id, "name": o.name, "arguments": o.arguments} for o in r.output if o.type == "function_call"]
    return {
        "id": r.id,
        "model": r.model,
        "content": r.output_text,
        "tool_calls": calls,
        "finish_reason": r.status,
        "usage": dump(r.usage),
        "chunks": sum(events.values()),
        "events": dict(events),
    }


def run_responses(client, a):
    tools = [] if a.no_tools else [RESPONSES_TOOL]
    items = [{"role": "user", "content": a.prompt}]
    out = responses_call(client, a, items, tools)
    if a.roundtrip and out["tool_calls"]:
        call = out["tool_calls"][0]
        result = tool_result(call["arguments"])
        follow = items + [
            {"type": "function_call", "call_id": call["id"], "name": call["name"], "arguments": call["arguments"]},
            {"type": "function_call_output", "call_id": call["id"], "output": result},
        ]
        final = responses_call(client, a, follow, tools)
        final["tool_result"] = result
        out["final"] = final
    return out


def vector(embedding):
    """A float list, also from a base64 (little-endian float32) embedding the SDK left encoded."""
    if isinstance(embedding, str):
        raw = base64.b64decode(embedding)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return list(embedding)


def run_embeddings(client, a):
    r = client.embeddings.create(model=a.model, input=[a.prompt, "second input"], encoding_format=a.encoding)
    vectors = [vector(d.embedding) for d in r.data]
    return {"model": r.model, "count": len(r.data), "dims": len(vectors[0]), "vectors": vectors, "usage": dump(r.usage)}


def run_completions(client, a):
    kwargs = {"model": a.model, "prompt": a.prompt}
    if a.max_tokens:
        kwargs["max_tokens"] = a.max_tokens
    if not a.stream:
        r = client.completions.create(**kwargs)
        c = r.choices[0]
        return {
            "id": r.id,
            "model": r.model,
            "content": c.text,
            "finish_reason": c.finish_reason,
            "usage": dump(r.usage),
            "chunks": 0,
        }
    parts, usage, chunks, finish, rid = [], None, 0, None, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        chunks += 1
        rid = chunk.id
        for c in chunk.choices:
            parts.append(c.text)
            finish = c.finish_reason or finish
        if chunk.usage is not None:
            usage = dump(chunk.usage)
    content = "".join(parts)
    return {"id": rid, "model": a.model, "content": content, "finish_reason": finish, "usage": usage, "chunks": chunks}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL"))
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "placeholder"))
    p.add_argument("--api", choices=["chat", "responses", "embeddings", "completions"], default="chat")
    p.add_argument("--model", default="gpt-4o-mini")
    p.add_argument("--prompt", default="What is the weather in Paris?")
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--no-tools", action="store_true", help="do not offer the get_weather tool")
    p.add_argument("--roundtrip", action="store_true", help="answer a tool call with its result and call again")
    p.add_argument("--encoding", choices=["float", "base64"], default="float", help="embeddings encoding_format")
    a = p.parse_args()

    client = openai.OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=30.0)
    run = {"chat": run_chat, "responses": run_responses, "embeddings": run_embeddings, "completions": run_completions}
    out = {"sdk": f"openai {openai.__version__}", "api": a.api}
    out.update(run[a.api](client, a))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
