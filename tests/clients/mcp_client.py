"""MCP client for the end-to-end scenarios: the real `mcp` SDK's client. Connects, lists the
tools, calls each `--call NAME JSON_ARGS`, and prints one JSON object on stdout:

    {"server": {...}, "protocol_version": "...", "tools": [names],
     "calls": [{"tool": ..., "ok": bool, "result": text | null,
                "error": {"code", "message", "data"} | null}]}

A JSON-RPC error (tollgate's refusals among them) is reported with its code, message and data
(`null` when the error carried none), so scenarios can check what tollgate answered.

    python mcp_client.py --url http://127.0.0.2:8000/mcp --call get_weather '{"city": "Paris"}'
"""

import argparse
import asyncio
import json
import sys

from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError


def text_of(result) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


async def run(a) -> dict:
    kwargs = {}
    if a.mode:
        kwargs["mode"] = a.mode
    out = {"calls": []}
    server = a.url
    headers = {}
    if a.traceparent:
        # The agent's own trace: tollgate continues it and names its span as the server's parent.
        headers["traceparent"] = a.traceparent
    if a.bearer:
        # An OAuth access token obtained out of band (the federation endpoint checks it).
        headers["Authorization"] = f"Bearer {a.bearer}"
    if headers:
        http = create_mcp_http_client(headers=headers)
        server = streamable_http_client(a.url, http_client=http)
    if a.sse:
        # Legacy HTTP+SSE transport: GET /sse stream, POST /messages/?session_id=...
        headers = {"traceparent": a.traceparent} if a.traceparent else None
        server = sse_client(a.url, headers=headers)
    async with Client(server, **kwargs) as client:
        out["protocol_version"] = client.protocol_version
        info = getattr(client, "server_info", None)
        out["server"] = info.model_dump(mode="json") if info is not None else None
        tools = await client.list_tools()
        out["tools"] = sorted(t.name for t in tools.tools)
        for name, args in a.call:
            try:
                r = await client.call_tool(name, json.loads(args))
                out["calls"].append(
                    {"tool": name, "ok": not r.is_error, "result": text_of(r), "error": None}
                )
            except MCPError as e:
                err = {"code": e.error.code, "message": e.error.message, "data": e.error.data}
                out["calls"].append({"tool": name, "ok": False, "result": None, "error": err})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--call", nargs=2, action="append", default=[], metavar=("TOOL", "ARGS"))
    p.add_argument("--mode", default=None, help="legacy | auto | a protocol version")
    p.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    p.add_argument("--sse", action="store_true", help="legacy HTTP+SSE transport (--url .../sse)")
    p.add_argument("--traceparent", default=None, help="W3C traceparent sent on every request")
    p.add_argument("--bearer", default=None, help="OAuth access token sent on every request")
    a = p.parse_args()
    try:
        print(json.dumps(asyncio.run(asyncio.wait_for(run(a), a.timeout))))
    except BaseException as e:  # a transport failure or timeout must still be reported as JSON
        print(json.dumps({"fatal": f"{type(e).__name__}: {e}"}))
        sys.exit(1)


if __name__ == "__main__":
    main()
