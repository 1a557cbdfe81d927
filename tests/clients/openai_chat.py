#!/usr/bin/env python3
"""One chat completion through the real, unmodified `openai` SDK; prints what it got as JSON.

The SDK is configured only the way an agent's operator would: OPENAI_API_KEY (and optionally
OPENAI_BASE_URL) from the environment, trust roots from SSL_CERT_FILE. No http_client, no verify
override: if tollgate's minted certificate were not trusted this would fail, as it would for a
real agent.

Usage: openai_chat.py --request '{"model": ..., "messages": [...], "max_tokens": N}' [--stream]
Output (stdout, one line): {"sdk": ..., "id": ..., "model": ..., "content": ..., "finish_reason": ...,
"usage": {...}, "chunks": N}
"""

import argparse
import json
import sys

import openai


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--request", required=True, help="JSON with model, messages and optional max_tokens")
    p.add_argument("--stream", action="store_true", help="stream with stream_options.include_usage")
    a = p.parse_args()
    req = json.loads(a.request)

    # No retries: a retried request would be counted twice by tollgate and hide a first failure.
    client = openai.OpenAI(max_retries=0, timeout=30.0)
    kwargs = {"model": req["model"], "messages": req["messages"]}
    if "max_tokens" in req:
        kwargs["max_tokens"] = req["max_tokens"]

    out = {"sdk": f"openai {openai.__version__}"}
    if a.stream:
        stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
        parts, usage, chunks, finish = [], None, 0, None
        for chunk in stream:
            chunks += 1
            out["id"], out["model"] = chunk.id, chunk.model
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    parts.append(choice.delta.content)
                if choice.finish_reason:
                    finish = choice.finish_reason
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
        out.update(content="".join(parts), finish_reason=finish, usage=usage, chunks=chunks)
    else:
        r = client.chat.completions.create(**kwargs)
        out.update(
            id=r.id,
            model=r.model,
            content=r.choices[0].message.content,
            finish_reason=r.choices[0].finish_reason,
            usage=r.usage.model_dump() if r.usage else None,
            chunks=0,
        )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
