#!/usr/bin/env python3
"""One streamed call through the real, unmodified `openai` or `anthropic` SDK, read the way an
agent reads it, reporting what the SDK handed the agent.

--mode full:  read to the terminal event. The `openai` SDK itself stops at `data: [DONE]` and
              closes the response without waiting for the body's end; with `anthropic` the
              agent stops at `message_stop` and closes the stream (as agents that act on the
              final event do).
--mode first: close the stream right after the first chunk that carries text.

The SDKs are configured from the environment only (OPENAI_API_KEY/OPENAI_BASE_URL,
ANTHROPIC_API_KEY/ANTHROPIC_BASE_URL), without retries so each call is seen once.

Usage: sdk_streams.py --sdk openai|anthropic --request JSON [--mode full|first]
Output (stdout, one line): {"sdk", "ok": true, "chunks": [{"fields": [...], "choices": n,
"text": str} | {"type": str, "text": str}], "text"} or {"sdk", "ok": false, "status", "error"}
"""

import argparse
import json
import sys


def openai_call(req, mode):
    import openai

    client = openai.OpenAI(max_retries=0, timeout=30.0)
    out = {"sdk": f"openai {openai.__version__}", "chunks": []}
    try:
        stream = client.chat.completions.create(**req, stream=True)
    except openai.APIStatusError as e:
        return {**out, "ok": False, "status": e.status_code, "error": e.body}
    text = ""
    for chunk in stream:
        piece = "".join(c.delta.content or "" for c in chunk.choices)
        text += piece
        # Fields the JSON actually carried (a key sent as null is set; an absent one is not).
        out["chunks"].append({"fields": sorted(chunk.model_fields_set), "choices": len(chunk.choices), "text": piece})
        if mode == "first" and piece:
            stream.close()
            break
    return {**out, "ok": True, "text": text}


def anthropic_call(req, mode):
    import anthropic

    client = anthropic.Anthropic(max_retries=0, timeout=30.0)
    out = {"sdk": f"anthropic {anthropic.__version__}", "chunks": []}
    try:
        stream = client.messages.create(**req, stream=True)
    except anthropic.APIStatusError as e:
        return {**out, "ok": False, "status": e.status_code, "error": e.body}
    text = ""
    for event in stream:
        piece = ""
        if event.type == "content_block_delta" and event.delta.type == "text_delta":
            piece = event.delta.text
        text += piece
        out["chunks"].append({"type": event.type, "text": piece})
        if event.type == "message_stop" or (mode == "first" and piece):
            stream.close()
            break
    return {**out, "ok": True, "text": text}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sdk", choices=["openai", "anthropic"], required=True)
    p.add_argument("--request", required=True)
    p.add_argument("--mode", choices=["full", "first"], default="full")
    a = p.parse_args()
    req = json.loads(a.request)
    call = openai_call if a.sdk == "openai" else anthropic_call
    print(json.dumps(call(req, a.mode)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
