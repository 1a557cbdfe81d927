"""MCP server for the end-to-end scenarios: the real `mcp` SDK's MCPServer (formerly FastMCP)
over Streamable HTTP (or the legacy HTTP+SSE transport with --transport sse, or stdio with
--transport stdio, as a federation spawns it).

Every tool call is appended as one JSON line to --log, so a scenario can prove that a call
tollgate denied never reached the server.

    python mcp_server.py --host 127.0.0.2 --port 8000 --log calls.jsonl [--json-response]
        [--ssl-certfile cert.pem --ssl-keyfile key.pem]

Besides its tools it offers one prompt (`greet`) and one resource (`tollgate://<label>/motd`),
so a federation's merged prompt and resource lists show which server each entry came from.
"""

import argparse
import json
import time

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log", required=True)
    p.add_argument("--transport", choices=["streamable-http", "sse", "stdio"], default="streamable-http")
    p.add_argument("--json-response", action="store_true", help="answer POSTs with application/json")
    p.add_argument("--label", default="server", help="names this server in its resource URI and answers")
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate chain (PEM)")
    p.add_argument("--ssl-keyfile", default=None, help="the private key of --ssl-certfile (PEM)")
    a = p.parse_args()

    server = MCPServer("tollgate-e2e-tools")

    def record(tool: str, args: dict) -> None:
        with open(a.log, "a") as f:
            f.write(json.dumps({"tool": tool, "args": args, "t": time.time()}) + "\n")

    @server.tool()
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        record("get_weather", {"city": city})
        return f"Sunny in {city}, 21C"

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        record("add", {"a": a, "b": b})
        return a + b

    @server.tool()
    def delete_file(path: str) -> str:
        """Delete a file (pretend)."""
        record("delete_file", {"path": path})
        return f"deleted {path}"

    @server.prompt()
    def greet(name: str) -> str:
        """Greet someone."""
        return f"Hello {name}, from {a.label}"

    @server.resource(f"tollgate://{a.label}/motd")
    def motd() -> str:
        """Message of the day."""
        return f"motd of {a.label}"

    if a.transport == "stdio":
        # stdout carries the protocol: nothing else may be printed there.
        server.run(transport="stdio")
        return

    # The agents reach the server by its captured address: allow that Host.
    security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    if a.transport == "sse":
        app = server.sse_app(transport_security=security, host=a.host)
    else:
        app = server.streamable_http_app(json_response=a.json_response, transport_security=security, host=a.host)
    async def traced(scope, receive, send):
        # Record the W3C trace context each HTTP request arrived with (tollgate injects its own).
        if scope["type"] == "http":
            h = dict(scope.get("headers") or [])
            tp = h.get(b"traceparent")
            if tp is not None:
                with open(a.log, "a") as f:
                    line = {"traceparent": tp.decode(), "method": scope["method"], "path": scope["path"]}
                    f.write(json.dumps(line) + "\n")
            authz = h.get(b"authorization")
            if authz is not None:
                # Which token reached the server (a federation must never pass the client's on).
                with open(a.log, "a") as f:
                    f.write(json.dumps({"authorization": authz.decode(), "method": scope["method"]}) + "\n")
        await app(scope, receive, send)

    # With a certificate the server terminates TLS itself (uvicorn over asyncio's SSL).
    tls = {"ssl_certfile": a.ssl_certfile, "ssl_keyfile": a.ssl_keyfile} if a.ssl_certfile else {}
    uvicorn.run(traced, host=a.host, port=a.port, log_level="warning", **tls)


if __name__ == "__main__":
    main()
