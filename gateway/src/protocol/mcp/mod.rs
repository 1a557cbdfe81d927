//! Model Context Protocol traffic (routes with `protocol: mcp`): JSON-RPC over the Streamable
//! HTTP and legacy HTTP+SSE transports, observed and governed per agent.

use http::{Request, Response};
use hyper::body::Incoming;

use super::http::{forward, L7Context, ProxyBody};

/// Serve one request of an MCP route.
pub async fn handle(ctx: &L7Context, req: Request<Incoming>) -> Response<ProxyBody> {
    forward(ctx, req).await
}
