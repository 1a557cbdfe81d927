//! Agent-to-agent traffic (routes with `protocol: a2a`): JSON-RPC over HTTP and agent cards,
//! traced and authorized per calling agent.

use http::{Request, Response};
use hyper::body::Incoming;

use super::http::{forward, L7Context, ProxyBody};

/// Serve one request of an A2A route.
pub async fn handle(ctx: &L7Context, req: Request<Incoming>) -> Response<ProxyBody> {
    forward(ctx, req).await
}
