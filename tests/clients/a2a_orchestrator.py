"""A2A orchestrator for the end-to-end scenarios: the real `a2a-sdk` client resolves a remote
agent's card and sends it one message (streamed or not), optionally continuing a W3C trace
(`--traceparent`, as an instrumented agent would send). Prints one JSON object: the card name,
the final task state and answer, or the error the SDK raised (`error_type`, `error`).
"""

import argparse
import asyncio
import json
import sys

import httpx

from a2a.client import A2ACardResolver, ClientConfig, create_client
from a2a.helpers import new_text_message, get_message_text
from a2a.types.a2a_pb2 import Role, SendMessageRequest, TaskState


async def run(args):
    out = {}
    headers = {"traceparent": args.traceparent} if args.traceparent else {}
    async with httpx.AsyncClient(headers=headers, timeout=30) as http:
        try:
            card = await A2ACardResolver(http, args.url).get_agent_card()
            out["card_name"] = card.name
            out["card_urls"] = [i.url for i in card.supported_interfaces]
            client = await create_client(card, client_config=ClientConfig(streaming=args.stream, httpx_client=http))
            msg = new_text_message(args.text, role=Role.ROLE_USER)
            if args.skill:
                msg.metadata.update({"skill": args.skill})
            req = SendMessageRequest(message=msg)
            state, answer, events = None, None, 0
            async for ev in client.send_message(req):
                events += 1
                if ev.HasField("task"):
                    state = ev.task.status.state
                    if ev.task.status.HasField("message"):
                        answer = get_message_text(ev.task.status.message)
                elif ev.HasField("status_update"):
                    state = ev.status_update.status.state
                    if ev.status_update.status.HasField("message"):
                        answer = get_message_text(ev.status_update.status.message)
                elif ev.HasField("message"):
                    answer = get_message_text(ev.message)
            out.update({"ok": True, "events": events, "answer": answer,
                        "state": TaskState.Name(state) if state is not None else None})
        except Exception as e:  # the test asserts on what the SDK raised
            out.update({"ok": False, "error_type": type(e).__name__, "error": str(e)})
    print(json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--skill")
    p.add_argument("--traceparent")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
