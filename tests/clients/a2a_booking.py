"""A2A booking agent for the end-to-end scenarios: a real `a2a-sdk` server (JSON-RPC binding,
agent card at /.well-known/agent-card.json). Each task asks an OpenAI-compatible LLM once and
completes with its answer. Like an instrumented agent, it forwards the W3C `traceparent` it was
called with to that LLM call, so the LLM call joins the caller's trace.

Usage: a2a_booking.py --listen HOST:PORT --name NAME --url PUBLIC_URL --llm URL --model M
       [--ssl-certfile cert.pem --ssl-keyfile key.pem]   (serve HTTPS, TLS terminated here)
Prints `ready` on stdout once serving.
"""

import argparse
import asyncio
import json
import sys
import urllib.request

import uvicorn
from starlette.applications import Starlette

from a2a.helpers import new_task_from_user_message, new_text_message, get_message_text
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types.a2a_pb2 import AgentCapabilities, AgentCard, AgentInterface, AgentSkill


def ask_llm(url, model, prompt, traceparent):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}]}).encode()
    headers = {"content-type": "application/json", "authorization": "Bearer sk-test-e2e"}
    if traceparent:
        headers["traceparent"] = traceparent
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=20) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


class Booking(AgentExecutor):
    def __init__(self, args):
        self.args = args

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        headers = context.call_context.state.get("headers", {})
        tp = headers.get("traceparent")
        task = context.current_task or new_task_from_user_message(context.message)
        if context.current_task is None:
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        await updater.start_work()
        text = get_message_text(context.message)
        answer = await asyncio.to_thread(ask_llm, self.args.llm, self.args.model, text, tp)
        await updater.complete(new_text_message(answer, context_id=task.context_id, task_id=task.id))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise RuntimeError("cancel not supported")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--llm", required=True)
    p.add_argument("--model", default="gpt-4o-mini")
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate chain (PEM)")
    p.add_argument("--ssl-keyfile", default=None, help="the private key of --ssl-certfile (PEM)")
    args = p.parse_args()
    host, port = args.listen.rsplit(":", 1)
    card = AgentCard(
        name=args.name,
        description="Books trips (tollgate e2e)",
        version="1.0.0",
        supported_interfaces=[AgentInterface(url=args.url, protocol_binding="JSONRPC", protocol_version="1.0")],
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[
            AgentSkill(id="book-flight", name="Book a flight", description="flights", tags=["travel"]),
            AgentSkill(id="refund", name="Refund", description="refunds", tags=["money"]),
        ],
    )
    handler = DefaultRequestHandler(agent_executor=Booking(args), task_store=InMemoryTaskStore(), agent_card=card)
    # v0.3 clients (`message/send`, `tasks/get`, no A2A-Version header) are served too.
    routes = create_agent_card_routes(card) + create_jsonrpc_routes(handler, "/", enable_v0_3_compat=True)
    app = Starlette(routes=routes)
    tls = {"ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile} if args.ssl_certfile else {}
    config = uvicorn.Config(app, host=host, port=int(port), log_level="warning", **tls)
    server = uvicorn.Server(config)

    async def run():
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        print("ready", flush=True)
        await task

    asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
